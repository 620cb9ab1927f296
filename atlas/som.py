"""Self-organising map: a vectorised batch SOM in torch with MiniSom's error measures.

Why not MiniSom itself: it trains one sample per iteration (13.6 ms per iteration on a 244x244
map, about four hours for the core design's million iterations). The batch SOM below does one
pass over all data per epoch: best-matching units by chunked matrix products, then every node
becomes the neighbourhood-weighted mean of the data. The Gaussian neighbourhood on a
rectangular grid is separable, h(i, j) = g(row_i - row_j) * g(col_i - col_j), so smoothing the
per-node sums costs two small matrix products instead of a (nodes x nodes) table: memory stays
linear in the number of nodes.

The map starts on the plane of the data's first two principal components (PCA initialisation,
as the SOM Toolbox's `lininit`), so the first epochs order an already spread map instead of
untangling random nodes. The schedule's ends were measured (bench/som_bench.py, `--schedules`).

`quantization_error`, `topographic_error` and `u_matrix` follow MiniSom's definitions exactly
(rectangular topology, `distance_map(scaling="sum")`), and the tests check them against MiniSom.
`map_errors` computes both errors of any codebook (this map's, somoclu's, MiniSom's) in one pass.

The map owns its input scaling, as a scikit-learn estimator would: `fit` learns each
dimension's mean and standard deviation (`mean_`, `std_`) and every method takes raw vectors,
so the scaling learned at build time is the one applied to a query.
"""

from __future__ import annotations

import math

import numpy as np
import torch

_BLOCK_ENTRIES = 2**24  # distances per block (64 MB of float32), whatever the map's size
INITIALISATIONS = ("pca", "random")
DECAYS = ("exponential", "linear")


