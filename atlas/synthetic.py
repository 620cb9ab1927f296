"""Generated images of stained white cells, for the demo and the tests: the classes differ the
way they do under the microscope, and cells of one class vary the way slides do.

Drawn at the scale of CellaVision crops (0.1 um per pixel) as stain on glass (Beer-Lambert: a
pixel is the glass colour times exp(-optical density)), so that overlapping red cells darken, a
paler slide lightens every structure together, and colours mix as dyes do. Each class is one
`Morphology`: a size range, a nucleus shape and place, a chromatin texture and a cytoplasm,
after the haematology atlases:
- neutrophil: 11-14 um; 3-5 lobes joined by thin strands, coarse dense chromatin; pale
  lilac-pink cytoplasm with fine granules;
- eosinophil: 12-15 um; 2 lobes (spectacles); cytoplasm packed with coarse orange-red granules;
- monocyte: 14-19 um, the largest; a kidney-shaped, folded or horseshoe nucleus with lacy,
  paler chromatin, often off-centre; grey-blue cytoplasm with vacuoles;
- lymphocyte: 8-12 um; a round dense nucleus filling most of the cell; a scant sky-blue rim,
  paler next to the nucleus.
Within a class a cell varies in size, outline, orientation and position of its nucleus, stain
intensity and hue, focus and noise, and in the red cells around it (some touching it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

CLASSES = ("neutrophil", "lymphocyte", "monocyte", "eosinophil")
UNSEEN_CLASSES = ("blast",)  # drawn on request, never in a generated archive: a cell no atlas has seen

PX_PER_UM = 10.0  # the reference scale, 0.1 um per pixel
_GLASS = np.array([252, 230, 204], np.float32)  # cream glass of a May-Grunwald-Giemsa smear


def _density(rgb) -> np.ndarray:
    """Optical density of a structure that looks `rgb` on the reference glass."""
    return -np.log(np.asarray(rgb, np.float32) / _GLASS)


# Colours as they look on the glass, measured on PBC crops and read off haematology atlases.
CHROMATIN = _density([86, 40, 132])
RED_CELL = _density([212, 166, 168])  # the rim; the centre is paler (central pallor)
NEUTROPHIL_CYTOPLASM, FINE_GRANULE = _density([218, 186, 202]), _density([176, 128, 180])
EOSINOPHIL_CYTOPLASM, COARSE_GRANULE = _density([228, 172, 150]), _density([214, 104, 70])
MONOCYTE_CYTOPLASM = _density([186, 180, 198])
LYMPHOCYTE_CYTOPLASM = _density([158, 178, 202])
BLAST_CYTOPLASM = _density([96, 118, 186])


@dataclass(frozen=True)
class Morphology:
    """What tells a class apart: diameter range (um), how the nucleus is shaped and how far off
    the cell's centre it may sit (a share of the cell radius: monocyte and lymphocyte nuclei often
    lie to one side), how dense its chromatin is (optical-density factor) and its clumping
    (texture scale in px), and how the cytoplasm is painted."""

    diameter_um: tuple[float, float]
    nucleus: Callable[[np.ndarray, float, np.random.Generator], list[tuple[np.ndarray, float]]]
    nucleus_offset: float
    chromatin_density: float
    chromatin_clump_px: float
    cytoplasm: Callable[[np.ndarray, np.ndarray, np.ndarray, np.random.Generator], None]


def synthetic_cell(label: str, rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """One RGB uint8 image (size x size) of a white cell of class `label` near the centre."""
    image, _, _ = synthetic_cell_with_masks(label, rng, size)
    return image


def synthetic_cell_with_masks(label: str, rng: np.random.Generator,
                              size: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, cell mask, nucleus mask) of one generated white cell: the masks are the truth
    the image was drawn from (for checking a segmenter)."""
    if label not in MORPHOLOGY:
        raise ValueError(f"unknown synthetic class {label!r}; choose from {CLASSES + UNSEEN_CLASSES}")
    morphology = MORPHOLOGY[label]
    shape = (size, size)
    centre = np.array([size / 2, size / 2]) + rng.uniform(-12, 12, 2)
    radius = rng.uniform(*morphology.diameter_um) * PX_PER_UM / 2
    cell = _blob(shape, centre, radius, elongation=rng.uniform(1.0, 1.12),
                 angle=rng.uniform(0, np.pi), roughness=0.02, rng=rng)
    density = np.zeros((*shape, 3), np.float32)
    _red_cells(density, centre, radius, rng)
    density[cell] = 0  # the white cell lies on top of the red cells it touches
    away = _unit(rng.uniform(0, 2 * np.pi))
    nucleus_centre = centre + away * radius * rng.uniform(0, morphology.nucleus_offset)
    nucleus = _chain(shape, morphology.nucleus(nucleus_centre, radius, rng)) & _eroded(cell, 2)
    morphology.cytoplasm(density, cell & ~nucleus, nucleus, rng)
    density[nucleus] = CHROMATIN * _chromatin(shape, morphology, rng)[nucleus, None]
    return _photograph(density, rng), cell, nucleus


