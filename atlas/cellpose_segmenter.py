"""Cellpose segmenter: a cellpose network, trained from scratch on white-cell masks, finds every
white cell of an image (one instance per cell, smear fields included); the nucleus inside each
cell is the classical segmenter's nucleus threshold, or a second network's when one was trained.

A trained segmenter is a folder:
    segmenter.json   scale and cell diameter the network needs, how it was trained, held-out scores
    cell.pt          cellpose weights for the whole white cell
    nucleus.pt       optional: cellpose weights for nuclei (`nucleus_model=True`)

Scale. Training reads one or more sets of `images/NNN.png` + `masks/NNN.png` (255 nucleus,
128 cytoplasm, 0 background), each with its own um per pixel, and resamples every set to one
common *model scale*: the one where the training cells' median diameter (in um) spans cellpose's
30 pixels. Inference resamples an image to that scale from the segmenter's um_per_pixel; so the
cell diameter in pixels follows from each acquisition's scale (one pixel diameter averaged over
sets of different scale finds nothing on the smaller ones). Unlike cellpose's default (every
training image scaled by its own cells' size) the network sees real size differences, as at
inference.

Reading and checking images with masks, and scoring a segmenter against them, is in
`atlas/masks.py`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage

from atlas.masks import (
    TrainingDataError,
    cell_diameters_px,
    evaluate_samples,
    find_mask_sets,
    read_mask_sets,
    set_scales,
    split_held_out,
    summary,
)
from atlas.segment import (
    MIN_NUCLEUS_AREA_UM2,
    NUCLEUS,
    REFERENCE_UM_PER_PIXEL,
    SEGMENTER_FILE,
    CellRegion,
    ClassicalSegmenter,
    check_image,
    find_nuclei,
)

FORMAT = 1  # of segmenter.json
DIAM_MEAN_PX = 30.0  # cellpose's object diameter at the network's scale
TRAIN_CROP_PX = 64  # training crops at the model scale: two cell diameters
MIN_CELL_AREA_UM2 = 20.0  # a 5 um disc; anything smaller is a platelet or debris
COARSE_PASS = 0.7  # the second inference pass's scale, relative to the first (see cell_labels)
CELL_WEIGHTS, NUCLEUS_WEIGHTS = "cell.pt", "nucleus.pt"

log = logging.getLogger(__name__)




# -- inference ------------------------------------------------------------------------------
class CellposeSegmenter:
    """Segmenter (see atlas.segment) backed by a folder from `train_segmenter`, for images at
    `um_per_pixel`.

    Every white cell the network finds (at least MIN_CELL_AREA_UM2, holding a white-cell nucleus:
    at least MIN_NUCLEUS_AREA_UM2 of nucleus, see below) is returned, the main cell first: the
    one containing the image centre, else the nearest to it. The nucleus test keeps what the
    network marks in a smear field honest: a crowd of red cells or a platelet clump may look
    like a cell body to a network trained on single-cell crops, but holds no blue chromatin. Cells cut by the image
    border are kept: a single-cell image's cell may fill the frame, and a smear field's cut
    cells are still white cells (BCCD's boxes count them); `CellRegion.bbox` against the image
    size tells who touches the border.

    Fallback: a white cell whose nucleus the classical segmenter finds but no network cell
    covers (half of it or more) is added with the classical segmenter's outline. A network
    trained on single-cell crops of two acquisitions misses some cells of other stains and
    scales (on BCCD's smear fields 14 of 301 white cells; the classical nucleus finds all but
    2); the fallback gives those cells a usable outline instead of losing them.

    The networks load when the segmenter is made, once per process (build workers forked
    afterwards inherit them); inference runs on the CPU. `require_nucleus=False` returns every
    cell the network finds and `fallback=False` only those (for comparisons)."""

    def __init__(self, model_dir: str | Path, um_per_pixel: float = REFERENCE_UM_PER_PIXEL,
                 device: str = "cpu", require_nucleus: bool = True, fallback: bool = True):
        if not um_per_pixel > 0:
            raise ValueError(f"um_per_pixel must be positive, got {um_per_pixel}")
        self.model_dir = Path(model_dir).resolve()
        self.um_per_pixel = float(um_per_pixel)
        self.device = device
        self.require_nucleus = require_nucleus
        self.fallback = fallback
        self.config = read_config(self.model_dir)
        self.name = f"cellpose-{self.config['weights_sha256'][:10]}"
        self.load()

    def load(self) -> None:
        """Load the networks now (once per process); build workers forked later inherit them."""
        _network(self.model_dir / CELL_WEIGHTS, self.device)
        if self.config.get("nucleus") == "cellpose":
            _network(self.model_dir / NUCLEUS_WEIGHTS, self.device)

    @property
    def model_um_per_pixel(self) -> float:
        return float(self.config["model_um_per_pixel"])

    @property
    def cell_diameter_px(self) -> float:
        """The typical white cell's diameter in this segmenter's image pixels."""
        return float(self.config["cell_diameter_um"]) / self.um_per_pixel

    def __getstate__(self) -> dict:  # build workers get the folder, not the network
        return {"model_dir": self.model_dir, "um_per_pixel": self.um_per_pixel, "device": self.device,
                "config": self.config, "name": self.name, "require_nucleus": self.require_nucleus,
                "fallback": self.fallback}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def segment(self, image: np.ndarray, main_only: bool = False) -> list[CellRegion]:
        """Every white cell, the main one first; with `main_only`, the main cell alone.

        `main_only` skips the coarse pass and the fallback (about a third of the time on a
        single-cell image) when the first pass holds a white cell at the image centre: that cell
        is the main one either way, for they only add cells where no first-pass cell lies."""
        check_image(image)
        first = nuclei = None  # the first pass's labels and the lobes, once made
        if main_only:
            first = self._labels_at(image, self._rescale)
            centre = first[image.shape[0] // 2, image.shape[1] // 2]
            if centre:
                nuclei = self.nuclei(image)
                main = self._regions(np.where(give_lobes_whole(first, nuclei) == centre, 1, 0), nuclei)
                if main:
                    return main
        labels = self.cell_labels(image, first)
        if nuclei is None:
            nuclei = self.nuclei(image) if labels.any() else np.zeros(labels.shape, bool)
        labels = give_lobes_whole(labels, nuclei)
        regions = self._regions(labels, nuclei)
        if self.fallback and self._fallback_may_add(labels, nuclei):
            regions += self._missed_cells(image, labels > 0)
        regions.sort(key=lambda r: _distance_to_centre(r.cell))
        return regions[:1] if main_only else regions

    def _regions(self, labels: np.ndarray, nuclei: np.ndarray) -> list[CellRegion]:
        """A region per labelled cell big enough to be a white cell (and, with `require_nucleus`,
        holding enough nucleus)."""
        min_area = MIN_CELL_AREA_UM2 / self.um_per_pixel**2
        min_nucleus = MIN_NUCLEUS_AREA_UM2 / self.um_per_pixel**2
        regions = []
        for index, box in enumerate(ndimage.find_objects(labels), start=1):
            if box is None:
                continue
            window = labels[box] == index
            if window.sum() < min_area:
                continue
            if self.require_nucleus and (nuclei[box] & window).sum() < min_nucleus:
                continue
            cell = np.zeros(labels.shape, bool)
            cell[box] = window
            rows, cols = box
            regions.append(CellRegion(cell=cell, nucleus=nuclei & cell,
                                      bbox=(rows.start, cols.start, rows.stop, cols.stop)))
        return regions

    def _fallback_may_add(self, labels: np.ndarray, nuclei: np.ndarray) -> bool:
        """False when the fallback cannot add a cell: the classical segmenter's nuclei are made of
        `find_nuclei`'s lobes, so when `nuclei` are those lobes and all lie in network cells, every
        classical nucleus is covered. Skipping it saves ~20 of ~300 ms per single-cell image."""
        if self.config.get("nucleus") == "cellpose" or not labels.any():
            return True
        return bool((nuclei & (labels == 0)).any())

    def _missed_cells(self, image: np.ndarray, found: np.ndarray) -> list[CellRegion]:
        """The classical segmenter's cells whose nucleus the network's cells leave (mostly)
        uncovered, limited to the pixels no network cell holds."""
        missed = []
        for region in ClassicalSegmenter(self.um_per_pixel).segment(image):
            if found[region.nucleus].mean() >= 0.5:
                continue
            cell = region.cell & ~found
            if not cell.any():
                continue
            rows, cols = np.nonzero(cell)
            missed.append(CellRegion(cell=cell, nucleus=region.nucleus & cell,
                                     bbox=(int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1)))
        return missed

    def cell_labels(self, image: np.ndarray, first: np.ndarray | None = None) -> np.ndarray:
        """Instance labels (0 background, 1..N cells) at the image's size (`first`: the first
        pass's labels, when already made).

        Cellpose follows its flows at the model scale (resample=False: on CPU 10-40x faster than
        at full size, e.g. 0.16 s instead of 6 s for a 640x480 field); the outlines then come
        from the cell probability upsampled smoothly, not from blocky upsampled labels (on
        wbc_seg's masks the blocky outline alone caps the Dice at 0.95, the smooth one at 0.997).

        Cellpose's flows only hold together for cells near the size it was trained on: a cell
        half as wide again as the training median (a large neutrophil or monocyte, a blast) gets
        flows that fail the flow check, and is lost. So a second pass runs at COARSE_PASS times
        the scale, where such a cell looks typical, and the cells it finds that the first pass
        did not (less than half of them already covered) are added."""
        labels = self._labels_at(image, self._rescale) if first is None else first.copy()
        coarse = self._labels_at(image, self._rescale * COARSE_PASS)
        for index, box in enumerate(ndimage.find_objects(coarse), start=1):
            if box is None:
                continue
            cell = coarse[box] == index
            window = labels[box]
            if (window[cell] > 0).mean() < 0.5:
                window[cell & (window == 0)] = labels.max() + 1
        return labels

    def _labels_at(self, image: np.ndarray, rescale: float) -> np.ndarray:
        masks, flows, _ = _network(self.model_dir / CELL_WEIGHTS, self.device).eval(
            image, channel_axis=-1, normalize=True, rescale=rescale, diameter=None,
            resample=False, flow_threshold=0.4, cellprob_threshold=0.0, min_size=-1,
            # a cell may fill a single-cell image: cellpose drops masks over 40% by default
            max_size_fraction=1.0)
        labels = np.asarray(masks, np.int32)
        if not labels.any():
            return labels
        return refine_labels(labels, self._full_size(flows[2], image), reach=1 / rescale)

    def nuclei(self, image: np.ndarray) -> np.ndarray:
        """Every nucleus lobe in the image (boolean)."""
        if self.config.get("nucleus") == "cellpose":
            _, flows, _ = _network(self.model_dir / NUCLEUS_WEIGHTS, self.device).eval(
                image, channel_axis=-1, normalize=True, rescale=self._rescale, diameter=None,
                resample=False, compute_masks=False)
            return self._full_size(flows[2], image) > 0
        return find_nuclei(image, self.um_per_pixel)

    @staticmethod
    def _full_size(probability: np.ndarray, image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        return cv2.resize(np.asarray(probability, np.float32), (width, height), interpolation=cv2.INTER_LINEAR)

    @property
    def _rescale(self) -> float:
        return self.um_per_pixel / self.model_um_per_pixel


def give_lobes_whole(labels: np.ndarray, lobes: np.ndarray) -> np.ndarray:
    """Cell labels where each nucleus lobe lies whole in the cell holding at least half of it.

    A nucleus belongs inside its cell. The network's outline, drawn at a coarser scale, can cut
    through a lobe, differently for a flipped or rotated copy of the image; the nucleus's
    centre, on which the cell's crop is centred, would move with it (on 60 PBC images and their
    mirror images: 2 main nuclei moved 8-11 pixels, against none with whole lobes). Lobes no
    cell holds half of are left as they are."""
    lobe_labels, count = ndimage.label(lobes)
    if count == 0:
        return labels
    labels = labels.copy()
    for index, box in enumerate(ndimage.find_objects(lobe_labels), start=1):
        lobe = lobe_labels[box] == index
        owners = np.bincount(labels[box][lobe], minlength=2)
        owner = int(np.argmax(owners[1:])) + 1
        if owners[owner] * 2 >= lobe.sum():
            labels[box][lobe] = owner
    return labels


def refine_labels(labels: np.ndarray, probability: np.ndarray, reach: float) -> np.ndarray:
    """Labels upsampled from a coarser scale, with outlines redrawn at full size: a pixel is a
    cell's when the cell probability there is positive and it lies within `reach` pixels (one
    coarse pixel) of that cell's coarse label; holes inside a cell are filled."""
    distance, (rows, cols) = ndimage.distance_transform_edt(labels == 0, return_indices=True)
    refined = np.where((probability > 0) & (distance <= reach), labels[rows, cols], 0).astype(np.int32)
    for index, box in enumerate(ndimage.find_objects(refined), start=1):
        if box is not None:
            window = refined[box]
            window[ndimage.binary_fill_holes(window == index) & (window == 0)] = index
    return refined


