"""The classical segmenter: stain-colour thresholds in physical units, no training.

It finds every white cell of a single-cell image or a smear field at any scale; the cellpose
runner (`cellpose_runner.py`) uses its nucleus threshold (`find_nuclei`) and, where the network
misses a cell, its outline.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage
from skimage import filters, morphology

from atlas.cell import REFERENCE_UM_PER_PIXEL, CellRegion, check_image
from atlas.colour import background_colour, lab_image

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
        basophilic = blue > max(CYTOPLASM_BLUE_SHIFT, red_blue + RED_CELL_MARGIN)
        return basophilic | (stained & ~red_like)

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
            near &= (ndimage.distance_transform_edt(~window_nucleus)
                     <= ndimage.distance_transform_edt(~others))
        window_body = _open(body[r0:r1, c0:c1] & near, 2) | window_nucleus
        labels, _ = ndimage.label(window_body)
        keep = np.unique(labels[window_nucleus])
        window_cell = _fill_holes(np.isin(labels, keep[keep > 0]))
        window_cell |= _convex_hull(window_nucleus)
        cell = np.zeros_like(nucleus)
        cell[r0:r1, c0:c1] = window_cell
        r, c = np.nonzero(window_cell)
        bbox = (int(r.min()) + r0, int(c.min()) + c0, int(r.max()) + r0 + 1, int(c.max()) + c0 + 1)
        return CellRegion(cell=cell, nucleus=nucleus & cell, bbox=bbox)


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


def min_lobe_area_px(um_per_pixel: float) -> float:
    """The smallest nucleus lobe kept, ~1.5 um^2, in pixels."""
    return (1.0 / um_per_pixel) ** 2 * 1.5


def glass_lab(image: np.ndarray) -> np.ndarray:
    """L*a*b* of the empty glass (background_colour), the reference for stain colours."""
    return lab_image(background_colour(image)[None, None])[0, 0]


def _smooth(values: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing of a float image (OpenCV: like skimage's with mode 'nearest', faster)."""
    return cv2.GaussianBlur(np.asarray(values, np.float32), (0, 0), sigmaX=sigma,
                            borderType=cv2.BORDER_REPLICATE)


_CROSS = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))


def _open(mask: np.ndarray, iterations: int) -> np.ndarray:
    """Binary opening with a 3x3 cross, outside the image counted as background (as scipy's)."""
    return cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, _CROSS, iterations=iterations,
                            borderType=cv2.BORDER_CONSTANT, borderValue=0).astype(bool)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask with its holes filled (background not 4-connected to the border), as scipy's
    binary_fill_holes, several times faster on a large image."""
    background, _ = ndimage.label(~mask)
    border = np.unique(np.concatenate([background[0], background[-1],
                                       background[:, 0], background[:, -1]]))
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
    distance = cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    grown = distance <= gap / 2
    if bridge is not None:
        grown &= bridge
    labels, _ = ndimage.label(grown)
    labels[~mask] = 0
    return labels


def _centre_rank(region: CellRegion, centre: np.ndarray) -> float:
    """Lower is more central; a big nucleus near the centre beats a small stray platelet."""
    distance = np.hypot(*(np.array(region.nucleus_centre) - centre))
    return distance / np.sqrt(region.nucleus.sum() + 1.0)
