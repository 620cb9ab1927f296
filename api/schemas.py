"""Pydantic models of every request and response body of the HTTP API (v1)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

Position = Literal["below", "within", "above"]


class Problem(BaseModel):
    """Every error answer: a sentence that says what was wrong and what to do (some answers add
    fields, such as the running rebuild's `job_id` with a 409)."""

    model_config = ConfigDict(extra="allow")

    detail: str


class FieldError(BaseModel):
    loc: list[str | int] = Field(description="where: body, query, path or header, then the name")
    msg: str
    type: str


class ValidationProblem(Problem):
    """A 422 for a request that does not match the schema: `detail` says it in one sentence,
    `errors` lists each field."""

    errors: list[FieldError]


class SomNode(BaseModel):
    row: int
    col: int


class Point(BaseModel):
    x: float
    y: float


class BBox(BaseModel):
    """A box in image pixels; row1 and col1 are exclusive."""

    row0: int
    col0: int
    row1: int
    col1: int


class Prediction(BaseModel):
    label: str
    probabilities: dict[str, float] = Field(description="calibrated (temperature-scaled) class probabilities")
    entropy_bits: float = Field(description="Shannon entropy of the probabilities; 0 = certain")
    flagged: bool = Field(description="a person should look: the prediction set holds more than one class, "
                                      "or none (atlases built before prediction sets: entropy above the "
                                      "atlas's threshold)")
    prediction_set: list[str] | None = Field(
        None, description="the classes that cannot be ruled out: the true class is in this set `coverage` "
                          "of the time (calibrated class by class); null for atlases built before sets")
    coverage: float | None = Field(None, description="the coverage of `prediction_set`, e.g. 0.99")


class Novelty(BaseModel):
    """How unlike the archive the cell is, against the archive's own cells."""

    score: float = Field(description="mean squared error between the cell's latent and its nearest archived cells'")
    p_value: float = Field(description="share of archived cells at least as far from their own nearest cells")
    novel: bool = Field(description="p_value below the stated level (0.01): nothing close in the archive")
    message: str | None = Field(description="a sentence for the reviewer when novel")


# -- reference cells and classification ------------------------------------------------------
class ReferenceCell(BaseModel):
    cell_id: str
    label: str | None = Field(description="the effective label (the latest correction wins)")
    distance: float = Field(description="mean squared error between latents")
    som_node: SomNode
    image_url: str


class ReferenceCellsResponse(BaseModel):
    version: str
    method: Literal["latent", "som"]
    k: int
    cell_id: str | None = Field(None, description="the archived query cell, when the query is one")
    prediction: Prediction
    label_distribution: dict[str, float] = Field(
        description="share of each label among the 100 nearest cells, weighted by 1/distance")
    som_node: SomNode
    features: dict[str, float | None]
    references: list[ReferenceCell]
    novelty: Novelty | None = Field(None, description="null for atlases built before novelty scores")
    timings_ms: dict[str, float] = {}


class FeatureRange(BaseModel):
    p2: float | None
    p50: float | None
    p98: float | None
    position: Position | None = Field(description="the value against [p2, p98]; null if unknown")


class FeaturePosition(BaseModel):
    feature: str
    value: float | None
    classes: dict[str, FeatureRange]


class ClassifyResponse(BaseModel):
    version: str
    prediction: Prediction
    features: dict[str, float | None]
    feature_positions: list[FeaturePosition]
    som_node: SomNode
    label_distribution: dict[str, float]
    novelty: Novelty | None = Field(None, description="null for atlases built before novelty scores")
    timings_ms: dict[str, float] = {}


# -- segmentation ------------------------------------------------------------------------------
class RLE(BaseModel):
    """COCO uncompressed run-length encoding: column-major runs, starting with zeros."""

    size: tuple[int, int] = Field(description="[height, width]")
    counts: list[int]


class SegmentedCell(BaseModel):
    index: int = Field(description="0 is the main cell (nearest the image centre)")
    bbox: BBox
    cell_mask: RLE
    nucleus_mask: RLE
    cell_area_px: int
    nucleus_area_px: int
    nucleus_centre: Point = Field(description="x = column, y = row, in pixels")


class SegmentResponse(BaseModel):
    width: int
    height: int
    segmenter: str
    um_per_pixel: float
    cells: list[SegmentedCell]


# -- cells ---------------------------------------------------------------------------------------
class CellSummary(BaseModel):
    cell_id: str
    label: str | None = Field(description="the effective label (the latest correction wins)")
    predicted_label: str | None
    entropy_bits: float
    flagged: bool
    som_node: SomNode
    image_url: str


class CellDetail(CellSummary):
    version: str
    original_label: str | None = Field(description="the label the version was built with")
    corrected: bool
    probabilities: dict[str, float]
    features: dict[str, float | None]
    bbox: BBox
    source_path: str
    duplicate_group: str
    split: str | None
    som_distance: float
    umap: Point


class CellPage(BaseModel):
    items: list[CellSummary]
    total: int = Field(description="cells matching the filters, on all pages")
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null at the end")


class ReviewItem(CellSummary):
    probabilities: dict[str, float]


class ReviewQueue(BaseModel):
    version: str
    remaining: int = Field(description="uncorrected cells matching the filter")
    items: list[ReviewItem]


class SuspectLabel(BaseModel):
    cell_id: str
    label: str
    majority_label: str
    votes: int = Field(description="reference cells (of k) carrying the majority label")
    k: int
    entropy_bits: float
    reference_cell_ids: list[str]
    image_url: str


class SuspectLabels(BaseModel):
    version: str
    total: int
    items: list[SuspectLabel]


# -- the map -------------------------------------------------------------------------------------
class SomSummary(BaseModel):
    rows: int
    cols: int
    quantization_error: float | None
    topographic_error: float | None


class AtlasSummary(BaseModel):
    version: str
    built_at: str | None
    classes: list[str]
    cells: int
    counts_by_label: dict[str, int] = Field(description="effective labels, corrections applied")
    corrected_cells: int
    som: SomSummary
    flag_threshold_bits: float
    um_per_pixel: float


class UMatrix(BaseModel):
    version: str
    rows: int
    cols: int
    values: list[list[float]] = Field(description="mean distance of each node to its neighbours")


class NodeCell(CellSummary):
    som_distance: float


class NodeCells(BaseModel):
    version: str
    row: int
    col: int
    total: int
    cells: list[NodeCell]


class Hits(BaseModel):
    version: str
    rows: int
    cols: int
    label: str | None
    total: int
    counts: list[list[int]]


class Projection(BaseModel):
    """The 2-D UMAP projection of every cell, column by column."""

    version: str
    cell_ids: list[str]
    x: list[float]
    y: list[float]
    labels: list[str | None]
    flagged: list[bool]


# -- corrections ---------------------------------------------------------------------------------
class CorrectionRequest(BaseModel):
    label: str = Field(min_length=1, max_length=100)
    note: str | None = Field(None, max_length=2000)


class Correction(BaseModel):
    correction_id: int
    cell_id: str
    old_label: str | None
    new_label: str
    note: str | None
    author: str
    created_at: datetime
    atlas_version: str | None


class CorrectionPage(BaseModel):
    items: list[Correction]
    next_cursor: int | None = Field(description="pass as `cursor` for older corrections")


# -- the living archive: cells archived one at a time, withdrawals, drift -------------------------
class CopyOfArchivedCell(BaseModel):
    archived_cell_id: str
    archived_label: str | None
    kind: Literal["exact", "near"] = Field(description="exact: the same file; near: the dedup rule's hashes agree")
    bits: int = Field(description="64-bit average-hash bits that differ (0 for an exact copy)")


class CellCopiesArchive(Problem):
    """A 409: the uploaded cell is already archived; nothing was added."""

    duplicates: list[CopyOfArchivedCell]


class ArchivedCell(BaseModel):
    cell_id: str
    label: str
    source: str | None
    author: str
    created_at: datetime
    version: str = Field(description="the live version it was laid over; the next add, rebuild or build folds it in")
    image_url: str
    duplicates: list[CopyOfArchivedCell] = Field(
        default_factory=list, description="archived cells it copies: always empty here, a copy is answered with 409")
    prediction: Prediction = Field(description="the live classifier's prediction for it")


class WithdrawalRequest(BaseModel):
    reason: str = Field(min_length=1, max_length=2000, pattern=r"\S", description="why (audited)")


class Withdrawal(BaseModel):
    event_id: int
    cell_id: str
    action: Literal["withdraw", "restore"]
    reason: str
    author: str
    created_at: datetime
    atlas_version: str | None


class DriftMeasures(BaseModel):
    cells: int
    share_far: float = Field(description="share beyond the archive's own 99th-percentile nearest-neighbour distance")
    mean_entropy_bits: float | None
    share_flagged: float


class DriftReport(DriftMeasures):
    version: str
    drift: bool = Field(description="true: retrain the models on the grown archive (rebuild --retrain-backbone)")
    message: str
    added_in_version: str | None = Field(description="the version whose addition this describes")
    threshold_share: float | None = None
    archive_far_distance: float | None = None
    by_source: dict[str, DriftMeasures] = Field(default_factory=dict)


# -- rebuilds ------------------------------------------------------------------------------------
class RebuildRequest(BaseModel):
    retrain_backbone: StrictBool = Field(
        False, description="also retrain the backbone, VAE, index and SOM (a full build on the parent's "
                           "images; much slower). By default only what depends on labels is retrained.")


class RebuildJob(BaseModel):
    job_id: str
    state: Literal["running", "succeeded", "failed"]
    started_at: datetime
    finished_at: datetime | None
    version: str | None = Field(description="the version it published")
    message: str | None = Field(description="why it failed")
    progress: dict | None = Field(description="step, done, total, parent_version, pid")
    url: str


class RebuildJobs(BaseModel):
    items: list[RebuildJob]


# -- versions and health -------------------------------------------------------------------------
class VersionInfo(BaseModel):
    version: str
    built_at: str | None
    cells: int | None
    classes: list[str]
    live: bool


class Versions(BaseModel):
    current: str | None
    versions: list[VersionInfo]


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    status: str
    version: str
