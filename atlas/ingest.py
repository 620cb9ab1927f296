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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}
MAX_PIXELS = 50_000_000  # a smear field is ~1-10 Mpx; beyond this is a mistake or an attack
REDUCIBLE_MODES = {"L", "LA", "RGB", "RGBA", "CMYK"}  # Image.reduce works on them as they are
OBJECT_REPR = re.compile(r"<[^<>]*\bat 0x[0-9a-fA-F]+>")


class IngestError(ValueError):
    """The archive folder cannot be used at all (missing, empty); the message says why."""


class ImageReadError(ValueError):
    """One image cannot be read; the message is the per-file reason."""


@dataclass
class ImageRecord:
    path: Path
    label: str | None
    um_per_pixel: float | None = None  # the image's scale; None: the job's (the atlas's)


@dataclass
class Rejection:
    path: str
    reason: str


def class_folders(root: Path) -> list[Path]:
    """The sub-folders of the image folder `root` that name classes (hidden ones left out), sorted."""
    root = Path(root)
    if not root.exists():
        raise IngestError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise IngestError(f"{root} is not a folder; give a folder with one sub-folder per class")
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def list_images(root: Path) -> list[ImageRecord]:
    """Image files under `root`: `root/<class>/*` gives labelled records, `root/*` unlabelled."""
    root = Path(root)
    folders = class_folders(root)
    records = [ImageRecord(p, None) for p in sorted(root.iterdir()) if _is_image(p)]
    for class_dir in folders:
        records += [ImageRecord(p, class_dir.name) for p in sorted(class_dir.rglob("*")) if _is_image(p)]
    if not records:
        raise IngestError(
            f"no images found in {root} (looked for {', '.join(sorted(IMAGE_SUFFIXES))} files, "
            "directly or in one sub-folder per class)"
        )
    return records


class ImageTooLarge(ImageReadError):
    """An image with more pixels than one upload may be worked on; the message says what is
    allowed and what to do."""


@dataclass
class DecodedImage:
    image: np.ndarray  # RGB uint8, possibly reduced at decode
    size: tuple[int, int]  # (width, height) as the file declares them
    reduction: float = 1.0  # file pixels per decoded pixel along a side (1: full size)


def read_image_bytes(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode image bytes to RGB uint8, or raise ImageReadError with a clear reason."""
    return decode_image(data, max_pixels).image


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS,
                 reduction_for: Callable[[int, int], int] | None = None) -> DecodedImage:
    """Decode image bytes to RGB uint8, reduced at decode by the integer factor that
    `reduction_for(width, height)` gives (called with the header's size, before any pixel is
    decoded; it may raise ImageReadError to refuse the image). A JPEG is reduced inside the
    decoder (`Image.draft`: DCT scaling by 1/2, 1/4 or 1/8, so the full-size image never
    exists), other formats by box averaging (`Image.reduce`) right after decoding. Raises
    ImageReadError with a clear reason (also above `max_pixels`, from the header)."""
    if not data:
        raise ImageReadError("file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > max_pixels:  # a mistake or a decompression bomb: 400
                    raise ImageReadError(
                        f"image is {width}x{height} pixels, more than the {max_pixels:,} allowed")
                factor = max(1, int(reduction_for(width, height))) if reduction_for else 1
                if factor > 1 and image.format == "JPEG":
                    image.draft("RGB", (-(-width // factor), -(-height // factor)))
                image.load()  # decodes fully: truncated files fail here
                remaining = image.size[0] * factor // width  # what draft did not already reduce
                if remaining > 1 and image.mode in REDUCIBLE_MODES:  # before widening to RGB
                    image, remaining = image.reduce(remaining), 1
                rgb = _to_rgb(image)
                if remaining > 1:
                    rgb = rgb.reduce(remaining)
                if min(rgb.size) < 1:
                    raise ImageReadError(f"image is {width}x{height} pixels, too small to read")
                return DecodedImage(np.asarray(rgb), (width, height), width / rgb.size[0])
    except ImageReadError:
        raise
    except UnidentifiedImageError as error:
        # PIL's message names the internal buffer object; the client needs the formats instead.
        raise ImageReadError("not a readable image (not a JPEG, PNG, TIFF or BMP file)") from error
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageReadError(f"not a readable image ({_client_text(error)})") from error
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as error:
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
