from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from atlas.cell import CROP_SIZE, CYTOPLASM, NUCLEUS, SegmentationError
from atlas.crop import crop_cell
from atlas.segmentation.classical import ClassicalSegmenter, find_nuclei
from atlas.synthetic import CLASSES, synthetic_cell


@pytest.mark.parametrize("label", CLASSES)
def test_finds_the_central_white_cell(label):
    image = synthetic_cell(label, np.random.default_rng(3))
    regions = ClassicalSegmenter().segment(image)
    assert regions, "no cell found"
    row, col = regions[0].nucleus_centre
    assert abs(row - 128) < 30 and abs(col - 128) < 30
    assert regions[0].cell.sum() > regions[0].nucleus.sum() > 500


def test_crop_is_centred_on_the_nucleus_and_padded_with_background():
    image = synthetic_cell("lymphocyte", np.random.default_rng(0))
    shifted = np.full((300, 300, 3), image[0, 0], np.uint8)
    shifted[:256, 44:] = image[:, :256]  # the cell now sits left of centre, near the top
    region = ClassicalSegmenter().segment(shifted)[0]
    crop = crop_cell(shifted, region)
    assert crop.image.shape == (CROP_SIZE, CROP_SIZE, 3)
    rows, cols = np.nonzero(crop.mask == NUCLEUS)
    assert abs(rows.mean() - CROP_SIZE / 2) < 3 and abs(cols.mean() - CROP_SIZE / 2) < 3
    assert set(np.unique(crop.mask)) <= {0, CYTOPLASM, NUCLEUS}


def test_crop_rescales_other_pixel_sizes():
    image = synthetic_cell("monocyte", np.random.default_rng(1))
    region = ClassicalSegmenter().segment(image)[0]
    crop = crop_cell(image, region, um_per_pixel=0.2)  # 128 source pixels -> 256
    assert crop.image.shape == (CROP_SIZE, CROP_SIZE, 3)
    assert (crop.mask == NUCLEUS).sum() > 3 * region.nucleus.sum()


def test_blank_image_has_no_cell():
    assert ClassicalSegmenter().segment(np.full((200, 200, 3), 230, np.uint8)) == []


def test_too_small_image_is_rejected_with_reason():
    with pytest.raises(SegmentationError, match="too small"):
        ClassicalSegmenter().segment(np.zeros((20, 20, 3), np.uint8))


# -- smear fields: many cells in one image ------------------------------------------------------
UM_PER_PX = 0.2  # the generated fields' scale
GLASS, RED_CELL, PALLOR = (236, 226, 212), (214, 160, 166), (228, 200, 196)
NUCLEUS_RGB, PLATELET_RGB = (96, 58, 150), (150, 108, 186)
CYTOPLASM_RGB = {"lilac": (206, 184, 214), "blue": (176, 186, 222), "orange": (228, 156, 128)}


def _disc(shape, centre, radius_um):
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= (radius_um / UM_PER_PX) ** 2


def smear_field(rng, white_cells, platelets=(), size=(320, 400), red_cells=40):
    """A stained smear at 0.2 um/px: glass, `red_cells` pink discs (7.5 um, pale centre) packed
    around, then the white cells on top: (centre px, cell radius um, [(lobe centre px, lobe radius
    um)], cytoplasm colour), then the platelets (centre px, radius um). Returns the image and each
    white cell's true box (row0, col0, row1, col1)."""
    image = np.empty((*size, 3), np.float32)
    image[:] = GLASS
    for _ in range(red_cells):
        centre = rng.uniform(0, size[0]), rng.uniform(0, size[1])
        image[_disc(size, centre, 3.75)] = RED_CELL
        image[_disc(size, centre, 1.5)] = PALLOR
    boxes = []
    for centre, radius_um, lobes, colour in white_cells:
        cell = _disc(size, centre, radius_um)
        image[cell] = CYTOPLASM_RGB[colour]
        for lobe_centre, lobe_radius in lobes:
            image[_disc(size, lobe_centre, lobe_radius) & cell] = NUCLEUS_RGB
        rows, cols = np.nonzero(cell)
        boxes.append((rows.min(), cols.min(), rows.max() + 1, cols.max() + 1))
    for centre, radius_um in platelets:
        image[_disc(size, centre, radius_um)] = PLATELET_RGB
    image = ndimage.gaussian_filter(image, sigma=(1, 1, 0)) + rng.normal(0, 3, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), boxes


def _box_iou(a, b):
    rows = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    cols = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = rows * cols
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


