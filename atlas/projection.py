"""Two-dimensional UMAP projection of the cell embeddings, for the atlas scatter view."""

from __future__ import annotations

import numpy as np


def umap_projection(latents: np.ndarray, seed: int = 0, n_neighbors: int = 15) -> np.ndarray:
    """(N, 2) UMAP coordinates; tiny archives fall back to the first two principal axes."""
    latents = np.asarray(latents, dtype=np.float32)
    if len(latents) < max(10, n_neighbors + 2):
        centred = latents - latents.mean(0)
        if len(latents) < 2:
            return np.zeros((len(latents), 2), np.float32)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        return (centred @ vt[:2].T).astype(np.float32)
    import umap  # imported here: it compiles numba code on first import (seconds)

    # A seed makes UMAP single-threaded anyway; n_jobs=1 says so and spares the log its warning.
    reducer = umap.UMAP(n_components=2, n_neighbors=n_neighbors, min_dist=0.1, random_state=seed,
                        n_jobs=1)
    return reducer.fit_transform(latents).astype(np.float32)


def place_in_projection(distances: np.ndarray, neighbours: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """(n, 2) positions of new cells in an existing projection, without refitting it: the mean
    of their nearest archived cells' positions (`neighbours`, rows of latent-index positions,
    -1 for none), weighted by 1/(distance + eps). This is where UMAP's own `transform` starts
    its new points; the archive's map keeps every archived cell where it was."""
    weights = np.where(neighbours >= 0, 1.0 / (np.asarray(distances, np.float64) + 1e-6), 0.0)
    weights /= np.maximum(weights.sum(1, keepdims=True), 1e-12)
    return (weights[:, :, None] * np.asarray(positions, np.float64)[neighbours.clip(0)]).sum(1).astype(np.float32)
