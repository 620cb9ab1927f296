"""`cellatlas add`: new images into a new version with the live version's frozen models; copies of
archived cells reported, not added; drift said plainly; bad input refused with nothing changed;
`rebuild --retrain-backbone` retrains on everything archived (added and API-archived cells)."""

from __future__ import annotations

import io
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from atlas.archive import Archive
from atlas.catalog import Catalog
from atlas.reference import LoadedAtlas
from atlas.store import AtlasStore
from atlas.synthetic import CLASSES, synthetic_cell, write_synthetic_archive
from indexer.add import add
from indexer.build import build
from indexer.cli import main
from indexer.rebuild import rebuild
from tests.conftest import home_copy, open_client, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore:n_jobs value .* overridden:UserWarning")


def nudged_copy(source: Path, target: Path) -> None:
    """Another file of the same cell: every pixel moved by at most one grey level."""
    image = np.asarray(Image.open(source).convert("RGB")).astype(np.int16)
    noise = np.random.default_rng(1).integers(-1, 2, image.shape)
    Image.fromarray(np.clip(image + noise, 0, 255).astype(np.uint8)).save(target)


def restained(folder: Path, density_factors=(0.6, 1.0, 1.5)) -> None:
    """Every image of `folder` as under another stain: each channel's optical density scaled."""
    for path in folder.rglob("*.png"):
        image = np.asarray(Image.open(path).convert("RGB")).astype(np.float32)
        density = -np.log(np.clip(image, 1, 255) / 255.0) * np.array(density_factors)
        Image.fromarray(np.clip(255 * np.exp(-density), 0, 255).astype(np.uint8)).save(path)


def state_of(home: Path) -> tuple:
    """What an add must not change when it fails: versions, the live pointer, leftovers."""
    store = AtlasStore(home)
    return (store.list_versions(), store.current_version(), sorted(p.name for p in store.versions.glob(".staging-*")))


@pytest.fixture(scope="module")
def added(built_atlas, tmp_path_factory):
    """The session's tiny atlas with 3 new generated cells per class added (labelled by folder)."""
    root = tmp_path_factory.mktemp("add")
    home = home_copy(built_atlas[0], root)
    new = write_synthetic_archive(root / "new", per_class=3, seed=77)
    result = add(home, new, label_from_folders=True, threads=1, progress=False)
    return home, new, result


def test_add_publishes_a_version_with_the_new_cells_and_frozen_models(added):
    home, new, result = added
    store = AtlasStore(home)
    assert (result.version, store.current_version()) == ("000002", "000002")
    parent, child = store.version("000001"), store.version("000002")
    old, cells = parent.read_cells(), child.read_cells()
    manifest = result.manifest
    assert (manifest["kind"], manifest["parent_version"], manifest["add"]["cells_added"]) == ("add", "000001", 12)
    assert len(cells) == len(old) + 12 == len(child.read_latents()) == child.read_index().size
    assert list(cells["cell_id"][: len(old)]) == list(old["cell_id"])
    np.testing.assert_array_equal(child.read_latents()[: len(old)], parent.read_latents())
    for name in ("models/backbone.pt", "models/vae.pt", "models/classifier.json", "som.npz"):
        assert child.path(name).read_bytes() == parent.path(name).read_bytes(), name
    fresh = cells.iloc[len(old):]
    assert set(fresh["split"]) == {"added"} and sorted(fresh["label"].unique()) == sorted(CLASSES)
    som, _ = child.read_som()
    assert fresh["som_row"].between(0, som.rows - 1).all() and fresh["som_col"].between(0, som.cols - 1).all()
    assert np.isfinite(fresh[["umap_x", "umap_y", "entropy_bits"]].to_numpy(float)).all()
    assert child.read_feature_ranges() is not None
    for step in ("ingest_segment_describe", "embed", "place", "write", "total"):
        assert manifest["timings_s"][step] >= 0, step
    assert manifest["add"]["cells_per_s"] > 0
    assert manifest["drift"]["cells"] == 12 and set(manifest["drift"]["by_source"]) == set(CLASSES)


def test_added_cells_are_references_and_not_their_own_duplicates(added, tmp_path):
    home, new, _ = added
    atlas = LoadedAtlas.open(home)
    fresh = atlas.cells[atlas.cells["split"] == "added"]
    cell_id, source = fresh["cell_id"].iat[0], Path(fresh["source_path"].iat[0])
    assert cell_id not in [r.cell_id for r in atlas.query_cell(cell_id, k=20).references]
    image = np.asarray(Image.open(source).convert("RGB"))
    from atlas.ingest import content_hash
    own = atlas.query_image(image, k=5, image_sha=content_hash(source.read_bytes()))
    assert cell_id not in [r.cell_id for r in own.references]
    nudged_copy(source, tmp_path / "near.png")
    near = atlas.query_image(np.asarray(Image.open(tmp_path / "near.png")), k=5)
    assert near.references[0].cell_id == cell_id


