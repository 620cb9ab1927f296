"""How unlike the archive a cell is: a novelty score and its conformal p-value.

The score is the mean squared error (as `atlas.search` measures it) between the cell's latent
and those of its `k` nearest archived cells. It is calibrated on the archive itself: every
archived cell's own score against the rest of the archive (leave-one-out, its duplicate group
left out too, as reference cells are), computed at build time. A query's p-value is the share
of archived cells at least as far from their neighbours, (1 + #{archived >= score}) / (n + 1);
a cell is `novel` when p < NOVELTY_LEVEL, i.e. it is farther from the archive than all but 1%
of the archive's own cells are from each other. A cell of a class the archive lacks (a blast,
a smudge cell, an artefact) still gets reference cells; this says they are not close.

Distance alone misses most cells of an unseen class: the backbone, trained to tell the known
classes apart, maps them among their nearest known class (leave-one-class-out on PBC, a
quarter of the training images: AUROC 0.86 without neutrophils, 0.73 without immature
granulocytes). Such a cell is also one the classifier hesitates on, so when the archive's
cells come with the classifier's entropy (bits, of the calibrated out-of-fold probabilities)
the two are combined (`combined_statistic`): each gets its conformal p-value against the
archive's own values, Fisher's method joins them, and the smaller of that and the distance's
own p-value is ranked against the archive cells' own statistics (each cell's ranks taken
without itself), so a cell of a known class is still novel about 1 time in 100 at p < 0.01,
and a cell farther than the whole archive stays novel however sure the classifier is (its
p-value is then about 2/(n+1): it ties only with the archive cells both far and doubted).
Chosen on the neutrophil left-out build (AUROC 0.94; 0.86 by distance, 0.93 by entropy
alone; Fisher without the minimum 0.95, but it cannot flag a far, confidently classified
cell in a small archive; pure Fisher with the conformal credibility or 1 - max p in place of
the entropy 0.94; Fisher beat the minimum of the two p-values in every pair tried), then
measured on the immature granulocytes left out: AUROC 0.85 (0.73 by distance), 34% of them
flagged at 5% false alarms (10%), 0.5% of the known test cells novel at p < 0.01. A distance
in the backbone's tapped features instead of the latent did better still (with entropy, pure
Fisher: 0.97 / 0.90) but needs those features stored for every archived cell.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import chi2

from atlas.labels import latent_neighbours

# Archived cells the score averages over. On PBC (the archive's own embedding, one class
# removed from the index) the mean AUROC was 0.964, 0.958, 0.954, 0.949 for k = 1, 2, 3, 5;
# 2 keeps most of it without resting on one stray archived cell.
NOVELTY_K = 2
NOVELTY_LEVEL = 0.01  # p-value below which a cell is novel (1 archived cell in 100 would be)
NOVEL_MESSAGE = "no close reference: this cell is unlike the archive"
_CHUNK = 20_000  # archived cells scored at once (bounds memory at build time)
# Archived cells whose own scores calibrate the p-values, at most: a seeded random sample above
# (exchangeable with the rest, so the p-values stay valid; 1/100,000 resolution is far below the
# 1% level). Scoring every cell of a 10M archive would be 10M index searches per build or add.
CALIBRATION_CELLS = 100_000


def calibration_rows(cells: int) -> np.ndarray:
    """The archived cells (positions) whose scores calibrate the p-values."""
    if cells <= CALIBRATION_CELLS:
        return np.arange(cells)
    return np.sort(np.random.default_rng(0).choice(cells, CALIBRATION_CELLS, replace=False))


@dataclass
class Novelty:
    """One cell's answer."""

    score: float  # mean squared error to the k nearest archived cells
    p_value: float  # conformal p-value against the archive's own leave-one-out scores (combined with
    # the classifier's entropy where the scorer was fitted with the archive's entropies and given the cell's)
    novel: bool  # p_value < NOVELTY_LEVEL
    message: str | None  # NOVEL_MESSAGE when novel


