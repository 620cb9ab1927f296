"""CellAtlas from Python, without HTTP: `Atlas.open(home)` and the questions a technologist asks
of an atlas (reference cells, a prediction, the cells of an image, an archived cell's record).

A thin facade over `atlas.reference.LoadedAtlas`: the live version of a home with the
catalogue's label corrections laid over it, as the API and the viewer show it. It is a
snapshot: corrections made or versions published after `open` are seen by opening again.

    from atlas import Atlas

    atlas = Atlas.open("/srv/atlas")
    result = atlas.reference_cells("cell.jpg", k=8)        # QueryResult
    result.prediction.label, [r.cell_id for r in result.references]
    atlas.classify(pil_image).entropy_bits                 # Prediction
    atlas.segment(rgb_array)                               # [CellRegion], main cell first
    atlas.cell(result.references[0].cell_id).label         # ArchivedCell, corrections applied
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from atlas.archive import Archive
from atlas.catalog import Catalog
from atlas.cell import CellRegion, check_image
from atlas.classifier import Prediction
from atlas.features import FEATURE_NAMES, named_features
from atlas.ingest import ImageReadError, content_hash, read_image_bytes
from atlas.labels import corrected_labels
from atlas.reference import LoadedAtlas, QueryResult

ImageInput = str | os.PathLike | bytes | bytearray | memoryview | Image.Image | np.ndarray


@dataclass(frozen=True)
class ArchivedCell:
    """One archived cell of the live version, as a technologist sees it."""

    cell_id: str
    version: str
    label: str | None  # the label that holds: the latest catalogue correction, else the version's
    original_label: str | None  # the version's label, before the catalogue's corrections
    corrected: bool  # whether a catalogue correction set `label`
    prediction: Prediction  # stored at build time, out-of-fold: label, entropy_bits, flagged
    som_node: tuple[int, int]  # (row, col) of its best-matching SOM node
    som_distance: float  # its distance to that node
    crop_path: Path  # the nucleus-centred crop image (absolute; may be missing on disk)
    source_path: Path  # the archive image it was cut from
    bbox: tuple[int, int, int, int]  # row0, col0, row1, col1 (exclusive) in the source image
    duplicate_group: str
    duplicates: list[str]  # the other cells of its duplicate group
    features: dict[str, float]  # morphology and colour, by name


class Atlas:
    """The live version of an atlas home with the catalogue's corrections applied.

    `image` arguments take a file path, the bytes of an image file, a PIL image or an RGB
    uint8 numpy array (H, W, 3). Files, bytes and PIL images are decoded as uploads are
    (`atlas.ingest.read_image_bytes`: the same size limit and messages). A bad image raises
    `ImageReadError` (unreadable, corrupt, too large) or `SegmentationError` (too small, not
    RGB uint8; `NoCellFound` where a query finds no white cell; `ScaleError` for an
    `um_per_pixel` out of range); an unknown cell id raises
    `UnknownCell`.
    """

    def __init__(self, loaded: LoadedAtlas, corrections: dict[str, str]):
        """`loaded`: a version; `corrections`: {cell_id: label} as
        `Catalog.effective_labels` gives them. `Atlas.open` is the usual way in."""
        cell_ids = loaded.cells["cell_id"].to_numpy(dtype=object)
        labels, self._corrected = corrected_labels(cell_ids, loaded.labels, corrections)
        self.loaded = loaded.relabelled(labels)  # for anything this facade does not cover

    @classmethod
    def open(cls, home: str | os.PathLike) -> Atlas:
        """The live version of `home` (`AtlasNotFound` if none is published) with the
        corrections logged in its catalogue so far, the cells archived through the API since it
        was published and without the withdrawn cells (as the API serves it)."""
        catalog = Catalog(home)
        loaded = LoadedAtlas.open(home)
        # A home copied without its catalogue has no corrections; reading must not create one.
        if not catalog.path.exists():
            return cls(loaded, {})
        return cls(Archive(home, catalog).applied_to(loaded), catalog.effective_labels()[1])

    @property
    def version(self) -> str:
        return self.loaded.version

    @property
    def classes(self) -> list[str]:
        return self.loaded.classes

    def __len__(self) -> int:
        return len(self.loaded.cells)

    def __repr__(self) -> str:
        return (f"Atlas({str(self.loaded.home)!r}, version {self.version}, {len(self)} cells, "
                f"{int(self._corrected.sum())} corrected)")

    # -- an image ---------------------------------------------------------------------------
    def reference_cells(self, image: ImageInput, k: int = 8, method: str = "latent",
                        um_per_pixel: float | None = None) -> QueryResult:
        """The k archived cells most like the main cell of `image` (method "latent": nearest VAE
        latents; "som": same SOM node first), with the prediction, the label distribution of
        the nearest 100 and the SOM node. A copy of an archived image file (path or bytes)
        gets neither itself nor its duplicates as references. `um_per_pixel`: the image's
        scale (None: the atlas's); the image is resampled to the atlas's scale first."""
        array, sha = decode_image(image)
        return self.loaded.query_image(array, k=k, method=method, image_sha=sha,
                                       um_per_pixel=um_per_pixel)

    def classify(self, image: ImageInput, um_per_pixel: float | None = None) -> Prediction:
        """The predicted class of the main cell of `image` (at `um_per_pixel`; None: the
        atlas's scale): label, probabilities, entropy in bits and whether it is flagged."""
        array, _ = decode_image(image)
        return self.loaded.query_image(array, k=1, um_per_pixel=um_per_pixel).prediction

    def segment(self, image: ImageInput, um_per_pixel: float | None = None) -> list[CellRegion]:
        """Every white cell of `image` (at `um_per_pixel`; None: the atlas's scale) found by the
        version's segmenter (cell and nucleus masks, box in `image`'s own pixels), the one
        nearest the centre first; empty when there is none."""
        array, _ = decode_image(image)
        return self.loaded.segment(array, um_per_pixel)

    # -- an archived cell -------------------------------------------------------------------
    def reference_cells_of(self, cell_id: str, k: int = 8, method: str = "latent") -> QueryResult:
        """The reference cells of an archived cell (never itself or its duplicates), with its
        stored prediction."""
        return self.loaded.query_cell(cell_id, k=k, method=method)

    def cell(self, cell_id: str) -> ArchivedCell:
        """An archived cell's record."""
        loaded = self.loaded
        position = loaded.position_of(cell_id)
        row = loaded.cells.iloc[position]
        others = sorted(loaded.excluded_positions(position) - {position})
        return ArchivedCell(
            cell_id=cell_id, version=loaded.version, label=loaded.labels[position],
            original_label=row["label"], corrected=bool(self._corrected[position]),
            prediction=loaded.stored_prediction(position),
            som_node=(int(row["som_row"]), int(row["som_col"])),
            som_distance=float(row["som_distance"]), crop_path=loaded.crop_file(cell_id),
            source_path=Path(row["source_path"]), bbox=tuple(int(v) for v in row["bbox"]),
            duplicate_group=str(row["duplicate_group"]),
            duplicates=[str(loaded.cells["cell_id"].iat[p]) for p in others],
            features=named_features(row[list(FEATURE_NAMES)]),
        )


def decode_image(image: ImageInput) -> tuple[np.ndarray, str | None]:
    """(RGB uint8 array, SHA-256 of the file's bytes or None) of any accepted image input."""
    if isinstance(image, np.ndarray):
        check_image(image)
        return image, None
    if isinstance(image, Image.Image):
        # Through the uploads' decoder (16-bit, alpha and palette handling, size limit);
        # TIFF keeps every PIL mode losslessly.
        buffer = io.BytesIO()
        image.save(buffer, format="TIFF")
        return read_image_bytes(buffer.getvalue()), None
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    elif isinstance(image, (str, os.PathLike)):
        data = _file_bytes(Path(image))
    else:
        raise TypeError("image must be a file path, the bytes of an image file, a PIL image or an "
                        f"RGB uint8 numpy array, got {type(image).__name__}")
    return read_image_bytes(data), content_hash(data)


def _file_bytes(path: Path) -> bytes:
    if path.is_dir():
        raise ImageReadError(f"{path} is a folder; give one image file")
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"image file {path} does not exist") from None
