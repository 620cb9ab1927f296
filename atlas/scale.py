"""Image scale: an uploaded image at its own um per pixel brought to the atlas's, and its cells
mapped back to the uploaded pixels.

An atlas is built at one scale (`REFERENCE_UM_PER_PIXEL` unless the build said otherwise) and
its segmenter, crop and features measure cells in that scale's pixels. An image from another
scanner (e.g. 0.157 um/px) sent as it is gets a nucleus 0.4 times its true area and is answered
as a smaller cell; resampled first, it is segmented, cropped and described as an archived cell.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from atlas.cell import MIN_IMAGE_SIDE, CellRegion, SegmentationError
from atlas.ingest import MAX_PIXELS

# Light microscopes resolve about 0.2 um; scanners and cameras on blood smears sample at
# 0.05-0.5 um per pixel. Outside 0.01-2 um/px the value is a unit mistake (nm, or pixels per
# um) rather than a real acquisition: at 2 um/px a 10 um lymphocyte is 5 pixels wide.
UM_PER_PIXEL_RANGE = (0.01, 2.0)
# Closer than this to the atlas's scale an image is used as it is: resampling by 1% moves a
# nucleus edge by well under a pixel and would only blur the image.
SAME_SCALE_TOLERANCE = 0.01


class ScaleError(SegmentationError):
    """An image scale that cannot be used (not a number, out of range, a resample too large or
    too small); the message says what is allowed."""


def check_um_per_pixel(um_per_pixel: float) -> float:
    """`um_per_pixel` as a float within UM_PER_PIXEL_RANGE, or ScaleError."""
    low, high = UM_PER_PIXEL_RANGE
    try:
        value = float(um_per_pixel)
    except (TypeError, ValueError):
        raise ScaleError(f"um_per_pixel must be a number, got {um_per_pixel!r}") from None
    if not math.isfinite(value) or not low <= value <= high:
        raise ScaleError(f"um_per_pixel must be between {low} and {high} um per pixel, "
                         f"got {um_per_pixel}")
    return value


def resampled_shape(shape: tuple[int, ...], um_per_pixel: float,
                    target_um_per_pixel: float) -> tuple[int, int]:
    """(height, width) of an image of `shape` at `um_per_pixel` once resampled to the target."""
    factor = um_per_pixel / target_um_per_pixel
    return max(1, round(shape[0] * factor)), max(1, round(shape[1] * factor))


def to_scale(image: np.ndarray, um_per_pixel: float | None,
             target_um_per_pixel: float) -> np.ndarray:
    """`image` (taken at `um_per_pixel`; None: already at the target) resampled to
    `target_um_per_pixel`, unchanged when the two are within SAME_SCALE_TOLERANCE. Lanczos:
    antialiased when shrinking, sharp when enlarging. ScaleError when the scale is out of range
    or the result would exceed the upload pixel limit or be too small to hold a cell."""
    if um_per_pixel is None:
        return image
    um_per_pixel = check_um_per_pixel(um_per_pixel)
    if abs(um_per_pixel / target_um_per_pixel - 1) < SAME_SCALE_TOLERANCE:
        return image
    height, width = resampled_shape(image.shape, um_per_pixel, target_um_per_pixel)
    becomes = (f"at {um_per_pixel} um per pixel the image would be {width}x{height} pixels at the "
               f"atlas's {target_um_per_pixel} um per pixel")
    if height * width > MAX_PIXELS:
        raise ScaleError(f"{becomes}, more than the {MAX_PIXELS:,} allowed")
    if min(height, width) < MIN_IMAGE_SIDE:
        raise ScaleError(f"{becomes}, too small to hold a white cell (need at least "
                         f"{MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE})")
    return np.asarray(Image.fromarray(image).resize((width, height), Image.LANCZOS))


def region_in_pixels_of(region: CellRegion, shape: tuple[int, ...]) -> CellRegion:
    """A region found on a resampled image, with its masks (nearest neighbour) and box in the
    pixels of an image of `shape`."""
    if region.cell.shape == tuple(shape[:2]):
        return region
    size = (shape[1], shape[0])
    cell = np.asarray(Image.fromarray(region.cell).resize(size, Image.NEAREST))
    nucleus = np.asarray(Image.fromarray(region.nucleus).resize(size, Image.NEAREST)) & cell
    rows, cols = np.nonzero(cell)
    bbox = ((int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1)
            if len(rows) else (0, 0, 0, 0))
    return CellRegion(cell=cell, nucleus=nucleus, bbox=bbox)
