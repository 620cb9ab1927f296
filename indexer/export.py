"""Export of an atlas version so that it can leave CellAtlas: its crops in one folder per
effective label, the table of cells, the corrections log and the masks as COCO run-length
encoding, in a layout that torchvision, FiftyOne and COCO tools read as they are.

    OUT/
      images/<label>/<cell_id>.jpg  the crops under their effective labels: an ImageFolder tree
      unlabelled/<cell_id>.jpg      cells without a label, beside the tree (not a class of it)
      cells.csv | cells.parquet     one row per cell (CELL_COLUMNS), masks as COCO RLE
      corrections.csv | .parquet    the catalogue's corrections log, oldest first
      annotations.json              coco only: COCO instances over the labelled crops
      export.json                   what was exported: atlas, version, format, counts

Effective labels are the catalogue's corrections laid over the version's labels, the latest
correction of a cell winning (`atlas.labels.corrected_labels`), as the API shows them and the
next rebuild will train on. Unlabelled cells stay out of the class tree: torchvision's
ImageFolder and `cellatlas build` take every folder there for a class (FiftyOne's `_unlabeled`
folder would become a class for both); they keep their row in the table.

The formats differ in how the tables are written: `imagefolder` as CSV (a spreadsheet opens
them), `parquet` as Parquet, `coco` as CSV plus `annotations.json`. There the images are the
labelled crops (file_name relative to OUT), each with one annotation of the cell (category =
its effective label, segmentation = the cell mask as uncompressed RLE) and one of its nucleus
(category "nucleus", `parent_id` = the cell's annotation); `cell_id` joins both to the table.
Unlabelled cells are not in it: a crop listed without its cell's annotation would teach a
detector that the cell is background.

The export is written into a hidden folder beside OUT and renamed into place when complete,
so a failed or interrupted export leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from atlas import __version__
from atlas.catalog import CORRECTION_FIELDS, Catalog
from atlas.cell import NUCLEUS
from atlas.labels import corrected_labels
from atlas.progress import progress
from atlas.rle import decode_rle, encode_rle
from atlas.store import AtlasStore
from atlas.version import mask_path

FORMATS = ("imagefolder", "parquet", "coco")
CLASS_TREE = "images"
UNLABELLED = "unlabelled"
CELLS = "cells"
CORRECTIONS = "corrections"
COCO_ANNOTATIONS = "annotations.json"
EXPORT_MANIFEST = "export.json"
NUCLEUS_CATEGORY = "nucleus"
TABLE_SUFFIX = {"imagefolder": ".csv", "parquet": ".parquet", "coco": ".csv"}

CELL_COLUMNS = (
    "cell_id", "label", "folder_label", "corrected", "predicted_label", "entropy_bits", "flagged",
    "som_row", "som_col", "umap_x", "umap_y", "source_path", "box_row0", "box_col0", "box_row1",
    "box_col1", "duplicate_group", "crop_path", "cell_mask_rle", "nucleus_mask_rle",
)


@dataclass
class ExportResult:
    out: Path
    format: str
    version: str
    cells: int
    counts_by_label: dict[str, int]  # labelled cells per effective label, in the class tree
    unlabelled: int  # cells without a label, in `unlabelled/`
    corrections: int  # rows of the exported corrections log
    cells_relabelled: int  # cells whose label a correction set


def export_atlas(home: Path | str, out: Path | str, format: str = "imagefolder",
                 version: str | None = None, show_progress: bool = False) -> ExportResult:
    """Write atlas version `version` (default: the live one) of `home` to the new folder `out`.
    Raises ValueError (unknown format, `out` not empty, a label that cannot name a folder),
    AtlasNotFound (no such atlas or version) or FileNotFoundError (crops missing on disk)."""
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose from {', '.join(FORMATS)}")
    out = Path(out)
    check_out(out)
    store = AtlasStore(home)
    version = version or store.require_current()
    files = store.version(version)
    version_cells = files.read_cells()
    log, corrections = corrections_log(Catalog(home))
    cells = cells_table(version_cells, corrections)
    sources = [files.crop_file(path) for path in version_cells["crop_path"]]
    check_sources(sources, home)

    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        staging.mkdir()
        cells["cell_mask_rle"], cells["nucleus_mask_rle"] = copy_crops(
            sources, cells["crop_path"], staging, show_progress)
        suffix = TABLE_SUFFIX[format]
        write_table(cells, staging / f"{CELLS}{suffix}")
        write_table(log, staging / f"{CORRECTIONS}{suffix}")
        if format == "coco":
            (staging / COCO_ANNOTATIONS).write_text(json.dumps(coco_instances(cells, version)))
        counts = cells["label"].value_counts().sort_index()
        result = ExportResult(
            out=out, format=format, version=version, cells=len(cells),
            counts_by_label={str(label): int(n) for label, n in counts.items()},
            unlabelled=int(cells["label"].isna().sum()), corrections=len(log),
            cells_relabelled=int(cells["corrected"].sum()))
        (staging / EXPORT_MANIFEST).write_text(json.dumps(_manifest(result, home), indent=2))
        os.replace(staging, out)  # an empty `out` is replaced; anything else was refused above
    except BaseException:  # KeyboardInterrupt too: never leave half an export behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return result


def check_out(out: Path) -> None:
    """`out` must be new, or an empty folder: an export never mixes with other files."""
    if out.is_dir() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; give a new folder for the export")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; give a new folder for the export")


def corrections_log(catalog: Catalog) -> tuple[pd.DataFrame, dict[str, str]]:
    """Every correction in the catalogue, oldest first, and the labels they set ({cell_id:
    latest label}), read as of one moment: corrections added meanwhile are left out of both.
    An atlas without a catalogue file has none (and the export does not create one)."""
    columns = list(CORRECTION_FIELDS)
    if not catalog.path.exists():
        return pd.DataFrame(columns=columns), {}
    through, labels = catalog.effective_labels()
    rows, before = [], None
    while page := catalog.corrections(limit=1000, before=before):  # newest first
        rows += page
        before = page[-1]["correction_id"]
    log = pd.DataFrame([row for row in reversed(rows) if row["correction_id"] <= through],
                       columns=columns)
    log["created_at"] = [stamp.isoformat() for stamp in log["created_at"]]
    return log, labels


def cells_table(cells: pd.DataFrame, corrections: dict[str, str]) -> pd.DataFrame:
    """One row per cell of a version's cells table (`AtlasVersion.read_cells`) with its
    effective label and where its crop goes in the export (CELL_COLUMNS but the masks, which
    `copy_crops` adds)."""
    cells = cells.reset_index(drop=True)
    version_labels = [_label_or_none(label) for label in cells["label"]]
    labels, corrected = corrected_labels(cells["cell_id"], version_labels, corrections)
    folder_labels = cells["folder_label"] if "folder_label" in cells else version_labels
    boxes = np.stack(cells["bbox"].to_numpy()).astype(int)
    return pd.DataFrame({
        "cell_id": cells["cell_id"].astype(str),
        "label": pd.Series(labels, dtype=object),
        "folder_label": pd.Series([_label_or_none(label) for label in folder_labels], dtype=object),
        "corrected": corrected,
        "predicted_label": cells["predicted_label"].astype(str),
        "entropy_bits": cells["entropy_bits"].astype(float),
        "flagged": cells["flagged"].astype(bool),
        "som_row": cells["som_row"].astype(int),
        "som_col": cells["som_col"].astype(int),
        "umap_x": cells["umap_x"].astype(float),
        "umap_y": cells["umap_y"].astype(float),
        "source_path": cells["source_path"].astype(str),
        "box_row0": boxes[:, 0], "box_col0": boxes[:, 1],
        "box_row1": boxes[:, 2], "box_col1": boxes[:, 3],
        "duplicate_group": cells["duplicate_group"].astype(str),
        "crop_path": [exported_crop_path(cell_id, label)
                      for cell_id, label in zip(cells["cell_id"], labels)],
    })


def exported_crop_path(cell_id: str, label: str | None) -> str:
    """Where a cell's crop goes, relative to the export folder."""
    if label is None:
        return f"{UNLABELLED}/{cell_id}.jpg"
    if not label or label.startswith(".") or any(c in label for c in "/\\\0"):
        raise ValueError(f"label {label!r} of cell {cell_id} cannot name a folder of the export")
    return f"{CLASS_TREE}/{label}/{cell_id}.jpg"


