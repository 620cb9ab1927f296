"""The cell data model shared by every step: scale, crop size, mask values, a segmented region
and its nucleus-centred crop, and the errors an image can raise before it becomes a cell."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

REFERENCE_UM_PER_PIXEL = 0.1  # the scale of the core design's crops
CROP_SIZE = 256  # pixels at the reference scale: a 25.6 um field around the nucleus
MIN_IMAGE_SIDE = 32  # pixels; anything smaller cannot hold a white cell

NUCLEUS = 255  # label values of a cell mask, as in the wbc_seg convention
CYTOPLASM = 128


class SegmentationError(ValueError):
    """The image cannot be segmented (too small, no cell found); the message says why."""


class NoCellFound(SegmentationError):
    """The segmenter found no white cell in the image."""


@dataclass
class CellRegion:
    """One white cell in an image: boolean masks over the whole image and its bounding box."""

    cell: np.ndarray
    nucleus: np.ndarray
    bbox: tuple[int, int, int, int]  # row0, col0, row1, col1 (exclusive)

    def label_mask(self) -> np.ndarray:
        """The region as one uint8 label image: 255 nucleus, 128 cytoplasm, 0 background."""
        return np.where(self.nucleus, NUCLEUS, np.where(self.cell, CYTOPLASM, 0)).astype(np.uint8)

    @property
    def nucleus_centre(self) -> tuple[float, float]:
        rows, cols = np.nonzero(self.nucleus if self.nucleus.any() else self.cell)
        return float(rows.mean()), float(cols.mean())


@dataclass
class CellCrop:
    """The nucleus-centred crop of one cell and its label mask (255 nucleus, 128 cytoplasm)."""

    image: np.ndarray  # (CROP_SIZE, CROP_SIZE, 3) uint8
    mask: np.ndarray  # (CROP_SIZE, CROP_SIZE) uint8
    bbox: tuple[int, int, int, int]  # the cell's box in the source image


def check_image(image: np.ndarray) -> None:
    """An RGB uint8 image large enough to hold a white cell, or SegmentationError."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise SegmentationError(f"expected an RGB uint8 image, got shape {image.shape} {image.dtype}")
    if min(image.shape[:2]) < MIN_IMAGE_SIDE:
        h, w = image.shape[:2]
        raise SegmentationError(
            f"image is {w}x{h} pixels, too small to hold a white cell (need at least "
            f"{MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE})"
        )
