"""Images with expert masks (255 nucleus, 128 cytoplasm, 0 background, the wbc_seg convention)
and expert boxes (Pascal VOC): reading and checking them for training and scoring.

`find_mask_sets` / `read_mask_sets` read one set (`images/` + `masks/`) or a root of sets,
each at its own um per pixel, and check every pair (size mismatch, unexpected mask values,
empty masks, missing files: the message names the files). Training (`cellpose_training.py`)
and scoring (`scoring.py`) both read through them.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from atlas.cell import CYTOPLASM, NUCLEUS, REFERENCE_UM_PER_PIXEL
from atlas.ingest import IMAGE_SUFFIXES, ImageReadError, read_image_bytes

MAX_ODD_MASK_FRACTION = 0.01  # mask pixels outside {0, 128, 255} snapped when at most this share
MASK_VALUES = (0, CYTOPLASM, NUCLEUS)

log = logging.getLogger(__name__)


class TrainingDataError(ValueError):
    """Images and masks cannot be used for training or evaluation; the message names the files."""


@dataclass
class MaskSet:
    name: str
    images: Path
    masks: Path


@dataclass
class Sample:
    set: str
    stem: str
    image: np.ndarray  # RGB uint8
    mask: np.ndarray  # uint8, values in MASK_VALUES
    um_per_pixel: float


def find_mask_sets(images_dir: str | Path, masks_dir: str | Path | None = None) -> list[MaskSet]:
    """One set (`images_dir` with `masks_dir`), or, without `masks_dir`, the sets under a root:
    `images_dir/images` + `images_dir/masks`, or every sub-folder holding both (wbc_seg/tecom,
    wbc_seg/cellavision). A set is named after its folder."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"image folder {images_dir} does not exist")
    if masks_dir is not None:
        masks_dir = Path(masks_dir)
        if not masks_dir.is_dir():
            raise FileNotFoundError(f"mask folder {masks_dir} does not exist")
        name = images_dir.parent.name if images_dir.name == "images" else images_dir.name
        return [MaskSet(name, images_dir, masks_dir)]
    if (images_dir / "images").is_dir() and (images_dir / "masks").is_dir():
        return [MaskSet(images_dir.name, images_dir / "images", images_dir / "masks")]
    sets = [MaskSet(p.name, p / "images", p / "masks") for p in sorted(images_dir.iterdir())
            if (p / "images").is_dir() and (p / "masks").is_dir()]
    if not sets:
        raise TrainingDataError(
            f"{images_dir} holds no masks: give the mask folder too, or a folder whose sub-folders "
            "each hold images/ and masks/ (like wbc_seg/tecom)")
    return sets


def set_scales(um_per_pixel: float | dict[str, float] | None, names: list[str]) -> dict[str, float]:
    """um per pixel of each set: one value for all, or one per set name. None: the reference
    scale (0.1 um/px), said in a warning because cell diameters in um then rest on a guess."""
    if um_per_pixel is None:
        log.warning("no um per pixel given: assuming %s for %s", REFERENCE_UM_PER_PIXEL,
                    ", ".join(names))
        return {name: REFERENCE_UM_PER_PIXEL for name in names}
    if isinstance(um_per_pixel, dict):
        unknown = sorted(set(um_per_pixel) - set(names))
        if unknown:
            raise ValueError(f"um per pixel given for unknown set(s) {', '.join(unknown)}; "
                             f"the sets are {', '.join(names)}")
        missing = [name for name in names if name not in um_per_pixel]
        if missing:
            raise ValueError(f"no um per pixel for set(s) {', '.join(missing)}: give each set its "
                             f"scale ({', '.join(f'{n}=X' for n in names)})")
        scales = {name: float(um_per_pixel[name]) for name in names}
    else:
        scales = {name: float(um_per_pixel) for name in names}
    bad = {name: v for name, v in scales.items() if not v > 0}
    if bad:
        raise ValueError(f"um per pixel must be positive, got {bad}")
    return scales


