"""Rebuild the live atlas with technologists' corrections and publish it as a new version.

The default rebuild retrains only what depends on labels: the labels themselves (the
corrections log applied over the folder labels, the latest correction of a cell winning),
the duplicate groups (same class is part of the rule) and the XGBoost classifier with its
out-of-fold probabilities, entropies and flags. The backbone, VAE, latents, FAISS index and
SOM of the parent version are copied unchanged; the SOM's class overlays follow the labels.
`retrain_backbone=True` instead reruns the whole build on the parent version's images.

Safety: at most one rebuild runs per ATLAS_HOME (atlas.jobs.RebuildLock); the corrections
snapshot is read once, so corrections made meanwhile wait for the next rebuild; everything
is written into a staging folder that only a finished rebuild publishes. A rebuild killed at
any point leaves the previous version live, and the next one discards its staging folder.

    python -m indexer.rebuild --home H [--retrain-backbone] [--job-id ID]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import pandas as pd

from atlas import __version__
from atlas.catalog import Catalog
from atlas.jobs import REBUILD, RebuildLock, RebuildRunning, new_job_id, settle_abandoned_rebuilds
from atlas.store import AtlasNotFound, AtlasStore
from indexer.build import (
    SEGMENTER_DIR,
    BuildConfig,
    build,
    deduplicate,
    default_threads,
    train_classifier,
    write_feature_ranges,
)

STEPS = ("load", "relabel", "deduplicate", "classify", "write", "publish")
STAGING_TAG = "rebuild"
# Files of the parent version that do not depend on labels and are carried over as they are.
REUSED_FILES = ("latents.npy", "index.faiss", "som.npz", "rejections.parquet", "models/backbone.pt",
                "models/vae.pt")
# Test hook: the rebuild stops for a while at this step, so that a test can kill it there.
PAUSE_ENV = "CELLATLAS_REBUILD_PAUSE_AT"
PAUSE_SECONDS_ENV = "CELLATLAS_REBUILD_PAUSE_S"


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
            run = _Rebuild(home, catalog, job_id, progress, threads or default_threads(), retrain_backbone)
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

    def __init__(self, home: Path, catalog: Catalog, job_id: str, progress: bool, threads: int,
                 retrain_backbone: bool):
        self.home, self.catalog, self.job_id = home, catalog, job_id
        self.store = AtlasStore(home)
        self.show_progress = progress
        self.threads = threads
        self.parent = self.store.require_current()
        self.parent_manifest = self.store.manifest(self.parent)
        self.progress: dict = {"pid": os.getpid(), "parent_version": self.parent,
                               "retrain_backbone": retrain_backbone}
        self.timings: dict[str, float] = {}

    def step(self, name: str, **details) -> None:
        self.progress = {**self.progress, "step": name, "done": STEPS.index(name), "total": len(STEPS),
                         **details}
        self.catalog.update_job(self.job_id, progress=self.progress)
        if self.show_progress:
            print(f"rebuild {self.job_id}: {name}", file=sys.stderr, flush=True)
        self.pause_for_tests(name)

    def pause_for_tests(self, name: str) -> None:
        """With CELLATLAS_REBUILD_PAUSE_AT=<step>, say so in the job and sleep there (tests kill
        the process at a known point this way)."""
        if os.environ.get(PAUSE_ENV) == name:
            self.catalog.update_job(self.job_id, progress={**self.progress, "paused_for_test": True})
            time.sleep(float(os.environ.get(PAUSE_SECONDS_ENV, "120")))

    # -- the default: retrain what depends on labels ----------------------------------------
    def fast(self) -> str:
        started = time.perf_counter()
        self.step("load")
        for leftover in self.store.versions.glob(f".staging-{STAGING_TAG}-*"):
            self.store.discard(leftover)  # only rebuilds write these, and this one holds the lock
        parent_dir = self.store.version_dir(self.parent)
        cells = pd.read_parquet(parent_dir / "cells.parquet")
        latents = np.load(parent_dir / "latents.npy")
        config = parent_config(self.parent_manifest, self.home, self.threads, self.show_progress)

        self.step("relabel")
        corrections = relabel(cells, self.catalog)
        classes = sorted(cells.loc[cells["label"].notna(), "label"].unique())
        if len(classes) < 2:
            raise RebuildError(f"after corrections only {len(classes)} class(es) have cells "
                               f"({', '.join(classes) or 'none'}); the classifier needs at least 2")

        self.step("deduplicate")
        duplicates = deduplicate(cells)

        self.step("classify")
        classifier_started = time.perf_counter()
        if len(latents) != len(cells):
            raise RebuildError(f"version {self.parent} is damaged: {len(latents)} latents for {len(cells)} cells")
        classifier, classification = train_classifier(cells, latents, classes, config)
        self.timings["classify"] = round(time.perf_counter() - classifier_started, 2)

        staging = self.store.new_staging(tag=STAGING_TAG)
        try:
            self.step("write")
            for name in REUSED_FILES:
                if (parent_dir / name).exists():
                    shutil.copy2(parent_dir / name, staging / name)
            if (parent_dir / SEGMENTER_DIR).is_dir():  # the manifest, carried over, points to it
                shutil.copytree(parent_dir / SEGMENTER_DIR, staging / SEGMENTER_DIR)
            self.pause_for_tests("write-midway")
            classifier.save(staging / "models" / "classifier.json")
            cells.to_parquet(staging / "cells.parquet", index=False)
            write_feature_ranges(staging, cells, classes)  # under the corrected labels
            self.step("publish")
            self.timings["total"] = round(time.perf_counter() - started, 2)
            return self.store.publish(staging, self.manifest(cells, classes, corrections, duplicates,
                                                              classification))
        except BaseException:
            self.store.discard(staging)
            raise

    def manifest(self, cells, classes, corrections, duplicates, classification) -> dict:
        """The parent's manifest with what this rebuild changed, and where it came from."""
        parent = self.parent_manifest
        carried = {key: value for key, value in parent.items() if key not in ("version", "timings_s")}
        return {
            **carried,
            "cellatlas": __version__,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "kind": "rebuild",
            "parent_version": self.parent,
            "rebuild": {"retrain_backbone": False, "reused_from_parent": list(REUSED_FILES),
                        "trained": ["classifier"], "rederived": ["labels", "duplicate_groups"]},
            "classes": classes,
            "counts_by_class": {str(k): int(v) for k, v in cells["label"].value_counts(dropna=False).items()},
            "corrections": corrections,
            "duplicates": duplicates,
            "classifier": classification,
            "timings_s": self.timings,
            "job_id": self.job_id,
        }

    # -- retrain everything ---------------------------------------------------------------
    def full(self) -> str:
        """The whole build again, on the parent's images with its parameters (the build reads
        and records the corrections itself)."""
        config = parent_config(self.parent_manifest, self.home, self.threads, self.show_progress)
        if not Path(config.images).is_dir():
            raise RebuildError(
                f"version {self.parent} was built from {config.images}, which is no longer a folder; "
                f"build anew with 'cellatlas build --images DIR --home {self.home}'")
        self.progress = {**self.progress, "step": "build", "done": 0, "total": 1}
        self.catalog.update_job(self.job_id, progress=self.progress)
        self.pause_for_tests("build")
        result = build(config)
        self.progress = {**self.progress, "build_job_id": result.manifest.get("job_id"), "done": 1}
        return result.version


