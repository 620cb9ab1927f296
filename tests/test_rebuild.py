"""Rebuilds with corrections: through the API (a background process) and called directly;
a rebuild killed mid-way loses nothing and the next one succeeds."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pandas as pd
import pytest
from fastapi.testclient import TestClient

from api import server
from api.app import create_app
from atlas.catalog import Catalog
from atlas.jobs import RebuildLock, RebuildRunning
from atlas.store import AtlasStore
from indexer.config import parent_config
from indexer.rebuild import rebuild
from indexer.steps import relabel
from tests.conftest import home_copy, open_client

pytestmark = pytest.mark.filterwarnings("ignore:n_jobs value .* overridden:UserWarning")  # umap, in builds

WAIT_S = 180  # a rebuild process imports torch first: seconds on an idle machine, more on a busy one


@pytest.fixture
def home(built_atlas, tmp_path) -> Path:
    """A copy of the session's tiny atlas (version 000001) with its own catalogue."""
    return home_copy(built_atlas[0], tmp_path)


@pytest.fixture
def client(home):
    with open_client(home) as client:
        yield client


def cells_of(home: Path, version: str) -> pd.DataFrame:
    return pd.read_parquet(AtlasStore(home).version_dir(version) / "cells.parquet")


def first_cell(home: Path, label: str) -> str:
    cells = cells_of(home, "000001")
    return str(cells.loc[cells["label"] == label, "cell_id"].iat[0])


def wait_for(predicate, what: str, timeout_s: float = WAIT_S):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def finished_job(client, job_id: str) -> dict:
    def finished():
        job = client.get(f"/v1/rebuilds/{job_id}").json()
        return job if job["state"] != "running" else None

    return wait_for(finished, f"rebuild {job_id} to finish")


def served_version(client) -> str:
    return client.get("/v1/atlas").json()["version"]


# -- through the API --------------------------------------------------------------------------
def test_rebuild_applies_corrections(home, client):
    cell_id = first_cell(home, "monocyte")
    response = client.post(f"/v1/cells/{cell_id}/corrections", json={"label": "lymphocyte", "note": "kidney nucleus"})
    assert response.status_code == 201
    assert client.get(f"/v1/cells/{cell_id}").json()["label"] == "lymphocyte"  # served at once

    started = client.post("/v1/rebuilds", json={"retrain_backbone": False})
    assert started.status_code == 202, started.text
    job = finished_job(client, started.json()["job_id"])
    assert job["state"] == "succeeded", job
    assert job["version"] == "000002" and job["progress"]["step"] == "done"

    # The new version carries the correction in its own labels ...
    cells = cells_of(home, "000002").set_index("cell_id")
    assert cells.at[cell_id, "label"] == "lymphocyte"
    assert cells.at[cell_id, "folder_label"] == "monocyte"
    assert (cells["label"] == "lymphocyte").sum() == (cells_of(home, "000001")["label"] == "lymphocyte").sum() + 1
    manifest = AtlasStore(home).manifest("000002")
    assert manifest["parent_version"] == "000001" and manifest["kind"] == "rebuild"
    assert manifest["corrections"]["applied_through_correction_id"] == response.json()["correction_id"]
    assert manifest["corrections"]["labels_changed_since_parent"] == 1
    assert manifest["counts_by_class"]["monocyte"] == 11 and manifest["counts_by_class"]["lymphocyte"] == 13
    # ... a classifier trained on them (not the parent's file), and the parent's embedding.
    old, new = (AtlasStore(home).version_dir(v) / "models" for v in ("000001", "000002"))
    assert (old / "classifier.json").read_bytes() != (new / "classifier.json").read_bytes()
    assert (old / "backbone.pt").read_bytes() == (new / "backbone.pt").read_bytes()
    assert (old.parent / "index.faiss").read_bytes() == (new.parent / "index.faiss").read_bytes()

    # The server picks the new version up and serves the correction from it.
    wait_for(lambda: served_version(client) == "000002", "the server to load version 000002")
    detail = client.get(f"/v1/cells/{cell_id}").json()
    assert (detail["version"], detail["label"], detail["original_label"]) == ("000002", "lymphocyte", "lymphocyte")
    versions = client.get("/v1/versions").json()
    assert versions["current"] == "000002" and [v["version"] for v in versions["versions"]] == ["000001", "000002"]
    assert [j["job_id"] for j in client.get("/v1/rebuilds").json()["items"]] == [job["job_id"]]


PAUSE_WHILE_WRITING = """
# Loaded by every Python process started with this folder on PYTHONPATH (the rebuild the test
# starts through the API): the rebuild stops just before it writes the new cells table, with the
# models already copied into its staging folder, and says so in a file, so the test can kill it there.
import time
from pathlib import Path

from atlas.version import AtlasVersion

_write_cells = AtlasVersion.write_cells


def _paused(self, cells):
    Path({marker!r}).write_text("paused")
    time.sleep(120)
    _write_cells(self, cells)


AtlasVersion.write_cells = _paused
"""


@pytest.fixture
def rebuild_pauses_while_writing(tmp_path, monkeypatch) -> Path:
    """Rebuild processes started from now on pause half-way through writing their version; returns
    the file that appears when one has paused (the test's own sitecustomize, no hook in the code)."""
    folder, marker = tmp_path / "pause", tmp_path / "paused"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(PAUSE_WHILE_WRITING.format(marker=str(marker)))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")])))
    return marker


