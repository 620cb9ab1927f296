"""The benchmarks of issue #15 in their tiny configurations: they run, and their figures are
right (recall, the same pairs as the naive scan, errors from the one shared function). No
timing is asserted."""

import importlib.util
import json

import numpy as np
import pytest

from atlas.som import map_errors
from bench import dedup_bench, index_bench, search_bench, som_bench
from bench.common import cluster_mixture, tiled_latents
from indexer.cli import main


@pytest.fixture
def latents_file(tmp_path):
    path = tmp_path / "latents.npy"
    np.save(path, cluster_mixture(400, 50, 5, seed=3))
    return path


def test_som_bench_compares_the_maps_by_one_function(tmp_path, latents_file):
    result = som_bench.run(["--tiny", "--latents", str(latents_file), "--out", str(tmp_path / "som.json")])
    assert json.loads((tmp_path / "som.json").read_text())["benchmark"] == "som"
    rows = result["results"]
    assert {r["data"] for r in rows} == {"synthetic 19 clusters", "real latents tiled"}
    ours = [r for r in rows if r["tool"] == "cellatlas"]
    assert len(ours) == 2 and all(0 < r["quantization_error"] and 0 <= r["topographic_error"] <= 1 for r in ours)
    minisom = [r for r in rows if r["tool"].startswith("minisom")]
    assert minisom and all(r["seconds"] == pytest.approx(r["seconds_per_iteration"] * 1_000_000) for r in minisom)
    somoclu = [r for r in rows if r["tool"] == "somoclu"]
    if importlib.util.find_spec("somoclu") is None:
        assert all(r.get("skipped") == "not installed" for r in somoclu)
    else:
        # The same batch algorithm, start and radius schedule: the same fit, within noise.
        for theirs, mine in zip(somoclu, ours):
            assert theirs["quantization_error"] == pytest.approx(mine["quantization_error"], rel=0.05)


def test_som_bench_reports_means_over_several_draws_of_the_data():
    result = som_bench.run(["--tiny", "--seeds", "2", "--minisom-iterations", "50", "--no-somoclu"])
    rows, means = result["results"], result["means_over_seeds"]
    assert {r["data"] for r in rows} == {"synthetic 19 clusters, seed 0", "synthetic 19 clusters, seed 1"}
    ours = [r for r in rows if r["tool"] == "cellatlas"]
    assert ours[0]["quantization_error"] != ours[1]["quantization_error"]  # two different draws
    mean = next(m for m in means if m["tool"] == "cellatlas")
    assert mean["data"] == "synthetic 19 clusters, mean of 2 seeds"
    assert mean["topographic_error"] == pytest.approx(np.mean([r["topographic_error"] for r in ours]))
    minisom = next(m for m in means if m["tool"].startswith("minisom"))
    qe_at_most = sum(o["quantization_error"] <= m["quantization_error"]
                     for o, m in zip(ours, [r for r in rows if r["tool"].startswith("minisom")]))
    assert minisom["seeds_cellatlas_qe_at_most"] == qe_at_most
    assert som_bench.run(["--tiny", "--no-somoclu", "--minisom-iterations", "0"])["means_over_seeds"] == []


def test_som_bench_errors_are_those_of_the_shared_function():
    data = cluster_mixture(300, 50, 4, seed=1)
    args = som_bench.parse(["--tiny"])
    som, row = som_bench.cellatlas_som(data, args)
    assert (row["quantization_error"], row["topographic_error"]) == map_errors(som.weights_, data)
    assert row["quantization_error"] == pytest.approx(som.quantization_error_, rel=1e-6)


def test_som_bench_measures_schedules_and_the_build_map(latents_file):
    rows = som_bench.run(["--tiny", "--schedules", "--latents", str(latents_file)])["results"]
    labels = [r["tool"] for r in rows]
    assert labels.count("before: random init, exp decay, start side/2, end 0.5") == 2
    assert sum(label.startswith("default now") for label in labels) == 2
    assert {"build map before", "build map now"} <= set(labels)


def test_search_bench_reports_recall_against_exact(tmp_path, latents_file):
    rows = search_bench.run(["--tiny", "--latents", str(latents_file)])["results"]
    defaults = {(r["data"], r["kind"]): r for r in rows if r["setting"] == "default"}
    for data in ("synthetic 19 clusters", "real latents tiled"):
        assert defaults[(data, "exact")]["recall_at_8"] == 1.0
        assert defaults[(data, "ivf")]["recall_at_8"] >= 0.98
        assert defaults[(data, "hnsw")]["recall_at_8"] >= 0.98
        assert defaults[(data, "auto -> exact")]["recall_at_8"] == 1.0  # 3,000 cells: exact
        assert defaults[(data, "exact")]["bytes_per_cell"] >= 50 * 4


