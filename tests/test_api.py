"""The HTTP API on a tiny generated atlas (built once per session): every endpoint, auth,
label corrections, bad input, version reloads."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from api import server
from api.app import create_app
from api.jobs import rebuild_command
from api.settings import Settings
from atlas.features import FEATURE_NAMES
from atlas.rle import decode_rle, encode_rle
from atlas.synthetic import CLASSES, synthetic_cell
from indexer.build import build
from indexer.config import BuildConfig
from tests.conftest import home_copy, open_client

pytestmark = pytest.mark.filterwarnings("ignore:n_jobs value .* overridden:UserWarning")  # umap, in the build

PER_CLASS = 10
CELLS = PER_CLASS * len(CLASSES)


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def built(tmp_path_factory) -> Path:
    """A published tiny atlas (4 classes x 10 generated cells) and its API keys."""
    from atlas.synthetic import write_synthetic_archive

    root = tmp_path_factory.mktemp("atlas")
    images = write_synthetic_archive(root / "images", per_class=PER_CLASS, seed=0)
    build(BuildConfig(images=images, home=root / "home", preset="tiny", epochs=1, vae_epochs=3,
                      som_epochs=5, threads=1, progress=False))
    return root / "home"


@pytest.fixture(scope="session")
def tokens(built) -> dict[str, str]:
    return {role: server.create_key(str(built), f"{role}-key", role)
            for role in ("reviewer", "technologist", "admin")}


@pytest.fixture(scope="module")
def client(built, tokens):
    """The secured app on the shared atlas. Tests that correct labels use `fresh_client`."""
    with TestClient(create_app(built)) as client:
        yield client


@pytest.fixture
def fresh_home(built, tmp_path) -> Path:
    return home_copy(built, tmp_path)


@pytest.fixture
def fresh_client(fresh_home):
    with open_client(fresh_home) as client:
        yield client


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def reviewer(tokens):
    return auth(tokens["reviewer"])


@pytest.fixture
def technologist(tokens):
    return auth(tokens["technologist"])


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def new_cell_png() -> bytes:
    """A lymphocyte that is not in the archive."""
    return png(synthetic_cell("lymphocyte", np.random.default_rng(123)))


def upload(data: bytes, name: str = "cell.png") -> dict:
    return {"image": (name, data, "image/png")}


def archived_cell(client, headers, label: str = "monocyte") -> dict:
    return client.get("/v1/cells", params={"label": label, "limit": 1}, headers=headers).json()["items"][0]


# -- pure helpers --------------------------------------------------------------------------------
def test_rle_counts_are_column_major_and_start_with_zeros():
    assert encode_rle(np.array([[0, 1], [1, 1]], bool)) == {"size": [2, 2], "counts": [1, 3]}
    assert encode_rle(np.array([[1, 0], [0, 0]], bool)) == {"size": [2, 2], "counts": [0, 1, 3]}
    mask = np.random.default_rng(0).random((7, 5)) > 0.5
    assert np.array_equal(decode_rle(encode_rle(mask)), mask)


def test_settings_read_the_upload_limit_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CELLATLAS_MAX_UPLOAD_MB", "0.5")
    settings = Settings.from_environment(tmp_path, open_access=True)
    assert (settings.home, settings.open_access, settings.max_upload_bytes) == (tmp_path, True, 524288)
    monkeypatch.delenv("CELLATLAS_MAX_UPLOAD_MB")
    assert Settings.from_environment(str(tmp_path)).max_upload_bytes == 20 * 1024 * 1024


def test_rebuilds_run_the_installed_cellatlas_command(tmp_path, monkeypatch):
    script = Path(sys.executable).parent / "cellatlas"
    assert script.is_file()  # the environment the tests run in has the package installed
    assert rebuild_command(tmp_path, "rebuild-1", 7, retrain_backbone=True) == [
        str(script), "rebuild", "--home", str(tmp_path), "--job-id", "rebuild-1", "--lock-fd", "7",
        "--retrain-backbone"]
    fallback = [sys.executable, "-m", "indexer.cli", "rebuild", "--help"]  # it starts the CLI too
    shown = subprocess.run(fallback, capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0 and "--job-id" in shown.stdout, shown.stderr
    python = tmp_path / "bin" / "python"  # a Python with no script beside it: the module
    monkeypatch.setattr(sys, "executable", str(python))
    assert rebuild_command(tmp_path, "rebuild-2", 9, retrain_backbone=False) == [
        str(python), "-m", "indexer.cli", "rebuild", "--home", str(tmp_path), "--job-id", "rebuild-2",
        "--lock-fd", "9"]


# -- auth ----------------------------------------------------------------------------------------
def _v1_requests(client):
    """(method, path) of every /v1 operation in the OpenAPI document, path parameters filled."""
    filled = {"{cell_id}": "0000000000000000-0", "{row}": "0", "{col}": "0"}
    for path, operations in client.get("/openapi.json").json()["paths"].items():
        if path.startswith("/v1"):
            for name, value in filled.items():
                path = path.replace(name, value)
            for method in operations:
                yield method.upper(), path


def test_every_v1_route_answers_401_without_a_valid_key(client):
    requests = list(_v1_requests(client))
    assert len(requests) >= 17
    for method, path in requests:
        for headers in ({}, auth("cak_not-a-key"), {"Authorization": "Basic dXNlcjpwdw=="}):
            response = client.request(method, path, headers=headers)
            assert response.status_code == 401, (method, path, response.text)
            assert response.json()["detail"]
            assert response.headers["www-authenticate"] == "Bearer"


def test_reviewer_reads_but_cannot_correct(client, reviewer):
    cell = archived_cell(client, reviewer)
    assert client.get(f"/v1/cells/{cell['cell_id']}", headers=reviewer).status_code == 200
    response = client.post(f"/v1/cells/{cell['cell_id']}/corrections", json={"label": "monocyte"},
                           headers=reviewer)
    assert response.status_code == 403
    assert "technologist" in response.json()["detail"]


def test_open_access_needs_no_key(fresh_client):
    assert fresh_client.get("/v1/atlas").status_code == 200


def test_health_metrics_and_docs_need_no_key(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready", "version": "000001"}
    assert client.get("/metrics").status_code == 200
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert "/v1/reference-cells" in paths and "/v1/cells/{cell_id}/corrections" in paths


def test_revoked_key_stops_working(fresh_home):
    token = server.create_key(str(fresh_home), "station-1", "reviewer")
    app = create_app(fresh_home, settings=Settings(home=fresh_home, key_cache_s=0))
    with TestClient(app) as client:
        assert client.get("/v1/atlas", headers=auth(token)).status_code == 200
        assert server.revoke_key(str(fresh_home), "station-1") == 1
        assert client.get("/v1/atlas", headers=auth(token)).status_code == 401


# -- reference cells, classification, segmentation -----------------------------------------------
def test_reference_cells_for_an_upload(client, reviewer, new_cell_png):
    response = client.post("/v1/reference-cells", params={"k": 5}, files=upload(new_cell_png), headers=reviewer)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["version"] == "000001" and body["method"] == "latent" and body["cell_id"] is None
    assert len(body["references"]) == 5
    distances = [r["distance"] for r in body["references"]]
    assert distances == sorted(distances)
    assert {r["label"] for r in body["references"]} <= set(CLASSES)
    assert body["prediction"]["label"] in CLASSES
    assert sum(body["prediction"]["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert set(body["features"]) == set(FEATURE_NAMES)


def test_uploaded_archive_image_is_not_its_own_reference(client, reviewer):
    cell = client.get(f"/v1/cells/{archived_cell(client, reviewer)['cell_id']}", headers=reviewer).json()
    data = Path(cell["source_path"]).read_bytes()
    for method in ("latent", "som"):
        body = client.post("/v1/reference-cells", params={"k": 8, "method": method}, files=upload(data),
                           headers=reviewer).json()
        assert body["method"] == method and len(body["references"]) == 8
        assert cell["cell_id"] not in {r["cell_id"] for r in body["references"]}


def test_reference_cells_of_an_archived_cell(client, reviewer):
    cell_id = archived_cell(client, reviewer)["cell_id"]
    body = client.get(f"/v1/cells/{cell_id}/reference-cells", params={"k": 3, "method": "som"},
                      headers=reviewer).json()
    assert body["cell_id"] == cell_id and body["k"] == 3 and len(body["references"]) == 3
    assert cell_id not in {r["cell_id"] for r in body["references"]}
    assert all(r["image_url"] == f"/v1/cells/{r['cell_id']}/image" for r in body["references"])


def test_classify_places_features_against_class_percentiles(client, reviewer, new_cell_png):
    response = client.post("/v1/classify", files=upload(new_cell_png), headers=reviewer)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["prediction"]["label"] in CLASSES
    assert body["prediction"]["entropy_bits"] >= 0 and isinstance(body["prediction"]["flagged"], bool)
    positions = {p["feature"]: p for p in body["feature_positions"]}
    assert list(positions) == list(FEATURE_NAMES)
    area = positions["cell_area_um2"]
    assert area["value"] == pytest.approx(body["features"]["cell_area_um2"])
    for label in CLASSES:
        r = area["classes"][label]
        assert r["p2"] <= r["p50"] <= r["p98"]
        expected = "below" if area["value"] < r["p2"] else "above" if area["value"] > r["p98"] else "within"
        assert r["position"] == expected


def test_segment_returns_masks_as_coco_rle(client, reviewer, new_cell_png):
    response = client.post("/v1/segment", files=upload(new_cell_png), headers=reviewer)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["width"], body["height"]) == (256, 256) and body["cells"]
    main = body["cells"][0]
    cell, nucleus = decode_rle(main["cell_mask"]), decode_rle(main["nucleus_mask"])
    assert cell.shape == (256, 256) and cell.sum() == main["cell_area_px"] > 0
    assert nucleus.sum() == main["nucleus_area_px"] > 0 and not (nucleus & ~cell).any()
    rows, cols = np.nonzero(cell)
    box = main["bbox"]
    assert (box["row0"], box["col0"], box["row1"], box["col1"]) == (rows.min(), cols.min(), rows.max() + 1, cols.max() + 1)


# -- cells ---------------------------------------------------------------------------------------
def test_cell_detail_and_image(client, reviewer):
    cell_id = archived_cell(client, reviewer, "neutrophil")["cell_id"]
    body = client.get(f"/v1/cells/{cell_id}", headers=reviewer).json()
    assert body["label"] == body["original_label"] == "neutrophil" and body["corrected"] is False
    assert set(body["probabilities"]) == set(CLASSES) and set(body["features"]) == set(FEATURE_NAMES)
    image = client.get(body["image_url"], headers=reviewer)
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(image.content)).size == (256, 256)


def test_cell_pages_cover_the_archive_in_cell_id_order(client, reviewer):
    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": 7, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/cells", params=params, headers=reviewer).json()
        assert page["total"] == CELLS
        seen += [c["cell_id"] for c in page["items"]]
        pages, cursor = pages + 1, page["next_cursor"]
        if cursor is None:
            break
    assert pages == 6 and len(seen) == CELLS and seen == sorted(set(seen))


def test_cell_filters(client, reviewer):
    eos = client.get("/v1/cells", params={"label": "eosinophil"}, headers=reviewer).json()
    assert eos["total"] == PER_CLASS and {c["label"] for c in eos["items"]} == {"eosinophil"}
    flagged = client.get("/v1/cells", params={"flagged": True}, headers=reviewer).json()
    assert all(c["flagged"] for c in flagged["items"])
    node = eos["items"][0]["som_node"]
    at_node = client.get("/v1/cells", params={"node": f"{node['row']},{node['col']}"}, headers=reviewer).json()
    assert at_node["total"] >= 1 and all(c["som_node"] == node for c in at_node["items"])


# -- the map and versions ------------------------------------------------------------------------
def test_atlas_summary_and_u_matrix(client, reviewer):
    summary = client.get("/v1/atlas", headers=reviewer).json()
    assert summary["cells"] == CELLS and summary["classes"] == sorted(CLASSES)
    assert summary["counts_by_label"] == {label: PER_CLASS for label in CLASSES}
    rows, cols = summary["som"]["rows"], summary["som"]["cols"]
    values = client.get("/v1/atlas/u-matrix", headers=reviewer).json()["values"]
    assert np.array(values).shape == (rows, cols)
    picture = client.get("/v1/atlas/u-matrix.png", params={"scale": 4}, headers=reviewer)
    assert picture.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(picture.content)).size == (cols * 4, rows * 4)


def test_hits_nodes_and_projection(client, reviewer):
    hits = client.get("/v1/atlas/hits", headers=reviewer).json()
    assert hits["total"] == CELLS and np.array(hits["counts"]).sum() == CELLS
    monocytes = client.get("/v1/atlas/hits", params={"label": "monocyte"}, headers=reviewer).json()
    assert monocytes["total"] == PER_CLASS
    row, col = np.unravel_index(np.argmax(hits["counts"]), np.array(hits["counts"]).shape)
    node = client.get(f"/v1/atlas/nodes/{row}/{col}/cells", headers=reviewer).json()
    assert node["total"] == hits["counts"][row][col] == len(node["cells"])
    distances = [c["som_distance"] for c in node["cells"]]
    assert distances == sorted(distances)
    projection = client.get("/v1/atlas/projection", headers=reviewer).json()
    assert len(projection["cell_ids"]) == len(projection["x"]) == len(projection["labels"]) == CELLS


def test_versions(client, reviewer):
    body = client.get("/v1/versions", headers=reviewer).json()
    assert body["current"] == "000001"
    assert body["versions"] == [{**body["versions"][0], "version": "000001", "live": True, "cells": CELLS}]


# -- review and corrections ----------------------------------------------------------------------
def test_review_queue_and_suspect_labels(client, reviewer):
    queue = client.get("/v1/review-queue", params={"limit": 10}, headers=reviewer).json()
    entropies = [c["entropy_bits"] for c in queue["items"]]
    assert len(entropies) == 10 and entropies == sorted(entropies, reverse=True)
    suspects = client.get("/v1/suspect-labels", headers=reviewer).json()
    for item in suspects["items"]:
        assert item["label"] != item["majority_label"] and item["votes"] > item["k"] / 2


def test_correction_changes_the_served_label_at_once(fresh_client):
    cell = archived_cell(fresh_client, {}, "lymphocyte")
    neighbour = fresh_client.get(f"/v1/cells/{cell['cell_id']}/reference-cells", params={"k": 1}).json()
    target = neighbour["references"][0]["cell_id"]
    old_label = fresh_client.get(f"/v1/cells/{target}").json()["label"]
    new_label = "eosinophil" if old_label != "eosinophil" else "monocyte"

    response = fresh_client.post(f"/v1/cells/{target}/corrections", json={"label": new_label, "note": "granules"})
    assert response.status_code == 201, response.text
    correction = response.json()
    assert (correction["old_label"], correction["new_label"], correction["author"]) == (old_label, new_label, "open-access")
    assert correction["atlas_version"] == "000001" and correction["note"] == "granules"

    detail = fresh_client.get(f"/v1/cells/{target}").json()
    assert (detail["label"], detail["original_label"], detail["corrected"]) == (new_label, old_label, True)
    again = fresh_client.get(f"/v1/cells/{cell['cell_id']}/reference-cells", params={"k": 1}).json()
    assert again["references"][0] == {**neighbour["references"][0], "label": new_label}
    listed = fresh_client.get("/v1/cells", params={"label": new_label}).json()["items"]
    assert target in {c["cell_id"] for c in listed}
    log = fresh_client.get("/v1/corrections", params={"cell_id": target}).json()
    assert [c["correction_id"] for c in log["items"]] == [correction["correction_id"]]
    queue = fresh_client.get("/v1/review-queue", params={"limit": 1000}).json()
    assert queue["remaining"] == CELLS - 1 and target not in {c["cell_id"] for c in queue["items"]}


def test_latest_correction_wins_and_log_pages_newest_first(fresh_client):
    cell_id = archived_cell(fresh_client, {}, "monocyte")["cell_id"]
    for label in ("neutrophil", "lymphocyte", "eosinophil"):
        assert fresh_client.post(f"/v1/cells/{cell_id}/corrections", json={"label": label}).status_code == 201
    assert fresh_client.get(f"/v1/cells/{cell_id}").json()["label"] == "eosinophil"
    first = fresh_client.get("/v1/corrections", params={"limit": 2}).json()
    assert [c["new_label"] for c in first["items"]] == ["eosinophil", "lymphocyte"]
    rest = fresh_client.get("/v1/corrections", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert [c["old_label"] for c in rest["items"]] == ["monocyte"] and rest["next_cursor"] is None


def test_corrected_neighbours_make_a_cell_suspect(fresh_client):
    cell_id = archived_cell(fresh_client, {}, "lymphocyte")["cell_id"]
    references = fresh_client.get(f"/v1/cells/{cell_id}/reference-cells", params={"k": 8}).json()["references"]
    for reference in references:
        fresh_client.post(f"/v1/cells/{reference['cell_id']}/corrections", json={"label": "eosinophil"})
    suspects = {s["cell_id"]: s for s in fresh_client.get("/v1/suspect-labels").json()["items"]}
    assert suspects[cell_id]["majority_label"] == "eosinophil" and suspects[cell_id]["votes"] == 8
    assert suspects[cell_id]["reference_cell_ids"] == [r["cell_id"] for r in references]


def test_technologist_key_is_the_author(client, technologist):
    # The shared catalogue gets this one correction; it picks an eosinophil no other test reads.
    cell_id = client.get("/v1/cells", params={"label": "eosinophil", "limit": 10},
                         headers=technologist).json()["items"][-1]["cell_id"]
    response = client.post(f"/v1/cells/{cell_id}/corrections", json={"label": "eosinophil"}, headers=technologist)
    assert response.status_code == 201 and response.json()["author"] == "technologist-key"


# -- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("data, status, words", [
    (b"this is not an image", 400, "not a readable image"),
    (b"", 400, "empty"),
    (None, 400, "truncated"),  # a PNG cut in half
    (png(np.full((256, 256, 3), 230, np.uint8)), 422, "no white cell"),
    (png(np.full((10, 10, 3), 230, np.uint8)), 422, "too small"),
    (b"bomb", 400, "pixels"),  # a small file that decodes to 64 megapixels
])
def test_bad_images_get_clear_4xx(client, reviewer, new_cell_png, data, status, words):
    if data is None:
        data = new_cell_png[: len(new_cell_png) // 2]
    elif data == b"bomb":
        buffer = io.BytesIO()
        Image.new("1", (8000, 8000)).save(buffer, format="PNG")
        data = buffer.getvalue()
    for path in ("/v1/reference-cells", "/v1/classify", "/v1/segment"):
        response = client.post(path, files=upload(data), headers=reviewer)
        assert response.status_code == status, (path, response.text)
        assert words in response.json()["detail"]


def test_too_large_uploads_get_413(client, reviewer, fresh_home, new_cell_png):
    huge = b"\0" * (21 * 1024 * 1024)  # refused from its Content-Length, before it is read
    response = client.post("/v1/classify", files=upload(huge), headers=reviewer)
    assert response.status_code == 413 and "20 MB" in response.json()["detail"]
    small_limit = Settings(home=fresh_home, open_access=True, max_upload_bytes=10_000)
    with TestClient(create_app(fresh_home, settings=small_limit)) as small:
        response = small.post("/v1/segment", files=upload(new_cell_png))  # refused while read
        assert response.status_code == 413 and "larger than" in response.json()["detail"]


def test_bad_parameters_get_422(client, reviewer, new_cell_png):
    cell_id = archived_cell(client, reviewer)["cell_id"]
    cases = [
        ("GET", f"/v1/cells/{cell_id}/reference-cells?k=0", "k"),
        ("GET", f"/v1/cells/{cell_id}/reference-cells?k=101", "k"),
        ("GET", f"/v1/cells/{cell_id}/reference-cells?method=cosine", "method"),
        ("GET", "/v1/cells?node=north", "ROW,COL"),
        ("GET", "/v1/cells?node=99,0", "outside"),
        ("GET", "/v1/cells?label=basophil", "valid labels"),
        ("GET", "/v1/atlas/hits?label=basophil", "valid labels"),
        ("GET", "/v1/cells?limit=0", "limit"),
    ]
    for method, path, words in cases:
        response = client.request(method, path, headers=reviewer)
        assert response.status_code == 422, (path, response.text)
        assert words in response.json()["detail"], response.json()
    response = client.post("/v1/reference-cells?k=500", files=upload(new_cell_png), headers=reviewer)
    assert response.status_code == 422 and "query parameter k" in response.json()["detail"]
    response = client.post("/v1/classify", headers=reviewer)  # no image field
    assert response.status_code == 422 and "image" in response.json()["detail"]


def test_unknown_label_correction_lists_valid_labels(client, technologist):
    cell_id = archived_cell(client, technologist)["cell_id"]
    response = client.post(f"/v1/cells/{cell_id}/corrections", json={"label": "basophil"}, headers=technologist)
    assert response.status_code == 422
    assert response.json()["detail"] == ("unknown label 'basophil'; valid labels: "
                                         "eosinophil, lymphocyte, monocyte, neutrophil")
    assert client.post(f"/v1/cells/{cell_id}/corrections", json={}, headers=technologist).status_code == 422


def test_unknown_cells_and_nodes_get_404(client, reviewer, technologist):
    for path in ("/v1/cells/nope-0", "/v1/cells/nope-0/image", "/v1/cells/nope-0/reference-cells",
                 "/v1/atlas/nodes/999/0/cells"):
        response = client.get(path, headers=reviewer)
        assert response.status_code == 404 and response.json()["detail"], path
    response = client.post("/v1/cells/nope-0/corrections", json={"label": "monocyte"}, headers=technologist)
    assert response.status_code == 404 and "nope-0" in response.json()["detail"]


def test_missing_crop_file_gets_404(fresh_client, fresh_home):
    cell = archived_cell(fresh_client, {})
    crop_path = fresh_client.app.state.cellatlas.live.get().crop_file(cell["cell_id"])
    assert crop_path.is_file() and crop_path.is_relative_to(fresh_home)  # the copy's own crop
    moved = crop_path.with_name(crop_path.name + ".moved")
    crop_path.rename(moved)
    try:
        response = fresh_client.get(cell["image_url"])
    finally:
        moved.rename(crop_path)
    assert response.status_code == 404 and "missing" in response.json()["detail"]


def test_server_bugs_answer_500_without_details(fresh_home, monkeypatch):
    from api.views import AtlasView

    def broken(self, *args):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(AtlasView, "hits", broken)
    with TestClient(create_app(fresh_home, open_access=True), raise_server_exceptions=False) as client:
        response = client.get("/v1/atlas/hits")
    assert response.status_code == 500 and "secret" not in response.text
    assert response.json() == {"detail": "internal server error; it has been logged"}


# -- serving -------------------------------------------------------------------------------------
def test_readyz_is_503_without_a_published_atlas(tmp_path):
    with TestClient(create_app(tmp_path, open_access=True)) as client:
        assert client.get("/healthz").status_code == 200
        for path in ("/readyz", "/v1/atlas"):
            response = client.get(path)
            assert response.status_code == 503 and "cellatlas build" in response.json()["detail"]


def test_new_version_is_served_when_current_changes(fresh_home):
    settings = Settings(home=fresh_home, open_access=True, pointer_check_s=0.0)
    with TestClient(create_app(fresh_home, settings=settings)) as client:
        old_view = client.app.state.cellatlas.view()
        shutil.copytree(fresh_home / "versions" / "000001", fresh_home / "versions" / "000002")
        (fresh_home / "current").write_text("000002\n")
        assert client.get("/readyz").json()["version"] == "000002"
        assert client.get("/v1/atlas").json()["version"] == "000002"
        assert old_view.version == "000001" and old_view.summary(0).cell_id  # in-flight work still answers


def test_metrics_count_requests_per_route(client, reviewer):
    cell_id = archived_cell(client, reviewer)["cell_id"]
    client.get(f"/v1/cells/{cell_id}", headers=reviewer)
    text = client.get("/metrics").text
    assert 'cellatlas_http_requests_total{method="GET",route="/v1/cells/{cell_id}",status="200"}' in text
    assert 'cellatlas_http_request_duration_seconds_bucket{le="0.005",method="GET",route="/v1/cells"}' in text
