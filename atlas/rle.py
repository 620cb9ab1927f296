"""COCO run-length encoding of binary masks (the uncompressed form: column-major counts), for
the API's segmentation answers and the exports.

COCO flattens a mask in column-major (Fortran) order and stores the lengths of alternating
runs, starting with a run of zeros (which may be empty): `{"size": [h, w], "counts": [...]}`.
pycocotools' `frPyObjects` reads this form directly.
"""

from __future__ import annotations

import numpy as np


def encode_rle(mask: np.ndarray) -> dict:
    """Uncompressed COCO RLE of a 2-D boolean mask."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    flat = mask.ravel(order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]  # COCO counts always start with the zeros
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def decode_rle(rle: dict) -> np.ndarray:
    """The boolean mask of an uncompressed COCO RLE (the inverse of `encode_rle`)."""
    height, width = rle["size"]
    values = np.arange(len(rle["counts"])) % 2 == 1
    flat = np.repeat(values, rle["counts"])
    if flat.size != height * width:
        raise ValueError(f"RLE counts sum to {flat.size}, expected {height * width}")
    return flat.reshape((height, width), order="F")
