"""Calibrated uncertainty: conformal prediction sets keep their coverage class by class,
temperature scaling fixes overconfidence, the flag follows the set, old classifiers load."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import softmax

from atlas.calibration import (
    AUTO_LEVELS,
    AUTO_MAX_FLAGGED,
    AUTO_MISCLASSIFIED_FLAGGED,
    Calibration,
    check_coverage,
    choose_coverage,
    expected_calibration_error,
    fit_temperature,
)
from atlas.classifier import CellClassifier, entropy_bits

CLASSES = 5


def generated_probabilities(n: int, rng: np.random.Generator, overconfidence: float = 1.0):
    """A classifier with a known confusion: true logits are a class signal plus Gaussian
    noise, the last class much noisier (it is confused with the others); labels are drawn from
    the calibrated probabilities, which the classifier reports raised to `overconfidence`."""
    signal = np.array([5.0, 5.0, 5.0, 5.0, 1.5])
    centre = rng.integers(0, CLASSES, n)
    logits = rng.normal(0, 1.0, (n, CLASSES))
    logits[np.arange(n), centre] += signal[centre]
    calibrated = softmax(logits, axis=1)
    labels = (calibrated.cumsum(1) > rng.random(n)[:, None]).argmax(1)
    return softmax(logits * overconfidence, axis=1), labels


@pytest.mark.parametrize("coverage", [0.9, 0.99])
def test_prediction_sets_hold_the_true_class_at_the_stated_coverage_in_every_class(coverage):
    rng = np.random.default_rng(1)
    n = 6000
    calibration_proba, calibration_labels = generated_probabilities(n, rng)
    test_proba, test_labels = generated_probabilities(n, rng)
    calibration = Calibration.fit(calibration_proba, calibration_labels, coverage)
    sets = calibration.prediction_sets(calibration.probabilities(test_proba))
    covered = sets[np.arange(len(test_labels)), test_labels]

    def tolerance(cells):  # 3.5 standard deviations of calibration + test sampling
        return 3.5 * np.sqrt(2 * coverage * (1 - coverage) / cells)

    assert abs(covered.mean() - coverage) < tolerance(n)
    for c in range(CLASSES):  # class-conditional: the noisy class is covered too
        assert abs(covered[test_labels == c].mean() - coverage) < tolerance(n / CLASSES), c
    # not trivially covered by taking every class
    assert sets.sum(1).mean() < CLASSES - 1
    assert (sets.sum(1) == 1).mean() > 0.1


def test_a_class_blind_threshold_would_miss_the_noisy_class_the_mondrian_sets_cover():
    rng = np.random.default_rng(1)
    proba, labels = generated_probabilities(6000, rng)
    test, test_labels = generated_probabilities(6000, rng)
    # one threshold for all classes (standard split conformal) at 90%
    scores = 1 - proba[np.arange(len(labels)), labels]
    threshold = np.quantile(scores, 0.9)
    blind = (1 - test[test_labels == 4, 4]) <= threshold
    mondrian = Calibration.fit(proba, labels, 0.9)
    sets = mondrian.prediction_sets(mondrian.probabilities(test))
    assert blind.mean() < 0.87  # the hard class is under-covered by the class-blind rule
    assert sets[test_labels == 4, 4].mean() > blind.mean() + 0.03


def test_temperature_scaling_undoes_overconfidence_and_lowers_the_calibration_error():
    rng = np.random.default_rng(2)
    proba, labels = generated_probabilities(6000, rng, overconfidence=2.5)
    temperature = fit_temperature(proba, labels)
    assert 2.0 < temperature < 3.0
    calibration = Calibration.fit(proba, labels)
    before, after = expected_calibration_error(proba, labels), calibration.summary["ece_after"]
    assert before > 0.05 and after < before / 3
    assert calibration.summary["ece_before"] == pytest.approx(before)
    calibrated = calibration.probabilities(proba)
    np.testing.assert_array_equal(calibrated.argmax(1), proba.argmax(1))  # ranking kept
    np.testing.assert_allclose(calibrated.sum(1), 1)


def test_expected_calibration_error_of_known_cases():
    labels = np.array([0, 0, 1, 1])
    assert expected_calibration_error(np.array([[1.0, 0], [1, 0], [0, 1], [0, 1]]), labels) == 0
    # always 90% sure, right half of the time: a gap of 0.4
    always = np.array([[0.9, 0.1]] * 4)
    assert expected_calibration_error(always, labels) == pytest.approx(0.4)


def fitted_classifier():
    rng = np.random.default_rng(3)
    y = np.repeat([0, 1, 2], 150)
    x = rng.normal(size=(450, 4)) + y[:, None] * 2.0  # overlapping neighbours: some doubt
    return CellClassifier(n_estimators=20, threads=1, coverage=0.95).fit(x, y, ["a", "b", "c"]), x


def test_every_prediction_carries_its_set_and_is_flagged_when_the_set_is_not_one_class(tmp_path):
    classifier, x = fitted_classifier()
    predictions = classifier.predict(x)
    assert predictions.coverage == 0.95 and predictions.sets.shape == (450, 3)
    np.testing.assert_array_equal(predictions.flagged, predictions.sets.sum(1) != 1)
    assert 0 < predictions.flagged.mean() < 0.5
    one = predictions[int(np.flatnonzero(predictions.flagged)[0])]
    assert one.flagged and len(one.prediction_set) != 1 and one.coverage == 0.95
    np.testing.assert_allclose(predictions.entropy_bits, entropy_bits(predictions.probabilities))
    # 99% sets are never smaller than 95% ones
    wider = classifier.predictions(classifier.predict_proba(x), coverage=0.99)
    assert (wider.sets >= predictions.sets).all() and wider.coverage == 0.99
    classifier.save(tmp_path / "c.json")  # the calibration travels with the trees
    again = CellClassifier.load(tmp_path / "c.json")
    assert again.calibration_.temperature == classifier.calibration_.temperature
    again_predictions = again.predict(x)
    np.testing.assert_array_equal(again_predictions.sets, predictions.sets)
    np.testing.assert_allclose(again_predictions.probabilities, predictions.probabilities, rtol=1e-5)


def test_a_classifier_saved_before_calibration_loads_and_flags_by_entropy(tmp_path):
    classifier, x = fitted_classifier()
    classifier.save(tmp_path / "c.json")
    sidecar = tmp_path / "c.json.classes.json"
    saved = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({"classes": saved["classes"], "flag_bits": 0.4}))  # as written before
    old = CellClassifier.load(tmp_path / "c.json")
    assert old.calibration_ is None
    predictions = old.predict(x)
    assert predictions.sets is None and predictions[0].prediction_set is None and predictions[0].coverage is None
    np.testing.assert_array_equal(predictions.flagged, predictions.entropy_bits > 0.4)
    np.testing.assert_allclose(predictions.probabilities, old.predict_proba(x), rtol=1e-6)  # not rescaled


@pytest.mark.parametrize("coverage", [0, 0.3, 1, 1.5, -0.9, "abc", "", "0.99x", "nan", None])
def test_a_coverage_outside_its_range_is_refused_with_a_message(coverage, tmp_path):
    from indexer.config import BuildConfig, BuildError

    with pytest.raises(BuildError, match="coverage must be"):
        BuildConfig(images=tmp_path, home=tmp_path, coverage=coverage)


@pytest.mark.parametrize("coverage", ["1", "abc", "0,99"])
def test_build_cli_refuses_a_bad_coverage_before_building(coverage, tmp_path, capsys):
    from indexer.cli import main

    assert main(["build", "--images", str(tmp_path), "--home", str(tmp_path / "h"), "--coverage", coverage]) == 2
    err = capsys.readouterr().err
    assert "coverage must be 'auto' or a number" in err and "Traceback" not in err
    assert not (tmp_path / "h").exists()


def test_coverage_is_auto_by_default_and_accepts_levels_given_as_text(tmp_path):
    from indexer.config import BuildConfig

    assert BuildConfig(images=tmp_path, home=tmp_path).coverage == "auto"
    assert BuildConfig(images=tmp_path, home=tmp_path, coverage=" AUTO ").coverage == "auto"
    assert BuildConfig(images=tmp_path, home=tmp_path, coverage="0.95").coverage == 0.95  # as the CLI passes it
    assert check_coverage(0.99) == 0.99


# -- "auto": the level chosen on the out-of-fold predictions --------------------------------------
def probabilities_with_confusable_cells(n: int, rng: np.random.Generator, ambiguous: float = 0.06):
    """Like a real cell classifier: most cells clearly one class, a share `ambiguous` of them
    between their class and the next one (both signals equal); labels drawn from the
    calibrated probabilities, so the errors sit among the ambiguous cells (about 98% accuracy
    at 6%)."""
    centre = rng.integers(0, CLASSES, n)
    logits = rng.normal(0, 1.0, (n, CLASSES))
    logits[np.arange(n), centre] += 9.0
    hard = np.flatnonzero(rng.random(n) < ambiguous)
    logits[hard, (centre[hard] + 1) % CLASSES] += 9.0
    calibrated = softmax(logits, axis=1)
    return calibrated, (calibrated.cumsum(1) > rng.random(n)[:, None]).argmax(1)


def out_of_fold_rule(probabilities, labels, level) -> tuple[float, float]:
    """Share flagged and share of the misclassified flagged by `level`'s sets on these cells."""
    calibration = Calibration.fit(probabilities, labels, level)
    flagged = calibration.prediction_sets(calibration.probabilities(probabilities)).sum(1) != 1
    return float(flagged.mean()), float(flagged[probabilities.argmax(1) != labels].mean())