def check_sources(sources: list[Path], home: Path | str) -> None:
    """Every crop and its mask must be on disk before anything is written."""
    missing = [path for crop in sources for path in (crop, mask_path(crop)) if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"the atlas at {home} is incomplete: {len(missing)} crop or mask files are missing "
            f"(first: {missing[0]}); rebuild it with `cellatlas build`")


def copy_crops(sources: list[Path], targets, folder: Path,
               show_progress: bool) -> tuple[list[str], list[str]]:
    """Copy each crop (its bytes unchanged) to its place under `folder`; returns the cell and
    nucleus masks as COCO RLE, JSON text (what a table cell can hold)."""
    cell_rles, nucleus_rles = [], []
    for source, target in progress(zip(sources, targets), show_progress, total=len(sources),
                                   desc="export", unit="cell"):
        (folder / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, folder / target)
        cell, nucleus = read_masks(source)
        cell_rles.append(json.dumps(encode_rle(cell), separators=(",", ":")))
        nucleus_rles.append(json.dumps(encode_rle(nucleus), separators=(",", ":")))
    return cell_rles, nucleus_rles


def read_masks(crop: Path) -> tuple[np.ndarray, np.ndarray]:
    """(cell, nucleus) boolean masks of a crop, from the label mask saved beside it."""
    with Image.open(mask_path(crop)) as image:
        labels = np.asarray(image.convert("L"))
    return labels > 0, labels == NUCLEUS


