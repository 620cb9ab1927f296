"""The live atlas as the API serves it, mapped to the API's schemas: a published version with
the catalogue's label corrections laid over it, and the answers the routes give (cell pages,
review queue, suspect labels, feature ranges, SOM hits). What is decided about cells (which
label holds, what to review first, which labels are suspect, where a feature lies) is
decided in `atlas`; this module only shapes those results for HTTP.

`AtlasView` is an immutable snapshot (one atlas version, one state of the corrections log):
a request that holds one keeps a consistent answer while corrections or a new version arrive.
"""

from __future__ import annotations

import io
import threading
import weakref
from pathlib import Path

import numpy as np
from PIL import Image

from api import schemas
from atlas.cell import CellRegion, NoCellFound
from atlas.features import (
    FEATURE_NAMES,
    class_feature_percentiles,
    finite_or_none,
    named_features,
    range_position,
)
from atlas.labels import (
    SUSPECT_NEIGHBOURS,
    Suspect,
    corrected_labels,
    latent_neighbours,
    review_order,
    suspect_labels,
)
from atlas.reference import LoadedAtlas, QueryResult
from atlas.rle import encode_rle
from atlas.scale import region_in_pixels_of
from atlas.store import AtlasStore


class InvalidValue(ValueError):
    """A request value the API cannot use; the message says which and why (answered with 422)."""


class UnknownLabel(InvalidValue):
    """A label that is not one of the atlas's classes; the message lists the valid ones."""


class UnknownNode(LookupError):
    """A SOM node outside the grid."""


class MissingCrop(LookupError):
    """The crop file of an archived cell is not on disk."""


def parse_node(text: str | None) -> tuple[int, int] | None:
    """'ROW,COL' -> (row, col)."""
    if text is None:
        return None
    try:
        row, col = (int(part) for part in text.split(","))
    except ValueError:
        raise InvalidValue(f"node must look like ROW,COL (e.g. 3,4), got {text!r}") from None
    return row, col


def image_url(cell_id: str) -> str:
    return f"/v1/cells/{cell_id}/image"


