"""`cellatlas bench som|search|dedup|index|ray`: the benchmarks of bench/ (issue #15), each with its peers
in the same run, a short table and `--out FILE.json`; `--tiny` runs one in seconds.

The benchmarks live in the repository's `bench/` folder beside the packages (they need peers
the product does not: somoclu, MiniSom); this command runs them from a checkout.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

BENCHMARKS = {
    "som": "CellAtlas's batch SOM against somoclu and MiniSom (244x244 map, 61,710 x 50)",
    "search": "exact, IVF and HNSW search at 100k and 1M latents: latency, recall@8, memory",
    "dedup": "every pair of 1M average hashes within 2 bits, against the naive all-pairs scan",
    "index": "cells per second of each indexing step and end to end, against a plain single-process loop",
    "ray": "the per-cell stages on the local and the Ray engine, 1 and 2 workers: cells/s, fixed and driver costs",
}


def add_commands(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark against its peers (som, search, dedup, index, ray)",
                       description="; ".join(f"{name}: {text}" for name, text in BENCHMARKS.items()))
    p.add_argument("benchmark", choices=sorted(BENCHMARKS))
    p.add_argument("options", nargs=argparse.REMAINDER,
                   help="the benchmark's own options (--tiny, --out FILE.json, --threads N, ...; "
                        "see cellatlas bench NAME --help)")
    p.set_defaults(run=cmd_bench)


def cmd_bench(args) -> int:
    return benchmark_module(args.benchmark).main(args.options)


def benchmark_module(name: str):
    repository = Path(__file__).resolve().parents[2]
    if not (repository / "bench" / f"{name}_bench.py").is_file():
        raise FileNotFoundError(f"bench/{name}_bench.py not found beside the package: the benchmarks "
                                "run from a checkout of the repository")
    if str(repository) not in sys.path:
        sys.path.insert(0, str(repository))
    return importlib.import_module(f"bench.{name}_bench")