def read_mask_sets(sets: list[MaskSet], scales: dict[str, float],
                   only: set[tuple[str, str]] | None = None) -> tuple[list[Sample], list[str]]:
    """Every image with its mask, validated. Returns the samples and notes on masks whose few
    stray values were snapped; raises TrainingDataError naming every file that cannot be used
    (missing mask, size mismatch, values other than 0/128/255, empty mask, unreadable file).
    `only`: restrict to these (set, stem) pairs."""
    samples, notes = [], []
    problems: dict[str, list[str]] = {}
    for mask_set in sets:
        files = sorted(p for p in mask_set.images.iterdir()
                       if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        if only is not None:
            files = [p for p in files if (mask_set.name, p.stem) in only]
        if not files and only is None:
            problems.setdefault("no images", []).append(str(mask_set.images))
        masks = {p.stem: p for p in mask_set.masks.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
        for image_path in files:
            where = f"{mask_set.name}/{image_path.name}"
            mask_path = masks.get(image_path.stem)
            if mask_path is None:
                problems.setdefault("missing mask", []).append(where)
                continue
            try:
                image = read_image_bytes(image_path.read_bytes())
                mask = np.asarray(Image.open(mask_path))
            except (ImageReadError, OSError) as error:
                problems.setdefault("unreadable", []).append(f"{where} ({error})")
                continue
            if mask.ndim == 3:
                if not (mask == mask[..., :1]).all():
                    problems.setdefault("colour mask (need one channel)", []).append(where)
                    continue
                mask = mask[..., 0]
            if mask.shape != image.shape[:2]:
                problems.setdefault("size mismatch", []).append(
                    f"{where} (image {image.shape[1]}x{image.shape[0]}, "
                    f"mask {mask.shape[1]}x{mask.shape[0]})")
                continue
            odd = ~np.isin(mask, MASK_VALUES)
            if odd.any():
                values = ", ".join(str(v) for v in np.unique(mask[odd])[:6])
                if odd.mean() > MAX_ODD_MASK_FRACTION:
                    problems.setdefault("unexpected mask values", []).append(f"{where} ({values})")
                    continue
                mask = snap_mask(mask)
                notes.append(
                    f"{where}: {int(odd.sum())} pixels of value {values} snapped to 0/128/255")
            mask = mask.astype(np.uint8)
            if not mask.any():
                problems.setdefault("empty mask (no cell)", []).append(where)
                continue
            samples.append(
                Sample(mask_set.name, image_path.stem, image, mask, scales[mask_set.name]))
    if problems:
        raise TrainingDataError("; ".join(
            f"{kind}: {len(files)} file(s): "
            f"{', '.join(files[:5])}{' ...' if len(files) > 5 else ''}"
            for kind, files in problems.items())
            + " (masks: one PNG per image with the same name, same size, 0 background,"
              " 128 cytoplasm, 255 nucleus)")
    return samples, notes


def snap_mask(mask: np.ndarray) -> np.ndarray:
    """Each value to the nearest of 0 / 128 / 255 (stray annotation values, e.g. 7 or 45, are
    background)."""
    levels = np.array(MASK_VALUES)
    return levels[np.abs(mask[..., None].astype(int) - levels).argmin(-1)].astype(np.uint8)


def cell_diameters_px(mask: np.ndarray) -> list[float]:
    """Equivalent-disc diameter of every white cell (connected part of mask > 0)."""
    labels, count = ndimage.label(mask > 0)
    areas = np.bincount(labels.ravel())[1:]
    return [float(2 * np.sqrt(a / np.pi)) for a in areas if a > 0]


def split_held_out(samples: list[Sample], fraction: float, seed: int
                   ) -> tuple[list[Sample], list[Sample]]:
    """(train, held out): `fraction` of each set, drawn with `seed`; at least one image of every
    set of two or more when fraction > 0."""
    if not 0 <= fraction < 1:
        raise ValueError(f"holdout must be a fraction in [0, 1), got {fraction}")
    train, held = [], []
    rng = np.random.default_rng(seed)
    for name in sorted({s.set for s in samples}):
        members = [s for s in samples if s.set == name]
        order = rng.permutation(len(members))
        if fraction == 0 or len(members) < 2:
            count = 0
        else:
            count = min(len(members) - 1, max(1, round(fraction * len(members))))
        held += [members[i] for i in sorted(order[:count])]
        train += [members[i] for i in sorted(order[count:])]
    return train, held


def voc_boxes(path: Path, label: str) -> list[tuple[int, int, int, int]]:
    """Boxes named `label` in a Pascal VOC file, as (row0, col0, row1, col1), row1/col1
    exclusive."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as error:
        raise TrainingDataError(f"{path} is not valid XML ({error})") from None
    boxes = []
    for item in root.iter("object"):
        if (item.findtext("name") or "").strip() != label:
            continue
        box = item.find("bndbox")
        try:
            x0, y0, x1, y1 = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (AttributeError, TypeError, ValueError):
            raise TrainingDataError(f"{path}: an object {label!r} has no complete bndbox") from None
        # VOC pixels are 1-based, inclusive
        boxes.append((int(y0) - 1, int(x0) - 1, int(y1), int(x1)))
    return boxes