def test_auto_coverage_is_the_lowest_level_meeting_its_rule_on_the_out_of_fold_cells():
    rng = np.random.default_rng(4)
    oof, oof_labels = probabilities_with_confusable_cells(6000, rng)
    choice = choose_coverage(oof, oof_labels)
    chosen = choice["chosen"]
    assert choice["met"] and chosen in AUTO_LEVELS and chosen > AUTO_LEVELS[0]  # 99% would not do here
    flagged, caught = out_of_fold_rule(oof, oof_labels, chosen)
    assert flagged <= AUTO_MAX_FLAGGED and caught >= AUTO_MISCLASSIFIED_FLAGGED
    assert choice["at_chosen"]["share_flagged"] == pytest.approx(flagged)
    below = AUTO_LEVELS[AUTO_LEVELS.index(chosen) - 1]  # the level below fails the rule
    flagged_below, caught_below = out_of_fold_rule(oof, oof_labels, below)
    assert caught_below < AUTO_MISCLASSIFIED_FLAGGED or flagged_below > AUTO_MAX_FLAGGED
    # and the promise holds on new cells of the same kind, at the level chosen
    calibration = Calibration.fit(oof, oof_labels)  # "auto" is the default
    assert calibration.coverage == chosen and calibration.summary["coverage_requested"] == "auto"
    test, test_labels = probabilities_with_confusable_cells(20000, rng)
    sets = calibration.prediction_sets(calibration.probabilities(test))
    covered = sets[np.arange(len(test_labels)), test_labels].mean()
    assert abs(covered - chosen) < 3.5 * np.sqrt(2 * chosen * (1 - chosen) / 6000)
    flagged = sets.sum(1) != 1
    assert flagged.mean() <= AUTO_MAX_FLAGGED + 0.02
    assert flagged[test.argmax(1) != test_labels].mean() >= AUTO_MISCLASSIFIED_FLAGGED - 0.05