class AtlasView:
    """One atlas version with corrections applied (the latest correction of a cell wins)."""

    def __init__(self, atlas: LoadedAtlas, corrections: dict[str, str], corrections_stamp: int = 0):
        self.base = atlas
        self.version = atlas.version
        self.corrections_stamp = corrections_stamp
        self.cells = atlas.cells
        self.cell_ids = atlas.cells["cell_id"].to_numpy(dtype=object)
        self.labels, self.corrected = corrected_labels(self.cell_ids, atlas.labels, corrections)
        # Queries of the version with these labels (references, label distribution); the
        # heavy state (index, models) is shared.
        self.atlas = atlas.relabelled(self.labels)
        self._by_id_order, self._sorted_ids = _cell_id_order(atlas)
        self._predicted = self.cells["predicted_label"].to_numpy(dtype=object)
        self._entropy = self.cells["entropy_bits"].to_numpy(float)
        self._flagged = self.cells["flagged"].to_numpy(bool)
        self._feature_ranges: dict | None = None
        self._suspects: list[schemas.SuspectLabel] | None = None
        self._lock = threading.Lock()

    # -- single cells ---------------------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        return self.base.classes

    def check_label(self, label: str) -> str:
        if label not in self.classes:
            raise UnknownLabel(f"unknown label {label!r}; valid labels: {', '.join(self.classes)}")
        return label

    def label_of(self, cell_id: str) -> str | None:
        return self.labels[self.base.position_of(cell_id)]

    def existing_crop_path(self, cell_id: str) -> Path:
        path = self.base.crop_file(cell_id)
        if not path.is_file():
            raise MissingCrop(f"the crop image of cell {cell_id} is missing ({path.name}); "
                              "rebuild the atlas")
        return path

    def summary(self, position: int) -> schemas.CellSummary:
        cell_id = str(self.cell_ids[position])
        row, col = self.base.nodes[position]
        return schemas.CellSummary(
            cell_id=cell_id, label=self.labels[position], predicted_label=self._predicted[position],
            entropy_bits=float(self._entropy[position]), flagged=bool(self._flagged[position]),
            som_node=som_node((int(row), int(col))), image_url=image_url(cell_id),
        )

    def probabilities(self, position: int) -> dict[str, float]:
        """The stored (out-of-fold) class probabilities of an archived cell."""
        stored = self.cells["probabilities"].iat[position]
        return dict(zip(self.classes, (float(p) for p in stored), strict=True))

    def detail(self, cell_id: str) -> schemas.CellDetail:
        position = self.base.position_of(cell_id)
        row = self.cells.iloc[position]
        r0, c0, r1, c1 = (int(v) for v in row["bbox"])
        return schemas.CellDetail(
            **self.summary(position).model_dump(),
            version=self.version,
            original_label=row["label"],
            corrected=bool(self.corrected[position]),
            probabilities=self.probabilities(position),
            features=named_features(row[list(FEATURE_NAMES)]),
            bbox=schemas.BBox(row0=r0, col0=c0, row1=r1, col1=c1),
            source_path=row["source_path"], duplicate_group=row["duplicate_group"],
            split=row["split"], som_distance=float(row["som_distance"]),
            umap=schemas.Point(x=float(row["umap_x"]), y=float(row["umap_y"])),
        )

    # -- pages of cells ---------------------------------------------------------------------
    def list_cells(self, label: str | None, node: tuple[int, int] | None, flagged: bool | None,
                   limit: int, cursor: str | None) -> schemas.CellPage:
        """Cells matching every filter given, in cell_id order, `limit` after `cursor` (the
        last cell_id of the previous page)."""
        keep = np.ones(len(self.cell_ids), bool)
        if label is not None:
            keep &= self.labels == self.check_label(label)
        if node is not None:
            try:
                self.check_node(*node)
            except UnknownNode as error:  # a filter value, not a resource: 422 rather than 404
                raise InvalidValue(str(error)) from None
            keep &= (self.base.nodes[:, 0] == node[0]) & (self.base.nodes[:, 1] == node[1])
        if flagged is not None:
            keep &= self._flagged == flagged
        kept = keep[self._by_id_order]
        ordered = self._by_id_order[kept]
        start = 0 if cursor is None else int(np.searchsorted(self._sorted_ids[kept], cursor,
                                                             "right"))
        page = ordered[start : start + limit]
        more = start + limit < len(ordered)
        return schemas.CellPage(
            items=[self.summary(int(p)) for p in page], total=int(keep.sum()),
            next_cursor=str(self.cell_ids[page[-1]]) if more and len(page) else None,
        )

    def check_node(self, row: int, col: int) -> None:
        rows, cols = self.base.som.rows, self.base.som.cols
        if not (0 <= row < rows and 0 <= col < cols):
            raise UnknownNode(f"node ({row}, {col}) is outside the {rows}x{cols} SOM grid")

    def node_cells(self, row: int, col: int, limit: int) -> schemas.NodeCells:
        """The cells whose best-matching node is (row, col), closest to the node first."""
        self.check_node(row, col)
        nodes, distance = self.base.nodes, self.base.som_distance
        members = np.flatnonzero((nodes[:, 0] == row) & (nodes[:, 1] == col))
        members = members[np.argsort(distance[members], kind="stable")]
        return schemas.NodeCells(
            version=self.version, row=row, col=col, total=len(members),
            cells=[schemas.NodeCell(**self.summary(int(p)).model_dump(),
                                    som_distance=float(distance[p])) for p in members[:limit]],
        )

    def review_queue(self, limit: int, label: str | None = None) -> schemas.ReviewQueue:
        """Uncorrected cells, the most uncertain prediction (highest entropy) first."""
        among = None if label is None else self.labels == self.check_label(label)
        order = review_order(self.cell_ids, self._entropy, self.corrected, among)
        items = [schemas.ReviewItem(**self.summary(int(p)).model_dump(),
                                    probabilities=self.probabilities(int(p)))
                 for p in order[:limit]]
        return schemas.ReviewQueue(version=self.version, remaining=len(order), items=items)

    # -- the map ----------------------------------------------------------------------------
    def hits(self, label: str | None) -> schemas.Hits:
        rows, cols = self.base.som.rows, self.base.som.cols
        counts = np.zeros((rows, cols), np.int64)
        nodes = self.base.nodes
        if label is not None:
            nodes = nodes[self.labels == self.check_label(label)]
        np.add.at(counts, (nodes[:, 0], nodes[:, 1]), 1)
        return schemas.Hits(version=self.version, rows=rows, cols=cols, label=label,
                            total=int(counts.sum()), counts=counts.tolist())

    def projection(self) -> schemas.Projection:
        return schemas.Projection(
            version=self.version, cell_ids=self.cell_ids.astype(str).tolist(),
            x=self.cells["umap_x"].astype(float).tolist(),
            y=self.cells["umap_y"].astype(float).tolist(),
            labels=self.labels.tolist(), flagged=self._flagged.tolist(),
        )

    def label_counts(self) -> dict[str, int]:
        labelled = self.labels[self.labels != None].astype(str)  # noqa: E711 - elementwise
        values, counts = np.unique(labelled, return_counts=True)
        return {str(v): int(c) for v, c in zip(values, counts, strict=True)}

    # -- archive-wide judgements (made by atlas.labels and atlas.features) -------------------
    def suspect_labels(self) -> list[schemas.SuspectLabel]:
        """Uncorrected labelled cells whose label disagrees with the majority (more than half)
        of their SUSPECT_NEIGHBOURS latent reference cells; strongest disagreement first."""
        with self._lock:
            if self._suspects is None:
                neighbours = _latent_neighbours(self.base, SUSPECT_NEIGHBOURS)
                found = suspect_labels(self.cell_ids, self.labels, self.corrected, self._entropy,
                                       neighbours)
                self._suspects = [self._suspect(suspect) for suspect in found]
        return self._suspects

    def _suspect(self, suspect: Suspect) -> schemas.SuspectLabel:
        cell_id = str(self.cell_ids[suspect.position])
        return schemas.SuspectLabel(
            cell_id=cell_id, label=suspect.label, majority_label=suspect.majority_label,
            votes=suspect.votes, k=suspect.k, entropy_bits=suspect.entropy_bits,
            reference_cell_ids=[str(self.cell_ids[p]) for p in suspect.neighbours],
            image_url=image_url(cell_id))

    def feature_ranges(self) -> dict[str, dict[str, list[float]]]:
        """{feature: {class: [p2, p50, p98]}} over the archive's labelled cells, with the
        corrections of this view."""
        with self._lock:
            if self._feature_ranges is None:
                self._feature_ranges = class_feature_percentiles(
                    self.cells, self.labels, self.classes,
                    stored=self.base.files.read_feature_ranges(), stored_labels=self.base.labels)
        return self._feature_ranges

    def feature_positions(self, features: dict[str, float | None]) -> list[schemas.FeaturePosition]:
        """Where each feature value lies against each class's 2nd/50th/98th percentiles."""
        ranges = self.feature_ranges()
        return [
            schemas.FeaturePosition(feature=name, value=value, classes={
                label: schemas.FeatureRange(
                    p2=finite_or_none(p2), p50=finite_or_none(p50), p98=finite_or_none(p98),
                    position=range_position(value, p2, p98))
                for label, (p2, p50, p98) in ranges[name].items()})
            for name, value in features.items()
        ]

    # -- query results ----------------------------------------------------------------------
    def reference_response(self, result: QueryResult, method: str,
                           k: int) -> schemas.ReferenceCellsResponse:
        return schemas.ReferenceCellsResponse(
            version=result.version, method=method, k=k, cell_id=result.cell_id,
            prediction=prediction(result), label_distribution=result.label_distribution,
            som_node=som_node(result.som_node), features=result.features,
            references=[schemas.ReferenceCell(
                cell_id=r.cell_id, label=r.label, distance=r.distance,
                som_node=som_node(r.som_node), image_url=image_url(r.cell_id))
                for r in result.references],
            novelty=novelty(result), timings_ms=result.timings_ms,
        )

    def classify_response(self, result: QueryResult) -> schemas.ClassifyResponse:
        return schemas.ClassifyResponse(
            version=result.version, prediction=prediction(result), features=result.features,
            feature_positions=self.feature_positions(result.features),
            som_node=som_node(result.som_node),
            label_distribution=result.label_distribution, novelty=novelty(result),
            timings_ms=result.timings_ms,
        )


