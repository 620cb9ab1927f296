import numpy as np
import pytest

from atlas.segment import (
    CROP_SIZE,
    CYTOPLASM,
    NUCLEUS,
    ClassicalSegmenter,
    SegmentationError,
    crop_cell,
)
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
