"""The atlas build job: from a folder of cell images to a published, searchable atlas version.

The steps run in this order, each a function below (timed, with progress):
  1 ingest + 2 segment + 3 describe  (one pass per image, in worker processes)
  4 deduplicate   average hash, FAISS binary index
  5 embed         Xception backbone trained as a classifier, feature tap, VAE latent
  6 index         FAISS over the latents
  7 map           batch SOM + U-matrix + UMAP projection
  8 classify      XGBoost on features + latent, entropy, flag
  9 publish       versioned directory, `current` switched atomically
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from sklearn.model_selection import train_test_split
from tqdm import tqdm

from atlas import __version__
from atlas.backbone import PRESETS, Backbone
from atlas.catalog import Catalog
from atlas.cells import model_input, prepare_cells
from atlas.classify import DEFAULT_FLAG_BITS, CellClassifier, choose_flag_threshold, entropy_bits
from atlas.dedup import find_duplicates
from atlas.features import FEATURE_NAMES, RANGES_FILE, save_class_ranges
from atlas.ingest import ImageReadError, Rejection, content_hash, list_images, read_image_bytes
from atlas.projection import umap_projection
from atlas.search import LatentIndex
from atlas.segment import REFERENCE_UM_PER_PIXEL, SegmentationError, load_segmenter
from atlas.som import BatchSOM, grid_shape_for
from atlas.store import AtlasStore
from atlas.vae import VAE

SEGMENTER_DIR = "models/segmenter"  # a version's copy of its trained segmenter, if any


class BuildError(RuntimeError):
    """Nothing can be built from the input; the message says why and what to do."""


def default_threads() -> int:
    """All cores this process may use: on 2 cores, 2 torch threads train 1.5x faster than 1
    (measured: 47 s vs 69 s per epoch of the cpu preset on 7,500 cells)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass
class BuildConfig:
    images: Path
    home: Path
    preset: str = "cpu"
    epochs: int | None = None  # backbone epochs; None = the preset's
    latent_dim: int = 50
    vae_epochs: int = 40
    som_shape: tuple[int, int] | None = None  # None = rule of thumb from the archive size
    som_epochs: int = 30
    val_fraction: float = 0.1
    flag_entropy: float | str = DEFAULT_FLAG_BITS  # bits, or "auto" (chosen on held-out cells)
    um_per_pixel: float = REFERENCE_UM_PER_PIXEL
    segmenter: str | None = None  # a folder from `cellatlas segmenter train`; None = classical
    seed: int = 0
    threads: int = field(default_factory=default_threads)
    device: str = "auto"
    pretrained: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.segmenter == "classical":  # how manifests name it (rebuilds read them back)
            self.segmenter = None


@dataclass
class BuildResult:
    version: str
    manifest: dict
    version_dir: Path


