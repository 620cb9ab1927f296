"""The cellpose segmenter: training on masks, saving and loading, inference, evaluation against
masks and boxes, validation of training data, the CLI, and its place in a built atlas."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from atlas.cell import CellRegion, NoCellFound
from atlas.prepare import prepare_cells
from atlas.segmentation import load_segmenter
from atlas.segmentation.cellpose_runner import CellposeSegmenter, give_lobes_whole, refine_labels
from atlas.segmentation.cellpose_training import resample, train_segmenter
from atlas.segmentation.classical import ClassicalSegmenter
from atlas.segmentation.mask_sets import (
    TrainingDataError,
    find_mask_sets,
    read_mask_sets,
    set_scales,
)
from atlas.segmentation.scoring import dice, evaluate_boxes, evaluate_segmenter, match_boxes
from indexer.cli import main
from tests.conftest import require_shared, tiny_config

BACKGROUND, CYTOPLASM_RGB, NUCLEUS_RGB = (235, 225, 215), (190, 160, 210), (90, 40, 130)


def disc_cell(rng: np.random.Generator, size: int = 64, radius: float | None = None):
    """A stained cell (purple disc, dark nucleus) on pale glass, with its wbc_seg-style mask."""
    image = np.empty((size, size, 3), np.uint8)
    image[:] = BACKGROUND
    image = (image + rng.normal(0, 3, image.shape)).clip(0, 255).astype(np.uint8)
    radius = radius or rng.uniform(0.18, 0.23) * size
    cy, cx = rng.uniform(radius + 2, size - radius - 2, 2)
    yy, xx = np.mgrid[:size, :size]
    cell = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    nucleus = cell & ((yy - cy) ** 2 + (xx - cx) ** 2 <= (0.5 * radius) ** 2)
    image[cell], image[nucleus] = CYTOPLASM_RGB, NUCLEUS_RGB
    mask = np.zeros((size, size), np.uint8)
    mask[cell], mask[nucleus] = 128, 255
    return image, mask


def write_set(folder: Path, count: int, seed: int, size: int = 64) -> Path:
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for i in range(count):
        image, mask = disc_cell(rng, size)
        Image.fromarray(image).save(folder / "images" / f"{i:03d}.png")
        Image.fromarray(mask).save(folder / "masks" / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def disc_sets(tmp_path_factory) -> Path:
    """Two sets like wbc_seg's: the same cells drawn at two scales (64 px at 0.5 um/px, 128 px
    at 0.25 um/px)."""
    root = tmp_path_factory.mktemp("discs")
    write_set(root / "small", 5, seed=0, size=64)
    write_set(root / "large", 5, seed=1, size=128)
    return root


@pytest.fixture(scope="module")
def trained(disc_sets, tmp_path_factory) -> tuple[Path, dict]:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("models") / "discs"
    config = train_segmenter(disc_sets, None, out, um_per_pixel={"small": 0.5, "large": 0.25}, epochs=2,
                             holdout=0.2, seed=0, progress=False)
    return out, config


class StubSegmenter:
    """Gives fixed regions, whatever the image."""

    name = "stub"

    def __init__(self, regions_for, um_per_pixel: float = 0.5):
        self.regions_for, self.um_per_pixel = regions_for, um_per_pixel

    def segment(self, image, main_only=False):
        regions = self.regions_for(image)
        return regions[:1] if main_only else regions


def region(cell: np.ndarray, nucleus: np.ndarray) -> CellRegion:
    rows, cols = np.nonzero(cell)
    return CellRegion(cell=cell, nucleus=nucleus & cell,
                      bbox=(int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1))


# -- training, saving, loading -----------------------------------------------------------------
def test_training_saves_a_model_folder_with_scale_and_scores(trained):
    out, config = trained
    assert {p.name for p in out.iterdir()} == {"segmenter.json", "cell.pt"}
    assert json.loads((out / "segmenter.json").read_text()) == config
    assert config["kind"] == "cellpose" and config["nucleus"] == "classical"
    assert config["training"]["epochs"] == 2 and config["training"]["cellpose_version"].startswith("3.")
    assert config["training"]["seconds"] > 0
    # The two sets hold the same physical cells at two pixel sizes: per-set diameters agree in
    # um and differ twofold in pixels; the model scale puts the median cell at 30 pixels.
    small, large = config["sets"]["small"], config["sets"]["large"]
    assert small["cell_diameter_um"] == pytest.approx(large["cell_diameter_um"], rel=0.15)
    assert large["cell_diameter_px"] == pytest.approx(2 * small["cell_diameter_px"], rel=0.15)
    assert config["model_um_per_pixel"] == pytest.approx(config["cell_diameter_um"] / 30)
    assert small["held_out_images"] == large["held_out_images"] == 1
    assert len(config["held_out"]) == 2
    metrics = config["held_out_metrics"]
    assert metrics["images"] == 2 and 0 <= metrics["mean_cell_dice"] <= 1
    assert set(metrics["sets"]) == {"small", "large"}


def test_trained_model_loads_and_segments_at_any_scale(trained, disc_sets):
    out, config = trained
    segmenter = load_segmenter(out, 0.5)
    assert isinstance(segmenter, CellposeSegmenter)
    assert segmenter.name == "cellpose-" + config["weights_sha256"][:10]
    assert segmenter.cell_diameter_px == pytest.approx(config["cell_diameter_um"] / 0.5)
    image = np.asarray(Image.open(disc_sets / "small" / "images" / "000.png"))
    regions = segmenter.segment(image)  # two epochs teach little: any answer, of the right form
    assert isinstance(regions, list)
    for found in regions:
        assert found.cell.shape == image.shape[:2] and found.cell.dtype == bool
    copy = pickle.loads(pickle.dumps(segmenter))  # build workers get a pickled copy
    assert copy.name == segmenter.name and len(pickle.dumps(segmenter)) < 10_000
    assert len(copy.segment(image)) == len(regions)


def test_out_folder_must_be_new(trained, disc_sets):
    out, _ = trained
    with pytest.raises(ValueError, match="already exists"):
        train_segmenter(disc_sets, None, out, um_per_pixel=0.5, epochs=1, progress=False)


def test_not_a_model_folder_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no segmenter.json"):
        load_segmenter(tmp_path, 0.1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_segmenter(tmp_path / "missing", 0.1)
    assert isinstance(load_segmenter("classical", 0.2), ClassicalSegmenter)


# -- inference: what the segmenter makes of the network's cells ------------------------------
def test_cells_come_main_first_with_classical_nuclei_and_small_ones_dropped(trained, monkeypatch):
    out, _ = trained
    rng = np.random.default_rng(5)
    image = np.empty((120, 160, 3), np.uint8)
    image[:] = BACKGROUND
    labels = np.zeros((120, 160), np.int32)
    yy, xx = np.mgrid[:120, :160]
    # label 1: a cell cut by the left border; 2: the central cell; 3: a 2x2 speck (< 20 um^2)
    for label, (cy, cx, r) in enumerate([(60, 8, 16), (62, 82, 20)], start=1):
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        labels[disc] = label
        image[disc] = CYTOPLASM_RGB
        image[disc & ((yy - cy) ** 2 + (xx - cx) ** 2 <= (r / 2) ** 2)] = NUCLEUS_RGB
    labels[5:7, 150:152] = 3
    image = (image + rng.normal(0, 2, image.shape)).clip(0, 255).astype(np.uint8)
    monkeypatch.setattr(CellposeSegmenter, "cell_labels", lambda self, img, first=None: labels)
    regions = CellposeSegmenter(out, um_per_pixel=0.5).segment(image)
    assert len(regions) == 2  # the speck is 1 um^2
    main, cut = regions
    assert main.cell.sum() == (labels == 2).sum() and main.bbox == (42, 62, 83, 103)
    assert cut.bbox[1] == 0  # kept, though cut by the border
    nucleus_truth = (yy - 62) ** 2 + (xx - 82) ** 2 <= 10**2
    assert (main.nucleus & nucleus_truth).sum() / (main.nucleus | nucleus_truth).sum() > 0.85
    assert not (main.nucleus & ~main.cell).any()


def test_network_cells_without_a_white_cell_nucleus_are_dropped(trained, monkeypatch):
    """In a smear field a network trained on single cells may call a crowd of red cells a cell;
    a white cell holds blue chromatin of at least MIN_NUCLEUS_AREA_UM2."""
    out, _ = trained
    image = np.empty((120, 160, 3), np.uint8)
    image[:] = BACKGROUND
    labels = np.zeros((120, 160), np.int32)
    yy, xx = np.mgrid[:120, :160]
    white = (yy - 60) ** 2 + (xx - 40) ** 2 <= 20**2
    labels[white], image[white] = 1, CYTOPLASM_RGB
    image[(yy - 60) ** 2 + (xx - 40) ** 2 <= 10**2] = NUCLEUS_RGB  # 78 um^2 at 0.5 um/px
    for cy, cx in ((45, 110), (75, 110), (60, 135)):  # three touching red cells, one "cell"
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= 15**2
        labels[disc], image[disc] = 2, (214, 160, 166)
    platelet = (yy - 10) ** 2 + (xx - 150) ** 2 <= 3**2  # 7 um^2 of chromatin-blue: too small
    image[platelet] = NUCLEUS_RGB
    labels[(yy - 10) ** 2 + (xx - 150) ** 2 <= 6**2] = 3  # 28 um^2: passes the size test alone
    monkeypatch.setattr(CellposeSegmenter, "cell_labels", lambda self, img, first=None: labels)
    regions = CellposeSegmenter(out, um_per_pixel=0.5).segment(image)
    assert len(regions) == 1 and regions[0].cell.sum() == white.sum()
    # every nucleus lobe lies in a network cell: the classical fallback is not even run
    monkeypatch.setattr(ClassicalSegmenter, "segment", lambda self, img: pytest.fail("fallback ran"))
    assert len(CellposeSegmenter(out, um_per_pixel=0.5).segment(image)) == 1
    everything = CellposeSegmenter(out, um_per_pixel=0.5, require_nucleus=False).segment(image)
    assert len(everything) == 3


def test_image_without_cells_gives_no_regions_and_prepare_reports_it(trained, monkeypatch):
    out, _ = trained
    monkeypatch.setattr(CellposeSegmenter, "cell_labels", lambda self, img, first=None: np.zeros(img.shape[:2], np.int32))
    segmenter = CellposeSegmenter(out, um_per_pixel=0.5)
    blank = np.full((64, 64, 3), 230, np.uint8)
    assert segmenter.segment(blank) == []
    with pytest.raises(NoCellFound, match="no white cell"):
        prepare_cells(blank, segmenter, 0.5)


def test_cells_the_network_misses_come_from_the_classical_fallback(trained, monkeypatch):
    out, _ = trained
    image, mask = disc_cell(np.random.default_rng(3), size=96, radius=24)  # 0.5 um/px: a 24 um cell
    monkeypatch.setattr(CellposeSegmenter, "cell_labels", lambda self, img, first=None: np.zeros(img.shape[:2], np.int32))
    assert CellposeSegmenter(out, um_per_pixel=0.5, fallback=False).segment(image) == []
    (found,) = CellposeSegmenter(out, um_per_pixel=0.5).segment(image)
    classical = ClassicalSegmenter(0.5).segment(image)[0]
    assert np.array_equal(found.cell, classical.cell) and np.array_equal(found.nucleus, classical.nucleus)
    assert found.bbox == classical.bbox
    assert all(type(v) is int for v in found.bbox)  # plain ints: `segment --json` and the API write them
    assert (found.nucleus & (mask == 255)).sum() / (found.nucleus | (mask == 255)).sum() > 0.85


def test_main_only_skips_the_coarse_pass_when_the_first_pass_holds_the_centre(trained, monkeypatch):
    out, _ = trained
    image = np.empty((100, 200, 3), np.uint8)
    image[:] = BACKGROUND
    yy, xx = np.mgrid[:100, :200]
    first, coarse = np.zeros((100, 200), np.int32), np.zeros((100, 200), np.int32)
    for cy, cx, r, labels, label in ((50, 100, 20, first, 1), (50, 30, 15, first, 2), (50, 165, 25, coarse, 1)):
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        labels[disc], image[disc] = label, CYTOPLASM_RGB
        image[(yy - cy) ** 2 + (xx - cx) ** 2 <= (r / 2) ** 2] = NUCLEUS_RGB
    passes = []

    def labels_at(self, img, rescale):
        passes.append("first" if rescale == self._rescale else "coarse")
        return (first if rescale == self._rescale else coarse).copy()

    monkeypatch.setattr(CellposeSegmenter, "_labels_at", labels_at)
    segmenter = CellposeSegmenter(out, um_per_pixel=0.5)
    everything = segmenter.segment(image)
    assert len(everything) == 3 and passes == ["first", "coarse"]
    passes.clear()
    (main,) = segmenter.segment(image, main_only=True)
    assert passes == ["first"]
    assert np.array_equal(main.cell, everything[0].cell) and main.cell[50, 100]
    assert np.array_equal(main.nucleus, everything[0].nucleus) and main.bbox == everything[0].bbox

    # no cell at the centre: the full path, and its main cell (the coarse pass's, nearer)
    first[first == 1] = 0
    image[(yy - 50) ** 2 + (xx - 100) ** 2 <= 20**2] = BACKGROUND
    everything = segmenter.segment(image)
    passes.clear()
    (main,) = segmenter.segment(image, main_only=True)
    assert passes == ["first", "coarse"]
    assert np.array_equal(main.cell, everything[0].cell) and main.cell[50, 165]
    # a cell at the centre without a white cell's nucleus is not the main cell either
    first[(yy - 50) ** 2 + (xx - 100) ** 2 <= 20**2] = 3
    image[(yy - 50) ** 2 + (xx - 100) ** 2 <= 20**2] = CYTOPLASM_RGB
    passes.clear()
    (main,) = segmenter.segment(image, main_only=True)
    assert passes == ["first", "coarse"] and main.cell[50, 165]


def test_the_coarse_pass_adds_only_cells_the_first_pass_missed(trained, monkeypatch):
    out, _ = trained
    yy, xx = np.mgrid[:100, :200]
    first = np.zeros((100, 200), np.int32)
    first[(yy - 50) ** 2 + (xx - 50) ** 2 <= 20**2] = 1
    coarse = np.zeros((100, 200), np.int32)
    coarse[(yy - 50) ** 2 + (xx - 52) ** 2 <= 22**2] = 1  # the same cell, a little larger
    coarse[(yy - 50) ** 2 + (xx - 150) ** 2 <= 30**2] = 2  # a large cell the first pass lost
    segmenter = CellposeSegmenter(out, um_per_pixel=0.5)
    monkeypatch.setattr(CellposeSegmenter, "_labels_at",
                        lambda self, img, rescale: (first if rescale == self._rescale else coarse).copy())
    labels = segmenter.cell_labels(np.zeros((100, 200, 3), np.uint8))
    assert set(np.unique(labels)) == {0, 1, 2}
    assert np.array_equal(labels == 1, first == 1)  # the first pass's outline is kept
    assert np.array_equal(labels == 2, coarse == 2)


# -- evaluation ------------------------------------------------------------------------------------
def test_perfect_segmenter_scores_one_and_a_wrong_one_less(disc_sets):
    images, masks = disc_sets / "small" / "images", disc_sets / "small" / "masks"
    truth = {np.asarray(Image.open(p)).tobytes(): np.asarray(Image.open(masks / p.name))
             for p in images.iterdir()}

    def perfect(image):
        mask = truth[image.tobytes()]
        return [region(mask > 0, mask == 255)]

    def shifted(image):
        mask = np.roll(truth[image.tobytes()], 4, axis=1)
        return [region(mask > 0, mask == 255)]

    best = evaluate_segmenter(StubSegmenter(perfect), images, masks)
    assert best["images"] == 5 and best["no_cell_found"] == 0
    for name in ("mean_cell_dice", "mean_cell_iou", "mean_nucleus_dice", "mean_nucleus_iou"):
        assert best[name] == 1.0
    assert [r["image"] for r in best["per_image"]] == ["000", "001", "002", "003", "004"]
    worse = evaluate_segmenter(StubSegmenter(shifted), images, masks)
    assert 0.5 < worse["mean_cell_dice"] < 1 and worse["mean_nucleus_dice"] < worse["mean_cell_dice"]
    assert worse["mean_cell_iou"] < worse["mean_cell_dice"]
    nothing = evaluate_segmenter(StubSegmenter(lambda image: []), images, masks)
    assert nothing["mean_cell_dice"] == 0 and nothing["no_cell_found"] == 5


def write_voc(path: Path, boxes: list[tuple[str, int, int, int, int]]) -> None:
    objects = "".join(f"<object><name>{name}</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
                      f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>" for name, x0, y0, x1, y1 in boxes)
    path.write_text(f"<annotation><filename>{path.stem}.jpg</filename>{objects}</annotation>")


def test_box_recall_and_precision_match_one_to_one(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "annotations").mkdir()
    Image.fromarray(np.full((100, 200, 3), 220, np.uint8)).save(tmp_path / "images" / "field.jpg")
    # WBC boxes at columns 11-50 and 121-160 (VOC: 1-based, inclusive); an RBC box is ignored
    write_voc(tmp_path / "annotations" / "field.xml",
              [("WBC", 11, 11, 50, 50), ("WBC", 121, 31, 160, 70), ("RBC", 60, 60, 80, 80)])

    def found(image):
        cells = []
        for r0, c0, r1, c1 in [(10, 10, 50, 50), (12, 12, 50, 50), (40, 70, 80, 110)]:  # hit, duplicate, miss
            cell = np.zeros(image.shape[:2], bool)
            cell[r0:r1, c0:c1] = True
            cells.append(region(cell, cell))
        return cells

    result = evaluate_boxes(StubSegmenter(found), tmp_path / "images", tmp_path / "annotations")
    assert (result["annotated"], result["found"], result["matched"]) == (2, 3, 1)
    assert result["recall"] == 0.5 and result["precision"] == pytest.approx(1 / 3)
    assert match_boxes([(0, 0, 10, 10)], [(0, 0, 10, 10), (0, 0, 10, 11)], 0.5) == [(0, 0)]


# -- training data: every problem named with its files ---------------------------------------------
def test_bad_training_data_names_the_files(tmp_path):
    root = write_set(tmp_path / "lab", 6, seed=2)
    Image.fromarray(np.zeros((50, 64), np.uint8)).save(root / "masks" / "000.png")  # wrong size
    Image.fromarray(np.ones((64, 64), np.uint8)).save(root / "masks" / "001.png")  # 0/1 mask
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(root / "masks" / "002.png")  # no cell
    (root / "masks" / "003.png").unlink()
    sets = find_mask_sets(root / "images", root / "masks")
    with pytest.raises(TrainingDataError) as error:
        read_mask_sets(sets, {"lab": 0.5})
    message = str(error.value)
    assert "size mismatch: 1 file(s): lab/000.png (image 64x64, mask 64x50)" in message
    assert "unexpected mask values: 1 file(s): lab/001.png (1)" in message
    assert "empty mask (no cell): 1 file(s): lab/002.png" in message
    assert "missing mask: 1 file(s): lab/003.png" in message


def test_a_few_stray_mask_values_are_snapped_with_a_note(tmp_path):
    root = write_set(tmp_path / "lab", 1, seed=3)
    mask = np.asarray(Image.open(root / "masks" / "000.png")).copy()
    mask[0, :5] = 7  # annotation noise in the background, as in 4 wbc_seg cellavision masks
    Image.fromarray(mask).save(root / "masks" / "000.png")
    samples, notes = read_mask_sets(find_mask_sets(root), {"lab": 0.5})
    assert set(np.unique(samples[0].mask)) == {0, 128, 255} and samples[0].mask[0, :5].max() == 0
    assert notes == ["lab/000.png: 5 pixels of value 7 snapped to 0/128/255"]


def test_scales_per_set_must_name_every_set():
    assert set_scales(0.2, ["a", "b"]) == {"a": 0.2, "b": 0.2}
    assert set_scales({"a": 0.2, "b": 0.1}, ["a", "b"]) == {"a": 0.2, "b": 0.1}
    with pytest.raises(ValueError, match="no um per pixel for set"):
        set_scales({"a": 0.2}, ["a", "b"])
    with pytest.raises(ValueError, match="unknown set"):
        set_scales({"a": 0.2, "b": 0.1, "c": 1.0}, ["a", "b"])


# -- command line ------------------------------------------------------------------------------------
def test_cli_train_reports_bad_masks_and_exits_2(tmp_path, capsys):
    root = write_set(tmp_path / "lab", 3, seed=4)
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(root / "masks" / "001.png")
    code = main(["segmenter", "train", "--images", str(root / "images"), "--masks", str(root / "masks"),
                 "--um-per-pixel", "0.5", "--out", str(tmp_path / "model"), "--epochs", "1", "--quiet"])
    assert code == 2
    assert "empty mask (no cell): 1 file(s): lab/001.png" in capsys.readouterr().err
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("args, message", [
    (["segmenter", "evaluate", "--images", "{root}/images", "--masks", "{root}/masks", "--held-out-of", "{root}"], "no segmenter.json"),
    (["segmenter", "evaluate", "--images", "{root}/images", "--masks", "{root}/masks", "--model", "{root}/nope"], "does not exist"),
    (["segmenter", "evaluate", "--images", "{root}/images", "--masks", "{root}/masks", "--um-per-pixel", "a=x"], "must be a number"),
    (["segmenter", "evaluate", "--images", "{root}/nope", "--masks", "{root}/masks"], "does not exist"),
    (["segment", "{root}/missing.png"], "does not exist"),
    (["segment", "{root}/masks"], "is a folder"),
])
def test_cli_bad_input_exits_2_with_a_message(tmp_path, capsys, args, message):
    root = write_set(tmp_path / "lab", 1, seed=5)
    assert main([a.format(root=root) for a in args]) == 2
    assert message in capsys.readouterr().err


def test_cli_evaluate_writes_json(tmp_path, capsys):
    root = write_set(tmp_path / "lab", 3, seed=6)
    report = tmp_path / "report.json"
    code = main(["segmenter", "evaluate", "--images", str(root / "images"), "--masks", str(root / "masks"),
                 "--um-per-pixel", "0.5", "--json", str(report)])
    assert code == 0
    result = json.loads(report.read_text())
    assert result["segmenter"] == "classical" and result["images"] == 3
    assert result["mean_nucleus_dice"] > 0.9  # flat discs are easy for the thresholds
    assert "3 images: cell Dice" in capsys.readouterr().out


def test_cli_compares_segmenters_on_a_models_held_out_images(trained, disc_sets, tmp_path, capsys):
    model, config = trained
    report = tmp_path / "classical.json"
    code = main(["segmenter", "evaluate", "--images", str(disc_sets), "--held-out-of", str(model),
                 "--json", str(report)])
    assert code == 0
    result = json.loads(report.read_text())
    assert sorted(f"{r['set']}/{r['image']}" for r in result["per_image"]) == config["held_out"]
    # each set at the scale the model was trained with
    assert {n: s["um_per_pixel"] for n, s in result["sets"].items()} == {"small": 0.5, "large": 0.25}
    assert "small (1 at 0.5 um/px)" in capsys.readouterr().out


def test_cli_segment_with_an_atlas_uses_its_segmenter(built_atlas, synthetic_images, capsys):
    home, result = built_atlas
    image = next(p for p in sorted(synthetic_images.rglob("*")) if p.is_file())
    assert main(["segment", "--home", str(home), str(image), "--json"]) == 0
    (found,) = json.loads(capsys.readouterr().out)
    assert found["segmenter"] == "classical" and len(found["cells"]) >= 1
    assert found["um_per_pixel"] == result.manifest["parameters"]["um_per_pixel"]


def test_cli_segment_reports_cells_no_cells_and_unreadable_files(tmp_path, capsys):
    rng = np.random.default_rng(7)
    image, _ = disc_cell(rng, 128, radius=30)
    Image.fromarray(image).save(tmp_path / "cell.png")
    Image.fromarray(np.full((64, 64, 3), 230, np.uint8)).save(tmp_path / "blank.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "masks"
    code = main(["segment", str(tmp_path / "cell.png"), str(tmp_path / "blank.png"), "--um-per-pixel", "0.25",
                 "--out", str(out), "--json"])
    assert code == 0  # an image without a cell is a result, not an error
    results = json.loads(capsys.readouterr().out)
    assert [len(r["cells"]) for r in results] == [1, 0]
    cell = results[0]["cells"][0]
    assert cell["cell_area_um2"] == pytest.approx(np.pi * (30 * 0.25) ** 2, rel=0.15)
    assert cell["nucleus_area_um2"] == pytest.approx(np.pi * (15 * 0.25) ** 2, rel=0.2)
    mask = np.asarray(Image.open(out / "cell.png"))
    assert mask.shape == (128, 128) and set(np.unique(mask)) == {0, 128, 255}
    assert not (out / "blank.png").exists()

    code = main(["segment", str(tmp_path / "blank.png"), str(tmp_path / "broken.png")])
    captured = capsys.readouterr()
    assert code == 2
    assert "no white cell found" in captured.out
    assert "broken.png: not a readable image" in captured.err


# -- in an atlas version ---------------------------------------------------------------------------
def classical_cells(self, image, rescale):
    """Stands in for the network in builds (both passes): the classical segmenter's cells as labels."""
    labels = np.zeros(image.shape[:2], np.int32)
    for index, found in enumerate(ClassicalSegmenter(self.um_per_pixel).segment(image), start=1):
        labels[found.cell & (labels == 0)] = index
    return labels


