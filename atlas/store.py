"""The versioned atlas on disk: immutable builds under `versions/`, a `current` pointer
replaced atomically, and content-addressed cell crops shared by the versions.

    ATLAS_HOME/
      catalog.duckdb            corrections, jobs, keys (atlas.catalog)
      crops/<segmenter>/ab/<cell_id>.jpg  and .mask.png (atlas.version.crop_path)
      versions/000001/          one AtlasVersion (atlas.version names its files)
      current                   "000001"
A build writes into `versions/.staging-*` and renames it into place; only then is `current`
replaced (write a temporary file, fsync, rename). A crash leaves the live version serving.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from pathlib import Path

from atlas.files import write_atomic
from atlas.version import MANIFEST, AtlasVersion

PUBLISH_LOCK = ".publish.lock"


class AtlasNotFound(FileNotFoundError):
    """ATLAS_HOME has no published version; the message says how to make one."""


class AtlasStore:
    def __init__(self, home: Path | str):
        self.home = Path(home)
        self.versions = self.home / "versions"

    # -- reading --------------------------------------------------------------------------
    def current_version(self) -> str | None:
        try:
            version = (self.home / "current").read_text().strip()
        except FileNotFoundError:
            return None
        return version if (self.versions / version / MANIFEST).exists() else None

    def require_current(self) -> str:
        version = self.current_version()
        if version is None:
            raise AtlasNotFound(
                f"no published atlas in {self.home}; build one with "
                f"'cellatlas build --images DIR --home {self.home}'"
            )
        return version

    def version_dir(self, version: str) -> Path:
        path = self.versions / version
        if not (path / MANIFEST).exists():
            raise AtlasNotFound(f"atlas version {version!r} does not exist in {self.home}")
        return path

    def list_versions(self) -> list[str]:
        if not self.versions.exists():
            return []
        return sorted(p.name for p in self.versions.iterdir() if p.name.isdigit() and (p / MANIFEST).exists())

    def manifest(self, version: str) -> dict:
        return json.loads((self.version_dir(version) / MANIFEST).read_text())

    def version(self, version: str) -> AtlasVersion:
        """The files of a published version."""
        return AtlasVersion(self.version_dir(version), self.home)

    def staging_version(self, staging: Path) -> AtlasVersion:
        """The files of a version being written into `staging` (from `new_staging`)."""
        return AtlasVersion(staging, self.home)

    # -- writing --------------------------------------------------------------------------
    def new_staging(self, tag: str = "") -> Path:
        """An empty folder to write a version into; `tag` names the kind of job writing it
        (`.staging-<tag>-<pid>-<ms>`), so that a job can find the leftovers of its own kind."""
        self.versions.mkdir(parents=True, exist_ok=True)
        prefix = f".staging-{tag}-" if tag else ".staging-"
        staging = self.versions / f"{prefix}{os.getpid()}-{int(time.time() * 1000)}"
        (staging / "models").mkdir(parents=True)
        return staging

    def publish(self, staging: Path, manifest: dict) -> str:
        """Move a finished staging folder into place as the next version and make it live.
        Jobs publishing at the same time (a build and a rebuild of one home) take turns
        (PUBLISH_LOCK), so that each gets its own number."""
        with _exclusive(self.home / PUBLISH_LOCK):
            existing = [int(v) for v in self.list_versions()]
            # Also skip numbers of half-renamed folders (no manifest): never reuse a directory.
            existing += [int(p.name) for p in self.versions.iterdir() if p.name.isdigit()]
            version = f"{max(existing, default=0) + 1:06d}"
            manifest = {**manifest, "version": version}
            write_atomic(staging / MANIFEST, json.dumps(manifest, indent=2, default=_jsonable))
            os.replace(staging, self.versions / version)
            write_atomic(self.home / "current", version + "\n")
        return version

    def discard(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    def clean_stale_staging(self, older_than_s: float = 24 * 3600) -> None:
        """Remove staging folders of builds that died (older than a day)."""
        if not self.versions.exists():
            return
        for path in self.versions.glob(".staging-*"):
            if time.time() - path.stat().st_mtime > older_than_s:
                shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _exclusive(path: Path):
    """An exclusive advisory lock on `path` (created if missing) while the block runs."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to the manifest")