def test_auto_coverage_says_what_it_chose_when_no_level_meets_the_rule():
    rng = np.random.default_rng(5)
    noisy = choose_coverage(*probabilities_with_confusable_cells(6000, rng, ambiguous=0.25))
    assert not noisy["met"] and noisy["chosen"] == AUTO_LEVELS[0]  # every level flags > 10%: the floor
    assert "every level flags more than 10%" in noisy["reason"]
    # no confusable cells: the few errors are as sure as the right answers, no level catches them
    clean = choose_coverage(*probabilities_with_confusable_cells(6000, rng, ambiguous=0.0))
    assert not clean["met"] and "no level flags 80%" in clean["reason"]
    within = [row["level"] for row in clean["levels"] if row["share_flagged"] <= AUTO_MAX_FLAGGED]
    assert clean["chosen"] == within[-1]  # the most errors caught within the flag budget


def test_auto_coverage_depends_on_the_out_of_fold_predictions_only(tmp_path):
    import inspect

    assert list(inspect.signature(choose_coverage).parameters) == ["probabilities", "labels"]
    rng = np.random.default_rng(6)
    oof, oof_labels = probabilities_with_confusable_cells(4000, rng)
    calibration = Calibration.fit(oof, oof_labels)
    before = json.dumps(calibration.to_dict())
    # test-time cells, however different, neither move the level nor touch what was learned
    for ambiguous in (0.0, 0.06, 0.5):
        test, _ = probabilities_with_confusable_cells(3000, rng, ambiguous)
        calibration.prediction_sets(calibration.probabilities(test))
        calibration.prediction_sets(calibration.probabilities(test), "auto")
    assert json.dumps(calibration.to_dict()) == before
    assert Calibration.fit(oof, oof_labels).coverage == calibration.coverage  # the same cells, the same level
    # the same holds for a classifier: fitted twice on the same cells, asked about other cells
    rng = np.random.default_rng(3)
    y = np.repeat([0, 1, 2], 150)
    x = rng.normal(size=(450, 4)) + y[:, None] * 3.0
    classifier = CellClassifier(n_estimators=20, threads=1).fit(x, y, ["a", "b", "c"])
    chosen = classifier.calibration_.coverage
    assert chosen in AUTO_LEVELS and classifier.calibration_.summary["coverage_choice"]["chosen"] == chosen
    predictions = classifier.predict(rng.normal(size=(200, 4)) * 5)
    assert predictions.coverage == chosen == classifier.calibration_.coverage
    assert CellClassifier(n_estimators=20, threads=1).fit(x, y, ["a", "b", "c"]).calibration_.coverage == chosen
    classifier.save(tmp_path / "c.json")
    again = CellClassifier.load(tmp_path / "c.json")
    assert again.calibration_.coverage == chosen and again.calibration_.summary["coverage_requested"] == "auto"


