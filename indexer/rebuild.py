"""Rebuild the live atlas with technologists' corrections and publish it as a new version.

The default rebuild retrains only what depends on labels: the labels themselves (the
corrections log applied over the folder labels, the latest correction of a cell winning),
the duplicate groups (same class is part of the rule) and the XGBoost classifier with its
out-of-fold probabilities, entropies and flags. The backbone, VAE, latents, FAISS index and
SOM of the parent version are carried over unchanged; the SOM's class overlays follow the
labels. Cells archived through the API since the parent are folded in (embedded and placed by
the parent's models, as `cellatlas add` does) and withdrawn cells left out. `retrain_backbone=True`
instead reruns the whole build on everything archived: the parent's cells' images (its build's and
its additions') and the API-archived cells.

Safety: at most one rebuild runs per ATLAS_HOME (atlas.jobs.RebuildLock); the corrections
snapshot is read once, so corrections made meanwhile wait for the next rebuild; everything
is written into a staging folder that only a finished rebuild publishes. A rebuild killed at
any point leaves the previous version live, and the next one discards its staging folder.

    cellatlas rebuild --home H [--retrain-backbone] [--job-id ID]
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pandas as pd

from atlas import __version__
from atlas.archive import Archive
from atlas.catalog import Catalog
from atlas.features import FEATURE_NAMES
from atlas.ingest import ImageRecord
from atlas.jobs import REBUILD, RebuildLock, new_job_id, settle_abandoned_rebuilds
from atlas.progress import Say, Timings
from atlas.runtime import default_threads
from atlas.store import AtlasStore
from atlas.version import LABEL_INDEPENDENT
from indexer import steps
from indexer.add import extend_version
from indexer.build import build, counts_by_class
from indexer.config import parent_config

STEPS = ("load", "relabel", "deduplicate", "classify", "write", "publish")
STAGING_TAG = "rebuild"


class RebuildError(RuntimeError):
    """The live atlas cannot be rebuilt; the message says why and what to do."""


def rebuild(home: Path | str, retrain_backbone: bool = False, progress: bool = True,
            threads: int | None = None, job_id: str | None = None, lock_fd: int | None = None) -> str:
    """Publish a new version of the live atlas with the current corrections; returns it.

    `job_id` names the row of the catalogue's jobs table that follows this rebuild (created
    when missing); `lock_fd` is an inherited file descriptor holding the rebuild lock (the API
    takes the lock and passes it on), otherwise the lock is taken here. Raises RebuildRunning
    when another rebuild holds it, RebuildError / AtlasNotFound when there is nothing to rebuild.
    """
    home = Path(home)
    AtlasStore(home).require_current()  # fails early, before anything is written
    lock = RebuildLock.adopt(home, lock_fd) if lock_fd is not None else RebuildLock(home).acquire()
    try:
        catalog = Catalog(home)
        job_id = job_id or new_job_id()
        if catalog.job(job_id) is None:
            catalog.start_job(job_id, REBUILD)
        settle_abandoned_rebuilds(home, lock=lock, holder_job=job_id)
        try:
            run = _Rebuild(home, catalog, job_id, progress, threads, retrain_backbone)
            version = run.full() if retrain_backbone else run.fast()
        except BaseException as error:  # KeyboardInterrupt and SIGTERM too: say so in the job
            catalog.update_job(job_id, state="failed", message=f"{type(error).__name__}: {error}"[:2000])
            raise
        catalog.update_job(job_id, state="succeeded", version=version,
                           progress={**run.progress, "step": "done", "done": run.progress["total"]})
        return version
    finally:
        lock.release()


class _Rebuild:
    """One rebuild run: its job's progress and the two ways to rebuild."""

    def __init__(self, home: Path, catalog: Catalog, job_id: str, progress: bool, threads: int | None,
                 retrain_backbone: bool):
        self.home, self.catalog, self.job_id = home, catalog, job_id
        self.store = AtlasStore(home)
        self.say = Say(progress)
        self.parent = self.store.require_current()
        self.parent_files = self.store.version(self.parent)
        self.parent_manifest = self.parent_files.manifest
        self.config = parent_config(self.parent_manifest, self.parent_files.folder, home,
                                    threads=threads or default_threads(), progress=progress)
        self.progress: dict = {"pid": os.getpid(), "parent_version": self.parent,
                               "retrain_backbone": retrain_backbone}
        self.timings = Timings()

    def step(self, name: str, **details) -> None:
        self.progress = {**self.progress, "step": name, "done": STEPS.index(name), "total": len(STEPS),
                         **details}
        self.catalog.update_job(self.job_id, progress=self.progress)
        self.say(f"rebuild {self.job_id}: {name}")

    # -- the default: retrain what depends on labels ----------------------------------------
    def fast(self) -> str:
        started = time.perf_counter()
        self.step("load")
        for leftover in self.store.versions.glob(f".staging-{STAGING_TAG}-*"):
            self.store.discard(leftover)  # only rebuilds write these, and this one holds the lock
        cells = self.parent_files.read_cells()
        latents = self.parent_files.read_latents()
        if len(latents) != len(cells):
            raise RebuildError(f"version {self.parent} is damaged: {len(latents)} latents for {len(cells)} cells")
        index = self.parent_files.read_index()
        # Cells archived through the API since the parent, and withdrawals, with the parent's models.
        archive = Archive(self.home, self.catalog)
        pending, withdrawn = archive.fold_candidates(), archive.withdrawn()
        folded, left_out = [], 0
        if pending or cells["cell_id"].isin(withdrawn).any():
            with self.timings("fold_archive"):
                archived = steps.prepare_archived(archive, pending, self.parent_files.read_segmenter(), self.config)
                extension = extend_version(self.parent_files, archived.cells, archived.model_inputs, withdrawn,
                                           self.parent_files.read_embedder(device=self.config.device),
                                           self.parent_files.read_classifier(), Timings())
            cells, latents, index = extension.cells, extension.latents, extension.index
            folded, left_out = [str(c) for c in extension.added["cell_id"]], extension.withdrawn_left_out

        self.step("relabel")
        if "folder_label" not in cells:  # versions built before folder labels were kept
            cells["folder_label"] = cells["label"]
        cells["label"], corrections = steps.relabel(cells["cell_id"], cells["folder_label"], self.catalog,
                                                    previous_labels=cells["label"])
        classes = steps.classes_of(cells["label"])
        if len(classes) < 2:
            raise RebuildError(f"after corrections only {len(classes)} class(es) have cells "
                               f"({', '.join(classes) or 'none'}); the classifier needs at least 2")

        self.step("deduplicate")
        cells["duplicate_group"], duplicates = steps.deduplicate(
            cells["cell_id"], cells["ahash"], cells["fine_hash"], cells["label"])

        self.step("classify")
        with self.timings("classify"):
            classifier, predictions, classification = steps.train_classifier(
                cells[list(FEATURE_NAMES)].to_numpy(), latents, cells["label"].to_numpy(object),
                cells["split"].to_numpy(object), classes, self.config)
            cells = cells.assign(**steps.prediction_columns(predictions))
            novelty = steps.calibrate_novelty(index, latents, cells["duplicate_group"], cells["entropy_bits"])

        staging = self.store.new_staging(tag=STAGING_TAG)
        try:
            self.step("write")
            files = self.store.staging_version(staging)
            files.carry_over(self.parent_files)
            if folded or left_out:
                files.write_latents(latents)
                files.write_index(index)
            files.write_models(None, classifier)
            files.write_cells(cells)
            files.write_novelty(novelty)  # duplicate groups (left out of the scores) follow labels
            files.write_feature_ranges(cells, classes)  # under the corrected labels
            self.step("publish")
            self.timings.seconds["total"] = round(time.perf_counter() - started, 2)
            manifest = self.manifest(cells, classes, corrections, duplicates, classification)
            manifest["novelty"] = novelty.summary()
            manifest["archive"] = {"archived_cells_folded": folded, "withdrawn_left_out": left_out}
            version = self.store.publish(staging, manifest)
            self.catalog.mark_folded(folded, version)
            return version
        except BaseException:
            self.store.discard(staging)
            raise

    def manifest(self, cells, classes, corrections, duplicates, classification) -> dict:
        """The parent's manifest with what this rebuild changed, and where it came from."""
        carried = {key: value for key, value in self.parent_manifest.items() if key not in ("version", "timings_s")}
        return {
            **carried,
            "cellatlas": __version__,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "kind": "rebuild",
            "parent_version": self.parent,
            "rebuild": {"retrain_backbone": False, "reused_from_parent": list(LABEL_INDEPENDENT),
                        "trained": ["classifier"], "rederived": ["labels", "duplicate_groups"]},
            "classes": classes,
            "counts_by_class": counts_by_class(cells["label"]),
            "corrections": corrections,
            "duplicates": duplicates,
            "classifier": classification,
            "timings_s": self.timings.seconds,
            "job_id": self.job_id,
        }

    # -- retrain everything ---------------------------------------------------------------
    def full(self) -> str:
        """The whole build again with the parent's parameters, on everything the archive holds:
        the images of every cell of the parent version (its build's and every `add`'s; withdrawn
        cells are not there) and the cells archived through the API (the build folds those in
        and reads and records the corrections itself)."""
        records = archive_records(self.parent_files.read_cells(), self.catalog, self.store)
        if not any(record.path.is_file() for record in records):
            raise RebuildError(
                f"the images of version {self.parent} (built from {self.config.images}) are no longer where "
                f"they were; build anew with 'cellatlas build --images DIR --home {self.home}'")
        self.progress = {**self.progress, "step": "build", "done": 0, "total": 1}
        self.catalog.update_job(self.job_id, progress=self.progress)
        result = build(self.config, records)
        self.progress = {**self.progress, "build_job_id": result.manifest.get("job_id"), "done": 1}
        return result.version


