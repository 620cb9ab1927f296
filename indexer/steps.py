"""The steps of a build, as functions over explicit inputs and outputs, shared by build,
add and rebuild. None of them edits a table it was given: each
returns what it made, and the job that calls it decides where the result goes.

    prepare_images     ingest + segment + crop + describe + hash, in worker processes (or Ray actors)
    prepare_archived   the same for cells archived through the API (from their stored uploads)
    with_archive       a build's cells with the API-archived cells joined, withdrawn ones left out
    relabel            the corrections log over the folder labels
    deduplicate        average hash, FAISS binary index, same-class groups
    assign_splits      train / validation for the backbone, duplicate groups kept together
    train_backbone     Xception trained as a classifier
    train_vae          the VAE over the tapped features (with the backbone: the Embedder)
    train_som          batch SOM, best node and distance per cell
    project            2-D UMAP
    train_classifier   XGBoost on features + latent, out-of-fold predictions, calibration
    calibrate_novelty  the archive's own leave-one-out nearest-neighbour scores
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import train_test_split

from atlas.archive import Archive, cell_row, save_crop
from atlas.archive import prediction_columns as archive_prediction_columns
from atlas.backbone import PRESETS, Backbone
from atlas.catalog import Catalog
from atlas.cell import SegmentationError
from atlas.classifier import CellClassifier, Predictions, classifier_input
from atlas.crop import model_input
from atlas.dedup import find_duplicates
from atlas.ingest import ImageReadError, ImageRecord, Rejection, content_hash, read_image_bytes
from atlas.labels import corrected_labels
from atlas.novelty import NoveltyScorer
from atlas.prepare import prepare_cells
from atlas.progress import progress
from atlas.projection import umap_projection
from atlas.runtime import resolve_device
from atlas.scale import to_scale
from atlas.segmentation import Segmenter
from atlas.som import BatchSOM, grid_shape_for, standard_scale
from atlas.vae import VAE
from indexer.config import BuildConfig, BuildError


# -- ingest, segment, describe ----------------------------------------------------------------
@dataclass
class PreparedImages:
    cells: pd.DataFrame  # one row per cell: ids, source, label, box, crop path, hashes, features
    model_inputs: np.ndarray  # (cells, S, S, 3) uint8: each crop as the backbone sees it
    rejections: list[Rejection]


def prepare_images(records: list[ImageRecord], segmenter: Segmenter, config: BuildConfig,
                   map_images: MapImages | None = None) -> PreparedImages:
    """Read, hash, segment, crop and describe every image; crops are written under ATLAS_HOME
    (content-addressed, shared by versions). Identical files are ingested once; the rest of the
    repeats are rejected with the first file named. `map_images` runs the per-image work
    (default: worker processes of this machine, `in_processes`; a Ray engine passes its own)."""
    work = ImageWork(segmenter, config.um_per_pixel, PRESETS[config.preset].input_size, str(config.home))
    results = (map_images or in_processes(config.threads))(work, records)
    rows, crops, rejections, seen = [], [], [], {}
    for record, result in progress(zip(records, results), config.progress, total=len(records),
                                   desc="segment", unit="img"):
        path, label = str(record.path), record.label
        if isinstance(result, str):
            rejections.append(Rejection(path, result))
            continue
        sha = result[0][0]["source_sha256"]
        if sha in seen:
            first_path, first_label = seen[sha]
            conflict = f" (labelled {first_label!r} there, {label!r} here)" if first_label != label else ""
            rejections.append(Rejection(path, f"identical file already ingested: {first_path}{conflict}"))
            continue
        seen[sha] = (path, label)
        for row, crop in result:
            rows.append(row)
            crops.append(crop)
    if not rows:
        raise BuildError(f"none of the {len(records)} images gave a cell; reasons: {count_reasons(rejections)}")
    return PreparedImages(pd.DataFrame(rows), np.stack(crops), rejections)


@dataclass(frozen=True)
class ImageWork:
    """What every image of a job is prepared with; `work(path, label)` prepares one. Picklable:
    it travels to worker processes or to Ray actors."""

    segmenter: Segmenter
    um_per_pixel: float
    input_size: int
    home: str

    def __call__(self, path: str, label: str | None,
                 um_per_pixel: float | None = None) -> list[tuple[dict, np.ndarray]] | str:
        """One image (taken at `um_per_pixel`; None: the job's scale) -> list of (row,
        model-size crop), or the reason it was rejected. An image at another scale is resampled
        to the job's before segmentation, as an upload is."""
        try:
            data = Path(path).read_bytes()
        except OSError as error:
            return f"cannot read file ({error.strerror or error})"
        try:
            image = to_scale(read_image_bytes(data), um_per_pixel, self.um_per_pixel)
            # A class folder's label names the image's main cell; an unlabelled image (a smear
            # field) gives every white cell found, each indexed as its own cell.
            prepared = prepare_cells(image, self.segmenter, self.um_per_pixel, all_cells=label is None)
        except (ImageReadError, SegmentationError) as error:
            return str(error)
        sha = content_hash(data)
        out = []
        for cell in prepared:
            cell_id = f"{sha[:16]}-{cell.index}"
            crop = save_crop(self.home, self.segmenter.name, cell_id, cell)
            row = _unplaced(cell_row(cell_id, cell, os.path.abspath(path), sha, label, crop))
            out.append(({**row, "um_per_pixel": um_per_pixel}, model_input([cell.crop], self.input_size)[0]))
        return out


