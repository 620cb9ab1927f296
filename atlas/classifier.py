"""Cell-class prediction with gradient-boosted trees (XGBoost) and its uncertainty.

Input is the cell's features (morphology + colour) next to its latent embedding
(`classifier_input`, the one place the two are joined). The entropy of the predicted
distribution, in bits, says how unsure the prediction is (0 = certain, log2(classes) =
uniform). What a person relies on is the prediction set (`atlas.calibration`): the classes
that cannot be ruled out at the classifier's coverage, calibrated class by class on the
out-of-fold predictions of the training cells, which also fix a temperature for the
probabilities. The default coverage is "auto": the lowest level from 99% up whose out-of-fold
sets flag most of the misclassified cells (`atlas.calibration.choose_coverage`), so never
below 99%. A cell is flagged when its set holds more than one class, or none.

Classifiers saved before calibration (no "calibration" in their sidecar) still load: their
probabilities are reported as they are, without prediction sets, and they flag by the entropy
threshold (as in the CellEstimator report, 1.3 bits; fixed or chosen on the out-of-fold
predictions with `flag_entropy="auto"`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import xgboost as xgb
from sklearn.model_selection import StratifiedKFold

from atlas.calibration import AUTO, DEFAULT_COVERAGE, Calibration

DEFAULT_FLAG_BITS = 1.3


def entropy_bits(probabilities: np.ndarray) -> np.ndarray:
    """Shannon entropy in bits of each row of a probability matrix."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1.0)
    return -(p * np.log2(p)).sum(axis=-1)


def classifier_input(features: np.ndarray, latents: np.ndarray) -> np.ndarray:
    """What the classifier sees for each cell: its features beside its latent, (n, f + d)."""
    return np.hstack([np.atleast_2d(features), np.atleast_2d(latents)]).astype(np.float32)


@dataclass
class Prediction:
    """One cell's prediction."""

    label: str
    probabilities: dict[str, float]
    entropy_bits: float
    flagged: bool  # the set holds more than one class or none (uncalibrated: entropy threshold)
    prediction_set: list[str] | None = None  # None: a classifier saved before calibration
    coverage: float | None = None  # of the prediction set


@dataclass
class Predictions:
    """Predictions of many cells, as arrays: labels (n,), probabilities (n, classes),
    entropy_bits (n,), flagged (n,), sets (n, classes) booleans or None (uncalibrated)."""

    classes: list[str]
    labels: np.ndarray
    probabilities: np.ndarray
    entropy_bits: np.ndarray
    flagged: np.ndarray
    sets: np.ndarray | None = None
    coverage: float | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def prediction_set(self, i: int) -> list[str] | None:
        return None if self.sets is None else [c for c, kept in zip(self.classes, self.sets[i]) if kept]

    def __getitem__(self, i: int) -> Prediction:
        return Prediction(label=str(self.labels[i]),
                          probabilities={c: float(p) for c, p in zip(self.classes, self.probabilities[i])},
                          entropy_bits=float(self.entropy_bits[i]), flagged=bool(self.flagged[i]),
                          prediction_set=self.prediction_set(i), coverage=self.coverage)