def test_build_copies_the_segmenter_into_the_version_and_queries_use_it(trained, synthetic_images, tmp_path,
                                                                       monkeypatch):
    from atlas.reference import LoadedAtlas
    from atlas.version import AtlasVersion
    from indexer.build import build
    from indexer.config import parent_config

    trained_dir, config = trained
    model = shutil.copytree(trained_dir, tmp_path / "model")
    monkeypatch.setattr(CellposeSegmenter, "_labels_at", classical_cells)  # workers are forked
    home = tmp_path / "atlas"
    result = build(tiny_config(synthetic_images, home, segmenter=str(model), epochs=1, vae_epochs=2, som_epochs=2))
    manifest = result.manifest
    name = "cellpose-" + config["weights_sha256"][:10]
    assert manifest["segmenter"] == {"kind": "cellpose", "name": name, "path": "models/segmenter",
                                     "ms_per_cell": manifest["segmenter"]["ms_per_cell"]}
    assert manifest["segmenter"]["ms_per_cell"] > 0
    copy = result.version_dir / "models" / "segmenter"
    assert (copy / "cell.pt").read_bytes() == (model / "cell.pt").read_bytes()
    assert (home / "crops" / name).is_dir()
    assert manifest["inputs"]["cells"] > 0

    shutil.rmtree(model)  # the version needs only its own copy
    atlas = LoadedAtlas.open(home)
    assert atlas.segmenter.name == name and atlas.segmenter.model_dir == copy.resolve()
    version_segmenter = AtlasVersion(result.version_dir, home).read_segmenter()
    assert version_segmenter.um_per_pixel == manifest["parameters"]["um_per_pixel"]
    # A full rebuild takes the model from the version, not from the folder it first came from.
    rebuild_config = parent_config(manifest, result.version_dir, home, threads=1, progress=False)
    assert rebuild_config.segmenter == str(copy)


