"""Near-duplicate cells by average hash (imagehash) and a FAISS binary index.

The core design's rule: two cells of the same class whose 64-bit average hashes differ by at
most 2 bits are duplicates (the same cell captured twice); at 3 bits a person should look.

On nucleus-centred crops the 64-bit hash alone is too coarse: every large round cell hashes
to nearly `ffffc3c3c3c3ffff` (a dark square in the middle), and chaining such pairs joined 201
different eosinophils into one "duplicate" group (measured on 7,469 PBC cells: 1,950
same-class pairs within 2 bits). So each candidate pair is confirmed with a 256-bit (16x16)
average hash: the 8 true copies in those pairs differed by 0 of 256 bits, every other pair
by 15 or more (median 47). Duplicates are candidate pairs within CONFIRM_BITS of 256; duplicate
groups are the connected components of the confirmed pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import imagehash
import numpy as np
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

DUPLICATE_BITS = 2  # of 64, the core design's rule
REVIEW_BITS = 3  # of 64: a person should look
CONFIRM_BITS = 12  # of 256 (5%): the fine hash agrees that the two crops are one cell
REVIEW_CONFIRM_BITS = 26  # of 256 (10%): close enough at 3 bits to be worth a look


def average_hash(crop: np.ndarray) -> int:
    """The 64-bit average hash of an RGB crop, as an unsigned integer."""
    bits = imagehash.average_hash(Image.fromarray(crop), hash_size=8).hash.ravel()
    return int(np.packbits(bits.astype(np.uint8)).view(">u8")[0])


def fine_hash(crop: np.ndarray) -> str:
    """The 256-bit (16x16) average hash of an RGB crop, as 64 hex digits."""
    return str(imagehash.average_hash(Image.fromarray(crop), hash_size=16))


def fine_distance(a: str, b: str) -> int:
    """Bits that differ between two fine hashes."""
    return int(np.unpackbits(np.frombuffer(bytes.fromhex(a), np.uint8) ^ np.frombuffer(bytes.fromhex(b), np.uint8)).sum())


@dataclass
class DuplicateResult:
    group: np.ndarray  # (n,) group id per cell; a cell without duplicates is its own group
    duplicate_pairs: list[tuple[int, int, int]]  # (i, j, bits) with bits <= DUPLICATE_BITS
    review_pairs: list[tuple[int, int, int]]  # (i, j, bits) with bits == REVIEW_BITS


def find_duplicates(hashes: np.ndarray, fine_hashes: list[str], labels: list[str | None]) -> DuplicateResult:
    """Group cells of the same label whose 64-bit hashes are within DUPLICATE_BITS and whose
    fine hashes confirm it (within CONFIRM_BITS); list 3-bit pairs that look close for review."""
    n = len(hashes)
    pairs = hamming_pairs(hashes, REVIEW_BITS)
    label_codes = _codes(labels)
    same = [(i, j, d) for i, j, d in pairs if label_codes[i] == label_codes[j]]
    dup, review = [], []
    for i, j, bits in same:
        fine = fine_distance(fine_hashes[i], fine_hashes[j])
        if bits <= DUPLICATE_BITS and fine <= CONFIRM_BITS:
            dup.append((i, j, bits))
        elif bits == REVIEW_BITS and fine <= REVIEW_CONFIRM_BITS:
            review.append((i, j, bits))
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