class CellClassifier:
    """scikit-learn style: hyper-parameters in `__init__`; `fit(X, y, classes)` sets
    `model_`, `classes_`, `out_of_fold_proba_` (honest probabilities for the training cells
    themselves, each from a model that did not see it), `calibration_` (temperature and
    conformal sets at `coverage`, a level or "auto", from those; `calibration_.coverage` is the
    level used), `flag_bits_` and `flag_choice_`;
    `predict_proba(X)` (raw), `predict(X)` and `predictions(proba)` (calibrated) use them."""

    def __init__(self, n_estimators: int = 300, max_depth: int = 4, learning_rate: float = 0.1,
                 flag_entropy: float | str = DEFAULT_FLAG_BITS, seed: int = 0, threads: int = 2,
                 coverage: float | str = DEFAULT_COVERAGE):
        self.n_estimators = n_estimators
        self.max_depth = max_depth
        self.learning_rate = learning_rate
        self.flag_entropy = flag_entropy  # bits, or "auto" (chosen on the out-of-fold predictions)
        self.seed = seed
        self.threads = threads
        self.coverage = coverage

    def _new_model(self, num_classes: int) -> xgb.XGBClassifier:
        return xgb.XGBClassifier(
            n_estimators=self.n_estimators, max_depth=self.max_depth,
            learning_rate=self.learning_rate, subsample=0.8, colsample_bytree=0.8,
            objective="multi:softprob", num_class=num_classes, tree_method="hist",
            random_state=self.seed, n_jobs=self.threads,
        )

    def fit(self, features: np.ndarray, labels: np.ndarray, classes: list[str]) -> CellClassifier:
        """`labels` are indices into `classes`."""
        labels = np.asarray(labels)
        if len(classes) < 2:
            raise ValueError("the classifier needs labelled cells of at least 2 classes")
        self.classes_ = list(classes)
        self.out_of_fold_proba_ = self._out_of_fold_proba(features, labels)
        self.flag_choice_ = choose_flag_threshold(self.out_of_fold_proba_, labels)
        self.flag_bits_ = (self.flag_choice_["chosen_bits"] if self.flag_entropy == "auto"
                           else float(self.flag_entropy))
        self.calibration_ = Calibration.fit(self.out_of_fold_proba_, labels, self.coverage)
        self.model_ = self._new_model(len(classes))
        self.model_.fit(np.asarray(features, np.float32), labels)
        return self

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        return self.model_.predict_proba(np.asarray(features, np.float32))

    def predict(self, features: np.ndarray) -> Predictions:
        """Label, probabilities, entropy and flag of every row of `features`."""
        return self.predictions(self.predict_proba(features))

    def predictions(self, probabilities: np.ndarray, coverage: float | str | None = None) -> Predictions:
        """Label, calibrated probabilities, entropy, prediction set (at `coverage`; default the
        classifier's) and flag from raw probabilities this classifier (or its folds) gave."""
        probabilities = np.atleast_2d(np.asarray(probabilities, dtype=np.float64))
        calibration = getattr(self, "calibration_", None)
        sets = None
        if calibration is not None:
            probabilities = calibration.probabilities(probabilities)
            sets = calibration.prediction_sets(probabilities, coverage)
            coverage = calibration.coverage if coverage in (None, AUTO) else float(coverage)
        entropy = entropy_bits(probabilities)
        flagged = entropy > self.flag_bits_ if sets is None else sets.sum(1) != 1
        return Predictions(classes=self.classes_, labels=np.array(self.classes_, dtype=object)[probabilities.argmax(1)],
                           probabilities=probabilities, entropy_bits=entropy, flagged=flagged, sets=sets,
                           coverage=coverage if sets is not None else None)

    def _out_of_fold_proba(self, features: np.ndarray, labels: np.ndarray, folds: int = 5) -> np.ndarray:
        """Probabilities for every training cell from a model that did not see it."""
        counts = np.bincount(labels, minlength=len(self.classes_))
        splits = max(2, min(folds, counts[counts > 0].min()))
        proba = np.zeros((len(labels), len(self.classes_)))
        splitter = StratifiedKFold(n_splits=int(splits), shuffle=True, random_state=self.seed)
        for train, test in splitter.split(features, labels):
            present = np.unique(labels[train])
            remap = {c: i for i, c in enumerate(present)}
            model = self._new_model(len(present))
            model.fit(np.asarray(features[train], np.float32), np.array([remap[v] for v in labels[train]]))
            proba[np.ix_(test, present)] = model.predict_proba(np.asarray(features[test], np.float32))
        return proba

    # -- persistence: the trees in `path`; classes, threshold and calibration beside them ----
    def save(self, path) -> None:
        self.model_.save_model(str(path))
        saved = {"classes": self.classes_, "flag_bits": self.flag_bits_}
        if getattr(self, "calibration_", None) is not None:
            saved["calibration"] = self.calibration_.to_dict()
        with open(f"{path}.classes.json", "w") as handle:
            json.dump(saved, handle)

    @classmethod
    def load(cls, path, threads: int = 1, flag_bits: float | None = None) -> CellClassifier:
        """`flag_bits` is needed only for classifiers saved before they kept their threshold
        (their sidecar is a plain list of classes; the version's manifest has the threshold).
        Classifiers saved before calibration load with `calibration_` None (entropy flag)."""
        classifier = cls(threads=threads)
        classifier.model_ = xgb.XGBClassifier(n_jobs=threads)
        classifier.model_.load_model(str(path))
        with open(f"{path}.classes.json") as handle:
            saved = json.load(handle)
        if isinstance(saved, list):
            if flag_bits is None:
                raise ValueError(f"{path} predates stored flag thresholds; give flag_bits")
            saved = {"classes": saved, "flag_bits": flag_bits}
        classifier.classes_, classifier.flag_bits_ = list(saved["classes"]), float(saved["flag_bits"])
        classifier.calibration_ = (Calibration.from_dict(saved["calibration"]) if saved.get("calibration")
                                   else None)
        if classifier.calibration_ is not None:
            classifier.coverage = classifier.calibration_.coverage
        return classifier


def choose_flag_threshold(probabilities: np.ndarray, labels: np.ndarray) -> dict:
    """Entropy threshold from held-out predictions: the one that best separates wrong from
    right predictions (Youden's J). Also returns the curve a person can read."""
    entropy = entropy_bits(probabilities)
    wrong = probabilities.argmax(1) != np.asarray(labels)
    curve = []
    for threshold in np.round(np.arange(0.1, np.log2(probabilities.shape[1]) + 0.05, 0.1), 2):
        flagged = entropy > threshold
        kept = ~flagged
        curve.append({
            "threshold_bits": float(threshold),
            "share_flagged": float(flagged.mean()),
            "accuracy_unflagged": float((~wrong[kept]).mean()) if kept.any() else None,
            "errors_caught": float(flagged[wrong].mean()) if wrong.any() else None,
            "youden_j": float(flagged[wrong].mean() - flagged[~wrong].mean()) if wrong.any() and (~wrong).any() else None,
        })
    scored = [c for c in curve if c["youden_j"] is not None]
    best = max(scored, key=lambda c: c["youden_j"])["threshold_bits"] if scored else DEFAULT_FLAG_BITS
    return {"chosen_bits": float(best), "curve": curve}
