"""Image scale: an uploaded image at its own um per pixel brought to the atlas's, and its cells
mapped back to the uploaded pixels.

An atlas is built at one scale (`REFERENCE_UM_PER_PIXEL` unless the build said otherwise) and
its segmenter, crop and features measure cells in that scale's pixels. An image from another
scanner (e.g. 0.157 um/px) sent as it is gets a nucleus 0.4 times its true area and is answered
as a smaller cell; resampled first, it is segmented, cropped and described as an archived cell.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from atlas.cell import MIN_IMAGE_SIDE, CellRegion, SegmentationError
from atlas.ingest import MAX_PIXELS, DecodedImage, ImageRecord, ImageTooLarge, decode_image

# Light microscopes resolve about 0.2 um; scanners and cameras on blood smears sample at
# 0.05-0.5 um per pixel. Outside 0.01-2 um/px the value is a unit mistake (nm, or pixels per
# um) rather than a real acquisition: at 2 um/px a 10 um lymphocyte is 5 pixels wide.
UM_PER_PIXEL_RANGE = (0.01, 2.0)
# Closer than this to the atlas's scale an image is used as it is: resampling by 1% moves a
# nucleus edge by well under a pixel and would only blur the image.
SAME_SCALE_TOLERANCE = 0.01
# The most pixels one upload is segmented at, at the atlas's scale: 6 Mpx is a 245x245 um field
# at 0.1 um/px (a 100x objective sees ~180 um), and bounds one request to a few hundred MB and a
# few seconds on one core (measured in bench/upload_memory.py; the classical segmenter holds
# ~50-300 bytes per pixel). A larger field is refused from its header, before decoding.
MAX_WORKING_PIXELS = 6_000_000
# Reductions JPEG decoders make inside the DCT (Image.draft); other formats reduce by any integer.
DECODE_REDUCTIONS = (1, 2, 4, 8)


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


def at_folder_scales(records: list[ImageRecord], root: Path | str, folder_scales: dict[str, float],
                     ) -> list[ImageRecord]:
    """`records` (images under `root`) with the scale of the folder each lies in, for archives that
    mix acquisitions: `folder_scales` maps a folder, given relative to `root` (`tecom`,
    `lymphocyte/tecom`), to its um per pixel; it holds for every image below a folder of that
    relative path at any depth, the longest match winning. Other images keep their own scale.
    ScaleError for a bad value, or for a folder that holds no image (a typo must not pass)."""
    if not folder_scales:
        return records
    wanted = {tuple(Path(folder).parts): check_um_per_pixel(x) for folder, x in folder_scales.items()}
    root = Path(root).resolve()
    used: set[tuple[str, ...]] = set()
    out = []
    for record in records:
        parts = Path(record.path).resolve().relative_to(root).parts[:-1]
        runs = [key for key in wanted if any(parts[i : i + len(key)] == key for i in range(len(parts)))]
        if not runs:
            out.append(record)
            continue
        key = max(runs, key=len)
        used.add(key)
        out.append(replace(record, um_per_pixel=wanted[key]))
    unused = sorted("/".join(key) for key in set(wanted) - used)
    if unused:
        raise ScaleError(f"--um-per-pixel names folder(s) holding no image under {root}: {', '.join(unused)}")
    return out


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


def decode_reduction(width: int, height: int, um_per_pixel: float | None, target_um_per_pixel: float,
                     max_working_pixels: int = MAX_WORKING_PIXELS) -> int:
    """By how much an image of `width` x `height` taken at `um_per_pixel` (None: the target's)
    can be reduced at decode and still be at least as fine as `target_um_per_pixel`: the largest
    of DECODE_REDUCTIONS not above target / um_per_pixel. ImageTooLarge when the image, brought
    to the target scale, would have more than `max_working_pixels`."""
    um_per_pixel = target_um_per_pixel if um_per_pixel is None else check_um_per_pixel(um_per_pixel)
    ratio = um_per_pixel / target_um_per_pixel
    working = width * height * ratio * ratio
    if working > max_working_pixels:
        at_target = f"{round(width * ratio)}x{round(height * ratio)}"
        raise ImageTooLarge(
            f"the image is {width}x{height} pixels at {um_per_pixel:g} um per pixel, {at_target} at "
            f"the atlas's {target_um_per_pixel:g} um per pixel; one upload is worked on at most at "
            f"{max_working_pixels:,} pixels of the atlas's scale: crop it around the cells, or "
            "give its real scale with um_per_pixel")
    # Never reduce below the target scale (the segmenter would then have to enlarge it again).
    return max((f for f in DECODE_REDUCTIONS if f <= 1 / ratio + 1e-9), default=1)


def read_upload(data: bytes, um_per_pixel: float | None, target_um_per_pixel: float,
                max_working_pixels: int = MAX_WORKING_PIXELS) -> tuple[DecodedImage, float | None]:
    """An uploaded image decoded no larger than segmentation at `target_um_per_pixel` needs,
    and its scale after that reduction (None when it was sent at the target's scale and not
    reduced): the reduction is folded into um_per_pixel so that `to_scale` finishes the
    resampling exactly. Raises ImageReadError (ImageTooLarge: too many pixels to work on) or
    ScaleError."""
    if um_per_pixel is not None:
        um_per_pixel = check_um_per_pixel(um_per_pixel)  # ScaleError here, not inside the decoder
    decoded = decode_image(data, MAX_PIXELS, lambda width, height: decode_reduction(
        width, height, um_per_pixel, target_um_per_pixel, max_working_pixels))
    if decoded.reduction == 1:
        return decoded, um_per_pixel
    return decoded, (um_per_pixel or target_um_per_pixel) * decoded.reduction


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
