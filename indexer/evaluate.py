"""Evaluate a published atlas on labelled images that were not in its build.

Measures: classification accuracy and macro-F1; precision@8 of the reference cells (share of
the 8 with the query's label); majority-of-8 accuracy; share flagged and accuracy on the
unflagged; and the core design's rotation check (ROTMES): rotated and mirrored copies of
archived images should find that cell (or its duplicate group) first.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.metrics import accuracy_score, f1_score

from atlas.cell import SegmentationError
from atlas.classifier import classifier_input
from atlas.colour import background_colour
from atlas.ingest import ImageReadError, IngestError, list_images, read_image_bytes
from atlas.prepare import prepare_cells
from atlas.progress import progress as progress_bar
from atlas.reference import LoadedAtlas
from atlas.scale import check_um_per_pixel

K = 8


def evaluate(home: Path, images: Path, rotmes_per_class: int = 50, seed: int = 0,
             progress: bool = True, um_per_pixel: float | None = None) -> dict:
    """The measures above on the labelled images of `images`, taken at `um_per_pixel` (None:
    the atlas's scale; resampled to it before segmentation, as an upload is)."""
    if um_per_pixel is not None:
        check_um_per_pixel(um_per_pixel)  # before every image fails for the same reason
    atlas = LoadedAtlas.open(home)
    records = [r for r in list_images(images) if r.label is not None]
    if not records:
        raise IngestError(f"no labelled images in {images}: evaluation needs one sub-folder per class")
    started = time.perf_counter()
    queries, labels, failed = [], [], Counter()
    for record in progress_bar(records, progress, desc="prepare", unit="img"):
        try:
            image = read_image_bytes(record.path.read_bytes())
            queries.append(atlas.prepare(image, um_per_pixel))
            labels.append(record.label)
        except (ImageReadError, SegmentationError) as error:
            failed[str(error).split(" (")[0]] += 1
    latents = atlas.embedder.embed([q.crop for q in queries], show_progress=progress)
    predictions = atlas.classifier.predict(classifier_input(np.stack([q.features for q in queries]), latents))
    predicted, flagged = predictions.labels, predictions.flagged
    _, positions = atlas.index.search(latents, K)
    neighbour_labels = atlas.labels[positions]
    labels_arr = np.array(labels, dtype=object)
    precision = (neighbour_labels == labels_arr[:, None]).mean(1)
    majority = np.array([Counter(row).most_common(1)[0][0] for row in neighbour_labels])
    known = np.isin(labels_arr, atlas.classes)
    result = {
        "atlas_version": atlas.version,
        "images_um_per_pixel": um_per_pixel or atlas.um_per_pixel,
        "images": len(records),
        "evaluated": len(queries),
        "failed": dict(failed),
        "labels_not_in_atlas": sorted(set(labels_arr[~known])),
        "accuracy": float(accuracy_score(labels_arr[known], predicted[known])),
        "macro_f1": float(f1_score(labels_arr[known], predicted[known], average="macro")),
        "precision_at_8": float(precision[known].mean()),
        "majority_of_8_accuracy": float((majority[known] == labels_arr[known]).mean()),
        "share_flagged": float(flagged.mean()),
        "accuracy_unflagged": float((predicted[known & ~flagged] == labels_arr[known & ~flagged]).mean())
        if (known & ~flagged).any() else None,
        "accuracy_flagged": float((predicted[known & flagged] == labels_arr[known & flagged]).mean())
        if (known & flagged).any() else None,
        "flag_threshold_bits": atlas.flag_bits,
        "per_class": {
            c: {"images": int((labels_arr == c).sum()),
                "accuracy": float((predicted[labels_arr == c] == c).mean()) if (labels_arr == c).any() else None,
                "precision_at_8": float(precision[labels_arr == c].mean()) if (labels_arr == c).any() else None}
            for c in sorted(set(labels_arr))
        },
        "seconds_per_image": (time.perf_counter() - started) / max(1, len(records)),
    }
    result["rotation_invariance"] = rotation_check(atlas, rotmes_per_class, seed, progress)
    return result


def rotation_check(atlas: LoadedAtlas, per_class: int, seed: int, progress: bool) -> dict:
    """ROTMES: for up to `per_class` archived main cells per class, a rotated (random angle),
    a horizontally and a vertically flipped copy of the source image go through the whole
    pipeline; a copy passes when its first reference is the cell or one of its duplicates."""
    rng = np.random.default_rng(seed)
    cells = atlas.cells[atlas.cells["cell_index"] == 0]
    picked = []
    for _, group in cells.groupby(cells["label"].fillna("(unlabelled)")):
        picked += list(rng.choice(group.index.to_numpy(), min(per_class, len(group)), replace=False))
    crops, owners, kinds = [], [], []
    for position in progress_bar(picked, progress, desc="rotation check", unit="cell"):
        try:
            image = read_image_bytes(Path(atlas.cells.at[position, "source_path"]).read_bytes())
        except (OSError, ImageReadError):
            continue  # the source file moved since the build
        pil = Image.fromarray(image)
        angle = float(rng.uniform(10, 350))
        copies = {
            "rotated": pil.rotate(angle, resample=Image.BILINEAR, fillcolor=tuple(int(v) for v in background_colour(image))),
            "flipped_horizontal": pil.transpose(Image.FLIP_LEFT_RIGHT),
            "flipped_vertical": pil.transpose(Image.FLIP_TOP_BOTTOM),
        }
        for kind, copy in copies.items():
            try:
                crops.append(prepare_cells(np.asarray(copy), atlas.segmenter, atlas.um_per_pixel)[0].crop)
            except SegmentationError:
                continue
            owners.append(position)
            kinds.append(kind)
    if not crops:
        return {"copies": 0}
    latents = atlas.embedder.embed(crops, show_progress=progress)
    _, first = atlas.index.search(latents, 1)
    found = np.array([int(f) in atlas.excluded_positions(o) for f, o in zip(first[:, 0], owners)])
    rotmes = float(((latents - atlas.latents[owners]) ** 2).mean())
    kinds_arr = np.array(kinds)
    return {
        "cells": len(set(owners)),
        "copies": len(crops),
        "found_first": float(found.mean()),
        "found_first_by_transform": {k: float(found[kinds_arr == k].mean()) for k in sorted(set(kinds))},
        "rotmes_mse": rotmes,
    }

