"""The benchmarks of issue #15 in their tiny configurations: they run, and their figures are
right (recall, the same pairs as the naive scan, errors from the one shared function). No
timing is asserted."""

import importlib.util
import json

import numpy as np
import pytest

from atlas.som import map_errors
from bench import dedup_bench, search_bench, som_bench
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
