"""How well a segmenter reproduces expert masks and boxes: Dice and IoU of the main cell and its
nucleus against masks (`evaluate_segmenter`, `evaluate_mask_sets`), recall and precision of the
cells found against Pascal VOC boxes (`evaluate_boxes`, as in the BCCD smear fields).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from atlas.cell import NUCLEUS
from atlas.ingest import IMAGE_SUFFIXES, read_image_bytes
from atlas.segmentation import Segmenter, load_segmenter
from atlas.segmentation.mask_sets import (
    Sample,
    TrainingDataError,
    find_mask_sets,
    read_mask_sets,
    set_scales,
    voc_boxes,
)
from atlas.segmentation.model_folder import read_config


def evaluate_segmenter(segmenter: Segmenter, images_dir: str | Path, masks_dir: str | Path,
                       only: set[str] | None = None) -> dict:
    """Dice and IoU of the main cell (mask > 0) and its nucleus (mask == 255) on images with
    masks, and time per image. `only`: image stems to use (e.g. a model's held-out images)."""
    (mask_set,) = find_mask_sets(images_dir, masks_dir)
    chosen = {(mask_set.name, stem) for stem in only} if only is not None else None
    samples, _ = read_mask_sets([mask_set], {mask_set.name: segmenter.um_per_pixel}, only=chosen)
    return summary(evaluate_samples(segmenter, samples), segmenter)


def evaluate_mask_sets(spec: str | Path | None, images_dir: str | Path,
                       masks_dir: str | Path | None,
                       um_per_pixel: float | dict[str, float] | None = None,
                       held_out_of: str | Path | None = None) -> dict:
    """`evaluate_segmenter` over one set or a root of sets, each at its own scale; the segmenter
    is `load_segmenter(spec)`. `held_out_of`: a trained model folder; only the images it held
    out in training are used (so that two segmenters can be compared on the same images).
    Without `um_per_pixel`, sets a trained model knows keep their training scale."""
    sets = find_mask_sets(images_dir, masks_dir)
    names = [s.name for s in sets]
    models = [read_config(Path(m)) for m in (spec, held_out_of) if m not in (None, "classical")]
    known = next((c["sets"] for c in models if all(n in c["sets"] for n in names)), None)
    if um_per_pixel is None and known:
        um_per_pixel = {n: known[n]["um_per_pixel"] for n in names}
    scales = set_scales(um_per_pixel, names)
    only = None
    if held_out_of is not None:
        held_out = read_config(Path(held_out_of)).get("held_out", [])
        only = {tuple(item.split("/", 1)) for item in held_out}
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
    """One row per sample: cells found, Dice and IoU of the main cell and its nucleus, ms."""
    rows = []
    for sample in samples:
        started = time.perf_counter()
        regions = segmenter.segment(sample.image)
        seconds = time.perf_counter() - started
        main = regions[0] if regions else None
        cell = main.cell if main else np.zeros(sample.mask.shape, bool)
        nucleus = main.nucleus if main else cell
        rows.append({"set": sample.set, "image": sample.stem, "cells_found": len(regions),
                     "cell_dice": dice(cell, sample.mask > 0),
                     "cell_iou": iou(cell, sample.mask > 0),
                     "nucleus_dice": dice(nucleus, sample.mask == NUCLEUS),
                     "nucleus_iou": iou(nucleus, sample.mask == NUCLEUS),
                     "ms": round(1000 * seconds, 1), "um_per_pixel": segmenter.um_per_pixel})
    return rows


METRICS = ("cell_dice", "cell_iou", "nucleus_dice", "nucleus_iou", "ms")


def summary(rows: list[dict], segmenter: Segmenter | None = None) -> dict:
    """The mean of every metric over all rows and over each set's rows, with the rows."""
    def means(chosen):
        return {"images": len(chosen), "no_cell_found": sum(r["cells_found"] == 0 for r in chosen),
                **{f"mean_{m}": float(np.mean([r[m] for r in chosen])) if chosen else None
                   for m in METRICS}}

    result = {"segmenter": segmenter.name if segmenter else None, **means(rows)}
    result["sets"] = {
        name: {"um_per_pixel": next(r["um_per_pixel"] for r in rows if r["set"] == name),
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
                     "matched": len(match_boxes(found, truth, iou_threshold)),
                     "ms": round(1000 * seconds, 1)})
    if not rows:
        raise TrainingDataError(
            f"none of the annotations in {annotations_dir} has its image in {images_dir}")
    annotated, found, matched = (sum(r[k] for r in rows) for k in ("annotated", "found", "matched"))
    return {"segmenter": segmenter.name, "um_per_pixel": segmenter.um_per_pixel, "label": label,
            "iou_threshold": iou_threshold, "images": len(rows),
            "annotations_without_image": missing,
            "annotated": annotated, "found": found, "matched": matched,
            "recall": matched / annotated if annotated else None,
            "precision": matched / found if found else None,
            "mean_ms": float(np.mean([r["ms"] for r in rows])), "per_image": rows}


def box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    rows = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    cols = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = rows * cols
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match_boxes(found, truth, threshold: float) -> list[tuple[int, int]]:
    """One-to-one pairs (found index, truth index), greedy from the highest IoU."""
    pairs = sorted(((box_iou(f, t), i, j) for i, f in enumerate(found)
                    for j, t in enumerate(truth)), reverse=True)
    used_found, used_truth, matches = set(), set(), []
    for overlap, i, j in pairs:
        if overlap < threshold:
            break
        if i not in used_found and j not in used_truth:
            used_found.add(i)
            used_truth.add(j)
            matches.append((i, j))
    return matches
