"""The modified Xception backbone: timm's `XceptionAligned` built from named presets, trained
as a classifier on the labelled cells; its feature map before the head is the cell's
visual description (input to the VAE).

Architectures are data (a block configuration per preset), as in timm. The core design used
Xception with the middle flow repeated 3 times instead of 8 and tapped a 256x7x7 feature map.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from functools import partial

import numpy as np
import timm
import torch
import torch.nn.functional as F
from skimage.color import hed_from_rgb, rgb_from_hed
from timm.layers import BatchNormAct2d
from timm.models.xception_aligned import XceptionAligned
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from atlas.progress import Say
from atlas.progress import progress as progress_bar
from atlas.runtime import resolve_device

# Views per forward pass when embedding, by device (16 views per cell: 8 cells a pass on a CPU).
# Measured on the cpu preset (80 px, 256 PBC crops, 2 threads, batch norms folded, freed memory
# kept: atlas/runtime.keep_freed_memory): 16 / 32 / 64 / 128 / 256 views a pass 45.6 / 50 /
# 53 / 54 / 54 cells/s, the same latents. (Before memory was kept, every large pass paid for
# fresh pages and 32 was best: 43.7 cells/s against 17.8 at 256.) A GPU wants large passes (not
# measured here: no GPU was lent).
EMBED_VIEWS_PER_PASS = {"cpu": 128, "cuda": 256}

# Validation accuracy is measured every this many epochs and after the last. It is reported
# (the manifest's history), never used to pick an epoch, and measuring it after every epoch cost
# 1.3 s each, 26 s of a build on the full PBC split (2 cores).
VALIDATE_EVERY = 5


class BackboneError(RuntimeError):
    """A backbone cannot be built or trained as asked; the message says what to do."""


@dataclass(frozen=True)
class BackbonePreset:
    """A named backbone size. Widths are the Xception entry flow, the middle flow (repeated
    `middle_repeats` times at the last entry width) and the exit flow."""

    name: str
    entry_widths: tuple[int, int, int]
    middle_repeats: int
    exit_widths: tuple[int, tuple[int, int, int]]
    input_size: int  # crops (256 px at 0.1 um/px) are resized to this
    tap_grid: int  # the tapped feature map is average-pooled to tap_grid x tap_grid
    epochs: int
    batch_size: int
    learning_rate: float
    timm_name: str | None = None  # a timm model name instead of a block configuration
    # A small archive trains for more epochs, up to twice `epochs`, so that the optimiser takes
    # at least this many steps (0: always `epochs`). See `epochs_for`.
    min_steps: int = 0

    def batch_for(self, cells: int) -> int:
        """Images per training step on `cells` cells (fewer cells than a batch: all of them)."""
        return max(1, min(self.batch_size, cells))

    def steps_per_epoch(self, cells: int) -> int:
        return max(1, cells // self.batch_for(cells))

    def epochs_for(self, cells: int) -> int:
        """Epochs to train on `cells` cells when none are asked for."""
        return min(2 * self.epochs, max(self.epochs, math.ceil(self.min_steps / self.steps_per_epoch(cells))))

    def block_cfg(self) -> list[dict]:
        a, b, c = self.entry_widths
        exit_first, exit_last = self.exit_widths
        return [
            dict(in_chs=64, out_chs=a, stride=2),
            dict(in_chs=a, out_chs=b, stride=2),
            dict(in_chs=b, out_chs=c, stride=2),
            *[dict(in_chs=c, out_chs=c, stride=1) for _ in range(self.middle_repeats)],
            dict(in_chs=c, out_chs=(c, exit_first, exit_first), stride=2),
            dict(in_chs=exit_first, out_chs=exit_last, stride=1, no_skip=True, start_with_relu=False),
        ]


PRESETS: dict[str, BackbonePreset] = {
    # Unit tests and the demo: seconds per epoch on tiny data.
    "tiny": BackbonePreset("tiny", (16, 24, 32), 1, (48, (64, 64, 64)), 48, 2, 10, 32, 3e-3),
    # The CPU default, sized by measurement on 2 cores (see README, "Choosing the CPU preset").
    # 20 epochs: 18 cost 0.4 points of held-out accuracy and precision@8 on the PBC split.
    # At least 2,000 steps (20 epochs of the 6,719 training cells of the 80% PBC split): on half
    # of it, 20 epochs (1,040 steps) left the backbone at 0.941 validation accuracy against
    # 0.969; see README, "Growing the archive".
    "cpu": BackbonePreset("cpu", (64, 128, 192), 3, (256, (256, 256, 256)), 80, 3, 20, 64, 2e-3,
                          min_steps=2000),
    # The core design's network: middle flow x3, 224 px input; for GPUs.
    "gpu": BackbonePreset("gpu", (128, 256, 728), 3, (1024, (1536, 1536, 2048)), 224, 2, 40, 64, 1e-3),
    # timm's xception41 (middle flow x8); the only preset that can use public weights.
    "xception41": BackbonePreset("xception41", (128, 256, 728), 8, (1024, (1536, 1536, 2048)),
                                 224, 2, 30, 32, 1e-3, timm_name="xception41"),
}


def build_model(preset: BackbonePreset, num_classes: int, pretrained: bool = False) -> nn.Module:
    if preset.timm_name:
        try:
            return timm.create_model(preset.timm_name, pretrained=pretrained, num_classes=num_classes)
        except Exception as error:  # timm raises many kinds of network/hub errors
            raise BackboneError(
                f"could not load pretrained weights for {preset.timm_name!r} ({type(error).__name__}: "
                f"{error}). Pretrained weights need network access to the model hub; without it, "
                "train from scratch by leaving out --pretrained."
            ) from error
    if pretrained:
        raise BackboneError(
            f"preset {preset.name!r} is a CellAtlas configuration with no public weights; "
            "--pretrained works only with preset 'xception41'"
        )
    return XceptionAligned(
        preset.block_cfg(), num_classes=num_classes,
        norm_layer=partial(nn.BatchNorm2d, eps=1e-3, momentum=0.1),
    )


def fold_batch_norms(model: nn.Module) -> nn.Module:
    """An inference copy of `model` with every batch normalisation that follows a convolution
    folded into that convolution's weights (torch's `fuse_conv_bn_eval`; timm's BatchNormAct2d
    keeps its activation). The same function within float rounding (measured: largest relative
    difference of tapped features 3e-7) and, on the cpu preset with 1 thread, 48 instead of
    60 CPU ms per embedded cell."""
    model = copy.deepcopy(model).eval()
    for parent in model.modules():
        children = list(parent.named_children())
        for (conv_name, conv), (norm_name, norm) in zip(children, children[1:]):
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                setattr(parent, conv_name, fuse_conv_bn_eval(conv, norm))
                after = nn.Sequential(norm.drop, norm.act) if isinstance(norm, BatchNormAct2d) else nn.Identity()
                setattr(parent, norm_name, after)
    return model


def channel_statistics(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of each colour channel of uint8 (N, H, W, 3) images, on a
    0-1 scale (std + 1e-6), from each channel's 256-bin histogram: numpy's std of the images
    made a float64 copy of them (4 s and 1 GB on the full PBC split), the counts are exact."""
    levels = np.arange(256, dtype=np.float64) / 255.0
    mean, std = np.empty(3), np.empty(3)
    for channel in range(3):
        counts = np.bincount(images[..., channel].ravel(), minlength=256).astype(np.float64)
        mean[channel] = counts @ levels / counts.sum()
        std[channel] = np.sqrt(counts @ (levels - mean[channel]) ** 2 / counts.sum())
    return mean, std + 1e-6


