"""kill -9 of `cellatlas rebuild` at each of its steps and at the pointer switch (issue 14): the
live version keeps serving, no partial version is ever listed, and the next rebuild succeeds.

Each rebuild process loads the test's own sitecustomize (no hook in the code), which pauses it
at one point and says so in a file; the test then kills it with SIGKILL. The eight processes run
side by side, each on its own copy of the tiny atlas, to keep the test short.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from atlas.catalog import Catalog
from atlas.reference import LoadedAtlas
from atlas.store import AtlasStore
from indexer.rebuild import STEPS, rebuild
from tests.conftest import home_copy, open_client

pytestmark = pytest.mark.filterwarnings("ignore:n_jobs value .* overridden:UserWarning")

# Where a rebuild is stopped: at the start of each step, once its version folder has been
# renamed into place but before `current` names it, and with the new `current` written to its
# temporary file but not yet renamed over the old one.
KILL_POINTS = (*STEPS, "version renamed, pointer not written", "pointer written, not renamed")

PAUSE_AT = '''
# Loaded by the rebuild process the test starts (PYTHONPATH): pause at {point!r}, say so, wait.
import os
import time
from pathlib import Path

POINT, MARKER = {point!r}, {marker!r}


def _pause():
    Path(MARKER).write_text(str(os.getpid()))
    time.sleep(300)


import atlas.store
import indexer.rebuild

_step, _write_atomic, _replace = indexer.rebuild._Rebuild.step, atlas.store.write_atomic, os.replace


def step(self, name, **details):
    _step(self, name, **details)
    if name == POINT:
        _pause()


def write_atomic(path, data, fsync=True):
    if POINT == "version renamed, pointer not written" and Path(path).name == "current":
        _pause()
    _write_atomic(path, data, fsync)


def replace(source, target, *args, **kwargs):
    if POINT == "pointer written, not renamed" and Path(target).name == "current":
        _pause()
    return _replace(source, target, *args, **kwargs)


indexer.rebuild._Rebuild.step = step
atlas.store.write_atomic = write_atomic
os.replace = replace
'''


def start_paused_rebuild(home: Path, point: str, folder: Path) -> tuple[subprocess.Popen, Path]:
    hooks, marker = folder / "hooks", folder / "paused"
    hooks.mkdir(parents=True)
    (hooks / "sitecustomize.py").write_text(PAUSE_AT.format(point=point, marker=str(marker)))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen([sys.executable, "-m", "indexer.cli", "rebuild", "--home", str(home)],
                               cwd=Path(__file__).resolve().parents[1], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return process, marker


def test_a_rebuild_killed_at_any_step_leaves_the_live_version_serving(built_atlas, tmp_path):
    homes, runs = {}, {}
    for index, point in enumerate(KILL_POINTS):
        home = homes[point] = home_copy(built_atlas[0], tmp_path / f"kill-{index}")
        cell_id = AtlasStore(home).version("000001").read_cells()["cell_id"].iat[0]
        Catalog(home).add_correction(cell_id, None, "eosinophil", "to rebuild", "tech", "000001")
        runs[point] = start_paused_rebuild(home, point, tmp_path / f"hooks-{index}")
    deadline = time.monotonic() + 300
    for point, (process, marker) in runs.items():
        while not marker.exists():
            assert process.poll() is None, (point, process.stderr.read().decode()[-2000:])
            assert time.monotonic() < deadline, f"the rebuild never reached {point!r}"
            time.sleep(0.1)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        process.stderr.close()

    for point, home in homes.items():
        store = AtlasStore(home)
        assert store.current_version() == "000001", point
        # No partial version: every version listed is complete and loads.
        for version in store.list_versions():
            assert LoadedAtlas(home, version).cells is not None, (point, version)
        with open_client(home) as client:
            served = client.get("/v1/atlas").json()
            assert served["version"] == "000001", point
            cell = client.get("/v1/cells", params={"limit": 1}).json()["items"][0]
            assert client.get(cell["image_url"]).status_code == 200
        # The next rebuild succeeds (in this process: it is the same code, without the pause).
        published = rebuild(home, progress=False, threads=1)
        assert store.current_version() == published and published > "000001", point
        assert not list(store.versions.glob(".staging-*")), point
        jobs = Catalog(home).jobs(kind="rebuild")
        assert jobs[0]["state"] == "succeeded", (point, jobs)
