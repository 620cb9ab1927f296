"""Rebuild jobs across processes: at most one rebuild per ATLAS_HOME (a lock the kernel drops
when its holder dies), and the job rows of rebuilds whose process died.

The lock is an exclusive `flock` on `ATLAS_HOME/rebuild.lock`. Because the kernel releases it
when the holding process exits, is killed or crashes, a dead rebuild never blocks the next
one. Its open file can be handed to a child process (`fileno()` with subprocess `pass_fds`),
so that a server starting a rebuild process keeps the lock held without a gap.
"""

from __future__ import annotations

import fcntl
import os
import uuid
from pathlib import Path

from atlas.catalog import Catalog
from atlas.store import AtlasStore

REBUILD = "rebuild"  # the jobs table's kind for rebuilds
ADD = "add"  # ... and for additions (`cellatlas add`), which take the same lock


def new_job_id(kind: str = REBUILD) -> str:
    return f"{kind}-{uuid.uuid4().hex[:12]}"


class RebuildRunning(RuntimeError):
    """Another rebuild of this ATLAS_HOME is running."""


class RebuildLock:
    def __init__(self, home: Path | str):
        self.path = Path(home) / "rebuild.lock"
        self._fd: int | None = None

    def acquire(self) -> RebuildLock:
        """Take the lock now or raise RebuildRunning; never waits."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RebuildRunning(f"another rebuild of {self.path.parent} is running") from None
        self._fd = fd
        return self

    @classmethod
    def adopt(cls, home: Path | str, fd: int) -> RebuildLock:
        """The lock held through `fd`, a file descriptor inherited from the process that took it."""
        lock = cls(home)
        try:  # locking an already-locked open file again succeeds; anything else is not the lock
            if os.fstat(fd).st_ino != os.stat(lock.path).st_ino:
                raise RebuildRunning(f"file descriptor {fd} is not {lock.path}")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (OSError, BlockingIOError) as error:
            raise RebuildRunning(f"file descriptor {fd} does not hold {lock.path}: {error}") from None
        lock._fd = fd
        return lock

    def fileno(self) -> int:
        if self._fd is None:
            raise RuntimeError("the rebuild lock is not held")
        return self._fd

    def release(self) -> None:
        """Close this process's hold; a child that inherited the open file keeps the lock."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RebuildLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    @classmethod
    def is_held(cls, home: Path | str) -> bool:
        """Whether some process (this one included) holds the lock right now."""
        try:
            cls(home).acquire().release()
        except RebuildRunning:
            return True
        return False


def settle_abandoned_rebuilds(home: Path | str, lock: RebuildLock | None = None,
                              holder_job: str | None = None) -> list[str]:
    """Give a final state to rebuild and add jobs (they share the lock) still marked running
    whose process is gone (killed, crashed, machine restarted); returns their ids. A caller holding the lock (`lock`) knows
    every running rebuild but its own (`holder_job`) is dead; without the lock nothing is
    settled while some rebuild holds it."""
    if lock is None and RebuildLock.is_held(home):
        return []
    catalog, store = Catalog(home), AtlasStore(home)
    abandoned = [job["job_id"] for kind in (REBUILD, ADD)
                 for job in catalog.jobs(kind=kind, state="running", limit=1000) if job["job_id"] != holder_job]
    if not abandoned:
        return []
    published, live = _published_by_job(store), store.current_version()
    for job_id in abandoned:
        version = published.get(job_id)
        if version is not None and version == live:  # stopped after publishing, before saying so
            catalog.update_job(job_id, state="succeeded", version=version)
        elif version is not None:
            catalog.update_job(job_id, state="failed", version=version, message=(
                f"the process ({job_id.split('-')[0]}) stopped after writing version {version} but before making it "
                "live; the live version is unchanged and no correction was lost: run it again"))
        else:
            catalog.update_job(job_id, state="failed", message=(
                f"the {job_id.split('-')[0]} process stopped before it finished (killed or crashed); "
                "nothing was published and no correction was lost: run it again"))
    return abandoned


def _published_by_job(store: AtlasStore) -> dict[str, str]:
    published = {}
    for version in store.list_versions():
        job_id = store.manifest(version).get("job_id")
        if job_id:
            published[job_id] = version
    return published