def som_node(node: tuple[int, int]) -> schemas.SomNode:
    return schemas.SomNode(row=node[0], col=node[1])


def prediction(result: QueryResult) -> schemas.Prediction:
    p = result.prediction
    return schemas.Prediction(label=p.label, probabilities=p.probabilities,
                              entropy_bits=p.entropy_bits, flagged=p.flagged,
                              prediction_set=p.prediction_set, coverage=p.coverage)


def novelty(result: QueryResult) -> schemas.Novelty | None:
    n = result.novelty
    return None if n is None else schemas.Novelty(score=n.score, p_value=n.p_value, novel=n.novel, message=n.message)


def drift_report(view: AtlasView) -> schemas.DriftReport:
    """How the cells of the latest `cellatlas add` sat against the archive (atlas.drift), as the
    live version records it; a label rebuild keeps it, a retrained build starts afresh."""
    manifest = view.base.manifest
    drift = manifest.get("drift")
    if not drift:
        return schemas.DriftReport(version=view.version, drift=False, cells=0, share_far=0.0, mean_entropy_bits=None,
                                   share_flagged=0.0, added_in_version=None,
                                   message="no cells added with frozen models since the models were trained")
    return schemas.DriftReport(
        version=view.version, drift=drift["drift"], message=drift["message"], cells=drift["cells"],
        share_far=drift["share_far"], mean_entropy_bits=drift["mean_entropy_bits"],
        share_flagged=drift["share_flagged"], threshold_share=drift["threshold_share"],
        archive_far_distance=drift["archive_far_distance"], by_source=drift["by_source"],
        added_in_version=manifest.get("version") if manifest.get("kind") == "add" else manifest.get("parent_version"))


