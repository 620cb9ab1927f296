import io

import numpy as np
import pytest
from PIL import Image

from atlas.ingest import ImageReadError, IngestError, list_images, read_image_bytes


def _png(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_class_folders_give_labels_and_flat_files_none(tmp_path):
    (tmp_path / "lymphocyte").mkdir()
    (tmp_path / "lymphocyte" / "a.png").write_bytes(_png(np.zeros((40, 40, 3), np.uint8)))
    (tmp_path / "loose.JPG").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not an image")
    records = {r.path.name: r.label for r in list_images(tmp_path)}
    assert records == {"a.png": "lymphocyte", "loose.JPG": None}


def test_missing_and_empty_folders_are_clear_errors(tmp_path):
    with pytest.raises(IngestError, match="does not exist"):
        list_images(tmp_path / "nope")
    with pytest.raises(IngestError, match="no images found"):
        list_images(tmp_path)


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (b"this is text, not an image", "not a readable image"),
])
def test_unreadable_bytes_are_rejected_with_a_reason(data, reason):
    with pytest.raises(ImageReadError, match=reason):
        read_image_bytes(data)


def test_truncated_image_is_rejected():
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(
        buffer, format="JPEG")
    with pytest.raises(ImageReadError, match="corrupt or truncated"):
        read_image_bytes(buffer.getvalue()[:2000])


def test_huge_dimensions_are_rejected_before_decoding():
    with pytest.raises(ImageReadError, match="more than"):
        read_image_bytes(_png(np.zeros((100, 100, 3), np.uint8)), max_pixels=5000)


def test_rgba_and_grey_become_rgb():
    assert read_image_bytes(_png(np.zeros((40, 40, 4), np.uint8))).shape == (40, 40, 3)
    assert read_image_bytes(_png(np.zeros((40, 40), np.uint8))).shape == (40, 40, 3)
