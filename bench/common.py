"""What the benchmarks share: their data sets, a timer, the table they print and the JSON they write.

Data sets (float32, cells x 50 unless told):
- `cluster_mixture`: a synthetic mixture of Gaussian clusters of uneven sizes and shapes;
- `tiled_latents`: real latents (a `.npy` file or an atlas version folder) repeated to the
  wanted size, each copy with Gaussian noise of `noise` times each dimension's spread, so a
  million-cell archive keeps the real data's shape without a million real cells.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

REPOSITORY = Path(__file__).resolve().parents[1]


def set_threads(threads: int) -> None:
    """One thread count for every library in the run (torch, FAISS, OpenMP peers such as
    somoclu, which read OMP_NUM_THREADS when they load)."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import faiss
    import torch

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)


def cluster_mixture(n: int, dim: int = 50, clusters: int = 19, seed: int = 0) -> np.ndarray:
    """n points from `clusters` Gaussian clusters (centres 3 standard deviations apart on
    average, per-dimension spreads 0.3 to 1, sizes from a Dirichlet draw)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3 / np.sqrt(2), (clusters, dim))
    spreads = rng.uniform(0.3, 1.0, (clusters, dim))
    members = rng.choice(clusters, size=n, p=rng.dirichlet(np.full(clusters, 2.0)))
    return (centres[members] + rng.normal(size=(n, dim)) * spreads[members]).astype(np.float32)


def read_latents(source: Path | str) -> np.ndarray:
    """Latents from a `.npy` file or from an atlas version folder (versions/NNNNNN)."""
    source = Path(source)
    if source.is_dir():
        from atlas.version import AtlasVersion

        return AtlasVersion(source, source.parents[1]).read_latents().astype(np.float32)
    if not source.is_file():
        raise FileNotFoundError(f"no latents at {source}: give a latents .npy file or an atlas version folder")
    return np.load(source).astype(np.float32)


def tiled_latents(latents: np.ndarray, n: int, noise: float = 0.1, seed: int = 0) -> np.ndarray:
    """`latents` repeated to n rows, each row plus Gaussian noise of `noise` x that dimension's
    standard deviation (the first copy too, so no row is an exact duplicate)."""
    rng = np.random.default_rng(seed)
    rows = latents[np.arange(n) % len(latents)]
    return (rows + rng.normal(size=rows.shape) * noise * latents.std(0)).astype(np.float32)


def standardised(data: np.ndarray) -> np.ndarray:
    return ((data - data.mean(0)) / (data.std(0) + 1e-6)).astype(np.float32)


@contextmanager
def timed(into: dict, key: str = "seconds"):
    """Store the wall time of the block in `into[key]` and the CPU time this process spent in it
    (all its threads) in `into["cpu_" + key]`: on a shared machine the CPU time of a one-thread
    run is the figure that contention does not inflate."""
    start, cpu_start = time.perf_counter(), time.process_time()
    yield
    into[key] = time.perf_counter() - start
    into["cpu_" + key] = time.process_time() - cpu_start


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """Print rows as a table; columns: (key, heading, format such as '.3f'); missing = '-'."""
    cells = [[("-" if row.get(key) is None else format(row[key], fmt)) for key, _, fmt in columns]
             for row in rows]
    widths = [max([len(heading)] + [len(line[i]) for line in cells]) for i, (_, heading, _) in enumerate(columns)]
    print("  ".join(f"{heading:>{w}}" for (_, heading, _), w in zip(columns, widths)))
    for line in cells:
        print("  ".join(f"{cell:>{w}}" for cell, w in zip(line, widths)))


def write_json(result: dict, out: Path | str | None) -> None:
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2, default=_plain))
        print(f"figures written to {out}")


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
