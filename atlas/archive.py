"""The archive between versions: new cells placed with a version's frozen models, copies of
archived cells found, cells archived one at a time (review software's POST /v1/cells) and
withdrawn cells. One implementation for `cellatlas add`, the rebuilds and the API.

A cell archived one at a time is persisted before it is served: the upload (as decoded, lossless) under
ARCHIVE_IMAGES (owned here), its crop where the build puts crops, and a catalogue row holding
its cells-table row and latent, so that a restarted server serves it again without embedding
it. It is `pending` until a version (add, rebuild or build) folds it in. A withdrawal is an
audited catalogue event; a withdrawn cell is left out of every answer at once and out of the
next version; only an explicit restore (another event) brings it back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from atlas.catalog import ArchivedCellExists, Catalog
from atlas.classifier import Predictions, classifier_input
from atlas.dedup import copies_among
from atlas.features import FEATURE_NAMES
from atlas.files import save_image_atomic
from atlas.ingest import read_image_bytes
from atlas.prepare import PreparedCell, prepare_cells
from atlas.projection import place_in_projection
from atlas.reference import LoadedAtlas, WithdrawnCell
from atlas.scale import to_scale
from atlas.segmentation import Segmenter
from atlas.version import crop_path, mask_path

ARCHIVE_IMAGES = "archive/images"  # under ATLAS_HOME: uploads as decoded, <sha256 of the file sent>.png
PROJECTION_NEIGHBOURS = 15  # archived cells that place a new cell on the 2-D map (UMAP's n_neighbors)
ADDED_SPLIT = "added"  # the `split` of cells added with frozen models (no model trained on them)


class CellCopiesArchive(ValueError):
    """An uploaded cell is already archived (the same file, or a near copy of an archived cell)."""

    def __init__(self, copies: list[dict]):
        self.copies = copies
        first = copies[0]
        super().__init__(f"this cell is already archived as {first['archived_cell_id']} "
                         f"({first['kind']} copy); it was not added again")


# -- copies of archived cells -------------------------------------------------------------------
def copies_in_archive(sha256s, ahashes, fine_hashes, archive: pd.DataFrame) -> dict[int, dict]:
    """{new cell i: the archived cell it copies} for new cells that are the same file as an
    archived one (`exact`) or a near copy of one by the dedup rule (`near`, with the bits)."""
    found: dict[int, dict] = {}
    by_sha = dict(zip(archive["source_sha256"], range(len(archive))))
    for i, sha in enumerate(sha256s):
        if sha in by_sha:
            found[i] = _copy(archive, by_sha[sha], "exact", 0)
    archive_hashes = np.array([int(h, 16) for h in archive["ahash"]], dtype=np.uint64)
    new_hashes = np.array([int(h, 16) for h in ahashes], dtype=np.uint64)
    for i, j, bits in copies_among(new_hashes, list(fine_hashes), archive_hashes, list(archive["fine_hash"])):
        found.setdefault(i, _copy(archive, j, "near", bits))
    return found


def _copy(archive: pd.DataFrame, position: int, kind: str, bits: int) -> dict:
    label = archive["label"].iat[position]
    return {"archived_cell_id": str(archive["cell_id"].iat[position]),
            "archived_label": None if pd.isna(label) else str(label), "kind": kind, "bits": int(bits)}


# -- placing new cells with the frozen models ----------------------------------------------------
def placed(cells: pd.DataFrame, latents: np.ndarray, atlas_index, archive_xy: np.ndarray, som,
           classifier) -> tuple[pd.DataFrame, np.ndarray]:
    """New cells (rows with features) with what a version's frozen models give them: best SOM
    node and its distance, a place on the 2-D map among their nearest archived cells, the
    classifier's prediction with entropy and flag. Also returns each one's distance to its
    nearest archived cell (for drift)."""
    distances, neighbours = atlas_index.search(latents, PROJECTION_NEIGHBOURS)
    nodes = som.winners(latents)
    xy = place_in_projection(distances, neighbours, archive_xy)
    predictions = classifier.predict(classifier_input(cells[list(FEATURE_NAMES)].to_numpy(np.float32), latents))
    placed_cells = cells.assign(som_row=nodes[:, 0], som_col=nodes[:, 1], som_distance=som.node_distances(latents),
                                umap_x=xy[:, 0], umap_y=xy[:, 1], **prediction_columns(predictions))
    nearest = distances[:, 0] if distances.shape[1] else np.full(len(latents), np.inf)
    return placed_cells, nearest


def prediction_columns(predictions: Predictions) -> dict:
    """The cells table's columns for the predictions."""
    return {"predicted_label": predictions.labels, "probabilities": list(predictions.probabilities.astype(np.float32)),
            "entropy_bits": predictions.entropy_bits, "flagged": predictions.flagged,
            "prediction_set": [predictions.prediction_set(i) for i in range(len(predictions))]}


