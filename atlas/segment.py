"""Segmentation: find white cells and their nuclei, and crop a fixed-size patch on the nucleus.

`Segmenter` is the interface every segmenter meets (classical here, cellpose in its own module):
`segment(image) -> list[CellRegion]`, the main cell first. `crop_cell` turns a region into the
fixed-size, nucleus-centred crop that the rest of the pipeline sees (the core design: 256x256
at 0.1 um per pixel).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
from PIL import Image
from scipy import ndimage
from skimage import filters, morphology

REFERENCE_UM_PER_PIXEL = 0.1  # the scale of the core design's crops
CROP_SIZE = 256  # pixels at the reference scale: a 25.6 um field around the nucleus
MIN_IMAGE_SIDE = 32  # pixels; anything smaller cannot hold a white cell

NUCLEUS = 255  # label values of a cell mask, as in the wbc_seg convention
CYTOPLASM = 128
SEGMENTER_FILE = "segmenter.json"  # marks a trained segmenter folder (atlas.cellpose_segmenter)

# What the classical segmenter knows about stained peripheral blood, in physical units and stain
# colour (Lab b*: negative is blue; "shift" is how much bluer than the empty glass, so that the
# glass's own tint, cream or yellow, drops out). Measured on wbc_seg, PBC and BCCD: nuclei are
# 35-60 b* units bluer than the glass, basophilic cytoplasm 10-20, red cells about 0 (BCCD) to
# 12 (CellaVision), so the cytoplasm threshold is set from the red cells of each image.
NUCLEUS_BLUE_SHIFT = 20.0  # chromatin (azure/methylene blue) is at least this much bluer than glass
CYTOPLASM_BLUE_SHIFT = 8.0  # basophilic cytoplasm: at least this much bluer than glass ...
RED_CELL_MARGIN = 4.0  # ... and this much bluer than the image's red cells (eosin, no blue)
RED_CELL_DELTA_E = 6.0  # (a*, b*) distance within which a pixel is coloured like the red cells
# (90% of red-cell pixels lie within 5-8 of their median; white-cell cytoplasm mostly beyond 8)
RED_CELL_MIN_UM2 = 30.0  # red-cell pixels needed to trust that reference (a red cell is ~44 um^2)
STAINED_L = 8.0  # a stained object is at least this much darker (L*) than the glass
MIN_NUCLEUS_AREA_UM2 = 12.0  # a 4 um disc: a small lymphocyte's nucleus is ~6 um across (28 um^2),
# halved for a nucleus cut by the image border; a platelet is 2-3 um across (3-7 um^2)
LOBE_GAP_UM = 1.6  # lobes of one nucleus closer than this are one cell (two cells' nuclei are
# separated by two cytoplasm rims, usually more)
SMALL_LOBE_GAP_UM = 3.0  # lobes each too small to be a nucleus (an eosinophil's round lobes)
# join across this gap where cell body bridges it; platelets are not bridged by cytoplasm
BODY_SMOOTH_UM = 0.5  # colour smoothing for the cell body (JPEG chroma blocks, granules)
REACH_NUCLEUS_RADII, REACH_UM = 1.8, 2.0  # a cell's body lies within 1.8 nucleus radii + 2 um
# of the nucleus centre


class SegmentationError(ValueError):
    """The image cannot be segmented (too small, no cell found); the message says why."""


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


class Segmenter(Protocol):
    name: str
    um_per_pixel: float

    def segment(self, image: np.ndarray, main_only: bool = False) -> list[CellRegion]:
        """All white cells in an RGB uint8 image, the one nearest the centre first; with
        `main_only`, that one alone (a segmenter may then skip work)."""
        ...


class ClassicalSegmenter:
    """Thresholds, no training; every rule in physical units (um, um^2) and stain colour, so one
    segmenter serves single-cell images and whole smear fields at any scale.

    Nucleus: dark in green (chromatin absorbs green most; Otsu) and clearly bluer than the glass
    (in a field, red cells are as dark, but not blue); lobes closer than LOBE_GAP_UM are one
    nucleus, and a group smaller than MIN_NUCLEUS_AREA_UM2 is a platelet, not a white cell.
    Body (see `_body`): bluer than both the glass and the image's red cells (basophilic
    cytoplasm), or stained and not coloured like those red cells (granular cytoplasm); connected
    to the nucleus, within reach of it, and nearer to it than to any other nucleus (touching
    white cells are split between their nuclei). About 5 ms on a 120x120 image, 20 on 300x300,
    60-70 on a 640x480 smear field."""

    name = "classical"

    def __init__(self, um_per_pixel: float = REFERENCE_UM_PER_PIXEL):
        self.um_per_pixel = um_per_pixel

    def _px(self, um: float) -> float:
        return um / self.um_per_pixel

    def segment(self, image: np.ndarray, main_only: bool = False) -> list[CellRegion]:
        check_image(image)
        lab = lab_image(image)
        glass = glass_lab(image)
        lobes = find_nuclei(image, self.um_per_pixel, lab=lab, glass=glass)
        if not lobes.any():
            return []
        groups = _label_within(lobes, self._px(LOBE_GAP_UM))
        min_area = MIN_NUCLEUS_AREA_UM2 / self.um_per_pixel**2
        areas = np.bincount(groups.ravel())
        nuclei = np.where(areas[groups] >= min_area, groups, 0)
        body = self._body(lab, glass, nuclei)
        small = (groups > 0) & (nuclei == 0)
        if small.any():  # small lobes bridged by cell body within SMALL_LOBE_GAP_UM: one nucleus
            joined = _label_within(small, self._px(SMALL_LOBE_GAP_UM), bridge=body | small)
            joined_areas = np.bincount(joined.ravel())
            big = (joined > 0) & (joined_areas[joined] >= min_area)
            nuclei[big] = joined[big] + groups.max()
        regions = []
        for index, box in enumerate(ndimage.find_objects(nuclei), start=1):
            if box is not None:
                regions.append(self._cell_around(nuclei, index, body))
        centre = np.array(image.shape[:2]) / 2
        regions.sort(key=lambda r: _centre_rank(r, centre))
        return regions[:1] if main_only else regions

    def _reach(self, area_px: float) -> float:
        return REACH_NUCLEUS_RADII * np.sqrt(area_px / np.pi) + self._px(REACH_UM)

    def _body(self, lab: np.ndarray, glass: np.ndarray, nuclei: np.ndarray) -> np.ndarray:
        """Pixels that may be white-cell body: bluer than the glass (basophilic cytoplasm), or
        stained (darker than the glass: granular, pink or orange cytoplasm); where the image shows
        red cells, nothing coloured like them, and blue only beyond their own blue shift."""
        sigma = self._px(BODY_SMOOTH_UM)
        blue = _smooth(glass[2] - lab[..., 2], sigma)
        stained = lab[..., 0] < glass[0] - STAINED_L
        # Red cells: stained pixels beyond every white cell's reach (a smear is mostly red cells).
        red = stained.copy()
        yy, xx = np.ogrid[: nuclei.shape[0], : nuclei.shape[1]]
        for index, box in enumerate(ndimage.find_objects(nuclei), start=1):
            if box is not None:
                rows, cols = np.nonzero(nuclei[box] == index)
                centre_r, centre_c = rows.mean() + box[0].start, cols.mean() + box[1].start
                red &= (yy - centre_r) ** 2 + (xx - centre_c) ** 2 > self._reach(len(rows)) ** 2
        if red.sum() * self.um_per_pixel**2 < RED_CELL_MIN_UM2:
            # No red cells to calibrate on (a white cell filling a small image): the stain
            # contrast over the glass (Otsu on a*-b*) stands in for "stained, not a red cell".
            score = _smooth(lab[..., 1] - lab[..., 2], 1.5)
            return (blue > CYTOPLASM_BLUE_SHIFT) | (score > filters.threshold_otsu(score))
        red_blue = float(np.median(blue[red]))
        a = _smooth(lab[..., 1], sigma)
        red_like = np.hypot(a - np.median(a[red]), blue - red_blue) < RED_CELL_DELTA_E
        return (blue > max(CYTOPLASM_BLUE_SHIFT, red_blue + RED_CELL_MARGIN)) | (stained & ~red_like)

    def _cell_around(self, nuclei: np.ndarray, index: int, body: np.ndarray) -> CellRegion:
        nucleus = nuclei == index
        rows, cols = np.nonzero(nucleus)
        # A white cell's body reaches at most ~1.8 nucleus radii (plus 2 um) from its nucleus
        # centre; this stops the mask from flowing into touching red cells. All work happens in
        # the window that reach allows (a smear field is much larger than one cell).
        reach = self._reach(len(rows))
        centre_r, centre_c = rows.mean(), cols.mean()
        r0 = int(max(0, min(rows.min(), centre_r - reach) - 3))
        c0 = int(max(0, min(cols.min(), centre_c - reach) - 3))
        r1 = int(min(nucleus.shape[0], max(rows.max() + 1, centre_r + reach + 1) + 3))
        c1 = int(min(nucleus.shape[1], max(cols.max() + 1, centre_c + reach + 1) + 3))
        window_nucleus = nucleus[r0:r1, c0:c1]
        yy, xx = np.ogrid[r0:r1, c0:c1]
        near = (yy - centre_r) ** 2 + (xx - centre_c) ** 2 <= reach**2
        others = (nuclei[r0:r1, c0:c1] > 0) & ~window_nucleus
        if others.any():  # touching white cells: each body pixel goes to the nearest nucleus
            near &= ndimage.distance_transform_edt(~window_nucleus) <= ndimage.distance_transform_edt(~others)
        window_body = _open(body[r0:r1, c0:c1] & near, 2) | window_nucleus
        labels, _ = ndimage.label(window_body)
        keep = np.unique(labels[window_nucleus])
        window_cell = _fill_holes(np.isin(labels, keep[keep > 0]))
        window_cell |= _convex_hull(window_nucleus)
        cell = np.zeros_like(nucleus)
        cell[r0:r1, c0:c1] = window_cell
        r, c = np.nonzero(window_cell)
        return CellRegion(cell=cell, nucleus=nucleus & cell,
                          bbox=(int(r.min()) + r0, int(c.min()) + c0, int(r.max()) + r0 + 1, int(c.max()) + c0 + 1))


def find_nuclei(image: np.ndarray, um_per_pixel: float, lab: np.ndarray | None = None,
                glass: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask of every nucleus lobe in an RGB image: dark in green (chromatin absorbs green
    most; three Otsu classes: nuclei, cytoplasm and red cells, glass) and at least
    NUCLEUS_BLUE_SHIFT bluer than the glass (in a smear field the darkest class holds red cells
    too, which are not blue); lobes smaller than ~1.5 um^2 dropped. All False for a flat image.
    Shared by the classical and cellpose segmenters (cellpose finds the cell, this its nucleus).
    `lab` and `glass`: the image's lab_image and glass_lab, when already computed."""
    smooth = _smooth(image[..., 1].astype(np.float32), 1.0)
    try:
        thresholds = filters.threshold_multiotsu(smooth, classes=3)
    except ValueError:
        return np.zeros(image.shape[:2], bool)  # a flat image: nothing to find
    lab = lab_image(image) if lab is None else lab
    glass = glass_lab(image) if glass is None else glass
    nuclei = (smooth < thresholds[0]) & (_smooth(glass[2] - lab[..., 2], 1.0) > NUCLEUS_BLUE_SHIFT)
    nuclei = morphology.remove_small_objects(nuclei, max_size=int(min_lobe_area_px(um_per_pixel)))
    return _fill_holes(_open(nuclei, 1))