def test_recall_at_k_counts_shared_neighbours():
    assert search_bench.recall_at_k(np.array([[1, 2, 3, 4]]), np.array([[4, 3, 9, 8]])) == 0.5


def test_dedup_bench_finds_every_planted_pair_and_the_naive_pairs(tmp_path):
    rows = dedup_bench.run(["--tiny"])["results"]
    fast = [r for r in rows if r["method"].startswith("cellatlas")]
    assert [r["max_bits"] for r in fast] == [2, 3]
    assert all(r["same_pairs_as_naive"] == "True" for r in fast)
    assert all(r["planted_found"] == "300/300" for r in fast)


def test_planted_hashes_are_within_the_bits_of_their_originals():
    hashes, planted = dedup_bench.planted_hashes(1000, 100, 50, 2, seed=0)
    distances = [bin(int(hashes[a]) ^ int(hashes[b])).count("1") for a, b in planted]
    assert max(distances) <= 2 and len(set(planted[:, 1])) == 100


def test_tiled_latents_keep_the_real_shape():
    real = cluster_mixture(100, 8, 3, seed=0)
    tiled = tiled_latents(real, 1000, noise=0.1)
    assert tiled.shape == (1000, 8)
    np.testing.assert_allclose(tiled.std(0), real.std(0), rtol=0.1)
    assert not np.array_equal(tiled[:100], real)


def test_cli_runs_a_benchmark_and_writes_its_json(tmp_path, capsys):
    assert main(["bench", "dedup", "--tiny", "--out", str(tmp_path / "dedup.json")]) == 0
    assert json.loads((tmp_path / "dedup.json").read_text())["benchmark"] == "dedup"
    assert "multi-index hashing" in capsys.readouterr().out


def test_cli_rejects_a_bad_benchmark_or_option(tmp_path, capsys):
    with pytest.raises(SystemExit) as unknown:
        main(["bench", "sorting"])
    assert unknown.value.code == 2
    with pytest.raises(SystemExit) as bad:
        main(["bench", "search", "--sizes", "0"])
    assert bad.value.code == 2
    assert main(["bench", "som", "--tiny", "--latents", str(tmp_path / "missing.npy")]) == 2
    assert "no latents at" in capsys.readouterr().err


INDEX_STEPS = {"read", "content hash", "decode", "segment", "crop", "describe", "hash", "save crop", "model input",
               "embed", "search insert"}


def test_index_bench_times_each_step_and_the_add_against_a_plain_loop(built_atlas, synthetic_images, tmp_path):
    home, _ = built_atlas
    before = sorted(str(p.relative_to(home)) for p in home.rglob("*"))
    result = index_bench.run(["--tiny", "--home", str(home), "--images", str(synthetic_images), "--limit", "6",
                              "--label-from-folders", "--out", str(tmp_path / "index.json")])
    assert json.loads((tmp_path / "index.json").read_text())["benchmark"] == "index"
    steps = [r for r in result["steps"] if r["step"] != "sum of steps"]
    assert {r["step"] for r in steps} == INDEX_STEPS and {r["segmenter"] for r in steps} == {"classical"}
    assert sum(r["share"] for r in steps) == pytest.approx(1.0)
    cells = result["segmenters"]["classical"]["cells"]
    assert cells == 6 - result["segmenters"]["classical"]["images_rejected"]  # one cell per labelled image
    runs = {r["method"].split(" ")[0]: r for r in result["end_to_end"]}
    assert set(runs) == {"add", "plain"} and all(r["cells"] == cells and r["images"] == 6 for r in runs.values())
    full, eight, one = result["views"]
    assert (full["views"], eight["views"], one["views"]) == (16, 8, 1)
    assert full["recall_archive"] == 1.0 and full["latent_mse"] == 0.0
    # The D4 views make a cell turned by 90 degrees embed as itself; the identity view alone does not.
    assert full["recall_turned"] == 1.0 and eight["recall_turned"] == 1.0
    assert one["latent_mse"] > eight["latent_mse"] > 0
    batches = result["batches"]
    assert {16, 32, 64, 128, 256} <= {b["views_per_batch"] for b in batches} and sum(b["default"] for b in batches) == 1
    assert all(b["max_latent_difference"] < 1e-2 for b in batches)  # the batch changes the speed, not the latents
    assert sorted(str(p.relative_to(home)) for p in home.rglob("*")) == before  # the atlas is only read


