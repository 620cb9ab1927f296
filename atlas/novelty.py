"""How unlike the archive a cell is: a novelty score and its conformal p-value.

The score is the mean squared error (as `atlas.search` measures it) between the cell's latent
and those of its `k` nearest archived cells. It is calibrated on the archive itself: every
archived cell's own score against the rest of the archive (leave-one-out, its duplicate group
left out too, as reference cells are), computed at build time. A query's p-value is the share
of archived cells at least as far from their neighbours, (1 + #{archived >= score}) / (n + 1);
a cell is `novel` when p < NOVELTY_LEVEL, i.e. it is farther from the archive than all but 1%
of the archive's own cells are from each other. A cell of a class the archive lacks (a blast,
a smudge cell, an artefact) still gets reference cells; this says they are not close.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from atlas.labels import latent_neighbours

# Archived cells the score averages over. On PBC (the archive's own embedding, one class
# removed from the index) the mean AUROC was 0.964, 0.958, 0.954, 0.949 for k = 1, 2, 3, 5;
# 2 keeps most of it without resting on one stray archived cell.
NOVELTY_K = 2
NOVELTY_LEVEL = 0.01  # p-value below which a cell is novel (1 archived cell in 100 would be)
NOVEL_MESSAGE = "no close reference: this cell is unlike the archive"
_CHUNK = 20_000  # archived cells scored at once (bounds memory at build time)


@dataclass
class Novelty:
    """One cell's answer."""

    score: float  # mean squared error to the k nearest archived cells
    p_value: float  # conformal p-value against the archive's own leave-one-out scores
    novel: bool  # p_value < NOVELTY_LEVEL
    message: str | None  # NOVEL_MESSAGE when novel


class NoveltyScorer:
    """scikit-learn style: `fit(index, latents, duplicate_groups)` sets `reference_scores_`
    (sorted leave-one-out scores of the archived cells); `score` and `p_values` use them."""

    def __init__(self, k: int = NOVELTY_K, level: float = NOVELTY_LEVEL):
        self.k = k
        self.level = level

    def fit(self, index, latents: np.ndarray, duplicate_groups) -> NoveltyScorer:
        """`index` (a LatentIndex) searches `latents`; each cell is scored against the others,
        its own duplicate group left out."""
        latents = np.asarray(latents, dtype=np.float32)
        self.reference_scores_ = np.sort(self.leave_one_out_scores(index, latents, duplicate_groups))
        return self

    def leave_one_out_scores(self, index, latents: np.ndarray, duplicate_groups) -> np.ndarray:
        """Each archived cell's score against the rest of the archive (its duplicates left out)."""
        neighbours = latent_neighbours(index, latents, duplicate_groups, self.k)
        scores = np.empty(len(latents))
        for start in range(0, len(latents), _CHUNK):
            rows = neighbours[start : start + _CHUNK]
            found = rows >= 0
            squared = ((latents[rows.clip(0)] - latents[start : start + _CHUNK, None, :]) ** 2).mean(-1)
            scores[start : start + _CHUNK] = np.where(found, squared, 0).sum(1) / np.maximum(found.sum(1), 1)
        return scores

    def score(self, index, latent: np.ndarray, exclude: set[int] = frozenset()) -> float | None:
        """One query latent's score: mean MSE to its k nearest archived cells not in `exclude`
        (None when there is no other cell)."""
        distances, positions = index.search(latent, self.k + len(exclude))
        kept = [float(d) for p, d in zip(positions[0], distances[0]) if p >= 0 and int(p) not in exclude][: self.k]
        return float(np.mean(kept)) if kept else None

    def p_values(self, scores) -> np.ndarray:
        """Share of archived cells (plus the query) scoring at least as high."""
        scores = np.atleast_1d(np.asarray(scores, dtype=np.float64))
        reference = self.reference_scores_
        at_least = len(reference) - np.searchsorted(reference, scores, side="left")
        return (1 + at_least) / (len(reference) + 1)

    def novelty(self, score: float) -> Novelty:
        p_value = float(self.p_values(score)[0])
        novel = p_value < self.level
        return Novelty(score=float(score), p_value=p_value, novel=novel, message=NOVEL_MESSAGE if novel else None)

    def summary(self) -> dict:
        """What the manifest records."""
        reference = self.reference_scores_
        return {"k": self.k, "level": self.level, "archived_cells": int(len(reference)),
                "score_at_level": float(np.quantile(reference, 1 - self.level)) if len(reference) else None,
                "median_score": float(np.median(reference)) if len(reference) else None}

    # -- persistence ------------------------------------------------------------------------
    def save(self, path) -> None:
        np.savez(path, reference_scores=self.reference_scores_, k=self.k, level=self.level)

    @classmethod
    def load(cls, path) -> NoveltyScorer:
        with np.load(path) as arrays:
            scorer = cls(k=int(arrays["k"]), level=float(arrays["level"]))
            scorer.reference_scores_ = arrays["reference_scores"]
        return scorer