def write_synthetic_archive(root: Path, per_class: int = 40, seed: int = 0,
                            size: int = 256) -> Path:
    """Write `per_class` PNG images per class into `root/<class>/` (ImageFolder layout)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for label in CLASSES:
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = synthetic_cell(label, rng, size)
            Image.fromarray(image).save(root / label / f"{label}_{i:04d}.png")
    return root


# -- nucleus shapes: lists of (point, radius) swept into one outline by `_chain` -----------------
def segmented_nucleus(lobes: tuple[int, int], lobe_um: tuple[float, float], strand_um: float):
    """Lobes (a count drawn from `lobes`, each `lobe_um` in radius) along a winding path, each
    joined to the next by a thin chromatin strand: a neutrophil's 3-5, an eosinophil's 2."""

    def draw(centre, cell_radius, rng):
        count = int(rng.integers(lobes[0], lobes[1] + 1))
        scale = cell_radius / 65.0  # lobes grow with the cell
        heading, turn = rng.uniform(0, 2 * np.pi), rng.choice([-1, 1])
        strand = strand_um * PX_PER_UM
        points: list[tuple[np.ndarray, float]] = []
        for _ in range(count):
            radius = rng.uniform(*lobe_um) * PX_PER_UM * scale * (lobes[0] / count) ** 0.5
            start = np.zeros(2)
            if points:  # a strand across a 0.2-0.7 um gap from the last lobe to this one
                end, end_radius = points[-1]
                start = end + _unit(heading) * (end_radius + rng.uniform(2, 7) + radius)
                points += [(end, strand), (start, strand)]
            # a lobe is an irregular oval: three discs along a bent line
            length = radius * rng.uniform(0.3, 1.0)
            bend = _unit(heading + np.pi / 2) * radius * rng.normal(0, 0.2)
            middle_radius = radius * rng.uniform(0.85, 1.1)
            end_radius = radius * rng.uniform(0.7, 1.0)
            points += [(start, radius),
                       (start + _unit(heading) * length / 2 + bend, middle_radius),
                       (start + _unit(heading) * length, end_radius)]
            heading += turn * rng.uniform(0.8, 1.6)  # the path curls
        middle = np.mean([p for p, _ in points], axis=0)
        # a chain too long for its cell is drawn smaller rather than poke out of it
        reach = max(np.hypot(*(p - middle)) + r for p, r in points)
        shrink = min(1.0, 0.9 * cell_radius / reach)
        return [(centre + (p - middle) * shrink, r * shrink) for p, r in points]

    return draw


def folded_nucleus(centre, cell_radius, rng):
    """A monocyte's nucleus: a thick band bent along an arc; a short arc is kidney-shaped, a long
    thin one a horseshoe, the notch facing any way."""
    span = rng.uniform(0.45, 1.2) * np.pi
    band = cell_radius * rng.uniform(0.32, 0.4) * (1.1 - 0.25 * span / np.pi)
    arc_radius = band * rng.uniform(1.2, 1.9)
    facing = rng.uniform(0, 2 * np.pi)
    middle = centre - arc_radius * _unit(facing) * np.sinc(span / (2 * np.pi))  # centre the band
    points = []
    for t in np.linspace(-0.5, 0.5, 9):
        swell = 1.0 - 0.3 * abs(2 * t) ** 2  # thickest in the middle, rounded ends
        points.append((middle + arc_radius * _unit(facing + t * span), band * swell))
    return points


def round_nucleus(centre, cell_radius, rng):
    """A lymphocyte's nucleus: round or slightly oval, filling most of the cell."""
    radius = cell_radius * rng.uniform(0.72, 0.86)
    stretch = _unit(rng.uniform(0, 2 * np.pi)) * radius * rng.uniform(0.0, 0.12)
    return [(centre - stretch, radius), (centre + stretch, radius)]


# -- cytoplasm painters: write optical density into `density` over `region` ---------------------
def fine_lilac_granules(density, region, nucleus, rng) -> None:
    """Neutrophil: pale lilac-pink cytoplasm dusted with fine granules (a pixel or two)."""
    density[region] = NEUTROPHIL_CYTOPLASM * rng.uniform(0.85, 1.15)
    granules = _granule_field(region.shape, rng, per_100_px=6.0, radius_px=0.8)
    density[region] += FINE_GRANULE * 0.35 * granules[region, None]


