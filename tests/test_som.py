import numpy as np
import pytest
from minisom import MiniSom

from atlas.som import BatchSOM, dominant_classes, grid_shape_for, map_errors, neighbour_agreement


@pytest.fixture
def blobs():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 5, (4, 6))
    return np.concatenate([c + rng.normal(0, 0.5, (50, 6)) for c in centres]).astype(np.float32)


def _minisom_with(weights):
    som = MiniSom(weights.shape[0], weights.shape[1], weights.shape[2], random_seed=0)
    som._weights = weights.astype(np.float64)
    return som


def test_errors_and_u_matrix_match_minisom(blobs):
    som = BatchSOM(6, 5, epochs=15, seed=1, standardise=False).fit(blobs)
    reference = _minisom_with(som.weights_)
    assert som.quantization_error(blobs) == pytest.approx(reference.quantization_error(blobs), rel=1e-5)
    assert som.topographic_error(blobs) == pytest.approx(reference.topographic_error(blobs))
    np.testing.assert_allclose(som.u_matrix(), reference.distance_map(scaling="sum"), rtol=1e-5)
    expected_winners = np.array([reference.winner(x) for x in blobs])
    np.testing.assert_array_equal(som.winners(blobs), expected_winners)


def test_map_errors_of_a_known_codebook():
    """A 1x3 map with nodes at 0, 10 and 1: the sample at 0.4 is won by node 0 (0.4 away) with
    node 2 second, two steps away on the map, a topographic error; 9 is won by node 1 (1 away)
    with its neighbour node 2 second; 0 sits on node 0, again with node 2 second."""
    weights = np.array([[[0.0], [10.0], [1.0]]], dtype=np.float32)
    data = np.array([[0.4], [9.0], [0.0]], dtype=np.float32)
    quantization, topographic = map_errors(weights, data)
    assert quantization == pytest.approx((0.4 + 1.0 + 0.0) / 3, rel=1e-6)
    assert topographic == pytest.approx(2 / 3)
    reference = _minisom_with(weights)
    assert quantization == pytest.approx(reference.quantization_error(data), rel=1e-6)
    assert topographic == pytest.approx(reference.topographic_error(data))


def test_map_errors_match_minisom_on_any_codebook(blobs):
    weights = np.random.default_rng(5).normal(0, 3, (7, 4, blobs.shape[1])).astype(np.float32)
    reference = _minisom_with(weights)
    quantization, topographic = map_errors(weights, blobs)
    assert quantization == pytest.approx(reference.quantization_error(blobs), rel=1e-5)
    assert topographic == pytest.approx(reference.topographic_error(blobs))


def test_pca_initialisation_spreads_the_map_over_the_principal_plane():
    rng = np.random.default_rng(0)
    data = (rng.normal(size=(2000, 5)) * [5, 2, 0.1, 0.1, 0.1]).astype(np.float32)
    som = BatchSOM(10, 6, standardise=False)
    codebook = som.initial_codebook(data)
    assert codebook.shape == (10, 6, 5)
    # the first principal axis (dimension 0) runs along the longer side, two standard deviations out
    assert codebook[-1, 0, 0] - codebook[0, 0, 0] == pytest.approx(4 * 5, rel=0.1)
    assert abs(codebook[0, -1, 1] - codebook[0, 0, 1]) == pytest.approx(4 * 2, rel=0.1)
    assert np.abs(codebook[..., 2:]).max() < 0.5
    trained = BatchSOM(10, 6, epochs=0, standardise=False).fit(data)
    assert trained.topographic_error_ < 0.05  # ordered before any training


def test_radius_schedule_runs_from_start_to_end():
    for decay in ("exponential", "linear"):
        som = BatchSOM(20, 10, epochs=5, sigma_start=8.0, sigma_end=0.5, decay=decay)
        assert som.sigma_at(0) == pytest.approx(8.0) and som.sigma_at(4) == pytest.approx(0.5)
    # by default sigma starts at half the longer side; after a PCA start at 1/8, but from 10 nodes
    assert BatchSOM(20, 10, epochs=3, decay="linear").sigma_at(1) == pytest.approx((10 + 0.5) / 2)
    assert BatchSOM(240, 10, epochs=3, decay="linear").sigma_at(1) == pytest.approx((30 + 0.5) / 2)
    random_start = BatchSOM(20, 10, epochs=3, decay="linear", initialisation="random")
    assert random_start.sigma_at(1) == pytest.approx((10 + 0.5) / 2)
    with pytest.raises(ValueError, match="decay"):
        BatchSOM(3, 3, decay="cosine")
    with pytest.raises(ValueError, match="initialisation"):
        BatchSOM(3, 3, initialisation="kmeans")


