"""The labels module on small arrays: the corrections overlay, the review order, suspect labels
and the latent neighbours that vote on them."""

from __future__ import annotations

import numpy as np

from atlas.catalog import Catalog
from atlas.labels import corrected_labels, latent_neighbours, review_order, suspect_labels
from atlas.search import LatentIndex


# -- the corrections overlay ---------------------------------------------------------------------
def test_corrections_relabel_their_cells_and_ignore_unknown_ones():
    folder = np.array(["a", "b", None], dtype=object)
    labels, corrected = corrected_labels(["c1", "c2", "c3"], folder, {"c3": "b", "elsewhere": "a"})
    assert labels.tolist() == ["a", "b", "b"]
    assert corrected.tolist() == [False, False, True]
    assert folder.tolist() == ["a", "b", None]  # the folder labels are not touched


def test_latest_correction_of_a_cell_wins(tmp_path):
    catalog = Catalog(tmp_path)
    for label in ("b", "c", "a"):
        catalog.add_correction("c1", None, label, note=None, author="tester",
                               atlas_version="000001")
    catalog.add_correction("c2", "b", "c", note=None, author="tester", atlas_version="000001")
    through, corrections = catalog.effective_labels()
    labels, corrected = corrected_labels(["c1", "c2", "c3"], ["b", "b", "b"], corrections)
    assert through == 4
    assert labels.tolist() == ["a", "c", "b"]
    assert corrected.tolist() == [True, True, False]


# -- the review queue ----------------------------------------------------------------------------
def test_review_order_is_uncorrected_cells_by_entropy_then_cell_id():
    cell_ids = ["e", "d", "a", "c", "b"]
    entropy = [0.5, 1.2, 1.2, 0.1, 2.0]
    corrected = [False, False, False, False, True]  # the most uncertain cell is settled
    assert review_order(cell_ids, entropy, corrected).tolist() == [2, 1, 0, 3]
    among = np.array([True, True, False, True, True])
    assert review_order(cell_ids, entropy, corrected, among).tolist() == [1, 0, 3]
    assert review_order(cell_ids, entropy, [True] * 5).tolist() == []


# -- suspect labels ------------------------------------------------------------------------------
def test_suspects_are_outvoted_uncorrected_labels_strongest_first():
    cell_ids = np.array(["c0", "c1", "z2", "a3", "c4", "c5", "c6", "c7"], dtype=object)
    labels = np.array(["a", "b", "b", "b", "a", None, "a", "b"], dtype=object)
    corrected = np.array([False, False, False, False, False, False, True, False])
    entropy = np.array([0.3, 0.1, 0.2, 0.2, 0.9, 0.5, 0.7, 0.05])
    neighbours = np.array([
        [1, 2, 3, 7],  # a among four b: suspect, 4 votes
        [0, 4, 2, 3],  # 2 against 2: no majority
        [0, 4, 6, 5],  # three a (the unlabelled 5 does not vote): suspect
        [0, 4, 6, 1],  # three a: suspect, same votes and entropy as 2, cell id first
        [1, 2, 3, 5],  # three b: suspect, the most uncertain of the 3-vote ones
        [0, 1, 2, 3],  # unlabelled: never suspect
        [1, 2, 3, 4],  # corrected: a person settled it
        [1, 2, 3, -1],  # agrees with its neighbours
    ])
    found = suspect_labels(cell_ids, labels, corrected, entropy, neighbours)
    assert [s.position for s in found] == [0, 4, 3, 2]
    first = found[0]
    assert (first.label, first.majority_label, first.votes, first.k) == ("a", "b", 4, 4)
    assert first.entropy_bits == 0.3 and first.neighbours == (1, 2, 3, 7)
    assert [(s.label, s.majority_label, s.votes) for s in found[1:]] == [
        ("a", "b", 3), ("b", "a", 3), ("b", "a", 3)]
    assert found[3].neighbours == (0, 4, 6, 5)  # every neighbour asked, the unlabelled one too


# -- latent neighbours ---------------------------------------------------------------------------
def _line(positions) -> np.ndarray:
    """Latents on a line: cell i at (positions[i], 0)."""
    return np.array([[x, 0.0] for x in positions], np.float32)


def test_latent_neighbours_leave_out_the_cell_and_its_duplicates():
    latents = _line([0.0, 1.0, 1.5, 3.5, 10.0])
    groups = ["g0", "g1", "g1", "g3", "g4"]  # cells 1 and 2 are duplicates of each other
    index = LatentIndex.build(latents)
    assert latent_neighbours(index, latents, groups, 2).tolist() == [
        [1, 2], [0, 3], [0, 3], [2, 1], [3, 2]]
    wide = latent_neighbours(index, latents, groups, 4)
    assert wide[1].tolist() == [0, 3, 4, -1]  # only three cells are not cell 1's group


def test_latent_neighbours_pad_when_the_archive_is_smaller_than_k():
    latents = _line([0.0, 1.0, 1.5, 3.5, 10.0])
    index = LatentIndex.build(latents)
    found = latent_neighbours(index, latents, ["g0", "g1", "g2", "g3", "g4"], 6)
    assert found.shape == (5, 6)
    assert found[0].tolist() == [1, 2, 3, 4, -1, -1]
    assert found[4].tolist() == [3, 2, 1, 0, -1, -1]
