"""Calibrated uncertainty for class probabilities: temperature scaling, the expected calibration
error, and split-conformal prediction sets.

All of it is learned from out-of-fold probabilities (each training cell predicted by a model
that did not see it), so no cells are set aside. A prediction set at coverage 0.99 holds the
true class of 99 cells in 100 (exchangeability assumed: new cells like the archive's). The sets
are class-conditional (Mondrian by class, `crepes`): the guarantee holds for every class, not
only on average, which matters where rare classes hide among common ones. Nonconformity is
the hinge score, 1 - p(class), on the temperature-scaled probabilities.

Note: with about 98% accuracy, a 95% set is usually a single class even when it is wrong; the
default coverage sits above the accuracy so that the doubtful cells get two classes. A class
with fewer than 1/(1 - coverage) - 1 calibration cells cannot be ruled out at that coverage,
so it is in every set (honest: too few examples to promise more).

The default coverage is "auto" (`choose_coverage`): the lowest level on AUTO_LEVELS (0.990,
0.991, ..., 0.998) whose sets, on the out-of-fold cells, flag at least
AUTO_MISCLASSIFIED_FLAGGED (80%) of the misclassified cells while flagging at most
AUTO_MAX_FLAGGED (10%) of all cells. It starts at 0.99, so the stated coverage is never below
99%; it reads the out-of-fold predictions only (never a test split), so the promise made at the
chosen level is still a split-conformal one. On PBC the out-of-fold rule chose 0.993, where a
99% set caught only half of the errors: at 98% accuracy, 1% of cells may go uncovered.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from crepes import ConformalClassifier
from crepes.extras import hinge
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

AUTO = "auto"
DEFAULT_COVERAGE = AUTO
# The "auto" rule (the one place its numbers live): the levels tried, lowest first, and what
# the out-of-fold sets must achieve at the level chosen.
AUTO_LEVELS = tuple(round(0.990 + 0.001 * i, 3) for i in range(9))  # 0.990 ... 0.998
AUTO_MISCLASSIFIED_FLAGGED = 0.80  # at least this share of misclassified cells flagged
AUTO_MAX_FLAGGED = 0.10  # at most this share of all cells flagged
ECE_BINS = 15


def check_coverage(coverage: float | str) -> float | str:
    """A coverage level in [0.5, 1) as a float, or "auto"; anything else is refused."""
    if isinstance(coverage, str) and coverage.strip().lower() == AUTO:
        return AUTO
    try:
        value = float(coverage)
    except (TypeError, ValueError):
        value = None
    if value is None or not 0.5 <= value < 1:
        raise ValueError(f"coverage must be 'auto' or a number at least 0.5 and below 1 (e.g. 0.99), "
                         f"got {coverage!r}")
    return value


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Top-label ECE: the gap between confidence and accuracy, averaged over `bins` equal-width
    confidence bins weighted by their share of cells (0 = perfectly calibrated)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    confidence = probabilities.max(1)
    correct = probabilities.argmax(1) == np.asarray(labels)
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    gap = 0.0
    for b in np.unique(which):
        members = which == b
        gap += members.mean() * abs(confidence[members].mean() - correct[members].mean())
    return float(gap)


def temperature_scale(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T): T > 1 softens overconfident probabilities; the ranking is kept."""
    logits = np.log(np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1.0))
    return softmax(logits / temperature, axis=1)


