"""From one image to its described cells: segment, crop on the nucleus, describe, hash.

The same function serves the batch build (every archive image) and a query (one uploaded
image), so an archived cell and a query cell are prepared identically.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

from atlas.dedup import average_hash, fine_hash
from atlas.features import describe
from atlas.segment import (
    NUCLEUS,
    CellCrop,
    SegmentationError,
    Segmenter,
    background_colour,
    check_image,
    crop_cell,
)


class NoCellFound(SegmentationError):
    """The segmenter found no white cell in the image."""


@dataclass
class PreparedCell:
    index: int  # position of the cell in its source image (0 = the main, most central cell)
    crop: CellCrop
    features: np.ndarray
    ahash: int
    fine_hash: str
    segment_ms: float  # segmenting the source image, divided among the cells kept


def prepare_cells(image: np.ndarray, segmenter: Segmenter, um_per_pixel: float,
                  all_cells: bool = False) -> list[PreparedCell]:
    """The main cell of `image` (or every cell, for smear fields), ready to embed.
    Raises SegmentationError (or NoCellFound) with a clear reason."""
    check_image(image)
    started = time.perf_counter()
    regions = segmenter.segment(image, main_only=not all_cells)
    segment_ms = 1000 * (time.perf_counter() - started)
    if not regions:
        raise NoCellFound("no white cell found in the image")
    prepared = []
    for index, region in enumerate(regions):
        crop = crop_cell(image, region, um_per_pixel)
        prepared.append(PreparedCell(index, crop, describe(crop.image, crop.mask),
                                     average_hash(crop.image), fine_hash(crop.image),
                                     segment_ms / len(regions)))
    return prepared


def model_input(crops: list[CellCrop], size: int) -> np.ndarray:
    """What the backbone sees: each crop turned to its canonical orientation, then resized
    (with antialiasing) to the backbone's input size; (N, size, size, 3) uint8."""
    if not crops:
        return np.zeros((0, size, size, 3), np.uint8)
    return np.stack([
        np.asarray(Image.fromarray(canonical_orientation(c.image, c.mask)).resize((size, size), Image.LANCZOS))
        for c in crops
    ])


def canonical_orientation(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The crop rotated about its centre so that the nucleus's long axis lies horizontal.

    A rotated copy of a cell then reaches the backbone in (nearly) the same orientation as the
    original; what is left (180 degrees, mirror images, a round nucleus's unstable axis) is
    covered by the backbone's averaging over rotated and mirrored views."""
    region = mask == NUCLEUS
    if region.sum() < 10:
        region = mask > 0
    if region.sum() < 10:
        return image
    rows, cols = np.nonzero(region)
    covariance = np.cov(np.stack([cols - cols.mean(), rows - rows.mean()]))
    _, vectors = np.linalg.eigh(covariance)
    long_axis = vectors[:, 1]
    angle = float(np.degrees(np.arctan2(long_axis[1], long_axis[0])))
    fill = tuple(int(v) for v in background_colour(image))
    return np.asarray(Image.fromarray(image).rotate(angle, resample=Image.BILINEAR, fillcolor=fill))
