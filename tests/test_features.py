import json
import re
import time
import warnings

import numpy as np
import pytest
from skimage.color import rgb2lab
from skimage.draw import disk, ellipse

from atlas.cell import CYTOPLASM, NUCLEUS
from atlas.features import (
    FEATURE_NAMES,
    RANGE_PERCENTILES,
    class_ranges,
    describe,
    load_class_ranges,
    lobe_count,
    save_class_ranges,
)


def _mask(cell_radius, nucleus_discs, size=256):
    mask = np.zeros((size, size), np.uint8)
    mask[disk((size // 2, size // 2), cell_radius)] = CYTOPLASM
    for centre, radius in nucleus_discs:
        mask[disk(centre, radius)] = NUCLEUS
    return mask


def _grey(value, size=256):
    return np.full((size, size, 3), value, np.uint8)


def _describe(crop, mask, um_per_pixel=0.1) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # describe keeps its own numerical warnings to itself
        vector = describe(crop, mask, um_per_pixel=um_per_pixel)
    assert vector.dtype == np.float32 and vector.shape == (len(FEATURE_NAMES),)
    assert not np.isinf(vector).any()
    return dict(zip(FEATURE_NAMES, vector.tolist()))


def test_feature_names_are_column_names_with_units():
    assert 100 <= len(FEATURE_NAMES) <= 200
    assert len(set(FEATURE_NAMES)) == len(FEATURE_NAMES)
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*", name) for name in FEATURE_NAMES)
    for region in ("nucleus", "cell"):
        for name in ("area_um2", "perimeter_um", "equivalent_diameter_um", "major_axis_um", "minor_axis_um",
                     "elongation", "eccentricity", "solidity", "circularity"):
            assert f"{region}_{name}" in FEATURE_NAMES
    for region in ("nucleus", "cytoplasm", "cell"):
        for name in ("grey_mean", "grey_kurtosis", "grey_entropy_bits", "grey_uniformity", "glcm_contrast",
                     "glcm_correlation", "local_std_mean", "lab_b_mean"):
            assert f"{region}_{name}" in FEATURE_NAMES
    # the features the viewer lists first
    for name in ("cell_area_um2", "nucleus_area_um2", "nucleus_to_cell_area_ratio", "nucleus_lobes",
                 "nucleus_solidity", "nucleus_lab_l_mean", "cytoplasm_lab_b_mean"):
        assert name in FEATURE_NAMES


@pytest.mark.parametrize("um", [0.1, 0.25])
def test_concentric_discs_have_known_shape_and_ratios(um):
    r_cell, r_nucleus = 60, 30  # pixels
    values = _describe(_grey(200), _mask(r_cell, [((128, 128), r_nucleus)]), um_per_pixel=um)
    rn, rc = r_nucleus * um, r_cell * um  # um
    assert values["nucleus_area_um2"] == pytest.approx(np.pi * rn**2, rel=0.01)
    assert values["cell_area_um2"] == pytest.approx(np.pi * rc**2, rel=0.01)
    assert values["cytoplasm_area_um2"] == pytest.approx(np.pi * (rc**2 - rn**2), rel=0.01)
    for region, r in (("nucleus", rn), ("cell", rc)):
        assert values[f"{region}_perimeter_um"] == pytest.approx(2 * np.pi * r, rel=0.015)
        assert values[f"{region}_equivalent_diameter_um"] == pytest.approx(2 * r, rel=0.01)
        assert values[f"{region}_major_axis_um"] == pytest.approx(2 * r, rel=0.01)
        assert values[f"{region}_minor_axis_um"] == pytest.approx(2 * r, rel=0.01)
        assert values[f"{region}_max_diameter_um"] == pytest.approx(2 * r, rel=0.03)
        assert values[f"{region}_circularity"] == pytest.approx(1.0, abs=0.02)
        assert values[f"{region}_eccentricity"] == pytest.approx(0.0, abs=0.05)
        assert values[f"{region}_elongation"] == pytest.approx(1.0, abs=0.01)
        assert values[f"{region}_solidity"] == pytest.approx(1.0, abs=0.03)
    # the ring: mean width R - r, and its whole boundary (outer + inner circle)
    assert values["cytoplasm_thickness_um"] == pytest.approx(rc - rn, rel=0.02)
    assert values["cytoplasm_perimeter_um"] == pytest.approx(2 * np.pi * (rc + rn), rel=0.015)
    assert values["nucleus_to_cell_area_ratio"] == pytest.approx(0.25, rel=0.01)
    assert values["nucleus_to_cytoplasm_area_ratio"] == pytest.approx(1 / 3, rel=0.01)
    for ratio in ("perimeter", "major_axis", "minor_axis", "max_diameter"):
        assert values[f"nucleus_to_cell_{ratio}_ratio"] == pytest.approx(0.5, rel=0.02)
    assert values["nucleus_to_cell_elongation_ratio"] == pytest.approx(1.0, abs=0.01)
    assert values["nucleus_to_cell_perimeter_per_area_ratio"] == pytest.approx(2.0, rel=0.02)
    assert values["nucleus_to_cell_sphericity_ratio"] == pytest.approx(1.0, abs=0.01)
    assert values["nucleus_offset_um"] == pytest.approx(0.0, abs=um)
    assert values["nucleus_lobes"] == 1


@pytest.mark.parametrize("rotation", [0.0, np.pi / 6])
def test_ellipse_has_known_axes(rotation):
    mask = np.zeros((256, 256), np.uint8)
    mask[ellipse(128, 128, 40, 20, rotation=rotation)] = NUCLEUS  # semi-axes 40 and 20 px
    values = _describe(_grey(90), mask, um_per_pixel=0.1)
    assert values["nucleus_major_axis_um"] == pytest.approx(8.0, rel=0.02)
    assert values["nucleus_minor_axis_um"] == pytest.approx(4.0, rel=0.02)
    assert values["nucleus_elongation"] == pytest.approx(2.0, rel=0.02)
    assert values["nucleus_eccentricity"] == pytest.approx(np.sqrt(1 - 0.5**2), abs=0.01)
    assert values["nucleus_max_diameter_um"] == pytest.approx(8.0, rel=0.03)
    assert values["nucleus_area_um2"] == pytest.approx(np.pi * 4.0 * 2.0, rel=0.01)
    # Ramanujan's ellipse perimeter; circularity of a 2:1 ellipse is about 0.78
    a, b = 4.0, 2.0
    perimeter = np.pi * (3 * (a + b) - np.sqrt((3 * a + b) * (a + 3 * b)))
    assert values["nucleus_perimeter_um"] == pytest.approx(perimeter, rel=0.02)
    assert values["nucleus_circularity"] == pytest.approx(4 * np.pi * np.pi * a * b / perimeter**2, abs=0.03)


def test_separate_lobes_are_counted():
    mask = _mask(70, [((128, 80), 14), ((128, 128), 14), ((128, 176), 14)])
    assert lobe_count(mask == NUCLEUS) == 3
    two = _mask(70, [((128, 90), 20), ((128, 166), 20)])
    assert lobe_count(two == NUCLEUS) == 2
    values = _describe(_grey(150), two)
    assert values["nucleus_lobes"] == 2
    assert values["nucleus_area_um2"] == pytest.approx(2 * np.pi * 2.0**2, rel=0.02)
    assert values["nucleus_solidity"] < 0.7  # the hull spans the gap between the lobes
    assert values["nucleus_elongation"] > 2
    assert values["nucleus_offset_um"] == pytest.approx(0.0, abs=0.1)


def test_constant_region_has_no_spread_and_one_level():
    values = _describe(_grey(137), _mask(60, [((128, 128), 30)]))
    for region in ("nucleus", "cytoplasm", "cell"):
        for stat in ("mean", "median", "p10", "p90"):
            assert values[f"{region}_grey_{stat}"] == 137
        assert values[f"{region}_grey_variance"] == 0
        assert values[f"{region}_grey_iqr"] == 0
        assert values[f"{region}_grey_uniformity"] == 1
        assert values[f"{region}_grey_entropy_bits"] == 0
        assert np.isnan(values[f"{region}_grey_skewness"])  # undefined for a constant region
        assert values[f"{region}_lab_l_std"] == 0 and values[f"{region}_lab_b_std"] == 0
        assert values[f"{region}_lab_l_mean"] == pytest.approx(rgb2lab(np.full((1, 1, 3), 137 / 255))[0, 0, 0], abs=0.5)
        assert values[f"{region}_glcm_contrast"] == 0
        assert values[f"{region}_glcm_energy"] == pytest.approx(1.0)
        assert values[f"{region}_glcm_homogeneity"] == pytest.approx(1.0)
        assert values[f"{region}_local_std_mean"] == 0 and values[f"{region}_local_std_max"] == 0


def test_two_level_region_has_known_first_order_statistics():
    crop = _grey(50)
    crop[:, 128:] = 150  # the nucleus disc is split in half: levels 50 and 150
    values = _describe(crop, _mask(100, [((128, 128), 40)]))
    assert values["nucleus_grey_mean"] == pytest.approx(100, abs=1.5)
    assert values["nucleus_grey_variance"] == pytest.approx(50**2, rel=0.01)
    assert values["nucleus_grey_p10"] == 50 and values["nucleus_grey_p90"] == 150
    assert values["nucleus_grey_entropy_bits"] == pytest.approx(1.0, abs=0.01)
    assert values["nucleus_grey_uniformity"] == pytest.approx(0.5, abs=0.01)
    assert values["nucleus_grey_kurtosis"] == pytest.approx(1.0, abs=0.01)  # Pearson's, two equal spikes
    assert values["nucleus_grey_skewness"] == pytest.approx(0.0, abs=0.05)


@pytest.mark.parametrize("seed", range(4))
def test_first_order_statistics_are_scipys(seed):
    """Skewness, kurtosis and entropy are computed in numpy (scipy's wrappers were a quarter
    of describing a cell); they must be scipy.stats' definitions."""
    from scipy import stats

    from atlas.features import _first_order, _skewness_kurtosis

    rng = np.random.default_rng(seed)
    grey = rng.gamma(2.0 + seed, 20.0, size=500 + 300 * seed).clip(0, 255).astype(np.uint8)
    values = grey.astype(np.float64)
    first = _first_order(grey)
    assert first["skewness"] == pytest.approx(stats.skew(values), rel=1e-9)
    assert first["kurtosis"] == pytest.approx(stats.kurtosis(values, fisher=False), rel=1e-9)
    histogram = np.bincount(grey, minlength=256) / grey.size
    assert first["entropy_bits"] == pytest.approx(stats.entropy(histogram, base=2), rel=1e-9)
    local = rng.normal(5, 2, 300) ** 2
    moments = _skewness_kurtosis(local)
    assert moments["skewness"] == pytest.approx(stats.skew(local), rel=1e-9)
    assert moments["kurtosis"] == pytest.approx(stats.kurtosis(local, fisher=False), rel=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert np.isnan(stats.skew(np.full(9, 3.3))) and np.isnan(_skewness_kurtosis(np.full(9, 3.3))["skewness"])


def test_checkerboard_region_has_known_glcm_and_local_std():
    # A 1-px checkerboard of grey 96 and 200 (32-level bins 12 and 25) in a square nucleus; the
    # background outside it is black and must not count. At 0.2 um/px the GLCM distance
    # (0.2 um) is 1 px and the local std window (1 um) 5 px.
    size = 128
    crop = np.zeros((size, size, 3), np.uint8)
    rows, cols = np.indices((size, size))
    board = np.where((rows + cols) % 2 == 0, 96, 200).astype(np.uint8)
    mask = np.zeros((size, size), np.uint8)
    mask[32:96, 32:96] = NUCLEUS
    crop[32:96, 32:96] = board[32:96, 32:96, None]
    values = _describe(crop, mask, um_per_pixel=0.2)
    # 0 and 90 degrees: always the other level (contrast 13^2); 45 and 135: always the same
    assert values["nucleus_glcm_contrast"] == pytest.approx((25 - 12) ** 2 / 2, rel=1e-6)
    assert values["nucleus_glcm_homogeneity"] == pytest.approx((1 / (1 + 13**2) + 1) / 2, rel=1e-6)
    assert values["nucleus_glcm_correlation"] == pytest.approx(0.0, abs=1e-3)  # -1 and +1
    assert values["nucleus_glcm_energy"] == pytest.approx(np.sqrt(0.5), rel=1e-3)
    # a 5x5 window holds 13 and 12 pixels of the two levels: std = 104 sqrt(13 * 12) / 25
    assert values["nucleus_local_std_mean"] == pytest.approx(104 * np.sqrt(13 * 12) / 25, rel=0.01)
    assert values["nucleus_local_std_min"] > 50
    assert np.isnan(values["cytoplasm_glcm_contrast"])


def test_missing_nucleus_gives_nan_not_an_error():
    mask = _mask(50, [])
    values = _describe(_grey(120), mask)
    nucleus_features = [n for n in FEATURE_NAMES if n.startswith("nucleus")]
    assert all(np.isnan(values[n]) for n in nucleus_features), [n for n in nucleus_features if not np.isnan(values[n])]
    assert values["cell_area_um2"] == pytest.approx(np.pi * 5.0**2, rel=0.01)
    assert values["cytoplasm_area_um2"] == pytest.approx(values["cell_area_um2"])
    assert values["cytoplasm_grey_mean"] == 120


def test_missing_cytoplasm_gives_nan_not_an_error():
    mask = np.zeros((64, 64), np.uint8)
    mask[disk((32, 32), 10)] = NUCLEUS
    values = _describe(_grey(120, 64), mask)
    assert all(np.isnan(values[n]) for n in FEATURE_NAMES if n.startswith("cytoplasm"))
    assert np.isnan(values["nucleus_to_cytoplasm_area_ratio"])
    assert values["nucleus_to_cell_area_ratio"] == pytest.approx(1.0)
    assert values["nucleus_grey_mean"] == 120


@pytest.mark.parametrize("pixels", [0, 1, 2], ids=["empty", "one-pixel nucleus", "two-pixel cell"])
def test_empty_and_tiny_masks_do_not_raise(pixels):
    mask = np.zeros((256, 256), np.uint8)
    mask[10, 10:10 + pixels] = NUCLEUS
    mask[11, 10:10 + pixels // 2] = CYTOPLASM
    values = _describe(_grey(80), mask)
    if not mask.any():
        assert all(np.isnan(v) for v in values.values())


def test_describe_is_fast():
    rng = np.random.default_rng(0)
    crop = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    mask = _mask(80, [((128, 110), 30), ((120, 150), 28)])
    describe(crop, mask)
    times = []
    for _ in range(5):
        started = time.perf_counter()
        describe(crop, mask)
        times.append(time.perf_counter() - started)
    assert min(times) < 0.2  # ~20 ms on one free core; loose, the test machine is shared


def test_class_ranges_gives_known_percentiles_and_skips_empty_classes(tmp_path):
    values = np.full((203, 2), np.nan)
    values[:101, 0] = np.arange(101)  # class a: 0..100
    values[101:202, 0] = 10 * np.arange(101)  # class b: 0..1000, NaN for feature y
    values[:101, 1] = 5.0
    values[202] = 1e6  # an unlabelled cell counts for no class
    labels = ["a"] * 101 + ["b"] * 101 + [None]
    ranges = class_ranges(values, labels, ["a", "b", "c"], names=("x", "y"))
    assert ranges == {"x": {"a": [2.0, 50.0, 98.0], "b": [20.0, 500.0, 980.0]}, "y": {"a": [5.0, 5.0, 5.0]}}
    json.dumps(ranges, allow_nan=False)

    full = np.tile(np.arange(50, dtype=np.float32)[:, None], (1, len(FEATURE_NAMES)))
    full[:, 3] = np.nan
    path = tmp_path / "feature_ranges.json"
    saved = save_class_ranges(path, full, ["a"] * 50, ["a"])
    assert load_class_ranges(path) == saved
    assert saved[FEATURE_NAMES[3]] == {}
    assert saved[FEATURE_NAMES[0]]["a"] == pytest.approx(list(np.percentile(np.arange(50), RANGE_PERCENTILES)))
    path.write_text(json.dumps({"percentiles": list(RANGE_PERCENTILES), "ranges": {"old_feature": {}}}))
    assert load_class_ranges(path) is None  # made with other features: the caller computes
    assert load_class_ranges(tmp_path / "missing.json") is None


def test_class_percentiles_use_the_stored_ranges_while_the_labels_are_the_builds(tmp_path):
    import pandas as pd

    from atlas.features import class_feature_percentiles

    values = np.tile(np.arange(10, dtype=float)[:, None], (1, len(FEATURE_NAMES)))
    cells = pd.DataFrame(values, columns=list(FEATURE_NAMES))
    labels = np.array(["a"] * 5 + ["b"] * 5, dtype=object)
    computed = class_feature_percentiles(cells, labels, ["a", "b"], stored=None, stored_labels=labels)
    assert computed == class_ranges(values, labels, ["a", "b"])  # nothing stored: computed
    assert computed["cell_area_um2"]["b"] == pytest.approx([5.08, 7.0, 8.92])
    path = tmp_path / "feature_ranges.json"
    stored = save_class_ranges(path, values * 2, labels, ["a", "b"])
    assert class_feature_percentiles(cells, labels, ["a", "b"], stored=load_class_ranges(path),
                                     stored_labels=labels) == stored
    assert class_feature_percentiles(cells, labels, ["a", "b"]) == computed  # no version: computed
    corrected = labels.copy()
    corrected[0] = "b"  # a correction since the build: the stored ranges no longer hold
    assert class_feature_percentiles(cells, corrected, ["a", "b"], stored=stored, stored_labels=labels) == (
        class_ranges(values, corrected, ["a", "b"]))
