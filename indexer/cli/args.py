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
        name, _, number = value.rpartition("=")
        try:
            scale = float(number)
        except ValueError:
            raise ValueError(f"--um-per-pixel must be a number or SET=NUMBER, got {value!r}") from None
        if not scale > 0:
            raise ValueError(f"--um-per-pixel must be positive, got {value!r}")
        if not name and len(values) == 1:
            return scale
        if not name:
            raise ValueError("give --um-per-pixel once as a number, or once per set as SET=NUMBER")
        named[name] = scale
    return named


def read_file(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"image file {path} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a folder; give one image file") from None
