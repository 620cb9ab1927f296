"""Morphology and colour features of one cell crop, in physical units where they have them.

The numbers technologists read: cell and nucleus size, nucleus-to-cell ratio, shape of the
nucleus (lobes, solidity), and the mean/spread of colour in nucleus and cytoplasm.
All shape measures come from scikit-image's `regionprops`.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage import measure

from atlas.segment import CYTOPLASM, NUCLEUS, REFERENCE_UM_PER_PIXEL, lab_image

FEATURE_NAMES: tuple[str, ...] = (
    "cell_area_um2",
    "cell_perimeter_um",
    "cell_circularity",
    "cell_eccentricity",
    "nucleus_area_um2",
    "nucleus_perimeter_um",
    "nucleus_circularity",
    "nucleus_solidity",
    "nucleus_eccentricity",
    "nucleus_lobes",
    "nucleus_to_cell_ratio",
    *(f"{region}_{stat}_{channel}"
      for region in ("nucleus", "cytoplasm")
      for stat in ("mean", "std")
      for channel in ("L", "a", "b")),
)


def describe(crop: np.ndarray, mask: np.ndarray, um_per_pixel: float = REFERENCE_UM_PER_PIXEL) -> np.ndarray:
    """Feature vector (in FEATURE_NAMES order) of a crop and its label mask.

    `um_per_pixel` is the scale of the crop (crops are resampled to the reference scale,
    so the default is right for crops made by `crop_cell`). Missing regions give NaN,
    which the classifier handles as missing values.
    """
    cell = mask > 0
    nucleus = mask == NUCLEUS
    cytoplasm = mask == CYTOPLASM
    area_um2 = um_per_pixel**2
    values: list[float] = []
    cell_props = _largest_region(cell)
    values += [
        cell.sum() * area_um2,
        _get(cell_props, "perimeter") * um_per_pixel,
        _circularity(cell_props),
        _get(cell_props, "eccentricity"),
    ]
    nucleus_props = _largest_region(nucleus)
    values += [
        nucleus.sum() * area_um2,
        _perimeter_all(nucleus) * um_per_pixel,
        _circularity(nucleus_props),
        _get(nucleus_props, "solidity"),
        _get(nucleus_props, "eccentricity"),
        float(lobe_count(nucleus)),
        nucleus.sum() / cell.sum() if cell.any() else np.nan,
    ]
    lab = lab_image(crop)
    for region in (nucleus, cytoplasm):
        for stat in (np.mean, np.std):
            for channel in range(3):
                values.append(float(stat(lab[..., channel][region])) if region.any() else np.nan)
    return np.asarray(values, dtype=np.float32)


def lobe_count(nucleus: np.ndarray, erosion_px: int = 3) -> int:
    """Number of nuclear lobes: parts that stay separate after eroding thin chromatin bridges."""
    if not nucleus.any():
        return 0
    eroded = ndimage.binary_erosion(nucleus, iterations=erosion_px)
    labels, count = ndimage.label(eroded)
    if count == 0:
        return 1
    sizes = np.bincount(labels.ravel())[1:]
    return int(max(1, (sizes >= 0.05 * sizes.max()).sum()))


def _largest_region(mask: np.ndarray):
    props = measure.regionprops(mask.astype(np.uint8))
    return props[0] if props else None


def _get(props, name: str) -> float:
    return float(getattr(props, name)) if props is not None else np.nan


def _perimeter_all(mask: np.ndarray) -> float:
    return float(measure.perimeter(mask)) if mask.any() else np.nan


def _circularity(props) -> float:
    """4 pi area / perimeter^2: 1 for a disc, lower for lobed or ragged outlines."""
    if props is None or props.perimeter == 0:
        return np.nan
    return float(min(1.0, 4 * np.pi * props.area / props.perimeter**2))