def build(config: BuildConfig) -> BuildResult:
    """Run every step and publish a new version. Raises BuildError where nothing can be built;
    on any failure the staging folder is removed and the live version is untouched."""
    if config.preset not in PRESETS:
        raise BuildError(f"unknown preset {config.preset!r}; choose from {', '.join(PRESETS)}")
    torch.set_num_threads(config.threads)
    records = list_images(config.images)  # fails early, before anything is written
    segmenter = load_segmenter(config.segmenter, config.um_per_pixel)  # so does a bad model folder
    store = AtlasStore(config.home)
    store.clean_stale_staging()
    timings: dict[str, float] = {}
    log = _Log(config.progress)
    job_id = f"build-{uuid.uuid4().hex[:12]}"
    catalog = Catalog(config.home)
    catalog.start_job(job_id, "build")
    staging = None
    try:
        log(f"found {len(records)} images in {config.images}")
        log(f"segmenter: {segmenter.name} from {config.segmenter}" if config.segmenter else
            "segmenter: classical thresholds (give --segmenter MODEL to use a trained cellpose model)")
        with _timed(timings, "ingest_segment_describe"):
            cells, model_crops, rejections = ingest_and_prepare(records, config, store, segmenter)
        corrections = apply_corrections(cells, catalog)
        labelled = cells["label"].notna().to_numpy()
        classes = sorted(cells.loc[labelled, "label"].unique())
        if len(classes) < 2:
            raise BuildError(
                f"need labelled cells of at least 2 classes to train the backbone, found "
                f"{len(classes)} ({', '.join(classes) or 'none'}): put images in one sub-folder per class")
        log(f"{len(cells)} cells from {len(cells) - len(rejections)} images; {len(rejections)} rejected; "
            f"classes: {', '.join(classes)}")
        staging = store.new_staging()
        with _timed(timings, "deduplicate"):
            duplicates = deduplicate(cells)
        with _timed(timings, "split"):
            cells["split"] = assign_splits(cells, classes, config)
        with _timed(timings, "train_backbone"):
            backbone = train_backbone(cells, model_crops, classes, config)
        with _timed(timings, "embed"):
            tapped = backbone.embed(model_crops, progress=config.progress)
        with _timed(timings, "train_vae"):
            vae = VAE(latent_dim=config.latent_dim, epochs=config.vae_epochs, seed=config.seed)
            vae.fit(tapped, progress=config.progress)
            latents = vae.transform(tapped)
        with _timed(timings, "index"):
            index = LatentIndex.build(latents)
        with _timed(timings, "som"):
            som, som_scale = train_som(cells, latents, config)
        with _timed(timings, "umap"):
            projection = umap_projection(latents, seed=config.seed)
            cells["umap_x"], cells["umap_y"] = projection[:, 0], projection[:, 1]
        with _timed(timings, "classify"):
            classifier, classification = train_classifier(cells, latents, classes, config)
        with _timed(timings, "write"):
            backbone.save(staging / "models" / "backbone.pt")
            vae.save(staging / "models" / "vae.pt")
            classifier.save(staging / "models" / "classifier.json")
            if config.segmenter:  # the version re-creates its segmenter from this copy alone
                shutil.copytree(config.segmenter, staging / SEGMENTER_DIR, ignore=shutil.ignore_patterns(".*"))
            index.save(staging / "index.faiss")
            np.save(staging / "latents.npy", latents)
            np.savez(staging / "som.npz", **som.to_arrays(), u_matrix=som.u_matrix(),
                     latent_mean=som_scale[0], latent_std=som_scale[1])
            cells.to_parquet(staging / "cells.parquet", index=False)
            write_feature_ranges(staging, cells, classes)
            pd.DataFrame([asdict(r) for r in rejections], columns=["path", "reason"]).to_parquet(
                staging / "rejections.parquet", index=False)
        manifest = {
            "cellatlas": __version__,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "inputs": {"images": str(Path(config.images).resolve()), "image_files": len(records),
                       "cells": int(len(cells)), "rejected": len(rejections),
                       "rejections_by_reason": _count_reasons(rejections)},
            "parameters": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
                           "backbone_preset": asdict(backbone.preset),
                           "segmenter": str(Path(config.segmenter).resolve()) if config.segmenter else "classical",
                           "crop_size": 256, "feature_names": list(FEATURE_NAMES)},
            "segmenter": {"kind": "cellpose" if config.segmenter else "classical", "name": segmenter.name,
                          "path": SEGMENTER_DIR if config.segmenter else None,
                          "ms_per_cell": round(float(cells["segment_ms"].mean()), 1)},
            "classes": classes,
            "counts_by_class": {str(k): int(v) for k, v in cells["label"].value_counts(dropna=False).items()},
            "corrections": corrections,
            "duplicates": duplicates,
            "backbone": {"history": backbone.history_, "feature_dim": backbone.feature_dim},
            "vae": {"final": vae.history_[-1] if vae.history_ else None, "whiten_dim": vae.whiten_dim,
                    "whitened_components": None if vae.projection_ is None else int(vae.projection_.shape[1])},
            "som": {"rows": som.rows, "cols": som.cols, "epochs": config.som_epochs,
                    "quantization_error": som.quantization_error_, "topographic_error": som.topographic_error_},
            "classifier": classification,
            "timings_s": timings,
            "job_id": job_id,
        }
        with _timed(timings, "publish"):
            version = store.publish(staging, manifest)
        catalog.update_job(job_id, state="succeeded", version=version)
        log(summary(version, manifest))
        return BuildResult(version, store.manifest(version), store.version_dir(version))
    except BaseException as error:  # KeyboardInterrupt too: never leave a half version behind
        if staging is not None:
            store.discard(staging)
        catalog.update_job(job_id, state="failed", message=f"{type(error).__name__}: {error}"[:2000])
        raise


