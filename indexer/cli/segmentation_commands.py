"""`cellatlas segment` and `cellatlas segmenter train|evaluate`: find white cells, train and
score segmenters."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from indexer import report
from indexer.cli.args import EXIT_BAD_INPUT, parse_scales, positive_float, positive_int, read_file


def add_commands(sub) -> None:
    p = sub.add_parser("segment", help="find the white cells of images (boxes, areas, masks)")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--home", help="use the live atlas's segmenter and scale")
    source.add_argument("--model", help="a trained segmenter folder (default: classical thresholds)")
    p.add_argument("--um-per-pixel", type=positive_float, help="image scale without --home (default 0.1)")
    p.add_argument("--out", help="write <name>.png label masks of the main cell here (255 nucleus, 128 cytoplasm)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=cmd_segment)

    p = sub.add_parser("segmenter", help="train and evaluate cell segmenters")
    seg = p.add_subparsers(title="segmenter commands")
    s = seg.add_parser("train", help="train a cellpose segmenter on images with masks")
    s.add_argument("--images", required=True,
                   help="images/ folder of one set, or a folder of sets <name>/images + <name>/masks")
    s.add_argument("--masks", help="the masks/ folder of one set (255 nucleus, 128 cytoplasm, 0 background)")
    s.add_argument("--um-per-pixel", action="append", metavar="X or SET=X",
                   help="scale of the images: one value, or one per set (repeat: --um-per-pixel tecom=0.16 ...)")
    s.add_argument("--out", required=True, help="new folder for the model")
    s.add_argument("--epochs", type=positive_int, default=60, help="default 60")
    s.add_argument("--holdout", type=float, default=0.2, help="share of each set held out and scored (default 0.2)")
    s.add_argument("--nucleus-model", action="store_true",
                   help="also train a network for nuclei (default: the classical nucleus threshold)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=positive_int, help="CPU threads (default: torch's)")
    s.add_argument("--device", default="cpu", help="cpu, or auto / cuda for a GPU")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(run=cmd_segmenter_train)

    s = seg.add_parser("evaluate", help="score a segmenter against masks (Dice, IoU) or boxes (recall, precision)")
    s.add_argument("--images", required=True, help="images/ folder, or a folder of sets as for train")
    truth = s.add_mutually_exclusive_group()
    truth.add_argument("--masks", help="mask folder (255 nucleus, 128 cytoplasm, 0 background)")
    truth.add_argument("--boxes", help="folder of Pascal VOC .xml files (objects named WBC)")
    s.add_argument("--model", help="a trained segmenter folder (default: classical thresholds)")
    s.add_argument("--um-per-pixel", action="append", metavar="X or SET=X",
                   help="scale: one value, or one per set (default: the model's training scale, else 0.1)")
    s.add_argument("--held-out-of", metavar="MODEL",
                   help="only the images this trained model held out (compare segmenters on them)")
    s.add_argument("--iou", type=float, default=0.5, help="box IoU for a match (default 0.5)")
    s.add_argument("--json", metavar="OUT", help="write the full report (per image too) here")
    s.set_defaults(run=cmd_segmenter_evaluate)



def cmd_segment(args) -> int:
    """Cells found in each image. Exit 0 when every file was read (an image without a white
    cell is a result: reported, not an error); exit 2 when a file could not be read or was too
    small (the others are still segmented and reported)."""
    from PIL import Image

    from atlas.cell import REFERENCE_UM_PER_PIXEL, SegmentationError
    from atlas.ingest import ImageReadError, read_image_bytes
    from atlas.segmentation import load_segmenter
    from atlas.store import AtlasStore

    if args.home:
        if args.um_per_pixel:
            raise ValueError("--um-per-pixel cannot be combined with --home: the atlas has its own scale")
        store = AtlasStore(args.home)
        segmenter = store.version(store.require_current()).read_segmenter()
    else:
        segmenter = load_segmenter(args.model, args.um_per_pixel or REFERENCE_UM_PER_PIXEL)
    out = Path(args.out) if args.out else None
    if out:
        stems = [Path(p).stem for p in args.images]
        repeated = sorted({s for s in stems if stems.count(s) > 1})
        if repeated:
            raise ValueError(f"--out writes one <name>.png per image, but several images are named "
                             f"{', '.join(repeated)}")
        out.mkdir(parents=True, exist_ok=True)
    results, failed = [], 0
    for path in args.images:
        try:
            image = read_image_bytes(read_file(path))
            started = time.perf_counter()
            regions = segmenter.segment(image)
        except (ImageReadError, SegmentationError, FileNotFoundError, ValueError) as error:
            print(f"error: {path}: {error}", file=sys.stderr)
            results.append({"image": path, "error": str(error)})
            failed += 1
            continue
        results.append(_segment_result(path, image, regions, segmenter, time.perf_counter() - started))
        if out and regions:
            mask_path = out / f"{Path(path).stem}.png"
            Image.fromarray(regions[0].label_mask()).save(mask_path)
            results[-1]["mask"] = str(mask_path)
        if not args.json:
            print(report.segment_text(results[-1]))
    if args.json:
        print(json.dumps(results, indent=2))
    return EXIT_BAD_INPUT if failed else 0


def _segment_result(path, image, regions, segmenter, seconds) -> dict:
    height, width = image.shape[:2]
    area = segmenter.um_per_pixel**2
    cells = []
    for index, region in enumerate(regions):
        r0, c0, r1, c1 = region.bbox
        cells.append({"index": index, "bbox": [r0, c0, r1, c1],
                      "cell_area_um2": round(float(region.cell.sum()) * area, 1),
                      "nucleus_area_um2": round(float(region.nucleus.sum()) * area, 1),
                      "touches_border": r0 == 0 or c0 == 0 or r1 == height or c1 == width})
    return {"image": path, "width": width, "height": height, "segmenter": segmenter.name,
            "um_per_pixel": segmenter.um_per_pixel, "ms": round(1000 * seconds, 1), "cells": cells,
            "mask": None}


def cmd_segmenter_train(args) -> int:
    import torch

    from atlas.segmentation.cellpose_training import train_segmenter

    if args.threads:
        torch.set_num_threads(args.threads)
    config = train_segmenter(args.images, args.masks, args.out, um_per_pixel=parse_scales(args.um_per_pixel),
                             epochs=args.epochs, holdout=args.holdout, seed=args.seed,
                             nucleus_model=args.nucleus_model, device=args.device, progress=not args.quiet)
    print(report.segmenter_training_text(args.out, config))
    return 0


def cmd_segmenter_evaluate(args) -> int:
    from atlas.cell import REFERENCE_UM_PER_PIXEL
    from atlas.segmentation import load_segmenter
    from atlas.segmentation.scoring import evaluate_boxes, evaluate_mask_sets

    scales = parse_scales(args.um_per_pixel)
    if args.boxes:
        if args.held_out_of or isinstance(scales, dict):
            raise ValueError("with --boxes give one --um-per-pixel X and no --held-out-of")
        if scales is None:
            print(f"note: no --um-per-pixel given, assuming {REFERENCE_UM_PER_PIXEL}", file=sys.stderr)
        segmenter = load_segmenter(args.model, scales or REFERENCE_UM_PER_PIXEL)
        result = evaluate_boxes(segmenter, args.images, args.boxes, iou_threshold=args.iou)
        text = report.box_scores(result)
    else:
        result = evaluate_mask_sets(args.model, args.images, args.masks, scales, held_out_of=args.held_out_of)
        text = f"{result['segmenter']}: " + report.mask_scores(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(text)
    return 0