# What training varies besides geometry, so that the backbone learns the cell and not one lab's
# stain, scanner and focus (issue #12). Measured on the backbone alone (half the PBC training
# split, 12 epochs, one seed; 8-way accuracy on the PBC test split / wbc_seg tecom / wbc_seg
# cellavision; README, "Other scanners and stains"): mild colour jitter only 0.925 / 0.07 /
# 0.32; + stain jitter and blur 0.936 / 0.10 / 0.47; + hue (30 degrees) and grey (10%) 0.920 /
# 0.46 / 0.35 (these settings); + zoom 0.75-1.3 0.916 / 0.31 / 0.43; hue 60 degrees, grey 20%,
# that zoom 0.855 / 0.55 / 0.38. (The blur measured was a 5-tap Gaussian of sigma U(0, 1).)
# On a full build of the 80% PBC split (README, "Other scanners and stains") these settings took
# tecom from 9% to 21% and cost 0.6 points of PBC accuracy and 1.1 of precision@8, so they are
# asked for (`--stain-jitter`), not the default.
STAIN_SCALE = 0.2  # each stain's optical density times U(1 - s, 1 + s) (Tellez et al. 2018, "HED")
STAIN_SHIFT = 0.05  # ... plus U(-s, s)
HUE_DEGREES = 30.0  # the hue turned by U(-h, h) degrees
GREY_SHARE = 0.1  # images shown in grey
ZOOM = (0.9, 1.1)  # scale range


