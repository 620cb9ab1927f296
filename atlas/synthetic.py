"""Synthetic stained-smear-like white-cell images: the embedded default for the demo and tests.

Each class has its own morphology, drawn at the scale of real CellaVision crops (about
0.1 um per pixel, a white cell 90-150 px across) on a cream background with red cells around:
- neutrophil:  3-4 small lobes joined in a chain, lilac granular cytoplasm;
- lymphocyte:  one large round nucleus, a thin pale-blue rim of cytoplasm, a small cell;
- monocyte:    a kidney-shaped nucleus, a large grey-blue cytoplasm;
- eosinophil:  two lobes, cytoplasm full of orange-red granules.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.draw import disk, ellipse

CLASSES = ("neutrophil", "lymphocyte", "monocyte", "eosinophil")

_BACKGROUND = np.array([238, 226, 206], dtype=np.float32)
_RED_CELL = np.array([222, 170, 175], dtype=np.float32)
_NUCLEUS = np.array([88, 50, 130], dtype=np.float32)
_CYTOPLASM = {
    "neutrophil": np.array([214, 190, 214], dtype=np.float32),
    "lymphocyte": np.array([170, 185, 225], dtype=np.float32),
    "monocyte": np.array([180, 175, 205], dtype=np.float32),
    "eosinophil": np.array([230, 150, 120], dtype=np.float32),
}


def synthetic_cell(label: str, rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """One RGB uint8 image of a white cell of class `label`, centred with some jitter."""
    if label not in CLASSES:
        raise ValueError(f"unknown synthetic class {label!r}; choose from {CLASSES}")
    img = np.tile(_BACKGROUND * rng.uniform(0.96, 1.03), (size, size, 1))
    _draw_red_cells(img, rng, size)
    centre = np.array([size / 2, size / 2]) + rng.uniform(-12, 12, 2)
    radius = {"neutrophil": 60, "lymphocyte": 42, "monocyte": 70, "eosinophil": 62}[label]
    radius *= rng.uniform(0.9, 1.1)
    cell = np.zeros((size, size), bool)
    cell[ellipse(*centre, radius, radius * rng.uniform(0.9, 1.0), (size, size),
                 rotation=rng.uniform(0, np.pi))] = True
    nucleus = _nucleus(label, centre, radius, rng, size) & cell
    img[cell] = _CYTOPLASM[label] * rng.uniform(0.95, 1.05)
    if label in ("neutrophil", "eosinophil"):
        _granules(img, cell & ~nucleus, rng, label)
    img[nucleus] = _NUCLEUS * rng.uniform(0.85, 1.1)
    img = ndimage.gaussian_filter(img, sigma=(1.2, 1.2, 0))
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_synthetic_archive(root: Path, per_class: int = 40, seed: int = 0, size: int = 256) -> Path:
    """Write `per_class` PNG images per class into `root/<class>/` (ImageFolder layout)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for label in CLASSES:
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(synthetic_cell(label, rng, size)).save(root / label / f"{label}_{i:04d}.png")
    return root


def _draw_red_cells(img: np.ndarray, rng: np.random.Generator, size: int) -> None:
    for _ in range(rng.integers(4, 9)):
        r, c = rng.uniform(0, size, 2)
        if np.hypot(r - size / 2, c - size / 2) < 80:
            continue  # keep the white cell clear
        rr, cc = disk((r, c), rng.uniform(28, 36), shape=(size, size))
        img[rr, cc] = _RED_CELL * rng.uniform(0.95, 1.05)
        rr, cc = disk((r, c), 12, shape=(size, size))
        img[rr, cc] = (img[rr, cc] + _BACKGROUND) / 2  # the pale centre of a red cell


def _nucleus(label, centre, radius, rng, size) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    angle = rng.uniform(0, 2 * np.pi)
    direction = np.array([np.cos(angle), np.sin(angle)])
    if label == "lymphocyte":
        mask[disk(centre, radius * 0.82, shape=mask.shape)] = True
    elif label == "monocyte":
        mask[ellipse(*centre, radius * 0.6, radius * 0.5, mask.shape, rotation=angle)] = True
        bite = centre + direction * radius * 0.5
        mask[disk(bite, radius * 0.35, shape=mask.shape)] = False
    else:
        lobes = rng.integers(3, 5) if label == "neutrophil" else 2
        lobe_r = radius * (0.26 if label == "neutrophil" else 0.33)
        start = centre - direction * lobe_r * (lobes - 1) * 0.8
        for i in range(lobes):
            wobble = rng.normal(0, lobe_r * 0.35, 2)
            lobe_centre = start + direction * lobe_r * 1.6 * i + wobble
            mask[disk(lobe_centre, lobe_r, shape=mask.shape)] = True
        mask = ndimage.binary_closing(mask, iterations=3)
    return mask


def _granules(img, region, rng, label) -> None:
    rows, cols = np.nonzero(region)
    if len(rows) == 0:
        return
    count = len(rows) // (25 if label == "eosinophil" else 60)
    pick = rng.integers(0, len(rows), count)
    colour = np.array([205, 80, 60] if label == "eosinophil" else [150, 100, 160], np.float32)
    img[rows[pick], cols[pick]] = colour
