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
    """All pairs (i < j) whose 64-bit hashes differ by at most `max_bits` bits, sorted by i then
    j: the same pairs as comparing every hash with every other (tests/test_dedup.py), found by
    multi-index hashing instead (see `_pair_index`)."""
    codes = _to_bytes(hashes)
    if len(codes) < 2:
        return []
    index = _pair_index(codes, max_bits)
    # range_search keeps distances strictly below the radius
    lims, distances, ids = index.range_search(codes, max_bits + 1)
    queries = np.repeat(np.arange(len(codes)), np.diff(lims).astype(np.int64))
    later = ids > queries
    i, j, d = queries[later], ids[later], distances[later]
    order = np.lexsort((j, i))
    return list(zip(i[order].tolist(), j[order].tolist(), d[order].tolist()))


def _pair_index(codes: np.ndarray, max_bits: int) -> faiss.IndexBinary:
    """An index whose range search finds every code within `max_bits` of a query. Pigeonhole:
    cut the 64 bits into max_bits + 1 blocks; two codes that differ in at most max_bits bits
    agree exactly on at least one block, so a multi-index hash (one table per block, exact keys,
    FAISS `IndexBinaryMultiHash` with nflip = 0) yields every such pair as a candidate and then
    checks the full distance. Each query looks at the few codes sharing one of its blocks
    instead of all n (1M hashes: seconds instead of hours, bench/dedup_bench.py). Past 7 bits the
    blocks get too short to narrow anything, and the flat index compares all pairs."""
    if max_bits > 7:
        index = faiss.IndexBinaryFlat(64)
    else:
        index = faiss.IndexBinaryMultiHash(64, max_bits + 1, min(32, 64 // (max_bits + 1)))
        index.nflip = 0
    index.add(codes)
    return index


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


def copies_among(query_hashes: np.ndarray, query_fine: list[str], archive_hashes: np.ndarray,
                 archive_fine: list[str]) -> list[tuple[int, int, int]]:
    """(query i, archived j, bits) for every archived cell that a query cell copies: 64-bit
    hashes within DUPLICATE_BITS confirmed by the fine hash (CONFIRM_BITS), whatever the labels
    (a copy with another label is still the same cell). The archive is indexed once and each
    query searched in it, so a batch costs (batch x archive), not (archive x archive)."""
    if len(query_hashes) == 0 or len(archive_hashes) == 0:
        return []
    index = faiss.IndexBinaryFlat(64)
    index.add(_to_bytes(archive_hashes))
    lims, distances, ids = index.range_search(_to_bytes(query_hashes), DUPLICATE_BITS + 1)
    found = []
    for i in range(len(query_hashes)):
        for bits, j in zip(distances[lims[i] : lims[i + 1]], ids[lims[i] : lims[i + 1]]):
            if fine_distance(query_fine[i], archive_fine[int(j)]) <= CONFIRM_BITS:
                found.append((i, int(j), int(bits)))
    return found
