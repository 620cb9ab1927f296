"""One atlas version on disk: the single owner of the names of its files, and of how each is
written and read.

    versions/NNNNNN/
      manifest.json           inputs, parameters, metrics (written at publish)
      cells.parquet           one row per cell; crop_path relative to ATLAS_HOME, source_path
                              absolute (the input image lives outside the atlas)
      latents.npy             VAE latent means, row i = cell i
      index.faiss             FAISS index over the latents
      som.npz                 SOM codebook, its input scaling, U-matrix
      novelty.npz             the archive's own leave-one-out novelty scores (atlas.novelty)
      feature_ranges.json     per-class 2/50/98th feature percentiles under the version's labels
      rejections.parquet      input files that gave no cell, with the reason
      models/backbone.pt      Xception backbone   } together: the Embedder
      models/vae.pt           VAE                 }
      models/classifier.json  XGBoost trees (+ .classes.json: classes, flag threshold, calibration)
      models/segmenter/       a copy of the trained segmenter, when the build used one

Every path to a file of the atlas is stored relative (to the version folder, or, for cell
crops shared by versions, to ATLAS_HOME), so an atlas can be moved, copied into a container or
restored from a backup elsewhere. Versions written before that rule stored crop paths as the build's working
directory saw them; `read_cells` turns those into home-relative ones, so they load unchanged.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from atlas.classifier import CellClassifier
from atlas.embedder import Embedder
from atlas.features import FEATURE_NAMES, load_class_ranges, save_class_ranges
from atlas.novelty import NoveltyScorer
from atlas.search import LatentIndex
from atlas.segmentation import Segmenter, load_segmenter
from atlas.som import BatchSOM

MANIFEST = "manifest.json"
CELLS = "cells.parquet"
LATENTS = "latents.npy"
INDEX = "index.faiss"
SOM = "som.npz"
NOVELTY = "novelty.npz"
FEATURE_RANGES = "feature_ranges.json"
REJECTIONS = "rejections.parquet"
BACKBONE = "models/backbone.pt"
VAE_WEIGHTS = "models/vae.pt"
CLASSIFIER = "models/classifier.json"
SEGMENTER = "models/segmenter"
CROPS = "crops"  # under ATLAS_HOME: crops/<segmenter>/<ab>/<cell_id>.jpg, shared by versions

# What a rebuild that retrains only the classifier carries over from its parent unchanged.
LABEL_INDEPENDENT = (LATENTS, INDEX, SOM, REJECTIONS, BACKBONE, VAE_WEIGHTS)


class AtlasVersion:
    """The files of one version folder (published, or a staging folder being written) of the
    atlas at `home`."""

    def __init__(self, folder: Path | str, home: Path | str):
        self.folder = Path(folder)
        self.home = Path(home)

    def path(self, name: str) -> Path:
        return self.folder / name

    # -- reading ------------------------------------------------------------------------------
    @functools.cached_property
    def manifest(self) -> dict:
        """Read once: a version is immutable once published (its loaders all consult it)."""
        return json.loads(self.path(MANIFEST).read_text())

    def read_cells(self) -> pd.DataFrame:
        cells = pd.read_parquet(self.path(CELLS))
        cells["crop_path"] = [home_relative_crop(p) for p in cells["crop_path"]]
        return cells

    def read_latents(self) -> np.ndarray:
        return np.load(self.path(LATENTS))

    def read_index(self) -> LatentIndex:
        return LatentIndex.load(self.path(INDEX))

    def read_som(self) -> tuple[BatchSOM, np.ndarray]:
        """The map (with its input scaling) and its U-matrix."""
        with np.load(self.path(SOM)) as arrays:
            return BatchSOM.from_arrays(arrays), arrays["u_matrix"]

    def read_novelty(self) -> NoveltyScorer | None:
        """The novelty calibration; None for versions built before it (no novelty answers)."""
        return NoveltyScorer.load(self.path(NOVELTY)) if self.path(NOVELTY).is_file() else None

    def read_embedder(self, device: str = "auto") -> Embedder:
        return Embedder.load(self.path(BACKBONE), self.path(VAE_WEIGHTS), device=device)

    def read_classifier(self, threads: int = 1) -> CellClassifier:
        # Versions built before the classifier kept its threshold have it in the manifest.
        legacy_bits = (self.manifest.get("classifier") or {}).get("flag_threshold_bits")
        return CellClassifier.load(self.path(CLASSIFIER), threads=threads, flag_bits=legacy_bits)

    def read_segmenter(self) -> Segmenter:
        """The segmenter the version was built with, at its scale: its own copy of a trained
        model (manifest "segmenter" -> "path"), or the classical one."""
        manifest = self.manifest
        relative = (manifest.get("segmenter") or {}).get("path")
        return load_segmenter(self.path(relative) if relative else None, self.um_per_pixel)

    def read_feature_ranges(self) -> dict | None:
        """{feature: {class: [p2, p50, p98]}} under the version's own labels, or None."""
        return load_class_ranges(self.path(FEATURE_RANGES))

    @functools.cached_property
    def embedder_fingerprint(self) -> str:
        """SHA-256 of the backbone and VAE weights: equal for versions that embed alike (an
        `add` or a label rebuild carries them over), so a latent made by one serves the other."""
        digest = hashlib.sha256()
        for name in (BACKBONE, VAE_WEIGHTS):
            digest.update(self.path(name).read_bytes())
        return digest.hexdigest()

    @property
    def um_per_pixel(self) -> float:
        return float(self.manifest["parameters"]["um_per_pixel"])

    def crop_file(self, crop_path: str) -> Path:
        """The absolute path of a cell's crop from its stored (home-relative) `crop_path`."""
        return self.home / crop_path

    def check_features(self) -> None:
        """Refuse a version built with another list of cell features (its classifier and
        ranges would be read against the wrong columns)."""
        built_with = self.manifest.get("parameters", {}).get("feature_names")
        if built_with is not None and list(built_with) != list(FEATURE_NAMES):
            raise IncompatibleVersion(
                f"atlas version {self.folder.name} in {self.home} was built with another set of cell "
                f"features ({len(built_with)} against {len(FEATURE_NAMES)} now); rebuild it with "
                "`cellatlas build`")

    # -- writing (into a staging folder) ------------------------------------------------------
    def write_cells(self, cells: pd.DataFrame) -> None:
        cells.to_parquet(self.path(CELLS), index=False)

    def write_latents(self, latents: np.ndarray) -> None:
        np.save(self.path(LATENTS), latents)

    def write_index(self, index: LatentIndex) -> None:
        index.save(self.path(INDEX))

    def write_novelty(self, novelty: NoveltyScorer) -> None:
        novelty.save(self.path(NOVELTY))

    def write_som(self, som: BatchSOM) -> None:
        np.savez(self.path(SOM), **som.to_arrays(), u_matrix=som.u_matrix())

    def write_models(self, embedder: Embedder | None, classifier: CellClassifier) -> None:
        self.path("models").mkdir(parents=True, exist_ok=True)
        if embedder is not None:
            embedder.save(self.path(BACKBONE), self.path(VAE_WEIGHTS))
        classifier.save(self.path(CLASSIFIER))

    def write_segmenter(self, model_folder: Path | str | None) -> str | None:
        """A copy of a trained segmenter's folder inside the version (so queries and rebuilds
        need nothing outside it); returns the manifest's relative path, None for classical."""
        if model_folder is None:
            return None
        shutil.copytree(model_folder, self.path(SEGMENTER), ignore=shutil.ignore_patterns(".*"))
        return SEGMENTER

    def write_feature_ranges(self, cells: pd.DataFrame, classes: list[str]) -> None:
        save_class_ranges(self.path(FEATURE_RANGES), cells[list(FEATURE_NAMES)].to_numpy(np.float32),
                          cells["label"].to_numpy(dtype=object), classes)

    def write_rejections(self, rejections: list) -> None:
        pd.DataFrame([{"path": r.path, "reason": r.reason} for r in rejections],
                     columns=["path", "reason"]).to_parquet(self.path(REJECTIONS), index=False)

    def carry_over(self, parent: AtlasVersion, names=LABEL_INDEPENDENT) -> None:
        """Copy the parent's files that do not depend on labels (and its segmenter copy)."""
        self.path("models").mkdir(parents=True, exist_ok=True)
        for name in names:
            if parent.path(name).exists():
                shutil.copy2(parent.path(name), self.path(name))
        if parent.path(SEGMENTER).is_dir():
            shutil.copytree(parent.path(SEGMENTER), self.path(SEGMENTER))


class IncompatibleVersion(FileNotFoundError):
    """A version this code cannot serve; the message says what to do."""


def crop_path(segmenter_key: str, cell_id: str) -> str:
    """Where a cell's crop lives, relative to ATLAS_HOME (content-addressed: the same cell
    segmented the same way is stored once for every version)."""
    return f"{CROPS}/{segmenter_key}/{cell_id[:2]}/{cell_id}.jpg"


def mask_path(crop: str | Path) -> Path:
    """The label mask saved beside a crop (255 nucleus, 128 cytoplasm)."""
    return Path(crop).with_suffix(".mask.png")


def home_relative_crop(stored: str) -> str:
    """A stored crop path as it is relative to ATLAS_HOME. Versions built before paths were
    stored relative hold the path the build saw (`/srv/atlas/crops/...` or `atlas/crops/...`,
    relative to its working directory); the part from the last `crops` folder on is the same."""
    parts = Path(stored).parts
    if parts and parts[0] == CROPS and not Path(stored).is_absolute():
        return stored
    if CROPS in parts:
        last = len(parts) - 1 - parts[::-1].index(CROPS)
        return str(Path(*parts[last:]))
    return stored