# work(path, label) applied to every record, results yielded in the records' order
MapImages = Callable[[ImageWork, list[ImageRecord]], Iterator]


def in_processes(threads: int) -> MapImages:
    """The local engine's per-image map: `threads` worker processes of this machine."""
    def map_images(work: ImageWork, records: list[ImageRecord]) -> Iterator:
        with ProcessPoolExecutor(max_workers=max(1, threads), initializer=_worker_init) as pool:
            yield from pool.map(work, [str(r.path) for r in records], [r.label for r in records],
                                [r.um_per_pixel for r in records], chunksize=16)
    return map_images


def _worker_init() -> None:
    torch.set_num_threads(1)


def prepare_archived(archive: Archive, archived: list[dict], segmenter: Segmenter,
                     config: BuildConfig) -> PreparedImages:
    """Cells archived one at a time (rows of `Archive.fold_candidates`), prepared again from
    their stored uploads by this job's segmenter at the job's scale, keeping their ids and
    confirmed labels; an upload that no longer gives a cell is a rejection."""
    input_size = PRESETS[config.preset].input_size
    rows, crops, rejections = [], [], []
    for entry in archived:
        try:
            prepared = archive.prepared_again(entry, segmenter, config.um_per_pixel)
        except (OSError, ImageReadError, SegmentationError) as error:
            rejections.append(Rejection(entry["image_path"], f"archived cell {entry['cell_id']}: {error}"))
            continue
        crop = save_crop(config.home, segmenter.name, entry["cell_id"], prepared)
        row = cell_row(entry["cell_id"], prepared, str(Path(config.home) / entry["image_path"]),
                       entry["cell"]["source_sha256"], entry["label"], crop)
        rows.append(_unplaced(row))
        crops.append(model_input([prepared.crop], input_size)[0])
    columns = None if rows else ["cell_id", "label", "source_sha256", "ahash", "fine_hash", "source_path"]
    return PreparedImages(pd.DataFrame(rows, columns=columns),
                          np.stack(crops) if crops else np.zeros((0, input_size, input_size, 3), np.uint8),
                          rejections)


def _unplaced(row: dict) -> dict:
    """A cell's row as the prepare step gives it: without what the job decides later (its
    folder label, duplicate group and split)."""
    return {key: value for key, value in row.items() if key not in ("folder_label", "duplicate_group", "split")}


def with_archive(prepared: PreparedImages, archive: Archive, segmenter: Segmenter, config: BuildConfig,
                 archived: list[dict] | None = None) -> tuple[PreparedImages, dict]:
    """A build's prepared images with the archive's events applied: cells archived one at a
    time joined in (`archived`, default every one not withdrawn; those already among the images
    skipped) and withdrawn cells left out. Returns them and the manifest's summary."""
    withdrawn = archive.withdrawn()
    if archived is None:
        archived = [a for a in archive.catalog.archived_cells(pending_only=False) if a["cell_id"] not in withdrawn]
    known = set(prepared.cells["cell_id"])
    extra = prepare_archived(archive, [a for a in archived if a["cell_id"] not in known], segmenter, config)
    cells = pd.concat([prepared.cells, extra.cells], ignore_index=True) if len(extra.cells) else prepared.cells
    inputs = np.concatenate([prepared.model_inputs, extra.model_inputs])
    keep = ~cells["cell_id"].isin(withdrawn).to_numpy()
    summary = {"archived_cells_folded": [str(c) for c in extra.cells.get("cell_id", [])],
               "withdrawn_left_out": int((~keep).sum())}
    return PreparedImages(cells[keep].reset_index(drop=True), inputs[keep],
                          prepared.rejections + extra.rejections), summary