def write_feature_ranges(folder: Path, cells: pd.DataFrame, classes: list[str]) -> None:
    """Each class's 2nd/50th/98th feature percentiles under the cells' labels, for the viewer's
    "this cell against its class" (builds and rebuilds)."""
    save_class_ranges(folder / RANGES_FILE, cells[list(FEATURE_NAMES)].to_numpy(np.float32),
                      cells["label"].to_numpy(dtype=object), classes)


# -- step 1-3: ingest, segment, describe ----------------------------------------------------
def ingest_and_prepare(records, config: BuildConfig, store: AtlasStore, segmenter=None):
    """Read, hash, segment, crop and describe every image in worker processes.
    Returns the cells table, the crops at the backbone's input size, and the rejections."""
    segmenter = segmenter or load_segmenter(config.segmenter, config.um_per_pixel)
    crop_dir = store.crop_dir(segmenter.name)
    input_size = PRESETS[config.preset].input_size
    jobs = [(str(r.path), r.label, segmenter, config.um_per_pixel, input_size, str(crop_dir)) for r in records]
    rows, crops, rejections, seen = [], [], [], {}
    workers = max(1, config.threads)
    with ProcessPoolExecutor(max_workers=workers, initializer=_worker_init) as pool:
        results = pool.map(_prepare_file, jobs, chunksize=16)
        for (path, label, *_), result in tqdm(zip(jobs, results), total=len(jobs), desc="segment",
                                              disable=not config.progress, unit="img"):
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
        reasons = _count_reasons(rejections)
        raise BuildError(f"none of the {len(records)} images gave a cell; reasons: {reasons}")
    cells = pd.DataFrame(rows)
    return cells, np.stack(crops), rejections


def _worker_init() -> None:
    torch.set_num_threads(1)


def _prepare_file(job):
    """One image -> list of (row, model-size crop), or the reason it was rejected."""
    path, label, segmenter, um_per_pixel, input_size, crop_dir = job
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        return f"cannot read file ({error.strerror or error})"
    try:
        image = read_image_bytes(data)
        # A class folder's label names the image's main cell; an unlabelled image (a smear field)
        # gives every white cell found, each indexed as its own cell.
        prepared = prepare_cells(image, segmenter, um_per_pixel, all_cells=label is None)
    except (ImageReadError, SegmentationError) as error:
        return str(error)
    sha = content_hash(data)
    out = []
    for cell in prepared:
        cell_id = f"{sha[:16]}-{cell.index}"
        crop_path = Path(crop_dir) / cell_id[:2] / f"{cell_id}.jpg"
        crop_path.parent.mkdir(parents=True, exist_ok=True)
        if not crop_path.exists():
            _save_atomic(Image.fromarray(cell.crop.image), crop_path, quality=92)
            _save_atomic(Image.fromarray(cell.crop.mask), crop_path.with_suffix(".mask.png"))
        r0, c0, r1, c1 = cell.crop.bbox
        row = {"cell_id": cell_id, "source_path": path, "source_sha256": sha, "cell_index": cell.index,
               "label": label, "bbox": [r0, c0, r1, c1], "crop_path": str(crop_path),
               "ahash": f"{cell.ahash:016x}", "fine_hash": cell.fine_hash, "segment_ms": round(cell.segment_ms, 2),
               **{name: float(v) for name, v in zip(FEATURE_NAMES, cell.features)}}
        out.append((row, model_input([cell.crop], input_size)[0]))
    return out


def _save_atomic(image: Image.Image, path: Path, **options) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    image.save(tmp, format="JPEG" if path.suffix == ".jpg" else "PNG", **options)
    os.replace(tmp, path)


