"""Add new images to the live atlas with its frozen models, as a new version: minutes, not a build.

    cellatlas add --home H --images DIR [--label-from-folders] [--um-per-pixel X] [--threads N]

The live version's segmenter, backbone, VAE, classifier, SOM and 2-D map are used as they are
(nothing is trained): the images are ingested, segmented and described by the build's own step
(`steps.prepare_images`), copies of archived cells are reported and left out (`exact`: the same
file; `near`: the dedup rule's hashes), the rest are embedded, appended to the latents and the
FAISS index, given their best SOM node, a place on the map among their nearest archived cells
and the classifier's prediction with entropy and flag. Cells archived one at a time through the
API (pending) are folded in, withdrawn cells left out. Per-class feature ranges are recomputed;
every other file is carried over. The new version is published atomically; a failed add leaves
the live version as it was. The summary and the manifest say how the new cells sit against the
archive (`atlas.drift`): when they drift, retrain with `cellatlas rebuild --retrain-backbone`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from atlas import __version__
from atlas.archive import ADDED_SPLIT, Archive, copies_in_archive, placed
from atlas.catalog import Catalog
from atlas.drift import archive_far_distance, drift_report
from atlas.embedder import Embedder
from atlas.ingest import ImageRecord, list_images
from atlas.jobs import ADD, RebuildLock, RebuildRunning, new_job_id, settle_abandoned_rebuilds
from atlas.progress import Say, Timings
from atlas.runtime import default_threads
from atlas.scale import check_um_per_pixel
from atlas.search import LatentIndex
from atlas.store import AtlasStore
from atlas.version import BACKBONE, CLASSIFIER, REJECTIONS, SOM, VAE_WEIGHTS, AtlasVersion
from indexer import steps
from indexer.build import counts_by_class
from indexer.config import BuildError, parent_config
from indexer.engines import Engine, LocalEngine
from indexer.report import add_summary

STAGING_TAG = "add"
# What an add carries over from its parent unchanged: the frozen models and the map.
FROZEN = (SOM, REJECTIONS, BACKBONE, VAE_WEIGHTS, CLASSIFIER, f"{CLASSIFIER}.classes.json")


@dataclass
class AddResult:
    version: str
    manifest: dict


@dataclass
class Extension:
    """A parent version's cells with new ones placed by its frozen models."""

    cells: pd.DataFrame
    latents: np.ndarray
    index: LatentIndex
    added: pd.DataFrame  # the new cells as placed (rows of `cells`)
    nearest: np.ndarray  # each added cell's distance to its nearest archived cell
    copies: list[dict]  # new cells left out as copies of archived ones
    withdrawn_left_out: int
    far_distance: float  # the archive's own FAR_PERCENTILE nearest-neighbour distance
    fresh: np.ndarray  # which of the new cells were added (the rest: copies or withdrawn)
    archive_mean_entropy: float


def add(home: Path | str, images: Path | str, label_from_folders: bool = False, um_per_pixel: float | None = None,
        threads: int | None = None, progress: bool = True, engine: Engine | None = None) -> AddResult:
    """Index the images of `images` into a new version of the live atlas of `home` with its
    frozen models, and publish it. Raises AtlasNotFound (no live version), IngestError (no
    images), BuildError (a class folder the atlas does not know, no cell in any image) before
    anything is written; RebuildRunning when another add or rebuild of `home` runs. `engine` runs
    the per-cell stages (default: this machine, `indexer.engines`)."""
    home, images = Path(home), Path(images)
    store = AtlasStore(home)
    parent = store.require_current()
    if um_per_pixel is not None:
        check_um_per_pixel(um_per_pixel)
    # Images at another scale are resampled to the atlas's before segmentation, as uploads are.
    records = [ImageRecord(r.path, r.label if label_from_folders else None, um_per_pixel) for r in list_images(images)]
    parent_files = store.version(parent)
    parent_files.check_features()
    classes = list(parent_files.manifest["classes"])
    unknown = sorted({r.label for r in records if r.label is not None and r.label not in classes})
    if unknown:
        raise BuildError(f"folder(s) {', '.join(unknown)} name no class of the atlas ({', '.join(classes)}); the "
                         "frozen classifier knows only those: rename the folders, add without "
                         "--label-from-folders (the cells go to the review queue), or build anew for a new class")
    threads = threads or default_threads()
    atlas_config = parent_config(parent_files.manifest, parent_files.folder, home, threads=threads, progress=progress)
    config = replace(atlas_config, images=images)
    segmenter = parent_files.read_segmenter()
    try:
        lock = RebuildLock(home).acquire()
    except RebuildRunning:
        raise RebuildRunning(f"another add or rebuild of {home} is running; try again when it has finished") from None
    try:
        settle_abandoned_rebuilds(home, lock=lock)  # holding the lock: a rebuild or add still "running" is dead
        return _add(home, store, parent, parent_files, records, images, label_from_folders, config, segmenter,
                    um_per_pixel, threads, progress, engine or LocalEngine(threads))
    finally:
        lock.release()


