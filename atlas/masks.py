"""Images with expert masks (255 nucleus, 128 cytoplasm, 0 background, the wbc_seg convention)
and how well a segmenter reproduces them.

Data: `find_mask_sets` / `read_mask_sets` read one set (`images/` + `masks/`) or a root of sets,
each at its own um per pixel, and check every pair (size mismatch, unexpected mask values,
empty masks, missing files: the message names the files). Training (`atlas/cellpose_segmenter.py`)
and evaluation both read through them.

Evaluation: `evaluate_segmenter` / `evaluate_mask_sets` (Dice and IoU of the main cell and its
nucleus) and `evaluate_boxes` (recall and precision of found cells against Pascal VOC boxes, as
in the BCCD smear fields).
"""

from __future__ import annotations

import logging
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from atlas.ingest import IMAGE_SUFFIXES, ImageReadError, read_image_bytes
from atlas.segment import CYTOPLASM, NUCLEUS, REFERENCE_UM_PER_PIXEL, Segmenter, load_segmenter

MAX_ODD_MASK_FRACTION = 0.01  # mask pixels outside {0, 128, 255} snapped when at most this share
MASK_VALUES = (0, CYTOPLASM, NUCLEUS)

log = logging.getLogger(__name__)


class TrainingDataError(ValueError):
    """Images and masks cannot be used for training or evaluation; the message names the files."""


# -- sets of images with masks --------------------------------------------------------------
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
        log.warning("no um per pixel given: assuming %s for %s", REFERENCE_UM_PER_PIXEL, ", ".join(names))
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


def read_mask_sets(sets: list[MaskSet], scales: dict[str, float], only: set[tuple[str, str]] | None = None
                   ) -> tuple[list[Sample], list[str]]:
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
                    f"{where} (image {image.shape[1]}x{image.shape[0]}, mask {mask.shape[1]}x{mask.shape[0]})")
                continue
            odd = ~np.isin(mask, MASK_VALUES)
            if odd.any():
                values = ", ".join(str(v) for v in np.unique(mask[odd])[:6])
                if odd.mean() > MAX_ODD_MASK_FRACTION:
                    problems.setdefault("unexpected mask values", []).append(f"{where} ({values})")
                    continue
                mask = snap_mask(mask)
                notes.append(f"{where}: {int(odd.sum())} pixels of value {values} snapped to 0/128/255")
            mask = mask.astype(np.uint8)
            if not mask.any():
                problems.setdefault("empty mask (no cell)", []).append(where)
                continue
            samples.append(Sample(mask_set.name, image_path.stem, image, mask, scales[mask_set.name]))
    if problems:
        raise TrainingDataError("; ".join(
            f"{kind}: {len(files)} file(s): {', '.join(files[:5])}{' ...' if len(files) > 5 else ''}"
            for kind, files in problems.items())
            + " (masks: one PNG per image with the same name, same size, 0 background, 128 cytoplasm, 255 nucleus)")
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