def coarse_orange_granules(density, region, nucleus, rng) -> None:
    """Eosinophil: cytoplasm packed with coarse (about 0.5 um) orange-red granules."""
    density[region] = EOSINOPHIL_CYTOPLASM * rng.uniform(0.85, 1.15)
    granules = _granule_field(region.shape, rng, per_100_px=4.0, radius_px=1.8)
    density[region] += COARSE_GRANULE * rng.uniform(0.75, 1.0) * granules[region, None]


def grey_blue_with_vacuoles(density, region, nucleus, rng) -> None:
    """Monocyte: grey-blue, finely ground-glass cytoplasm with a few clear vacuoles."""
    amount = np.full(region.shape, rng.uniform(0.85, 1.15), np.float32)
    amount += 0.12 * _granule_field(region.shape, rng, per_100_px=4.0, radius_px=0.8)
    rows, cols = np.nonzero(region)
    for _ in range(rng.integers(0, 7)):
        pick = rng.integers(len(rows))
        cv2.circle(amount, (int(cols[pick]), int(rows[pick])), int(rng.uniform(3, 9)), 0.25, -1)
    density[region] = MONOCYTE_CYTOPLASM * amount[region, None]


def sky_blue_rim(density, region, nucleus, rng) -> None:
    """Lymphocyte: a scant sky-blue rim, deepest at the cell's edge and pale next to the nucleus
    (the perinuclear clear zone)."""
    to_nucleus = cv2.distanceTransform((~nucleus).astype(np.uint8), cv2.DIST_L2, 5)
    to_edge = cv2.distanceTransform(region.astype(np.uint8), cv2.DIST_L2, 5)
    outward = to_nucleus / (to_nucleus + to_edge + 1e-6)  # 0 at the nucleus, 1 at the edge
    amount = rng.uniform(0.85, 1.15) * (0.55 + 0.6 * outward)
    density[region] = LYMPHOCYTE_CYTOPLASM * amount[region, None]


def deep_blue_rim(density, region, nucleus, rng) -> None:
    """Blast (unseen class): a thin rim of deep blue (basophilic) cytoplasm."""
    density[region] = BLAST_CYTOPLASM * rng.uniform(0.9, 1.1)


def large_irregular_nucleus(centre, cell_radius, rng):
    """Blast (unseen class): a large nucleus with an irregular outline, filling most of the cell."""
    heading = rng.uniform(0, 2 * np.pi)
    return [(centre + _unit(heading + a) * cell_radius * rng.uniform(0.1, 0.3), cell_radius * rng.uniform(0.6, 0.75))
            for a in np.linspace(0, 2 * np.pi, 5)]


MORPHOLOGY: dict[str, Morphology] = {
    "neutrophil": Morphology((11.0, 14.0), segmented_nucleus((3, 5), (1.7, 2.2), 0.35), 0.04,
                             1.0, 2.0, fine_lilac_granules),
    "eosinophil": Morphology((12.0, 15.0), segmented_nucleus((2, 2), (2.1, 2.6), 0.4), 0.04,
                             0.9, 2.0, coarse_orange_granules),
    "monocyte": Morphology((14.0, 19.0), folded_nucleus, 0.15, 0.75, 1.4, grey_blue_with_vacuoles),
    "lymphocyte": Morphology((8.0, 12.0), round_nucleus, 0.1, 1.1, 2.8, sky_blue_rim),
    # not a class of a generated archive (UNSEEN_CLASSES): fine pale chromatin, 20-23 um
    "blast": Morphology((20.0, 23.0), large_irregular_nucleus, 0.05, 0.55, 0.8, deep_blue_rim),
}


# -- the slide: red cells, chromatin texture, stain, focus and noise ----------------------------
def _red_cells(density, white_centre, white_radius, rng) -> None:
    """Red cells (7-8 um discs with a pale centre) scattered around the white cell, overlapping
    one another; with probability 0.6 one or two of them touch the white cell."""
    size = density.shape[0]
    touching = rng.integers(1, 3) if rng.random() < 0.6 else 0
    for index in range(rng.integers(7, 15) + touching):
        radius = rng.uniform(3.4, 4.0) * PX_PER_UM
        if index < touching:
            gap = white_radius + radius - rng.uniform(0, 4)
            centre = white_centre + gap * _unit(rng.uniform(0, 2 * np.pi))
        else:
            centre = rng.uniform(-radius, size + radius, 2)
            if np.hypot(*(centre - white_centre)) < white_radius + radius + 3:
                continue  # the white cell pushed it aside
        _red_cell(density, centre, radius, rng)


