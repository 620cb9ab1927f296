"""The on-disk format of a trained segmenter folder, read by the runner and written by training.

A trained segmenter is a folder:
    segmenter.json   scale and cell diameter the network needs, how it was trained, held-out scores
    cell.pt          cellpose weights for the whole white cell
    nucleus.pt       optional: cellpose weights for nuclei (`nucleus_model=True`)

This module knows only the files, not cellpose, so that loading (`atlas.segmentation`), running
(`cellpose_runner.py`), training (`cellpose_training.py`) and scoring (`scoring.py`) can all
read the format without importing each other.
"""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from atlas.files import write_json_atomic

SEGMENTER_FILE = "segmenter.json"  # marks a trained segmenter folder
FORMAT = 1  # of segmenter.json
CELL_WEIGHTS, NUCLEUS_WEIGHTS = "cell.pt", "nucleus.pt"


def require_model_folder(folder: str | Path) -> Path:
    """`folder` as a Path when it exists and holds a segmenter.json; a message saying how to make
    one otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"segmenter model folder {folder} does not exist")
    if not (folder / SEGMENTER_FILE).is_file():
        raise ValueError(f"{folder} is not a segmenter model folder (it has no {SEGMENTER_FILE}); "
                         "make one with 'cellatlas segmenter train'")
    return folder


def read_config(model_dir: Path) -> dict:
    """The folder's segmenter.json, checked: a cellpose segmenter of this FORMAT whose weight
    files are all there."""
    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"segmenter model folder {model_dir} does not exist")
    path = Path(model_dir) / SEGMENTER_FILE
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{model_dir} is not a segmenter model folder (no {SEGMENTER_FILE})") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None
    if config.get("kind") != "cellpose" or config.get("format") != FORMAT:
        raise ValueError(f"{path} is not a cellpose segmenter of format {FORMAT} "
                         f"(kind {config.get('kind')!r}, format {config.get('format')!r})")
    missing = [name for name in weight_files(config.get("nucleus") == "cellpose")
               if not (Path(model_dir) / name).is_file()]
    if missing:
        raise FileNotFoundError(f"segmenter model folder {model_dir} lacks {', '.join(missing)}")
    return config


def write_config(model_dir: Path, config: dict) -> None:
    write_json_atomic(Path(model_dir) / SEGMENTER_FILE, config)


def weight_files(nucleus_model: bool) -> list[str]:
    """The weight files of a folder: the cell network's, and the nucleus network's if trained."""
    return [CELL_WEIGHTS] + ([NUCLEUS_WEIGHTS] if nucleus_model else [])


def weights_sha256(model_dir: Path, nucleus_model: bool) -> str:
    """One hash over the folder's weight files: names the segmenter (`cellpose-<hash[:10]>`)."""
    digest = hashlib.sha256()
    for name in weight_files(nucleus_model):
        digest.update((Path(model_dir) / name).read_bytes())
    return digest.hexdigest()


def cellpose_version() -> str:
    """The installed cellpose's version, recorded with the training."""
    try:
        return version("cellpose")
    except PackageNotFoundError:
        return "unknown"
