"""The build job end to end on a tiny synthetic archive, the query path and the CLI."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from atlas.reference import LoadedAtlas
from atlas.store import AtlasStore
from atlas.synthetic import synthetic_cell
from indexer import build as build_module
from indexer import steps
from indexer.cli import main
from tests.conftest import tiny_config


def test_build_publishes_a_complete_version(built_atlas):
    home, result = built_atlas
    folder = result.version_dir
    for name in ("cells.parquet", "latents.npy", "index.faiss", "som.npz", "manifest.json",
                 "models/backbone.pt", "models/vae.pt", "models/classifier.json"):
        assert (folder / name).exists(), name
    assert AtlasStore(home).current_version() == result.version
    cells = pd.read_parquet(folder / "cells.parquet")
    assert len(cells) == 48 and cells["cell_id"].is_unique
    assert set(cells["label"]) == {"neutrophil", "lymphocyte", "monocyte", "eosinophil"}
    manifest = result.manifest
    assert set(manifest["timings_s"]) >= {"ingest_segment_describe", "train_backbone", "som", "classify"}
    assert manifest["som"]["rows"] * manifest["som"]["cols"] >= 4
    assert np.load(folder / "latents.npy").shape == (48, 50)
    probabilities = np.stack(cells["probabilities"].to_numpy())
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-4)
    assert (cells["entropy_bits"] >= 0).all()


def test_query_of_an_archived_cell_never_returns_itself_or_its_duplicates(built_atlas):
    home, _ = built_atlas
    atlas = LoadedAtlas.open(home)
    for cell_id in atlas.cells["cell_id"][:10]:
        result = atlas.query_cell(cell_id, k=8, method="latent")
        excluded = {atlas.cells["cell_id"].iat[p] for p in atlas.excluded_positions(atlas.position[cell_id])}
        returned = [r.cell_id for r in result.references]
        assert len(returned) == 8 and not excluded & set(returned)
        assert [r.distance for r in result.references] == sorted(r.distance for r in result.references)


def test_som_references_start_at_the_query_node(built_atlas):
    home, _ = built_atlas
    atlas = LoadedAtlas.open(home)
    cell_id = atlas.cells["cell_id"].iat[0]
    result = atlas.query_cell(cell_id, k=5, method="som")
    node = result.som_node
    grid = [np.hypot(r.som_node[0] - node[0], r.som_node[1] - node[1]) for r in result.references]
    assert len(result.references) == 5 and grid == sorted(grid)


def test_query_image_predicts_with_probabilities_and_distribution(built_atlas):
    home, _ = built_atlas
    atlas = LoadedAtlas.open(home)
    result = atlas.query_image(synthetic_cell("lymphocyte", np.random.default_rng(99)), k=4)
    assert sum(result.prediction.probabilities.values()) == pytest.approx(1.0, abs=1e-4)
    assert 0 <= result.prediction.entropy_bits <= 2.0 + 1e-6
    assert sum(result.label_distribution.values()) == pytest.approx(1.0)
    assert len(result.references) == 4


def test_failed_build_leaves_the_live_version_serving(built_atlas, synthetic_images, tmp_path, monkeypatch):
    home = tmp_path / "home"
    shutil.copytree(built_atlas[0], home)
    live = AtlasStore(home).current_version()

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(steps, "train_som", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        build_module.build(tiny_config(synthetic_images, home))
    store = AtlasStore(home)
    assert store.current_version() == live
    assert store.list_versions() == [live]
    assert not list(store.versions.glob(".staging-*"))
    LoadedAtlas.open(home)  # still loads


def test_cli_query_prints_json(built_atlas, tmp_path, capsys):
    from PIL import Image

    home, _ = built_atlas
    path = tmp_path / "q.png"
    Image.fromarray(synthetic_cell("eosinophil", np.random.default_rng(5))).save(path)
    assert main(["query", str(path), "--home", str(home), "--k", "3", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert len(answer["references"]) == 3 and answer["prediction"]["label"]


def test_cli_bad_inputs_exit_non_zero_with_a_message(built_atlas, tmp_path, capsys):
    home, _ = built_atlas
    assert main(["build", "--images", str(tmp_path / "missing"), "--home", str(tmp_path / "h")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["build", "--images", str(tmp_path / "empty"), "--home", str(tmp_path / "h")]) == 2
    assert "no images found" in capsys.readouterr().err
    bad = tmp_path / "bad" / "lymphocyte"
    bad.mkdir(parents=True)
    (bad / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (bad / "tiny.png").write_bytes(_png(np.zeros((10, 10, 3), np.uint8)))
    assert main(["build", "--images", str(tmp_path / "bad"), "--home", str(tmp_path / "h"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "none of the 2 images gave a cell" in err and "Traceback" not in err
    assert main(["query", str(tmp_path / "nope.png"), "--home", str(home)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["query", str(bad / "broken.jpg"), "--home", str(tmp_path / "no-atlas")]) == 2
    assert main(["query", str(bad / "tiny.png"), "--home", str(home)]) == 2
    assert "too small" in capsys.readouterr().err


def test_corrupt_files_are_reported_and_the_build_goes_on(synthetic_images, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(synthetic_images, images)
    (images / "monocyte" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    (images / "monocyte" / "empty.png").write_bytes(b"")
    result = build_module.build(tiny_config(images, tmp_path / "home", epochs=1))
    assert result.manifest["inputs"]["rejected"] == 2
    rejected = pd.read_parquet(result.version_dir / "rejections.parquet")
    assert set(rejected["path"].map(lambda p: p.split("/")[-1])) == {"corrupt.jpg", "empty.png"}


def _png(array) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_jobs_publishing_at_once_take_turns_and_get_their_own_numbers(tmp_path):
    """A build and a rebuild of one home may finish together: publishing waits for the other."""
    import fcntl
    import threading

    from atlas.store import PUBLISH_LOCK

    store = AtlasStore(tmp_path / "home")
    first, second = store.new_staging("a"), store.new_staging("b")
    assert store.publish(first, {"job": "a"}) == "000001"
    published = []
    with open(store.home / PUBLISH_LOCK, "a") as held:  # another job is publishing
        fcntl.flock(held, fcntl.LOCK_EX)
        waiting = threading.Thread(target=lambda: published.append(store.publish(second, {"job": "b"})))
        waiting.start()
        waiting.join(timeout=0.5)
        assert waiting.is_alive() and published == [] and second.exists()
        fcntl.flock(held, fcntl.LOCK_UN)
    waiting.join(timeout=10)
    assert published == ["000002"] and store.current_version() == "000002"
    assert store.manifest("000002")["job"] == "b" and store.manifest("000001")["job"] == "a"
