"""Running a trained cellpose segmenter: every white cell of an image, one instance per cell
(smear fields included); the nucleus inside each cell is the classical segmenter's nucleus
threshold, or a second network's when one was trained.

Inference resamples an image from the segmenter's um_per_pixel to the model scale the network
was trained at (why one physical scale: `cellpose_training.py`). The folder's format is in
`model_folder.py`.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage

from atlas.cell import REFERENCE_UM_PER_PIXEL, CellRegion, check_image
from atlas.runtime import resolve_device
from atlas.segmentation.classical import MIN_NUCLEUS_AREA_UM2, ClassicalSegmenter, find_nuclei
from atlas.segmentation.model_folder import CELL_WEIGHTS, NUCLEUS_WEIGHTS, read_config

MIN_CELL_AREA_UM2 = 20.0  # a 5 um disc; anything smaller is a platelet or debris
COARSE_PASS = 0.7  # the second inference pass's scale, relative to the first (see cell_labels)


class CellposeSegmenter:
    """Segmenter (see atlas.segmentation) backed by a folder from `train_segmenter`, for images at
    `um_per_pixel`.

    Every white cell the network finds (at least MIN_CELL_AREA_UM2, holding a white-cell nucleus:
    at least MIN_NUCLEUS_AREA_UM2 of nucleus, see below) is returned, the main cell first: the
    one containing the image centre, else the nearest to it. The nucleus test keeps what the
    network marks in a smear field honest: a crowd of red cells or a platelet clump may look
    like a cell body to a network trained on single-cell crops, but holds no blue chromatin.
    Cells cut by the image border are kept: a single-cell image's cell may fill the frame, and a
    smear field's cut cells are still white cells (BCCD's boxes count them); `CellRegion.bbox`
    against the image size tells who touches the border.

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
        return {"model_dir": self.model_dir, "um_per_pixel": self.um_per_pixel,
                "device": self.device, "config": self.config, "name": self.name,
                "require_nucleus": self.require_nucleus, "fallback": self.fallback}

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
                whole = give_lobes_whole(first, nuclei)
                main = self._regions(np.where(whole == centre, 1, 0), nuclei)
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
            bbox = (int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1)
            missed.append(CellRegion(cell=cell, nucleus=region.nucleus & cell, bbox=bbox))
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
        return cv2.resize(np.asarray(probability, np.float32), (width, height),
                          interpolation=cv2.INTER_LINEAR)

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
    inside = (probability > 0) & (distance <= reach)
    refined = np.where(inside, labels[rows, cols], 0).astype(np.int32)
    for index, box in enumerate(ndimage.find_objects(refined), start=1):
        if box is not None:
            window = refined[box]
            window[ndimage.binary_fill_holes(window == index) & (window == 0)] = index
    return refined


_NETWORKS: dict[tuple[str, float, str], object] = {}


def _network(weights: Path, device: str):
    """The cellpose model for a weights file, loaded once per process (and kept across forks)."""
    key = (str(weights), weights.stat().st_mtime, device)
    if key not in _NETWORKS:
        from cellpose import models

        # quiet cellpose's dynamics: a sparse-tensor warning, and "no seeds found" (no cells)
        warnings.filterwarnings("ignore", message="Sparse invariant checks", category=UserWarning)
        logging.getLogger("cellpose.dynamics").setLevel(logging.ERROR)
        torch_device = resolve_device(device)
        _NETWORKS[key] = models.CellposeModel(
            gpu=torch_device.type == "cuda", device=torch_device, pretrained_model=str(weights),
            nchan=3, mkldnn=False)
    return _NETWORKS[key]


def forget_networks(folder: Path) -> None:
    """Drop the loaded networks whose weights lie in `folder` (a training's staging folder,
    renamed or deleted once training ends)."""
    for key in [k for k in _NETWORKS if k[0].startswith(str(Path(folder).resolve()))]:
        del _NETWORKS[key]


def _distance_to_centre(cell: np.ndarray) -> tuple[float, float]:
    """(distance from the image centre to the cell, to the cell's centroid): 0 first when the
    cell covers the centre."""
    rows, cols = np.nonzero(cell)
    centre_r, centre_c = (cell.shape[0] - 1) / 2, (cell.shape[1] - 1) / 2
    distances = np.hypot(rows - centre_r, cols - centre_c)
    return float(distances.min()), float(np.hypot(rows.mean() - centre_r, cols.mean() - centre_c))
