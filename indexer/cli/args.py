"""Command-line values: exit codes and the parsers of numbers, grid shapes, scales and files."""

from __future__ import annotations

import argparse
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def som_shape(text: str | None) -> tuple[int, int] | None:
    """'ROWSxCOLS' -> (rows, cols)."""
    if text is None:
        return None
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--som-shape must look like 20x30, got {text!r}") from None
    if rows < 1 or cols < 1:
        raise ValueError(f"--som-shape must be positive, got {text!r}")
    return rows, cols


def parse_scales(values: list[str] | None) -> float | dict[str, float] | None:
    """--um-per-pixel as given: None, one value for every set, or {set: value}."""
    if not values:
        return None
    named = {}
    for value in values:
        name, scale = _named_scale(value, "SET")
        if not scale > 0:
            raise ValueError(f"--um-per-pixel must be positive, got {value!r}")
        if not name and len(values) == 1:
            return scale
        if not name:
            raise ValueError("give --um-per-pixel once as a number, or once per set as SET=NUMBER")
        named[name] = scale
    return named


def build_scales(values: list[str] | None) -> tuple[float | None, dict[str, float]]:
    """A build's --um-per-pixel: at most one plain X (the atlas's scale and its images') and any
    number of FOLDER=X (the images under that folder, resampled to the atlas's scale)."""
    plain, folders = [], {}
    for value in values or []:
        folder, scale = _named_scale(value, "FOLDER")
        if folder:
            folders[folder] = scale
        else:
            plain.append(scale)
    if len(plain) > 1:
        raise ValueError("give the atlas's --um-per-pixel X once; other folders as FOLDER=X")
    return (plain[0] if plain else None), folders


def _named_scale(value: str, name: str) -> tuple[str, float]:
    """One --um-per-pixel value, X or NAME=X, as (NAME or "", X)."""
    prefix, _, number = value.rpartition("=")
    try:
        return prefix, float(number)
    except ValueError:
        raise ValueError(f"--um-per-pixel must be a number or {name}=NUMBER (um per pixel), got {value!r}") from None


def read_file(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"image file {path} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a folder; give one image file") from None
