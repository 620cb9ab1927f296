"""From one image to its described cells: segment, crop on the nucleus, describe, hash.

The same function serves the batch build (every archive image) and a query (one uploaded
image), so an archived cell and a query cell are prepared identically.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from atlas.cell import CellCrop, NoCellFound, check_image
from atlas.crop import crop_cell
from atlas.dedup import average_hash, fine_hash
from atlas.features import describe
from atlas.segmentation import Segmenter


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
