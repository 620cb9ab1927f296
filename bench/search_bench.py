"""Search benchmark (issue #15): exact, IVF and HNSW (FAISS) over latents, in one run.

    PYTHONPATH=. .venv/bin/python bench/search_bench.py [--tiny] [--latents FILE.npy|VERSION_DIR]
        [--sizes 100000 1000000] [--threads 1] [--out search.json]
    (or: cellatlas bench search ...)

For each archive size and data set (a synthetic 19-cluster mixture; with --latents, real latents
tiled with noise), each index kind of `atlas.search.LatentIndex` at its default settings:
build time, memory per cell (the serialised index), single-query latency p50/p99 at k=8,
batch throughput, and recall@8 against exact search (queries are new cells drawn like the
archive, not in it). IVF and HNSW are also measured at other search settings (nprobe,
efSearch), the figures `INDEX_BY_SIZE` and its constants were chosen from; "auto" names the
kind the table picks for that size. MSE between latents is squared L2 / dim, so L2 indexes
rank cells exactly as the MSE does.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    cluster_mixture,
    print_table,
    read_latents,
    set_threads,
    tiled_latents,
    timed,
    write_json,
)

K = 8
SWEEP = {"ivf": ("nprobe", (8, 16, 32, 64, 128)), "hnsw": ("efSearch", (16, 32, 64, 128))}
COLUMNS = [("data", "data", "s"), ("cells", "cells", "d"), ("kind", "kind", "s"), ("setting", "setting", "s"),
           ("build_seconds", "build s", ".1f"), ("bytes_per_cell", "B/cell", ".0f"),
           ("p50_ms", "p50 ms", ".3f"), ("p99_ms", "p99 ms", ".3f"),
           ("batch_queries_per_second", "batch q/s", ".0f"), ("recall_at_8", "recall@8", ".4f")]


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each query's exact k nearest cells that the index also returned."""
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, exact)]))


def latency(index, queries: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Positions found for each query searched alone, and p50 / p99 of those searches in ms."""
    found, times = [], []
    for query in queries:
        start = time.perf_counter()
        _, positions = index.search(query[None], K)
        times.append(time.perf_counter() - start)
        found.append(positions[0])
    times_ms = np.array(times) * 1000
    return np.array(found), float(np.percentile(times_ms, 50)), float(np.percentile(times_ms, 99))


def measure(index, single: np.ndarray, batch: np.ndarray, exact: np.ndarray | None) -> dict:
    found, p50, p99 = latency(index, single)
    start = time.perf_counter()
    index.search(batch, K)
    row = {"p50_ms": p50, "p99_ms": p99,
           "batch_queries_per_second": len(batch) / (time.perf_counter() - start)}
    row["recall_at_8"] = recall_at_k(found, exact) if exact is not None else 1.0
    return row | {"found": found}


def data_sets(args, cells: int) -> dict[str, np.ndarray]:
    extra = args.queries + args.batch
    sets = {"synthetic 19 clusters": cluster_mixture(cells + extra, 50, 19, seed=1)}
    if args.latents:
        sets["real latents tiled"] = tiled_latents(read_latents(args.latents), cells + extra, seed=1)
    return sets


def run_size(args, cells: int) -> list[dict]:
    import faiss

    from atlas.search import LatentIndex, index_kind_for

    rows = []
    for name, data in data_sets(args, cells).items():
        rng = np.random.default_rng(2)
        order = rng.permutation(len(data))
        archive = data[np.sort(order[:cells])]
        single = data[order[cells : cells + args.queries]]
        batch = data[order[cells + args.queries :]]
        exact = None
        for kind in args.kinds:
            row = {"data": name, "cells": cells, "kind": kind, "setting": "default", "threads": args.threads}
            with timed(row, "build_seconds"):
                index = LatentIndex.build(archive, kind)
            row["bytes_per_cell"] = len(faiss.serialize_index(index.index)) / cells
            row |= measure(index, single, batch, exact)
            if kind == "exact":
                exact = row["found"]
            rows.append(row)
            print(f"  {name} {cells}: {kind}: p50 {row['p50_ms']:.3f} ms, recall {row['recall_at_8']:.4f}",
                  flush=True)
            if kind in SWEEP and exact is not None:
                setting, values = SWEEP[kind]
                for value in values:
                    target = index.index.hnsw if kind == "hnsw" else index.index
                    setattr(target, setting, value)
                    rows.append({"data": name, "cells": cells, "kind": kind, "setting": f"{setting}={value}",
                                 "threads": args.threads} | measure(index, single, batch, exact))
            del index
        auto = index_kind_for(cells)
        chosen = next((r for r in rows if r["data"] == name and r["cells"] == cells and r["kind"] == auto
                       and r["setting"] == "default"), None)
        rows.append({"data": name, "cells": cells, "kind": f"auto -> {auto}", "setting": "default",
                     "recall_at_8": chosen["recall_at_8"] if chosen else None,
                     "p50_ms": chosen["p50_ms"] if chosen else None})
    for row in rows:
        row.pop("found", None)
    return rows


def parse(argv):
    parser = argparse.ArgumentParser(prog="cellatlas bench search", description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a seconds-long run (CI): 3,000 cells")
    parser.add_argument("--out", type=Path, help="write the figures to this JSON file")
    parser.add_argument("--latents", type=Path, help="real latents: a .npy file or an atlas version folder")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--kinds", nargs="+", default=["exact", "ivf", "hnsw"], choices=["exact", "ivf", "hnsw"])
    parser.add_argument("--queries", type=int, default=1000, help="single queries timed one by one")
    parser.add_argument("--batch", type=int, default=2000, help="queries in the one batch search")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.tiny:
        args.sizes, args.queries, args.batch = [3000], 100, 200
    if min(args.sizes + [args.queries, args.batch, args.threads]) < 1:
        parser.error("--sizes, --queries, --batch and --threads must be positive")
    if args.kinds[0] != "exact":
        parser.error("--kinds must start with exact: recall is measured against it")
    return args


def run(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    set_threads(args.threads)
    if not args.latents:
        print("real latents: not run (pass --latents FILE.npy or an atlas version folder)")
    rows = []
    for cells in args.sizes:
        rows += run_size(args, cells)
    print_table(rows, COLUMNS)
    result = {"benchmark": "search", "k": K,
              "setting": {"sizes": args.sizes, "queries": args.queries, "batch": args.batch,
                          "threads": args.threads, "tiny": args.tiny,
                          "latents": str(args.latents) if args.latents else None},
              "results": rows}
    write_json(result, args.out)
    return result


def main(argv: list[str] | None = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