def apply_corrections(cells: pd.DataFrame, catalog: Catalog) -> dict:
    """Technologists' corrections (latest per cell wins) replace folder labels. Read once, at
    the start: corrections made while this build runs are kept for the next one."""
    through, corrected = catalog.effective_labels()
    cells["folder_label"] = cells["label"]
    hits = cells["cell_id"].isin(corrected.keys()).to_numpy()
    cells.loc[hits, "label"] = cells.loc[hits, "cell_id"].map(corrected)
    return {"applied_through_correction_id": through, "cells_relabelled": int(hits.sum())}


# -- step 4: deduplicate ----------------------------------------------------------------------
def deduplicate(cells: pd.DataFrame) -> dict:
    hashes = np.array([int(h, 16) for h in cells["ahash"]], dtype=np.uint64)
    result = find_duplicates(hashes, cells["fine_hash"].tolist(), cells["label"].tolist())
    # Name a group by its first cell, so that group ids are stable and readable.
    first = pd.Series(cells["cell_id"].to_numpy()).groupby(result.group).transform("first")
    cells["duplicate_group"] = first.to_numpy()
    ids = cells["cell_id"].to_numpy()
    sizes = pd.Series(result.group).value_counts()
    return {
        "groups_with_duplicates": int((sizes > 1).sum()),
        "cells_in_duplicate_groups": int(sizes[sizes > 1].sum()),
        "pairs_to_review": [{"a": ids[i], "b": ids[j], "bits": d} for i, j, d in result.review_pairs[:1000]],
        "pairs_to_review_total": len(result.review_pairs),
    }


# -- step 5: embed ----------------------------------------------------------------------------
def assign_splits(cells: pd.DataFrame, classes: list[str], config: BuildConfig) -> np.ndarray:
    """'train' / 'val' for labelled cells (stratified, duplicate groups kept together so that
    validation is honest); None for unlabelled cells."""
    split = np.array([None] * len(cells), dtype=object)
    labelled = np.flatnonzero(cells["label"].notna().to_numpy())
    groups = cells["duplicate_group"].to_numpy()[labelled]
    group_ids, first = np.unique(groups, return_index=True)
    group_labels = cells["label"].to_numpy()[labelled][first]
    counts = pd.Series(group_labels).value_counts()
    can_stratify = counts.min() >= 2 and config.val_fraction * len(group_ids) >= len(classes)
    if config.val_fraction <= 0 or len(group_ids) < 4:
        split[labelled] = "train"
        return split
    _, val_groups = train_test_split(group_ids, test_size=config.val_fraction, random_state=config.seed,
                                     stratify=group_labels if can_stratify else None)
    split[labelled] = np.where(np.isin(groups, val_groups), "val", "train")
    return split


def train_backbone(cells, model_crops, classes, config: BuildConfig) -> Backbone:
    class_index = {c: i for i, c in enumerate(classes)}
    train = (cells["split"] == "train").to_numpy()
    val = (cells["split"] == "val").to_numpy()
    labels = np.array([class_index.get(v, -1) for v in cells["label"]])
    backbone = Backbone(config.preset, epochs=config.epochs, seed=config.seed, device=config.device,
                        pretrained=config.pretrained)
    return backbone.fit(model_crops[train], labels[train], classes, model_crops[val], labels[val],
                        progress=config.progress)


# -- step 7: map --------------------------------------------------------------------------------
def train_som(cells, latents, config: BuildConfig):
    mean, std = latents.mean(0), latents.std(0) + 1e-6
    scaled = (latents - mean) / std
    rows, cols = config.som_shape or grid_shape_for(scaled)
    device = "cuda" if config.device != "cpu" and torch.cuda.is_available() else "cpu"
    som = BatchSOM(rows, cols, epochs=config.som_epochs, seed=config.seed, device=device).fit(scaled)
    nodes = som.winners(scaled)
    cells["som_row"], cells["som_col"] = nodes[:, 0], nodes[:, 1]
    cells["som_distance"] = som.node_distances(scaled)
    return som, (mean, std)


# -- step 8: classify ---------------------------------------------------------------------------
def classifier_inputs(cells: pd.DataFrame, latents: np.ndarray) -> np.ndarray:
    return np.hstack([cells[list(FEATURE_NAMES)].to_numpy(np.float32), latents])


