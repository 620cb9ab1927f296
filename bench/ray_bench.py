"""The per-cell stages of a build or an add (prepare: read, segment, describe, hash; embed:
backbone views + VAE) on each engine, with 1 and 2 workers: cells per second per stage, the
Ray cluster's start-up, and the driver's overhead per cell (Ray with one worker against the
local engine with one thread: the cost of shipping work and results).

    python bench/ray_bench.py --home ATLAS_HOME --images DIR [--limit 300] [--out F.json]

The atlas's frozen models (its live version) are used, as `cellatlas add` uses them; crops are
written to a scratch home per run, so every run does the same work. The latents of every run
are checked against the first run's.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import print_table, set_threads, timed  # noqa: E402

RUNS = (("local", 1), ("local", 2), ("ray", 1), ("ray", 2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ray_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", required=True, help="an ATLAS_HOME with a live version (its models are used)")
    parser.add_argument("--images", required=True, help="images to prepare and embed (sub-folders allowed)")
    parser.add_argument("--limit", type=int, default=300, help="images, a seeded random sample (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the JSON here too")
    args = parser.parse_args(argv)
    result = run(Path(args.home), Path(args.images), args.limit, args.seed)
    print_table(result["runs"], [("engine", "engine", "s"), ("workers", "workers", "d"),
                                 ("startup_s", "start s", ".1f"), ("prepare_cells_per_s", "prepare cells/s", ".1f"),
                                 ("embed_cells_per_s", "embed cells/s", ".1f"), ("cells_per_s", "both cells/s", ".1f"),
                                 ("prepare_fixed_s", "prep fixed s", ".1f"), ("embed_fixed_s", "embed fixed s", ".1f"),
                                 ("variable_ms_per_cell", "ms/cell w/o fixed", ".1f"),
                                 ("max_latent_difference", "max |latent diff|", ".1e")])
    print(f"driver overhead per cell (ray, 1 worker, against local, 1 thread; fixed costs out): "
          f"{result['driver_overhead_ms_per_cell']:.1f} ms; driver CPU per cell on ray: "
          f"{result['driver_cpu_ms_per_cell_ray']}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


def run(home: Path, images: Path, limit: int, seed: int) -> dict:
    from atlas.ingest import list_images
    from atlas.store import AtlasStore
    from indexer import steps
    from indexer.config import parent_config
    from indexer.engines import LocalEngine, RayEngine, RayOptions

    set_threads(1)
    files = AtlasStore(home).version(AtlasStore(home).require_current())
    records = list_images(images)
    records = sorted(random.Random(seed).sample(records, min(limit, len(records))), key=lambda r: str(r.path))
    segmenter, embedder = files.read_segmenter(), files.read_embedder(device="cpu")
    runs, reference = [], None
    for name, workers in RUNS:
        with tempfile.TemporaryDirectory(prefix="ray-bench-") as scratch:
            config = replace(parent_config(files.manifest, files.folder, Path(scratch), threads=workers, progress=False),
                             images=images)
            timing: dict = {}
            with timed(timing, "startup"):
                if name == "local":
                    engine = LocalEngine(workers)
                else:
                    import ray

                    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
                    engine = RayEngine(workers, RayOptions(workers=workers))
            try:
                set_threads(workers if name == "local" else 1)
                # The stage's fixed cost (worker processes or actors started, models loaded): the
                # same stage on 2 images. Every run of a stage starts its workers anew.
                with timed(timing, "prepare_fixed"):
                    few = steps.prepare_images(records[:2], segmenter, config, engine.map_images)
                with timed(timing, "embed_fixed"):
                    engine.embed(embedder, few.model_inputs)
                with timed(timing, "prepare"):
                    prepared = steps.prepare_images(records, segmenter, config, engine.map_images)
                with timed(timing, "embed"):
                    latents = engine.embed(embedder, prepared.model_inputs)
            finally:
                engine.close()
                if name == "ray":
                    import ray

                    ray.shutdown()
        reference = latents if reference is None else reference
        cells = len(latents)
        runs.append({"engine": name, "workers": workers, "images": len(records), "cells": cells,
                     "startup_s": timing["startup"], "prepare_s": timing["prepare"], "embed_s": timing["embed"],
                     "prepare_fixed_s": timing["prepare_fixed"], "embed_fixed_s": timing["embed_fixed"],
                     "variable_ms_per_cell": 1000 * (timing["prepare"] + timing["embed"] - timing["prepare_fixed"]
                                                     - timing["embed_fixed"]) / cells,
                     "prepare_cells_per_s": cells / timing["prepare"], "embed_cells_per_s": cells / timing["embed"],
                     "cells_per_s": cells / (timing["prepare"] + timing["embed"]),
                     "driver_cpu_s": timing["cpu_prepare"] + timing["cpu_embed"],
                     "max_latent_difference": float(np.abs(latents - reference).max())})
        print(f"{name} x{workers}: {runs[-1]['cells_per_s']:.1f} cells/s", file=sys.stderr, flush=True)
    by = {(r["engine"], r["workers"]): r for r in runs}
    per_cell = {key: r["variable_ms_per_cell"] / 1000 for key, r in by.items()}
    return {"atlas": str(files.folder), "images": str(images), "limit": limit, "seed": seed,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "runs": runs,
            # per cell, fixed costs taken out (the stages on 2 images): what Ray adds to each cell
            "driver_overhead_ms_per_cell": 1000 * (per_cell[("ray", 1)] - per_cell[("local", 1)]),
            "driver_cpu_ms_per_cell_ray": {w: 1000 * by[("ray", w)]["driver_cpu_s"] / by[("ray", w)]["cells"]
                                           for w in (1, 2)},
            "speedup_2_workers": {"local": per_cell[("local", 1)] / per_cell[("local", 2)],
                                  "ray": per_cell[("ray", 1)] / per_cell[("ray", 2)]}}


if __name__ == "__main__":
    raise SystemExit(main())
