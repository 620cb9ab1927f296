"""Cell-class prediction with gradient-boosted trees (XGBoost) and its uncertainty.

Input is the cell's features (morphology + colour) next to its latent embedding. The entropy
of the predicted distribution, in bits, says how unsure the prediction is (0 = certain,
log2(classes) = uniform); cells above a threshold are flagged for a person, as in the
CellEstimator report (1.3 bits).
"""

from __future__ import annotations

import json

import numpy as np
import xgboost as xgb
from sklearn.model_selection import StratifiedKFold

DEFAULT_FLAG_BITS = 1.3


def entropy_bits(probabilities: np.ndarray) -> np.ndarray:
    """Shannon entropy in bits of each row of a probability matrix."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1.0)
    return -(p * np.log2(p)).sum(axis=-1)


class CellClassifier:
    """`fit(X, y)` sets `model_` and `classes_`; `predict_proba(X)`; `out_of_fold_proba`
    gives honest probabilities for the training cells themselves (for the review queue)."""

    def __init__(self, n_estimators: int = 300, max_depth: int = 4, learning_rate: float = 0.1,
                 seed: int = 0, threads: int = 2):
        self.n_estimators = n_estimators
        self.max_depth = max_depth
        self.learning_rate = learning_rate
        self.seed = seed
        self.threads = threads

    def _new_model(self, num_classes: int) -> xgb.XGBClassifier:
        return xgb.XGBClassifier(
            n_estimators=self.n_estimators, max_depth=self.max_depth,
            learning_rate=self.learning_rate, subsample=0.8, colsample_bytree=0.8,
            objective="multi:softprob", num_class=num_classes, tree_method="hist",
            random_state=self.seed, n_jobs=self.threads,
        )

    def fit(self, features: np.ndarray, labels: np.ndarray, classes: list[str]) -> CellClassifier:
        labels = np.asarray(labels)
        if len(classes) < 2:
            raise ValueError("the classifier needs labelled cells of at least 2 classes")
        self.classes_ = list(classes)
        self.model_ = self._new_model(len(classes))
        self.model_.fit(np.asarray(features, np.float32), labels)
        return self

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        return self.model_.predict_proba(np.asarray(features, np.float32))

    def out_of_fold_proba(self, features: np.ndarray, labels: np.ndarray, classes: list[str],
                          folds: int = 5) -> np.ndarray:
        """Probabilities for every training cell from a model that did not see it."""
        labels = np.asarray(labels)
        counts = np.bincount(labels, minlength=len(classes))
        splits = max(2, min(folds, counts[counts > 0].min()))
        proba = np.zeros((len(labels), len(classes)))
        splitter = StratifiedKFold(n_splits=int(splits), shuffle=True, random_state=self.seed)
        for train, test in splitter.split(features, labels):
            present = np.unique(labels[train])
            remap = {c: i for i, c in enumerate(present)}
            model = self._new_model(len(present))
            model.fit(np.asarray(features[train], np.float32), np.array([remap[v] for v in labels[train]]))
            proba[np.ix_(test, present)] = model.predict_proba(np.asarray(features[test], np.float32))
        return proba

    def save(self, path) -> None:
        self.model_.save_model(str(path))
        with open(f"{path}.classes.json", "w") as handle:
            json.dump(self.classes_, handle)

    @classmethod
    def load(cls, path, threads: int = 1) -> CellClassifier:
        classifier = cls(threads=threads)
        classifier.model_ = xgb.XGBClassifier(n_jobs=threads)
        classifier.model_.load_model(str(path))
        with open(f"{path}.classes.json") as handle:
            classifier.classes_ = json.load(handle)
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
