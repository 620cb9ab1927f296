"""Labels of archived cells as technologists left them, and what they should look at next:
the corrections log laid over the folder labels (the latest correction of a cell wins), the
review queue (most uncertain prediction first) and suspect labels (a label that the cell's
nearest latent neighbours outvote). One implementation for build, rebuild and the API."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

SUSPECT_NEIGHBOURS = 8  # latent reference cells that vote on a cell's label


def corrected_labels(cell_ids, folder_labels,
                     corrections: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """(labels, corrected): each cell's label with `corrections` ({cell_id: latest label}, as
    `Catalog.effective_labels` gives them) applied over its folder label, and which cells a
    correction relabelled. Corrections of cells not among `cell_ids` wait for their version."""
    ids = np.asarray(cell_ids, dtype=object)
    labels = np.array(folder_labels, dtype=object, copy=True)
    corrected = np.fromiter((cell_id in corrections for cell_id in ids), bool, len(ids))
    labels[corrected] = [corrections[cell_id] for cell_id in ids[corrected]]
    return labels, corrected


def review_order(cell_ids, entropy_bits, corrected, among: np.ndarray | None = None) -> np.ndarray:
    """Positions of the cells a technologist should review, in the order to review them: the
    cells no correction has settled (and, when given, in the boolean mask `among`), the most
    uncertain prediction (highest entropy) first, ties in cell_id order."""
    keep = ~np.asarray(corrected, bool)
    if among is not None:
        keep &= np.asarray(among, bool)
    positions = np.flatnonzero(keep)
    ids = np.asarray(cell_ids, dtype=object)[positions].astype(str)
    entropy = np.asarray(entropy_bits, float)[positions]
    return positions[np.lexsort((ids, -entropy))]


def latent_neighbours(index, latents: np.ndarray, duplicate_groups, k: int, rows=None) -> np.ndarray:
    """(n, k) positions of each archived cell's k nearest cells in the latent space, nearest
    first, leaving out the cell itself and its duplicate group (as `reference_cells` does);
    -1 where the archive has fewer. `index` searches `latents` (a `LatentIndex`). `rows`: only
    those cells' neighbours (default every cell's)."""
    groups = np.asarray(duplicate_groups, dtype=object)
    rows = np.arange(len(latents)) if rows is None else np.asarray(rows)
    largest_group = max(Counter(groups.tolist()).values(), default=1)
    _, found = index.search(latents[rows], k + largest_group)
    same = (found < 0) | (groups[found.clip(0)] == groups[rows][:, None])
    order = np.argsort(same, axis=1, kind="stable")[:, :k]  # other cells first, nearest first
    picked = np.take_along_axis(found, order, 1)
    picked[np.take_along_axis(same, order, 1)] = -1
    if picked.shape[1] < k:  # the index holds fewer than k cells
        picked = np.pad(picked, ((0, 0), (0, k - picked.shape[1])), constant_values=-1)
    return picked


@dataclass(frozen=True)
class Suspect:
    """A cell whose label the majority of its latent neighbours contradict."""

    position: int
    label: str
    majority_label: str
    votes: int  # neighbours carrying the majority label
    k: int  # neighbours asked
    entropy_bits: float
    neighbours: tuple[int, ...]  # positions of the latent neighbours asked, nearest first


def suspect_labels(cell_ids, labels, corrected, entropy_bits,
                   neighbours: np.ndarray) -> list[Suspect]:
    """Uncorrected labelled cells whose label disagrees with more than half of their
    `neighbours` (rows of `latent_neighbours`; -1 and unlabelled neighbours do not vote),
    the strongest disagreement first: most votes, then highest entropy, then cell_id."""
    labels = np.asarray(labels, dtype=object)
    k = neighbours.shape[1]
    found = []
    for position, row in enumerate(neighbours):
        label = labels[position]
        if label is None or corrected[position]:
            continue
        asked = [int(p) for p in row if p >= 0]
        votes = Counter(labels[p] for p in asked if labels[p] is not None)
        if not votes:
            continue
        majority, count = votes.most_common(1)[0]
        if majority != label and count > k / 2:
            found.append(Suspect(position=position, label=label, majority_label=majority,
                                 votes=count, k=k, entropy_bits=float(entropy_bits[position]),
                                 neighbours=tuple(asked)))
    found.sort(key=lambda s: (-s.votes, -s.entropy_bits, str(cell_ids[s.position])))
    return found
