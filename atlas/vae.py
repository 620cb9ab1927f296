"""Variational autoencoder that compresses backbone features to a small latent (default 50-d).

As in the core design, the VAE is not used generatively: a cell's embedding is the mean of
its latent distribution, mu(x). The reconstruction term is the mean squared error on the
inputs, the regulariser the KL divergence to N(0, I), weighted by `beta`.

Inputs are standardised per dimension, then PCA-whitened to `whiten_dim` components (the
standard step before instance retrieval: Jegou & Chum, ECCV 2012). Without whitening the
reconstruction loss is dominated by a few high-variance directions, the VAE collapsed to ~12
active latent dimensions, and the detail that tells one cell from its near neighbours was
lost: on the PBC archive (7,469 cells) a rotated copy of an archived cell found that cell
first 85% of the time, a JPEG q90 copy 84%. With 128 whitened components: 99% and 98%, all
50 latent dimensions active, and class precision of the 8 nearest cells unchanged (0.98).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.decomposition import PCA
from torch import nn

from atlas.progress import progress as progress_bar


class _Network(nn.Module):
    def __init__(self, input_dim: int, latent_dim: int, hidden: tuple[int, int], dropout: float):
        super().__init__()
        h1, h2 = hidden
        self.encoder = nn.Sequential(
            nn.Linear(input_dim, h1), nn.BatchNorm1d(h1), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(h1, h2), nn.BatchNorm1d(h2), nn.ReLU(),
        )
        self.mu = nn.Linear(h2, latent_dim)
        self.log_var = nn.Linear(h2, latent_dim)
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, h2), nn.BatchNorm1d(h2), nn.ReLU(),
            nn.Linear(h2, h1), nn.BatchNorm1d(h1), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(h1, input_dim),
        )

    def forward(self, x):
        h = self.encoder(x)
        mu, log_var = self.mu(h), self.log_var(h).clamp(-10, 10)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * log_var)  # reparameterisation trick
        return self.decoder(z), mu, log_var


class VAE:
    """`fit(features)` sets `network_`, `mean_`, `std_`, `history_`; `transform` gives mu."""

    def __init__(self, latent_dim: int = 50, hidden: tuple[int, int] = (512, 256),
                 epochs: int = 40, batch_size: int = 128, learning_rate: float = 1e-3,
                 beta: float = 1.0, dropout: float = 0.1, whiten_dim: int = 128, seed: int = 0,
                 device: str = "cpu"):
        if latent_dim < 2:
            raise ValueError(f"latent_dim must be at least 2, got {latent_dim}")
        self.latent_dim = latent_dim
        self.hidden = tuple(hidden)
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.beta = beta
        self.dropout = dropout
        self.whiten_dim = whiten_dim
        self.seed = seed
        self.device = device

    def fit(self, features: np.ndarray, progress: bool = True) -> VAE:
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or len(features) < 2:
            raise ValueError("the VAE needs at least 2 feature vectors")
        torch.manual_seed(self.seed)
        generator = torch.Generator().manual_seed(self.seed)
        self.mean_ = features.mean(0)
        self.std_ = features.std(0) + 1e-6
        self.projection_ = _whitening((features - self.mean_) / self.std_, self.whiten_dim, self.seed)
        x_all = torch.from_numpy(self._inputs(features))
        net = _Network(x_all.shape[1], self.latent_dim, self.hidden, self.dropout).to(self.device)
        optimiser = torch.optim.Adam(net.parameters(), lr=self.learning_rate)
        batch = min(self.batch_size, len(x_all))
        self.history_ = []
        for epoch in progress_bar(range(self.epochs), progress, desc="VAE", unit="epoch"):
            net.train()
            order = torch.randperm(len(x_all), generator=generator)
            totals = np.zeros(2)
            for start in range(0, len(order) - batch + 1, batch):  # full batches (BatchNorm)
                x = x_all[order[start : start + batch]].to(self.device)
                reconstruction, mu, log_var = net(x)
                recon = F.mse_loss(reconstruction, x, reduction="none").sum(1).mean()
                kl = (-0.5 * (1 + log_var - mu**2 - log_var.exp()).sum(1)).mean()
                loss = recon + self.beta * kl
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                totals += [recon.item(), kl.item()]
            steps = max(1, len(order) // batch)
            self.history_.append({"epoch": epoch + 1, "reconstruction": totals[0] / steps,
                                  "kl": totals[1] / steps})
        self.network_ = net.eval()
        return self

    @torch.no_grad()
    def transform(self, features: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        """Latent means mu(x), shape (N, latent_dim)."""
        features = np.asarray(features, dtype=np.float32)
        out = []
        for start in range(0, len(features), batch_size):
            x = torch.from_numpy(self._inputs(features[start : start + batch_size]))
            out.append(self.network_.mu(self.network_.encoder(x.to(self.device))).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.latent_dim), np.float32)

    def _inputs(self, features: np.ndarray) -> np.ndarray:
        standardised = (features - self.mean_) / self.std_
        if self.projection_ is None:
            return standardised.astype(np.float32)
        return (standardised @ self.projection_).astype(np.float32)

    def save(self, path) -> None:
        torch.save({"params": {k: getattr(self, k) for k in (
            "latent_dim", "hidden", "epochs", "batch_size", "learning_rate", "beta", "dropout", "whiten_dim",
            "seed")},
            "input_dim": len(self.mean_), "mean": self.mean_, "std": self.std_, "projection": self.projection_,
            "history": self.history_, "state_dict": self.network_.state_dict()}, path)

    @classmethod
    def load(cls, path, device: str = "cpu") -> VAE:
        state = torch.load(path, map_location="cpu", weights_only=False)
        params = {"whiten_dim": 0, **state["params"]}  # VAEs saved before whitening existed had none
        vae = cls(**params, device=device)
        vae.mean_, vae.std_, vae.history_ = state["mean"], state["std"], state["history"]
        vae.projection_ = state.get("projection")
        input_dim = state["input_dim"] if vae.projection_ is None else vae.projection_.shape[1]
        net = _Network(input_dim, vae.latent_dim, vae.hidden, vae.dropout)
        net.load_state_dict(state["state_dict"])
        vae.network_ = net.to(device).eval()
        return vae


def _whitening(standardised: np.ndarray, components: int, seed: int) -> np.ndarray | None:
    """(D, K) matrix projecting standardised features on their first K principal components,
    each scaled to unit variance; None when whitening is off (components = 0)."""
    k = min(components, len(standardised) - 1, standardised.shape[1])
    if components <= 0 or k < 2:
        return None
    pca = PCA(n_components=k, svd_solver="randomized" if k < 0.5 * standardised.shape[1] else "full",
              random_state=seed).fit(standardised)
    # A floor on the variances: near-empty components (tiny archives) must not amplify noise.
    variance = np.maximum(pca.explained_variance_, 1e-4 * pca.explained_variance_[0])
    return (pca.components_.T / np.sqrt(variance)).astype(np.float32)