def augment(batch: torch.Tensor, generator: torch.Generator, stain: bool = False) -> torch.Tensor:
    """Random rotation (0-360), flips, small shift and zoom, and brightness, contrast and
    saturation jitter, after stain, hue, focus and grey jitter when `stain`; its own parameters
    for every image of the batch and every step batched (one `grid_sample` for the geometry).
    `batch` is float (N, 3, H, W) in 0-1.

    Written with torch rather than taken from a library: neither kornia nor torchvision has
    stain jitter, albumentations' HEStain works one numpy image at a time, and kornia's pipeline
    for the rest (RandomAffine, ColorJiggle, RandomGaussianBlur, RandomGrayscale) took 35 ms for
    a batch of 64 at 80 px on 2 idle cores against 20 ms for all of this (8.5-13 ms before the
    stain, hue, blur and grey jitter were added; a training step is about 310 ms)."""
    x, n = batch, batch.shape[0]
    rand = partial(torch.rand, generator=generator)
    if stain:
        x = blur(hue_jitter(stain_jitter(x, generator), generator), generator)
        grey_ones = (rand(n, 1, 1, 1) < GREY_SHARE).to(x)
        x = grey_ones * x.mean(1, keepdim=True) + (1 - grey_ones) * x
    angle = rand(n) * 2 * math.pi
    zoom = _uniform(generator, (n,), *ZOOM)
    flip = torch.where(rand(n) < 0.5, -1.0, 1.0)
    shift = (rand(n, 2) - 0.5) * 0.1
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([
        torch.stack([cos * flip, -sin, shift[:, 0]], 1),
        torch.stack([sin * flip, cos, shift[:, 1]], 1),
    ], 1).to(x)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    brightness = (0.9 + 0.2 * rand(n, 1, 1, 1)).to(x)
    contrast = (0.9 + 0.2 * rand(n, 1, 1, 1)).to(x)
    saturation = (0.85 + 0.3 * rand(n, 1, 1, 1)).to(x)
    grey = out.mean(1, keepdim=True)
    out = grey + (out - grey) * saturation
    mean = out.mean((1, 2, 3), keepdim=True)
    return ((out - mean) * contrast + mean) * brightness


def _uniform(generator: torch.Generator, shape: tuple, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator)


def stain_jitter(x: torch.Tensor, generator: torch.Generator, scale: float = STAIN_SCALE,
                 shift: float = STAIN_SHIFT) -> torch.Tensor:
    """Each image's stains made stronger or weaker and their colours shifted: the optical
    density split into three stains by colour deconvolution (Ruifrok and Johnston's matrix,
    scikit-image's `hed_from_rgb`; a Romanowsky stain's azure and eosin are close enough to its
    haematoxylin and eosin for a perturbation), each stain times U(1 - scale, 1 + scale) plus
    U(-shift, shift), and back to RGB. Deconvolve, scale and reconvolve are one 3x3 matrix per
    image."""
    n = x.shape[0]
    to_stains = torch.as_tensor(hed_from_rgb, dtype=x.dtype, device=x.device)
    to_density = torch.as_tensor(rgb_from_hed, dtype=x.dtype, device=x.device)
    gain = _uniform(generator, (n, 3), 1 - scale, 1 + scale).to(x)
    offset = _uniform(generator, (n, 3), -shift, shift).to(x)
    # density (row vector d) -> (d @ to_stains * gain + offset) @ to_density
    matrix = (to_stains[None] * gain[:, None, :]) @ to_density  # (N, 3, 3), acting on rows
    density = -torch.log(x.clamp(1 / 255, 1))
    density = torch.einsum("nji,njhw->nihw", matrix, density) + (offset @ to_density)[:, :, None, None]
    return torch.exp(-density).clamp(0, 1)


# RGB <-> YIQ (NTSC): hue is the angle of the (I, Q) chroma plane
_YIQ_FROM_RGB = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_RGB_FROM_YIQ = torch.linalg.inv(_YIQ_FROM_RGB)


def hue_jitter(x: torch.Tensor, generator: torch.Generator, degrees: float = HUE_DEGREES) -> torch.Tensor:
    """Each image's hue turned by U(-degrees, degrees): a rotation of its YIQ chroma plane."""
    angle = _uniform(generator, (x.shape[0],), -math.radians(degrees), math.radians(degrees)).to(x)
    cos, sin = torch.cos(angle), torch.sin(angle)
    zero, one = torch.zeros_like(angle), torch.ones_like(angle)
    turn = torch.stack([torch.stack([one, zero, zero], 1), torch.stack([zero, cos, -sin], 1),
                        torch.stack([zero, sin, cos], 1)], 1)  # (N, 3, 3)
    matrix = _RGB_FROM_YIQ.to(x) @ turn @ _YIQ_FROM_RGB.to(x)
    return torch.einsum("nij,njhw->nihw", matrix, x).clamp(0, 1)


