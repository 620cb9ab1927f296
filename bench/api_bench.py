"""Benchmark of the HTTP API on a published atlas: latency of reference cells for archived cells
and for uploaded images (with the server's split into segmentation, embedding and search), then
many concurrent clients for a fixed time. Loopback traffic only.

    PYTHONPATH=. .venv/bin/python bench/api_bench.py --home H [--duration 60 --clients 16]

It starts `cellatlas serve` on 127.0.0.1 (a fresh reviewer key, revoked at the end, or --open),
waits for /readyz (the load time: from the server's start to its first ready answer, imports
included), measures, reads the server's resident memory (after loading and at the end, and its
peak), stops the server, prints a table and writes the figures as JSON.
Targets on 2 cores: archived p50 <= 10 ms and p99 <= 20 ms (at 1M cells too: issue 15; the
first API issue asked <= 50 ms), upload p50 <= 100 ms on the 7,500-cell atlas (first API issue
150 ms), 16 clients for 60 s without errors. A million-cell atlas for it: bench/scale_atlas.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import psutil

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))

from api import server  # noqa: E402 - after making the repository importable
from atlas.store import AtlasStore  # noqa: E402
from atlas.version import CELLS  # noqa: E402

TARGETS_MS = {"archived_p50": 10.0, "archived_p99": 20.0, "upload_p50": 100.0}
UPLOAD_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".bmp": "image/bmp",
                ".tif": "image/tiff", ".tiff": "image/tiff"}


class BenchError(RuntimeError):
    """The benchmark cannot run; the message says why."""


# -- the workload -------------------------------------------------------------------------------
@dataclass
class Workload:
    """What the clients ask for: archived cell ids, and image files (bytes) to upload."""

    version: str
    cells: int
    cell_ids: list[str]
    uploads: list[tuple[str, bytes]]  # (file name, content)
    k: int
    method: str

    @classmethod
    def from_atlas(cls, home: Path, uploads: int, k: int, method: str, seed: int) -> Workload:
        store = AtlasStore(home)
        version = store.require_current()
        cells = pd.read_parquet(store.version_dir(version) / CELLS, columns=["cell_id", "source_path"])
        rng = random.Random(seed)
        sources = sorted(set(cells["source_path"]))
        rng.shuffle(sources)
        files = []
        for path in sources:
            if len(files) >= uploads:
                break
            if Path(path).suffix.lower() in UPLOAD_TYPES and Path(path).is_file():
                files.append((Path(path).name, Path(path).read_bytes()))
        if not files:
            raise BenchError(f"none of the source images of version {version} can be read (moved?); "
                             "uploads need them")
        return cls(version, len(cells), cells["cell_id"].tolist(), files, k, method)

    def archived_request(self, rng: random.Random) -> tuple[str, str, dict]:
        cell_id = rng.choice(self.cell_ids)
        return "GET", f"/v1/cells/{cell_id}/reference-cells", {"params": {"k": self.k, "method": self.method}}

    def upload_request(self, rng: random.Random) -> tuple[str, str, dict]:
        name, data = rng.choice(self.uploads)
        content_type = UPLOAD_TYPES[Path(name).suffix.lower()]
        return "POST", "/v1/reference-cells", {"params": {"k": self.k, "method": self.method},
                                               "files": {"image": (name, data, content_type)}}


# -- the server ---------------------------------------------------------------------------------
class Server:
    """`cellatlas serve` in a child process on a free loopback port."""

    def __init__(self, home: Path, open_access: bool, log_path: Path, ready_timeout_s: float):
        self.home, self.open_access = home, open_access
        self.log_path, self.ready_timeout_s = log_path, ready_timeout_s
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key_name: str | None = None
        self.headers: dict[str, str] = {}
        self.process: subprocess.Popen | None = None
        self.load_s: float | None = None  # from the start of the process to its first ready answer

    def __enter__(self) -> Server:
        if not self.open_access:
            self.key_name = f"api-bench-{uuid.uuid4().hex[:8]}"
            self.headers = {"Authorization": f"Bearer {server.create_key(str(self.home), self.key_name, 'reviewer')}"}
        command = [sys.executable, "-m", "indexer.cli", "serve", "--home", str(self.home),
                   "--host", "127.0.0.1", "--port", str(self.port)] + (["--open"] if self.open_access else [])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")]))}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            env=env, cwd=REPOSITORY)
        try:
            self._wait_ready()
            self.load_s = time.perf_counter() - started
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(f"the server exited with code {self.process.returncode}; see {self.log_path}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise BenchError(f"the server was not ready after {self.ready_timeout_s:.0f} s; see {self.log_path}")

    def memory_mb(self) -> dict[str, float | None]:
        """The server's resident memory now and at its peak (MB; its child processes included
        now; the peak is the kernel's high-water mark of the server process, Linux only)."""
        process = psutil.Process(self.process.pid)
        rss = process.memory_info().rss + sum(child.memory_info().rss for child in process.children(recursive=True))
        return {"rss_mb": round(rss / 2**20, 1), "peak_rss_mb": _peak_rss_mb(self.process.pid)}

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
        if self.key_name is not None:
            server.revoke_key(str(self.home), self.key_name)
            self.key_name = None