def _add(home, store, parent, parent_files, records, images, label_from_folders, config, segmenter, um_per_pixel,
         threads, progress, engine) -> AddResult:
    torch.set_num_threads(threads)
    say = Say(progress)
    timings = Timings(say)
    job_id = new_job_id(ADD)
    catalog = Catalog(home)
    catalog.start_job(job_id, ADD)
    archive = Archive(home, catalog)
    staging = None
    started = time.perf_counter()
    try:
        say(f"adding {len(records)} images from {images} to version {parent} (frozen models); engine: {engine.name}")
        pending = archive.fold_candidates()
        with timings("ingest_segment_describe"):
            prepared = steps.prepare_images(records, segmenter, config, engine.map_images)
            # Cells archived through the API, prepared at the atlas's own scale.
            archived = steps.prepare_archived(archive, pending, segmenter, config)
        with timings("load_models"):
            embedder = parent_files.read_embedder(device=config.device)
        new = pd.concat([prepared.cells, archived.cells], ignore_index=True) if len(archived.cells) else prepared.cells
        inputs = np.concatenate([prepared.model_inputs, archived.model_inputs])
        source_of = {a["cell_id"]: a["source"] or "api" for a in pending}
        sources = np.array([source_of.get(cell_id) or _source(path, images)
                            for cell_id, path in zip(new["cell_id"], new["source_path"])], dtype=object)
        extension = extend_version(parent_files, new, inputs, archive.withdrawn(), embedder,
                                   parent_files.read_classifier(threads=threads), timings, progress, engine)
        if not len(extension.added):
            copies = extension.copies
            raise BuildError(f"nothing to add: all {len(new)} cells found are already archived"
                             + "".join(f"\n  {c['source_path']} = {c['archived_cell_id']} ({c['kind']} copy)"
                                       for c in copies[:20])
                             + (f"\n  ... and {len(copies) - 20} more" if len(copies) > 20 else ""))
        with timings("drift"):
            drift = drift_report(extension.nearest, extension.added["entropy_bits"], extension.added["flagged"],
                                 sources[extension.fresh], extension.far_distance, extension.archive_mean_entropy)
        cells = extension.cells
        cells["duplicate_group"], duplicates = steps.deduplicate(cells["cell_id"], cells["ahash"], cells["fine_hash"],
                                                                 cells["label"])
        with timings("novelty"):
            novelty = steps.calibrate_novelty(extension.index, extension.latents, cells["duplicate_group"],
                                              cells["entropy_bits"])
        staging = store.new_staging(tag=STAGING_TAG)
        with timings("write"):
            files = store.staging_version(staging)
            files.carry_over(parent_files, names=FROZEN)
            files.write_cells(cells)
            files.write_latents(extension.latents)
            files.write_index(extension.index)
            files.write_feature_ranges(cells, list(parent_files.manifest["classes"]))
            files.write_novelty(novelty)
            if prepared.rejections or archived.rejections:
                files.write_rejections(_rejections(parent_files) + prepared.rejections + archived.rejections)
        folded = [c for c in archived.cells.get("cell_id", []) if c in set(extension.added["cell_id"])]
        timings.seconds["total"] = round(time.perf_counter() - started, 2)
        manifest = _manifest(parent_files, parent, cells, extension, records, prepared, archived, folded, drift,
                             novelty, duplicates, timings, job_id, images, label_from_folders, um_per_pixel,
                             engine)
        with timings("publish"):
            version = store.publish(staging, manifest)
        catalog.mark_folded(folded, version)
        catalog.update_job(job_id, state="succeeded", version=version)
        say(add_summary(version, manifest))
        return AddResult(version, store.manifest(version))
    except BaseException as error:  # KeyboardInterrupt too: never leave a half version behind
        if staging is not None:
            store.discard(staging)
        catalog.update_job(job_id, state="failed", message=f"{type(error).__name__}: {error}"[:2000])
        raise


