"""Embedding: one cell crop -> one latent vector. The Xception backbone's tapped features
(averaged over rotated and mirrored views of the canonically oriented crop) compressed by the
VAE to its latent mean. Build, query and evaluation all embed through this one object, so an
archived cell and a query cell are embedded identically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from atlas.backbone import Backbone
from atlas.cell import CellCrop
from atlas.crop import model_input
from atlas.progress import progress
from atlas.vae import VAE


class Embedder:
    """A trained backbone and VAE, used together. `embed(crops)` for crops as segmentation
    makes them; `embed_inputs(images)` for crops already turned and resized to `input_size`
    (the build keeps those in memory for training)."""

    def __init__(self, backbone: Backbone, vae: VAE):
        self.backbone = backbone
        self.vae = vae

    @property
    def input_size(self) -> int:
        return self.backbone.preset.input_size

    @property
    def latent_dim(self) -> int:
        return self.vae.latent_dim

    def model_inputs(self, crops: list[CellCrop]) -> np.ndarray:
        return model_input(crops, self.input_size)

    def embed(self, crops: list[CellCrop], batch_size: int = 256, show_progress: bool = False) -> np.ndarray:
        """Latents (n, latent_dim) of nucleus-centred crops, `batch_size` crops at a time (so
        that memory stays bounded however many crops are given)."""
        out = [self.embed_inputs(self.model_inputs(crops[start : start + batch_size]))
               for start in progress(range(0, len(crops), batch_size), show_progress, desc="embed", unit="batch")]
        return np.concatenate(out) if out else np.zeros((0, self.latent_dim), np.float32)

    def embed_inputs(self, images: np.ndarray, show_progress: bool = False) -> np.ndarray:
        with torch.inference_mode():
            return self.vae.transform(self.backbone.embed(images, progress=show_progress))

    def save(self, backbone_path: Path, vae_path: Path) -> None:
        self.backbone.save(backbone_path)
        self.vae.save(vae_path)

    @classmethod
    def load(cls, backbone_path: Path, vae_path: Path, device: str = "auto") -> Embedder:
        return cls(Backbone.load(backbone_path, device=device), VAE.load(vae_path))
