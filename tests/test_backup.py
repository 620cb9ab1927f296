"""`cellatlas backup` and `restore` (issue 14): a restored atlas in another directory serves every
cell image through the server (failure 2 end to end), with its corrections and keys; a damaged
archive is refused and leaves nothing; a home that is not empty is never restored into."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from atlas.catalog import Catalog
from atlas.store import AtlasStore
from indexer.backup import BACKUP_MANIFEST, BackupError, backup, restore
from indexer.cli import main
from tests.conftest import home_copy

pytestmark = pytest.mark.filterwarnings("ignore:n_jobs value .* overridden:UserWarning")


@pytest.fixture(scope="module")
def archive(built_atlas, tmp_path_factory) -> tuple[Path, Path, str]:
    """(a backup file, the home it was taken from, a technologist token of that home); the home
    has a correction, a key and a dead build's staging folder."""
    folder = tmp_path_factory.mktemp("backup")
    home = home_copy(built_atlas[0], folder)
    catalog = Catalog(home)
    token = catalog.create_key("tech", "technologist")
    cell_id = AtlasStore(home).version("000001").read_cells()["cell_id"].iat[0]
    catalog.add_correction(cell_id, "x", "eosinophil", "before the backup", "tech", "000001")
    (home / "versions" / ".staging-rebuild-1-2").mkdir()
    (home / "logs").mkdir(exist_ok=True)
    (home / "logs" / "rebuild.log").write_text("not backed up")
    out = folder / "atlas-backup.tar"
    assert main(["backup", "--home", str(home), "--out", str(out)]) == 0
    return out, home, token


def test_a_restored_atlas_elsewhere_serves_every_cell_image(archive, tmp_path):
    out, source, token = archive
    restored = tmp_path / "somewhere" / "else"
    assert main(["restore", str(out), "--home", str(restored)]) == 0
    # The original goes away: the restored home must need nothing of it.
    moved = source.with_name(source.name + "-gone")
    source.rename(moved)
    try:
        assert sorted(p.name for p in restored.iterdir()) == ["catalog.duckdb", "crops", "current", "versions"]
        assert AtlasStore(restored).list_versions() == ["000001"]
        headers = {"Authorization": f"Bearer {token}"}  # keys come back (their hashes do)
        with TestClient(create_app(restored)) as client:
            page = client.get("/v1/cells", params={"limit": 1000}, headers=headers).json()
            assert page["total"] == len(page["items"]) > 0
            for cell in page["items"]:
                image = client.get(cell["image_url"], headers=headers)
                assert image.status_code == 200, (cell["cell_id"], image.text)
                assert image.content[:2] == b"\xff\xd8"  # a JPEG
            corrections = client.get("/v1/corrections", headers=headers).json()["items"]
            assert [c["note"] for c in corrections] == ["before the backup"]
            # The catalogue keeps counting where it stopped.
            cell_id = page["items"][0]["cell_id"]
            new = client.post(f"/v1/cells/{cell_id}/corrections", json={"label": "monocyte"}, headers=headers)
            assert new.status_code == 201 and new.json()["correction_id"] == corrections[0]["correction_id"] + 1
    finally:
        moved.rename(source)


def test_the_backup_holds_a_checksummed_manifest_and_nothing_transient(archive):
    out, home, _ = archive
    with tarfile.open(out) as tar:
        names = tar.getnames()
    assert names[-1] == BACKUP_MANIFEST and "current" in names
    assert any(name.startswith("catalog-export/") for name in names)
    assert not any("staging" in name or name.startswith("logs") or name == "catalog.duckdb" for name in names)
    crops = {p.relative_to(home).as_posix() for p in (home / "crops").rglob("*") if p.is_file()}
    assert crops and crops <= set(names)


def damaged_copy(out: Path, tmp_path: Path, member: str) -> Path:
    """A copy of the backup with one byte of `member`'s data changed."""
    copy = tmp_path / "damaged.tar"
    shutil.copy(out, copy)
    with tarfile.open(out) as tar:
        offset = tar.getmember(member).offset_data
    with open(copy, "r+b") as handle:
        handle.seek(offset + 10)
        byte = handle.read(1)
        handle.seek(offset + 10)
        handle.write(bytes([byte[0] ^ 0xFF]))
    return copy


def test_a_damaged_backup_is_refused_and_restores_nothing(archive, tmp_path):
    out, _, _ = archive
    target = tmp_path / "restored"
    damaged = damaged_copy(out, tmp_path, "versions/000001/index.faiss")
    with pytest.raises(BackupError, match=r"damaged: 1 files whose checksum differs .*index\.faiss"):
        restore(damaged, target)
    assert not target.exists() and [p.name for p in tmp_path.iterdir()] == ["damaged.tar"]
    # A truncated archive, and a file that is no archive at all.
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(out.read_bytes()[: out.stat().st_size // 2])
    with pytest.raises(BackupError, match="truncated|damaged|not a CellAtlas backup"):
        restore(truncated, target)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(BackupError, match="not a readable CellAtlas backup"):
        restore(tmp_path / "notes.txt", target)
    assert not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged.tar", "notes.txt", "truncated.tar"]


def test_restore_refuses_a_home_that_is_not_empty_and_backup_an_existing_file(archive, tmp_path, capsys):
    out, home, _ = archive
    target = tmp_path / "busy"
    target.mkdir()
    (target / "catalog.duckdb").write_text("someone's")
    assert main(["restore", str(out), "--home", str(target)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert (target / "catalog.duckdb").read_text() == "someone's"
    assert main(["backup", "--home", str(home), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["backup", "--home", str(tmp_path / "nothing"), "--out", str(tmp_path / "b.tar")]) == 2
    assert "is not an atlas home" in capsys.readouterr().err


def test_backup_of_a_home_that_a_server_is_serving(archive, tmp_path):
    """Backups are taken while the API runs: the catalogue is exported under its lock."""
    _, home, token = archive
    work = home_copy(home, tmp_path)
    headers = {"Authorization": f"Bearer {token}"}
    with TestClient(create_app(work)) as client:
        cell_id = client.get("/v1/cells", params={"limit": 1}, headers=headers).json()["items"][0]["cell_id"]
        assert client.post(f"/v1/cells/{cell_id}/corrections", json={"label": "lymphocyte"},
                           headers={**headers, "Idempotency-Key": "k"}).status_code == 201
        result = backup(work, tmp_path / "live.tar.gz")
        assert client.post(f"/v1/cells/{cell_id}/corrections", json={"label": "monocyte"},
                           headers=headers).status_code == 201
    assert result.current == "000001" and result.files > 10
    restored = restore(tmp_path / "live.tar.gz", tmp_path / "restored").archive
    assert len(Catalog(restored).corrections()) == 2  # the one before, not the one after
    with TestClient(create_app(restored)) as client:  # the Idempotency-Key came along too
        replay = client.post(f"/v1/cells/{cell_id}/corrections", json={"label": "lymphocyte"},
                             headers={**headers, "Idempotency-Key": "k"})
        assert replay.status_code == 201 and replay.headers["Idempotent-Replayed"] == "true"