def test_classical_build_records_its_segmenter(built_atlas):
    _, result = built_atlas
    segmenter = result.manifest["segmenter"]
    assert segmenter == {"kind": "classical", "name": "classical", "path": None, "ms_per_cell": segmenter["ms_per_cell"]}
    # the time to segment each cell's source image, divided among its cells, and their mean
    times = pd.read_parquet(result.version_dir / "cells.parquet")["segment_ms"]
    assert (times > 0).all() and segmenter["ms_per_cell"] == pytest.approx(times.mean(), abs=0.1)
    assert result.manifest["parameters"]["segmenter"] == "classical"


# -- real data ---------------------------------------------------------------------------------------
@pytest.mark.realdata
def test_classical_segmenter_on_real_masks_and_boxes_via_cli(tmp_path, capsys):
    tecom = require_shared("wbc_seg", "tecom")
    bccd = require_shared("bccd")
    subset = tmp_path / "tecom"
    for part in ("images", "masks"):
        (subset / part).mkdir(parents=True)
        for name in ("001.png", "050.png", "100.png", "150.png", "200.png", "250.png"):
            (subset / part / name).symlink_to(tecom / part / name)
    report = tmp_path / "masks.json"
    assert main(["segmenter", "evaluate", "--images", str(subset), "--um-per-pixel", "0.157",
                 "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["images"] == 6 and result["no_cell_found"] == 0
    assert result["mean_nucleus_dice"] > 0.85 and result["mean_cell_dice"] > 0.6

    fields = tmp_path / "bccd"
    for part in ("images", "annotations"):
        (fields / part).mkdir(parents=True)
    for stem in ("BloodImage_00000", "BloodImage_00001", "BloodImage_00002"):
        (fields / "images" / f"{stem}.jpg").symlink_to(bccd / "images" / f"{stem}.jpg")
        (fields / "annotations" / f"{stem}.xml").symlink_to(bccd / "annotations" / f"{stem}.xml")
    report = tmp_path / "boxes.json"
    assert main(["segmenter", "evaluate", "--images", str(fields / "images"), "--boxes",
                 str(fields / "annotations"), "--um-per-pixel", "0.07", "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["images"] == 3 and result["annotated"] == 3
    # each field's one white cell, among dozens of red cells and a few platelets, and nothing else
    assert result["recall"] == 1 and result["precision"] == 1


def test_outlines_are_redrawn_at_full_size_from_the_probability():
    yy, xx = np.mgrid[:120, :120]
    truth = (yy - 61.3) ** 2 + (xx - 58.7) ** 2 <= 40**2
    factor = 0.2  # the network's scale: 24x24 pixels
    coarse = resample(truth.astype(np.uint8), factor, labels=True)
    blocky = resample(coarse, 1 / factor, labels=True).astype(np.int32)
    probability = resample(resample(truth.astype(np.float32), factor), 1 / factor) - 0.5
    refined = refine_labels(blocky, probability, reach=1 / factor)
    assert set(np.unique(refined)) == {0, 1}
    assert dice(refined > 0, truth) > 0.99 > dice(blocky > 0, truth) + 0.01


def test_a_lobe_cut_by_the_network_outline_goes_whole_to_the_cell_holding_most_of_it():
    labels = np.zeros((60, 100), np.int32)
    labels[10:50, 10:45] = 1
    labels[10:50, 55:90] = 2
    lobes = np.zeros((60, 100), bool)
    lobes[15:25, 35:47] = True  # 10 of 12 columns in cell 1, 2 outside
    lobes[30:38, 52:62] = True  # 7 of 10 columns in cell 2, 3 outside
    lobes[42:46, 40:60] = True  # 5 columns in each cell, 10 between: no cell holds half
    lobes[2:8, 92:98] = True  # in no cell
    given = give_lobes_whole(labels, lobes)
    assert (given[15:25, 35:47] == 1).all() and (given[30:38, 52:62] == 2).all()
    assert np.array_equal(given[42:46], labels[42:46]) and (given[2:8, 92:98] == 0).all()
    outside_lobes = ~lobes
    assert np.array_equal(given[outside_lobes], labels[outside_lobes])
    assert not np.shares_memory(given, labels)
