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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from crepes import ConformalClassifier
from crepes.extras import hinge
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

DEFAULT_COVERAGE = 0.99
ECE_BINS = 15


def check_coverage(coverage: float) -> float:
    coverage = float(coverage)
    if not 0.5 <= coverage < 1:
        raise ValueError(f"coverage must be at least 0.5 and below 1 (e.g. 0.99), got {coverage}")
    return coverage


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
    def fit(cls, probabilities: np.ndarray, labels: np.ndarray, coverage: float = DEFAULT_COVERAGE) -> Calibration:
        """From out-of-fold `probabilities` (n, classes) and true class indices `labels`."""
        probabilities = np.asarray(probabilities, dtype=np.float64)
        labels = np.asarray(labels, dtype=int)
        temperature = fit_temperature(probabilities, labels)
        scaled = temperature_scale(probabilities, temperature)
        classes = np.arange(probabilities.shape[1])
        calibration = cls(temperature=temperature, coverage=check_coverage(coverage),
                          scores=hinge(scaled, classes, labels), score_classes=labels, summary={})
        sets = calibration.prediction_sets(scaled)
        calibration.summary = {
            "temperature": temperature, "coverage": calibration.coverage,
            "calibration_cells": int(len(labels)),
            "ece_before": expected_calibration_error(probabilities, labels),
            "ece_after": expected_calibration_error(scaled, labels),
            "mean_set_size": float(sets.sum(1).mean()),
            "share_flagged": float((sets.sum(1) != 1).mean()),
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

    def prediction_sets(self, calibrated: np.ndarray, coverage: float | None = None) -> np.ndarray:
        """(n, classes) booleans: the classes that cannot be ruled out at `coverage`
        (default: the calibrated coverage)."""
        coverage = self.coverage if coverage is None else check_coverage(coverage)
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
