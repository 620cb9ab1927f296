"""Backups of an atlas home: one archive file that a restore turns into a working home anywhere.

    cellatlas backup --home H --out FILE        (FILE: .tar, or .tar.gz to compress)
    cellatlas restore FILE --home H2

What a backup holds: the catalogue (corrections, jobs, keys and what else it keeps) as a DuckDB
`EXPORT DATABASE` taken under the catalogue's lock (no other process writes it meanwhile), the
published versions, the `current` pointer, and every other file of the home that a version or
the catalogue refers to (the content-addressed crops, archived uploads); not the logs, lock
files, the live catalogue file itself (its export replaces it) or a build's staging folder.
A manifest (`backup-manifest.json`, the archive's last member) gives the SHA-256 and size of
every file. A restore extracts into a hidden folder beside the target, checks every file
against the manifest, rebuilds the catalogue (`IMPORT DATABASE`) and only then renames the
folder into place: a corrupted or incomplete archive is refused with the files that differ and
leaves nothing behind. Every path in a version is relative to its home, so the restored atlas
serves from wherever it is.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

import duckdb

from atlas.catalog import Catalog
from atlas.store import PUBLISH_LOCK, AtlasStore
from atlas.version import MANIFEST

FORMAT = "cellatlas-backup"
FORMAT_VERSION = 1
BACKUP_MANIFEST = "backup-manifest.json"
CATALOG_EXPORT = "catalog-export"  # a DuckDB EXPORT DATABASE folder inside the archive
CATALOG_FILE = "catalog.duckdb"
# Not backed up: the live catalogue (exported instead), logs, locks, staging folders.
SKIPPED_TOP = {"logs", "catalog.duckdb", "catalog.duckdb.wal", PUBLISH_LOCK, "rebuild.lock"}
CHUNK = 1 << 20


class BackupError(ValueError):
    """A backup cannot be made, or an archive cannot be restored; the message says why."""


@dataclass
class BackupResult:
    archive: Path
    files: int
    bytes: int
    versions: list[str]
    current: str | None


def backup(home: Path | str, out: Path | str) -> BackupResult:
    """Write the backup of ATLAS_HOME `home` to the new file `out` (written to a temporary file
    and renamed, so that `out` is either complete or absent)."""
    home, out = Path(home), Path(out)
    if not (home / CATALOG_FILE).is_file() and not (home / "versions").is_dir():
        raise BackupError(f"{home} is not an atlas home (no {CATALOG_FILE} and no versions/)")
    if out.exists():
        raise BackupError(f"{out} exists; give a new file name for the backup")
    if home.resolve() in out.resolve().parents:
        raise BackupError(f"{out} is inside the atlas home {home}; write the backup elsewhere")
    out.parent.mkdir(parents=True, exist_ok=True)
    store = AtlasStore(home)
    with tempfile.TemporaryDirectory(prefix=".backup-", dir=out.parent) as work:
        export = Path(work) / CATALOG_EXPORT
        # Under the catalogue's lock: other writers (the server, a build) wait until it is taken.
        with Catalog(home).connect() as db:
            db.execute(f"EXPORT DATABASE '{_sql_text(export)}' (FORMAT parquet)")
        current, versions = store.current_version(), store.list_versions()
        files = [(f"{CATALOG_EXPORT}/{p.relative_to(export).as_posix()}", p)
                 for p in sorted(export.rglob("*")) if p.is_file()]
        files += [(p.relative_to(home).as_posix(), p) for p in _home_files(home, versions)]
        if current is not None:
            files.append(("current", None))  # written from `current` as read above
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION,
                    "created_at": datetime.now(timezone.utc).isoformat(), "source_home": str(home),
                    "current": current, "versions": versions, "files": {}}
        partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
        try:
            with tarfile.open(partial, "w:gz" if out.name.endswith(".gz") else "w") as archive:
                for name, path in files:
                    data = None if path is not None else f"{current}\n".encode()
                    manifest["files"][name] = _add(archive, name, path, data)
                _add(archive, BACKUP_MANIFEST, None, json.dumps(manifest, indent=1).encode())
            with open(partial, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(partial, out)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    total = sum(entry["bytes"] for entry in manifest["files"].values())
    return BackupResult(out, len(manifest["files"]), total, versions, current)


def restore(archive: Path | str, home: Path | str) -> BackupResult:
    """Restore the backup `archive` into `home`, which must not exist or be empty. Every file is
    checked against the archive's manifest before the home appears; BackupError otherwise."""
    archive, home = Path(archive), Path(home)
    if home.exists() and (not home.is_dir() or any(home.iterdir())):
        raise BackupError(f"{home} is not empty; restore into a new or empty folder")
    if not archive.is_file():
        raise BackupError(f"no backup file {archive}")
    home.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{home.name}.restoring-", dir=home.parent))
    try:
        found, manifest = _extract(archive, staging)
        _check(manifest, found, archive)
        export = staging / CATALOG_EXPORT
        if export.is_dir():
            connection = duckdb.connect(str(staging / CATALOG_FILE))
            try:
                connection.execute(f"IMPORT DATABASE '{_sql_text(export)}'")
            finally:
                connection.close()
            shutil.rmtree(export)
        if AtlasStore(staging).current_version() != manifest.get("current"):
            raise BackupError(f"{archive}: the live version {manifest.get('current')} is not complete "
                              "in the backup")
        if home.exists():
            home.rmdir()  # empty, checked above
        os.replace(staging, home)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    files = manifest["files"]
    return BackupResult(home, len(files), sum(entry["bytes"] for entry in files.values()),
                        manifest.get("versions", []), manifest.get("current"))


