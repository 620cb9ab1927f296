"""One owner for the files of a version (AtlasVersion), relative paths, moved and older atlases,
and the Embedder that build, query and evaluation share."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from atlas import version as files_of
from atlas.crop import model_input
from atlas.embedder import Embedder
from atlas.prepare import prepare_cells
from atlas.reference import LoadedAtlas
from atlas.segmentation import load_segmenter
from atlas.store import AtlasStore
from atlas.synthetic import synthetic_cell
from atlas.version import AtlasVersion, home_relative_crop
from indexer.build import build
from tests.conftest import tiny_config


def test_a_version_holds_every_file_its_owner_names_with_relative_paths(built_atlas):
    home, result = built_atlas
    files = AtlasStore(home).version(result.version)
    for name in (files_of.MANIFEST, files_of.CELLS, files_of.LATENTS, files_of.INDEX, files_of.SOM,
                 files_of.FEATURE_RANGES, files_of.REJECTIONS, files_of.BACKBONE, files_of.VAE_WEIGHTS,
                 files_of.CLASSIFIER, files_of.NOVELTY):
        assert files.path(name).is_file(), name
    stored = pd.read_parquet(files.path(files_of.CELLS))
    assert all(not Path(p).is_absolute() and p.startswith("crops/") for p in stored["crop_path"])
    assert all((home / p).is_file() and files_of.mask_path(home / p).is_file() for p in stored["crop_path"])
    assert all(Path(p).is_absolute() for p in stored["source_path"])  # inputs outside the atlas
    assert files.manifest["segmenter"]["path"] is None  # classical: nothing to copy
    som, u_matrix = files.read_som()
    assert u_matrix.shape == (som.rows, som.cols)
    assert files.read_classifier().flag_bits_ == files.manifest["classifier"]["flag_threshold_bits"]


def test_a_moved_atlas_serves_every_cell_image(synthetic_images, tmp_path, monkeypatch):
    """Built with a relative ATLAS_HOME from one directory, moved whole to another, served from
    a third: every crop is found (before, cells.parquet held paths relative to the first)."""
    (tmp_path / "build-dir").mkdir()
    monkeypatch.chdir(tmp_path / "build-dir")
    build(tiny_config(synthetic_images, Path("atlas-home"), epochs=1, som_epochs=2, vae_epochs=2))
    moved = tmp_path / "elsewhere" / "restored-atlas"
    moved.parent.mkdir()
    shutil.move(str(tmp_path / "build-dir" / "atlas-home"), moved)
    (tmp_path / "serving-dir").mkdir()
    monkeypatch.chdir(tmp_path / "serving-dir")
    assert _every_cell_image_is_served(moved) == 48


def test_an_atlas_written_before_relative_paths_loads_without_a_rebuild(built_atlas, tmp_path, monkeypatch):
    """The format before this redesign: crop paths as the build saw them (absolute, or relative to
    its working directory), the SOM's scaling as latent_mean / latent_std, the classifier's
    classes as a plain list and its threshold in the manifest only. Moved, it still serves."""
    source, result = built_atlas
    legacy = tmp_path / "legacy-home"
    shutil.copytree(source, legacy)
    folder = legacy / "versions" / result.version
    cells = pd.read_parquet(folder / files_of.CELLS)
    fresh = LoadedAtlas.open(source)
    cells["crop_path"] = [f"/srv/old-place/atlas/{p}" if i % 2 else f"atlas/{p}" for i, p in enumerate(cells["crop_path"])]
    cells.to_parquet(folder / files_of.CELLS, index=False)
    with np.load(folder / files_of.SOM) as arrays:
        old = {k: arrays[k] for k in arrays.files if k not in ("mean", "std")}
    np.savez(folder / files_of.SOM, **old, latent_mean=fresh.som.mean_, latent_std=fresh.som.std_)
    sidecar = folder / f"{files_of.CLASSIFIER}.classes.json"
    sidecar.write_text(json.dumps(json.loads(sidecar.read_text())["classes"]))

    monkeypatch.chdir(tmp_path)
    loaded = LoadedAtlas.open(legacy)
    assert loaded.flag_bits == fresh.flag_bits
    np.testing.assert_array_equal(loaded.som.winners(loaded.latents), fresh.som.winners(fresh.latents))
    assert all(loaded.crop_file(cell_id).is_file() for cell_id in loaded.cells["cell_id"])
    assert _every_cell_image_is_served(legacy) == len(cells)


def test_home_relative_crop_keeps_new_paths_and_mends_old_ones():
    assert home_relative_crop("crops/classical/ab/ab12-0.jpg") == "crops/classical/ab/ab12-0.jpg"
    assert home_relative_crop("/srv/atlas/crops/classical/ab/ab12-0.jpg") == "crops/classical/ab/ab12-0.jpg"
    assert home_relative_crop("x/crops/lab/crops/cp-1/ab/ab12-0.jpg") == "crops/cp-1/ab/ab12-0.jpg"


def test_embedder_is_backbone_then_vae_in_any_batch_size_and_survives_a_save(built_atlas, tmp_path):
    home, _ = built_atlas
    embedder = AtlasStore(home).version(AtlasStore(home).require_current()).read_embedder(device="cpu")
    rng = np.random.default_rng(7)
    segmenter = load_segmenter(None)
    crops = [prepare_cells(synthetic_cell(label, rng), segmenter, 0.1)[0].crop
             for label in ("lymphocyte", "monocyte", "neutrophil", "eosinophil", "monocyte")]
    latents = embedder.embed(crops)
    assert latents.shape == (5, embedder.latent_dim)
    by_hand = embedder.vae.transform(embedder.backbone.embed(model_input(crops, embedder.input_size)))
    np.testing.assert_allclose(latents, by_hand, atol=1e-5)
    np.testing.assert_allclose(embedder.embed(crops, batch_size=2), latents, atol=1e-5)
    assert embedder.embed([]).shape == (0, embedder.latent_dim)
    embedder.save(tmp_path / "b.pt", tmp_path / "v.pt")
    again = Embedder.load(tmp_path / "b.pt", tmp_path / "v.pt", device="cpu")
    np.testing.assert_allclose(again.embed(crops), latents, atol=1e-5)


def test_query_and_archive_embed_one_way(built_atlas):
    """An archived cell's stored latent is what the query path computes for its source image."""
    home, _ = built_atlas
    atlas = LoadedAtlas.open(home)
    for position in range(3):
        from atlas.ingest import read_image_bytes

        image = read_image_bytes(Path(atlas.cells["source_path"].iat[position]).read_bytes())
        latent = atlas.embed([atlas.prepare(image).crop])
        np.testing.assert_allclose(latent[0], atlas.latents[position], atol=1e-4)


def test_version_files_of_a_staging_folder_are_written_where_they_will_be_read(tmp_path):
    files = AtlasVersion(tmp_path / "versions" / ".staging-x", tmp_path)
    files.folder.mkdir(parents=True)
    files.write_latents(np.ones((3, 2), np.float32))
    np.testing.assert_array_equal(files.read_latents(), np.ones((3, 2)))
    assert files.crop_file(files_of.crop_path("classical", "abcdef-0")) == tmp_path / "crops/classical/ab/abcdef-0.jpg"


def _every_cell_image_is_served(home: Path) -> int:
    with TestClient(create_app(home, open_access=True)) as client:
        cells = pd.read_parquet(AtlasStore(home).version(AtlasStore(home).require_current()).path(files_of.CELLS))
        for cell_id in cells["cell_id"]:
            response = client.get(f"/v1/cells/{cell_id}/image")
            assert response.status_code == 200, (cell_id, response.text)
            assert response.content[:2] == b"\xff\xd8"  # a JPEG
    return len(cells)


@pytest.fixture(autouse=True)
def _quiet_umap():
    import warnings

    warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)