def split_held_out(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(train, held out): `fraction` of each set, drawn with `seed`; at least one image of every
    set of two or more when fraction > 0."""
    if not 0 <= fraction < 1:
        raise ValueError(f"holdout must be a fraction in [0, 1), got {fraction}")
    train, held = [], []
    rng = np.random.default_rng(seed)
    for name in sorted({s.set for s in samples}):
        members = [s for s in samples if s.set == name]
        order = rng.permutation(len(members))
        count = 0 if fraction == 0 or len(members) < 2 else min(len(members) - 1, max(1, round(fraction * len(members))))
        held += [members[i] for i in sorted(order[:count])]
        train += [members[i] for i in sorted(order[count:])]
    return train, held


# -- evaluation -----------------------------------------------------------------------------
def evaluate_segmenter(segmenter: Segmenter, images_dir: str | Path, masks_dir: str | Path,
                       only: set[str] | None = None) -> dict:
    """Dice and IoU of the main cell (mask > 0) and its nucleus (mask == 255) on images with
    masks, and time per image. `only`: image stems to use (e.g. a model's held-out images)."""
    (mask_set,) = find_mask_sets(images_dir, masks_dir)
    samples, _ = read_mask_sets([mask_set], {mask_set.name: segmenter.um_per_pixel},
                                only={(mask_set.name, stem) for stem in only} if only is not None else None)
    return summary(evaluate_samples(segmenter, samples), segmenter)


def evaluate_mask_sets(spec: str | Path | None, images_dir: str | Path, masks_dir: str | Path | None,
                       um_per_pixel: float | dict[str, float] | None = None,
                       held_out_of: str | Path | None = None) -> dict:
    """`evaluate_segmenter` over one set or a root of sets, each at its own scale; the segmenter
    is `load_segmenter(spec)`. `held_out_of`: a trained model folder; only the images it held
    out in training are used (so that two segmenters can be compared on the same images).
    Without `um_per_pixel`, sets a trained model knows keep their training scale."""
    sets = find_mask_sets(images_dir, masks_dir)
    names = [s.name for s in sets]
    from atlas.cellpose_segmenter import read_config  # a trained model's scales and held-out images

    models = [read_config(Path(m)) for m in (spec, held_out_of) if m not in (None, "classical")]
    known = next((c["sets"] for c in models if all(n in c["sets"] for n in names)), None)
    if um_per_pixel is None and known:
        um_per_pixel = {n: known[n]["um_per_pixel"] for n in names}
    scales = set_scales(um_per_pixel, names)
    only = None
    if held_out_of is not None:
        only = {tuple(item.split("/", 1)) for item in read_config(Path(held_out_of)).get("held_out", [])}
        if not any(set_name in names for set_name, _ in only):
            raise ValueError(f"{held_out_of} held out no images of set(s) {', '.join(names)}")
    samples, notes = read_mask_sets(sets, scales, only=only)
    rows = []
    for mask_set in sets:
        segmenter = load_segmenter(spec, scales[mask_set.name])
        rows += evaluate_samples(segmenter, [s for s in samples if s.set == mask_set.name])
    result = summary(rows, segmenter)
    result["mask_notes"] = notes
    return result


def evaluate_samples(segmenter: Segmenter, samples: list[Sample]) -> list[dict]:
    rows = []
    for sample in samples:
        started = time.perf_counter()
        regions = segmenter.segment(sample.image)
        seconds = time.perf_counter() - started
        main = regions[0] if regions else None
        cell = main.cell if main else np.zeros(sample.mask.shape, bool)
        nucleus = main.nucleus if main else cell
        rows.append({"set": sample.set, "image": sample.stem, "cells_found": len(regions),
                     "cell_dice": dice(cell, sample.mask > 0), "cell_iou": iou(cell, sample.mask > 0),
                     "nucleus_dice": dice(nucleus, sample.mask == NUCLEUS),
                     "nucleus_iou": iou(nucleus, sample.mask == NUCLEUS),
                     "ms": round(1000 * seconds, 1), "um_per_pixel": segmenter.um_per_pixel})
    return rows


METRICS = ("cell_dice", "cell_iou", "nucleus_dice", "nucleus_iou", "ms")


def summary(rows: list[dict], segmenter: Segmenter | None = None) -> dict:
    def means(chosen):
        return {"images": len(chosen), "no_cell_found": sum(r["cells_found"] == 0 for r in chosen),
                **{f"mean_{m}": float(np.mean([r[m] for r in chosen])) if chosen else None for m in METRICS}}

    result = {"segmenter": segmenter.name if segmenter else None, **means(rows)}
    result["sets"] = {name: {"um_per_pixel": next(r["um_per_pixel"] for r in rows if r["set"] == name),
                             **means([r for r in rows if r["set"] == name])}
                      for name in sorted({r["set"] for r in rows})}
    result["per_image"] = rows
    return result


def dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    total = predicted.sum() + truth.sum()
    return 1.0 if total == 0 else float(2 * (predicted & truth).sum() / total)


def iou(predicted: np.ndarray, truth: np.ndarray) -> float:
    union = (predicted | truth).sum()
    return 1.0 if union == 0 else float((predicted & truth).sum() / union)


def evaluate_boxes(segmenter: Segmenter, images_dir: str | Path, annotations_dir: str | Path,
                   iou_threshold: float = 0.5, label: str = "WBC") -> dict:
    """Recall and precision of the cells found against Pascal VOC boxes named `label`: a found
    cell's box matches at most one annotated box (greedy by IoU, IoU >= `iou_threshold`)."""
    images_dir, annotations_dir = Path(images_dir), Path(annotations_dir)
    for folder, what in ((images_dir, "image"), (annotations_dir, "annotation")):
        if not folder.is_dir():
            raise FileNotFoundError(f"{what} folder {folder} does not exist")
    images = {p.stem: p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    annotations = sorted(annotations_dir.glob("*.xml"))
    if not annotations:
        raise TrainingDataError(f"no Pascal VOC .xml annotations in {annotations_dir}")
    rows, missing = [], []
    for path in annotations:
        image_path = images.get(path.stem)
        if image_path is None:
            missing.append(path.name)
            continue
        truth = voc_boxes(path, label)
        image = read_image_bytes(image_path.read_bytes())
        started = time.perf_counter()
        found = [r.bbox for r in segmenter.segment(image)]
        seconds = time.perf_counter() - started
        rows.append({"image": image_path.name, "annotated": len(truth), "found": len(found),
                     "matched": len(match_boxes(found, truth, iou_threshold)), "ms": round(1000 * seconds, 1)})
    if not rows:
        raise TrainingDataError(f"none of the annotations in {annotations_dir} has its image in {images_dir}")
    annotated, found, matched = (sum(r[k] for r in rows) for k in ("annotated", "found", "matched"))
    return {"segmenter": segmenter.name, "um_per_pixel": segmenter.um_per_pixel, "label": label,
            "iou_threshold": iou_threshold, "images": len(rows), "annotations_without_image": missing,
            "annotated": annotated, "found": found, "matched": matched,
            "recall": matched / annotated if annotated else None,
            "precision": matched / found if found else None,
            "mean_ms": float(np.mean([r["ms"] for r in rows])), "per_image": rows}


def voc_boxes(path: Path, label: str) -> list[tuple[int, int, int, int]]:
    """Boxes named `label` in a Pascal VOC file, as (row0, col0, row1, col1), row1/col1 exclusive."""
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
        boxes.append((int(y0) - 1, int(x0) - 1, int(y1), int(x1)))  # VOC pixels are 1-based, inclusive
    return boxes


def box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    rows = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    cols = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = rows * cols
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match_boxes(found, truth, threshold: float) -> list[tuple[int, int]]:
    """One-to-one pairs (found index, truth index), greedy from the highest IoU."""
    pairs = sorted(((box_iou(f, t), i, j) for i, f in enumerate(found) for j, t in enumerate(truth)), reverse=True)
    used_found, used_truth, matches = set(), set(), []
    for overlap, i, j in pairs:
        if overlap < threshold:
            break
        if i not in used_found and j not in used_truth:
            used_found.add(i)
            used_truth.add(j)
            matches.append((i, j))
    return matches
