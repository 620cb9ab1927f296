"""From one image to its described cells: segment, crop on the nucleus, describe, hash.

The same function serves the batch build (every archive image) and a query (one uploaded
image), so an archived cell and a query cell are prepared identically.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from atlas.dedup import average_hash
from atlas.features import describe
from atlas.segment import CellCrop, SegmentationError, Segmenter, check_image, crop_cell


class NoCellFound(SegmentationError):
    """The segmenter found no white cell in the image."""


@dataclass
class PreparedCell:
    index: int  # position of the cell in its source image (0 = the main, most central cell)
    crop: CellCrop
    features: np.ndarray
    ahash: int


def prepare_cells(image: np.ndarray, segmenter: Segmenter, um_per_pixel: float,
                  all_cells: bool = False) -> list[PreparedCell]:
    """The main cell of `image` (or every cell, for smear fields), ready to embed.
    Raises SegmentationError (or NoCellFound) with a clear reason."""
    check_image(image)
    regions = segmenter.segment(image)
    if not regions:
        raise NoCellFound("no white cell found in the image")
    if not all_cells:
        regions = regions[:1]
    prepared = []
    for index, region in enumerate(regions):
        crop = crop_cell(image, region, um_per_pixel)
        prepared.append(PreparedCell(index, crop, describe(crop.image, crop.mask), average_hash(crop.image)))
    return prepared


def resize_for_model(crops: list[np.ndarray], size: int) -> np.ndarray:
    """Crops resized (with antialiasing) to the backbone's input size, (N, size, size, 3) uint8."""
    if not crops:
        return np.zeros((0, size, size, 3), np.uint8)
    return np.stack([np.asarray(Image.fromarray(c).resize((size, size), Image.LANCZOS)) for c in crops])
