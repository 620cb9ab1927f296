"""Novelty: a cell unlike every archived cell is flagged, one like them is not; the score is
calibrated on the archive's own leave-one-out distances (duplicates left out); versions
built before novelty still load; the API and the CLI report it."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from atlas.calibration import AUTO_LEVELS
from atlas.novelty import NOVEL_MESSAGE, NoveltyScorer
from atlas.reference import LoadedAtlas
from atlas.search import LatentIndex
from atlas.synthetic import synthetic_cell, write_synthetic_archive
from tests.conftest import home_copy, open_client, tiny_config

# 300 archived cells. A p-value below 0.01 needs at least 99; with the classifier's entropy
# combined, a cell beyond the whole archive ties with the archive cells that are both far and
# doubted (about one in n+1), so it needs a few hundred: 100 cells gave it 2/101.
NOVELTY_CELLS_PER_CLASS = 75


def test_a_point_far_from_the_archive_is_novel_and_one_from_it_is_not():
    rng = np.random.default_rng(0)
    archive = rng.normal(size=(500, 8)).astype(np.float32)
    scorer = NoveltyScorer(k=5).fit(LatentIndex.build(archive), archive, np.arange(500))
    index = LatentIndex.build(archive)
    fresh = rng.normal(size=(400, 8)).astype(np.float32)  # exchangeable with the archive
    p_values = scorer.p_values([scorer.score(index, row[None]) for row in fresh])
    assert 0.002 < (p_values < 0.05).mean() < 0.1  # about 5% below 0.05: calibrated
    far = scorer.novelty(scorer.score(index, np.full((1, 8), 6.0, np.float32)))
    assert far.novel and far.message == NOVEL_MESSAGE and far.p_value == pytest.approx(1 / 501)
    near = scorer.novelty(scorer.score(index, archive[:1] + 0.01))
    assert not near.novel and near.message is None


def test_leave_one_out_scores_leave_out_the_duplicate_group():
    rng = np.random.default_rng(1)
    cells = rng.normal(size=(50, 4)).astype(np.float32)
    archive = np.vstack([cells, cells[:10]])  # ten exact duplicates
    groups = np.r_[np.arange(50), np.arange(10)]
    index = LatentIndex.build(archive)
    scorer = NoveltyScorer(k=3)
    with_groups = scorer.leave_one_out_scores(index, archive, groups)
    alone = scorer.leave_one_out_scores(index, archive, np.arange(60))
    assert (with_groups > 0).all()  # a duplicate is not the cell's own neighbour
    assert (alone[:10] < with_groups[:10]).all()


def test_the_scorer_survives_a_save(tmp_path):
    archive = np.random.default_rng(2).normal(size=(40, 4)).astype(np.float32)
    scorer = NoveltyScorer(k=2, level=0.05).fit(LatentIndex.build(archive), archive, np.arange(40))
    scorer.save(tmp_path / "n.npz")
    again = NoveltyScorer.load(tmp_path / "n.npz")
    assert (again.k, again.level) == (2, 0.05)
    np.testing.assert_array_equal(again.reference_scores_, scorer.reference_scores_)


def clustered_archive(rng: np.random.Generator, n: int):
    """Three well-separated classes in 8-d, each cell with the entropy (bits) a confident
    classifier gives it: mostly near 0, exponential with mean 0.1."""
    centres = np.array([[4.0] * 8, [-4.0] * 8, [4.0] * 4 + [-4.0] * 4])
    latents = (centres[rng.integers(0, 3, n)] + rng.normal(size=(n, 8))).astype(np.float32)
    return latents, rng.exponential(0.1, n)


def test_distance_combined_with_entropy_catches_an_unseen_class_the_distance_alone_misses():
    rng = np.random.default_rng(3)
    archive, entropy = clustered_archive(rng, 600)
    index = LatentIndex.build(archive)
    combined = NoveltyScorer(k=2).fit(index, archive, np.arange(600), entropy)
    distance_only = NoveltyScorer(k=2).fit(index, archive, np.arange(600))
    assert combined.combined and not distance_only.combined
    assert combined.summary()["combined_with"] and distance_only.summary()["combined_with"] is None
    np.testing.assert_array_equal(combined.reference_scores_, distance_only.reference_scores_)

    def p_values(scorer, latents, entropies):
        return scorer.p_values([scorer.score(index, row[None]) for row in latents], entropies)

    # known classes, new cells: exchangeable with the archive, so p < 0.05 about 5% of the time
    known, known_entropy = clustered_archive(rng, 1000)
    assert 0.02 < (p_values(combined, known, known_entropy) < 0.05).mean() < 0.09
    assert (p_values(combined, known, known_entropy) < 0.01).mean() < 0.03
    # an unseen class the embedding places at the edge of a known one, where the classifier
    # hesitates (0.8-1.2 bits; the archive's cells almost never do)
    unseen = (np.full(8, 4.0) + 1.0 + rng.normal(size=(200, 8))).astype(np.float32)
    unseen_entropy = rng.uniform(0.8, 1.2, 200)
    assert (p_values(distance_only, unseen, None) < 0.01).mean() < 0.2  # distance alone misses most
    assert (p_values(combined, unseen, unseen_entropy) < 0.01).mean() > 0.8
    # without the cell's entropy the combined scorer answers by distance, as before
    np.testing.assert_array_equal(p_values(combined, unseen, None), p_values(distance_only, unseen, None))
    # a cell far from every class is still novel however sure the classifier is
    far = combined.novelty(combined.score(index, np.full((1, 8), 12.0, np.float32)), entropy_bits=0.0)
    assert far.novel and far.message == NOVEL_MESSAGE


def test_evaluate_ranks_an_unseen_class_by_the_combined_statistic():
    from types import SimpleNamespace

    from indexer.evaluate import novelty

    rng = np.random.default_rng(5)
    archive, entropy = clustered_archive(rng, 400)
    index = LatentIndex.build(archive)
    known, known_entropy = clustered_archive(rng, 200)
    unseen = (np.full(8, 4.0) + 1.0 + rng.normal(size=(50, 8))).astype(np.float32)
    latents = np.vstack([known, unseen])
    labels = np.array(["known"] * 200 + ["unseen"] * 50, dtype=object)
    entropies = np.r_[known_entropy, rng.uniform(0.8, 1.2, 50)]
    reports = {}
    for name, fitted_entropy in (("distance", None), ("combined", entropy)):
        atlas = SimpleNamespace(index=index, classes=["known"],
                                novelty_scorer=NoveltyScorer().fit(index, archive, np.arange(400), fitted_entropy))
        reports[name] = novelty(atlas, latents, labels, entropies)
    assert reports["combined"]["combined_with_entropy"] and not reports["distance"]["combined_with_entropy"]
    combined, distance = (reports[n]["unknown_classes"]["unseen"] for n in ("combined", "distance"))
    assert combined["auroc"] > 0.95 and combined["auroc"] > distance["auroc"] + 0.1
    assert combined["share_flagged_at_5pct_false_alarms"] > distance["share_flagged_at_5pct_false_alarms"]


def test_the_combined_scorer_survives_a_save_and_an_older_scorer_loads_as_distance_only(tmp_path):
    rng = np.random.default_rng(4)
    archive, entropy = clustered_archive(rng, 200)
    index = LatentIndex.build(archive)
    scorer = NoveltyScorer().fit(index, archive, np.arange(200), entropy)
    scorer.save(tmp_path / "n.npz")
    again = NoveltyScorer.load(tmp_path / "n.npz")
    assert again.combined
    np.testing.assert_array_equal(again.reference_combined_, scorer.reference_combined_)
    query = [scorer.score(index, archive[:1] + 0.5)]
    assert again.p_values(query, [1.0]) == scorer.p_values(query, [1.0])
    distance_only = NoveltyScorer().fit(index, archive, np.arange(200))
    np.savez(tmp_path / "old.npz", reference_scores=distance_only.reference_scores_, k=2, level=0.01)  # as before
    old = NoveltyScorer.load(tmp_path / "old.npz")
    assert not old.combined and old.p_values(query, [1.0]) == distance_only.p_values(query)
    with pytest.raises(ValueError, match="one per archived cell"):
        NoveltyScorer().fit(index, archive, np.arange(200), entropy[:10])


@pytest.fixture(scope="module")
def novelty_atlas(tmp_path_factory):
    from indexer.build import build

    images = write_synthetic_archive(tmp_path_factory.mktemp("novelty-images"),
                                     per_class=NOVELTY_CELLS_PER_CLASS, seed=5)
    home = tmp_path_factory.mktemp("novelty-atlas")
    build(tiny_config(images, home))
    return home


def test_a_cell_of_an_unseen_shape_is_novel_and_held_out_cells_of_known_classes_are_not(novelty_atlas):
    from atlas.reference import LoadedAtlas

    atlas = LoadedAtlas.open(novelty_atlas)
    assert atlas.manifest["novelty"]["archived_cells"] == 4 * NOVELTY_CELLS_PER_CLASS
    rng = np.random.default_rng(123)  # not the archive's seed: cells it has not seen
    blasts = [atlas.query_image(synthetic_cell("blast", rng)).novelty for _ in range(4)]
    assert all(n.novel and n.message == NOVEL_MESSAGE for n in blasts)
    known = [atlas.query_image(synthetic_cell(label, rng)).novelty
             for label in ("neutrophil", "lymphocyte", "monocyte", "eosinophil") for _ in range(4)]
    assert sum(n.novel for n in known) <= 2  # a held-out cell of a known class is (almost always) not novel
    assert max(n.score for n in known) < min(n.score for n in blasts)


def test_reference_cells_answers_carry_novelty_and_the_prediction_set(novelty_atlas, tmp_path):
    import io

    rng = np.random.default_rng(7)
    buffer = io.BytesIO()
    Image.fromarray(synthetic_cell("blast", rng)).save(buffer, format="PNG")
    with open_client(novelty_atlas) as client:
        upload = client.post("/v1/reference-cells", files={"image": ("blast.png", buffer.getvalue(), "image/png")})
        assert upload.status_code == 200, upload.text
        body = upload.json()
        assert body["novelty"]["novel"] is True and body["novelty"]["message"] == NOVEL_MESSAGE
        chosen = LoadedAtlas.open(novelty_atlas).classifier.calibration_.coverage  # "auto": chosen out-of-fold
        assert chosen in AUTO_LEVELS and body["prediction"]["coverage"] == chosen
        assert body["prediction"]["label"] in body["prediction"]["prediction_set"]  # 25 a class: none ruled out
        assert body["prediction"]["flagged"] is (len(body["prediction"]["prediction_set"]) != 1)
        cell_id = client.get("/v1/cells", params={"limit": 1}).json()["items"][0]["cell_id"]
        archived = client.get(f"/v1/cells/{cell_id}/reference-cells").json()
        assert archived["novelty"]["novel"] is False and archived["novelty"]["message"] is None
        assert 0 < archived["novelty"]["p_value"] <= 1
        assert isinstance(archived["prediction"]["prediction_set"], list)


def test_a_version_built_before_novelty_and_prediction_sets_still_answers(built_atlas, tmp_path):
    import json

    from atlas.store import AtlasStore
    from atlas.version import CLASSIFIER, NOVELTY

    home = home_copy(built_atlas[0], tmp_path)
    files = AtlasStore(home).version(AtlasStore(home).require_current())
    files.path(NOVELTY).unlink()
    sidecar = files.path(f"{CLASSIFIER}.classes.json")
    saved = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({"classes": saved["classes"], "flag_bits": 1.3}))
    cells = files.read_cells().drop(columns=["prediction_set"])
    files.write_cells(cells)
    with open_client(home) as client:
        cell_id = cells["cell_id"].iat[0]
        body = client.get(f"/v1/cells/{cell_id}/reference-cells").json()
        assert body["novelty"] is None and body["prediction"]["prediction_set"] is None
        assert body["prediction"]["flagged"] is bool(cells["flagged"].iat[0])


def test_evaluate_reports_coverage_calibration_and_novelty_of_a_left_out_class(tmp_path):
    from indexer.evaluate import evaluate_novelty

    train = write_synthetic_archive(tmp_path / "train", per_class=10, seed=11)
    test = write_synthetic_archive(tmp_path / "test", per_class=4, seed=12)
    config = tiny_config(train, tmp_path / "home")
    result = evaluate_novelty(config, test, ["eosinophil"], progress=False)
    assert set(result["left_out"]) == {"eosinophil"}
    eosinophil = result["left_out"]["eosinophil"]
    assert eosinophil["cells"] == 4 and 0 <= eosinophil["auroc"] <= 1
    assert 0 <= eosinophil["share_flagged_at_5pct_false_alarms"] <= 1
    assert result["auroc_mean"] == eosinophil["auroc"]
    from atlas.reference import LoadedAtlas
    from indexer.evaluate import evaluate

    home = tmp_path / "home" / "without-eosinophil"
    assert eosinophil["home"] == str(home) and "eosinophil" not in LoadedAtlas.open(home).classes
    report = evaluate(home, test, rotmes_per_class=0, progress=False)
    uncertainty = report["uncertainty"]
    assert uncertainty["coverage_requested"] == "auto" and uncertainty["default_coverage"] in AUTO_LEVELS
    assert uncertainty["calibrated"] and set(uncertainty["levels"]) == {"0.95", "0.99",
                                                                        f"{uncertainty['default_coverage']:g}"}
    for level in uncertainty["levels"].values():
        assert 0 <= level["coverage"] <= 1 and level["mean_set_size"] >= 0
        assert set(level["per_class"]) == {"neutrophil", "lymphocyte", "monocyte"}  # the known classes
    assert uncertainty["ece_before"] >= 0 and uncertainty["ece_after"] >= 0


def test_evaluate_novelty_cli_refuses_a_class_that_is_not_there(tmp_path, capsys):
    from indexer.cli import main

    train = write_synthetic_archive(tmp_path / "train", per_class=1, seed=0)
    code = main(["evaluate-novelty", "--images", str(train), "--test", str(train), "--leave-out", "blast",
                 "--home", str(tmp_path / "h"), "--quiet"])
    assert code == 2 and "no sub-folder 'blast'" in capsys.readouterr().err


def test_evaluate_novelty_leaves_out_each_class_in_turn(tmp_path, capsys):
    """`--leave-out each`: one atlas per class, each without that class only, and the mean."""
    import json

    from atlas.reference import LoadedAtlas
    from indexer.cli import main

    train = write_synthetic_archive(tmp_path / "train", per_class=8, seed=11)
    test = write_synthetic_archive(tmp_path / "test", per_class=3, seed=12)
    code = main(["evaluate-novelty", "--images", str(train), "--test", str(test), "--leave-out", "each",
                 "--home", str(tmp_path / "h"), "--preset", "tiny", "--epochs", "1", "--threads", "1", "--quiet",
                 "--out", str(tmp_path / "r.json")])
    assert code == 0
    result = json.loads((tmp_path / "r.json").read_text())
    classes = sorted(p.name for p in train.iterdir())
    assert sorted(result["left_out"]) == classes
    for name, figures in result["left_out"].items():
        assert sorted(LoadedAtlas.open(tmp_path / "h" / f"without-{name}").classes) == [c for c in classes if c != name]
        assert figures["cells"] == 3
    assert result["auroc_mean"] == pytest.approx(np.mean([v["auroc"] for v in result["left_out"].values()]))


def test_evaluate_novelty_checks_every_class_before_building(tmp_path, capsys):
    from indexer.cli import main

    train = write_synthetic_archive(tmp_path / "train", per_class=1, seed=0)
    code = main(["evaluate-novelty", "--images", str(train), "--test", str(train), "--leave-out", "monocyte",
                 "blast", "--home", str(tmp_path / "h"), "--quiet"])
    assert code == 2 and "no sub-folder 'blast'" in capsys.readouterr().err
    assert not (tmp_path / "h").exists()
    code = main(["evaluate-novelty", "--images", str(tmp_path / "missing"), "--test", str(train), "--leave-out",
                 "each", "--home", str(tmp_path / "h"), "--quiet"])
    assert code == 2 and "image folder" in capsys.readouterr().err and not (tmp_path / "h").exists()
