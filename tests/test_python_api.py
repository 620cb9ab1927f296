"""The Python API (`from atlas import Atlas`) on the tiny synthetic atlas: each method, each kind
of image input, corrections as a technologist sees them, and the errors of bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from atlas import Atlas
from atlas.catalog import Catalog
from atlas.cell import CellRegion, SegmentationError
from atlas.ingest import ImageReadError
from atlas.python_api import ArchivedCell
from atlas.reference import UnknownCell
from indexer.cli import main
from tests.conftest import home_copy


@pytest.fixture(scope="module")
def atlas(built_atlas) -> Atlas:
    home, _ = built_atlas
    return Atlas.open(home)


def archived_image(atlas: Atlas, position: int = 0) -> tuple[str, Path]:
    """(cell_id, source file) of an archived cell."""
    cells = atlas.loaded.cells
    return str(cells["cell_id"].iat[position]), Path(cells["source_path"].iat[position])


def other_label(atlas: Atlas, label: str) -> str:
    return next(c for c in atlas.classes if c != label)


def test_open_gives_the_live_version(built_atlas, atlas):
    _, result = built_atlas
    assert atlas.version == result.version
    assert atlas.classes == ["eosinophil", "lymphocyte", "monocyte", "neutrophil"]
    assert len(atlas) == 48
    assert "48 cells, 0 corrected" in repr(atlas)


def test_reference_cells_take_a_path_bytes_a_pil_image_or_an_array(atlas):
    cell_id, path = archived_image(atlas)
    array = np.asarray(Image.open(path).convert("RGB"))
    answers = {
        "path": atlas.reference_cells(path, k=5),
        "str": atlas.reference_cells(str(path), k=5),
        "bytes": atlas.reference_cells(path.read_bytes(), k=5),
        "pil": atlas.reference_cells(Image.open(path), k=5),
        "array": atlas.reference_cells(array, k=5),
    }
    for answer in answers.values():
        assert answer.version == atlas.version and len(answer.references) == 5
        assert answer.prediction == answers["path"].prediction
        assert answer.prediction.label in atlas.classes
        assert pytest.approx(sum(answer.label_distribution.values())) == 1.0
    ids = {kind: [r.cell_id for r in answer.references] for kind, answer in answers.items()}
    # A file's bytes are recognised as the archived cell's own image: it is no reference of
    # itself. A decoded image carries no file to recognise, so the cell finds itself first.
    assert ids["path"] == ids["str"] == ids["bytes"] and cell_id not in ids["path"]
    assert ids["pil"] == ids["array"] and ids["array"][0] == cell_id
    assert answers["array"].references[0].distance < 1e-3


def test_som_method_starts_at_the_query_node(atlas):
    _, path = archived_image(atlas, 3)
    result = atlas.reference_cells(path, k=4, method="som")
    node = result.som_node
    grid = [np.hypot(r.som_node[0] - node[0], r.som_node[1] - node[1]) for r in result.references]
    assert len(grid) == 4 and grid == sorted(grid)


def test_classify_gives_the_prediction_of_the_main_cell(atlas):
    _, path = archived_image(atlas, 5)
    prediction = atlas.classify(path)
    assert prediction == atlas.reference_cells(path).prediction
    assert set(prediction.probabilities) == set(atlas.classes)
    assert pytest.approx(sum(prediction.probabilities.values()), abs=1e-5) == 1.0
    assert prediction.entropy_bits >= 0 and isinstance(prediction.flagged, bool)


def test_segment_finds_the_cells_of_an_image_main_cell_first(atlas):
    _, path = archived_image(atlas)
    image = np.asarray(Image.open(path).convert("RGB"))
    regions = atlas.segment(image)
    assert regions and all(isinstance(r, CellRegion) for r in regions)
    main_cell = regions[0]
    assert main_cell.cell.shape == image.shape[:2] and main_cell.nucleus.any()
    assert (main_cell.nucleus <= main_cell.cell).all()
    r0, c0, r1, c1 = main_cell.bbox
    assert 0 <= r0 < r1 <= image.shape[0] and 0 <= c0 < c1 <= image.shape[1]
    assert [r.bbox for r in atlas.segment(path)] == [r.bbox for r in regions]
    assert atlas.segment(np.full((64, 64, 3), 235, np.uint8)) == []  # bare glass


def test_cell_gives_the_archived_record(atlas):
    cell_id, path = archived_image(atlas, 7)
    row = atlas.loaded.cells.iloc[7]
    record = atlas.cell(cell_id)
    assert isinstance(record, ArchivedCell)
    assert record.cell_id == cell_id and record.version == atlas.version
    assert record.label == record.original_label == row["label"] and not record.corrected
    assert record.prediction.label == row["predicted_label"]
    assert record.prediction.entropy_bits == pytest.approx(row["entropy_bits"])
    assert record.prediction.flagged == bool(row["flagged"])
    assert record.som_node == (row["som_row"], row["som_col"])
    assert record.crop_path.is_file() and record.source_path == path
    assert record.bbox == tuple(int(v) for v in row["bbox"])
    assert record.duplicate_group == row["duplicate_group"] and cell_id not in record.duplicates
    assert record.features["nucleus_area_um2"] == pytest.approx(row["nucleus_area_um2"])


def test_reference_cells_of_an_archived_cell_leave_it_out(atlas):
    cell_id, _ = archived_image(atlas, 2)
    result = atlas.reference_cells_of(cell_id, k=6)
    assert result.cell_id == cell_id and len(result.references) == 6
    assert cell_id not in [r.cell_id for r in result.references]
    assert result.prediction == atlas.cell(cell_id).prediction


def test_a_correction_shows_in_the_record_the_references_and_the_cli(built_atlas, atlas, tmp_path,
                                                                     capsys):
    home = home_copy(built_atlas[0], tmp_path)
    _, path = archived_image(atlas, 0)
    nearest = atlas.reference_cells(path, k=3).references[0]
    new_label = other_label(atlas, nearest.label)
    Catalog(home).add_correction(nearest.cell_id, nearest.label, new_label, note=None,
                                 author="tech", atlas_version=atlas.version)

    corrected = Atlas.open(home)
    record = corrected.cell(nearest.cell_id)
    assert (record.label, record.original_label) == (new_label, nearest.label)
    assert record.corrected
    assert "1 corrected" in repr(corrected)
    again = corrected.reference_cells(path, k=3).references[0]
    assert (again.cell_id, again.label) == (nearest.cell_id, new_label)
    assert atlas.cell(nearest.cell_id).label == nearest.label  # an opened atlas is a snapshot

    assert main(["query", str(path), "--home", str(home), "--k", "3", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["references"][0] == {**answer["references"][0], "cell_id": nearest.cell_id,
                                       "label": new_label}


def test_unknown_cells_and_bad_images_raise_clear_errors(atlas, tmp_path):
    with pytest.raises(UnknownCell):
        atlas.cell("no-such-cell")
    with pytest.raises(UnknownCell):
        atlas.reference_cells_of("no-such-cell")
    with pytest.raises(ImageReadError, match="file is empty"):
        atlas.classify(b"")
    with pytest.raises(ImageReadError, match="not a readable image"):
        atlas.classify(b"this is not an image")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(archived_image(atlas)[1].read_bytes()[:400])
    with pytest.raises(ImageReadError, match="corrupt or truncated"):
        atlas.reference_cells(truncated)
    with pytest.raises(FileNotFoundError, match="missing.png does not exist"):
        atlas.segment(tmp_path / "missing.png")
    with pytest.raises(ImageReadError, match="is a folder"):
        atlas.segment(tmp_path)
    with pytest.raises(SegmentationError, match="too small"):
        atlas.segment(np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(SegmentationError, match="too small"):
        atlas.classify(Image.new("RGB", (12, 12)))
    with pytest.raises(SegmentationError, match="expected an RGB uint8 image"):
        atlas.classify(np.zeros((64, 64), np.float32))
    with pytest.raises(SegmentationError, match="no white cell"):
        atlas.classify(np.full((64, 64, 3), 235, np.uint8))
    with pytest.raises(TypeError, match="file path, the bytes of an image file, a PIL image"):
        atlas.classify(42)
    _, path = archived_image(atlas)
    with pytest.raises(ValueError, match="k must be between 1 and 100"):
        atlas.reference_cells(path, k=0)
    with pytest.raises(ValueError, match="unknown method 'umap'"):
        atlas.reference_cells(path, method="umap")


def test_importing_atlas_modules_does_not_load_torch_until_atlas_is_used():
    code = ("import sys, atlas, atlas.cell\n"
            "assert 'torch' not in sys.modules and 'atlas.python_api' not in sys.modules\n"
            "from atlas import Atlas\n"
            "assert Atlas.__module__ == 'atlas.python_api'\n"
            "try:\n    atlas.Nothing\nexcept AttributeError as error:\n    print(error)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "has no attribute 'Nothing'" in done.stdout