def test_index_bench_one_view_is_the_first_of_the_backbones_views(built_atlas):
    """The one-view latents (the bench's own path through the backbone) equal the product's
    embedding when the views are reduced to the identity by hand."""
    from atlas.store import AtlasStore

    home, _ = built_atlas
    store = AtlasStore(home)
    embedder = store.version(store.require_current()).read_embedder(device="cpu")
    noise = np.random.default_rng(0).integers(0, 256, (3, embedder.input_size, embedder.input_size, 3))
    turned = sum(np.rot90(noise, k, (1, 2)) for k in range(4)) // 4
    symmetric = np.minimum(turned, turned[:, :, ::-1]).astype(np.uint8)
    # An image the D4 group leaves unchanged has 8 identical views: their mean is the one view.
    assert np.array_equal(symmetric, np.rot90(symmetric, 1, (1, 2))) and np.array_equal(symmetric, symmetric[:, :, ::-1])
    np.testing.assert_allclose(index_bench.one_view_latents(embedder, symmetric),
                               index_bench.latents_at(embedder, symmetric, (0.0,)), rtol=1e-3, atol=5e-3)


def test_cli_runs_the_index_bench_on_its_own_tiny_atlas(tmp_path, capsys):
    assert main(["bench", "index", "--tiny", "--limit", "4", "--out", str(tmp_path / "index.json")]) == 0
    figures = json.loads((tmp_path / "index.json").read_text())
    assert figures["setting"]["home"] == "tiny generated atlas" and figures["setting"]["image_count"] == 4
    assert "where the time goes" in capsys.readouterr().out


def test_cli_rejects_bad_index_bench_options(built_atlas, synthetic_images, tmp_path, capsys):
    home, _ = built_atlas
    with pytest.raises(SystemExit) as alone:
        main(["bench", "index", "--home", str(home)])
    assert alone.value.code == 2
    assert main(["bench", "index", "--home", str(home), "--images", str(synthetic_images),
                 "--segmenter", str(tmp_path / "no-model")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["bench", "index", "--home", str(tmp_path), "--images", str(synthetic_images)]) == 2
    assert "no published atlas" in capsys.readouterr().err


def test_scale_atlas_repeats_a_built_atlas_that_the_api_serves(built_atlas, tmp_path, capsys):
    """bench/scale_atlas.py --tiny: the built atlas's cells repeated to 3,000 (an IVF index, as at
    1M), published with the product's writers; the API answers reference cells for a copy with
    k other cells and serves its crop through the link to the source's crops."""
    import pandas as pd

    from atlas.store import AtlasStore
    from atlas.version import CELLS, NOVELTY
    from bench import scale_atlas
    from tests.conftest import open_client

    source, _ = built_atlas
    home = tmp_path / "scale"
    assert scale_atlas.main(["--from", str(source), "--home", str(home), "--tiny"]) == 0
    store = AtlasStore(home)
    version = store.version(store.require_current())
    synthetic = version.manifest["synthetic_scale"]
    assert synthetic["cells"] == 3000 and synthetic["index"] == "ivf"
    source_version = AtlasStore(source).version(AtlasStore(source).require_current())
    assert version.path(NOVELTY).is_file() == source_version.path(NOVELTY).is_file()
    cells = pd.read_parquet(version.path(CELLS), columns=["cell_id", "crop_path"])
    assert len(cells) == 3000 and cells["cell_id"].is_unique and version.read_index().size == 3000
    assert set(cells["crop_path"]) == set(source_version.read_cells()["crop_path"])
    cell_id = cells["cell_id"].iat[2500]
    with open_client(home) as client:
        answer = client.get(f"/v1/cells/{cell_id}/reference-cells", params={"k": 8})
        assert answer.status_code == 200, answer.text
        references = [r["cell_id"] for r in answer.json()["references"]]
        assert len(references) == 8 and cell_id not in references
        assert client.get(f"/v1/cells/{cell_id}/image").status_code == 200
    assert scale_atlas.main(["--from", str(source), "--home", str(home), "--tiny"]) == 2
    assert "not empty" in capsys.readouterr().err
