"""`cellatlas export` on the tiny generated atlas: each format, corrections applied, the tree
read by torchvision, masks read by pycocotools, the round trip through a new build, and bad
input that leaves nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from atlas.catalog import Catalog
from atlas.rle import decode_rle, encode_rle
from atlas.store import AtlasStore
from atlas.synthetic import CLASSES
from atlas.version import mask_path
from indexer.cli import main
from indexer.export import CELL_COLUMNS, export_atlas
from tests.conftest import home_copy, tiny_config

pytestmark = pytest.mark.filterwarnings(
    "ignore:n_jobs value .* overridden:UserWarning")  # umap, in builds

CELLS_PER_CLASS = 12  # the conftest archive


def version_cells(home: Path) -> tuple[str, pd.DataFrame]:
    store = AtlasStore(home)
    version = store.require_current()
    return version, store.version(version).read_cells()


def stored_masks(home: Path, crop_path: str) -> np.ndarray:
    return np.asarray(Image.open(mask_path(home / crop_path)))


@pytest.fixture(scope="module")
def corrected(built_atlas, tmp_path_factory):
    """A copy of the built atlas in which a neutrophil was corrected twice, to monocyte last."""
    home = home_copy(built_atlas[0], tmp_path_factory.mktemp("corrected"))
    version, cells = version_cells(home)
    cell_id = str(cells.loc[cells["label"] == "neutrophil", "cell_id"].iat[0])
    catalog = Catalog(home)
    catalog.add_correction(cell_id, "neutrophil", "lymphocyte", "round nucleus?", "ana", version)
    catalog.add_correction(cell_id, "lymphocyte", "monocyte", "kidney-shaped", "ben", version)
    return home, cell_id


def test_imagefolder_export_puts_a_corrected_cell_under_its_latest_label(corrected, tmp_path):
    home, cell_id = corrected
    out = tmp_path / "export"
    result = export_atlas(home, out, "imagefolder")

    assert sorted(p.name for p in out.iterdir()) == ["cells.csv", "corrections.csv", "export.json",
                                                     "images"]
    assert (out / "images" / "monocyte" / f"{cell_id}.jpg").is_file()
    assert not (out / "images" / "neutrophil" / f"{cell_id}.jpg").exists()
    assert result.counts_by_label == {"eosinophil": 12, "lymphocyte": 12, "monocyte": 13,
                                      "neutrophil": 11}
    in_folders = {p.name: len(list(p.iterdir())) for p in (out / "images").iterdir()}
    assert in_folders == result.counts_by_label

    cells = pd.read_csv(out / "cells.csv")
    assert tuple(cells.columns) == CELL_COLUMNS
    row = cells.set_index("cell_id").loc[cell_id]
    assert (row["label"], row["folder_label"], row["corrected"]) == ("monocyte", "neutrophil", True)
    assert row["crop_path"] == f"images/monocyte/{cell_id}.jpg"
    assert cells["corrected"].sum() == 1
    assert (cells["label"] == cells["folder_label"]).sum() == len(cells) - 1

    log = pd.read_csv(out / "corrections.csv")
    assert list(log["new_label"]) == ["lymphocyte", "monocyte"]  # oldest first
    assert list(log["author"]) == ["ana", "ben"]
    assert set(log["cell_id"]) == {cell_id}

    _, stored = version_cells(home)
    source = home / stored.set_index("cell_id").loc[cell_id, "crop_path"]
    assert (out / row["crop_path"]).read_bytes() == source.read_bytes()  # crops copied unchanged
    manifest = json.loads((out / "export.json").read_text())
    assert (manifest["cells"], manifest["unlabelled"], manifest["corrections"]) == (48, 0, 2)


def test_imagefolder_tree_loads_in_torchvision(corrected, tmp_path):
    from torchvision.datasets import ImageFolder

    home, cell_id = corrected
    out = tmp_path / "export"
    export_atlas(home, out, "imagefolder")
    dataset = ImageFolder(str(out / "images"))

    assert dataset.classes == sorted(CLASSES)
    assert len(dataset) == len(CLASSES) * CELLS_PER_CLASS
    labels = pd.read_csv(out / "cells.csv").set_index("cell_id")["label"]
    loaded = {Path(path).stem: dataset.classes[target] for path, target in dataset.samples}
    assert loaded == labels.to_dict()
    assert loaded[cell_id] == "monocyte"
    image, _ = dataset[0]
    assert (image.size, image.mode) == ((256, 256), "RGB")


def test_parquet_export_holds_the_version_columns_and_masks(built_atlas, tmp_path, capsys):
    home = built_atlas[0]
    out = tmp_path / "export"
    out.mkdir()  # an empty folder is fine
    assert main(["export", "--home", str(home), "--out", str(out), "--format", "parquet",
                 "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert sorted(p.name for p in out.iterdir()) == ["cells.parquet", "corrections.parquet",
                                                     "export.json", "images"]

    cells = pd.read_parquet(out / "cells.parquet").set_index("cell_id")
    _, stored = version_cells(home)
    stored = stored.set_index("cell_id").loc[cells.index]
    assert len(cells) == 48 and not cells["corrected"].any()
    for column in ("label", "predicted_label", "som_row", "som_col", "source_path",
                   "duplicate_group", "flagged"):
        assert cells[column].tolist() == stored[column].tolist(), column
    for column in ("entropy_bits", "umap_x", "umap_y"):
        np.testing.assert_allclose(cells[column], stored[column])
    boxes = cells[["box_row0", "box_col0", "box_row1", "box_col1"]].to_numpy()
    assert boxes.tolist() == [list(box) for box in stored["bbox"]]
    assert all((out / path).is_file() for path in cells["crop_path"])

    for cell_id in cells.index[:5]:
        labels = stored_masks(home, stored.loc[cell_id, "crop_path"])
        cell = decode_rle(json.loads(cells.loc[cell_id, "cell_mask_rle"]))
        nucleus = decode_rle(json.loads(cells.loc[cell_id, "nucleus_mask_rle"]))
        assert np.array_equal(cell, labels > 0) and np.array_equal(nucleus, labels == 255)
        assert 0 < nucleus.sum() < cell.sum()
    corrections = pd.read_parquet(out / "corrections.parquet")
    assert len(corrections) == 0 and "new_label" in corrections.columns


def test_rle_follows_the_coco_convention_of_pycocotools():
    from pycocotools import mask as coco_mask

    rng = np.random.default_rng(0)
    for mask in (rng.random((7, 5)) > 0.5, np.ones((3, 4), bool), np.zeros((4, 3), bool)):
        mask[0, 0] = True  # a mask starting with ones needs the empty first run of zeros
        rle = encode_rle(mask)
        decoded = coco_mask.decode(coco_mask.frPyObjects(rle, *rle["size"]))
        assert np.array_equal(decoded.astype(bool), mask)
        assert coco_mask.area(coco_mask.frPyObjects(rle, *rle["size"])) == mask.sum()


def test_coco_export_gives_cell_and_nucleus_masks_that_pycocotools_reads(corrected, tmp_path):
    from pycocotools import mask as coco_mask
    from pycocotools.coco import COCO

    home, cell_id = corrected
    out = tmp_path / "export"
    export_atlas(home, out, "coco")
    coco = COCO(str(out / "annotations.json"))
    cells = pd.read_csv(out / "cells.csv").set_index("cell_id")

    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    assert sorted(names.values()) == sorted([*CLASSES, "nucleus"])
    images = coco.loadImgs(coco.getImgIds())
    assert len(images) == 48 and len(coco.getAnnIds()) == 96
    _, stored = version_cells(home)
    stored = stored.set_index("cell_id")
    for image in images:
        assert (out / image["file_name"]).is_file()
        cell_annotation, nucleus_annotation = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
        assert names[cell_annotation["category_id"]] == cells.loc[image["cell_id"], "label"]
        assert names[nucleus_annotation["category_id"]] == "nucleus"
        assert nucleus_annotation["parent_id"] == cell_annotation["id"]
        labels = stored_masks(home, stored.loc[image["cell_id"], "crop_path"])
        assert np.array_equal(coco.annToMask(cell_annotation), labels > 0)
        assert np.array_equal(coco.annToMask(nucleus_annotation), labels == 255)
        for annotation in (cell_annotation, nucleus_annotation):
            rle = coco.annToRLE(annotation)
            assert annotation["area"] == coco_mask.area(rle)
            np.testing.assert_allclose(annotation["bbox"], coco_mask.toBbox(rle))
    corrected_image = next(i for i in images if i["cell_id"] == cell_id)
    cell_annotation = coco.loadAnns(coco.getAnnIds(imgIds=corrected_image["id"]))[0]
    assert names[cell_annotation["category_id"]] == "monocyte"


def test_unlabelled_cells_go_beside_the_class_tree_and_out_of_coco(built_atlas, tmp_path):
    from pycocotools.coco import COCO
    from torchvision.datasets import ImageFolder

    home = home_copy(built_atlas[0], tmp_path)
    version, cells = version_cells(home)
    cell_id = str(cells["cell_id"].iat[0])
    cells.loc[0, "label"] = None  # as an image from a flat (unlabelled) folder gives it
    cells.loc[0, "folder_label"] = None
    AtlasStore(home).version(version).write_cells(cells)

    out = tmp_path / "export"
    result = export_atlas(home, out, "coco")
    assert result.unlabelled == 1 and sum(result.counts_by_label.values()) == 47
    assert [p.name for p in (out / "unlabelled").iterdir()] == [f"{cell_id}.jpg"]
    assert not list((out / "images").rglob(f"{cell_id}.jpg"))
    assert len(ImageFolder(str(out / "images"))) == 47
    table = pd.read_csv(out / "cells.csv").set_index("cell_id")
    assert pd.isna(table.loc[cell_id, "label"]) and table.loc[cell_id, "crop_path"] == \
        f"unlabelled/{cell_id}.jpg"
    coco = COCO(str(out / "annotations.json"))
    assert len(coco.getImgIds()) == 47
    assert cell_id not in {image["cell_id"] for image in coco.loadImgs(coco.getImgIds())}


def test_round_trip_through_a_new_build_keeps_every_cell_and_label(corrected, tmp_path):
    from indexer.build import build

    home, cell_id = corrected
    out = tmp_path / "export"
    result = export_atlas(home, out, "imagefolder")
    new_home = tmp_path / "rebuilt"
    build(tiny_config(out / "images", new_home, epochs=1, som_epochs=2, vae_epochs=2))

    new_version = AtlasStore(new_home).version(AtlasStore(new_home).require_current())
    assert len(pd.read_parquet(new_version.path("rejections.parquet"))) == 0
    rebuilt = new_version.read_cells()
    assert len(rebuilt) == result.cells == 48
    assert rebuilt["label"].value_counts().sort_index().to_dict() == result.counts_by_label
    # Each exported crop gave exactly one cell, under the label it was exported with.
    exported = pd.read_csv(out / "cells.csv").set_index("cell_id")["label"]
    from_crop = {Path(path).stem: label
                 for path, label in zip(rebuilt["source_path"], rebuilt["label"])}
    assert from_crop == exported.to_dict()
    assert from_crop[cell_id] == "monocyte"


@pytest.mark.parametrize("case, expected", [
    ("no_atlas", "no published atlas"),
    ("out_not_empty", "exists and is not empty"),
    ("unknown_format", "unknown export format 'yolo'; choose from imagefolder, parquet, coco"),
    ("missing_mask", "crop or mask files are missing"),
])
def test_bad_input_is_one_line_and_writes_nothing(built_atlas, tmp_path, capsys, case, expected):
    home, out, args = built_atlas[0], tmp_path / "export", []
    if case == "no_atlas":
        home = tmp_path / "nothing-here"
    elif case == "out_not_empty":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "unknown_format":
        args = ["--format", "yolo"]
    elif case == "missing_mask":
        home = home_copy(home, tmp_path)
        _, cells = version_cells(home)
        mask_path(home / cells["crop_path"].iat[3]).unlink()

    code = main(["export", "--home", str(home), "--out", str(out), "--quiet", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1, err
    assert "Traceback" not in err
    if case == "out_not_empty":
        assert [p.name for p in out.iterdir()] == ["notes.txt"]
    else:
        assert not out.exists()
    assert not list(tmp_path.glob(".export.partial-*"))


def test_an_export_failing_half_way_leaves_nothing_behind(built_atlas, tmp_path, monkeypatch):
    from indexer import export

    read_masks, calls = export.read_masks, []

    def failing_read_masks(crop):
        calls.append(crop)
        if len(calls) == 10:
            raise OSError("disk full")
        return read_masks(crop)

    monkeypatch.setattr(export, "read_masks", failing_read_masks)
    out = tmp_path / "export"
    with pytest.raises(OSError, match="disk full"):
        export_atlas(built_atlas[0], out, "imagefolder")
    assert len(calls) == 10
    assert list(tmp_path.iterdir()) == []