def extend_version(parent: AtlasVersion, new: pd.DataFrame, model_inputs: np.ndarray, withdrawn, embedder: Embedder,
                   classifier, timings: Timings, progress: bool = False, engine: Engine | None = None) -> Extension:
    """The parent's cells without the `withdrawn` ids and with the `new` cells (rows as the
    build's prepare step gives them, and their model inputs) that are not copies of archived
    cells, embedded (by `engine`, default here) and placed by the parent's frozen models."""
    engine = engine or LocalEngine(torch.get_num_threads())
    with timings("load"):
        cells = parent.read_cells()
        latents = parent.read_latents()
        index = parent.read_index()
        som, _ = parent.read_som()
        if "folder_label" not in cells:
            cells["folder_label"] = cells["label"]
    keep = ~cells["cell_id"].isin(set(withdrawn)).to_numpy()
    if not keep.all():
        cells, latents = cells[keep].reset_index(drop=True), latents[keep]
        index = LatentIndex.build(latents)
    with timings("deduplicate"):
        found = copies_in_archive(new["source_sha256"], new["ahash"], new["fine_hash"], cells)
        fresh = ~new["cell_id"].isin(set(withdrawn)).to_numpy() & ~new["cell_id"].duplicated().to_numpy()
        fresh[list(found)] = False
        copies = [{"cell_id": str(new["cell_id"].iat[i]), "source_path": str(new["source_path"].iat[i]),
                   "label": None if pd.isna(new["label"].iat[i]) else str(new["label"].iat[i]), **copy}
                  for i, copy in sorted(found.items())]
    rows = new[fresh].reset_index(drop=True)
    rows = rows.assign(folder_label=rows["label"], duplicate_group=rows["cell_id"], split=ADDED_SPLIT)
    with timings("embed"):
        added_latents = (engine.embed(embedder, model_inputs[fresh], progress) if fresh.any()
                         else np.zeros((0, latents.shape[1]), np.float32))
    with timings("place"):
        if fresh.any():
            added, nearest = placed(rows, added_latents, index, cells[["umap_x", "umap_y"]].to_numpy(), som,
                                    classifier)
        else:
            added, nearest = rows.iloc[:0], np.zeros(0)
        far = archive_far_distance(index, latents, cells["duplicate_group"])
    return Extension(cells=pd.concat([cells, added], ignore_index=True) if len(added) else cells, latents=np.concatenate([latents, added_latents]),
                     index=index.extended(added_latents), added=added, nearest=nearest, copies=copies,
                     withdrawn_left_out=int((~keep).sum()), far_distance=far, fresh=fresh,
                     archive_mean_entropy=float(cells["entropy_bits"].mean()))


def _source(path: str, images: Path) -> str:
    """The folder an image came from, relative to the images given (drift is told per folder)."""
    try:
        return str(Path(path).parent.relative_to(images.resolve())) or "."
    except ValueError:
        return str(Path(path).parent)


def _rejections(parent: AtlasVersion) -> list:
    from atlas.ingest import Rejection

    if not parent.path(REJECTIONS).exists():
        return []
    table = pd.read_parquet(parent.path(REJECTIONS))
    return [Rejection(path, reason) for path, reason in zip(table["path"], table["reason"])]


def _manifest(parent_files, parent, cells, extension, records, prepared, archived, folded, drift, novelty,
              duplicates, timings, job_id, images, label_from_folders, um_per_pixel, engine) -> dict:
    """The parent's manifest with what this addition changed, and where it came from."""
    carried = {k: v for k, v in parent_files.manifest.items() if k not in ("version", "timings_s", "job_id")}
    added = len(extension.added)
    total = timings.seconds.get("total") or 1e-9
    addition = {
        "images": str(images.resolve()), "label_from_folders": label_from_folders, "um_per_pixel": um_per_pixel,
        "image_files": len(records), "cells_found": int(len(prepared.cells)), "cells_added": added,
        "copies_of_archived_cells": extension.copies, "rejected": len(prepared.rejections),
        "rejections_by_reason": steps.count_reasons(prepared.rejections),
        "archived_cells_folded": folded, "archived_cells_rejected": len(archived.rejections),
        "withdrawn_left_out": extension.withdrawn_left_out,
        "cells_per_s": round(added / total, 2), "job_id": job_id, "engine": engine.describe(),
    }
    return {
        **carried,
        "cellatlas": __version__,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "kind": "add",
        "parent_version": parent,
        "add": addition,
        "additions": [*parent_files.manifest.get("additions", []),
                      {k: addition[k] for k in ("images", "image_files", "cells_added", "job_id")}],
        "counts_by_class": counts_by_class(cells["label"]),
        "duplicates": duplicates,
        "drift": drift,
        "novelty": novelty.summary(),
        "timings_s": timings.seconds,
        "job_id": job_id,
    }