def test_copies_of_archived_cells_are_reported_and_not_added(added, tmp_path):
    home, new, _ = added
    home = home_copy(home, tmp_path)
    cells = AtlasStore(home).version("000002").read_cells()
    exact, near = cells.iloc[0], cells.iloc[len(cells) - 1]  # a built cell, an added one
    folder = tmp_path / "batch"
    (folder / exact["label"]).mkdir(parents=True)
    (folder / near["label"]).mkdir(parents=True, exist_ok=True)
    shutil.copy(exact["source_path"], folder / exact["label"] / "same_file.png")
    nudged_copy(Path(near["source_path"]), folder / near["label"] / "near_copy.png")
    Image.fromarray(synthetic_cell("monocyte", np.random.default_rng(555))).save(folder / "fresh.png")

    result = add(home, folder, label_from_folders=True, threads=1, progress=False)
    report = result.manifest["add"]
    assert report["cells_added"] == 1
    copies = {Path(c["source_path"]).name: c for c in report["copies_of_archived_cells"]}
    assert (copies["same_file.png"]["kind"], copies["same_file.png"]["archived_cell_id"]) == ("exact", exact["cell_id"])
    assert (copies["near_copy.png"]["kind"], copies["near_copy.png"]["archived_cell_id"]) == ("near", near["cell_id"])
    assert copies["near_copy.png"]["bits"] <= 2
    assert len(AtlasStore(home).version(result.version).read_cells()) == len(cells) + 1

    only_copies = tmp_path / "again"
    only_copies.mkdir()
    shutil.copy(folder / "fresh.png", only_copies / "fresh.png")
    before = state_of(home)
    assert main(["add", "--home", str(home), "--images", str(only_copies), "--quiet", "--threads", "1"]) == 2
    assert state_of(home) == before


def test_unlabelled_additions_go_to_the_review_queue(added, tmp_path):
    home = home_copy(added[0], tmp_path)
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    for i, label in enumerate(CLASSES):
        Image.fromarray(synthetic_cell(label, np.random.default_rng(900 + i))).save(folder / f"cell{i}.png")
    before = set(AtlasStore(home).version("000002").read_cells()["cell_id"])
    result = add(home, folder, threads=1, progress=False)
    cells = AtlasStore(home).version(result.version).read_cells()
    fresh = cells[~cells["cell_id"].isin(before)]
    assert len(fresh) >= 4 and fresh["label"].isna().all()
    with open_client(home) as client:
        queue = client.get("/v1/review-queue", params={"limit": 1000}).json()
        assert set(fresh["cell_id"]) <= {item["cell_id"] for item in queue["items"]}
        assert all(client.get(f"/v1/cells/{c}").json()["label"] is None for c in fresh["cell_id"])


@pytest.fixture(scope="module")
def drift_atlas(tmp_path_factory):
    """An atlas of 30 generated cells per class (the drift yardstick needs a few per class)."""
    root = tmp_path_factory.mktemp("drift")
    images = write_synthetic_archive(root / "images", per_class=30, seed=0)
    build(tiny_config(images, root / "home"))
    return root


@pytest.fixture(scope="module")
def drifted(drift_atlas):
    """The drift atlas after two additions: generated cells of its own source, then restained ones."""
    same = write_synthetic_archive(drift_atlas / "same", per_class=5, seed=7)
    stained = write_synthetic_archive(drift_atlas / "stained", per_class=5, seed=8)
    restained(stained)
    home = drift_atlas / "home"
    held_out = add(home, same, threads=1, progress=False).manifest["drift"]
    other = add(home, stained, threads=1, progress=False).manifest["drift"]
    return home, held_out, other


def test_drift_is_flagged_on_another_stain_and_not_on_the_same_source(drifted):
    home, held_out, other = drifted
    assert not held_out["drift"] and held_out["message"].startswith("no drift")
    assert other["drift"] and other["share_far"] > held_out["share_far"]
    assert "cellatlas rebuild --retrain-backbone" in other["message"]
    with open_client(home) as client:
        served = client.get("/v1/atlas/drift").json()
        assert (served["drift"], served["cells"], served["message"]) == (True, other["cells"], other["message"])
        assert set(served["by_source"]) == set(CLASSES)


