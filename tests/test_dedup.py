import numpy as np

from atlas.dedup import average_hash, find_duplicates, fine_distance, fine_hash, hamming_pairs
from atlas.synthetic import synthetic_cell


def test_pairs_within_bits_found_by_faiss():
    base = 0xF0F0F0F0F0F0F0F0
    hashes = np.array([base, base ^ 0b1, base ^ 0b111, base ^ 0xFFFF], dtype=np.uint64)
    assert sorted(hamming_pairs(hashes, 3)) == [(0, 1, 1), (0, 2, 3), (1, 2, 2)]


def test_duplicates_group_within_a_class_and_review_at_three_bits():
    base = 0x0123456789ABCDEF
    hashes = np.array([base, base ^ 0b11, base ^ 0b111000, base ^ 0b1, base ^ 0b1001], dtype=np.uint64)
    labels = ["a", "a", "a", "b", "b"]
    same_fine = ["00" * 32] * 5  # the fine hash agrees everywhere
    result = find_duplicates(hashes, same_fine, labels)
    assert result.group[0] == result.group[1]  # 2 bits, same class: duplicates
    assert result.group[3] == result.group[4]  # 1 bit, same class
    assert result.group[0] != result.group[3]  # 1 bit apart, but another class
    assert result.group[2] not in (result.group[0], result.group[3])  # 3 bits: only to review
    assert result.review_pairs == [(0, 2, 3)]  # (2, 4) are 3 bits apart too, but differ in class


def test_coarse_matches_need_the_fine_hash_to_agree():
    """Different round cells share a 64-bit hash; the 256-bit hash tells them apart."""
    hashes = np.array([0xFFFFC3C3C3C3FFFF] * 3, dtype=np.uint64)
    fine = ["00" * 32, "00" * 31 + "0f", "ff" * 32]  # 4 bits apart, then 256 bits apart
    result = find_duplicates(hashes, fine, ["a", "a", "a"])
    assert result.group[0] == result.group[1] != result.group[2]
    assert fine_distance(fine[0], fine[1]) == 4


def test_fine_hash_separates_different_cells_of_one_class():
    rng = np.random.default_rng(0)
    a, b = synthetic_cell("neutrophil", rng), synthetic_cell("neutrophil", rng)
    assert fine_distance(fine_hash(a), fine_hash(a)) == 0
    assert fine_distance(fine_hash(a), fine_hash(b)) > 12


def test_average_hash_is_stable_under_small_colour_change():
    crop = synthetic_cell("neutrophil", np.random.default_rng(0))
    brighter = np.clip(crop.astype(int) + 6, 0, 255).astype(np.uint8)
    assert bin(average_hash(crop) ^ average_hash(brighter)).count("1") <= 2


def _planted_hashes(n: int, copies: int, seed: int) -> np.ndarray:
    """n random 64-bit hashes, then `copies` of them again with 0 to 4 random bits flipped, and a
    crowd of identical hashes (as round cells give) with a bit or two flipped."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**63, n, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, n, dtype=np.uint64)
    flipped = []
    for h in hashes[rng.choice(n, copies, replace=False)]:
        for bit in rng.choice(64, rng.integers(0, 5), replace=False):
            h ^= np.uint64(1) << np.uint64(bit)
        flipped.append(h)
    crowd = [np.uint64(0xFFFFC3C3C3C3FFFF) ^ (np.uint64(1) << np.uint64(b)) for b in rng.integers(0, 64, 30)]
    return np.array(list(hashes) + flipped + crowd, dtype=np.uint64)


def _all_pairs(hashes: np.ndarray, max_bits: int) -> list[tuple[int, int, int]]:
    """The naive scan: every hash against every other, by numpy popcount."""
    bits = np.unpackbits(hashes.astype(">u8").view(np.uint8).reshape(-1, 8), axis=1).astype(np.int16)
    distance = (bits[:, None, :] != bits[None, :, :]).sum(2)
    i, j = np.nonzero(np.triu(distance <= max_bits, k=1))
    return [(int(a), int(b), int(distance[a, b])) for a, b in zip(i, j)]


def test_multi_index_hashing_finds_exactly_the_pairs_of_the_naive_scan():
    hashes = _planted_hashes(600, 150, seed=4)
    for max_bits in (0, 1, 2, 3, 4, 7, 9):
        expected = _all_pairs(hashes, max_bits)
        assert hamming_pairs(hashes, max_bits) == expected, max_bits
    assert len(_all_pairs(hashes, 2)) > 100  # the planted copies and the crowd are there