def _red_cell(density, centre, radius, rng) -> None:
    size = density.shape[0]
    r0, c0 = (max(0, int(v - radius - 2)) for v in centre)
    r1, c1 = (min(size, int(v + radius + 3)) for v in centre)
    if r0 >= r1 or c0 >= c1:
        return
    yy, xx = np.mgrid[r0:r1, c0:c1]
    rho = np.hypot(yy - centre[0], xx - centre[1]) / radius
    pallor = 1.0 - rng.uniform(0.5, 0.75) * np.exp(-((rho / 0.55) ** 4))  # flat pale centre
    edge = np.clip((1.0 - rho) * radius / 1.5, 0, 1)  # a soft 1.5 px edge
    density[r0:r1, c0:c1] += RED_CELL * rng.uniform(0.85, 1.1) * (pallor * edge)[..., None]


def _chromatin(shape, morphology: Morphology, rng) -> np.ndarray:
    """Chromatin amount per pixel: clumps of the class's scale around its density."""
    noise = cv2.GaussianBlur(rng.standard_normal(shape).astype(np.float32), (0, 0),
                             morphology.chromatin_clump_px)
    noise /= noise.std() + 1e-6
    return morphology.chromatin_density * rng.uniform(0.9, 1.1) * (1.0 + 0.16 * noise)


def _photograph(density, rng) -> np.ndarray:
    """The slide as the camera sees it: this slide's stain strength and hue, the glass's tint,
    focus blur and sensor noise."""
    stain = rng.uniform(0.8, 1.2) * rng.uniform(0.94, 1.06, 3).astype(np.float32)
    glass = _GLASS * rng.uniform(0.97, 1.02, 3).astype(np.float32)
    image = glass * np.exp(-density * stain)
    image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.6, 1.8))
    image += rng.normal(0, rng.uniform(2, 4), image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


# -- geometry -----------------------------------------------------------------------------------
def _unit(angle: float) -> np.ndarray:
    return np.array([np.cos(angle), np.sin(angle)])


def _chain(shape, points: list[tuple[np.ndarray, float]]) -> np.ndarray:
    """The outline swept by a disc moving from point to point, its radius changing linearly:
    lobes and strands, arcs and ovals all in one."""
    mask = np.zeros(shape, bool)
    reach = max(r for _, r in points) + 1
    corner = np.maximum(np.floor(np.min([p for p, _ in points], axis=0) - reach), 0).astype(int)
    far = np.minimum(np.ceil(np.max([p for p, _ in points], axis=0) + reach), shape).astype(int)
    if (far <= corner).any():
        return mask
    yy, xx = np.mgrid[corner[0] : far[0], corner[1] : far[1]].astype(np.float32)
    window = mask[corner[0] : far[0], corner[1] : far[1]]
    for (p0, r0), (p1, r1) in zip(points, points[1:] or points):
        step = p1 - p0
        length2 = float(step @ step) or 1.0
        t = np.clip(((yy - p0[0]) * step[0] + (xx - p0[1]) * step[1]) / length2, 0, 1)
        distance = np.hypot(yy - p0[0] - t * step[0], xx - p0[1] - t * step[1])
        window |= distance <= r0 + t * (r1 - r0)
    return mask


def _blob(shape, centre, radius, elongation, angle, roughness, rng) -> np.ndarray:
    """A filled, slightly irregular oval: the radius wobbles with a few low harmonics."""
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    dy, dx = yy - centre[0], xx - centre[1]
    along = dx * np.cos(angle) + dy * np.sin(angle)
    across = -dx * np.sin(angle) + dy * np.cos(angle)
    theta = np.arctan2(across, along)
    wobble = sum(rng.normal(0, roughness) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
                 for k in (2, 3, 5))
    return np.hypot(along / elongation, across * elongation**0.5) <= radius * (1 + wobble)


def _eroded(mask: np.ndarray, pixels: int) -> np.ndarray:
    square = np.ones((3, 3), np.uint8)
    return cv2.erode(mask.astype(np.uint8), square, iterations=pixels).astype(bool)


def _granule_field(shape, rng, per_100_px: float, radius_px: float) -> np.ndarray:
    """Granules as soft dots, `per_100_px` of them per 100 pixels, each about `radius_px` in
    radius; 1 at a granule's core, 0 between granules."""
    points = (rng.random(shape) < per_100_px / 100.0).astype(np.float32)
    field = cv2.GaussianBlur(points, (0, 0), radius_px)
    return np.clip(field * 2 * np.pi * radius_px**2 * 0.8, 0, 1)