def glass_lab(image: np.ndarray) -> np.ndarray:
    """L*a*b* of the empty glass (background_colour), the reference for stain colours."""
    return lab_image(background_colour(image)[None, None])[0, 0]


def _smooth(values: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing of a float image (OpenCV: like skimage's with mode 'nearest', faster)."""
    return cv2.GaussianBlur(np.asarray(values, np.float32), (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REPLICATE)


_CROSS = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))


def _open(mask: np.ndarray, iterations: int) -> np.ndarray:
    """Binary opening with a 3x3 cross, outside the image counted as background (as scipy's)."""
    return cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, _CROSS, iterations=iterations,
                            borderType=cv2.BORDER_CONSTANT, borderValue=0).astype(bool)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask with its holes filled (background not 4-connected to the border), as scipy's
    binary_fill_holes, several times faster on a large image."""
    background, _ = ndimage.label(~mask)
    border = np.unique(np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]]))
    return ~np.isin(background, border[border > 0])


def _convex_hull(mask: np.ndarray) -> np.ndarray:
    """The convex hull of a mask's pixel centres, filled."""
    points = cv2.findNonZero(mask.astype(np.uint8))
    hull = np.zeros(mask.shape, np.uint8)
    if points is not None:
        cv2.fillConvexPoly(hull, cv2.convexHull(points), 1)
    return hull.astype(bool)