def archive_records(cells, catalog: Catalog, store: AtlasStore | None = None) -> list[ImageRecord]:
    """The image files a version's cells came from, each once, with the label its folder gave
    (an unlabelled image stays unlabelled: every cell of it is found again) and the scale it was
    taken at, and those of cells
    restored after a version left them out (found in the version they were withdrawn from).
    Cells archived through the API are left out: the build folds them in from the catalogue."""
    from_api = {a["cell_id"] for a in catalog.archived_cells(pending_only=False)}
    tables = [cells]
    if store is not None:  # restored cells that a version left out meanwhile
        withdrawn_now, present = catalog.withdrawn_cells(), set(cells["cell_id"])
        missing: dict[str, set[str]] = {}
        for event in catalog.withdrawals():
            cell_id = event["cell_id"]
            if cell_id not in present and cell_id not in withdrawn_now and event["atlas_version"]:
                missing.setdefault(event["atlas_version"], set()).add(cell_id)
        for version, cell_ids in missing.items():
            if version in store.list_versions():
                older = store.version(version).read_cells()
                tables.append(older[older["cell_id"].isin(cell_ids)])
    records, seen = [], set()
    for table in tables:
        labels = table["folder_label"] if "folder_label" in table else table["label"]
        scales = table["um_per_pixel"] if "um_per_pixel" in table else [None] * len(table)  # older versions: none
        for cell_id, path, label, scale in zip(table["cell_id"], table["source_path"], labels, scales):
            if cell_id in from_api or path in seen:
                continue
            seen.add(path)
            records.append(ImageRecord(Path(path), None if pd.isna(label) else str(label),
                                       None if scale is None or pd.isna(scale) else float(scale)))
    return records
