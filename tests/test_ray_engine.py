"""The Ray engine computes what the local engine computes: the same inputs and seed give the
same version (cells, labels, hashes, duplicate groups, rejections, latents within float
tolerance, index answers, map nodes), for a build and for an add, on a local Ray cluster of
two one-CPU worker nodes started here. On a real subset of ../shared/data/pbc where it is
present (generated cells otherwise, so that the comparison always runs)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from atlas.features import FEATURE_NAMES
from atlas.store import AtlasStore
from atlas.synthetic import write_synthetic_archive
from atlas.version import REJECTIONS
from tests.conftest import SHARED_DATA, tiny_config

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'cellatlas[ray]')")

CLASSES = ("lymphocyte", "neutrophil", "eosinophil", "monocyte")
PER_CLASS = 10  # images per class for the build; 3 more per class for the add


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # the driver's node does no work
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[Path, Path, str]:
    """A build folder and an add folder (other images of the same classes), and where they came from."""
    root = tmp_path_factory.mktemp("ray-images")
    pbc = SHARED_DATA / "pbc"
    if not pbc.exists():
        write_synthetic_archive(root / "build", per_class=8, seed=0)
        write_synthetic_archive(root / "more", per_class=2, seed=1)
        return root / "build", root / "more", "generated"
    for name in CLASSES:
        files = sorted((pbc / name).glob("*.jpg"))[: PER_CLASS + 3]
        for folder, chosen in (("build", files[:PER_CLASS]), ("more", files[PER_CLASS:])):
            (root / folder / name).mkdir(parents=True, exist_ok=True)
            for f in chosen:
                shutil.copy(f, root / folder / name / f.name)
    # a repeated file and an unreadable one: rejected alike by both engines
    first = next((root / "build" / CLASSES[0]).glob("*.jpg"))
    shutil.copy(first, root / "build" / CLASSES[1] / f"copy-{first.name}")
    (root / "build" / CLASSES[2] / "broken.jpg").write_bytes(b"not an image")
    return root / "build", root / "more", "pbc"


@pytest.fixture(scope="module")
def both(cluster, images, tmp_path_factory):
    """The same build, then the same add, with each engine."""
    from indexer.add import add
    from indexer.build import build
    from indexer.engines import LocalEngine, RayEngine, RayOptions

    build_images, more, _ = images
    root = tmp_path_factory.mktemp("ray-homes")
    homes = {}
    for name, engine in (("local", LocalEngine(1)), ("ray", RayEngine(1, RayOptions(address=cluster.address)))):
        home = root / name
        build(tiny_config(build_images, home), engine=engine)
        add(home, more, label_from_folders=True, threads=1, progress=False, engine=engine)
        homes[name] = home
        assert engine.workers == 2 if name == "ray" else True
    return homes


def _versions(home: Path):
    store = AtlasStore(home)
    return [store.version(v) for v in store.list_versions()]


def test_ray_build_and_add_give_the_local_engines_versions(both, images):
    local, distributed = (_versions(both[name]) for name in ("local", "ray"))
    assert len(local) == len(distributed) == 2  # the build, then the add
    for a, b in zip(local, distributed):
        cells_a, cells_b = a.read_cells(), b.read_cells()
        assert len(cells_a) > 20
        same = ["cell_id", "source_sha256", "label", "ahash", "fine_hash", "duplicate_group", "split", "crop_path"]
        pd.testing.assert_frame_equal(cells_a[same], cells_b[same])
        features = list(FEATURE_NAMES)
        np.testing.assert_allclose(cells_a[features].to_numpy(float), cells_b[features].to_numpy(float))
        latents_a, latents_b = a.read_latents(), b.read_latents()
        np.testing.assert_allclose(latents_a, latents_b, atol=1e-4, rtol=1e-4)  # measured: identical
        _, nearest_a = a.read_index().search(latents_a, 8)
        _, nearest_b = b.read_index().search(latents_a, 8)
        assert (nearest_a[:, 0] == nearest_b[:, 0]).all()
        assert (nearest_a == nearest_b).mean() >= 0.99  # ties aside
        assert (cells_a[["som_row", "som_col"]].to_numpy() == cells_b[["som_row", "som_col"]].to_numpy()).mean() >= 0.99
        assert (cells_a["predicted_label"] == cells_b["predicted_label"]).mean() >= 0.99
    rejected = [pd.read_parquet(v.path(REJECTIONS)).sort_values("path").reset_index(drop=True)
                for v in (local[0], distributed[0])]
    pd.testing.assert_frame_equal(*rejected)
    if images[2] == "pbc":
        assert len(rejected[0]) == 2  # the copy and the broken file
    assert distributed[0].manifest["engine"]["engine"] == "ray"
    assert distributed[0].manifest["engine"]["workers"] == 2
    assert distributed[1].manifest["add"]["engine"]["engine"] == "ray"


def test_sharded_index_and_best_nodes_match_the_local_ones(cluster, monkeypatch):
    """Above the shard size the index is IVF, trained here and filled in Ray tasks; best nodes
    are computed in Ray tasks too. Both must answer as if built in one piece."""
    import atlas.search
    from atlas.search import LatentIndex
    from atlas.som import BatchSOM
    from indexer import engines

    monkeypatch.setattr(engines, "SHARD_ABOVE", 500)
    monkeypatch.setattr(engines, "SHARD_CELLS", 700)
    monkeypatch.setattr(atlas.search, "INDEX_BY_SIZE", ((500, "exact"), (None, "ivf")))
    rng = np.random.default_rng(0)
    latents = (rng.normal(size=(2000, 16)) + rng.integers(0, 6, size=(2000, 1)) * 3).astype(np.float32)
    engine = engines.RayEngine(1, engines.RayOptions(address=cluster.address))
    sharded, whole = engine.build_index(latents), LatentIndex.build(latents)
    assert sharded.kind == whole.kind == "ivf" and sharded.size == whole.size == 2000
    np.testing.assert_array_equal(sharded.search(latents[:200], 8)[1], whole.search(latents[:200], 8)[1])
    som = BatchSOM(6, 5, epochs=3, seed=0).fit(latents)
    nodes, distances = engine.best_nodes(som, latents)
    np.testing.assert_array_equal(nodes, som.winners(latents))
    np.testing.assert_allclose(distances, som.node_distances(latents), rtol=1e-5)


def test_missing_ray_says_how_to_install(monkeypatch, tmp_path, capsys):
    from indexer.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    images = write_synthetic_archive(tmp_path / "images", per_class=2, seed=0)
    code = main(["build", "--images", str(images), "--home", str(tmp_path / "home"), "--engine", "ray", "--quiet"])
    assert code != 0
    err = capsys.readouterr().err
    assert "pip install 'cellatlas[ray]'" in err and "Traceback" not in err
    assert not (tmp_path / "home").exists() or not AtlasStore(tmp_path / "home").list_versions()


def test_ray_options_need_the_ray_engine(tmp_path, capsys):
    from indexer.cli import main

    code = main(["build", "--images", str(tmp_path), "--home", str(tmp_path / "h"), "--ray-workers", "2"])
    assert code != 0 and "--engine ray" in capsys.readouterr().err


@pytest.mark.parametrize("address", ["127.0.0.1:1", "no-port-here"])
def test_an_unreachable_cluster_is_a_clear_error_in_seconds(address, tmp_path, capsys):
    import time

    from indexer.cli import main

    started = time.monotonic()
    code = main(["build", "--images", str(tmp_path), "--home", str(tmp_path / "h"), "--engine", "ray",
                 "--ray-address", address])
    err = capsys.readouterr().err
    assert code != 0
    assert ("--ray-address must be" in err) if address == "no-port-here" else ("cannot reach the Ray cluster" in err)
    assert "Traceback" not in err and time.monotonic() - started < 30
