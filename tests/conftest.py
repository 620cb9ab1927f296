"""Shared fixtures: a tiny synthetic archive and an atlas built from it once per session."""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest

from atlas.synthetic import write_synthetic_archive

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def tiny_config(images: Path, home: Path, **overrides):
    from indexer.config import BuildConfig

    settings = dict(images=images, home=home, preset="tiny", epochs=2, vae_epochs=5, som_epochs=8,
                    threads=1, progress=False)
    settings.update(overrides)
    return BuildConfig(**settings)


@pytest.fixture(scope="session")
def synthetic_images(tmp_path_factory) -> Path:
    return write_synthetic_archive(tmp_path_factory.mktemp("images"), per_class=12, seed=0)


@pytest.fixture(scope="session")
def built_atlas(synthetic_images, tmp_path_factory):
    from indexer.build import build

    home = tmp_path_factory.mktemp("atlas")
    result = build(tiny_config(synthetic_images, home))
    return home, result


def require_shared(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not found at {path} (it sits beside the repository in ../shared/data)")
    return path


def home_copy(source: Path, tmp_path: Path) -> Path:
    """A copy of an atlas home with its own catalogue, for tests that change state."""
    copy = tmp_path / "home"
    shutil.copytree(source, copy)
    return copy


@contextmanager
def open_client(home: Path):
    """A test client of the app serving `home` without authentication."""
    from fastapi.testclient import TestClient

    from api.app import create_app

    with TestClient(create_app(home, open_access=True)) as client:
        yield client
