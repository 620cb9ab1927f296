"""A published atlas version loaded for queries: adaptive reference cells and predictions.

`LoadedAtlas.open(home)` loads the live version (cells, latents, FAISS index, SOM, models)
through its `AtlasVersion`. The way of one uploaded image: `prepare_cells` (segment, crop,
describe, hash) -> `Embedder.embed` (backbone + VAE latent) -> `CellClassifier.predict`
(label, entropy, flag) and the reference cells. Reference cells come either from the latent
space (the core design's preferred method: the k smallest mean squared errors between VAE
latents) or from the SOM (same node first, by distance to the node, then the nearest nodes on
the grid). A cell never gets itself or its duplicates as references.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from atlas.cell import CellCrop, CellRegion
from atlas.classifier import Prediction, classifier_input
from atlas.features import FEATURE_NAMES, named_features
from atlas.novelty import Novelty
from atlas.prepare import PreparedCell, prepare_cells
from atlas.scale import region_in_pixels_of, to_scale
from atlas.search import LatentIndex
from atlas.store import AtlasStore

METHODS = ("latent", "som")
MAX_K = 100


class UnknownCell(KeyError):
    """No archived cell has this id."""


class WithdrawnCell(LookupError):
    """A cell that has been withdrawn; the message says when, by whom and why."""


@dataclass
class Reference:
    cell_id: str
    label: str | None
    distance: float  # mean squared error between latents
    som_node: tuple[int, int]


@dataclass
class QueryResult:
    version: str
    prediction: Prediction
    features: dict[str, float]
    references: list[Reference]
    label_distribution: dict[str, float]
    som_node: tuple[int, int]
    cell_id: str | None = None  # set when the query is an archived cell
    timings_ms: dict[str, float] = field(default_factory=dict)
    novelty: Novelty | None = None  # None: a version built before novelty was calibrated


class LoadedAtlas:
    def __init__(self, home: Path, version: str):
        self.files = AtlasStore(home).version(version)
        self.files.check_features()
        self.home, self.version = Path(home), version
        self.manifest = self.files.manifest
        self.cells = self.files.read_cells()
        self.latents = self.files.read_latents()
        self.index = self.files.read_index()
        self.som, self.u_matrix = self.files.read_som()
        self.embedder = self.files.read_embedder(device="auto")
        # One blank cell through the models now, so that the first upload does not pay for
        # folding the backbone's batch norms and torch's first pass.
        self.embedder.embed_inputs(np.zeros((1, self.embedder.input_size, self.embedder.input_size, 3), np.uint8))
        self.classifier = self.files.read_classifier()
        self.novelty_scorer = self.files.read_novelty()
        self.classes = list(self.classifier.classes_)
        self.um_per_pixel = self.files.um_per_pixel
        self.segmenter = self.files.read_segmenter()  # the one the version was built with
        self._index_cells()

    def _index_cells(self) -> None:
        """Lookups over `self.cells` (positions, labels, nodes, duplicate groups, source hashes)."""
        self.position = {cell_id: i for i, cell_id in enumerate(self.cells["cell_id"].to_numpy(dtype=object))}
        labels = self.cells["label"].astype(object)
        self.cells["label"] = labels.where(labels.notna(), None)  # unlabelled: None, never NaN
        self.labels = self.cells["label"].to_numpy(dtype=object)
        self.nodes = self.cells[["som_row", "som_col"]].to_numpy().astype(np.int64)
        self.som_distance = self.cells["som_distance"].to_numpy(dtype=np.float64)
        groups = self.cells["duplicate_group"].to_numpy()
        self._group_members = {}  # a plain loop: pandas' groupby-apply took 0.9 s for 7,600 cells
        for position, group in enumerate(groups):
            self._group_members.setdefault(group, []).append(position)
        self._groups = groups
        self._by_sha = dict(zip(self.cells["source_sha256"] + "-" + self.cells["cell_index"].astype(str),
                                range(len(self.cells))))

    @classmethod
    def open(cls, home: Path | str) -> LoadedAtlas:
        return cls(Path(home), AtlasStore(home).require_current())

    # -- the living archive: cells archived and withdrawn since the version was published --------
    withdrawn: dict[str, str] = {}  # withdrawn cell id -> why it is not served (set by `amended`)

    def amended(self, added: pd.DataFrame, added_latents: np.ndarray,
                withdrawn: dict[str, str] | None = None) -> LoadedAtlas:
        """This version serving `added` cells too (cells-table rows with their latents, placed
        by this version's models) and no longer serving the `withdrawn` cells ({cell_id: the
        message a request for it gets}): a new object sharing the models; this one is left as
        it is for the requests holding it."""
        withdrawn = withdrawn or {}
        keep = np.fromiter((cell_id not in withdrawn for cell_id in self.cells["cell_id"].to_numpy(dtype=object)),
                           bool, len(self.cells))
        new = np.fromiter((cell_id not in withdrawn and cell_id not in self.position
                           for cell_id in added["cell_id"].to_numpy(dtype=object)), bool, len(added))
        view = copy.copy(self)
        if keep.all():
            view.cells = pd.concat([self.cells, added[new]], ignore_index=True) if new.any() else self.cells
            view.index = self.index.extended(added_latents[new]) if new.any() else self.index
        else:
            view.cells = pd.concat([self.cells[keep], added[new]], ignore_index=True)
        view.latents = np.concatenate([self.latents[keep], np.asarray(added_latents, np.float32)[new]])
        if not keep.all():
            view.index = LatentIndex.build(view.latents)
        view.withdrawn = dict(withdrawn)
        view._index_cells()
        return view

    @property
    def flag_bits(self) -> float:
        return self.classifier.flag_bits_

    def relabelled(self, labels: np.ndarray) -> LoadedAtlas:
        """This version answering with other labels (e.g. corrections applied): references and
        label distributions carry them; the index, map and models are shared, not copied."""
        if len(labels) != len(self.labels):
            raise ValueError(f"need {len(self.labels)} labels, got {len(labels)}")
        view = copy.copy(self)
        view.labels = np.asarray(labels, dtype=object)
        return view

    def crop_file(self, cell_id: str) -> Path:
        """The absolute path of an archived cell's crop image (it may be missing on disk)."""
        return self.files.crop_file(self.cells["crop_path"].iat[self.position_of(cell_id)])

    def position_of(self, cell_id: str) -> int:
        position = self.position.get(cell_id)
        if position is None:
            if cell_id in self.withdrawn:
                raise WithdrawnCell(self.withdrawn[cell_id])
            raise UnknownCell(cell_id)
        return position

    # -- the pieces -------------------------------------------------------------------------
    def at_atlas_scale(self, image: np.ndarray, um_per_pixel: float | None = None) -> np.ndarray:
        """`image`, taken at `um_per_pixel` (None: the atlas's), resampled to the atlas's scale."""
        return to_scale(image, um_per_pixel, self.um_per_pixel)

    def prepare(self, image: np.ndarray, um_per_pixel: float | None = None) -> PreparedCell:
        """The main cell of `image` (at `um_per_pixel`; None: the atlas's), prepared at the
        atlas's scale as an archived cell was."""
        image = self.at_atlas_scale(image, um_per_pixel)
        return prepare_cells(image, self.segmenter, self.um_per_pixel)[0]

    def segment(self, image: np.ndarray, um_per_pixel: float | None = None) -> list[CellRegion]:
        """Every white cell of `image` (at `um_per_pixel`; None: the atlas's), main cell first,
        found by the version's segmenter at the atlas's scale (the cells a query would see), with
        masks and boxes in `image`'s own pixels."""
        return [region_in_pixels_of(region, image.shape)
                for region in self.segment_at_atlas_scale(image, um_per_pixel)]

    def segment_at_atlas_scale(self, image: np.ndarray,
                               um_per_pixel: float | None = None) -> list[CellRegion]:
        """As `segment`, with masks and boxes left in the atlas's pixels (`region_in_pixels_of`
        maps them to any image of the same field, one at a time)."""
        return self.segmenter.segment(self.at_atlas_scale(image, um_per_pixel))

    def embed(self, crops: list[CellCrop]) -> np.ndarray:
        """VAE latents (the cells' embeddings) of nucleus-centred crops."""
        return self.embedder.embed(crops)

    def predict(self, features: np.ndarray, latent: np.ndarray) -> Prediction:
        return self.classifier.predict(classifier_input(features, latent))[0]

    def excluded_positions(self, position: int) -> set[int]:
        """A cell and the members of its duplicate group."""
        return set(self._group_members[self._groups[position]])

    def reference_cells(self, latent: np.ndarray, k: int = 8, method: str = "latent",
                        exclude: set[int] = frozenset()) -> list[Reference]:
        check_k(k)
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        if method == "latent":
            distances, positions = self.index.search(latent, k + len(exclude))
            picked = [(int(p), float(d)) for p, d in zip(positions[0], distances[0])
                      if p >= 0 and int(p) not in exclude][:k]
        else:
            picked = self._som_neighbours(latent, k, exclude)
        return [Reference(cell_id=str(self.cells["cell_id"].iat[p]), label=self.labels[p], distance=d,
                          som_node=(int(self.nodes[p, 0]), int(self.nodes[p, 1]))) for p, d in picked]

    def label_distribution(self, latent: np.ndarray, n: int = 100, exclude: set[int] = frozenset()) -> dict:
        """Share of each label among the n nearest labelled cells, weighted by 1/(distance + eps)."""
        distances, positions = self.index.search(latent, n + len(exclude))
        weights: dict[str, float] = {}
        used = 0
        for p, d in zip(positions[0], distances[0]):
            if p < 0 or int(p) in exclude or self.labels[p] is None or used >= n:
                continue
            weights[self.labels[p]] = weights.get(self.labels[p], 0.0) + 1.0 / (float(d) + 1e-3)
            used += 1
        total = sum(weights.values()) or 1.0
        return {label: w / total for label, w in sorted(weights.items(), key=lambda kv: -kv[1])}

    def novelty(self, latent: np.ndarray, exclude: set[int] = frozenset(),
                entropy_bits: float | None = None) -> Novelty | None:
        """How unlike the archive (its cells outside `exclude`) one latent is, with the
        classifier's entropy on the cell where the scorer combines the two; None for a version
        built before novelty was calibrated."""
        score = None if self.novelty_scorer is None else self.novelty_scorer.score(self.index, latent, exclude)
        return None if score is None else self.novelty_scorer.novelty(score, entropy_bits)

    def som_node(self, latent: np.ndarray) -> tuple[int, int]:
        row, col = self.som.winners(latent)[0]
        return int(row), int(col)

    # -- whole queries ------------------------------------------------------------------------
    def query_image(self, image: np.ndarray, k: int = 8, method: str = "latent",
                    image_sha: str | None = None, um_per_pixel: float | None = None) -> QueryResult:
        """Reference cells and prediction for the main cell of an image taken at `um_per_pixel`
        (None: the atlas's scale). `image_sha` (the file's SHA-256) lets an uploaded copy of an
        archived image skip itself and its duplicates."""
        check_k(k)
        started = time.perf_counter()
        cell = self.prepare(image, um_per_pixel)
        segmented = time.perf_counter()
        latent = self.embed([cell.crop])
        embedded = time.perf_counter()
        # An uploaded copy of an archived image must not be its own reference.
        own = self._by_sha_position(image_sha)
        result = self._answer(cell.features, latent, k, method, own)
        done = time.perf_counter()
        result.timings_ms = {"segment": 1000 * (segmented - started), "embed": 1000 * (embedded - segmented),
                             "search_classify": 1000 * (done - embedded)}
        return result

    def query_cell(self, cell_id: str, k: int = 8, method: str = "latent") -> QueryResult:
        position = self.position_of(cell_id)
        features = self.cells.loc[position, list(FEATURE_NAMES)].to_numpy(np.float32)
        result = self._answer(features, self.latents[position : position + 1], k, method,
                              self.excluded_positions(position), self.stored_prediction(position))
        result.cell_id = cell_id
        return result

    def stored_prediction(self, position: int) -> Prediction:
        """An archived cell's prediction as stored at build time: out-of-fold for labelled cells,
        i.e. from a classifier that did not see the cell (the final one would be overconfident)."""
        proba = np.asarray(self.cells["probabilities"].iat[position], dtype=np.float64)
        return Prediction(label=self.classes[int(proba.argmax())],
                          probabilities={c: float(p) for c, p in zip(self.classes, proba)},
                          entropy_bits=float(self.cells["entropy_bits"].iat[position]),
                          flagged=bool(self.cells["flagged"].iat[position]),
                          **self._stored_set(position))

    def _stored_set(self, position: int) -> dict:
        """An archived cell's stored prediction set (none in versions built before them)."""
        stored = self.cells["prediction_set"].iat[position] if "prediction_set" in self.cells else None
        calibration = self.classifier.calibration_
        if stored is None or calibration is None or not isinstance(stored, (list, np.ndarray)):
            return {}
        return {"prediction_set": [str(c) for c in stored], "coverage": calibration.coverage}

    def _answer(self, features, latent, k, method, exclude, prediction=None) -> QueryResult:
        prediction = prediction or self.predict(features, latent)
        return QueryResult(
            version=self.version,
            prediction=prediction,
            features=named_features(features),
            references=self.reference_cells(latent, k, method, exclude),
            label_distribution=self.label_distribution(latent, 100, exclude),
            som_node=self.som_node(latent),
            novelty=self.novelty(latent, exclude, prediction.entropy_bits),
        )

    def _by_sha_position(self, image_sha: str | None) -> set[int]:
        if image_sha is None:
            return set()
        position = self._by_sha.get(f"{image_sha}-0")
        return self.excluded_positions(position) if position is not None else set()

    def _som_neighbours(self, latent, k, exclude) -> list[tuple[int, float]]:
        row, col = self.som_node(latent)
        grid_distance = np.hypot(self.nodes[:, 0] - row, self.nodes[:, 1] - col)
        order = np.lexsort((self.som_distance, grid_distance))  # same node first, then nearest nodes
        picked = [int(p) for p in order if int(p) not in exclude][:k]
        mse = ((self.latents[picked] - latent) ** 2).mean(1)
        return list(zip(picked, mse.astype(float).tolist()))


def check_k(k: int) -> None:
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k must be between 1 and {MAX_K}, got {k}")