def blur(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image out of focus by a random amount: mixed with its 3x3 box-blurred self, by a
    weight U(0, 1) of its own. The box is summed from shifted copies: 1.3 ms for a batch of 64
    at 80 px on 2 cores, against 5.5 ms for avg_pool2d and 9-24 ms for convolutions."""
    weight = torch.rand((x.shape[0], 1, 1, 1), generator=generator).to(x)
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    rows = padded[..., :, :-2] + padded[..., :, 1:-1] + padded[..., :, 2:]
    blurred = (rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :]) / 9
    return x + weight * (blurred - x)


def dihedral_views(batch: torch.Tensor, angles: tuple[float, ...] = (0.0,)) -> list[torch.Tensor]:
    """The 8 rotations/reflections of the square (the dihedral group D4) of a batch, and of
    the batch turned by each extra angle: angles (0, 45) give the 16 views of D8."""
    views = []
    for angle in angles:
        turned = batch if angle == 0 else rotate(batch, angle)
        for flipped in (turned, turned.flip(-1)):
            for k in range(4):
                views.append(torch.rot90(flipped, k, dims=(-2, -1)))
    return views


def rotate(batch: torch.Tensor, degrees: float) -> torch.Tensor:
    """Turn a (N, C, H, W) batch about its centre; corners are filled by reflection."""
    radians = math.radians(degrees)
    cos, sin = math.cos(radians), math.sin(radians)
    theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=batch.dtype, device=batch.device)
    grid = F.affine_grid(theta.expand(batch.shape[0], 2, 3), list(batch.shape), align_corners=False)
    return F.grid_sample(batch, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


class Backbone:
    """Trainable classifier + feature tap. `fit` sets `model_`, `classes_`, `history_`;
    `embed` returns the tapped features averaged over rotated and mirrored views (the 8 of
    D4, and the same turned by each of `view_angles`), so that an image rotated by a multiple
    of 90 degrees or mirrored gets exactly the same vector, and one rotated by any other angle
    nearly so. Measured on 1,500 PBC cells (rotated copies found first, before the VAE):
    D4 views 80%, D4 x {0, 45 deg} 95%; with canonically oriented crops 95% and 97%."""

    def __init__(self, preset: str | BackbonePreset = "cpu", epochs: int | None = None,
                 seed: int = 0, device: str = "auto", pretrained: bool = False,
                 view_angles: tuple[float, ...] = (0.0, 45.0), stain_jitter: bool = False):
        self.preset = PRESETS[preset] if isinstance(preset, str) else preset
        self.epochs = epochs  # None: the preset's, for the number of cells (`epochs_for`)
        self.seed = seed
        self.device = resolve_device(device)
        self.pretrained = pretrained
        self.view_angles = tuple(view_angles)
        self.stain_jitter = stain_jitter  # train with `augment(stain=True)`
        self._inference_model = None  # `model_` with its batch norms folded, made on first use

    # -- training -------------------------------------------------------------------------
    def fit(self, images: np.ndarray, labels: np.ndarray, classes: list[str],
            val_images: np.ndarray | None = None, val_labels: np.ndarray | None = None,
            progress: bool = True) -> Backbone:
        """`images`: uint8 (N, S, S, 3) at the preset's input size; `labels`: class indices."""
        if len(images) == 0:
            raise BackboneError("no labelled cells to train the backbone on")
        torch.manual_seed(self.seed)
        generator = torch.Generator().manual_seed(self.seed)
        self.classes_ = list(classes)
        self.channel_mean_, self.channel_std_ = channel_statistics(images)
        model = build_model(self.preset, len(classes), self.pretrained).to(self.device)
        model = model.to(memory_format=torch.channels_last)
        x_all = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # uint8, CPU
        y_all = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        batch = self.preset.batch_for(len(x_all))
        steps_per_epoch = self.preset.steps_per_epoch(len(x_all))
        epochs = self.epochs if self.epochs is not None else self.preset.epochs_for(len(x_all))
        optimiser = torch.optim.AdamW(model.parameters(), lr=self.preset.learning_rate, weight_decay=0.05)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimiser, max_lr=self.preset.learning_rate, total_steps=epochs * steps_per_epoch,
            pct_start=0.2,
        )
        self.history_ = []
        for epoch in range(epochs):
            model.train()
            started = time.perf_counter()
            order = torch.randperm(len(x_all), generator=generator)
            losses, correct = [], 0
            bar = progress_bar(range(steps_per_epoch), progress, desc=f"backbone epoch {epoch + 1}/{epochs}",
                               leave=False, unit="batch")
            for step in bar:
                idx = order[step * batch : (step + 1) * batch]
                x = augment(x_all[idx].float() / 255.0, generator, stain=self.stain_jitter)
                x = self._normalise(x.to(self.device))
                y = y_all[idx].to(self.device)
                logits = model(x)
                loss = F.cross_entropy(logits, y, label_smoothing=0.1)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                schedule.step()
                losses.append(loss.item())
                correct += (logits.argmax(1) == y).sum().item()
                bar.set_postfix(loss=f"{np.mean(losses):.3f}")
            record = {"epoch": epoch + 1, "loss": float(np.mean(losses)),
                      "train_accuracy": correct / (steps_per_epoch * batch),
                      "seconds": round(time.perf_counter() - started, 1)}
            self.model_ = model
            due = (epoch + 1) % VALIDATE_EVERY == 0 or epoch + 1 == epochs
            if due and val_images is not None and len(val_images):
                predicted = self.predict(val_images)
                record["val_accuracy"] = float((predicted == np.asarray(val_labels)).mean())
            self.history_.append(record)
            Say(progress)(f"  backbone epoch {epoch + 1}: " + ", ".join(
                f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                if k != "epoch"))
        self.model_ = model.eval()
        self._inference_model = None
        return self

    # -- use ------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        self.model_.eval()
        out = []
        for start in range(0, len(images), batch_size):
            x = self._prepare(images[start : start + batch_size])
            out.append(self.model_(x).argmax(1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    @torch.no_grad()
    def embed(self, images: np.ndarray, views_per_batch: int | None = None,
              progress: bool = False) -> np.ndarray:
        """Tapped feature vectors (N, D), averaged over the rotated and mirrored views of each
        image. All views of a chunk of images go through the network as one batch: one image's
        16 views as 16 separate passes took 250 ms on 2 cores, as one batch a fraction of it."""
        self.model_.eval()
        n_views = 8 * len(self.view_angles)
        views_per_batch = views_per_batch or EMBED_VIEWS_PER_PASS.get(self.device.type, 32)
        chunk = max(1, views_per_batch // n_views)
        out = []
        starts = range(0, len(images), chunk)
        for start in progress_bar(starts, progress, desc="embed", unit="chunk"):
            x = self._prepare(images[start : start + chunk])
            views = torch.cat(dihedral_views(x, self.view_angles)).contiguous(memory_format=torch.channels_last)
            tapped = self._tap(views).view(n_views, len(x), -1)
            out.append(tapped.mean(0).cpu().numpy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, self.feature_dim), np.float32)

    @property
    def feature_dim(self) -> int:
        return int(self.model_.num_features * self.preset.tap_grid**2)

    def _tap(self, x: torch.Tensor) -> torch.Tensor:
        if self._inference_model is None:
            self._inference_model = fold_batch_norms(self.model_)
        features = self._inference_model.forward_features(x)
        return F.adaptive_avg_pool2d(features, self.preset.tap_grid).flatten(1)

    def _prepare(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
        return self._normalise(x.to(self.device)).contiguous(memory_format=torch.channels_last)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.as_tensor(self.channel_mean_, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.as_tensor(self.channel_std_, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    # -- persistence ----------------------------------------------------------------------
    def save(self, path) -> None:
        torch.save({
            "preset": asdict(self.preset), "classes": self.classes_, "seed": self.seed,
            "view_angles": self.view_angles, "stain_jitter": self.stain_jitter,
            "channel_mean": self.channel_mean_, "channel_std": self.channel_std_,
            "history": self.history_, "state_dict": self.model_.state_dict(),
        }, path)

    @classmethod
    def load(cls, path, device: str = "auto") -> Backbone:
        state = torch.load(path, map_location="cpu", weights_only=False)
        preset = state["preset"]
        preset = BackbonePreset(**{**preset, "entry_widths": tuple(preset["entry_widths"]),
                                   "exit_widths": (preset["exit_widths"][0], tuple(preset["exit_widths"][1]))})
        backbone = cls(preset, seed=state["seed"], device=device,
                       view_angles=tuple(state.get("view_angles", (0.0,))),
                       stain_jitter=state.get("stain_jitter", False))
        backbone.classes_ = state["classes"]
        backbone.channel_mean_ = state["channel_mean"]
        backbone.channel_std_ = state["channel_std"]
        backbone.history_ = state["history"]
        model = build_model(preset, len(backbone.classes_))
        model.load_state_dict(state["state_dict"])
        backbone.model_ = model.to(backbone.device).to(memory_format=torch.channels_last).eval()
        return backbone
