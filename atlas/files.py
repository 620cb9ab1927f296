"""Files written so that a reader never sees half of one: write a temporary file, then rename."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_atomic(path: Path | str, data: str | bytes, fsync: bool = True) -> None:
    """Replace `path` with `data` in one step (a crash leaves the old file or the new one)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data.encode() if isinstance(data, str) else data)
        handle.flush()
        if fsync:
            os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path | str, value, default=None) -> None:
    write_atomic(path, json.dumps(value, indent=2, default=default))


def save_image_atomic(image, path: Path | str, **options) -> None:
    """A PIL image as JPEG (`.jpg`) or PNG (anything else), written atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    image.save(tmp, format="JPEG" if path.suffix == ".jpg" else "PNG", **options)
    os.replace(tmp, path)
