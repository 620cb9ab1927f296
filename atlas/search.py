"""Nearest-neighbour search over cell embeddings with FAISS.

Distances are reported as the core design's mean squared error between latent vectors
(squared L2 divided by the dimension: L2 indexes rank cells exactly as the MSE does).

The index type follows the archive's size (`INDEX_BY_SIZE`), chosen on measurements
(bench/search_bench.py: real latents tiled with noise and a synthetic mixture, 100k and 1M
cells, one thread) so that recall@8 against exact search stays >= 0.98:
- "exact" (`IndexFlatL2`): every cell compared; a single query costs O(n);
- "ivf" (`IndexIVFFlat`): cells in about sqrt(n) k-means lists, the IVF_NPROBE nearest searched;
- "hnsw" (`IndexHNSWFlat`): a navigable small-world graph, HNSW_EF_SEARCH candidates kept.
Search-time settings are set again whenever an index is built or loaded, so an atlas saved
before this table existed (always exact) loads and searches as it did.
"""

from __future__ import annotations

import math

import faiss
import numpy as np

INDEX_KINDS = ("exact", "ivf", "hnsw")
# (largest archive, index kind), first match wins; None = no upper bound.
# Measured (bench/search_bench.py, 1 thread, shared machine): exact search answers one query in
# 0.7 ms at 100k cells but 29-38 ms at 1M; IVF (sqrt(n) lists, 64 probed) 0.95 ms at 1M with
# recall@8 0.9975 (synthetic) and 1.0 (real latents tiled), 32 probed fell to 0.966. HNSW
# (M 32, efSearch 64) reached only 0.986 at 100k and took 28-53 s to build there (IVF 0.4-7 s),
# at 2.3x the memory per cell.
INDEX_BY_SIZE: tuple[tuple[int | None, str], ...] = (
    (200_000, "exact"),
    (None, "ivf"),
)
IVF_NPROBE = 64  # lists searched per query
HNSW_M = 32  # graph neighbours per cell
HNSW_EF_CONSTRUCTION = 64
HNSW_EF_SEARCH = 64  # candidates kept while searching


def index_kind_for(cells: int) -> str:
    """The index kind `INDEX_BY_SIZE` names for an archive of `cells` cells."""
    for largest, kind in INDEX_BY_SIZE:
        if largest is None or cells <= largest:
            return kind
    return INDEX_BY_SIZE[-1][1]


class LatentIndex:
    """`build(latents)` or `load(path)`; `search(queries, k)` -> (mse, positions)."""

    def __init__(self, index: faiss.Index):
        self.index = _with_search_settings(index)

    @classmethod
    def build(cls, latents: np.ndarray, kind: str | None = None) -> LatentIndex:
        """An index over `latents` (row i = cell i) of `kind`, by default the one
        `INDEX_BY_SIZE` names for their number."""
        latents = np.ascontiguousarray(latents, dtype=np.float32)
        index = empty_index(latents, kind)
        index.add(latents)
        return cls(index)

    @classmethod
    def merged(cls, shards: list[faiss.Index]) -> LatentIndex:
        """One index from shards of one `empty_index`, each filled with the cells that follow
        the previous shard's (row positions run on across shards)."""
        index = shards[0]
        for shard in shards[1:]:
            index.merge_from(shard, index.ntotal)
        return cls(index)

    @property
    def kind(self) -> str:
        """"exact", "ivf" or "hnsw"."""
        if isinstance(self.index, faiss.IndexIVF):
            return "ivf"
        return "hnsw" if isinstance(self.index, faiss.IndexHNSW) else "exact"

    def extended(self, latents: np.ndarray) -> LatentIndex:
        """A copy of this index with `latents` appended (their positions follow the existing
        ones); this index is left as it is, for the requests still using it."""
        copy = faiss.clone_index(self.index)
        copy.add(np.ascontiguousarray(latents, dtype=np.float32))
        return LatentIndex(copy)

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest cells of each query row: (mse distances, row positions), nearest first.
        Positions are -1 where the archive has fewer than k cells."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        k = min(k, self.size)
        squared, positions = self.index.search(queries, k)
        return squared / queries.shape[1], positions

    def save(self, path) -> None:
        faiss.write_index(self.index, str(path))

    @classmethod
    def load(cls, path) -> LatentIndex:
        return cls(faiss.read_index(str(path)))


def empty_index(latents: np.ndarray, kind: str | None = None) -> faiss.Index:
    """An index of `kind` (default: by the number of `latents`, `INDEX_BY_SIZE`) ready for them:
    IVF lists trained on a sample of them, no cell added yet."""
    kind = kind or index_kind_for(len(latents))
    if kind not in INDEX_KINDS:
        raise ValueError(f"index kind must be one of {INDEX_KINDS}, got {kind!r}")
    dim = latents.shape[1]
    if kind == "ivf" and len(latents) >= 2:
        lists = max(1, min(round(math.sqrt(len(latents))), len(latents) // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, lists)
        sample = np.random.default_rng(0).permutation(len(latents))[: 50 * lists]
        index.train(np.ascontiguousarray(latents[np.sort(sample)], dtype=np.float32))
        return index
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_M)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        return index
    return faiss.IndexFlatL2(dim)


def _with_search_settings(index: faiss.Index) -> faiss.Index:
    """The index with this module's search-time settings (they are not all saved with it)."""
    if isinstance(index, faiss.IndexIVF):
        index.nprobe = min(IVF_NPROBE, index.nlist)
    elif isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = HNSW_EF_SEARCH
    return index