def read_config(model_dir: Path) -> dict:
    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"segmenter model folder {model_dir} does not exist")
    path = Path(model_dir) / SEGMENTER_FILE
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{model_dir} is not a segmenter model folder (no {SEGMENTER_FILE})") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None
    if config.get("kind") != "cellpose" or config.get("format") != FORMAT:
        raise ValueError(f"{path} is not a cellpose segmenter of format {FORMAT} "
                         f"(kind {config.get('kind')!r}, format {config.get('format')!r})")
    needed = [CELL_WEIGHTS] + ([NUCLEUS_WEIGHTS] if config.get("nucleus") == "cellpose" else [])
    missing = [name for name in needed if not (Path(model_dir) / name).is_file()]
    if missing:
        raise FileNotFoundError(f"segmenter model folder {model_dir} lacks {', '.join(missing)}")
    return config


_NETWORKS: dict[tuple[str, float, str], object] = {}


def _network(weights: Path, device: str):
    """The cellpose model for a weights file, loaded once per process (and kept across forks)."""
    key = (str(weights), weights.stat().st_mtime, device)
    if key not in _NETWORKS:
        import torch
        from cellpose import models

        warnings.filterwarnings("ignore", message="Sparse invariant checks", category=UserWarning)  # cellpose's dynamics
        logging.getLogger("cellpose.dynamics").setLevel(logging.ERROR)  # "no seeds found": an image without cells
        torch_device = torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")
        _NETWORKS[key] = models.CellposeModel(
            gpu=torch_device.type == "cuda", device=torch_device, pretrained_model=str(weights),
            nchan=3, mkldnn=False)
    return _NETWORKS[key]


