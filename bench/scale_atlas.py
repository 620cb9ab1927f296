"""A synthetic scale atlas: a published atlas's cells repeated to N cells, to benchmark the
service at archive size (bench/api_bench.py) without N real cells.

    PYTHONPATH=. .venv/bin/python bench/scale_atlas.py --from SOURCE_HOME --cells 1000000 --home NEW_HOME
    PYTHONPATH=. .venv/bin/python bench/scale_atlas.py --from SOURCE_HOME --home NEW_HOME --tiny

The new home's live version holds the source version's cells repeated (copy c of cell X is
`X~c`, its duplicate group `G~c`: copies are not each other's duplicates), with the same crops
(NEW_HOME/crops is a link to SOURCE_HOME/crops, so images still serve) and the same models, map,
classifier and feature ranges. Its latents are the source's tiled with noise
(`bench.common.tiled_latents`), so a copy is near, not equal to, its original; the FAISS index is
built over them as a build would (`LatentIndex.build`: IVF above 200k cells), and each cell's
map node is recomputed for its own latent. Where the source version calibrated novelty, the
copy's novelty scorer is fitted on a sample of its cells (leave-one-out within the sample: its
reference scores are therefore somewhat larger than a full-archive calibration would give;
the cost of a query, one search of the full index, is the same). Every file is written by
`AtlasVersion` and published by `AtlasStore`, so `cellatlas serve` loads it like any other; its
manifest says under "synthetic_scale" that it is one. For benchmarks only: its labels and
predictions are copies, not measurements.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))

from atlas.novelty import NoveltyScorer  # noqa: E402 - after making the repository importable
from atlas.search import LatentIndex  # noqa: E402
from atlas.store import AtlasNotFound, AtlasStore  # noqa: E402
from atlas.version import (  # noqa: E402
    BACKBONE,
    CROPS,
    FEATURE_RANGES,
    REJECTIONS,
    SOM,
    VAE_WEIGHTS,
    AtlasVersion,
)
from bench.common import set_threads, tiled_latents  # noqa: E402
from indexer.steps import som_best_nodes  # noqa: E402

TINY_CELLS = 3_000
TINY_NOVELTY_SAMPLE = 500
COPY_SEPARATOR = "~"  # cell id of copy c of cell X: X~c (URL-safe, never in a content-hash id)
# What the scale atlas takes from its source version unchanged (the models travel through the
# classifier's own writer, which also writes its classes file).
CARRIED = (SOM, BACKBONE, VAE_WEIGHTS, FEATURE_RANGES, REJECTIONS)


class ScaleAtlasError(RuntimeError):
    """The scale atlas cannot be made; the message says why."""


def scale_atlas(source: Path | str, home: Path | str, cells: int, noise: float = 0.1,
                novelty_sample: int = 20_000, index_kind: str | None = None, seed: int = 0,
                log=print) -> dict:
    """Publish, in the empty (or new) ATLAS_HOME `home`, a version of `cells` cells made from
    `source`'s live version; returns the manifest's "synthetic_scale" entry."""
    source, home = Path(source).resolve(), Path(home).resolve()
    if cells < 1:
        raise ScaleAtlasError(f"the scale atlas needs at least one cell, got {cells}")
    try:
        parent = AtlasStore(source).version(AtlasStore(source).require_current())
    except AtlasNotFound as error:
        raise ScaleAtlasError(str(error)) from error
    if home.exists() and any(home.iterdir()):
        raise ScaleAtlasError(f"{home} is not empty; give a new folder for the scale atlas")
    timings: dict[str, float] = {}

    def step(name: str, started: float) -> None:
        timings[name] = round(time.perf_counter() - started, 2)
        log(f"  {name}: {timings[name]:.1f} s")

    started = time.perf_counter()
    source_cells = parent.read_cells()
    rows = np.arange(cells) % len(source_cells)
    copy = (np.arange(cells) // len(source_cells)).astype(str)
    table = source_cells.iloc[rows].reset_index(drop=True)
    table["cell_id"] = table["cell_id"].astype(str) + COPY_SEPARATOR + copy
    table["duplicate_group"] = table["duplicate_group"].astype(str) + COPY_SEPARATOR + copy
    step("cells", started)

    started = time.perf_counter()
    latents = tiled_latents(parent.read_latents().astype(np.float32), cells, noise=noise, seed=seed)
    step("latents", started)

    started = time.perf_counter()
    index = LatentIndex.build(latents, index_kind)
    step(f"index ({index.kind})", started)

    started = time.perf_counter()
    som, _ = parent.read_som()
    nodes, node_distances = som_best_nodes(som, latents)
    table["som_row"], table["som_col"] = nodes[:, 0], nodes[:, 1]
    table["som_distance"] = node_distances
    step("map nodes", started)

    started = time.perf_counter()
    parent_novelty = parent.read_novelty()
    novelty, novelty_note = None, None
    if parent_novelty is not None:
        sample = np.sort(np.random.default_rng(seed).choice(cells, min(novelty_sample, cells), replace=False))
        entropy = (table["entropy_bits"].to_numpy()[sample]
                   if parent_novelty.combined and "entropy_bits" in table else None)
        novelty = NoveltyScorer(k=parent_novelty.k, level=parent_novelty.level).fit(
            LatentIndex.build(latents[sample]), latents[sample], table["duplicate_group"].to_numpy()[sample], entropy)
        novelty_note = f"fitted on a sample of {len(sample)} cells (leave-one-out within the sample)"
        step("novelty", started)

    started = time.perf_counter()
    store = AtlasStore(home)
    created = not home.exists()
    home.mkdir(parents=True, exist_ok=True)
    try:
        (home / CROPS).symlink_to(source / CROPS, target_is_directory=True)
        staging = store.new_staging("scale")
        files: AtlasVersion = store.staging_version(staging)
        files.write_cells(table)
        files.write_latents(latents)
        files.write_index(index)
        if novelty is not None:
            files.write_novelty(novelty)
        files.carry_over(parent, CARRIED)
        files.write_models(None, parent.read_classifier())
        synthetic = {
            "note": "synthetic scale atlas for benchmarks: the source's cells repeated, latents tiled with noise",
            "source_home": str(source), "source_version": parent.folder.name,
            "source_cells": len(source_cells), "cells": cells, "copies": int(-(-cells // len(source_cells))),
            "latent_noise": noise, "seed": seed, "index": index.kind, "novelty": novelty_note,
            "crops": f"{CROPS} links to {source / CROPS}",
        }
        parent_manifest = {k: v for k, v in parent.manifest.items() if k not in ("version", "job_id")}
        labels = table["label"].dropna().astype(str)
        manifest = {
            **parent_manifest,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "inputs": {**parent_manifest.get("inputs", {}), "cells": cells},
            "counts_by_class": {str(k): int(v) for k, v in labels.value_counts().items()},
            "synthetic_scale": synthetic,
        }
        step("write", started)
        manifest["synthetic_scale"]["timings_s"] = timings
        version = store.publish(staging, manifest)
    except BaseException:  # leave the home empty, as it was, so that the run can be repeated
        for path in home.iterdir():
            path.unlink() if path.is_symlink() or not path.is_dir() else shutil.rmtree(path)
        if created:
            home.rmdir()
        raise
    log(f"published version {version} of {home}: {cells} cells ({index.kind} index)")
    return synthetic


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", required=True, help="ATLAS_HOME whose live version is repeated")
    parser.add_argument("--home", required=True, help="new (or empty) ATLAS_HOME for the scale atlas")
    parser.add_argument("--cells", type=int, help=f"cells in the scale atlas (--tiny: {TINY_CELLS})")
    parser.add_argument("--noise", type=float, default=0.1,
                        help="latent noise, times each dimension's spread (default 0.1)")
    parser.add_argument("--novelty-sample", type=int,
                        help=f"cells the novelty scorer is fitted on (default 20000; --tiny: {TINY_NOVELTY_SAMPLE})")
    parser.add_argument("--index", choices=["exact", "ivf", "hnsw"],
                        help="index kind (default: by size, as a build chooses; --tiny: ivf)")
    parser.add_argument("--tiny", action="store_true",
                        help=f"a {TINY_CELLS}-cell atlas with an IVF index (a quick check that it serves)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.cells is None and not args.tiny:
        parser.error("give --cells N (or --tiny)")
    if ((args.cells is not None and args.cells < 1) or args.noise < 0 or args.threads < 1
            or (args.novelty_sample is not None and args.novelty_sample < 2)):
        parser.error("--cells and --threads must be >= 1, --noise >= 0 and --novelty-sample >= 2")
    set_threads(args.threads)
    cells = TINY_CELLS if args.cells is None else args.cells
    novelty_sample = args.novelty_sample or (TINY_NOVELTY_SAMPLE if args.tiny else 20_000)
    index_kind = args.index or ("ivf" if args.tiny else None)
    try:
        scale_atlas(args.source, args.home, cells, args.noise, novelty_sample, index_kind, args.seed,
                    log=lambda line: print(line, file=sys.stderr))
    except ScaleAtlasError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
