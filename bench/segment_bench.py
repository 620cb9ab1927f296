"""Benchmark of a segmenter on the real data beside the repository (issue #3, smear fields):

- BCCD smear fields (640x480, Pascal VOC boxes): white-cell recall and precision at box IoU >= 0.5,
  for the even-numbered files (sorted; the half the rules were checked on while they were
  written), the odd-numbered files (held out) and all; time per field;
- wbc_seg single-cell images with expert masks: Dice of the main cell and of its nucleus per set.

    PYTHONPATH=. .venv/bin/python bench/segment_bench.py [--segmenter classical|MODEL_DIR] [--json out.json]

Scales: BCCD 0.07 um/px (from its red-cell boxes, 7.5 um), wbc_seg tecom 0.157, cellavision 0.082.
The issue's targets: recall >= 0.95 on BCCD with few false cells; single-cell Dice not lower than
before (tecom cell 0.844 / nucleus 0.934, cellavision 0.731 / 0.971 with the first classical one).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))

from atlas.segmentation import load_segmenter  # noqa: E402
from atlas.segmentation.scoring import evaluate_boxes, evaluate_mask_sets  # noqa: E402

DATA = REPOSITORY.parent / "shared" / "data"
SCALES = {"bccd": 0.07, "tecom": 0.157, "cellavision": 0.082}


def box_scores(rows: list[dict]) -> dict:
    annotated, found, matched = (sum(r[k] for r in rows) for k in ("annotated", "found", "matched"))
    return {"images": len(rows), "annotated": annotated, "found": found, "matched": matched,
            "recall": matched / annotated if annotated else None,
            "precision": matched / found if found else None,
            "mean_ms": sum(r["ms"] for r in rows) / len(rows) if rows else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--segmenter", default="classical", help="'classical' or a trained model folder")
    parser.add_argument("--data", type=Path, default=DATA, help="the shared data folder")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)

    bccd = evaluate_boxes(load_segmenter(args.segmenter, SCALES["bccd"]), args.data / "bccd" / "images",
                          args.data / "bccd" / "annotations")
    rows = sorted(bccd["per_image"], key=lambda r: r["image"])
    halves = {"even": box_scores(rows[0::2]), "odd": box_scores(rows[1::2]), "all": box_scores(rows)}
    masks = evaluate_mask_sets(args.segmenter, args.data / "wbc_seg", None,
                               um_per_pixel={k: SCALES[k] for k in ("tecom", "cellavision")})
    print(f"segmenter {bccd['segmenter']}")
    print("BCCD white cells (box IoU >= 0.5)   recall  precision  found/annotated  ms/field")
    for name, s in halves.items():
        print(f"  {name:5s} ({s['images']:3d} fields)            {s['recall']:.3f}   {s['precision']:.3f}"
              f"      {s['found']:4d}/{s['annotated']:<4d}       {s['mean_ms']:.0f}")
    print("wbc_seg main cell                     cell Dice  nucleus Dice  ms/image  no cell")
    for name, s in masks["sets"].items():
        print(f"  {name:12s} ({s['images']:3d} images)       {s['mean_cell_dice']:.3f}      {s['mean_nucleus_dice']:.3f}"
              f"        {s['mean_ms']:.0f}       {s['no_cell_found']}")
    if args.json:
        per_set = {name: {k: v for k, v in s.items()} for name, s in masks["sets"].items()}
        args.json.write_text(json.dumps({"segmenter": bccd["segmenter"], "bccd": halves,
                                         "bccd_per_image": rows, "wbc_seg": per_set}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