def _label_within(mask: np.ndarray, gap: float, bridge: np.ndarray | None = None) -> np.ndarray:
    """Labels of `mask`'s pixels, components closer than `gap` pixels sharing a label (and only
    where the pixels between them are in `bridge`, when given); 0 off the mask."""
    grown = cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE) <= gap / 2
    if bridge is not None:
        grown &= bridge
    labels, _ = ndimage.label(grown)
    labels[~mask] = 0
    return labels


def min_lobe_area_px(um_per_pixel: float) -> float:
    """The smallest nucleus lobe kept, ~1.5 um^2, in pixels."""
    return (1.0 / um_per_pixel) ** 2 * 1.5


def load_segmenter(spec: str | Path | None, um_per_pixel: float = REFERENCE_UM_PER_PIXEL) -> Segmenter:
    """The segmenter `spec` names, for images at `um_per_pixel`: None or "classical" gives the
    ClassicalSegmenter, a folder written by `cellatlas segmenter train` a CellposeSegmenter."""
    if spec is None or str(spec) == "classical":
        return ClassicalSegmenter(um_per_pixel)
    folder = Path(spec)
    if not folder.is_dir():
        raise FileNotFoundError(f"segmenter model folder {folder} does not exist")
    if not (folder / SEGMENTER_FILE).is_file():
        raise ValueError(f"{folder} is not a segmenter model folder (it has no {SEGMENTER_FILE}); "
                         "make one with 'cellatlas segmenter train'")
    from atlas.cellpose_segmenter import CellposeSegmenter  # imports cellpose only when used

    return CellposeSegmenter(folder, um_per_pixel)