class NoveltyScorer:
    """scikit-learn style: `fit(index, latents, duplicate_groups, entropy_bits=None)` sets
    `reference_scores_` (sorted leave-one-out scores of the archived cells) and, with the
    archive's entropies, `reference_entropy_` and `reference_combined_` (sorted; else None);
    `score`, `statistic` and `p_values` use them."""

    def __init__(self, k: int = NOVELTY_K, level: float = NOVELTY_LEVEL):
        self.k = k
        self.level = level

    def fit(self, index, latents: np.ndarray, duplicate_groups, entropy_bits=None) -> NoveltyScorer:
        """`index` (a LatentIndex) searches `latents`; each cell is scored against the others,
        its own duplicate group left out. `entropy_bits` (n,): each archived cell's classifier
        entropy (out-of-fold), to combine with the distance; None: distance alone."""
        latents = np.asarray(latents, dtype=np.float32)
        rows = calibration_rows(len(latents))
        scores = self.leave_one_out_scores(index, latents, duplicate_groups, rows)
        self.reference_scores_ = np.sort(scores)
        self.reference_entropy_ = self.reference_combined_ = None
        if entropy_bits is not None:
            entropy = np.asarray(entropy_bits, dtype=np.float64)
            if entropy.shape != (len(latents),) or not np.isfinite(entropy).all():
                raise ValueError(f"entropy_bits must be {len(latents)} finite values, one per archived cell")
            entropy = entropy[rows]
            self.reference_entropy_ = np.sort(entropy)
            self.reference_combined_ = np.sort(combined_statistic(
                _p_without_itself(self.reference_scores_, scores), _p_without_itself(self.reference_entropy_, entropy)))
        return self

    @property
    def combined(self) -> bool:
        """Whether the distance is combined with the classifier's entropy."""
        return getattr(self, "reference_combined_", None) is not None

    def leave_one_out_scores(self, index, latents: np.ndarray, duplicate_groups, rows=None) -> np.ndarray:
        """Each archived cell's score (or those of `rows`) against the rest of the archive (its
        duplicates left out)."""
        rows = np.arange(len(latents)) if rows is None else np.asarray(rows)
        neighbours = latent_neighbours(index, latents, duplicate_groups, self.k, rows)
        scores = np.empty(len(rows))
        for start in range(0, len(rows), _CHUNK):
            found_rows = neighbours[start : start + _CHUNK]
            found = found_rows >= 0
            squared = ((latents[found_rows.clip(0)] - latents[rows[start : start + _CHUNK], None, :]) ** 2).mean(-1)
            scores[start : start + _CHUNK] = np.where(found, squared, 0).sum(1) / np.maximum(found.sum(1), 1)
        return scores

    def score(self, index, latent: np.ndarray, exclude: set[int] = frozenset()) -> float | None:
        """One query latent's score: mean MSE to its k nearest archived cells not in `exclude`
        (None when there is no other cell)."""
        distances, positions = index.search(latent, self.k + len(exclude))
        kept = [float(d) for p, d in zip(positions[0], distances[0]) if p >= 0 and int(p) not in exclude][: self.k]
        return float(np.mean(kept)) if kept else None

    def statistic(self, scores, entropy_bits=None) -> np.ndarray:
        """What the p-value ranks, higher = more novel: the distance `scores`, or (combined
        scorer and the cells' `entropy_bits` given) `combined_statistic` of the two p-values."""
        scores = np.atleast_1d(np.asarray(scores, dtype=np.float64))
        if entropy_bits is None or not self.combined:
            return scores
        entropy = np.atleast_1d(np.asarray(entropy_bits, dtype=np.float64))
        return combined_statistic(conformal_p_values(self.reference_scores_, scores),
                                  conformal_p_values(self.reference_entropy_, entropy))

    def p_values(self, scores, entropy_bits=None) -> np.ndarray:
        """Share of archived cells (plus the query) at least as novel: by distance, or by the
        combined statistic when the scorer is combined and `entropy_bits` are given."""
        if entropy_bits is None or not self.combined:
            return conformal_p_values(self.reference_scores_, scores)
        return conformal_p_values(self.reference_combined_, self.statistic(scores, entropy_bits))

    def novelty(self, score: float, entropy_bits: float | None = None) -> Novelty:
        """One cell's answer from its distance `score` and (if known) its classifier entropy."""
        p_value = float(self.p_values(score, entropy_bits)[0])
        novel = p_value < self.level
        return Novelty(score=float(score), p_value=p_value, novel=novel, message=NOVEL_MESSAGE if novel else None)

    def summary(self) -> dict:
        """What the manifest records."""
        reference = self.reference_scores_
        return {"k": self.k, "level": self.level, "archived_cells": int(len(reference)),
                "score_at_level": float(np.quantile(reference, 1 - self.level)) if len(reference) else None,
                "median_score": float(np.median(reference)) if len(reference) else None,
                "combined_with": "classifier entropy (combined_statistic)" if self.combined else None}

    # -- persistence ------------------------------------------------------------------------
    def save(self, path) -> None:
        combined = ({"reference_entropy": self.reference_entropy_, "reference_combined": self.reference_combined_}
                    if self.combined else {})
        np.savez(path, reference_scores=self.reference_scores_, k=self.k, level=self.level, **combined)

    @classmethod
    def load(cls, path) -> NoveltyScorer:
        """Scorers saved before the combination (no entropies) load as distance-only ones."""
        with np.load(path) as arrays:
            scorer = cls(k=int(arrays["k"]), level=float(arrays["level"]))
            scorer.reference_scores_ = arrays["reference_scores"]
            scorer.reference_entropy_ = arrays["reference_entropy"] if "reference_entropy" in arrays else None
            scorer.reference_combined_ = arrays["reference_combined"] if "reference_combined" in arrays else None
        return scorer


def conformal_p_values(reference: np.ndarray, values) -> np.ndarray:
    """(1 + #{reference >= value}) / (n + 1) for each value; `reference` sorted ascending."""
    values = np.atleast_1d(np.asarray(values, dtype=np.float64))
    at_least = len(reference) - np.searchsorted(reference, values, side="left")
    return (1 + at_least) / (len(reference) + 1)


def _p_without_itself(reference: np.ndarray, own: np.ndarray) -> np.ndarray:
    """The conformal p-value of each reference cell's own value against the others: the count
    at least as high includes the cell itself, so #{reference >= own} / n."""
    return (len(reference) - np.searchsorted(reference, own, side="left")) / len(reference)


def combined_statistic(p_distance: np.ndarray, p_entropy: np.ndarray) -> np.ndarray:
    """-log min(p_distance, p_Fisher), p_Fisher = P(chi2 with 4 df > -2 (log p_distance + log p_entropy)).
    Fisher's method ranks a cell both far and doubted above one that is only one of them; the
    minimum keeps a cell farther than the whole archive novel however sure the classifier is
    (Fisher alone caps it: at p_entropy = 1 a distance p-value of 1/101 combines to only 0.056).
    Ranked against the archive's own statistics, so the minimum costs no calibration."""
    fisher = -2 * (np.log(p_distance) + np.log(p_entropy))
    return -np.log(np.minimum(p_distance, chi2.sf(fisher, 4)))
