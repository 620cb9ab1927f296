"""Ingest: find the images of an archive folder, read them safely, hash their content.

Layouts: one sub-folder per class (ImageFolder convention) or a flat folder of unlabelled
images (label None). Unreadable, corrupt, empty or oversized files are rejected with a
reason; the build goes on without them.
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}
MAX_PIXELS = 50_000_000  # a smear field is ~1-10 Mpx; beyond this is a mistake or an attack
OBJECT_REPR = re.compile(r"<[^<>]*\bat 0x[0-9a-fA-F]+>")


class IngestError(ValueError):
    """The archive folder cannot be used at all (missing, empty); the message says why."""


class ImageReadError(ValueError):
    """One image cannot be read; the message is the per-file reason."""


@dataclass
class ImageRecord:
    path: Path
    label: str | None


@dataclass
class Rejection:
    path: str
    reason: str


def list_images(root: Path) -> list[ImageRecord]:
    """Image files under `root`: `root/<class>/*` gives labelled records, `root/*` unlabelled."""
    root = Path(root)
    if not root.exists():
        raise IngestError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise IngestError(f"{root} is not a folder; give a folder with one sub-folder per class")
    records = [ImageRecord(p, None) for p in sorted(root.iterdir()) if _is_image(p)]
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        records += [ImageRecord(p, class_dir.name) for p in sorted(class_dir.rglob("*")) if _is_image(p)]
    if not records:
        raise IngestError(
            f"no images found in {root} (looked for {', '.join(sorted(IMAGE_SUFFIXES))} files, "
            "directly or in one sub-folder per class)"
        )
    return records


def read_image_bytes(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode image bytes to RGB uint8, or raise ImageReadError with a clear reason."""
    if not data:
        raise ImageReadError("file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageReadError(
                        f"image is {width}x{height} pixels, more than the {max_pixels:,} allowed")
                image.load()  # decodes fully: truncated files fail here
                return np.asarray(_to_rgb(image))
    except ImageReadError:
        raise
    except UnidentifiedImageError as error:
        # PIL's message names the internal buffer object; the client needs the formats instead.
        raise ImageReadError("not a readable image (not a JPEG, PNG, TIFF or BMP file)") from error
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageReadError(f"not a readable image ({_client_text(error)})") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageReadError(f"corrupt or truncated image ({_client_text(error)})") from error


def _client_text(error: Exception) -> str:
    """A library error's message without object reprs (`<_io.BytesIO object at 0x7f...>`),
    which tell a client nothing and show the server's memory layout."""
    return OBJECT_REPR.sub("the image", str(error)).strip() or type(error).__name__


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit microscopy TIFF
        array = np.asarray(image, dtype=np.float32)
        array = 255 * (array - array.min()) / max(1.0, float(array.max() - array.min()))
        return Image.fromarray(array.astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "P"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        rgba = image.convert("RGBA")
        background.paste(rgba, mask=rgba.split()[-1])
        return background
    return image.convert("RGB")


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")