def atlas_summary(view: AtlasView) -> schemas.AtlasSummary:
    atlas, manifest = view.base, view.base.manifest
    som = manifest.get("som", {})
    return schemas.AtlasSummary(
        version=view.version, built_at=manifest.get("built_at"), classes=view.classes,
        cells=len(view.cells), counts_by_label=view.label_counts(),
        corrected_cells=int(view.corrected.sum()),
        som=schemas.SomSummary(rows=atlas.som.rows, cols=atlas.som.cols,
                               quantization_error=som.get("quantization_error"),
                               topographic_error=som.get("topographic_error")),
        flag_threshold_bits=atlas.classifier.flag_bits_, um_per_pixel=atlas.um_per_pixel,
    )


def versions(home: Path) -> schemas.Versions:
    store = AtlasStore(home)
    current = store.current_version()
    infos = []
    for version in store.list_versions():
        manifest = store.manifest(version)
        infos.append(schemas.VersionInfo(
            version=version, built_at=manifest.get("built_at"),
            cells=manifest.get("inputs", {}).get("cells"),
            classes=manifest.get("classes", []), live=version == current))
    return schemas.Versions(current=current, versions=infos)


def segment_response(shape: tuple[int, ...], regions: list[CellRegion], segmenter,
                     um_per_pixel: float | None = None) -> schemas.SegmentResponse:
    """`regions` reported in the pixels of the uploaded image, of `shape` (each mapped there in
    turn, so that only one region is held at the upload's full size); `um_per_pixel` the
    upload's scale (None: the segmenter's)."""
    if not regions:
        raise NoCellFound("no white cell found in the image")
    cells = []
    for index, region in enumerate(regions):
        region = region_in_pixels_of(region, shape)
        r0, c0, r1, c1 = region.bbox
        centre_row, centre_col = region.nucleus_centre
        cells.append(schemas.SegmentedCell(
            index=index, bbox=schemas.BBox(row0=r0, col0=c0, row1=r1, col1=c1),
            cell_mask=schemas.RLE(**encode_rle(region.cell)),
            nucleus_mask=schemas.RLE(**encode_rle(region.nucleus)),
            cell_area_px=int(region.cell.sum()), nucleus_area_px=int(region.nucleus.sum()),
            nucleus_centre=schemas.Point(x=centre_col, y=centre_row)))
    return schemas.SegmentResponse(width=shape[1], height=shape[0],
                                   segmenter=segmenter.name,
                                   um_per_pixel=um_per_pixel or segmenter.um_per_pixel,
                                   cells=cells)


def u_matrix_png(u_matrix: np.ndarray, scale: int) -> bytes:
    """The U-matrix as a grey PNG, `scale` pixels per node: clusters (close neighbours) light,
    borders between them dark, as MiniSom's examples draw it."""
    u = np.nan_to_num(np.asarray(u_matrix, dtype=float))
    span = float(u.max() - u.min())
    grey = 255 * (1 - (u - u.min()) / span) if span > 0 else np.full(u.shape, 255.0)
    picture = Image.fromarray(grey.astype(np.uint8))
    picture = picture.resize((u.shape[1] * scale, u.shape[0] * scale), Image.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


# -- per loaded version, computed once (a new version is a new LoadedAtlas) ---------------------
_cache_lock = threading.Lock()
_neighbour_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_order_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _cell_id_order(atlas: LoadedAtlas) -> tuple[np.ndarray, np.ndarray]:
    """(positions in cell_id order, the sorted cell ids) of a loaded version."""
    with _cache_lock:
        if atlas not in _order_cache:
            ids = atlas.cells["cell_id"].to_numpy(dtype=str)
            order = np.argsort(ids, kind="stable")
            _order_cache[atlas] = (order, ids[order])
        return _order_cache[atlas]


def _latent_neighbours(atlas: LoadedAtlas, k: int) -> np.ndarray:
    """`atlas.labels.latent_neighbours` of a loaded version's archived cells: they do not
    depend on labels, so every view of the version (one per corrections state) shares them."""
    with _cache_lock:
        cached = _neighbour_cache.get(atlas)
        if cached is None or cached.shape[1] != k:
            cached = _neighbour_cache[atlas] = latent_neighbours(
                atlas.index, atlas.latents, atlas.cells["duplicate_group"], k)
        return cached
