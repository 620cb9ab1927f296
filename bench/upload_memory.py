"""Memory and time of one upload, per route and image (issue 14, failure 1): each case runs in
its own process, which serves the atlas with a TestClient, warms up with a small image, then
sends one upload; the parent watches the child's resident memory and stops it past a ceiling.

    PYTHONPATH=. .venv/bin/python bench/upload_memory.py --home ATLAS_HOME [--ceiling-mb 6000]
        [--timeout-s 120] [--json out.json]

Images: smear-like fields of generated cells (7000x7000, 3000x3000, 2400x2400 JPEG, 2400x2400
PNG) and a 7000x7000 PNG of zeros, at the atlas's scale and at finer declared scales (reduced at
decode). Prints, per case: status, the request's wall time, and the process's peak resident
memory above what it held before the request (MB).
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))

ROUTES = ("/v1/reference-cells", "/v1/segment")


def smear_field(side: int, fmt: str, seed: int = 0) -> bytes:
    """A `side` x `side` field: glass with generated white cells, one at the centre."""
    import numpy as np
    from PIL import Image

    from atlas.synthetic import synthetic_cell

    rng = np.random.default_rng(seed)
    field = np.empty((side, side, 3), np.uint8)
    field[:] = (236, 214, 196)
    field += rng.integers(0, 8, (side, side, 1), dtype=np.uint8)
    cell = synthetic_cell("lymphocyte", rng)
    spots = [(side // 2 - 128, side // 2 - 128)]
    spots += [tuple(int(v) for v in rng.integers(0, side - 256, 2)) for _ in range(side // 700)]
    for row, col in spots:
        field[row:row + 256, col:col + 256] = cell
    buffer = io.BytesIO()
    Image.fromarray(field).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def zeros_png(side: int) -> bytes:
    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((side, side, 3), np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def child(home: str, route: str, path: str, um_per_pixel: str = "") -> None:
    """One case: warm up, then one upload; prints a JSON line."""
    import resource

    import numpy as np
    from fastapi.testclient import TestClient
    from PIL import Image

    from api.app import create_app
    from atlas.synthetic import synthetic_cell

    data = Path(path).read_bytes()
    warm = io.BytesIO()
    Image.fromarray(synthetic_cell("monocyte", np.random.default_rng(1))).save(warm, format="PNG")
    with TestClient(create_app(home, open_access=True)) as client:
        client.post(route, files={"image": ("w.png", warm.getvalue(), "image/png")})
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        started = time.perf_counter()
        response = client.post(route, params={"um_per_pixel": um_per_pixel} if um_per_pixel else {},
                               files={"image": (Path(path).name, data, "application/octet-stream")})
        ms = 1000 * (time.perf_counter() - started)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"status": response.status_code, "ms": round(ms),
                      "peak_rss_mb": round(after), "added_mb": round(after - before),
                      "detail": response.json().get("detail") if response.status_code >= 400 else None}))


def watch(command: list[str], ceiling_mb: float, timeout_s: float) -> dict:
    import psutil

    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    watched, peak, started = psutil.Process(process.pid), 0.0, time.monotonic()
    while process.poll() is None:
        try:
            peak = max(peak, watched.memory_info().rss / 2**20)
        except psutil.NoSuchProcess:
            break
        if peak > ceiling_mb or time.monotonic() - started > timeout_s:
            process.kill()
            process.wait()
            why = f"over {ceiling_mb:.0f} MB" if peak > ceiling_mb else f"over {timeout_s:.0f} s"
            return {"stopped": why, "peak_rss_mb": round(peak)}
        time.sleep(0.05)
    lines = process.stdout.read().strip().splitlines()
    return json.loads(lines[-1]) if lines else {"stopped": f"exit {process.returncode}"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", required=True)
    parser.add_argument("--ceiling-mb", type=float, default=6000)
    parser.add_argument("--timeout-s", type=float, default=120)
    parser.add_argument("--json")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.home, *args.child)
        return 0
    folder = Path(args.home).parent / "upload-images"
    folder.mkdir(exist_ok=True)
    images = {"jpeg-7000.jpg": lambda: smear_field(7000, "JPEG"),
              "png-zeros-7000.png": lambda: zeros_png(7000),
              "jpeg-3000.jpg": lambda: smear_field(3000, "JPEG"),
              "jpeg-2400.jpg": lambda: smear_field(2400, "JPEG"),
              "png-2400.png": lambda: smear_field(2400, "PNG")}
    # (image, um_per_pixel: "" for the atlas's own scale)
    cases = [("jpeg-7000.jpg", ""), ("png-zeros-7000.png", ""), ("jpeg-3000.jpg", ""),
             ("jpeg-7000.jpg", "0.025"), ("png-zeros-7000.png", "0.025"), ("jpeg-3000.jpg", "0.05"),
             ("jpeg-2400.jpg", ""), ("png-2400.png", "")]
    results = []
    for name, um_per_pixel in cases:
        path = folder / name
        if not path.exists():
            path.write_bytes(images[name]())
        for route in ROUTES:
            result = watch([sys.executable, __file__, "--home", args.home, "--child", route, str(path),
                            um_per_pixel], args.ceiling_mb, args.timeout_s)
            result = {"image": name, "um_per_pixel": um_per_pixel or None, "bytes": path.stat().st_size,
                      "route": route, **result}
            print(json.dumps(result), flush=True)
            results.append(result)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