def count_reasons(rejections: list[Rejection]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for rejection in rejections:
        key = rejection.reason.split(" (")[0].split(":")[0]
        counts[key] = counts.get(key, 0) + 1
    return counts


# -- labels -------------------------------------------------------------------------------------
def relabel(cell_ids, folder_labels, catalog: Catalog, previous_labels=None) -> tuple[np.ndarray, dict]:
    """Technologists' corrections (latest per cell wins) over the folder labels. Read once, at
    the start: corrections made while the job runs wait for the next one. Returns the labels
    and what the manifest records (with `previous_labels`, a parent version's, how many the
    corrections changed since)."""
    through, corrections = catalog.effective_labels()
    labels, corrected = corrected_labels(cell_ids, folder_labels, corrections)
    known = set(cell_ids)
    summary = {
        "applied_through_correction_id": through,
        "cells_relabelled": int(corrected.sum()),
        "corrections_for_cells_not_in_version": sum(1 for cell_id in corrections if cell_id not in known),
    }
    if previous_labels is not None:
        before = pd.Series(previous_labels, dtype=object).fillna("\0").to_numpy()
        summary["labels_changed_since_parent"] = int((before != pd.Series(labels, dtype=object).fillna("\0").to_numpy()).sum())
    return labels, summary


def classes_of(labels: np.ndarray) -> list[str]:
    return sorted({label for label in labels if label is not None and label == label})


# -- deduplicate ----------------------------------------------------------------------------------
def deduplicate(cell_ids, ahashes, fine_hashes, labels) -> tuple[np.ndarray, dict]:
    """Each cell's duplicate group (named by its first cell, so that ids are stable and
    readable) and the manifest's summary (groups, pairs at 3 bits to review)."""
    hashes = np.array([int(h, 16) for h in ahashes], dtype=np.uint64)
    result = find_duplicates(hashes, list(fine_hashes), list(labels))
    ids = np.asarray(cell_ids, dtype=object)
    groups = pd.Series(ids).groupby(result.group).transform("first").to_numpy()
    sizes = pd.Series(result.group).value_counts()
    return groups, {
        "groups_with_duplicates": int((sizes > 1).sum()),
        "cells_in_duplicate_groups": int(sizes[sizes > 1].sum()),
        "pairs_to_review": [{"a": ids[i], "b": ids[j], "bits": d} for i, j, d in result.review_pairs[:1000]],
        "pairs_to_review_total": len(result.review_pairs),
    }


# -- embed -----------------------------------------------------------------------------------------
def assign_splits(labels: np.ndarray, groups: np.ndarray, classes: list[str], val_fraction: float,
                  seed: int) -> np.ndarray:
    """'train' / 'val' for labelled cells (stratified, duplicate groups kept together so that
    validation is honest); None for unlabelled cells."""
    labels = np.asarray(labels, dtype=object)
    split = np.array([None] * len(labels), dtype=object)
    labelled = np.flatnonzero(pd.notna(labels))
    group_ids, first = np.unique(np.asarray(groups)[labelled], return_index=True)
    group_labels = labels[labelled][first]
    counts = pd.Series(group_labels).value_counts()
    can_stratify = counts.min() >= 2 and val_fraction * len(group_ids) >= len(classes)
    if val_fraction <= 0 or len(group_ids) < 4:
        split[labelled] = "train"
        return split
    _, val_groups = train_test_split(group_ids, test_size=val_fraction, random_state=seed,
                                     stratify=group_labels if can_stratify else None)
    split[labelled] = np.where(np.isin(np.asarray(groups)[labelled], val_groups), "val", "train")
    return split


def train_backbone(model_inputs: np.ndarray, labels: np.ndarray, split: np.ndarray, classes: list[str],
                   config: BuildConfig) -> Backbone:
    class_index = {c: i for i, c in enumerate(classes)}
    y = np.array([class_index.get(v, -1) for v in labels])
    train, val = split == "train", split == "val"
    backbone = Backbone(config.preset, epochs=config.epochs, seed=config.seed, device=config.device,
                        pretrained=config.pretrained, stain_jitter=config.stain_jitter)
    return backbone.fit(model_inputs[train], y[train], classes, model_inputs[val], y[val],
                        progress=config.progress)


def train_vae(tapped: np.ndarray, config: BuildConfig) -> VAE:
    return VAE(latent_dim=config.latent_dim, epochs=config.vae_epochs, seed=config.seed).fit(
        tapped, progress=config.progress)


# -- map ---------------------------------------------------------------------------------------------
# The map is trained on at most this many cells (a random sample, the seed's); every cell still
# gets its best node. A batch SOM's epoch costs O(cells x nodes): at 1M cells and 244x244 nodes
# about 2.6 CPU-minutes per epoch (extrapolated from bench som: 61,710 cells, 10 epochs,
# 96 CPU-s), and a million cells already give each node of the largest map 17 cells.
SOM_TRAIN_SAMPLE = 1_000_000


def train_som(latents: np.ndarray, config: BuildConfig,
              best_nodes: Callable[[BatchSOM, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None,
              ) -> tuple[BatchSOM, np.ndarray, np.ndarray]:
    """The map (it learns its own input scaling; trained on at most SOM_TRAIN_SAMPLE cells),
    each cell's best node (n, 2) and its distance to that node. `best_nodes(som, latents)`
    computes the last two (default: here, `som_best_nodes`; a Ray engine passes its own)."""
    sample = latents
    if len(latents) > SOM_TRAIN_SAMPLE:
        chosen = np.random.default_rng(config.seed).choice(len(latents), SOM_TRAIN_SAMPLE, replace=False)
        sample = latents[np.sort(chosen)]
    mean, std = standard_scale(sample)
    rows, cols = config.som_shape or grid_shape_for((sample - mean) / std)
    device = resolve_device("cpu" if config.device == "cpu" else "auto").type
    som = BatchSOM(rows, cols, epochs=config.som_epochs, seed=config.seed, device=device).fit(sample)
    return (som, *(best_nodes or som_best_nodes)(som, latents))


def som_best_nodes(som: BatchSOM, latents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each cell's best node (n, 2) and its distance to that node."""
    return som.winners(latents), som.node_distances(latents)


def project(latents: np.ndarray, seed: int) -> np.ndarray:
    return umap_projection(latents, seed=seed)


# -- classify ----------------------------------------------------------------------------------------
def train_classifier(features: np.ndarray, latents: np.ndarray, labels: np.ndarray, split: np.ndarray,
                     classes: list[str], config: BuildConfig) -> tuple[CellClassifier, Predictions, dict]:
    """The classifier, every cell's prediction (out-of-fold for labelled cells: from a model
    that did not see the cell; the final model's for unlabelled ones; calibrated, with its
    prediction set at `config.coverage`) and the manifest's summary."""
    x = classifier_input(features, latents)
    labelled = pd.notna(np.asarray(labels, dtype=object))
    class_index = {c: i for i, c in enumerate(classes)}
    y = np.array([class_index[v] for v in np.asarray(labels, dtype=object)[labelled]])
    classifier = CellClassifier(flag_entropy=config.flag_entropy, seed=config.seed, threads=config.threads,
                                coverage=config.coverage)
    classifier.fit(x[labelled], y, classes)
    proba = np.zeros((len(x), len(classes)))
    proba[labelled] = classifier.out_of_fold_proba_
    if (~labelled).any():
        proba[~labelled] = classifier.predict_proba(x[~labelled])
    predictions = classifier.predictions(proba)
    correct = classifier.out_of_fold_proba_.argmax(1) == y
    val = (np.asarray(split, dtype=object) == "val")[labelled]
    return classifier, predictions, {
        "flag_threshold_bits": classifier.flag_bits_,
        "flag_threshold_auto": classifier.flag_choice_,
        "out_of_fold_accuracy": float(correct.mean()),
        "out_of_fold_accuracy_val_split": float(correct[val].mean()) if val.any() else None,
        "share_flagged": float(predictions.flagged.mean()),
        "flag": "prediction set of more or less than one class",
        "calibration": classifier.calibration_.summary,
    }


def calibrate_novelty(index, latents: np.ndarray, duplicate_groups, entropy_bits) -> NoveltyScorer:
    """The archive's own leave-one-out novelty scores (duplicate groups left out) and
    classifier entropies, against which a query's novelty p-value is computed."""
    return NoveltyScorer().fit(index, latents, duplicate_groups, entropy_bits=entropy_bits)


def prediction_columns(predictions: Predictions) -> dict:
    """The cells table's columns for the predictions."""
    return archive_prediction_columns(predictions)
