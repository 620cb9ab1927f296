"""`make demo`: generate a small synthetic archive, build an atlas from it, query it, serve it.

Runs on a fresh machine with no data in a few minutes on 2 cores (the `tiny` backbone preset).
"""

from __future__ import annotations

import sys
from pathlib import Path

from atlas.synthetic import CLASSES, synthetic_cell, write_synthetic_archive

PER_CLASS = 60


def run_demo(home: Path, serve: bool = True, port: int = 8000) -> int:
    import numpy as np

    from atlas.reference import LoadedAtlas
    from indexer.build import build
    from indexer.config import BuildConfig

    images = home / "demo-images"
    if not images.exists():
        print(f"generating {PER_CLASS} synthetic cells for each of {', '.join(CLASSES)} in {images}")
        write_synthetic_archive(images, per_class=PER_CLASS, seed=0)
    result = build(BuildConfig(images=images, home=home, preset="tiny", epochs=12, vae_epochs=30))
    atlas = LoadedAtlas.open(home)
    query = synthetic_cell("monocyte", np.random.default_rng(12345))
    answer = atlas.query_image(query, k=8)
    print(f"\nquery: a new synthetic monocyte -> predicted {answer.prediction.label} "
          f"(entropy {answer.prediction.entropy_bits:.2f} bits)")
    print("reference cells: " + ", ".join(f"{r.label} ({r.distance:.3g})" for r in answer.references))
    if not serve:
        return 0
    try:
        from api.server import run
    except ImportError:
        print("the API is not available in this checkout; the atlas is built in", home)
        return 0
    print("\n" + "!" * 72 + f"\n  DEMO: serving atlas {result.version} WITHOUT authentication (--open)"
          f"\n  open http://127.0.0.1:{port}/ in a browser; Ctrl-C stops\n" + "!" * 72, file=sys.stderr)
    run(str(home), host="127.0.0.1", port=port, open_access=True)
    return 0