def fit_temperature(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """The one temperature that minimises the negative log-likelihood of `labels`."""
    logits = np.log(np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1.0))
    rows = np.arange(len(labels))

    def nll(log_t: float) -> float:
        return float(-log_softmax(logits / np.exp(log_t), axis=1)[rows, labels].mean())

    return float(np.exp(minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded").x))


@dataclass
class Calibration:
    """What a classifier learned about its own probabilities: the temperature and, for the
    conformal sets, each calibration cell's nonconformity score with its true class."""

    temperature: float
    coverage: float
    scores: np.ndarray  # (n,) 1 - p(true class) after temperature scaling
    score_classes: np.ndarray  # (n,) the true class index of each score
    summary: dict  # ECE before/after, share flagged, mean set size on the calibration cells

    @classmethod
    def fit(cls, probabilities: np.ndarray, labels: np.ndarray,
            coverage: float | str = DEFAULT_COVERAGE) -> Calibration:
        """From out-of-fold `probabilities` (n, classes) and true class indices `labels`, at
        `coverage` (a level, or "auto": chosen on these same cells, see `choose_coverage`)."""
        probabilities = np.asarray(probabilities, dtype=np.float64)
        labels = np.asarray(labels, dtype=int)
        requested = check_coverage(coverage)
        temperature = fit_temperature(probabilities, labels)
        scaled = temperature_scale(probabilities, temperature)
        classes = np.arange(probabilities.shape[1])
        calibration = cls(temperature=temperature, coverage=AUTO_LEVELS[0] if requested == AUTO else requested,
                          scores=hinge(scaled, classes, labels), score_classes=labels, summary={})
        p_values = calibration.p_values(scaled)
        choice = None
        if requested == AUTO:
            choice = _choose_level(p_values, scaled.argmax(1) != labels)
            calibration.coverage = choice["chosen"]
        sets = p_values >= 1 - calibration.coverage
        calibration.summary = {
            "temperature": temperature, "coverage": calibration.coverage, "coverage_requested": requested,
            "calibration_cells": int(len(labels)),
            "ece_before": expected_calibration_error(probabilities, labels),
            "ece_after": expected_calibration_error(scaled, labels),
            "mean_set_size": float(sets.sum(1).mean()),
            "share_flagged": float((sets.sum(1) != 1).mean()),
            **({"coverage_choice": choice} if choice else {}),
        }
        return calibration

    def probabilities(self, probabilities: np.ndarray) -> np.ndarray:
        """Raw classifier probabilities -> calibrated (temperature-scaled) ones."""
        return temperature_scale(probabilities, self.temperature)

    def p_values(self, calibrated: np.ndarray) -> np.ndarray:
        """(n, classes) conformal p-value of each class for each cell, each class against the
        calibration cells of that class (crepes, Mondrian by class, not smoothed: the same
        cell always gets the same set)."""
        calibrated = np.atleast_2d(np.asarray(calibrated, dtype=np.float64))
        conformal = ConformalClassifier().fit(self.scores, bins=self.score_classes)
        alphas = hinge(calibrated)
        return np.column_stack([  # class c's score against class c's calibration cells
            conformal.predict_p(alphas[:, c], np.full(len(calibrated), c), smoothing=False)
            for c in range(calibrated.shape[1])])

    def prediction_sets(self, calibrated: np.ndarray, coverage: float | str | None = None) -> np.ndarray:
        """(n, classes) booleans: the classes that cannot be ruled out at `coverage`
        (default, or "auto": the calibrated coverage, the level chosen when it was fitted)."""
        coverage = self.coverage if coverage is None else check_coverage(coverage)
        coverage = self.coverage if coverage == AUTO else coverage
        return self.p_values(calibrated) >= 1 - coverage

    # -- persistence (inside the classifier's sidecar JSON) -------------------------------
    def to_dict(self) -> dict:
        return {"temperature": self.temperature, "coverage": self.coverage,
                "scores": [float(s) for s in self.scores],
                "score_classes": [int(c) for c in self.score_classes], "summary": self.summary}

    @classmethod
    def from_dict(cls, saved: dict) -> Calibration:
        return cls(temperature=float(saved["temperature"]), coverage=float(saved["coverage"]),
                   scores=np.asarray(saved["scores"], dtype=np.float64),
                   score_classes=np.asarray(saved["score_classes"], dtype=int), summary=saved.get("summary", {}))


def choose_coverage(probabilities: np.ndarray, labels: np.ndarray) -> dict:
    """The "auto" coverage level from out-of-fold `probabilities` (n, classes) and true class
    indices `labels` alone (nothing else can reach it): `chosen`, whether the rule was `met`,
    the `reason`, and the out-of-fold figures at every level tried (`levels`)."""
    return Calibration.fit(probabilities, labels, AUTO).summary["coverage_choice"]


def _choose_level(p_values: np.ndarray, wrong: np.ndarray) -> dict:
    """The lowest of AUTO_LEVELS whose sets (from the out-of-fold cells' conformal `p_values`)
    flag at least AUTO_MISCLASSIFIED_FLAGGED of the `wrong` cells and at most AUTO_MAX_FLAGGED
    of all. If none does: the highest level that still flags at most AUTO_MAX_FLAGGED (the most
    errors caught within the flag budget), or the lowest level if even that flags more.

    Each cell's own score is among the calibration scores its p-values are read against (a
    1/n_class optimism, negligible at the archive's size)."""
    levels = []
    for level in AUTO_LEVELS:
        size = (p_values >= 1 - level).sum(1)
        flagged = size != 1
        levels.append({"level": level, "mean_set_size": float(size.mean()), "share_flagged": float(flagged.mean()),
                       "misclassified_flagged": float(flagged[wrong].mean()) if wrong.any() else None})
    rule = {"misclassified_flagged_at_least": AUTO_MISCLASSIFIED_FLAGGED, "share_flagged_at_most": AUTO_MAX_FLAGGED,
            "out_of_fold_cells": int(len(wrong)), "out_of_fold_misclassified": int(wrong.sum())}

    def meets(row: dict) -> bool:
        caught = row["misclassified_flagged"] is None or row["misclassified_flagged"] >= AUTO_MISCLASSIFIED_FLAGGED
        return caught and row["share_flagged"] <= AUTO_MAX_FLAGGED

    qualifying = [row for row in levels if meets(row)]
    within_budget = [row for row in levels if row["share_flagged"] <= AUTO_MAX_FLAGGED]
    if qualifying:
        chosen, reason = qualifying[0], "the lowest level that meets the rule on the out-of-fold cells"
    elif within_budget:
        chosen = within_budget[-1]
        reason = (f"no level flags {AUTO_MISCLASSIFIED_FLAGGED:.0%} of the misclassified out-of-fold cells within "
                  f"{AUTO_MAX_FLAGGED:.0%} flagged; the highest level within the flag budget catches the most")
    else:
        chosen = levels[0]
        reason = (f"every level flags more than {AUTO_MAX_FLAGGED:.0%} of the out-of-fold cells; "
                  f"the lowest level ({AUTO_LEVELS[0]:g}) flags the fewest")
    return {"chosen": chosen["level"], "met": bool(qualifying), "reason": reason, **rule,
            "at_chosen": chosen, "levels": levels}
