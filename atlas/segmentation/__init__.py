"""Segmentation: the interface every segmenter meets, and loading the one a name or folder gives.

A segmenter finds the white cells of an image: `segment(image) -> list[CellRegion]`, the main
(most central) cell first. Two exist: `classical.py` (stain-colour thresholds, no training) and
`cellpose_runner.py` (a trained cellpose network, saved as a folder in the format of
`model_folder.py`, trained by `cellpose_training.py`). `mask_sets.py` reads images with expert
masks; `scoring.py` measures a segmenter against them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from atlas.cell import REFERENCE_UM_PER_PIXEL, CellRegion
from atlas.segmentation.cellpose_runner import CellposeSegmenter
from atlas.segmentation.classical import ClassicalSegmenter
from atlas.segmentation.model_folder import require_model_folder


class Segmenter(Protocol):
    name: str
    um_per_pixel: float

    def segment(self, image: np.ndarray, main_only: bool = False) -> list[CellRegion]:
        """All white cells in an RGB uint8 image, the one nearest the centre first; with
        `main_only`, that one alone (a segmenter may then skip work)."""
        ...


def load_segmenter(spec: str | Path | None,
                   um_per_pixel: float = REFERENCE_UM_PER_PIXEL) -> Segmenter:
    """The segmenter `spec` names, for images at `um_per_pixel`: None or "classical" gives the
    ClassicalSegmenter, a folder written by `cellatlas segmenter train` a CellposeSegmenter."""
    if spec is None or str(spec) == "classical":
        return ClassicalSegmenter(um_per_pixel)
    return CellposeSegmenter(require_model_folder(spec), um_per_pixel)
