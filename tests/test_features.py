import numpy as np
import pytest
from skimage.draw import disk

from atlas.features import FEATURE_NAMES, describe, lobe_count
from atlas.segment import CYTOPLASM, NUCLEUS


def _mask(cell_radius, nucleus_discs):
    mask = np.zeros((256, 256), np.uint8)
    mask[disk((128, 128), cell_radius)] = CYTOPLASM
    for centre, radius in nucleus_discs:
        mask[disk(centre, radius)] = NUCLEUS
    return mask


def test_disc_has_known_area_and_circularity():
    mask = _mask(60, [((128, 128), 30)])
    values = dict(zip(FEATURE_NAMES, describe(np.full((256, 256, 3), 200, np.uint8), mask, um_per_pixel=0.1)))
    assert values["cell_area_um2"] == pytest.approx(np.pi * 6.0**2, rel=0.02)
    assert values["nucleus_area_um2"] == pytest.approx(np.pi * 3.0**2, rel=0.03)
    assert values["nucleus_to_cell_ratio"] == pytest.approx(0.25, rel=0.05)
    assert values["cell_circularity"] > 0.9
    assert values["nucleus_lobes"] == 1


def test_three_separate_lobes_are_counted():
    mask = _mask(70, [((128, 80), 14), ((128, 128), 14), ((128, 176), 14)])
    assert lobe_count(mask == NUCLEUS) == 3


def test_missing_cytoplasm_gives_nan_not_an_error():
    mask = np.zeros((64, 64), np.uint8)
    mask[disk((32, 32), 10)] = NUCLEUS
    values = dict(zip(FEATURE_NAMES, describe(np.full((64, 64, 3), 120, np.uint8), mask)))
    assert np.isnan(values["cytoplasm_mean_L"])
    assert values["nucleus_to_cell_ratio"] == pytest.approx(1.0)