def test_evaluate_reports_the_level_auto_chose_and_reads_classifiers_saved_before_it(tmp_path):
    from indexer.evaluate import uncertainty

    rng = np.random.default_rng(3)
    y = np.repeat([0, 1, 2], 150)
    x = rng.normal(size=(450, 4)) + y[:, None] * 2.0
    classifier = CellClassifier(n_estimators=20, threads=1).fit(x, y, ["a", "b", "c"])
    labels = np.array(["a", "b", "c"], dtype=object)[y]
    report = uncertainty(classifier, classifier.predict_proba(x), labels)
    chosen = classifier.calibration_.coverage
    assert report["default_coverage"] == chosen and report["coverage_requested"] == "auto"
    assert report["coverage_choice"]["chosen"] == chosen and f"{chosen:g}" in report["levels"]
    # a sidecar written before "auto" existed (a fixed coverage, no choice) loads and reports it
    classifier.save(tmp_path / "c.json")
    sidecar = tmp_path / "c.json.classes.json"
    saved = json.loads(sidecar.read_text())
    saved["calibration"]["coverage"] = 0.99
    for key in ("coverage_requested", "coverage_choice"):
        del saved["calibration"]["summary"][key]
    sidecar.write_text(json.dumps(saved))
    old = CellClassifier.load(tmp_path / "c.json")
    assert old.calibration_.coverage == 0.99 and old.predict(x).coverage == 0.99
    report = uncertainty(old, old.predict_proba(x), labels)
    assert report["default_coverage"] == 0.99 and report["coverage_requested"] == 0.99
    assert "coverage_choice" not in report