def write_table(table: pd.DataFrame, path: Path) -> None:
    if path.suffix == ".parquet":
        table.to_parquet(path, index=False)
    else:
        table.to_csv(path, index=False)


def coco_instances(cells: pd.DataFrame, version: str) -> dict:
    """COCO instances over the labelled crops: per crop one image, one cell annotation (category:
    its label) and one nucleus annotation (category "nucleus", `parent_id`: the cell's)."""
    labelled = cells[cells["label"].notna()]
    classes = sorted(labelled["label"].unique())
    category = {label: i for i, label in enumerate(classes, start=1)}
    nucleus_id = len(classes) + 1
    images, annotations = [], []
    for image_id, row in enumerate(labelled.itertuples(index=False), start=1):
        cell_rle, nucleus_rle = json.loads(row.cell_mask_rle), json.loads(row.nucleus_mask_rle)
        height, width = cell_rle["size"]
        images.append({"id": image_id, "file_name": row.crop_path, "width": width, "height": height,
                       "cell_id": row.cell_id})
        cell_annotation = len(annotations) + 1
        annotations.append(_annotation(cell_annotation, image_id, category[row.label], cell_rle,
                                       row.cell_id))
        annotations.append({**_annotation(cell_annotation + 1, image_id, nucleus_id, nucleus_rle,
                                          row.cell_id),
                            "parent_id": cell_annotation})
    categories = [{"id": i, "name": label, "supercategory": "white_cell"}
                  for label, i in category.items()]
    categories.append({"id": nucleus_id, "name": NUCLEUS_CATEGORY,
                       "supercategory": NUCLEUS_CATEGORY})
    return {
        "info": {"description": f"CellAtlas export of atlas version {version}", "version": version,
                 "contributor": f"CellAtlas {__version__}",
                 "date_created": time.strftime("%Y-%m-%d")},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def _annotation(annotation_id: int, image_id: int, category_id: int, rle: dict,
                cell_id: str) -> dict:
    """One COCO instance annotation; area and box ([x, y, width, height]) from the mask."""
    mask = decode_rle(rle)
    rows, cols = np.nonzero(mask)
    box = ([float(cols.min()), float(rows.min()), float(cols.max() - cols.min() + 1),
            float(rows.max() - rows.min() + 1)] if rows.size else [0.0, 0.0, 0.0, 0.0])
    return {"id": annotation_id, "image_id": image_id, "category_id": category_id,
            "segmentation": rle, "area": float(rows.size), "bbox": box, "iscrowd": 0,
            "cell_id": cell_id}


def _label_or_none(label) -> str | None:
    return None if label is None or label != label else str(label)  # NaN != NaN


def _manifest(result: ExportResult, home: Path | str) -> dict:
    return {"cellatlas": __version__, "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "atlas_home": str(Path(home).resolve()), "atlas_version": result.version,
            "format": result.format, "cells": result.cells,
            "counts_by_label": result.counts_by_label, "unlabelled": result.unlabelled,
            "corrections": result.corrections, "cells_relabelled": result.cells_relabelled}