def _peak_rss_mb(pid: int) -> float | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    peak = [line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")]
    return round(int(peak[0]) / 1024, 1) if peak else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# -- measuring ----------------------------------------------------------------------------------
@dataclass
class Samples:
    """Latencies (ms) of successful requests, and the failures."""

    latencies_ms: list[float] = field(default_factory=list)
    server_timings_ms: list[dict[str, float]] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    def failed(self, reason: str) -> None:
        self.errors[reason] = self.errors.get(reason, 0) + 1

    def summary(self) -> dict:
        values = np.array(self.latencies_ms)
        result = {"requests": len(values) + sum(self.errors.values()), "ok": len(values),
                  "errors": sum(self.errors.values()), "errors_by_reason": self.errors}
        if len(values):
            result.update({f"p{q}_ms": round(float(np.percentile(values, q)), 2) for q in (50, 90, 99)})
            result.update(mean_ms=round(float(values.mean()), 2), max_ms=round(float(values.max()), 2))
        if self.server_timings_ms:
            result["server_split_ms"] = time_split(self.server_timings_ms, values)
        return result


def time_split(timings: list[dict[str, float]], latencies_ms: np.ndarray) -> dict:
    """Median per server step (segment, embed, search_classify) and the rest of the request
    (HTTP, upload parsing, decoding, JSON), with each step's share of the median request."""
    steps = list(dict.fromkeys(name for timing in timings for name in timing))  # in the server's order
    medians = {name: float(np.median([t.get(name, 0.0) for t in timings])) for name in steps}
    inside = np.array([sum(t.values()) for t in timings])
    medians["other (http, decode, json)"] = float(np.median(latencies_ms - inside))
    total = sum(medians.values()) or 1.0
    return {name: {"median_ms": round(value, 2), "share": round(value / total, 3)} for name, value in medians.items()}


def sequential(client: httpx.Client, make_request, count: int, rng: random.Random, keep_timings: bool) -> Samples:
    samples = Samples()
    for _ in range(count):
        method, path, options = make_request(rng)
        started = time.perf_counter()
        try:
            response = client.request(method, path, **options)
        except httpx.HTTPError as error:
            samples.failed(type(error).__name__)
            continue
        elapsed = 1000 * (time.perf_counter() - started)
        if response.status_code != 200:
            samples.failed(f"HTTP {response.status_code}")
            continue
        samples.latencies_ms.append(elapsed)
        if keep_timings:
            samples.server_timings_ms.append(response.json().get("timings_ms") or {})
    return samples


async def concurrent(url: str, headers: dict, workload: Workload, clients: int, duration_s: float,
                     upload_share: float, seed: int) -> dict:
    """`clients` independent clients (one connection each) sending requests back to back for
    `duration_s`; a share `upload_share` of them are uploads, the rest archived-cell lookups."""
    kinds = {"archived": Samples(), "upload": Samples()}
    deadline = time.perf_counter() + duration_s

    async def one_client(index: int) -> None:
        rng = random.Random(seed + index)
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as client:
            while time.perf_counter() < deadline:
                kind = "upload" if rng.random() < upload_share else "archived"
                method, path, options = (workload.upload_request if kind == "upload" else workload.archived_request)(rng)
                started = time.perf_counter()
                try:
                    response = await client.request(method, path, **options)
                except httpx.HTTPError as error:
                    kinds[kind].failed(type(error).__name__)
                    continue
                if response.status_code == 200:
                    kinds[kind].latencies_ms.append(1000 * (time.perf_counter() - started))
                else:
                    kinds[kind].failed(f"HTTP {response.status_code}")

    started = time.perf_counter()
    await asyncio.gather(*(one_client(i) for i in range(clients)))
    elapsed = time.perf_counter() - started
    summaries = {kind: samples.summary() for kind, samples in kinds.items()}
    total = sum(s["requests"] for s in summaries.values())
    return {
        "clients": clients, "duration_s": round(elapsed, 2), "upload_share": upload_share,
        "requests": total, "errors": sum(s["errors"] for s in summaries.values()),
        "throughput_rps": round(total / elapsed, 2),
        "ok_throughput_rps": round(sum(s["ok"] for s in summaries.values()) / elapsed, 2),
        **summaries,
    }


# -- reporting ----------------------------------------------------------------------------------
def table(result: dict) -> str:
    lines = [f"CellAtlas API benchmark: atlas version {result['atlas']['version']} "
             f"({result['atlas']['cells']} cells), {result['machine']['cpus']} CPUs, k={result['settings']['k']}, "
             f"method={result['settings']['method']}", ""]
    header = f"{'measurement':<34}{'requests':>9}{'errors':>8}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'max ms':>9}"
    memory = result["server"]
    lines += [f"server: ready {memory['load_s']:.1f} s after its start (load time); resident memory "
              f"{memory['after_load']['rss_mb']:.0f} MB after loading, {memory['at_end']['rss_mb']:.0f} MB at the end"
              + (f", peak {memory['at_end']['peak_rss_mb']:.0f} MB" if memory["at_end"]["peak_rss_mb"] else ""), ""]
    lines += [header, "-" * len(header)]

    def row(name: str, s: dict) -> str:
        cells = [f"{s.get(key, float('nan')):>9.1f}" for key in ("p50_ms", "p90_ms", "p99_ms", "max_ms")]
        return f"{name:<34}{s['requests']:>9}{s['errors']:>8}" + "".join(cells)

    lines.append(row("archived cell, sequential", result["archived"]))
    lines.append(row("uploaded image, sequential", result["upload"]))
    load = result["concurrent"]
    lines.append(row(f"archived cell, {load['clients']} clients", load["archived"]))
    lines.append(row(f"uploaded image, {load['clients']} clients", load["upload"]))
    lines += ["", "uploaded image, where the time goes (median per request):"]
    for step, value in result["upload"].get("server_split_ms", {}).items():
        lines.append(f"  {step:<28}{value['median_ms']:>9.1f} ms  {value['share']:>6.1%}")
    lines += ["", f"{load['clients']} clients for {load['duration_s']:.0f} s: {load['requests']} requests, "
                  f"{load['errors']} errors, {load['throughput_rps']:.1f} requests/s "
                  f"({load['upload_share']:.0%} uploads)", "", "targets:"]
    for name, verdict in result["targets"].items():
        lines.append(f"  {name:<40}{verdict}")
    return "\n".join(lines)


def verdicts(result: dict) -> dict[str, str]:
    def check(value, limit, unit="ms"):
        if value is None:
            return "not measured"
        return f"{value:.1f} {unit} (target <= {limit:g}): {'met' if value <= limit else 'MISSED'}"

    load = result["concurrent"]
    return {
        "archived p50": check(result["archived"].get("p50_ms"), TARGETS_MS["archived_p50"]),
        "archived p99": check(result["archived"].get("p99_ms"), TARGETS_MS["archived_p99"]),
        "upload p50": check(result["upload"].get("p50_ms"), TARGETS_MS["upload_p50"]),
        f"{load['clients']} clients, no errors": f"{load['errors']} errors: {'met' if load['errors'] == 0 else 'MISSED'}",
    }


# -- command line ----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", required=True, help="ATLAS_HOME with a published atlas")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of concurrent load (default 60)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument("--archived-requests", type=int, default=500, help="sequential archived lookups (default 500)")
    parser.add_argument("--upload-requests", type=int, default=100, help="sequential uploads (default 100)")
    parser.add_argument("--upload-files", type=int, default=200, help="distinct source images to upload (default 200)")
    parser.add_argument("--upload-share", type=float, default=0.25,
                        help="share of uploads among the concurrent requests (default 0.25)")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured requests of each kind first (default 20)")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--method", default="latent", choices=["latent", "som"])
    parser.add_argument("--open", action="store_true", help="serve without authentication instead of a fresh key")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ready-timeout", type=float, default=600.0,
                        help="seconds the server may take to load the atlas (default 600)")
    parser.add_argument("--out", help="JSON file (default: bench/results/api-<version>-<time>.json)")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.duration <= 0 or not 0 <= args.upload_share <= 1 or args.ready_timeout <= 0:
        parser.error("--clients must be >= 1, --duration and --ready-timeout > 0 and --upload-share within [0, 1]")

    home = Path(args.home).resolve()
    try:
        workload = Workload.from_atlas(home, args.upload_files, args.k, args.method, args.seed)
    except (BenchError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or REPOSITORY / "bench" / "results" / f"api-{workload.version}-{stamp}.json")
    rng = random.Random(args.seed)
    print(f"atlas {workload.version}: {workload.cells} cells, {len(workload.uploads)} images to upload; "
          "starting the server ...", file=sys.stderr)
    try:
        with Server(home, args.open, out.with_suffix(".server.log"), ready_timeout_s=args.ready_timeout) as live:
            server_figures = {"load_s": round(live.load_s, 2), "after_load": live.memory_mb()}
            with httpx.Client(base_url=live.url, headers=live.headers, timeout=60) as client:
                sequential(client, workload.archived_request, args.warmup, rng, keep_timings=False)
                sequential(client, workload.upload_request, args.warmup, rng, keep_timings=False)
                print("sequential archived-cell lookups ...", file=sys.stderr)
                archived = sequential(client, workload.archived_request, args.archived_requests, rng, False)
                print("sequential uploads ...", file=sys.stderr)
                upload = sequential(client, workload.upload_request, args.upload_requests, rng, True)
            print(f"{args.clients} concurrent clients for {args.duration:g} s ...", file=sys.stderr)
            load = asyncio.run(concurrent(live.url, live.headers, workload, args.clients, args.duration,
                                          args.upload_share, args.seed))
            server_command = " ".join(map(str, live.process.args))
            server_figures["at_end"] = live.memory_mb()
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1

    result = {
        "atlas": {"home": str(home), "version": workload.version, "cells": workload.cells},
        "machine": {"cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                    "platform": platform.platform(), "python": platform.python_version()},
        "settings": {**{k: v for k, v in vars(args).items() if k not in ("home", "out")},
                     "server": server_command, "auth": "open" if args.open else "bearer key (reviewer)"},
        "server": server_figures,
        "archived": archived.summary(),
        "upload": upload.summary(),
        "concurrent": load,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    result["targets"] = verdicts(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(table(result))
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
