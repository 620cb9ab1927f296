"""Training a cellpose segmenter from scratch on white-cell masks, into a segmenter folder
(`model_folder.py`) that `cellpose_runner.py` runs.

Scale. Training reads one or more sets of `images/NNN.png` + `masks/NNN.png` (255 nucleus,
128 cytoplasm, 0 background), each with its own um per pixel, and resamples every set to one
common *model scale*: the one where the training cells' median diameter (in um) spans cellpose's
30 pixels. Inference resamples an image to that scale from the segmenter's um_per_pixel; so the
cell diameter in pixels follows from each acquisition's scale (one pixel diameter averaged over
sets of different scale finds nothing on the smaller ones). Unlike cellpose's default (every
training image scaled by its own cells' size) the network sees real size differences, as at
inference.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage

from atlas.cell import NUCLEUS
from atlas.progress import Say, shows_bars
from atlas.runtime import resolve_device
from atlas.segmentation.cellpose_runner import CellposeSegmenter, forget_networks
from atlas.segmentation.mask_sets import (
    TrainingDataError,
    cell_diameters_px,
    find_mask_sets,
    read_mask_sets,
    set_scales,
    split_held_out,
)
from atlas.segmentation.model_folder import (
    CELL_WEIGHTS,
    FORMAT,
    NUCLEUS_WEIGHTS,
    cellpose_version,
    weights_sha256,
    write_config,
)
from atlas.segmentation.scoring import evaluate_samples, summary

DIAM_MEAN_PX = 30.0  # cellpose's object diameter at the network's scale
TRAIN_CROP_PX = 64  # training crops at the model scale: two cell diameters


def train_segmenter(images_dir: str | Path, masks_dir: str | Path | None, out: str | Path,
                    um_per_pixel: float | dict[str, float] | None = None, epochs: int = 60,
                    holdout: float = 0.2, seed: int = 0, nucleus_model: bool = False,
                    learning_rate: float = 0.005, batch_size: int = 8, device: str = "cpu",
                    progress: bool = True) -> dict:
    """Train a cellpose network from scratch on white-cell masks and save a segmenter folder
    at `out` (which must not exist yet). Returns the segmenter.json written there, with the
    held-out images' scores. `um_per_pixel`: one value, or {set name: value} for a root of sets."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists; give a new folder for the model")
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    say = Say(progress)
    sets = find_mask_sets(images_dir, masks_dir)
    scales = set_scales(um_per_pixel, [s.name for s in sets])
    samples, notes = read_mask_sets(sets, scales)
    for note in notes:
        say(f"note: {note}")
    train, held = split_held_out(samples, holdout, seed)
    if not train:
        raise TrainingDataError("no training images left after holding some out")

    diameters = {name: [d * scales[name] for s in train if s.set == name
                        for d in cell_diameters_px(s.mask)]
                 for name in scales}
    all_um = [d for values in diameters.values() for d in values]
    cell_diameter_um = float(np.median(all_um))
    per_set_um = {name: float(np.median(v)) for name, v in diameters.items() if v}
    if len(per_set_um) > 1 and max(per_set_um.values()) > 1.4 * min(per_set_um.values()):
        say(f"warning: the sets' median cell diameters differ a lot ({_fmt_um(per_set_um)}): "
            "check each set's um per pixel")
    model_um_per_pixel = cell_diameter_um / DIAM_MEAN_PX
    say(f"{len(train)} training and {len(held)} held-out images in {len(sets)} set(s); median "
        f"cell diameter {cell_diameter_um:.1f} um ({_fmt_um(per_set_um)}); model scale "
        f"{model_um_per_pixel:.3f} um/px")

    started = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        factors = [s.um_per_pixel / model_um_per_pixel for s in train]
        data = [_network_input(resample(s.image, f)) for s, f in zip(train, factors)]
        kinds = [("cell", CELL_WEIGHTS, _instance_labels([s.mask > 0 for s in train], factors))]
        if nucleus_model:
            nuclei = [s.mask == NUCLEUS for s in train]
            kinds.append(("nucleus", NUCLEUS_WEIGHTS, _instance_labels(nuclei, factors)))
        losses = {}
        for kind, weights, labels in kinds:
            say(f"training the {kind} network: {epochs} epochs on {len(data)} images")
            losses[kind] = _train_network(data, labels, staging / weights, epochs, learning_rate,
                                          batch_size, seed, device, progress)
        training_s = time.perf_counter() - started
        config = {
            "kind": "cellpose", "format": FORMAT,
            "nucleus": "cellpose" if nucleus_model else "classical",
            "model_um_per_pixel": model_um_per_pixel, "cell_diameter_um": cell_diameter_um,
            "diam_mean_px": DIAM_MEAN_PX,
            "sets": {name: {"um_per_pixel": scales[name],
                            "train_images": sum(s.set == name for s in train),
                            "held_out_images": sum(s.set == name for s in held),
                            "cell_diameter_um": per_set_um.get(name),
                            "cell_diameter_px": (per_set_um[name] / scales[name]
                                                 if name in per_set_um else None)}
                     for name in scales},
            "held_out": sorted(f"{s.set}/{s.stem}" for s in held),
            "training": {"epochs": epochs, "crop_px": TRAIN_CROP_PX, "batch_size": batch_size,
                         "learning_rate": learning_rate, "seed": seed, "holdout": holdout,
                         "seconds": round(training_s, 1), "device": device,
                         "final_loss": {k: float(v[-1]) for k, v in losses.items()},
                         "cellpose_version": cellpose_version(),
                         "images": str(Path(images_dir).resolve()),
                         "masks": str(Path(masks_dir).resolve()) if masks_dir else None,
                         "mask_notes": notes},
            "weights_sha256": weights_sha256(staging, nucleus_model),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_config(staging, config)
        if held:
            say(f"evaluating {len(held)} held-out images")
            rows = []
            for name in scales:  # each set at its own scale
                segmenter = CellposeSegmenter(staging, scales[name], device=device)
                rows += evaluate_samples(segmenter, [s for s in held if s.set == name])
            config["held_out_metrics"] = summary(rows, segmenter)
            write_config(staging, config)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        forget_networks(staging)
    return config


def _instance_labels(masks: list[np.ndarray], factors: list[float]) -> list[np.ndarray]:
    """Each boolean mask resampled to the model scale, its connected parts numbered 1..N."""
    return [ndimage.label(resample(mask.astype(np.uint8), factor, labels=True))[0]
            for mask, factor in zip(masks, factors)]


def _train_network(data, labels, weights: Path, epochs, learning_rate, batch_size, seed, device,
                   progress):
    import torch
    from cellpose import models, train

    torch.manual_seed(seed)
    np.random.seed(seed)
    torch_device = resolve_device(device)
    model = models.CellposeModel(gpu=torch_device.type == "cuda", device=torch_device,
                                 pretrained_model=False, nchan=3, diam_mean=DIAM_MEAN_PX,
                                 mkldnn=False)
    handler = _progress_handler(progress)
    try:
        # cellpose's data-preparation progress bars go to stderr: shown only on a terminal
        with (open(os.devnull, "w") as quiet,
              contextlib.redirect_stderr(sys.stderr if shows_bars(progress) else quiet)):
            path, train_losses, _ = train.train_seg(
                model.net, train_data=data, train_labels=labels, channels=None, normalize=True,
                n_epochs=epochs, learning_rate=learning_rate, batch_size=batch_size,
                bsize=TRAIN_CROP_PX,
                # images are already at the model scale; keep cellpose's +-25% size augmentation
                rescale=False, scale_range=0.5,
                # wbc_seg images hold one cell: cellpose's default (5) would drop them all
                min_train_masks=0, save_path=weights.parent, model_name=weights.stem,
                save_every=10**9)
    finally:
        if handler is not None:
            logging.getLogger("cellpose.train").removeHandler(handler)
    os.replace(path, weights)
    shutil.rmtree(weights.parent / "models", ignore_errors=True)
    return train_losses


def _network_input(image: np.ndarray) -> np.ndarray:
    """cellpose's training layout: channels first, float32 (it normalises per channel)."""
    return np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)


def _progress_handler(progress: bool):
    if not progress:
        return None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("  epoch %(message)s"))
    handler.addFilter(lambda record: record.getMessage()[:1].isdigit())  # only the epoch lines
    train_log = logging.getLogger("cellpose.train")
    train_log.addHandler(handler)
    train_log.setLevel(logging.INFO)
    return handler


def resample(array: np.ndarray, factor: float, labels: bool = False) -> np.ndarray:
    """`array` (an image, or `labels`: nearest neighbour) scaled by `factor` (area averaging to
    shrink, bilinear to grow); itself when the factor is 1."""
    if abs(factor - 1) < 1e-6:
        return array
    height, width = array.shape[:2]
    size = (max(1, int(round(width * factor))), max(1, int(round(height * factor))))
    if labels:
        return cv2.resize(array, size, interpolation=cv2.INTER_NEAREST)
    return cv2.resize(array, size, interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)


def _fmt_um(values: dict[str, float]) -> str:
    return ", ".join(f"{name} {v:.1f} um" for name, v in values.items())