def train_classifier(cells, latents, classes, config: BuildConfig):
    x = classifier_inputs(cells, latents)
    labelled = cells["label"].notna().to_numpy()
    class_index = {c: i for i, c in enumerate(classes)}
    y = np.array([class_index[v] for v in cells.loc[labelled, "label"]])
    classifier = CellClassifier(seed=config.seed, threads=config.threads)
    # Out-of-fold probabilities: every archived cell is judged by a model that did not see it.
    oof = classifier.out_of_fold_proba(x[labelled], y, classes)
    classifier.fit(x[labelled], y, classes)
    proba = np.zeros((len(cells), len(classes)))
    proba[labelled] = oof
    if (~labelled).any():
        proba[~labelled] = classifier.predict_proba(x[~labelled])
    threshold_choice = choose_flag_threshold(oof, y)
    threshold = threshold_choice["chosen_bits"] if config.flag_entropy == "auto" else float(config.flag_entropy)
    entropy = entropy_bits(proba)
    cells["predicted_label"] = np.array(classes)[proba.argmax(1)]
    cells["probabilities"] = list(proba.astype(np.float32))
    cells["entropy_bits"] = entropy
    cells["flagged"] = entropy > threshold
    val = (cells["split"] == "val").to_numpy()[labelled]
    correct = oof.argmax(1) == y
    return classifier, {
        "flag_threshold_bits": threshold,
        "flag_threshold_auto": threshold_choice,
        "out_of_fold_accuracy": float(correct.mean()),
        "out_of_fold_accuracy_val_split": float(correct[val].mean()) if val.any() else None,
        "share_flagged": float(cells["flagged"].mean()),
    }


# -- reporting ------------------------------------------------------------------------------
def summary(version: str, manifest: dict) -> str:
    inputs, som, clf = manifest["inputs"], manifest["som"], manifest["classifier"]
    history = manifest["backbone"]["history"]
    val_acc = history[-1].get("val_accuracy") if history else None
    lines = [
        "",
        f"Atlas version {version} published",
        f"  images          {inputs['image_files']} files, {inputs['cells']} cells, {inputs['rejected']} rejected",
        f"  classes         {', '.join(f'{k} {v}' for k, v in manifest['counts_by_class'].items())}",
        f"  segmenter       {manifest['segmenter']['name']}, {manifest['segmenter']['ms_per_cell']:.0f} ms per cell",
        f"  duplicates      {manifest['duplicates']['cells_in_duplicate_groups']} cells in "
        f"{manifest['duplicates']['groups_with_duplicates']} groups; "
        f"{manifest['duplicates']['pairs_to_review_total']} pairs at 3 bits to review",
        f"  backbone        {manifest['parameters']['backbone_preset']['name']} preset, {len(history)} epochs, "
        f"val accuracy {val_acc if val_acc is None else f'{val_acc:.3f}'}",
        f"  SOM             {som['rows']}x{som['cols']}, QE {som['quantization_error']:.3f}, "
        f"TE {som['topographic_error']:.3f}",
        f"  classifier      out-of-fold accuracy {clf['out_of_fold_accuracy']:.3f}, "
        f"{clf['share_flagged']:.1%} flagged (entropy > {clf['flag_threshold_bits']:.2f} bits)",
        "  time            " + ", ".join(f"{k} {v:.0f}s" for k, v in manifest["timings_s"].items()),
        f"  total           {sum(manifest['timings_s'].values()):.0f}s",
    ]
    return "\n".join(lines)


def _count_reasons(rejections) -> dict[str, int]:
    counts: dict[str, int] = {}
    for rejection in rejections:
        key = rejection.reason.split(" (")[0].split(":")[0]
        counts[key] = counts.get(key, 0) + 1
    return counts


class _timed:
    def __init__(self, timings: dict, name: str):
        self.timings, self.name = timings, name

    def __enter__(self):
        self.started = time.perf_counter()

    def __exit__(self, *exc):
        self.timings[self.name] = round(time.perf_counter() - self.started, 2)


class _Log:
    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, message: str) -> None:
        if self.enabled:
            tqdm.write(message)