def test_viewer_header_warns_of_drift(drifted):
    chromium = Path("/usr/bin/chromium")
    playwright = pytest.importorskip("playwright.sync_api")
    if not chromium.exists():
        pytest.skip("the browser check needs Debian's chromium at /usr/bin/chromium")
    import threading

    import uvicorn

    from api.app import create_app

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(drifted[0], open_access=True), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive()
            time.sleep(0.05)
        with playwright.sync_playwright() as browser_driver:
            browser = browser_driver.chromium.launch(executable_path=str(chromium), headless=True,
                                                     args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/#/map")
            banner = page.locator("#drift-banner")
            playwright.expect(banner).to_be_visible(timeout=30_000)
            playwright.expect(banner).to_contain_text("cellatlas rebuild --retrain-backbone")
            browser.close()
    finally:
        server.should_exit = True
        thread.join(10)


def test_bad_input_gives_a_clear_message_and_changes_nothing(added, tmp_path, capsys):
    home = home_copy(added[0], tmp_path)
    before = state_of(home)

    unknown = tmp_path / "unknown"
    (unknown / "blast").mkdir(parents=True)
    Image.fromarray(synthetic_cell("monocyte", np.random.default_rng(1))).save(unknown / "blast" / "a.png")
    assert main(["add", "--home", str(home), "--images", str(unknown), "--label-from-folders", "--quiet"]) == 2
    assert "blast name no class of the atlas" in capsys.readouterr().err

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    assert main(["add", "--home", str(home), "--images", str(corrupt), "--quiet"]) == 2
    assert "none of the 1 images gave a cell" in capsys.readouterr().err

    assert main(["add", "--home", str(home), "--images", str(tmp_path / "missing"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert state_of(home) == before

    empty_home = tmp_path / "empty-home"
    assert main(["add", "--home", str(empty_home), "--images", str(unknown), "--quiet"]) == 2
    assert "no published atlas" in capsys.readouterr().err
    assert not (empty_home / "versions").exists()


def test_retrain_backbone_rebuilds_on_everything_archived(added, tmp_path):
    home = home_copy(added[0], tmp_path)
    atlas = LoadedAtlas.open(home)
    data = io.BytesIO()
    Image.fromarray(synthetic_cell("eosinophil", np.random.default_rng(31))).save(data, format="PNG")
    from atlas.ingest import content_hash, read_image_bytes
    archived = Archive(home).archive_upload(atlas, read_image_bytes(data.getvalue()), content_hash(data.getvalue()),
                                            "eosinophil", "api test", "tech")
    catalog, store = Catalog(home), AtlasStore(home)
    withdrawn, restored = atlas.cells["cell_id"].iat[0], atlas.cells["cell_id"].iat[1]
    catalog.add_withdrawal(withdrawn, "withdraw", "not a cell", "admin", atlas.version)
    catalog.add_withdrawal(restored, "withdraw", "looked blurred", "admin", atlas.version)
    label_rebuild = rebuild(home, progress=False, threads=1)  # folds the archived cell, drops both
    assert {withdrawn, restored}.isdisjoint(store.version(label_rebuild).read_cells()["cell_id"])
    catalog.add_withdrawal(restored, "restore", "sharp enough after all", "admin", label_rebuild)
    parent = store.version(label_rebuild).read_cells()

    version = rebuild(home, retrain_backbone=True, progress=False, threads=1)
    files = store.version(version)
    cells = files.read_cells().set_index("cell_id")
    added_ids = set(store.version(atlas.version).read_cells().query("split == 'added'")["cell_id"])
    assert added_ids <= set(cells.index) and archived.cell_id in cells.index
    assert withdrawn not in cells.index and restored in cells.index
    assert cells.at[archived.cell_id, "label"] == "eosinophil"
    assert set(cells["split"].dropna()) <= {"train", "val"}  # the models trained on all of them
    assert len(cells) == len(parent) + 1
    assert files.path("models/backbone.pt").read_bytes() != store.version(atlas.version).path(
        "models/backbone.pt").read_bytes()
    assert catalog.archived_cells(pending_only=False)[0]["folded_into_version"] == version


def test_an_add_killed_earlier_is_settled_by_the_next_one(added, tmp_path):
    """A job row left 'running' by a killed add (its process gone, the lock free) is given a final
    state by the next add, which holds the lock; the live version is untouched by the dead one."""
    home, _, _ = added
    home = home_copy(home, tmp_path)
    catalog = Catalog(home)
    catalog.start_job("add-deadbeef0000", "add")
    live = AtlasStore(home).current_version()
    folder = tmp_path / "one"
    folder.mkdir()
    Image.fromarray(synthetic_cell("lymphocyte", np.random.default_rng(909))).save(folder / "fresh.png")
    result = add(home, folder, threads=1, progress=False)
    dead = [job for job in catalog.jobs(kind="add", limit=10) if job["job_id"] == "add-deadbeef0000"][0]
    assert dead["state"] == "failed" and "stopped before it finished" in dead["message"]
    assert result.version != live
    assert [job["state"] for job in catalog.jobs(kind="add", state="running")] == []