def standard_scale(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each dimension's mean and standard deviation (+1e-6, so a constant one does not divide
    by zero): the scaling a standardising map learns."""
    return data.mean(0), data.std(0) + 1e-6


def grid_shape_for(data: np.ndarray, max_side: int = 244) -> tuple[int, int]:
    """Kohonen/Vesanto rule of thumb: about 5*sqrt(N) nodes, sides in the ratio of the
    square roots of the two largest principal variances; each side capped at `max_side`."""
    n = len(data)
    nodes = max(4, 5 * math.sqrt(n))
    if n >= 3 and data.shape[1] >= 2:
        centred = data - data.mean(axis=0)
        variances = np.linalg.svd(centred[: min(n, 20000)], compute_uv=False) ** 2
        ratio = math.sqrt(variances[0] / max(variances[1], 1e-12))
    else:
        ratio = 1.0
    rows = max(2, round(math.sqrt(nodes * ratio)))
    cols = max(2, round(nodes / rows))
    return min(rows, max_side), min(cols, max_side)


def map_errors(weights: np.ndarray, data: np.ndarray, device: str = "cpu") -> tuple[float, float]:
    """(quantization error, topographic error) of a (rows, cols, dim) codebook on `data`, in
    the units of `data`, by MiniSom's definitions: the mean distance of each sample to its
    best-matching node, and the share of samples whose best and second-best nodes are not
    neighbours (8-neighbourhood: grid distance > 1.42). One pass over the data."""
    rows, cols, dim = weights.shape
    data = np.ascontiguousarray(data, dtype=np.float32)
    flat = np.ascontiguousarray(weights, dtype=np.float32).reshape(-1, dim)
    x, w = torch.as_tensor(data, device=device), torch.as_tensor(flat, device=device)
    best = _best_units(x, w, k=2 if rows * cols > 1 else 1).cpu().numpy()
    quantization = float(np.linalg.norm(data - flat[best[:, 0]], axis=1).mean())
    if rows * cols < 2:
        return quantization, float("nan")
    r, c = np.unravel_index(best[:, :2], (rows, cols))
    return quantization, float((np.hypot(r[:, 0] - r[:, 1], c[:, 0] - c[:, 1]) > 1.42).mean())


class BatchSOM:
    """Rectangular self-organising map trained with the batch algorithm.

    Hyper-parameters are set in `__init__`; `fit` sets `mean_`, `std_` (the input scaling;
    zeros and ones with `standardise=False`), `weights_` (rows, cols, dim) in scaled units,
    `quantization_error_` and `topographic_error_` (also in scaled units).

    The neighbourhood radius (the Gaussian's sigma, in nodes) falls from `sigma_start` to
    `sigma_end` at the last epoch, exponentially or linearly (`decay`); `initialisation` is
    "pca" (the principal plane) or "random" (data points). By default sigma starts at half the
    longer side after a random start; after a PCA start, where the map is spread already, at
    1/8 of it, but no less than 10 nodes (or half the side), so that more epochs go to the
    small radii that fit the data: on the core design's 244x244 map in 10 epochs this lowered
    both QE and TE; on the build's small maps it changes nothing (bench/som_bench.py).
    """

    def __init__(
        self,
        rows: int,
        cols: int,
        epochs: int = 30,
        sigma_start: float | None = None,
        sigma_end: float = 0.5,
        seed: int = 0,
        device: str = "cpu",
        standardise: bool = True,
        initialisation: str = "pca",
        decay: str = "exponential",
    ):
        if rows < 1 or cols < 1:
            raise ValueError(f"SOM grid must be at least 1x1, got {rows}x{cols}")
        if initialisation not in INITIALISATIONS:
            raise ValueError(f"SOM initialisation must be one of {INITIALISATIONS}, got {initialisation!r}")
        if decay not in DECAYS:
            raise ValueError(f"SOM radius decay must be one of {DECAYS}, got {decay!r}")
        self.rows, self.cols = rows, cols
        self.epochs = epochs
        if sigma_start is None:
            side = max(rows, cols)
            # A PCA start is spread already: past 10 nodes it needs no radius of half the map.
            sigma_start = max(side / 8, min(side / 2, 10)) if initialisation == "pca" else side / 2
        self.sigma_start = sigma_start
        self.sigma_end = sigma_end
        self.seed = seed
        self.device = device
        self.standardise = standardise
        self.initialisation = initialisation
        self.decay = decay

    # -- training -------------------------------------------------------------------------
    def fit(self, data: np.ndarray, progress=None) -> BatchSOM:
        data = np.asarray(data, dtype=np.float32)
        if data.ndim != 2 or len(data) == 0:
            raise ValueError("SOM needs a non-empty 2-D array (cells x dimensions)")
        if self.standardise:
            self.mean_, self.std_ = standard_scale(data)
        else:
            self.mean_, self.std_ = np.zeros(data.shape[1], np.float32), np.ones(data.shape[1], np.float32)
        x = torch.as_tensor(self._scaled(data), device=self.device)
        weights = self.initial_codebook(x.cpu().numpy()).reshape(-1, x.shape[1])
        weights = torch.as_tensor(weights, device=x.device)
        row_pos = torch.arange(self.rows, dtype=torch.float32, device=x.device)
        col_pos = torch.arange(self.cols, dtype=torch.float32, device=x.device)
        for epoch in range(self.epochs):
            sigma = self.sigma_at(epoch)
            bmu = _best_units(x, weights, k=1)[:, 0]
            sums = torch.zeros_like(weights).index_add_(0, bmu, x)
            counts = torch.zeros(len(weights), device=x.device).index_add_(
                0, bmu, torch.ones(len(x), device=x.device)
            )
            g_row = torch.exp(-((row_pos[:, None] - row_pos[None, :]) ** 2) / (2 * sigma**2))
            g_col = torch.exp(-((col_pos[:, None] - col_pos[None, :]) ** 2) / (2 * sigma**2))
            numerator = _smooth(sums.view(self.rows, self.cols, -1), g_row, g_col)
            denominator = _smooth(counts.view(self.rows, self.cols, 1), g_row, g_col)
            updated = (numerator / denominator.clamp_min(1e-12)).reshape(-1, x.shape[1])
            # A node with no data anywhere near it keeps its weight.
            keep = denominator.reshape(-1) < 1e-8
            weights = torch.where(keep[:, None], weights, updated)
            if progress is not None:
                progress(epoch + 1, self.epochs)
        self.weights_ = weights.view(self.rows, self.cols, -1).cpu().numpy()
        self.quantization_error_, self.topographic_error_ = map_errors(
            self.weights_, x.cpu().numpy(), self.device)
        return self

    def sigma_at(self, epoch: int) -> float:
        """The neighbourhood radius of an epoch: sigma_start at the first, sigma_end at the last."""
        frac = epoch / max(1, self.epochs - 1)
        if self.decay == "linear":
            return self.sigma_start + (self.sigma_end - self.sigma_start) * frac
        return self.sigma_start * (self.sigma_end / self.sigma_start) ** frac

    def initial_codebook(self, scaled: np.ndarray) -> np.ndarray:
        """The (rows, cols, dim) codebook training starts from, for data already scaled.
        "pca": nodes evenly on the plane of the two largest principal components, two standard
        deviations either side of the mean, the first component along the longer side.
        "random": each node a random data point (plus a little noise)."""
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        x = torch.as_tensor(scaled, dtype=torch.float32)
        nodes = self.rows * self.cols
        if self.initialisation == "random" or len(x) < 2:
            pick = torch.randint(len(x), (nodes,), generator=gen)
            codebook = x[pick] + 1e-3 * torch.randn(nodes, x.shape[1], generator=gen)
            return codebook.numpy().reshape(self.rows, self.cols, -1)
        sample = x[torch.randperm(len(x), generator=gen)[:20_000]]
        mean = sample.mean(0)
        _, singular, axes = torch.linalg.svd(sample - mean, full_matrices=False)
        spread = 2 * singular / math.sqrt(len(sample))  # two standard deviations along each axis
        steps = [_span(self.rows), _span(self.cols)]
        first, second = (0, 1) if self.rows >= self.cols else (1, 0)  # which grid axis gets PC1
        along = [None, None]
        along[first] = steps[first][:, None] * spread[0] * axes[0]
        along[second] = (steps[second][:, None] * spread[1] * axes[1] if len(axes) > 1
                         else torch.zeros(len(steps[second]), x.shape[1]))
        codebook = mean + along[0][:, None, :] + along[1][None, :, :]
        return codebook.numpy().astype(np.float32)

    # -- use ------------------------------------------------------------------------------
    def winners(self, data: np.ndarray) -> np.ndarray:
        """Best-matching node (row, col) of every row of `data`, shape (n, 2)."""
        flat = self.best_units(data, k=1)[:, 0]
        return np.stack(np.unravel_index(flat, (self.rows, self.cols)), axis=1)

    def best_units(self, data: np.ndarray, k: int = 1) -> np.ndarray:
        """Flat indices of the k nearest nodes of every row of `data`, nearest first."""
        x = torch.as_tensor(self._scaled(data), device=self.device)
        w = torch.as_tensor(self.weights_.reshape(-1, self.weights_.shape[2]), device=self.device)
        return _best_units(x, w, k).cpu().numpy()

    def node_distances(self, data: np.ndarray) -> np.ndarray:
        """Euclidean distance (in scaled units) of every row of `data` to its best-matching node."""
        w = self.weights_.reshape(-1, self.weights_.shape[2])
        bmu = self.best_units(data, k=1)[:, 0]
        return np.linalg.norm(self._scaled(data) - w[bmu], axis=1)

    def quantization_error(self, data: np.ndarray) -> float:
        """Mean distance between each sample and its best-matching node (MiniSom's QE)."""
        return map_errors(self.weights_, self._scaled(data), self.device)[0]

    def topographic_error(self, data: np.ndarray) -> float:
        """Share of samples whose best and second-best nodes are not neighbours
        (8-neighbourhood, MiniSom's rectangular rule: grid distance > 1.42)."""
        return map_errors(self.weights_, self._scaled(data), self.device)[1]

    def u_matrix(self) -> np.ndarray:
        """Unified distance matrix (MiniSom `distance_map(scaling='sum')`): each node's summed
        distance to its 8 neighbours, divided by the largest. Light = cluster border."""
        w = self.weights_
        rows, cols, _ = w.shape
        total = np.zeros((rows, cols))
        for dr, dc in [(0, -1), (-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1)]:
            r0, r1 = max(0, -dr), rows - max(0, dr)
            c0, c1 = max(0, -dc), cols - max(0, dc)
            diff = w[r0:r1, c0:c1] - w[r0 + dr : r1 + dr, c0 + dc : c1 + dc]
            total[r0:r1, c0:c1] += np.linalg.norm(diff, axis=2)
        return total / total.max() if total.max() > 0 else total

    def hits(self, data: np.ndarray) -> np.ndarray:
        """Number of samples won by each node, shape (rows, cols)."""
        flat = self.best_units(data, k=1)[:, 0]
        return np.bincount(flat, minlength=self.rows * self.cols).reshape(self.rows, self.cols)

    # -- persistence ----------------------------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "weights": self.weights_,
            "mean": self.mean_,
            "std": self.std_,
            "quantization_error": np.float64(self.quantization_error_),
            "topographic_error": np.float64(self.topographic_error_),
        }

    @classmethod
    def from_arrays(cls, arrays, device: str = "cpu") -> BatchSOM:
        weights = np.asarray(arrays["weights"], dtype=np.float32)
        som = cls(weights.shape[0], weights.shape[1], device=device)
        som.weights_ = weights
        # Versions built before the map owned its scaling stored it as latent_mean / latent_std.
        som.mean_ = np.asarray(arrays["mean" if "mean" in arrays else "latent_mean"], np.float32)
        som.std_ = np.asarray(arrays["std" if "std" in arrays else "latent_std"], np.float32)
        som.quantization_error_ = float(arrays["quantization_error"])
        som.topographic_error_ = float(arrays["topographic_error"])
        return som

    # -- internals ------------------------------------------------------------------------
    def _scaled(self, data: np.ndarray) -> np.ndarray:
        return ((np.asarray(data, dtype=np.float32) - self.mean_) / self.std_).astype(np.float32)


def _best_units(x: torch.Tensor, weights: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices of the k nearest nodes of each row of x, nearest first, in blocks of rows
    small enough that one block of distances stays under _BLOCK_ENTRIES."""
    w_sq = (weights**2).sum(1)
    block_rows = max(64, _BLOCK_ENTRIES // max(1, len(weights)))
    # One buffer for every block: allocating a fresh one each time (page faults on tens of MB)
    # cost as much as the matrix product itself.
    buffer = torch.empty(min(block_rows, len(x)), len(weights), device=x.device)
    out = []
    for start in range(0, len(x), block_rows):
        block = x[start : start + block_rows]
        d = buffer[: len(block)]
        # ||x - w||^2 = ||w||^2 - 2 x.w (+ ||x||^2, constant per row, irrelevant to the ranking)
        torch.addmm(w_sq[None, :], block, weights.T, alpha=-2, out=d)
        if k == 1:  # argmin is several times faster than topk on a wide block
            out.append(d.argmin(1, keepdim=True))
        else:
            out.append(torch.topk(d, min(k, d.shape[1]), dim=1, largest=False).indices)
    return torch.cat(out)


def _span(n: int) -> torch.Tensor:
    """n evenly spaced steps from -1 to 1 (a single step at 0)."""
    return torch.linspace(-1, 1, n) if n > 1 else torch.zeros(1)


def _smooth(grid: torch.Tensor, g_row: torch.Tensor, g_col: torch.Tensor) -> torch.Tensor:
    """Apply the separable Gaussian neighbourhood to a (rows, cols, dim) grid of sums."""
    return torch.einsum("ir,rcd,jc->ijd", g_row, grid, g_col)


# -- the map and the labels of its cells --------------------------------------------------------
def dominant_classes(nodes: np.ndarray, labels, shape: tuple[int, int]) -> np.ndarray:
    """The most frequent label among the cells each node won, as a (rows, cols) object array;
    None where a node won no labelled cell. `nodes`: each cell's (row, col), as `winners` gives
    them; unlabelled cells (None, NaN) do not count. A tie goes to the label first in sorted
    order, as the viewer's map colours it."""
    labels = np.asarray(labels, dtype=object)
    labelled = np.array([isinstance(v, str) for v in labels], bool)
    classes = sorted(set(labels[labelled]))
    counts = np.zeros((*shape, len(classes)), int)
    codes = np.array([classes.index(v) for v in labels[labelled]], int)
    np.add.at(counts, (np.asarray(nodes)[labelled, 0], np.asarray(nodes)[labelled, 1], codes), 1)
    dominant = np.full(shape, None, dtype=object)
    occupied = counts.sum(2) > 0
    dominant[occupied] = np.array(classes, dtype=object)[counts.argmax(2)[occupied]]
    return dominant


def neighbour_agreement(dominant: np.ndarray) -> float:
    """How much a labelled map shows each class as one region rather than scattered patches: the
    share of nodes whose dominant class is also that of most (more than half) of their 8
    neighbours. Nodes without cells (None) are left out, as nodes and as neighbours, and so is a
    node with no occupied neighbour. A straight border between two regions costs nothing (a node
    beside it agrees with 5 of 8); an island or a ragged border does. Four equally common classes
    scattered at random score about 0.03 (P[Binomial(8, 1/4) > 4]); NaN for a map with no
    occupied node that has an occupied neighbour."""
    rows, cols = dominant.shape
    agreeing = counted = 0
    for r in range(rows):
        for c in range(cols):
            if dominant[r, c] is None:
                continue
            around = [dominant[rr, cc] for rr in range(max(0, r - 1), min(rows, r + 2))
                      for cc in range(max(0, c - 1), min(cols, c + 2))
                      if (rr, cc) != (r, c) and dominant[rr, cc] is not None]
            if around:
                counted += 1
                agreeing += sum(label == dominant[r, c] for label in around) > len(around) / 2
    return agreeing / counted if counted else float("nan")
