"""Rebuild jobs started from the API: each runs as its own process (`cellatlas rebuild`, the
installed command), so that a long rebuild neither blocks requests nor dies with the server,
and reports its progress in the catalogue's jobs table, which the API reads back."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

from atlas.catalog import Catalog
from atlas.jobs import REBUILD, RebuildLock, RebuildRunning, new_job_id, settle_abandoned_rebuilds
from atlas.runtime import set_openmp_wait
from atlas.store import AtlasStore

log = logging.getLogger("cellatlas.api")


class UnknownJob(LookupError):
    """No rebuild job has this id."""


class RebuildAlreadyRunning(RebuildRunning):
    """A rebuild is running; `job_id` names it when the catalogue knows it."""

    def __init__(self, job_id: str | None):
        self.job_id = job_id
        where = f" (job {job_id}; follow it at /v1/rebuilds/{job_id})" if job_id else ""
        super().__init__(f"a rebuild is already running{where}; start another when it has finished")


class RebuildLauncher:
    def __init__(self, home: Path, catalog: Catalog):
        self.home = home
        self.catalog = catalog

    def start(self, retrain_backbone: bool) -> dict:
        """Start a rebuild process and return its job. The lock is taken here and handed to
        the process (an inherited file descriptor), so two requests cannot both start one."""
        AtlasStore(self.home).require_current()  # nothing to rebuild: 503, no job
        try:
            lock = RebuildLock(self.home).acquire()
        except RebuildRunning:
            running = self.catalog.jobs(kind=REBUILD, state="running", limit=1)
            raise RebuildAlreadyRunning(running[0]["job_id"] if running else None) from None
        try:
            settle_abandoned_rebuilds(self.home, lock=lock)  # holding the lock: the others are dead
            job_id = new_job_id()
            self.catalog.start_job(job_id, REBUILD)
            self.catalog.update_job(job_id, progress={"step": "starting", "done": 0,
                                                      "retrain_backbone": retrain_backbone})
            command = rebuild_command(self.home, job_id, lock.fileno(), retrain_backbone)
            log_path = self.home / "logs" / f"{job_id}.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            try:
                with open(log_path, "ab") as output:
                    process = subprocess.Popen(
                        command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                        pass_fds=(lock.fileno(),), env=_child_environment(),
                        start_new_session=True)  # a rebuild outlives a server stopped with Ctrl-C
            except OSError as error:
                self.catalog.update_job(job_id, state="failed",
                                        message=f"cannot start the rebuild process: {error}")
                raise
        finally:
            lock.release()  # the child holds it now (or nobody does, if it could not start)
        log.info("rebuild %s started (process %d, log %s)", job_id, process.pid, log_path)
        # Wait for it in the background so that it does not linger as a zombie.
        threading.Thread(target=process.wait, name=f"wait-{job_id}", daemon=True).start()
        return self.catalog.job(job_id)

    def job(self, job_id: str) -> dict:
        """A rebuild job as the jobs table has it; a job whose process died is settled first."""
        settle_abandoned_rebuilds(self.home)
        job = self.catalog.job(job_id)
        if job is None or job["kind"] != REBUILD:
            raise UnknownJob(job_id)
        return job

    def recent(self, limit: int) -> list[dict]:
        settle_abandoned_rebuilds(self.home)
        return self.catalog.jobs(kind=REBUILD, limit=limit)


def rebuild_command(home: Path, job_id: str, lock_fd: int, retrain_backbone: bool) -> list[str]:
    """`cellatlas rebuild` for this job: the `cellatlas` script installed beside this Python
    (`python -m indexer.cli` only where the script is missing, e.g. a checkout run in place),
    reporting to the job's row and holding the lock handed over as `lock_fd`."""
    script = Path(sys.executable).parent / "cellatlas"
    program = [str(script)] if script.is_file() else [sys.executable, "-m", "indexer.cli"]
    return [*program, "rebuild", "--home", str(home), "--job-id", job_id, "--lock-fd", str(lock_fd),
            *(["--retrain-backbone"] if retrain_backbone else [])]


def _child_environment() -> dict[str, str]:
    """This environment, with OpenMP threads that sleep rather than spin while they wait: the
    rebuild shares the cores with this server, and spinning XGBoost threads made its
    classifier step 10-60x slower on 2 busy cores (measured: 7-32 s instead of 1 s on the test
    atlas)."""
    env = dict(os.environ)
    set_openmp_wait(shares_cores=True, environ=env)
    return env
