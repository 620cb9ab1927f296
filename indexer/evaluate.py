"""Evaluate a published atlas on labelled images that were not in its build.

Measures: classification accuracy and macro-F1; precision@8 of the reference cells (share of
the 8 with the query's label); majority-of-8 accuracy; share flagged and accuracy on the
unflagged; the uncertainty (empirical coverage and mean size of the prediction sets at 95%,
99% and the atlas's own coverage, which for "auto" is the level chosen out-of-fold, overall and
per class; share of the misclassified cells flagged; expected calibration error before and
after temperature scaling); novelty (scores and share novel; with images of classes the atlas
lacks, the AUROC of the novelty score between those and the known classes and the share of
them flagged at 5% false alarms); and
the core design's rotation check (ROTMES): rotated and mirrored copies of archived images
should find that cell (or its duplicate group) first.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from atlas.calibration import expected_calibration_error
from atlas.cell import SegmentationError
from atlas.classifier import classifier_input
from atlas.colour import background_colour
from atlas.ingest import ImageReadError, IngestError, class_folders, list_images, read_image_bytes
from atlas.prepare import prepare_cells
from atlas.progress import progress as progress_bar
from atlas.reference import LoadedAtlas
from atlas.scale import check_um_per_pixel

K = 8
COVERAGE_LEVELS = (0.95, 0.99)  # reported besides the atlas's own
FALSE_ALARMS = 0.05  # known-class cells flagged novel, where the share of unknown ones flagged is read


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
    folder_labels = sorted({r.label for r in records})
    if not set(folder_labels) & set(atlas.classes):  # before any image is worked on
        raise IngestError(
            f"none of the labels in {images} ({', '.join(map(repr, folder_labels))}) is a class of the atlas "
            f"({', '.join(atlas.classes)}): name the sub-folders after the atlas's classes")
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
    raw_probabilities = atlas.classifier.predict_proba(classifier_input(np.stack([q.features for q in queries]), latents))
    predictions = atlas.classifier.predictions(raw_probabilities)
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
    result["uncertainty"] = uncertainty(atlas.classifier, raw_probabilities, labels_arr)
    result["novelty"] = novelty(atlas, latents, labels_arr, predictions.entropy_bits)
    result["rotation_invariance"] = rotation_check(atlas, rotmes_per_class, seed, progress)
    return result


def uncertainty(classifier, raw_probabilities: np.ndarray, labels: np.ndarray) -> dict:
    """Calibration of the probabilities and the prediction sets, on the cells of known classes."""
    known = np.isin(labels, classifier.classes_)
    if not known.any():
        return {"cells": 0}
    raw, labels = raw_probabilities[known], labels[known]
    truth = np.array([classifier.classes_.index(label) for label in labels])
    calibration = getattr(classifier, "calibration_", None)
    result = {"cells": int(len(labels)), "calibrated": calibration is not None,
              "ece_before": expected_calibration_error(raw, truth)}
    if calibration is None:
        result["note"] = "classifier saved before calibration: no prediction sets, entropy flag"
        return result
    result["temperature"] = calibration.temperature
    result["ece_after"] = expected_calibration_error(calibration.probabilities(raw), truth)
    result["default_coverage"] = calibration.coverage  # the level used ("auto": the one chosen out-of-fold)
    result["coverage_requested"] = calibration.summary.get("coverage_requested", calibration.coverage)
    choice = calibration.summary.get("coverage_choice")
    if choice:  # how "auto" chose, on the out-of-fold cells only
        result["coverage_choice"] = {key: choice[key] for key in ("chosen", "met", "reason", "at_chosen")}
    result["levels"] = {}
    for level in sorted({*COVERAGE_LEVELS, calibration.coverage}):
        result["levels"][f"{level:g}"] = set_measures(classifier.predictions(raw, coverage=level), truth, labels)
    return result


def set_measures(predictions, truth: np.ndarray, labels: np.ndarray) -> dict:
    """Empirical coverage, mean set size, flags and what they catch, overall and per class."""
    sets = predictions.sets
    covered = sets[np.arange(len(truth)), truth]
    size = sets.sum(1)
    wrong = predictions.labels != labels
    flagged = predictions.flagged

    def measures(rows) -> dict:
        return {"cells": int(rows.sum()), "coverage": float(covered[rows].mean()),
                "mean_set_size": float(size[rows].mean()), "share_flagged": float(flagged[rows].mean()),
                "share_empty": float((size[rows] == 0).mean())}

    every = np.ones(len(truth), bool)
    return {**measures(every), "misclassified": int(wrong.sum()),
            "misclassified_flagged": float(flagged[wrong].mean()) if wrong.any() else None,
            "accuracy_unflagged": float((~wrong[~flagged]).mean()) if (~flagged).any() else None,
            "per_class": {c: measures(labels == c) for c in sorted(set(labels))}}


def novelty(atlas: LoadedAtlas, latents: np.ndarray, labels: np.ndarray, entropy_bits: np.ndarray) -> dict:
    """Novelty of the evaluated cells (distance, combined with their classifier `entropy_bits`
    where the version's scorer is); with cells of classes the atlas lacks, how well the novelty
    statistic tells them from the known classes (AUROC; share flagged at 5% false alarms)."""
    scorer = atlas.novelty_scorer
    if scorer is None:
        return {"note": "version built before novelty was calibrated"}
    scores = np.array([scorer.score(atlas.index, latent[None]) for latent in latents], dtype=float)
    statistic = scorer.statistic(scores, entropy_bits)
    p_values = scorer.p_values(scores, entropy_bits)
    novel = p_values < scorer.level
    unknown = ~np.isin(labels, atlas.classes)
    result = {"k": scorer.k, "level": scorer.level, "combined_with_entropy": scorer.combined,
              "median_score": float(np.median(scores)),
              "archive_median_score": float(np.median(scorer.reference_scores_)),
              "share_novel": float(novel.mean()),
              "share_novel_known_classes": float(novel[~unknown].mean()) if (~unknown).any() else None}
    if unknown.any() and (~unknown).any():
        threshold = float(np.quantile(statistic[~unknown], 1 - FALSE_ALARMS))
        result["unknown_classes"] = {
            c: {"cells": int((labels == c).sum()),
                "auroc": float(roc_auc_score(np.r_[np.zeros((~unknown).sum()), np.ones((labels == c).sum())],
                                             np.r_[statistic[~unknown], statistic[labels == c]])),
                "share_flagged_at_5pct_false_alarms": float((statistic[labels == c] > threshold).mean()),
                "share_novel": float(novel[labels == c].mean())}
            for c in sorted(set(labels[unknown]))}
        result["auroc_mean"] = float(np.mean([v["auroc"] for v in result["unknown_classes"].values()]))
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



def evaluate_novelty(config, test_images: Path, leave_out: list[str], progress: bool = True) -> dict:
    """Leave one class out, for each class of `leave_out` in turn ("each": every class folder
    of the training images): build an atlas (`config`, a BuildConfig whose images hold one
    sub-folder per class) from every class but that one, in its own ATLAS_HOME
    `config.home`/without-CLASS, then evaluate it on `test_images`: the left-out class's cells
    are novel, the other classes' are not. Returns each class's novelty figures (AUROC, share
    flagged at 5% false alarms, share novel) with that build's accuracy, and their means."""
    from dataclasses import replace

    from indexer.build import build

    images, test_images = Path(config.images), Path(test_images)
    classes = [folder.name for folder in class_folders(images)]
    leave_out = classes if list(leave_out) == ["each"] else list(dict.fromkeys(leave_out))
    for name in leave_out:  # every class checked before the first build
        for folder in (images, test_images):
            if not (folder / name).is_dir():
                raise IngestError(f"{folder} has no sub-folder {name!r} to leave out")
    if len(classes) < 3:
        raise IngestError(f"{images} has {len(classes)} class folders: leaving one out needs at least 3")
    found = {}
    for name in leave_out:
        home = Path(config.home) / f"without-{name}"
        kept = home / "inputs" / "images"
        kept.mkdir(parents=True, exist_ok=True)
        for other in classes:
            link = kept / other
            if other != name and not link.exists():
                link.symlink_to((images / other).resolve(), target_is_directory=True)
        built = build(replace(config, images=kept, home=home))
        result = evaluate(home, test_images, rotmes_per_class=0, progress=progress)
        unknown = result["novelty"].get("unknown_classes", {}).get(name, {})
        found[name] = {"home": str(home), "atlas_version": built.version,
                       "accuracy_known_classes": result["accuracy"],
                       "precision_at_8_known_classes": result["precision_at_8"],
                       "share_novel_known_classes": result["novelty"].get("share_novel_known_classes"),
                       **unknown}
    means = {f"{key}_mean": float(np.mean([v[key] for v in found.values()]))
             for key in ("auroc", "share_flagged_at_5pct_false_alarms", "share_novel", "share_novel_known_classes")
             if all(v.get(key) is not None for v in found.values())}
    return {"train_images": str(images), "test_images": str(test_images), "left_out": found, **means}