def version_segmenter(version_dir: Path, manifest: dict) -> Segmenter:
    """The segmenter an atlas version was built with, at the version's scale: its own copy of
    the model (manifest "segmenter" -> "path", inside the version), or the classical one."""
    um_per_pixel = float(manifest["parameters"]["um_per_pixel"])
    path = (manifest.get("segmenter") or {}).get("path")
    return load_segmenter(Path(version_dir) / path if path else None, um_per_pixel)


def lab_image(image: np.ndarray) -> np.ndarray:
    """CIE L*a*b* of an RGB uint8 image (L 0-100, a and b around 0), via OpenCV: about ten
    times faster than scikit-image's float conversion, equal to it within 8-bit rounding."""
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB).astype(np.float32)
    lab[..., 0] *= 100.0 / 255.0
    lab[..., 1:] -= 128.0
    return lab


def _centre_rank(region: CellRegion, centre: np.ndarray) -> float:
    """Lower is more central; a big nucleus near the centre beats a small stray platelet."""
    distance = np.hypot(*(np.array(region.nucleus_centre) - centre))
    return distance / np.sqrt(region.nucleus.sum() + 1.0)


def check_image(image: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise SegmentationError(f"expected an RGB uint8 image, got shape {image.shape} {image.dtype}")
    if min(image.shape[:2]) < MIN_IMAGE_SIDE:
        h, w = image.shape[:2]
        raise SegmentationError(
            f"image is {w}x{h} pixels, too small to hold a white cell (need at least "
            f"{MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE})"
        )


def background_colour(image: np.ndarray) -> np.ndarray:
    """Median colour of the brightest third of pixels: the empty glass between cells."""
    pixels = image.reshape(-1, 3)
    brightness = pixels.sum(1)
    return np.median(pixels[brightness >= np.quantile(brightness, 2 / 3)], axis=0).astype(np.uint8)


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
