"""Novelty: a cell unlike every archived cell is flagged, one like them is not; the score is
calibrated on the archive's own leave-one-out distances (duplicates left out); versions
built before novelty still load; the API and the CLI report it."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from atlas.novelty import NOVEL_MESSAGE, NoveltyScorer
from atlas.search import LatentIndex
from atlas.synthetic import synthetic_cell, write_synthetic_archive
from tests.conftest import home_copy, open_client, tiny_config

NOVELTY_CELLS_PER_CLASS = 25  # 100 archived cells: a p-value below 0.01 needs at least 99


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
        assert body["prediction"]["coverage"] == 0.99
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
    result = evaluate_novelty(config, test, "eosinophil", progress=False)
    novelty = result["novelty"]
    assert set(novelty["unknown_classes"]) == {"eosinophil"}
    eosinophil = novelty["unknown_classes"]["eosinophil"]
    assert eosinophil["cells"] == 4 and 0 <= eosinophil["auroc"] <= 1
    assert 0 <= eosinophil["share_flagged_at_5pct_false_alarms"] <= 1
    assert novelty["auroc_mean"] == eosinophil["auroc"]
    from indexer.evaluate import evaluate

    report = evaluate(tmp_path / "home", test, rotmes_per_class=0, progress=False)
    uncertainty = report["uncertainty"]
    assert uncertainty["calibrated"] and set(uncertainty["levels"]) == {"0.95", "0.99"}
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