def relabel(cells: pd.DataFrame, catalog: Catalog) -> dict:
    """Apply the corrections log over the folder labels, in place; read once, so corrections
    made while this rebuild runs wait for the next. Returns what the manifest records."""
    through, corrected = catalog.effective_labels()
    if "folder_label" not in cells:  # versions built before folder labels were kept
        cells["folder_label"] = cells["label"]
    before = cells["label"].copy()
    hits = cells["cell_id"].isin(corrected.keys())
    cells["label"] = cells["cell_id"].map(corrected).where(hits, cells["folder_label"])
    changed = before.fillna("\0") != cells["label"].fillna("\0")
    known = set(cells["cell_id"])
    return {
        "applied_through_correction_id": through,
        "cells_relabelled": int(hits.sum()),
        "labels_changed_since_parent": int(changed.sum()),
        "corrections_for_cells_not_in_version": sum(1 for cell_id in corrected if cell_id not in known),
    }


def parent_config(manifest: dict, home: Path, threads: int, progress: bool) -> BuildConfig:
    """The BuildConfig the parent version was built with, for this ATLAS_HOME and machine."""
    parameters = manifest.get("parameters", {})
    names = {f.name for f in fields(BuildConfig)} - {"images", "home", "threads", "progress"}
    chosen = {name: value for name, value in parameters.items() if name in names}
    if chosen.get("som_shape") is not None:
        chosen["som_shape"] = tuple(chosen["som_shape"])
    segmenter_path = (manifest.get("segmenter") or {}).get("path")
    if segmenter_path:  # the parent's own copy of its model, not the folder it was first built from
        chosen["segmenter"] = str(AtlasStore(home).version_dir(manifest["version"]) / segmenter_path)
    images = manifest.get("inputs", {}).get("images") or parameters.get("images")
    return BuildConfig(images=Path(images), home=home, threads=threads, progress=progress, **chosen)


# -- command line -------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m indexer.rebuild", description=__doc__.splitlines()[0])
    parser.add_argument("--home", required=True, help="ATLAS_HOME whose live version is rebuilt")
    parser.add_argument("--retrain-backbone", action="store_true",
                        help="rerun the whole build (backbone, VAE, index, SOM) on the parent's images")
    parser.add_argument("--job-id", help="the jobs-table row to report progress in (default: a new one)")
    parser.add_argument("--lock-fd", type=int, help=argparse.SUPPRESS)  # the API hands its lock over
    parser.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    parser.add_argument("--quiet", action="store_true", help="no progress; print only the version")
    args = parser.parse_args(argv)
    # SIGTERM (docker stop, kill) unwinds like Ctrl-C, so the job is marked failed and staging removed.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        version = rebuild(args.home, retrain_backbone=args.retrain_backbone, progress=not args.quiet,
                          threads=args.threads, job_id=args.job_id, lock_fd=args.lock_fd)
    except (RebuildRunning, RebuildError, AtlasNotFound) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the live atlas version is unchanged", file=sys.stderr)
        return 130
    print(version if args.quiet else json.dumps({"version": version}))
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signum}")


if __name__ == "__main__":
    sys.exit(main())