FIELD_CELLS = [
    ((70, 70), 4.8, [((70, 70), 3.4)], "blue"),  # lymphocyte: round nucleus, thin blue rim
    # neutrophil: three small lobes (each < 12 um^2) 0.6 um apart, one cell
    ((80, 250), 6.5, [((72, 236), 1.6), ((80, 254), 1.6), ((90, 272), 1.6)], "lilac"),
    ((235, 95), 7.5, [((230, 90), 3.8)], "lilac"),  # monocyte: large cell
    # two white cells whose cytoplasm touches: their nuclei 12 um apart, two cells
    ((240, 270), 6.0, [((240, 265), 3.0)], "lilac"),
    ((240, 330), 6.0, [((240, 335), 3.0)], "blue"),
]
FIELD_PLATELETS = [((20, 170), 1.2), ((160, 30), 1.4), ((160, 200), 1.1), ((300, 190), 1.3), ((150, 370), 1.2)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_white_cell_in_a_smear_field_is_found_with_its_box_and_platelets_are_not(seed):
    image, boxes = smear_field(np.random.default_rng(seed), FIELD_CELLS, FIELD_PLATELETS)
    regions = ClassicalSegmenter(UM_PER_PX).segment(image)
    assert len(regions) == len(boxes), [r.bbox for r in regions]
    for box in boxes:
        best = max(_box_iou(box, r.bbox) for r in regions)
        assert best > 0.75, (box, [r.bbox for r in regions])
    for found in regions:
        assert found.nucleus.sum() * UM_PER_PX**2 > 12  # no platelet (< 6 um^2) is a cell
        assert not (found.nucleus & ~found.cell).any()
    # touching red cells stay outside: no cell mask is much larger than its true disc
    for (_, radius_um, _, _), box in zip(FIELD_CELLS, boxes):
        found = max(regions, key=lambda r: _box_iou(box, r.bbox))
        assert found.cell.sum() < 1.25 * np.pi * (radius_um / UM_PER_PX) ** 2


def test_red_cells_as_dark_as_nuclei_in_green_are_not_nuclei():
    """In a crowded field the darkest green class holds red cells too; only blue chromatin counts."""
    rng = np.random.default_rng(4)
    image, boxes = smear_field(rng, FIELD_CELLS[:1], red_cells=120)
    nuclei = find_nuclei(image, UM_PER_PX)
    lymphocyte = _disc(image.shape[:2], (70, 70), 3.4)
    assert (nuclei & lymphocyte).sum() > 0.8 * lymphocyte.sum()
    assert (nuclei & ~ndimage.binary_dilation(lymphocyte, iterations=3)).sum() == 0


def test_small_separate_lobes_in_one_cytoplasm_are_one_cell():
    """An eosinophil's round lobes, each smaller than any whole nucleus, 2 um apart in one cell."""
    lobes = [((150, 180), 1.7), ((150, 208), 1.7)]  # 9 um^2 each, gap 2.2 um
    image, boxes = smear_field(np.random.default_rng(5), [((150, 194), 6.0, lobes, "orange")], red_cells=20)
    regions = ClassicalSegmenter(UM_PER_PX).segment(image)
    assert len(regions) == 1 and _box_iou(regions[0].bbox, boxes[0]) > 0.75
    assert regions[0].nucleus.sum() * UM_PER_PX**2 > 15  # both lobes


def test_a_field_of_red_cells_and_platelets_has_no_white_cell():
    image, _ = smear_field(np.random.default_rng(6), [], FIELD_PLATELETS, red_cells=80)
    assert ClassicalSegmenter(UM_PER_PX).segment(image) == []


def test_build_indexes_every_white_cell_of_a_smear_field_with_its_source_and_box(tmp_path):
    """The build's segment step on an unlabelled field: one row per white cell (cell_index
    0..n-1, the main cell first), each with the source file, its box in the source image and its
    own crop. In a class folder the label names the main cell only, so only it is indexed."""
    from atlas.ingest import list_images
    from atlas.segmentation import load_segmenter
    from indexer.steps import prepare_images
    from tests.conftest import tiny_config

    image, boxes = smear_field(np.random.default_rng(0), FIELD_CELLS, FIELD_PLATELETS)
    (tmp_path / "fields").mkdir()
    Image.fromarray(image).save(tmp_path / "fields" / "field.png")
    config = tiny_config(tmp_path / "fields", tmp_path / "home", um_per_pixel=UM_PER_PX)
    segmenter = load_segmenter(config.segmenter, config.um_per_pixel)
    prepared = prepare_images(list_images(tmp_path / "fields"), segmenter, config)
    cells, crops, rejections = prepared.cells, prepared.model_inputs, prepared.rejections
    assert not rejections
    assert sorted(cells["cell_index"]) == list(range(len(boxes)))
    assert set(cells["source_path"].map(lambda p: Path(p).name)) == {"field.png"}
    assert cells["cell_id"].is_unique and len(crops) == len(boxes)
    for box in boxes:  # every true white cell is one row, with its box
        assert max(_box_iou(box, tuple(row)) for row in cells["bbox"]) > 0.75
    for path in cells["crop_path"]:  # stored relative to ATLAS_HOME
        assert (config.home / path).exists()
    assert cells["label"].isna().all()

    (tmp_path / "labelled" / "monocyte").mkdir(parents=True)
    Image.fromarray(image).save(tmp_path / "labelled" / "monocyte" / "field.png")
    labelled = prepare_images(list_images(tmp_path / "labelled"), segmenter, config).cells
    assert list(labelled["cell_index"]) == [0] and list(labelled["label"]) == ["monocyte"]


def test_background_colour_is_the_median_of_the_brightest_third():
    from atlas.colour import background_colour

    rng = np.random.default_rng(0)
    for _ in range(50):
        image = rng.integers(0, 256, (rng.integers(1, 40), rng.integers(1, 40), 3), dtype=np.uint8)
        pixels = image.reshape(-1, 3).astype(np.int64)
        brightness = pixels.sum(1)
        expected = np.median(pixels[brightness >= np.quantile(brightness, 2 / 3)], axis=0).astype(np.uint8)
        assert (background_colour(image) == expected).all()
    glass = np.full((30, 30, 3), (230, 225, 240), np.uint8)
    glass[:12] = (120, 60, 150)  # a stained cell covering 40% of the field
    assert tuple(background_colour(glass)) == (230, 225, 240)