# -- writing --------------------------------------------------------------------------------------
def _home_files(home: Path, versions: list[str]) -> list[Path]:
    """The files of `home` a backup holds: the published `versions` and every other file
    outside SKIPPED_TOP and staging folders (hidden files skipped)."""
    kept = []
    for top in sorted(home.iterdir()):
        if top.name in SKIPPED_TOP or top.name == "current" or top.name.startswith("."):
            continue
        if top.name == "versions":
            for version in versions:
                kept += _files_under(top / version)
        elif top.is_dir():
            kept += _files_under(top)
        elif top.is_file():
            kept.append(top)
    return kept


def _files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and not p.is_symlink() and not any(part.startswith(".") for part in
                                                                     p.relative_to(folder).parts))


def _add(archive: tarfile.TarFile, name: str, path: Path | None, data: bytes | None) -> dict:
    """Add a file (from `path`, or the bytes `data`) and return its manifest entry."""
    if data is None:
        data_hash, size = _sha256_of(path)
        info = archive.gettarinfo(str(path), arcname=name)
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        with open(path, "rb") as handle:
            archive.addfile(info, handle)
        return {"sha256": data_hash, "bytes": size}
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(datetime.now().timestamp()), 0o644
    archive.addfile(info, _BytesReader(data))
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


class _BytesReader:
    def __init__(self, data: bytes):
        self.data, self.offset = data, 0

    def read(self, size: int = -1) -> bytes:
        end = len(self.data) if size < 0 else self.offset + size
        chunk, self.offset = self.data[self.offset:end], min(end, len(self.data))
        return chunk


def _sha256_of(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _sql_text(path: Path) -> str:
    return str(path).replace("'", "''")


# -- reading ----------------------------------------------------------------------------------------
def _extract(archive: Path, staging: Path) -> tuple[dict[str, dict], dict]:
    """Extract every regular file of `archive` into `staging`, hashing it on the way; returns
    ({name: {sha256, bytes}}, the backup manifest)."""
    found: dict[str, dict] = {}
    manifest = None
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                name = _safe_name(member, archive)
                if member.isdir():
                    continue
                source = tar.extractfile(member)
                if name == BACKUP_MANIFEST:
                    try:
                        manifest = json.loads(source.read())
                    except ValueError:
                        raise BackupError(f"{archive}: its manifest is not readable JSON "
                                          "(the archive is damaged)") from None
                    continue
                target = staging / name
                target.parent.mkdir(parents=True, exist_ok=True)
                digest, size = hashlib.sha256(), 0
                with open(target, "wb") as handle:
                    while chunk := source.read(CHUNK):
                        digest.update(chunk)
                        size += len(chunk)
                        handle.write(chunk)
                found[name] = {"sha256": digest.hexdigest(), "bytes": size}
    except (tarfile.TarError, EOFError, OSError, ValueError) as error:
        if isinstance(error, BackupError):
            raise
        raise BackupError(f"{archive} is not a readable CellAtlas backup ({type(error).__name__}: "
                          f"{error}); it may be truncated or damaged") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BackupError(f"{archive} is not a CellAtlas backup (no {BACKUP_MANIFEST} of format "
                          f"{FORMAT!r}); it may be truncated or damaged")
    return found, manifest


def _safe_name(member: tarfile.TarInfo, archive: Path) -> str:
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts or not (member.isfile() or member.isdir()):
        raise BackupError(f"{archive} holds {member.name!r}, which a CellAtlas backup never does "
                          "(an absolute path, '..', or a link); refused")
    return path.as_posix()


def _check(manifest: dict, found: dict[str, dict], archive: Path) -> None:
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BackupError(f"{archive} is a backup of format version {manifest.get('format_version')}; "
                          f"this CellAtlas reads version {FORMAT_VERSION}")
    expected = manifest.get("files") or {}
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    differ = sorted(name for name in set(expected) & set(found) if expected[name] != found[name])
    problems = [f"{len(names)} {what} (e.g. {', '.join(names[:3])})"
                for names, what in ((differ, "files whose checksum differs from the manifest"),
                                    (missing, "files of the manifest missing"),
                                    (extra, "files not in the manifest")) if names]
    if problems:
        raise BackupError(f"{archive} is damaged: {'; '.join(problems)}; nothing was restored")
    for version in manifest.get("versions", []):
        if f"versions/{version}/{MANIFEST}" not in found:
            raise BackupError(f"{archive}: version {version} has no {MANIFEST}; nothing was restored")
