"""Cropping: the fixed-size, nucleus-centred crop of a segmented cell (the core design: 256x256
at 0.1 um per pixel), and the backbone's view of it (canonical orientation, input size)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from atlas.cell import CROP_SIZE, NUCLEUS, REFERENCE_UM_PER_PIXEL, CellCrop, CellRegion
from atlas.colour import background_colour


def crop_cell(
    image: np.ndarray, region: CellRegion, um_per_pixel: float = REFERENCE_UM_PER_PIXEL,
    size: int = CROP_SIZE,
) -> CellCrop:
    """A size x size crop at the reference scale, centred on the nucleus; the parts outside
    the image are filled with the background colour."""
    side = int(round(size * REFERENCE_UM_PER_PIXEL / um_per_pixel))  # source pixels to take
    cr, cc = (int(round(v)) for v in region.nucleus_centre)
    r0, c0 = cr - side // 2, cc - side // 2
    canvas = np.empty((side, side, 3), np.uint8)
    canvas[:] = background_colour(image)
    mask = np.zeros((side, side), np.uint8)
    label = region.label_mask()
    sr0, sc0 = max(r0, 0), max(c0, 0)
    sr1, sc1 = min(r0 + side, image.shape[0]), min(c0 + side, image.shape[1])
    canvas[sr0 - r0 : sr1 - r0, sc0 - c0 : sc1 - c0] = image[sr0:sr1, sc0:sc1]
    mask[sr0 - r0 : sr1 - r0, sc0 - c0 : sc1 - c0] = label[sr0:sr1, sc0:sc1]
    if side != size:
        canvas = np.asarray(Image.fromarray(canvas).resize((size, size), Image.BILINEAR))
        mask = np.asarray(Image.fromarray(mask).resize((size, size), Image.NEAREST))
    return CellCrop(image=canvas, mask=mask, bbox=region.bbox)


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
