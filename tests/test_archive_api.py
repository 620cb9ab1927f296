"""The living archive over HTTP: one confirmed cell archived (POST /v1/cells) is a reference at
once and survives a kill -9 of the server; copies are reported, not added; a withdrawn cell is
never served again until an admin restores it; the next version folds archived cells in and
leaves withdrawn ones out."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from api import server
from api.app import create_app
from atlas import Atlas
from atlas.catalog import Catalog
from atlas.store import AtlasStore
from atlas.synthetic import synthetic_cell
from indexer.rebuild import rebuild
from tests.conftest import home_copy, open_client

pytestmark = pytest.mark.filterwarnings("ignore:n_jobs value .* overridden:UserWarning")

REPO = Path(__file__).resolve().parents[1]


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def nudged(data: bytes) -> bytes:
    """The same picture with every pixel changed by at most one grey level: another file (another
    SHA-256) of the same cell, a near copy."""
    image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)
    noise = np.random.default_rng(0).integers(-1, 2, image.shape)
    return png(np.clip(image + noise, 0, 255).astype(np.uint8))


NEW_CELL = png(synthetic_cell("lymphocyte", np.random.default_rng(4242)))


def archive(client, data: bytes = NEW_CELL, label: str = "lymphocyte", source: str | None = "review station 3",
            **headers):
    form = {"label": label} | ({"source": source} if source else {})
    return client.post("/v1/cells", files={"image": ("cell.png", data, "image/png")}, data=form, headers=headers)


def reference_ids(client, data: bytes, k: int = 5) -> list[str]:
    answer = client.post("/v1/reference-cells", params={"k": k}, files={"image": ("q.png", data, "image/png")})
    assert answer.status_code == 200, answer.text
    return [r["cell_id"] for r in answer.json()["references"]]


@pytest.fixture
def home(built_atlas, tmp_path) -> Path:
    return home_copy(built_atlas[0], tmp_path)


@pytest.fixture
def client(home):
    with open_client(home) as client:
        yield client


def archived_image(built_atlas) -> bytes:
    cells = AtlasStore(built_atlas[0]).version("000001").read_cells()
    return Path(cells["source_path"].iat[0]).read_bytes()


# -- archiving one cell ---------------------------------------------------------------------------
def test_archived_cell_is_a_reference_at_once(client, home):
    total = client.get("/v1/atlas").json()["cells"]
    started = time.perf_counter()
    answer = archive(client)
    assert answer.status_code == 201, answer.text
    cell = answer.json()
    cell_id = cell["cell_id"]
    assert (cell["label"], cell["source"], cell["version"], cell["duplicates"]) == (
        "lymphocyte", "review station 3", "000001", [])
    # A near copy of it (another file) finds it first, within a second of archiving.
    assert reference_ids(client, nudged(NEW_CELL))[0] == cell_id
    assert time.perf_counter() - started < 5  # generous for a loaded test machine; about 0.2 s alone
    # It is a cell of the atlas like the others: page, image, map, queue.
    assert client.get("/v1/atlas").json()["cells"] == total + 1
    detail = client.get(f"/v1/cells/{cell_id}").json()
    assert (detail["label"], detail["split"], detail["version"]) == ("lymphocyte", "added", "000001")
    assert client.get(f"/v1/cells/{cell_id}/image").headers["content-type"] == "image/jpeg"
    assert cell_id in client.get("/v1/atlas/projection").json()["cell_ids"]
    assert cell_id in [c["cell_id"] for c in client.get("/v1/review-queue", params={"limit": 1000}).json()["items"]]
    # Not its own reference: the same upload again skips it (and its duplicates).
    assert cell_id not in client.get(f"/v1/cells/{cell_id}/reference-cells").json()["references"]
    # Persisted: the catalogue row, the upload and the crop under ATLAS_HOME.
    (row,) = Catalog(home).archived_cells()
    assert (row["cell_id"], row["source"], row["folded_into_version"]) == (cell_id, "review station 3", None)
    assert (home / row["image_path"]).is_file() and (home / row["cell"]["crop_path"]).is_file()
    assert len(row["latent"]) == AtlasStore(home).version("000001").read_latents().shape[1]


def test_copies_of_archived_cells_are_reported_and_not_added(client, home, built_atlas):
    first = archive(client).json()["cell_id"]
    total = client.get("/v1/atlas").json()["cells"]
    again = archive(client)  # the same file
    assert again.status_code == 409
    assert again.json()["duplicates"] == [{"archived_cell_id": first, "archived_label": "lymphocyte",
                                           "kind": "exact", "bits": 0}]
    near = archive(client, nudged(NEW_CELL))  # another file of the same cell
    assert near.status_code == 409 and near.json()["duplicates"][0]["kind"] == "near"
    assert near.json()["duplicates"][0]["archived_cell_id"] == first
    build_image = archive(client, archived_image(built_atlas), label="neutrophil")  # in the built version
    assert build_image.status_code == 409 and "already archived" in build_image.json()["detail"]
    assert client.get("/v1/atlas").json()["cells"] == total
    assert [row["cell_id"] for row in Catalog(home).archived_cells()] == [first]


def test_a_retried_archive_with_an_idempotency_key_stores_the_cell_once(client, home):
    first = archive(client, **{"Idempotency-Key": "upload-1"})
    again = archive(client, **{"Idempotency-Key": "upload-1"})
    assert (first.status_code, again.status_code) == (201, 201)
    assert again.json() == first.json() and again.headers["Idempotent-Replayed"] == "true"
    assert len(Catalog(home).archived_cells()) == 1
    other = archive(client, nudged(NEW_CELL), **{"Idempotency-Key": "upload-1"})  # another request, same key
    assert other.status_code == 422


@pytest.mark.parametrize("data, label, code, words", [
    (NEW_CELL, "basophil", 422, "valid labels: eosinophil, lymphocyte, monocyte, neutrophil"),
    (b"\x89PNG\r\n\x1a\n broken", "lymphocyte", 400, "not a readable image"),
    (png(np.full((300, 300, 3), 240, np.uint8)), "lymphocyte", 422, "no white cell"),
])
def test_bad_archive_requests_change_nothing(client, home, data, label, code, words):
    answer = archive(client, data, label=label)
    assert answer.status_code == code and words in answer.json()["detail"]
    assert Catalog(home).archived_cells(pending_only=False) == []
    assert not (home / "archive").exists()


def test_archiving_needs_the_technologist_role(built_atlas, tmp_path):
    home = home_copy(built_atlas[0], tmp_path)
    tokens = {role: server.create_key(str(home), f"{role}-key", role) for role in ("reviewer", "technologist")}
    with TestClient(create_app(home)) as client:
        refused = archive(client, Authorization=f"Bearer {tokens['reviewer']}")
        assert refused.status_code == 403 and "technologist" in refused.json()["detail"]
        made = archive(client, Authorization=f"Bearer {tokens['technologist']}")
        assert made.status_code == 201 and made.json()["author"] == "technologist-key"


# -- withdrawing ----------------------------------------------------------------------------------
def test_withdrawn_cell_is_never_served_again_until_restored(client, home):
    cells = client.get("/v1/cells", params={"limit": 1000}).json()["items"]
    victim = cells[0]["cell_id"]
    neighbour_of = cells[1]["cell_id"]  # k=100: every other cell of the tiny atlas is its reference
    assert victim in [r["cell_id"] for r in client.get(f"/v1/cells/{neighbour_of}/reference-cells",
                                                       params={"k": 100}).json()["references"]]
    missing_reason = client.request("DELETE", f"/v1/cells/{victim}", json={"reason": "  "})
    assert missing_reason.status_code == 422
    gone = client.request("DELETE", f"/v1/cells/{victim}", json={"reason": "smudged slide, not a cell"})
    assert gone.status_code == 200, gone.text
    assert (gone.json()["action"], gone.json()["cell_id"]) == ("withdraw", victim)

    for path in (f"/v1/cells/{victim}", f"/v1/cells/{victim}/image", f"/v1/cells/{victim}/reference-cells"):
        answer = client.get(path)
        assert answer.status_code == 410 and "smudged slide" in answer.json()["detail"], path
    assert victim not in [r["cell_id"] for r in client.get(f"/v1/cells/{neighbour_of}/reference-cells",
                                                           params={"k": 100}).json()["references"]]
    assert victim not in [c["cell_id"] for c in client.get("/v1/cells", params={"limit": 1000}).json()["items"]]
    assert victim not in [c["cell_id"] for c in client.get("/v1/review-queue", params={"limit": 1000}).json()["items"]]
    assert victim not in client.get("/v1/atlas/projection").json()["cell_ids"]
    assert client.get("/v1/atlas").json()["cells"] == len(cells) - 1
    assert victim not in Atlas.open(home).loaded.position  # the Python API and `cellatlas query` too
    again = client.request("DELETE", f"/v1/cells/{victim}", json={"reason": "twice"})
    assert again.status_code == 410
    table = AtlasStore(home).version("000001").read_cells().set_index("cell_id")
    resent = archive(client, Path(table.at[victim, "source_path"]).read_bytes(), label=table.at[victim, "label"])
    assert resent.status_code == 410 and Catalog(home).archived_cells() == []  # not archived around the withdrawal
    assert client.request("DELETE", "/v1/cells/nope-0", json={"reason": "x"}).status_code == 404

    restored = client.post(f"/v1/cells/{victim}/restore", json={"reason": "it was a cell after all"})
    assert restored.status_code == 200 and restored.json()["action"] == "restore"
    assert client.get(f"/v1/cells/{victim}").status_code == 200
    assert client.post(f"/v1/cells/{victim}/restore", json={"reason": "again"}).status_code == 409
    assert [e["action"] for e in Catalog(home).withdrawals(victim)] == ["withdraw", "restore"]


def test_withdrawing_needs_the_admin_role(built_atlas, tmp_path):
    home = home_copy(built_atlas[0], tmp_path)
    token = server.create_key(str(home), "tech", "technologist")
    with TestClient(create_app(home)) as client:
        cell_id = AtlasStore(home).version("000001").read_cells()["cell_id"].iat[0]
        refused = client.request("DELETE", f"/v1/cells/{cell_id}", json={"reason": "x"},
                                 headers={"Authorization": f"Bearer {token}"})
        assert refused.status_code == 403 and "admin" in refused.json()["detail"]
    assert Catalog(home).withdrawals() == []


# -- the next version -----------------------------------------------------------------------------
def test_next_version_folds_archived_cells_and_leaves_withdrawn_out(client, home):
    archived = archive(client).json()["cell_id"]
    withdrawn = client.get("/v1/cells", params={"limit": 1}).json()["items"][0]["cell_id"]
    assert client.request("DELETE", f"/v1/cells/{withdrawn}", json={"reason": "duplicate slide"}).status_code == 200

    version = rebuild(home, progress=False, threads=1)
    files = AtlasStore(home).version(version)
    cells = files.read_cells().set_index("cell_id")
    assert archived in cells.index and withdrawn not in cells.index
    assert cells.at[archived, "label"] == "lymphocyte"
    assert len(files.read_latents()) == len(cells) == files.read_index().size
    assert Catalog(home).archived_cells(pending_only=False)[0]["folded_into_version"] == version
    assert Catalog(home).archived_cells() == []
    # The server moves to the new version: the cell is served from it, once.
    deadline = time.monotonic() + 30
    while client.get("/v1/atlas").json()["version"] != version:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert client.get("/v1/atlas").json()["cells"] == len(cells)
    assert client.get(f"/v1/cells/{archived}").json()["version"] == version
    assert client.get(f"/v1/cells/{withdrawn}").status_code == 410


# -- a crash --------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(home: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "indexer.cli", "serve", "--home", str(home), "--open",
                                "--port", str(port)], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        assert process.poll() is None, "the server exited"
        time.sleep(0.3)
    process.kill()
    raise AssertionError("the server did not become ready")


def test_archived_cell_survives_kill_9_and_restart(home):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    process = start_server(home, port)
    try:
        with httpx.Client(base_url=base, timeout=60) as client:
            cell_id = archive(client).json()["cell_id"]
            assert reference_ids(client, nudged(NEW_CELL))[0] == cell_id
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    process = start_server(home, port)
    try:
        with httpx.Client(base_url=base, timeout=60) as client:
            assert client.get(f"/v1/cells/{cell_id}").json()["label"] == "lymphocyte"
            assert reference_ids(client, nudged(NEW_CELL))[0] == cell_id
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def test_restart_reembeds_cells_archived_under_other_models(client, home):
    """A cell archived on one version and not folded into the next (a version published by a
    job that started before it came) is embedded again by the new version's models."""
    cell_id = archive(client).json()["cell_id"]
    catalog = Catalog(home)
    with catalog.connect() as db:  # as if archived by models that are no longer live
        db.execute("UPDATE archived_cells SET embedder = 'older-models', latent = list_value(0.0)")
    with open_client(home) as fresh:
        assert reference_ids(fresh, nudged(NEW_CELL))[0] == cell_id
        assert pd.notna(fresh.get(f"/v1/cells/{cell_id}").json()["som_node"]["row"])
