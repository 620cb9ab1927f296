"""SOM benchmark (issue #15): CellAtlas's batch SOM against somoclu and MiniSom, in one run.

    PYTHONPATH=. .venv/bin/python bench/som_bench.py [--tiny] [--latents FILE.npy|VERSION_DIR]
        [--threads 1] [--out som.json] [--schedules] [--seeds N]
    (or: cellatlas bench som ...)

The core design's setting: 61,710 x 50 standardised vectors on a 244x244 rectangular map, 10
epochs; data: a synthetic 19-cluster mixture and, with --latents, real latents tiled with noise.
- CellAtlas `BatchSOM` with its default initialisation and schedule;
- somoclu (batch SOM, C++/OpenMP) with the same epochs, the same Gaussian (no compact support),
  the same radius at every epoch (somoclu's radius = sigma / std_coeff) and the same starting
  codebook; its learning scale multiplies both sums of the batch update, so it cancels;
- MiniSom `train_random` (one sample per iteration): time per iteration over a few thousand
  iterations, extrapolated to the core design's 1,000,000; its errors are those after the
  iterations it ran, not after a million.
Every map's quantization and topographic errors come from one function, `atlas.som.map_errors`.
`--seeds N` draws the data N times and adds the means: CellAtlas and somoclu run the same
algorithm, so their maps differ only where float rounding (summation order, the distance
formula) sends them apart over the epochs, and one draw's difference of QE or TE may be that noise.
`--schedules` instead measures CellAtlas's map under other initialisations and radius schedules
(and, with --latents, the build's own map shape and epochs before and after the change).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    cluster_mixture,
    print_table,
    read_latents,
    set_threads,
    standardised,
    tiled_latents,
    timed,
    write_json,
)

SOMOCLU_STD_COEFF = 0.5  # somoclu's Gaussian sigma = std_coeff x radius
MINISOM_EXTRAPOLATE_TO = 1_000_000
# The build's map before issue #15: random data points, sigma from half the longer side down to
# 0.5, exponentially.
BEFORE = {"initialisation": "random", "decay": "exponential", "sigma_end": 0.5, "start_fraction": 1 / 2}
SCHEDULES = [
    ("before: random init, exp decay, start side/2, end 0.5", BEFORE),
    ("PCA init, exp decay, start side/2, end 0.5", {"decay": "exponential", "sigma_end": 0.5, "start_fraction": 1 / 2}),
    ("PCA init, exp decay, start side/2, end 1.0", {"decay": "exponential", "sigma_end": 1.0, "start_fraction": 1 / 2}),
    ("PCA init, exp decay, start side/2, end 0.3", {"decay": "exponential", "sigma_end": 0.3, "start_fraction": 1 / 2}),
    ("PCA init, linear decay, start side/2, end 0.5", {"decay": "linear", "sigma_end": 0.5, "start_fraction": 1 / 2}),
    ("random init, linear decay, start side/2, end 0.5", {"initialisation": "random", "decay": "linear"}),
    ("PCA init, exp decay, start side/4, end 0.5", {"sigma_end": 0.5, "start_fraction": 1 / 4}),
    ("PCA init, exp decay, start side/16, end 0.5", {"sigma_end": 0.5, "start_fraction": 1 / 16}),
    ("PCA init, exp decay, start side/8, end 0.3", {"sigma_end": 0.3, "start_fraction": 1 / 8}),
    ("default now: PCA init, exp decay, start side/8, end 0.5", {}),
]
COLUMNS = [("data", "data", "s"), ("tool", "tool", "s"), ("seconds", "seconds", ".1f"),
           ("cpu_seconds", "CPU s", ".1f"),
           ("quantization_error", "QE", ".3f"), ("topographic_error", "TE", ".3f"),
           ("threads", "threads", "d")]


MIXTURE, LATENTS = "synthetic 19 clusters", "real latents tiled"


def data_sets(args) -> dict[str, np.ndarray]:
    """The data of the run: the mixture (and with --latents the tiled latents), drawn with seeds
    0 .. --seeds - 1; a name carries its seed when there are several."""
    named = (lambda name, seed: f"{name}, seed {seed}") if args.seeds > 1 else (lambda name, seed: name)
    sets = {named(MIXTURE, seed): standardised(cluster_mixture(args.cells, 50, 19, seed=seed))
            for seed in range(args.seeds)}
    if args.latents:
        latents = read_latents(args.latents)
        sets |= {named(LATENTS, seed): standardised(tiled_latents(latents, args.cells, seed=seed))
                 for seed in range(args.seeds)}
    else:
        print("real latents: not run (pass --latents FILE.npy or an atlas version folder)")
    return sets


def seed_means(rows: list[dict], seeds: int) -> list[dict]:
    """Per data kind and tool, the mean over the seeds of the time and both errors, and in how
    many seeds CellAtlas's QE and TE were at most that tool's (the maps of two tools running the
    same algorithm part ways by rounding, so one seed's difference can be noise); none for one seed."""
    if seeds == 1:
        return []
    means = []
    for kind in (MIXTURE, LATENTS):
        mine = [r for r in rows if r["data"].startswith(kind) and "skipped" not in r]
        ours = {r["data"]: r for r in mine if r["tool"] == "cellatlas"}
        for tool in dict.fromkeys(r["tool"] for r in mine):
            runs = [r for r in mine if r["tool"] == tool]
            mean = {"data": f"{kind}, mean of {len(runs)} seeds", "tool": tool, "threads": runs[0]["threads"]}
            for key in ("seconds", "cpu_seconds", "quantization_error", "topographic_error"):
                mean[key] = float(np.mean([r[key] for r in runs]))
            if tool != "cellatlas":
                for key, short in (("quantization_error", "qe"), ("topographic_error", "te")):
                    mean[f"seeds_cellatlas_{short}_at_most"] = sum(ours[r["data"]][key] <= r[key] for r in runs)
            means.append(mean)
    return means


def errors(weights: np.ndarray, data: np.ndarray) -> dict:
    from atlas.som import map_errors

    quantization, topographic = map_errors(weights, data)
    return {"quantization_error": quantization, "topographic_error": topographic}


def cellatlas_som(data: np.ndarray, args, **schedule):
    from atlas.som import BatchSOM

    start_fraction = schedule.pop("start_fraction", None)
    if start_fraction is not None:
        schedule["sigma_start"] = max(args.rows, args.cols) * start_fraction
    som = BatchSOM(args.rows, args.cols, epochs=args.epochs, seed=args.seed, standardise=False, **schedule)
    row = {"tool": "cellatlas", "threads": args.threads}
    with timed(row):
        som.fit(data)
    return som, row | errors(som.weights_, data)


def somoclu_som(data: np.ndarray, args, like) -> dict:
    """somoclu with `like`'s epochs, radius at every epoch and starting codebook."""
    try:
        import somoclu
    except ImportError:
        print("somoclu not installed (pip install --no-build-isolation somoclu, with numpy installed "
              "and no nvcc on PATH; or pip install -e '.[bench]'): skipped")
        return {"tool": "somoclu", "skipped": "not installed"}
    epochs = like.epochs
    radius0, radius_end = like.sigma_start / SOMOCLU_STD_COEFF, like.sigma_end / SOMOCLU_STD_COEFF
    if like.decay == "exponential" and epochs > 1:
        # somoclu decays as r0 * (rN / r0) ** (epoch / epochs), ours to the end at epoch
        # epochs - 1: this rN gives the same radius at every epoch.
        radius_end = radius0 * (radius_end / radius0) ** (epochs / (epochs - 1))
    som = somoclu.Somoclu(like.cols, like.rows, initialcodebook=like.initial_codebook(data).copy(),
                          maptype="planar", gridtype="rectangular", compactsupport=False,
                          neighborhood="gaussian", std_coeff=SOMOCLU_STD_COEFF)
    row = {"tool": "somoclu", "threads": args.threads}
    with timed(row):
        som.train(data, epochs=epochs, radius0=radius0, radiusN=radius_end, radiuscooling=like.decay)
    return row | errors(som.codebook.reshape(like.rows, like.cols, -1), data)


def minisom_som(data: np.ndarray, args) -> dict:
    from minisom import MiniSom

    som = MiniSom(args.rows, args.cols, data.shape[1], sigma=max(args.rows, args.cols) / 2,
                  learning_rate=0.5, random_seed=args.seed)
    som.random_weights_init(data)
    timing = {}
    with timed(timing):
        som.train_random(data, args.minisom_iterations)
    scale = MINISOM_EXTRAPOLATE_TO / args.minisom_iterations
    return {"tool": f"minisom ({args.minisom_iterations} it.)", "threads": 1,
            "seconds_per_iteration": timing["seconds"] / args.minisom_iterations,
            "seconds": timing["seconds"] * scale, "cpu_seconds": timing["cpu_seconds"] * scale,
            "extrapolated_to_iterations": MINISOM_EXTRAPOLATE_TO,
            "iterations_run": args.minisom_iterations} | errors(som.get_weights(), data)


def compare(args) -> dict:
    rows = []
    for name, data in data_sets(args).items():
        print(f"{name}: {len(data)} x {data.shape[1]}, map {args.rows}x{args.cols}, {args.epochs} epochs")
        som, ours = cellatlas_som(data, args)
        found = [ours]
        if not args.no_somoclu:
            found.append(somoclu_som(data, args, som))
        if args.minisom_iterations > 0:
            found.append(minisom_som(data, args))
        for row in found:
            row["data"] = name
            if "skipped" not in row:
                print(f"  {row['tool']}: {row['seconds']:.1f} s (CPU {row['cpu_seconds']:.1f} s), "
                      f"QE {row['quantization_error']:.3f}, TE {row['topographic_error']:.3f}", flush=True)
            if row.get("seconds"):
                row["cellatlas_speedup"] = row["seconds"] / ours["seconds"]
                row["cellatlas_speedup_cpu"] = row["cpu_seconds"] / ours["cpu_seconds"]
        rows += found
    columns = COLUMNS + [("cellatlas_speedup", "x ours", ".1f"), ("cellatlas_speedup_cpu", "x ours CPU", ".1f")]
    print_table([r for r in rows if "skipped" not in r], columns)
    means = seed_means(rows, args.seeds)
    if means:
        print_table(means, COLUMNS + [("seeds_cellatlas_qe_at_most", "ours QE <=", "d"),
                                      ("seeds_cellatlas_te_at_most", "ours TE <=", "d")])
    return {"benchmark": "som", "setting": _setting(args), "results": rows, "means_over_seeds": means}


def schedules(args) -> dict:
    rows = []
    for name, data in data_sets(args).items():
        for label, schedule in SCHEDULES:
            if args.only and not any(text in label for text in args.only):
                continue
            _, row = cellatlas_som(data, args, **dict(schedule))
            rows.append(row | {"data": name, "tool": label, "schedule": schedule})
            print(f"  {name}: {label}: QE {row['quantization_error']:.3f} TE {row['topographic_error']:.3f}"
                  f" ({row['seconds']:.1f} s)", flush=True)
    if args.latents:
        rows += build_shape(args)
    print_table(rows, COLUMNS)
    return {"benchmark": "som-schedules", "setting": _setting(args), "results": rows}


def build_shape(args) -> list[dict]:
    """The build's own map (rule-of-thumb shape, the build's epochs, standardising) on the real
    latents, before and after the change of initialisation and schedule."""
    from atlas.som import BatchSOM, grid_shape_for, standard_scale
    from indexer.config import BuildConfig

    def like_build(schedule: dict) -> dict:
        schedule = dict(schedule)
        fraction = schedule.pop("start_fraction", None)
        return schedule | ({"sigma_start": max(rows, cols) * fraction} if fraction else {})

    latents = read_latents(args.latents)
    mean, std = standard_scale(latents)
    rows, cols = grid_shape_for((latents - mean) / std)
    epochs = BuildConfig.__dataclass_fields__["som_epochs"].default
    found = []
    for label, schedule in (("build map before", BEFORE), ("build map now", {})):
        som = BatchSOM(rows, cols, epochs=epochs, seed=args.seed, **like_build(schedule))
        row = {"data": f"real latents {len(latents)} at {rows}x{cols}, {epochs} epochs", "tool": label,
               "threads": args.threads}
        with timed(row):
            som.fit(latents)
        found.append(row | errors(som.weights_, (latents - som.mean_) / som.std_))
    return found


def _setting(args) -> dict:
    return {"cells": args.cells, "dim": 50, "map": [args.rows, args.cols], "epochs": args.epochs,
            "threads": args.threads, "minisom_iterations": args.minisom_iterations, "tiny": args.tiny,
            "seeds": args.seeds,
            "latents": str(args.latents) if args.latents else None}


def parse(argv):
    parser = argparse.ArgumentParser(prog="cellatlas bench som", description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a seconds-long run (CI): 600 cells, 12x12 map")
    parser.add_argument("--out", type=Path, help="write the figures to this JSON file")
    parser.add_argument("--latents", type=Path, help="real latents: a .npy file or an atlas version folder")
    parser.add_argument("--cells", type=int, default=61_710)
    parser.add_argument("--rows", type=int, default=244)
    parser.add_argument("--cols", type=int, default=244)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="for every tool (OMP_NUM_THREADS, torch)")
    parser.add_argument("--minisom-iterations", type=int, default=3000, help="0 leaves MiniSom out")
    parser.add_argument("--no-somoclu", action="store_true")
    parser.add_argument("--schedules", action="store_true", help="measure initialisations and schedules")
    parser.add_argument("--only", nargs="+", metavar="TEXT", help="with --schedules: only those whose label has TEXT")
    parser.add_argument("--seed", type=int, default=0, help="the maps' seed (random starts, MiniSom)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="draw the data this many times (seeds 0, 1, ...) and report the means too")
    args = parser.parse_args(argv)
    if args.tiny:
        args.cells, args.rows, args.cols, args.epochs = 600, 12, 12, 3
        args.minisom_iterations = min(args.minisom_iterations, 200)
    if min(args.cells, args.rows, args.cols, args.epochs, args.threads, args.seeds) < 1 or args.minisom_iterations < 0:
        parser.error("--cells, --rows, --cols, --epochs, --threads and --seeds must be positive")
    return args


def run(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    set_threads(args.threads)
    result = schedules(args) if args.schedules else compare(args)
    write_json(result, args.out)
    return result


def main(argv: list[str] | None = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
