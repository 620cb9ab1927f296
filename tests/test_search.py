import faiss
import numpy as np
import pytest

from atlas.search import HNSW_EF_SEARCH, INDEX_BY_SIZE, IVF_NPROBE, LatentIndex, index_kind_for


@pytest.fixture
def clustered():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 2, (12, 16))
    data = centres[rng.integers(0, 12, 6000)] + rng.normal(0, 0.5, (6000, 16))
    return data[:5000].astype(np.float32), data[5000:].astype(np.float32)


def test_distances_are_the_mean_squared_error_between_latents(clustered):
    archive, queries = clustered
    mse, positions = LatentIndex.build(archive, "exact").search(queries[:3], 4)
    expected = ((archive[positions] - queries[:3, None, :]) ** 2).mean(2)
    np.testing.assert_allclose(mse, expected, rtol=1e-4)
    assert (np.diff(mse, axis=1) >= 0).all()  # nearest first


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_find_the_exact_neighbours(clustered, kind):
    archive, queries = clustered
    _, exact = LatentIndex.build(archive, "exact").search(queries, 8)
    index = LatentIndex.build(archive, kind)
    assert index.kind == kind and index.size == len(archive)
    _, found = index.search(queries, 8)
    recall = np.mean([len(set(f) & set(e)) / 8 for f, e in zip(found, exact)])
    assert recall >= 0.98


def test_the_index_kind_follows_the_archive_size():
    assert index_kind_for(7_500) == "exact"
    assert index_kind_for(10_000_000) == INDEX_BY_SIZE[-1][1] != "exact"
    limits = [largest for largest, _ in INDEX_BY_SIZE]
    assert limits[-1] is None and limits[:-1] == sorted(limits[:-1])
    small = np.random.default_rng(1).normal(size=(50, 4)).astype(np.float32)
    assert LatentIndex.build(small).kind == "exact"
    with pytest.raises(ValueError, match="index kind"):
        LatentIndex.build(small, "annoy")


@pytest.mark.parametrize("kind", ["exact", "ivf", "hnsw"])
def test_saved_index_loads_with_its_search_settings(clustered, tmp_path, kind):
    archive, queries = clustered
    index = LatentIndex.build(archive, kind)
    index.save(tmp_path / "index.faiss")
    again = LatentIndex.load(tmp_path / "index.faiss")
    assert again.kind == kind
    if kind == "ivf":
        assert again.index.nprobe == IVF_NPROBE
    if kind == "hnsw":
        assert again.index.hnsw.efSearch == HNSW_EF_SEARCH
    np.testing.assert_array_equal(again.search(queries[:20], 8)[1], index.search(queries[:20], 8)[1])


def test_an_index_written_by_an_old_atlas_still_loads(clustered, tmp_path):
    """Atlases before the size table saved a bare IndexFlatL2 with faiss.write_index."""
    archive, queries = clustered
    old = faiss.IndexFlatL2(archive.shape[1])
    old.add(archive)
    faiss.write_index(old, str(tmp_path / "index.faiss"))
    loaded = LatentIndex.load(tmp_path / "index.faiss")
    assert loaded.kind == "exact"
    np.testing.assert_array_equal(loaded.search(queries[:5], 8)[1], old.search(queries[:5], 8)[1])