def cell_row(cell_id: str, prepared: PreparedCell, source_path: str, sha256: str, label: str | None,
             crop: str) -> dict:
    """One cell's row of the cells table before the models place it (as the build writes it)."""
    r0, c0, r1, c1 = prepared.crop.bbox
    return {"cell_id": cell_id, "source_path": source_path, "source_sha256": sha256,
            "cell_index": prepared.index, "label": label, "bbox": [int(r0), int(c0), int(r1), int(c1)],
            "crop_path": crop, "ahash": f"{prepared.ahash:016x}", "fine_hash": prepared.fine_hash,
            "segment_ms": round(prepared.segment_ms, 2),
            **{name: float(v) for name, v in zip(FEATURE_NAMES, prepared.features)},
            "folder_label": label, "duplicate_group": cell_id, "split": ADDED_SPLIT}


def save_crop(home: Path, segmenter_name: str, cell_id: str, prepared: PreparedCell) -> str:
    """Write a cell's crop and mask where the build puts them (content-addressed: a crop already
    there is the same); returns its path relative to ATLAS_HOME."""
    relative = crop_path(segmenter_name, cell_id)
    target = Path(home) / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        save_image_atomic(Image.fromarray(prepared.crop.image), target, quality=92)
        save_image_atomic(Image.fromarray(prepared.crop.mask), mask_path(target))
    return relative


# -- cells archived one at a time ----------------------------------------------------------------
@dataclass
class DescribedUpload:
    """An uploaded cell prepared, embedded and placed by the live version's models, not yet stored."""

    cell_id: str
    label: str
    image: np.ndarray  # as decoded
    um_per_pixel: float | None  # the decoded image's scale (None: the atlas's)
    prepared: PreparedCell
    row: dict  # its cells-table row
    latent: np.ndarray
    copies: list[dict]  # the archived cells it copies (then it is not stored)


@dataclass
class ArchivedUpload:
    cell_id: str
    label: str
    row: dict  # the cells-table row, placed by the live version's models
    latent: np.ndarray
    created_at: object  # when the catalogue stored it (UTC datetime)


