"""De-duplication benchmark (issue #15): every pair of 64-bit average hashes within 2 bits among
a million, by CellAtlas's multi-index hashing against the naive all-pairs scan, in one run.

    PYTHONPATH=. .venv/bin/python bench/dedup_bench.py [--tiny] [--hashes 1000000] [--threads 1]
        [--out dedup.json]
    (or: cellatlas bench dedup ...)

Data: random 64-bit hashes, copies of some of them with 0 to `max bits` bits flipped (the
planted near-duplicates) and a crowd of hashes around `ffffc3c3c3c3ffff` (the hash every
large round cell gets on a nucleus-centred crop). `atlas.dedup.hamming_pairs` runs on all of
them, at 2 bits (the duplicate rule) and 3 bits (what the build also lists for review). The
naive scan (FAISS `IndexBinaryFlat`: every hash against every other) runs on a subset; its time
is extrapolated by (n / subset)^2, and on that subset (made like the full set) both must give
exactly the same pairs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import print_table, set_threads, timed, write_json  # noqa: E402

ROUND_CELL_HASH = 0xFFFFC3C3C3C3FFFF
COLUMNS = [("method", "method", "s"), ("hashes", "hashes", "d"), ("max_bits", "bits", "d"),
           ("seconds", "seconds", ".2f"), ("cpu_seconds", "CPU s", ".2f"), ("pairs", "pairs", "d"), ("same_pairs_as_naive", "same as naive", "s"),
           ("planted_found", "planted found", "s")]


def planted_hashes(n: int, copies: int, crowd: int, max_bits: int, seed: int = 0):
    """n hashes in all: random ones, `copies` near-copies (each of a different random hash, up
    to max_bits bits flipped) and a `crowd` near the round-cell hash. Returns the hashes and
    the planted pairs (original, copy) as an (m, 2) array."""
    rng = np.random.default_rng(seed)
    randoms = n - copies - crowd
    hashes = rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)
    originals = rng.choice(randoms, copies, replace=False)
    hashes[randoms : randoms + copies] = _flip(hashes[originals], rng.integers(0, max_bits + 1, copies), rng)
    hashes[randoms + copies :] = _flip(np.full(crowd, ROUND_CELL_HASH, np.uint64), rng.integers(0, 4, crowd), rng)
    planted = np.stack([originals, np.arange(randoms, randoms + copies)], axis=1)
    return hashes, planted


def _flip(hashes: np.ndarray, counts: np.ndarray, rng) -> np.ndarray:
    out = hashes.copy()
    for i, count in enumerate(counts):
        for bit in rng.choice(64, count, replace=False):
            out[i] ^= np.uint64(1) << np.uint64(bit)
    return out


def naive_pairs(hashes: np.ndarray, max_bits: int) -> list[tuple[int, int, int]]:
    """Every hash against every other (FAISS IndexBinaryFlat range search), pairs (i < j)."""
    import faiss

    codes = np.asarray(hashes, dtype=np.uint64).astype(">u8").view(np.uint8).reshape(-1, 8)
    index = faiss.IndexBinaryFlat(64)
    index.add(codes)
    lims, distances, ids = index.range_search(codes, max_bits + 1)
    queries = np.repeat(np.arange(len(codes)), np.diff(lims).astype(np.int64))
    later = ids > queries
    order = np.lexsort((ids[later], queries[later]))
    return list(zip(queries[later][order].tolist(), ids[later][order].tolist(), distances[later][order].tolist()))


def run(argv: list[str] | None = None) -> dict:
    from atlas.dedup import DUPLICATE_BITS, REVIEW_BITS, hamming_pairs

    args = parse(argv)
    set_threads(args.threads)
    hashes, planted = planted_hashes(args.hashes, args.copies, args.crowd, DUPLICATE_BITS, args.seed)
    subset = min(args.subset, len(hashes))
    # The subset has the full set's make-up (planted copies and crowd in the same proportions).
    share = subset / len(hashes)
    in_subset, _ = planted_hashes(subset, round(args.copies * share), round(args.crowd * share),
                                  DUPLICATE_BITS, args.seed + 1)
    rows = []
    for max_bits in (DUPLICATE_BITS, REVIEW_BITS):
        fast = {"method": "cellatlas multi-index hashing", "hashes": len(hashes), "max_bits": max_bits,
                "threads": args.threads}
        with timed(fast):
            pairs = hamming_pairs(hashes, max_bits)
        fast["pairs"] = len(pairs)
        found = {(i, j) for i, j, _ in pairs}
        fast["planted_found"] = f"{sum((a, b) in found for a, b in planted)}/{len(planted)}"
        naive = {"method": "naive all pairs (subset)", "hashes": subset, "max_bits": max_bits,
                 "threads": args.threads}
        with timed(naive):
            expected = naive_pairs(in_subset, max_bits)
        naive["pairs"] = len(expected)
        on_subset = hamming_pairs(in_subset, max_bits)
        naive["same_pairs_as_naive"] = fast["same_pairs_as_naive"] = str(on_subset == expected)
        extrapolated = {"method": "naive all pairs (extrapolated)", "hashes": len(hashes), "max_bits": max_bits,
                        "seconds": naive["seconds"] * (len(hashes) / subset) ** 2,
                        "cpu_seconds": naive["cpu_seconds"] * (len(hashes) / subset) ** 2, "threads": args.threads}
        fast["speedup_over_naive"] = extrapolated["seconds"] / max(fast["seconds"], 1e-9)
        rows += [fast, naive, extrapolated]
    print_table(rows, COLUMNS)
    result = {"benchmark": "dedup",
              "setting": {"hashes": len(hashes), "planted_copies": args.copies, "crowd": args.crowd,
                          "naive_subset": subset, "threads": args.threads, "tiny": args.tiny},
              "results": rows}
    write_json(result, args.out)
    return result


def parse(argv):
    parser = argparse.ArgumentParser(prog="cellatlas bench dedup", description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a seconds-long run (CI): 5,000 hashes")
    parser.add_argument("--out", type=Path, help="write the figures to this JSON file")
    parser.add_argument("--hashes", type=int, default=1_000_000)
    parser.add_argument("--copies", type=int, default=20_000, help="planted near-duplicates")
    parser.add_argument("--crowd", type=int, default=2_000, help="hashes near the round-cell hash")
    parser.add_argument("--subset", type=int, default=50_000, help="hashes the naive scan runs on")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.tiny:
        args.hashes, args.copies, args.crowd, args.subset = 5000, 300, 100, 2000
    if min(args.hashes, args.subset, args.threads) < 1 or min(args.copies, args.crowd) < 0:
        parser.error("--hashes, --subset and --threads must be positive, --copies and --crowd not negative")
    if args.copies + args.crowd > args.hashes // 2:
        parser.error("--copies and --crowd together must be at most half of --hashes")
    return args


def main(argv: list[str] | None = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
