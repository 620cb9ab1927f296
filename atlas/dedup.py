"""Near-duplicate cells by 64-bit average hash (imagehash) and a FAISS binary index.

The core design's rule: two cells of the same class whose average hashes differ by at most
2 bits are duplicates (the same cell captured twice); at 3 bits a person should look.
Duplicate groups are the connected components of the "<= 2 bits" graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import imagehash
import numpy as np
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

DUPLICATE_BITS = 2
REVIEW_BITS = 3


def average_hash(crop: np.ndarray) -> int:
    """The 64-bit average hash of an RGB crop, as an unsigned integer."""
    bits = imagehash.average_hash(Image.fromarray(crop), hash_size=8).hash.ravel()
    return int(np.packbits(bits.astype(np.uint8)).view(">u8")[0])


@dataclass
class DuplicateResult:
    group: np.ndarray  # (n,) group id per cell; a cell without duplicates is its own group
    duplicate_pairs: list[tuple[int, int, int]]  # (i, j, bits) with bits <= DUPLICATE_BITS
    review_pairs: list[tuple[int, int, int]]  # (i, j, bits) with bits == REVIEW_BITS


def find_duplicates(hashes: np.ndarray, labels: list[str | None]) -> DuplicateResult:
    """Group cells of the same label whose hashes are within DUPLICATE_BITS of each other."""
    n = len(hashes)
    pairs = hamming_pairs(hashes, REVIEW_BITS)
    label_codes = _codes(labels)
    same = [(i, j, d) for i, j, d in pairs if label_codes[i] == label_codes[j]]
    dup = [p for p in same if p[2] <= DUPLICATE_BITS]
    review = [p for p in same if p[2] == REVIEW_BITS]
    if dup:
        rows = np.array([p[0] for p in dup])
        cols = np.array([p[1] for p in dup])
        graph = coo_matrix((np.ones(len(dup)), (rows, cols)), shape=(n, n))
        _, group = connected_components(graph, directed=False)
    else:
        group = np.arange(n)
    return DuplicateResult(group=np.asarray(group, dtype=np.int64), duplicate_pairs=dup, review_pairs=review)


def hamming_pairs(hashes: np.ndarray, max_bits: int) -> list[tuple[int, int, int]]:
    """All pairs (i < j) whose 64-bit hashes differ by at most `max_bits` bits."""
    codes = _to_bytes(hashes)
    if len(codes) < 2:
        return []
    index = faiss.IndexBinaryFlat(64)
    index.add(codes)
    # range_search keeps distances strictly below the radius
    lims, distances, ids = index.range_search(codes, max_bits + 1)
    pairs = []
    for i in range(len(codes)):
        for d, j in zip(distances[lims[i] : lims[i + 1]], ids[lims[i] : lims[i + 1]]):
            if j > i:
                pairs.append((i, int(j), int(d)))
    return pairs


def hamming_to(hashes: np.ndarray, query: int, max_bits: int) -> np.ndarray:
    """Indices of the hashes within `max_bits` of one query hash."""
    codes = _to_bytes(hashes)
    index = faiss.IndexBinaryFlat(64)
    index.add(codes)
    lims, _, ids = index.range_search(_to_bytes(np.array([query], dtype=np.uint64)), max_bits + 1)
    return ids[lims[0] : lims[1]]


def _to_bytes(hashes: np.ndarray) -> np.ndarray:
    return np.asarray(hashes, dtype=np.uint64).astype(">u8").view(np.uint8).reshape(-1, 8)


def _codes(labels: list[str | None]) -> np.ndarray:
    names = {name: code for code, name in enumerate(sorted({str(v) for v in labels}))}
    return np.array([names[str(v)] for v in labels])