class Archive:
    """The archive's pending cells and withdrawals in the catalogue of ATLAS_HOME `home`."""

    def __init__(self, home: Path | str, catalog: Catalog | None = None):
        self.home = Path(home)
        self.catalog = catalog or Catalog(home)

    # -- archiving ----------------------------------------------------------------------------
    def archive_upload(self, atlas: LoadedAtlas, image: np.ndarray, sha256: str, label: str, source: str | None,
                       author: str, um_per_pixel: float | None = None) -> ArchivedUpload:
        """Archive the main cell of an uploaded image: `describe_upload`, then `store`."""
        return self.store(atlas, self.describe_upload(atlas, image, sha256, label, um_per_pixel), source, author)

    def describe_upload(self, atlas: LoadedAtlas, image: np.ndarray, sha256: str, label: str,
                        um_per_pixel: float | None = None) -> DescribedUpload:
        """The main cell of an uploaded image (decoded; `sha256` of the file as sent,
        `um_per_pixel` the decoded image's scale, None: the atlas's) with its confirmed `label`,
        prepared, embedded and placed by `atlas`'s models, and the archived cells it copies.
        Writes nothing; SegmentationError when the image holds no cell."""
        cell_id = f"{sha256[:16]}-0"
        if cell_id in atlas.withdrawn:  # archiving it again would not undo the withdrawal
            raise WithdrawnCell(atlas.withdrawn[cell_id])
        prepared = atlas.prepare(image, um_per_pixel)
        found = copies_in_archive([sha256], [f"{prepared.ahash:016x}"], [prepared.fine_hash], atlas.cells)
        if not found and cell_id in atlas.position:
            found = {0: _copy(atlas.cells, atlas.position[cell_id], "exact", 0)}
        latent = atlas.embed([prepared.crop])
        row = cell_row(cell_id, prepared, str(self.home / self.image_path(sha256)), sha256, label,
                       crop_path(atlas.segmenter.name, cell_id))
        cells, _ = placed(pd.DataFrame([row]), latent, atlas.index, atlas.cells[["umap_x", "umap_y"]].to_numpy(),
                          atlas.som, atlas.classifier)
        return DescribedUpload(cell_id, label, image, um_per_pixel, prepared, _plain(cells.iloc[0].to_dict()),
                               latent[0], list(found.values()))

    def store(self, atlas: LoadedAtlas, described: DescribedUpload, source: str | None, author: str,
              db=None) -> ArchivedUpload:
        """Persist a described upload: the image and crop on disk, then the catalogue row (a crash
        between the two leaves files no row names, harmless). Raises CellCopiesArchive, storing
        nothing, when it copies an archived cell. `db`: a catalogue connection of `Catalog.once`
        (with an Idempotency-Key)."""
        if described.copies:
            raise CellCopiesArchive(described.copies[:1])
        image_path = self.image_path(described.row["source_sha256"])
        target = self.home / image_path
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            save_image_atomic(Image.fromarray(described.image), target)
        save_crop(self.home, atlas.segmenter.name, described.cell_id, described.prepared)
        try:
            stored = self.catalog.archive_cell(
                described.row, described.latent, source=source, author=author, image_path=image_path,
                um_per_pixel=described.um_per_pixel, embedder=atlas.files.embedder_fingerprint,
                atlas_version=atlas.version, db=db)
        except ArchivedCellExists:  # sent twice at once, or archived and withdrawn since
            raise CellCopiesArchive([{"archived_cell_id": described.cell_id, "archived_label": described.label,
                                      "kind": "exact", "bits": 0}]) from None
        return ArchivedUpload(described.cell_id, described.label, described.row, described.latent,
                              stored["created_at"])

    @staticmethod
    def image_path(sha256: str) -> str:
        """Where an archived upload is kept, relative to ATLAS_HOME (lossless, as decoded)."""
        return f"{ARCHIVE_IMAGES}/{sha256}.png"

    def pending(self, atlas: LoadedAtlas) -> tuple[pd.DataFrame, np.ndarray]:
        """The archived cells `atlas` (a published version) does not hold, as cells-table rows
        and latents ready to lay over it. Their stored latents serve when the version embeds as
        the one that archived them; otherwise they are prepared and embedded again."""
        rows, latents = [], []
        fingerprint = atlas.files.embedder_fingerprint
        for archived in self.catalog.archived_cells(pending_only=True):
            if archived["cell_id"] in atlas.position:
                continue
            if archived["embedder"] == fingerprint:
                rows.append(archived["cell"])
                latents.append(np.asarray(archived["latent"], np.float32))
                continue
            prepared = self.prepared_again(archived, atlas.segmenter, atlas.um_per_pixel)
            latent = atlas.embed([prepared.crop])
            crop = save_crop(self.home, atlas.segmenter.name, archived["cell_id"], prepared)
            row = cell_row(archived["cell_id"], prepared, str(self.home / archived["image_path"]),
                           archived["cell"]["source_sha256"], archived["label"], crop)
            cells, _ = placed(pd.DataFrame([row]), latent, atlas.index, atlas.cells[["umap_x", "umap_y"]].to_numpy(),
                              atlas.som, atlas.classifier)
            rows.append(_plain(cells.iloc[0].to_dict()))
            latents.append(latent[0])
        if not rows:
            return pd.DataFrame(columns=atlas.cells.columns), np.zeros((0, atlas.latents.shape[1]), np.float32)
        return pd.DataFrame(rows), np.stack(latents).astype(np.float32)

    def prepared_again(self, archived: dict, segmenter: Segmenter, um_per_pixel: float) -> PreparedCell:
        """An archived cell prepared anew from its stored upload (for a version whose segmenter
        or models differ from the ones that archived it)."""
        image = read_image_bytes((self.home / archived["image_path"]).read_bytes())
        image = to_scale(image, archived["um_per_pixel"], um_per_pixel)
        return prepare_cells(image, segmenter, um_per_pixel)[0]

    def fold_candidates(self) -> list[dict]:
        """Pending archived cells that are not withdrawn: what the next version folds in."""
        withdrawn = self.withdrawn()
        return [a for a in self.catalog.archived_cells(pending_only=True) if a["cell_id"] not in withdrawn]

    # -- withdrawals --------------------------------------------------------------------------
    def withdrawn(self) -> dict[str, dict]:
        """{cell_id: its withdraw event} of the cells withdrawn now."""
        return self.catalog.withdrawn_cells()

    def applied_to(self, atlas: LoadedAtlas) -> LoadedAtlas:
        """`atlas` (a published version) with the pending archived cells and without the
        withdrawn ones, as the API serves it."""
        added, latents = self.pending(atlas)
        withdrawn = self.withdrawn()
        return atlas.amended(added, latents, {cell_id: withdrawn_message(cell_id, event)
                                              for cell_id, event in withdrawn.items()})

    def withdraw(self, atlas: LoadedAtlas, cell_id: str, reason: str, author: str) -> dict:
        """Withdraw a served cell (one of `atlas`, the live version with its pending cells):
        an audited event; UnknownCell when no such cell is served, WithdrawnCell when it is
        withdrawn already."""
        reason = _reason(reason)
        withdrawn = self.withdrawn()
        if cell_id in withdrawn:
            raise WithdrawnCell(withdrawn_message(cell_id, withdrawn[cell_id]))
        atlas.position_of(cell_id)  # UnknownCell
        return self.catalog.add_withdrawal(cell_id, "withdraw", reason, author, atlas.version)

    def restore(self, atlas: LoadedAtlas, cell_id: str, reason: str, author: str) -> dict:
        """Undo a withdrawal explicitly (a new audited event). A cell the live version holds is
        served again at once; an archived cell a version has left out meanwhile is pending again.
        A build cell left out of a version comes back with the next `rebuild --retrain-backbone`
        (or build of its folder)."""
        reason = _reason(reason)
        if cell_id not in self.withdrawn():
            atlas.position_of(cell_id)  # UnknownCell
            raise NotWithdrawn(f"cell {cell_id} is not withdrawn; there is nothing to restore")
        event = self.catalog.add_withdrawal(cell_id, "restore", reason, author, atlas.version)
        if any(a["cell_id"] == cell_id for a in self.catalog.archived_cells(pending_only=False)):
            self.catalog.mark_pending(cell_id)
        return event


class NotWithdrawn(ValueError):
    """A restore of a cell that is not withdrawn."""


def withdrawn_message(cell_id: str, event: dict) -> str:
    when = event["created_at"].strftime("%Y-%m-%d %H:%M UTC") if event.get("created_at") else "earlier"
    return (f"cell {cell_id} was withdrawn on {when} by {event['author']} ({event['reason']}); "
            "an admin can restore it with POST /v1/cells/{id}/restore")


def _reason(reason: str | None) -> str:
    reason = (reason or "").strip()
    if not reason:
        raise ValueError("a reason is required (why the cell is withdrawn or restored)")
    return reason


def _plain(row: dict) -> dict:
    """A cells-table row as JSON-ready Python values."""
    plain = {}
    for key, value in row.items():
        if isinstance(value, np.ndarray):
            value = value.tolist()
        elif isinstance(value, np.generic):
            value = value.item()
        plain[key] = value
    return plain