def test_killed_rebuild_leaves_previous_version_live(home, client, monkeypatch, rebuild_pauses_while_writing):
    early, late = first_cell(home, "monocyte"), first_cell(home, "neutrophil")
    assert client.post(f"/v1/cells/{early}/corrections", json={"label": "eosinophil"}).status_code == 201

    job_id = client.post("/v1/rebuilds", json={}).json()["job_id"]
    wait_for(rebuild_pauses_while_writing.exists, "the rebuild to pause while writing")
    job = client.get(f"/v1/rebuilds/{job_id}").json()
    assert job["state"] == "running" and job["progress"]["step"] == "write"
    staging = list((home / "versions").glob(".staging-rebuild-*"))
    assert len(staging) == 1 and (staging[0] / "models" / "backbone.pt").exists()
    assert not (staging[0] / "cells.parquet").exists()

    # Only one rebuild at a time.
    second = client.post("/v1/rebuilds", json={})
    assert second.status_code == 409 and second.json()["job_id"] == job_id
    # A correction made during the rebuild (after its snapshot) is kept for the next one.
    assert client.post(f"/v1/cells/{late}/corrections", json={"label": "lymphocyte"}).status_code == 201

    os.kill(job["progress"]["pid"], signal.SIGKILL)
    failed = finished_job(client, job_id)
    assert failed["state"] == "failed" and "killed or crashed" in failed["message"]

    # The previous version is still live and served, with both corrections.
    assert AtlasStore(home).current_version() == "000001"
    assert served_version(client) == "000001"
    assert client.get(f"/v1/cells/{early}").json()["label"] == "eosinophil"
    assert client.get(f"/v1/cells/{late}").json()["label"] == "lymphocyte"
    assert [c["cell_id"] for c in client.get("/v1/corrections").json()["items"]] == [late, early]

    # The next rebuild succeeds, discards the dead one's staging folder and applies both.
    monkeypatch.delenv("PYTHONPATH")
    retry = client.post("/v1/rebuilds", json={})
    assert retry.status_code == 202
    assert finished_job(client, retry.json()["job_id"])["state"] == "succeeded"
    assert AtlasStore(home).current_version() == "000002"
    assert not list((home / "versions").glob(".staging-*"))
    cells = cells_of(home, "000002").set_index("cell_id")
    assert (cells.at[early, "label"], cells.at[late, "label"]) == ("eosinophil", "lymphocyte")


def test_rebuild_needs_the_admin_role(home):
    tokens = {role: server.create_key(str(home), f"{role}-key", role) for role in ("technologist", "admin")}
    with TestClient(create_app(home)) as client:
        refused = client.post("/v1/rebuilds", headers={"Authorization": f"Bearer {tokens['technologist']}"})
        assert refused.status_code == 403 and "admin" in refused.json()["detail"]
        assert client.get("/v1/rebuilds/rebuild-nope",
                          headers={"Authorization": f"Bearer {tokens['technologist']}"}).status_code == 404
        with RebuildLock(home):  # as if `cellatlas rebuild` were running from cron
            busy = client.post("/v1/rebuilds", headers={"Authorization": f"Bearer {tokens['admin']}"})
        assert busy.status_code == 409 and "already running" in busy.json()["detail"]


# -- called directly ------------------------------------------------------------------------------
def test_relabel_applies_the_latest_correction_over_folder_labels(tmp_path):
    catalog = Catalog(tmp_path)
    cells = pd.DataFrame({"cell_id": ["a", "b", "c"], "label": ["x", "y", None], "folder_label": ["x", "x", None]})
    catalog.add_correction("a", "x", "y", None, "tech", "000001")
    catalog.add_correction("a", "y", "z", "second thoughts", "tech", "000001")
    catalog.add_correction("c", None, "x", None, "tech", "000001")
    catalog.add_correction("gone", "x", "y", None, "tech", "000001")
    labels, summary = relabel(cells["cell_id"], cells["folder_label"], catalog, previous_labels=cells["label"])
    # b's label came from an earlier build's correction that is no longer in this log: back to its folder label
    assert labels.tolist() == ["z", "x", "x"]
    assert summary == {"applied_through_correction_id": 4, "cells_relabelled": 2,
                       "labels_changed_since_parent": 3, "corrections_for_cells_not_in_version": 1}


def test_rebuild_refuses_while_another_holds_the_lock(home):
    with RebuildLock(home), pytest.raises(RebuildRunning):
        rebuild(home, progress=False, threads=1)
    assert AtlasStore(home).list_versions() == ["000001"]


def test_rebuild_with_backbone_retrains_everything_from_the_parent_images(home):
    cell_id = first_cell(home, "eosinophil")
    Catalog(home).add_correction(cell_id, "eosinophil", "neutrophil", None, "tech", "000001")
    parent = AtlasStore(home).manifest("000001")
    config = parent_config(parent, AtlasStore(home).version_dir("000001"), home, threads=1, progress=False)
    assert (config.preset, config.epochs, config.som_epochs) == ("tiny", 2, 8)

    version = rebuild(home, retrain_backbone=True, progress=False, threads=1)
    assert version == "000002"
    manifest = AtlasStore(home).manifest(version)
    assert manifest["corrections"]["applied_through_correction_id"] == 1
    assert cells_of(home, version).set_index("cell_id").at[cell_id, "label"] == "neutrophil"
    job = Catalog(home).jobs(kind="rebuild")[0]
    assert job["state"] == "succeeded" and job["version"] == version
    assert job["progress"]["build_job_id"] == manifest["job_id"]