def test_training_orders_the_map_and_lowers_quantization_error(blobs):
    random_init = BatchSOM(6, 6, epochs=0, seed=0, initialisation="random").fit(blobs)
    no_shrink = BatchSOM(6, 6, epochs=20, sigma_start=4.0, sigma_end=4.0, seed=0,
                         initialisation="random").fit(blobs)
    trained = BatchSOM(6, 6, epochs=20, seed=0, initialisation="random").fit(blobs)
    assert trained.topographic_error_ < random_init.topographic_error_  # neighbours became similar
    assert trained.topographic_error_ < 0.2
    assert trained.quantization_error_ < no_shrink.quantization_error_  # shrinking radius fits data
    assert trained.hits(blobs).sum() == len(blobs)


def test_same_seed_same_map(blobs):
    a = BatchSOM(5, 5, epochs=5, seed=3).fit(blobs)
    b = BatchSOM(5, 5, epochs=5, seed=3).fit(blobs)
    np.testing.assert_array_equal(a.weights_, b.weights_)


def test_grid_shape_follows_the_archive_size_and_is_capped():
    rng = np.random.default_rng(0)
    rows, cols = grid_shape_for(rng.normal(size=(10_000, 5)) * [3, 1, 1, 1, 1])
    assert 400 <= rows * cols <= 600  # about 5 * sqrt(10000) = 500 nodes
    assert rows > cols  # the longer side follows the larger principal variance
    assert max(grid_shape_for(rng.normal(size=(10_000, 2)) * [1000, 1], max_side=40)) == 40


def test_round_trip_through_arrays(blobs):
    som = BatchSOM(4, 4, epochs=3).fit(blobs)
    again = BatchSOM.from_arrays(som.to_arrays())
    np.testing.assert_array_equal(again.winners(blobs), som.winners(blobs))


def test_the_map_owns_its_scaling(blobs):
    """A standardising map answers raw vectors exactly as a plain map trained on the
    standardised vectors does, and keeps the scaling through a save and load."""
    stretched = blobs * np.linspace(1, 50, blobs.shape[1]).astype(np.float32) + 7
    som = BatchSOM(5, 4, epochs=6, seed=2).fit(stretched)
    mean, std = stretched.mean(0), stretched.std(0) + 1e-6
    np.testing.assert_allclose(som.mean_, mean, rtol=1e-5)
    plain = BatchSOM(5, 4, epochs=6, seed=2, standardise=False).fit((stretched - mean) / std)
    np.testing.assert_allclose(som.weights_, plain.weights_, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(som.winners(stretched), plain.winners((stretched - mean) / std))
    again = BatchSOM.from_arrays(som.to_arrays())
    np.testing.assert_array_equal(again.winners(stretched), som.winners(stretched))
    assert again.quantization_error(stretched) == pytest.approx(som.quantization_error_, rel=1e-5)


def test_dominant_class_is_the_most_frequent_label_of_a_node():
    nodes = np.array([[0, 0], [0, 0], [0, 0], [1, 1], [1, 1], [0, 1]])
    labels = ["b", "a", "b", "a", "b", None]  # the tie at (1, 1) goes to "a"; None does not count
    dominant = dominant_classes(nodes, labels, (2, 2))
    assert dominant.tolist() == [["b", None], [None, "a"]]


def _grid(*rows: str) -> np.ndarray:
    """A map of dominant classes drawn as text, one character per node; "." = no cells."""
    grid = np.array([list(row) for row in rows], dtype=object)
    grid[grid == "."] = None
    return grid


def test_neighbour_agreement_counts_nodes_inside_their_class_region():
    # A straight border costs nothing: (1, 1) agrees with 5 of its 8 neighbours, (0, 1) with 3 of 5.
    assert neighbour_agreement(_grid("aabb", "aabb", "aabb", "aabb")) == 1.0
    # An island "b" at (1, 1) disagrees (3 of 8), and so do (0, 1) (2 of 5 "a") and (2, 1)
    # (4 of 8: not more than half); the other 13 of 16 nodes still agree.
    assert neighbour_agreement(_grid("aabb", "abbb", "aabb", "aabb")) == pytest.approx(13 / 16)
    # An empty node counts neither as a node nor as a neighbour: (3, 2) is left with 2 "b" of 4.
    assert neighbour_agreement(_grid("aabb", "aabb", "aabb", "aab.")) == pytest.approx(14 / 15)
    assert np.isnan(neighbour_agreement(_grid("a.", "..")))


def test_neighbour_agreement_of_scattered_classes_is_near_chance():
    scattered = np.random.default_rng(0).choice(np.array(list("abcd"), dtype=object), (40, 40))
    assert neighbour_agreement(scattered) < 0.06  # P[Binomial(8, 1/4) > 4] = 0.027