def _distance_to_centre(cell: np.ndarray) -> tuple[float, float]:
    """(distance from the image centre to the cell, to the cell's centroid): 0 first when the
    cell covers the centre."""
    rows, cols = np.nonzero(cell)
    centre_r, centre_c = (cell.shape[0] - 1) / 2, (cell.shape[1] - 1) / 2
    distances = np.hypot(rows - centre_r, cols - centre_c)
    return float(distances.min()), float(np.hypot(rows.mean() - centre_r, cols.mean() - centre_c))


def resample(array: np.ndarray, factor: float, labels: bool = False) -> np.ndarray:
    if abs(factor - 1) < 1e-6:
        return array
    height, width = array.shape[:2]
    size = (max(1, int(round(width * factor))), max(1, int(round(height * factor))))
    if labels:
        return cv2.resize(array, size, interpolation=cv2.INTER_NEAREST)
    return cv2.resize(array, size, interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)


# -- training -------------------------------------------------------------------------------
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
    say = _Say(progress)
    sets = find_mask_sets(images_dir, masks_dir)
    scales = set_scales(um_per_pixel, [s.name for s in sets])
    samples, notes = read_mask_sets(sets, scales)
    for note in notes:
        say(f"note: {note}")
    train, held = split_held_out(samples, holdout, seed)
    if not train:
        raise TrainingDataError("no training images left after holding some out")

    diameters = {name: [d * scales[name] for s in train if s.set == name for d in cell_diameters_px(s.mask)]
                 for name in scales}
    all_um = [d for values in diameters.values() for d in values]
    cell_diameter_um = float(np.median(all_um))
    per_set_um = {name: float(np.median(v)) for name, v in diameters.items() if v}
    if len(per_set_um) > 1 and max(per_set_um.values()) > 1.4 * min(per_set_um.values()):
        say(f"warning: the sets' median cell diameters differ a lot ({_fmt_um(per_set_um)}): "
            "check each set's um per pixel")
    model_um_per_pixel = cell_diameter_um / DIAM_MEAN_PX
    say(f"{len(train)} training and {len(held)} held-out images in {len(sets)} set(s); median cell "
        f"diameter {cell_diameter_um:.1f} um ({_fmt_um(per_set_um)}); model scale {model_um_per_pixel:.3f} um/px")

    started = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        data = [_network_input(resample(s.image, s.um_per_pixel / model_um_per_pixel)) for s in train]
        factors = [s.um_per_pixel / model_um_per_pixel for s in train]
        cell_labels = [ndimage.label(resample((s.mask > 0).astype(np.uint8), f, labels=True))[0]
                       for s, f in zip(train, factors)]
        kinds = [("cell", CELL_WEIGHTS, cell_labels)]
        if nucleus_model:
            nucleus_labels = [ndimage.label(resample((s.mask == NUCLEUS).astype(np.uint8), f, labels=True))[0]
                              for s, f in zip(train, factors)]
            kinds.append(("nucleus", NUCLEUS_WEIGHTS, nucleus_labels))
        losses = {}
        for kind, weights, labels in kinds:
            say(f"training the {kind} network: {epochs} epochs on {len(data)} images")
            losses[kind] = _train_network(data, labels, staging / weights, epochs, learning_rate,
                                          batch_size, seed, device, progress)
        training_s = time.perf_counter() - started
        config = {
            "kind": "cellpose", "format": FORMAT, "nucleus": "cellpose" if nucleus_model else "classical",
            "model_um_per_pixel": model_um_per_pixel, "cell_diameter_um": cell_diameter_um,
            "diam_mean_px": DIAM_MEAN_PX,
            "sets": {name: {"um_per_pixel": scales[name],
                            "train_images": sum(s.set == name for s in train),
                            "held_out_images": sum(s.set == name for s in held),
                            "cell_diameter_um": per_set_um.get(name),
                            "cell_diameter_px": per_set_um[name] / scales[name] if name in per_set_um else None}
                     for name in scales},
            "held_out": sorted(f"{s.set}/{s.stem}" for s in held),
            "training": {"epochs": epochs, "crop_px": TRAIN_CROP_PX, "batch_size": batch_size,
                         "learning_rate": learning_rate, "seed": seed, "holdout": holdout,
                         "seconds": round(training_s, 1), "device": device,
                         "final_loss": {k: float(v[-1]) for k, v in losses.items()},
                         "cellpose_version": _cellpose_version(),
                         "images": str(Path(images_dir).resolve()),
                         "masks": str(Path(masks_dir).resolve()) if masks_dir else None,
                         "mask_notes": notes},
            "weights_sha256": _weights_hash(staging, nucleus_model),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        _write_json(staging / SEGMENTER_FILE, config)
        if held:
            say(f"evaluating {len(held)} held-out images")
            rows = []
            for name in scales:  # each set at its own scale
                segmenter = CellposeSegmenter(staging, scales[name], device=device)
                rows += evaluate_samples(segmenter, [s for s in held if s.set == name])
            config["held_out_metrics"] = summary(rows, segmenter)
            _write_json(staging / SEGMENTER_FILE, config)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        for key in [k for k in _NETWORKS if k[0].startswith(str(staging.resolve()))]:
            del _NETWORKS[key]
    return config


def _train_network(data, labels, weights: Path, epochs, learning_rate, batch_size, seed, device, progress):
    import torch
    from cellpose import models, train

    torch.manual_seed(seed)
    np.random.seed(seed)
    torch_device = torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")
    model = models.CellposeModel(gpu=torch_device.type == "cuda", device=torch_device, pretrained_model=False,
                                 nchan=3, diam_mean=DIAM_MEAN_PX, mkldnn=False)
    handler = _progress_handler(progress)
    try:
        with open(os.devnull, "w") as quiet, contextlib.redirect_stderr(sys.stderr if progress else quiet):
            path, train_losses, _ = train.train_seg(  # (its data-preparation progress bars go to stderr)
                model.net, train_data=data, train_labels=labels, channels=None, normalize=True,
                n_epochs=epochs, learning_rate=learning_rate, batch_size=batch_size, bsize=TRAIN_CROP_PX,
                # images are already at the model scale; keep cellpose's +-25% size augmentation
                rescale=False, scale_range=0.5,
                # wbc_seg images hold one cell: cellpose's default (5) would drop them all
                min_train_masks=0, save_path=weights.parent, model_name=weights.stem, save_every=10**9)
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

# -- small helpers --------------------------------------------------------------------------
def _weights_hash(folder: Path, nucleus_model: bool) -> str:
    digest = hashlib.sha256()
    for name in [CELL_WEIGHTS] + ([NUCLEUS_WEIGHTS] if nucleus_model else []):
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()


def _cellpose_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cellpose")
    except PackageNotFoundError:
        return "unknown"


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


def _fmt_um(values: dict[str, float]) -> str:
    return ", ".join(f"{name} {v:.1f} um" for name, v in values.items())


class _Say:
    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(message, file=sys.stderr, flush=True)
