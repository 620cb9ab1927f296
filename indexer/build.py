"""The atlas build job: from a folder of cell images to a published, searchable atlas version.

Each step is a function of `indexer.steps` (timed, with progress); this module runs them in
order, assembles the cells table from what they return, and writes the version:
  ingest + segment + describe (+ cells archived through the API, - withdrawn cells) -> relabel
  -> deduplicate -> split -> train backbone -> embed
  -> train VAE -> index -> SOM -> UMAP -> classify -> write -> publish
A failed or interrupted build leaves the live version untouched.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from atlas import __version__
from atlas.archive import Archive
from atlas.catalog import Catalog
from atlas.cell import CROP_SIZE
from atlas.embedder import Embedder
from atlas.features import FEATURE_NAMES
from atlas.ingest import ImageRecord, list_images
from atlas.progress import Say, Timings
from atlas.scale import at_folder_scales
from atlas.segmentation import load_segmenter
from atlas.store import AtlasStore
from indexer import steps
from indexer.config import BuildConfig, BuildError
from indexer.engines import Engine, LocalEngine
from indexer.report import build_summary


@dataclass
class BuildResult:
    version: str
    manifest: dict
    version_dir: Path


def build(config: BuildConfig, records: list[ImageRecord] | None = None,
          engine: Engine | None = None) -> BuildResult:
    """Run every step and publish a new version. Raises BuildError where nothing can be built;
    on any failure the staging folder is removed and the live version is untouched. `records`
    (default: the images of `config.images`, at `config.folder_scales`) are the images to build from. Cells archived one
    at a time (POST /v1/cells) join them; withdrawn cells are left out. `engine` runs the
    per-cell stages (default: this machine, `indexer.engines`)."""
    torch.set_num_threads(config.threads)
    engine = engine or LocalEngine(config.threads)
    if records is None:  # fails early, before anything is written
        records = at_folder_scales(list_images(config.images), config.images, config.folder_scales)
    segmenter = load_segmenter(config.segmenter, config.um_per_pixel)  # so does a bad model folder
    store = AtlasStore(config.home)
    store.clean_stale_staging()
    say = Say(config.progress)
    timings = Timings(say)  # one line per step
    job_id = f"build-{uuid.uuid4().hex[:12]}"
    catalog = Catalog(config.home)
    catalog.start_job(job_id, "build")
    staging = None
    try:
        say(f"found {len(records)} images in {config.images}; engine: {engine.name}")
        say(f"segmenter: {segmenter.name} from {config.segmenter}" if config.segmenter else
            "segmenter: classical thresholds (give --segmenter MODEL to use a trained cellpose model)")
        with timings("ingest_segment_describe"):
            prepared = steps.prepare_images(records, segmenter, config, engine.map_images)
            prepared, archive_summary = steps.with_archive(prepared, Archive(config.home, catalog), segmenter, config)
        cells, rejections = prepared.cells, prepared.rejections
        cells["folder_label"] = cells["label"]
        cells["label"], corrections = steps.relabel(cells["cell_id"], cells["folder_label"], catalog)
        classes = steps.classes_of(cells["label"])
        if len(classes) < 2:
            raise BuildError(
                f"need labelled cells of at least 2 classes to train the backbone, found "
                f"{len(classes)} ({', '.join(classes) or 'none'}): put images in one sub-folder per class")
        say(f"{len(cells)} cells from {len(records) - len(rejections)} images; {len(rejections)} rejected; "
            f"classes: {', '.join(classes)}")
        staging = store.new_staging()
        with timings("deduplicate"):
            cells["duplicate_group"], duplicates = steps.deduplicate(
                cells["cell_id"], cells["ahash"], cells["fine_hash"], cells["label"])
        with timings("split"):
            cells["split"] = steps.assign_splits(cells["label"].to_numpy(object), cells["duplicate_group"].to_numpy(),
                                                 classes, config.val_fraction, config.seed)
        with timings("train_backbone"):
            backbone = steps.train_backbone(prepared.model_inputs, cells["label"].to_numpy(object),
                                            cells["split"].to_numpy(object), classes, config)
        with timings("embed"):
            tapped = engine.tap(backbone, prepared.model_inputs, config.progress)
        with timings("train_vae"):
            vae = steps.train_vae(tapped, config)
            latents = vae.transform(tapped)
        embedder = Embedder(backbone, vae)
        with timings("index"):
            index = engine.build_index(latents)
        with timings("som"):
            som, nodes, node_distances = steps.train_som(latents, config, engine.best_nodes)
            cells["som_row"], cells["som_col"], cells["som_distance"] = nodes[:, 0], nodes[:, 1], node_distances
        with timings("umap"):
            projection = steps.project(latents, config.seed)
            cells["umap_x"], cells["umap_y"] = projection[:, 0], projection[:, 1]
        with timings("classify"):
            classifier, predictions, classification = steps.train_classifier(
                cells[list(FEATURE_NAMES)].to_numpy(), latents, cells["label"].to_numpy(object),
                cells["split"].to_numpy(object), classes, config)
            cells = cells.assign(**steps.prediction_columns(predictions))
        with timings("novelty"):
            novelty = steps.calibrate_novelty(index, latents, cells["duplicate_group"], cells["entropy_bits"])
        with timings("write"):
            files = store.staging_version(staging)
            files.write_models(embedder, classifier)
            segmenter_path = files.write_segmenter(config.segmenter)
            files.write_index(index)
            files.write_novelty(novelty)
            files.write_latents(latents)
            files.write_som(som)
            files.write_cells(cells)
            files.write_feature_ranges(cells, classes)
            files.write_rejections(rejections)
        manifest = _manifest(config, records, cells, rejections, segmenter.name, segmenter_path, classes,
                             corrections, duplicates, embedder, som, classification, timings, job_id)
        manifest["engine"] = engine.describe()
        manifest["novelty"] = novelty.summary()
        manifest["archive"] = archive_summary
        with timings("publish"):
            version = store.publish(staging, manifest)
        catalog.mark_folded(archive_summary["archived_cells_folded"], version)
        catalog.update_job(job_id, state="succeeded", version=version)
        say(build_summary(version, manifest))
        return BuildResult(version, store.manifest(version), store.version_dir(version))
    except BaseException as error:  # KeyboardInterrupt too: never leave a half version behind
        if staging is not None:
            store.discard(staging)
        catalog.update_job(job_id, state="failed", message=f"{type(error).__name__}: {error}"[:2000])
        raise


def _manifest(config, records, cells, rejections, segmenter_name, segmenter_path, classes, corrections,
              duplicates, embedder, som, classification, timings, job_id) -> dict:
    """What the version records about itself: inputs, parameters, metrics, timings."""
    backbone, vae = embedder.backbone, embedder.vae
    return {
        "cellatlas": __version__,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "inputs": {"images": str(Path(config.images).resolve()), "image_files": len(records),
                   "cells": int(len(cells)), "rejected": len(rejections),
                   "rejections_by_reason": steps.count_reasons(rejections)},
        "parameters": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
                       "backbone_preset": asdict(backbone.preset),
                       "segmenter": str(Path(config.segmenter).resolve()) if config.segmenter else "classical",
                       "crop_size": CROP_SIZE, "feature_names": list(FEATURE_NAMES)},
        "segmenter": {"kind": "cellpose" if config.segmenter else "classical", "name": segmenter_name,
                      "path": segmenter_path,
                      "ms_per_cell": round(float(cells["segment_ms"].mean()), 1)},
        "classes": classes,
        "counts_by_class": counts_by_class(cells["label"]),
        "corrections": corrections,
        "duplicates": duplicates,
        "backbone": {"epochs": len(backbone.history_), "history": backbone.history_, "feature_dim": backbone.feature_dim},
        "vae": {"final": vae.history_[-1] if vae.history_ else None, "whiten_dim": vae.whiten_dim,
                "whitened_components": None if vae.projection_ is None else int(vae.projection_.shape[1])},
        "som": {"rows": som.rows, "cols": som.cols, "epochs": config.som_epochs,
                "quantization_error": som.quantization_error_, "topographic_error": som.topographic_error_},
        "classifier": classification,
        "timings_s": timings.seconds,
        "job_id": job_id,
    }


def counts_by_class(labels) -> dict[str, int]:
    """Cells per label (unlabelled cells under "None"), as the manifest records them."""
    return {str(k): int(v) for k, v in labels.value_counts(dropna=False).items()}
