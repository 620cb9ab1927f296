"""A bounded load test of the HTTP service from a second process on loopback (issue 14).

It starts `cellatlas serve` on a copy-free ATLAS_HOME (keys are added to its catalogue), then
`--clients` threads send, for `--duration` seconds, a mix of: reference cells of archived cells,
crop images and the atlas summary; uploads of one cell; uploads of the largest field the server
works on (`--largest-side`); oversized uploads (over the byte limit, and a 7000x7000 PNG over the
pixel limit); label corrections with Idempotency-Keys. A third of the way in, an admin starts a
rebuild, which publishes a new version while the load goes on. Every answer must be the one
intended: 2xx, 413 for oversized uploads, 503 with Retry-After for uploads over the concurrency
limit (not for those over the byte limit, refused before they wait); anything else (another status, a connection error) is an error. Afterwards every
acknowledged correction must be stored exactly once.

    PYTHONPATH=. .venv/bin/python bench/load_test.py --home ATLAS_HOME [--clients 32]
        [--duration 60] [--json out.json]

Plain threads and httpx rather than locust: locust's gevent patches the process and its web UI
and stats add little to a fixed mix whose one verdict is "no unintended answer"; threads keep
this script dependency-free beyond the project's own test extras.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))

MIB = 1024 * 1024
# (kind, weight): what one client request is, drawn at random with these weights.
MIX = (("archived_reference", 30), ("crop_image", 15), ("atlas", 5), ("upload_cell", 15),
       ("upload_largest", 4), ("oversized_bytes", 3), ("oversized_pixels", 3), ("correction", 25))
UPLOADS = {"upload_cell", "upload_largest", "oversized_bytes", "oversized_pixels"}


def images(largest_side: int) -> dict[str, bytes]:
    import numpy as np
    from PIL import Image

    from atlas.synthetic import synthetic_cell

    def encoded(array, fmt="JPEG", **options) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format=fmt, **options)
        return buffer.getvalue()

    rng = np.random.default_rng(0)
    field = np.empty((largest_side, largest_side, 3), np.uint8)
    field[:] = (236, 214, 196)
    field += rng.integers(0, 6, field.shape[:2] + (1,), dtype=np.uint8)
    for _ in range(6):
        row, col = (int(v) for v in rng.integers(0, largest_side - 256, 2))
        field[row:row + 256, col:col + 256] = synthetic_cell("neutrophil", rng)
    return {"cell": encoded(synthetic_cell("monocyte", rng), "PNG"),
            "largest": encoded(field, quality=92),
            "oversized_pixels": encoded(np.zeros((7000, 7000), np.uint8), "PNG")}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """`cellatlas serve` in its own process, its peak resident memory sampled (the rebuild it
    starts is a separate process, sampled apart)."""

    def __init__(self, home: Path, port: int, env: dict[str, str]):
        import psutil

        self.process = subprocess.Popen(
            [sys.executable, "-m", "indexer.cli", "serve", "--home", str(home), "--port", str(port)],
            cwd=REPOSITORY, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.psutil = psutil.Process(self.process.pid)
        self.peak_mb = self.rebuild_peak_mb = 0.0
        self.running = True
        self.sampler = threading.Thread(target=self._sample, daemon=True)
        self.sampler.start()

    def _sample(self) -> None:
        import psutil

        while self.running:
            try:
                self.peak_mb = max(self.peak_mb, self.psutil.memory_info().rss / MIB)
                children = sum(child.memory_info().rss for child in self.psutil.children(recursive=True))
                self.rebuild_peak_mb = max(self.rebuild_peak_mb, children / MIB)
            except psutil.Error:
                pass
            time.sleep(0.05)

    def stop(self) -> str:
        self.running = False
        self.process.terminate()
        try:
            _, err = self.process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, err = self.process.communicate()
        return err.decode(errors="replace")


def run(home: Path, clients: int, duration: float, largest_side: int, env_overrides: dict[str, str],
        rebuild_wait_s: float) -> dict:
    import httpx

    from atlas.catalog import Catalog
    from atlas.store import AtlasStore

    catalog = Catalog(home)
    suffix = uuid.uuid4().hex[:6]
    headers = {"Authorization": f"Bearer {catalog.create_key(f'load-tech-{suffix}', 'technologist')}"}
    admin = {"Authorization": f"Bearer {catalog.create_key(f'load-admin-{suffix}', 'admin')}"}
    data = images(largest_side)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_overrides}
    server = Server(home, port, env)
    deadline = time.monotonic() + 180
    with httpx.Client(base_url=base, timeout=10) as http:
        while True:
            if server.process.poll() is not None:
                raise SystemExit(f"the server exited at start:\n{server.stop()[-3000:]}")
            try:
                if http.get("/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the server did not become ready in 180 s")
            time.sleep(0.2)
        cells = [c["cell_id"] for c in http.get("/v1/cells", params={"limit": 1000}, headers=headers).json()["items"]]
        first_version = http.get("/v1/atlas", headers=headers).json()["version"]
    idle_mb = server.psutil.memory_info().rss / MIB
    labels = ("neutrophil", "lymphocyte", "monocyte", "eosinophil")

    counts: dict[str, Counter] = defaultdict(Counter)
    latencies: dict[str, list[float]] = defaultdict(list)
    errors: list[str] = []
    acknowledged: dict[str, int] = {}
    versions_seen: set[str] = {first_version}
    lock = threading.Lock()
    stop_at = time.monotonic() + duration

    def intended(kind: str, response) -> bool:
        if kind in UPLOADS and response.status_code == 503:  # over the concurrency limit
            return "Retry-After" in response.headers and kind != "oversized_bytes"
        if kind in ("oversized_bytes", "oversized_pixels"):
            return response.status_code == 413
        return response.status_code in (200, 201)

    def client(seed: int) -> None:
        chooser = random.Random(seed)
        kinds, weights = zip(*MIX)
        with httpx.Client(base_url=base, headers=headers, timeout=120) as http:
            while time.monotonic() < stop_at:
                kind = chooser.choices(kinds, weights)[0]
                cell_id = chooser.choice(cells)
                key = None
                started = time.perf_counter()
                try:
                    if kind == "archived_reference":
                        response = http.get(f"/v1/cells/{cell_id}/reference-cells", params={"k": 8})
                    elif kind == "crop_image":
                        response = http.get(f"/v1/cells/{cell_id}/image")
                    elif kind == "atlas":
                        response = http.get("/v1/atlas")
                    elif kind == "upload_cell":
                        response = http.post("/v1/reference-cells", files={"image": ("c.png", data["cell"], "image/png")})
                    elif kind == "upload_largest":
                        response = http.post("/v1/segment", files={"image": ("f.jpg", data["largest"], "image/jpeg")})
                    elif kind == "oversized_bytes":
                        response = http.post("/v1/classify", files={"image": ("big.jpg", b"\xff" * (21 * MIB), "image/jpeg")})
                    elif kind == "oversized_pixels":
                        response = http.post("/v1/segment", files={"image": ("z.png", data["oversized_pixels"], "image/png")})
                    else:
                        key = f"load-{uuid.uuid4().hex}"
                        response = http.post(f"/v1/cells/{cell_id}/corrections", headers={"Idempotency-Key": key},
                                             json={"label": chooser.choice(labels), "note": key})
                except httpx.HTTPError as error:
                    with lock:
                        counts[kind]["connection error"] += 1
                        errors.append(f"{kind}: {type(error).__name__}: {error}")
                    continue
                elapsed = time.perf_counter() - started
                with lock:
                    counts[kind][response.status_code] += 1
                    latencies[kind].append(elapsed)
                    if not intended(kind, response):
                        errors.append(f"{kind}: {response.status_code} {response.text[:300]}")
                    if key is not None and response.status_code == 201:
                        acknowledged[key] = response.json()["correction_id"]
                    if kind == "atlas" and response.status_code == 200:
                        versions_seen.add(response.json()["version"])

    threads = [threading.Thread(target=client, args=(seed,), daemon=True) for seed in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    rebuild: dict = {}
    with httpx.Client(base_url=base, headers=admin, timeout=60) as http:
        time.sleep(duration / 3)
        answer = http.post("/v1/rebuilds", json={}, headers={"Idempotency-Key": f"load-rebuild-{suffix}"})
        rebuild = {"status": answer.status_code, **(answer.json() if answer.status_code == 202 else {})}
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
        if answer.status_code == 202:  # let it finish, then see the server serve its version
            end = time.monotonic() + rebuild_wait_s
            while time.monotonic() < end:
                job = http.get(f"/v1/rebuilds/{rebuild['job_id']}").json()
                if job["state"] != "running":
                    break
                time.sleep(0.5)
            rebuild = {"job_id": job["job_id"], "state": job["state"], "version": job.get("version"),
                       "message": job.get("message")}
            end = time.monotonic() + 10
            while time.monotonic() < end and job.get("version"):
                served = http.get("/v1/atlas").json()["version"]
                versions_seen.add(served)
                if served == job["version"]:
                    break
                time.sleep(0.5)
        stored = Counter()
        cursor = None
        while True:
            page = http.get("/v1/corrections", params={"limit": 1000, **({"cursor": cursor} if cursor else {})}).json()
            stored.update(c["note"] for c in page["items"] if (c["note"] or "").startswith("load-"))
            cursor = page["next_cursor"]
            if cursor is None:
                break
    log = server.stop()
    lost = [key for key in acknowledged if stored[key] == 0]
    doubled = [key for key, n in stored.items() if n > 1]
    served = sum(sum(c.values()) for c in counts.values())
    return {
        "clients": clients, "duration_s": round(elapsed, 1), "requests": served,
        "requests_per_s": round(served / elapsed, 1),
        "by_kind": {kind: {str(status): n for status, n in sorted(c.items(), key=str)} for kind, c in counts.items()},
        "latency_ms": {kind: {"p50": round(1000 * sorted(v)[len(v) // 2]), "p95": round(1000 * sorted(v)[int(len(v) * 0.95)]),
                              "max": round(1000 * max(v))} for kind, v in latencies.items() if v},
        "unintended_errors": len(errors), "error_examples": errors[:10],
        "corrections_acknowledged": len(acknowledged), "corrections_lost": len(lost),
        "corrections_doubled": len(doubled),
        "rebuild": rebuild, "versions_served": sorted(versions_seen),
        "live_version_after": AtlasStore(home).current_version(),
        "server_idle_rss_mb": round(idle_mb), "server_peak_rss_mb": round(server.peak_mb), "rebuild_peak_rss_mb": round(server.rebuild_peak_mb),
        "largest_upload": f"{largest_side}x{largest_side} JPEG, {len(data['largest']) / MIB:.1f} MB",
        "server_settings": env_overrides,
        "server_log_tail": log[-1500:] if errors else "",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", required=True, help="ATLAS_HOME to serve (keys are added to it)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=60, help="seconds of load")
    parser.add_argument("--largest-side", type=int, default=2448,
                        help="side of the largest field uploaded (default: just inside the 6 Mpx limit)")
    parser.add_argument("--max-concurrent-uploads", default=None, help="CELLATLAS_MAX_CONCURRENT_UPLOADS")
    parser.add_argument("--upload-wait-s", default=None, help="CELLATLAS_UPLOAD_WAIT_S")
    parser.add_argument("--rebuild-wait-s", type=float, default=300)
    parser.add_argument("--json", help="write the report here too")
    args = parser.parse_args(argv)
    overrides = {name: value for name, value in (("CELLATLAS_MAX_CONCURRENT_UPLOADS", args.max_concurrent_uploads),
                                                 ("CELLATLAS_UPLOAD_WAIT_S", args.upload_wait_s)) if value}
    report = run(Path(args.home), args.clients, args.duration, args.largest_side, overrides, args.rebuild_wait_s)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    ok = (report["unintended_errors"] == 0 and report["corrections_lost"] == 0
          and report["corrections_doubled"] == 0 and report["rebuild"].get("state") == "succeeded")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
