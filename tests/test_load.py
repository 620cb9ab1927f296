"""The load test (bench/load_test.py) in its CI size: a second process sends 4 clients' mix of
archived-cell queries, uploads (oversized ones included) and corrections for a few seconds while
a rebuild publishes a new version; every answer is an intended one (2xx, 413, 503 with
Retry-After), no acknowledged correction is lost or doubled, and the rebuild's version is
served. The full size (32 clients, 60 s) is run by hand: see the README."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import home_copy

REPOSITORY = Path(__file__).resolve().parents[1]


def test_a_short_load_with_a_rebuild_answers_only_intended_statuses(built_atlas, tmp_path):
    home = home_copy(built_atlas[0], tmp_path)
    out = tmp_path / "load.json"
    done = subprocess.run(
        [sys.executable, "bench/load_test.py", "--home", str(home), "--clients", "4", "--duration", "5",
         "--largest-side", "1500", "--json", str(out)],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["requests"] > 20 and report["unintended_errors"] == 0, report
    assert report["corrections_acknowledged"] > 0
    assert report["corrections_lost"] == report["corrections_doubled"] == 0
    assert report["rebuild"]["state"] == "succeeded" and report["live_version_after"] == "000002"
    assert "000002" in report["versions_served"]
    assert set(report["by_kind"].get("oversized_bytes", {"413": 0})) == {"413"}, report["by_kind"]
    assert set(report["by_kind"].get("oversized_pixels", {"413": 0})) <= {"413", "503"}, report["by_kind"]
    assert report["server_peak_rss_mb"] > 0
