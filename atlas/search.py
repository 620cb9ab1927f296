"""Nearest-neighbour search over cell embeddings with FAISS.

Distances are reported as the core design's mean squared error between latent vectors
(squared L2 divided by the dimension). Exact search (`IndexFlatL2`) up to `EXACT_LIMIT`
cells; above that an HNSW graph keeps queries in milliseconds.
"""

from __future__ import annotations

import faiss
import numpy as np

EXACT_LIMIT = 200_000


class LatentIndex:
    """`build(latents)` or `load(path)`; `search(queries, k)` -> (mse, positions)."""

    def __init__(self, index: faiss.Index):
        self.index = index

    @classmethod
    def build(cls, latents: np.ndarray) -> LatentIndex:
        latents = np.ascontiguousarray(latents, dtype=np.float32)
        dim = latents.shape[1]
        index = faiss.IndexFlatL2(dim) if len(latents) <= EXACT_LIMIT else faiss.IndexHNSWFlat(dim, 32)
        index.add(latents)
        return cls(index)

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
