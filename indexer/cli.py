"""The `cellatlas` command line: build, query, evaluate, split, demo, segment, segmenter.

Every command fails with a one-line message and a non-zero exit on bad input, never with a
traceback (set CELLATLAS_DEBUG=1 to see one).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def main(argv: list[str] | None = None) -> int:
    # Idle OpenMP threads (torch, XGBoost) sleep instead of spinning: on 2 busy cores spinning
    # threads made steps 10-60x slower. Must be set before those libraries load.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:
        print("interrupted; the live atlas version is unchanged", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # noqa: BLE001 - the one place that turns errors into messages
        if os.environ.get("CELLATLAS_DEBUG"):
            raise
        if not _is_user_error(error):
            print(f"error: unexpected {type(error).__name__}: {error} "
                  "(set CELLATLAS_DEBUG=1 for the traceback)", file=sys.stderr)
            return 1
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _is_user_error(error: Exception) -> bool:
    from atlas.backbone import BackboneError
    from atlas.ingest import ImageReadError, IngestError
    from atlas.jobs import RebuildRunning
    from atlas.reference import UnknownCell
    from atlas.segment import SegmentationError
    from atlas.store import AtlasNotFound
    from indexer.build import BuildError
    from indexer.rebuild import RebuildError

    return isinstance(error, (BuildError, IngestError, ImageReadError, SegmentationError, AtlasNotFound,
                              BackboneError, UnknownCell, RebuildError, RebuildRunning, ValueError,
                              FileNotFoundError))


# -- commands -------------------------------------------------------------------------------
def cmd_build(args) -> int:
    from indexer.build import BuildConfig, build

    config = BuildConfig(
        images=Path(args.images), home=Path(args.home), preset=args.preset, epochs=args.epochs,
        latent_dim=args.latent_dim, som_shape=_shape(args.som_shape), som_epochs=args.som_epochs,
        flag_entropy=args.flag_entropy if args.flag_entropy == "auto" else float(args.flag_entropy),
        um_per_pixel=args.um_per_pixel, segmenter=args.segmenter, seed=args.seed, device=args.device,
        pretrained=args.pretrained, progress=not args.quiet,
        **({"threads": args.threads} if args.threads else {}),
    )
    result = build(config)
    if args.quiet:
        print(result.version)
    return 0


def cmd_rebuild(args) -> int:
    from indexer.rebuild import rebuild

    version = rebuild(Path(args.home), retrain_backbone=args.retrain_backbone, progress=not args.quiet,
                      threads=args.threads)
    print(version)
    return 0


def cmd_query(args) -> int:
    from atlas.ingest import content_hash, read_image_bytes
    from atlas.reference import LoadedAtlas

    data = _read_file(args.image)
    image = read_image_bytes(data)
    atlas = LoadedAtlas.open(args.home)
    result = atlas.query_image(image, k=args.k, method=args.method, image_sha=content_hash(data))
    if args.json:
        from dataclasses import asdict

        print(json.dumps(asdict(result), indent=2))
        return 0
    p = result.prediction
    print(f"atlas version {result.version}, SOM node {result.som_node}")
    print(f"predicted {p.label}  entropy {p.entropy_bits:.2f} bits" + ("  ** UNCERTAIN **" if p.flagged else ""))
    for label, prob in sorted(p.probabilities.items(), key=lambda kv: -kv[1]):
        print(f"  {label:<16} {prob:6.3f}")
    print(f"reference cells ({args.method}):")
    for r in result.references:
        print(f"  {r.cell_id}  {str(r.label):<16} distance {r.distance:.4f}  node {r.som_node}")
    return 0


def cmd_evaluate(args) -> int:
    from indexer.evaluate import evaluate

    result = evaluate(Path(args.home), Path(args.images), rotmes_per_class=args.rotation_per_class,
                      seed=args.seed, progress=not args.quiet)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


def cmd_split(args) -> int:
    from indexer.split import split_folder

    counts = split_folder(Path(args.images), Path(args.out), args.test_fraction, args.seed)
    print(json.dumps(counts, indent=2))
    return 0


def cmd_serve(args) -> int:
    from api.server import run
    from atlas.store import AtlasStore

    AtlasStore(args.home).require_current()
    if args.open:
        print("WARNING: serving WITHOUT authentication (--open): anyone who can reach "
              f"{args.host}:{args.port} can read and correct labels", file=sys.stderr)
    run(args.home, host=args.host, port=args.port, open_access=args.open)
    return 0


def cmd_keys_create(args) -> int:
    from api.server import create_key

    token = create_key(args.home, args.name, args.role)
    print(token)
    print(f"API key {args.name!r} ({args.role}) created; the token above is shown only once.",
          file=sys.stderr)
    return 0


def cmd_segment(args) -> int:
    """Cells found in each image. Exit 0 when every file was read (an image without a white
    cell is a result: reported, not an error); exit 2 when a file could not be read or was too
    small (the others are still segmented and reported)."""
    from PIL import Image

    from atlas.ingest import ImageReadError, read_image_bytes
    from atlas.segment import (
        REFERENCE_UM_PER_PIXEL,
        SegmentationError,
        load_segmenter,
        version_segmenter,
    )
    from atlas.store import AtlasStore

    if args.home:
        if args.um_per_pixel:
            raise ValueError("--um-per-pixel cannot be combined with --home: the atlas has its own scale")
        store = AtlasStore(args.home)
        version = store.require_current()
        segmenter = version_segmenter(store.version_dir(version), store.manifest(version))
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
            image = read_image_bytes(_read_file(path))
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
            print(_segment_text(results[-1]))
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


def _segment_text(result: dict) -> str:
    head = (f"{result['image']}  {result['width']}x{result['height']}  ({result['segmenter']} at "
            f"{result['um_per_pixel']:g} um/px, {result['ms']:.0f} ms)")
    if not result["cells"]:
        return f"{head}\n  no white cell found"
    lines = [f"{head}  {len(result['cells'])} cell(s)"]
    for cell in result["cells"]:
        r0, c0, r1, c1 = cell["bbox"]
        lines.append(f"  #{cell['index']} {'main' if cell['index'] == 0 else '    '}  rows {r0}-{r1} cols {c0}-{c1}  "
                     f"cell {cell['cell_area_um2']:.1f} um2  nucleus {cell['nucleus_area_um2']:.1f} um2"
                     + ("  (cut by the border)" if cell["touches_border"] else ""))
    if result.get("mask"):
        lines.append(f"  mask of the main cell: {result['mask']}")
    return "\n".join(lines)


def cmd_segmenter_train(args) -> int:
    import torch

    from atlas.cellpose_segmenter import train_segmenter

    if args.threads:
        torch.set_num_threads(args.threads)
    config = train_segmenter(args.images, args.masks, args.out, um_per_pixel=_scales(args.um_per_pixel),
                             epochs=args.epochs, holdout=args.holdout, seed=args.seed,
                             nucleus_model=args.nucleus_model, device=args.device, progress=not args.quiet)
    training = config["training"]
    print(f"segmenter saved to {args.out}")
    print("  sets            " + ", ".join(
        f"{name} {s['um_per_pixel']:g} um/px ({s['train_images']} train, {s['held_out_images']} held out)"
        for name, s in config["sets"].items()))
    print(f"  cell diameter   {config['cell_diameter_um']:.1f} um; model scale {config['model_um_per_pixel']:.3f} um/px; "
          f"nucleus from {config['nucleus']}")
    print(f"  training        {training['epochs']} epochs in {training['seconds']:.0f} s")
    if "held_out_metrics" in config:
        print("  held out        " + _mask_scores(config["held_out_metrics"]))
    return 0


def cmd_segmenter_evaluate(args) -> int:
    from atlas.masks import evaluate_boxes, evaluate_mask_sets
    from atlas.segment import REFERENCE_UM_PER_PIXEL, load_segmenter

    scales = _scales(args.um_per_pixel)
    if args.boxes:
        if args.held_out_of or isinstance(scales, dict):
            raise ValueError("with --boxes give one --um-per-pixel X and no --held-out-of")
        if scales is None:
            print(f"note: no --um-per-pixel given, assuming {REFERENCE_UM_PER_PIXEL}", file=sys.stderr)
        segmenter = load_segmenter(args.model, scales or REFERENCE_UM_PER_PIXEL)
        result = evaluate_boxes(segmenter, args.images, args.boxes, iou_threshold=args.iou)
        text = (f"{result['segmenter']} at {result['um_per_pixel']:g} um/px on {result['images']} images: "
                f"{result['annotated']} {result['label']} boxes, {result['found']} cells found, {result['matched']} "
                f"matched (IoU >= {result['iou_threshold']:g}); recall {_fmt(result['recall'])}, precision "
                f"{_fmt(result['precision'])}; {result['mean_ms']:.0f} ms per image")
    else:
        result = evaluate_mask_sets(args.model, args.images, args.masks, scales, held_out_of=args.held_out_of)
        text = f"{result['segmenter']}: " + _mask_scores(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(text)
    return 0


def _mask_scores(result: dict) -> str:
    def scores(r):
        return (f"cell Dice {_fmt(r['mean_cell_dice'])} IoU {_fmt(r['mean_cell_iou'])}, nucleus Dice "
                f"{_fmt(r['mean_nucleus_dice'])} IoU {_fmt(r['mean_nucleus_iou'])}, {r['mean_ms']:.0f} ms/image, "
                f"{r['no_cell_found']} without a cell")

    sets = result["sets"]
    text = f"{result['images']} images: {scores(result)}"
    if len(sets) > 1:
        text += "".join(f"\n    {name} ({s['images']} at {s['um_per_pixel']:g} um/px): {scores(s)}"
                        for name, s in sets.items())
    return text


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def cmd_demo(args) -> int:
    from indexer.demo import run_demo

    return run_demo(Path(args.home), serve=not args.no_serve, port=args.port)


# -- parser -----------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    from atlas.backbone import PRESETS
    from atlas.classify import DEFAULT_FLAG_BITS
    from atlas.reference import METHODS

    parser = argparse.ArgumentParser(prog="cellatlas", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(title="commands")

    p = sub.add_parser("build", help="build and publish an atlas version from a folder of images")
    p.add_argument("--images", required=True, help="folder with one sub-folder per class (or a flat folder)")
    p.add_argument("--home", required=True, help="ATLAS_HOME: where versions are published")
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="backbone size (default: cpu)")
    p.add_argument("--epochs", type=_positive_int, help="backbone epochs (default: the preset's)")
    p.add_argument("--latent-dim", type=_positive_int, default=50, help="VAE latent size (default 50)")
    p.add_argument("--som-shape", help="SOM grid as ROWSxCOLS (default: from the archive size)")
    p.add_argument("--som-epochs", type=_positive_int, default=30)
    p.add_argument("--flag-entropy", default=str(DEFAULT_FLAG_BITS),
                   help="entropy (bits) above which a prediction is flagged, or 'auto' (default 1.3)")
    p.add_argument("--um-per-pixel", type=_positive_float, default=0.1, help="image scale (default 0.1)")
    p.add_argument("--segmenter", metavar="MODEL",
                   help="a trained segmenter folder (cellatlas segmenter train); default: classical thresholds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=_positive_int, help="CPU threads (default: all cores)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--pretrained", action="store_true",
                   help="start from public weights (preset xception41; needs network access)")
    p.add_argument("--quiet", action="store_true", help="no progress; print only the version")
    p.set_defaults(run=cmd_build)

    p = sub.add_parser("rebuild", help="publish a new version of the live atlas with the label corrections")
    p.add_argument("--home", required=True, help="ATLAS_HOME whose live version is rebuilt")
    p.add_argument("--retrain-backbone", action="store_true",
                   help="also retrain backbone, VAE, index and SOM (a full build on the live version's images)")
    p.add_argument("--threads", type=_positive_int, help="CPU threads (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress; print only the version")
    p.set_defaults(run=cmd_rebuild)

    p = sub.add_parser("query", help="reference cells and prediction for one image")
    p.add_argument("image")
    p.add_argument("--home", required=True)
    p.add_argument("--k", type=_positive_int, default=8)
    p.add_argument("--method", default="latent", choices=METHODS)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_query)

    p = sub.add_parser("evaluate", help="measure the live atlas on labelled images not in its build")
    p.add_argument("--home", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--out", help="write the JSON report here too")
    p.add_argument("--rotation-per-class", type=int, default=50,
                   help="archived cells per class for the rotation check (default 50)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=cmd_evaluate)

    p = sub.add_parser("split", help="stratified train/test split of a class folder, as symlinks")
    p.add_argument("--images", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=cmd_split)

    p = sub.add_parser("serve", help="serve the live atlas over HTTP (API + viewer)")
    p.add_argument("--home", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--open", action="store_true", help="no authentication (demo only)")
    p.set_defaults(run=cmd_serve)

    p = sub.add_parser("keys", help="manage API keys")
    keys = p.add_subparsers(title="keys commands")
    k = keys.add_parser("create", help="create an API key and print its token once")
    k.add_argument("--home", required=True)
    k.add_argument("--name", required=True)
    k.add_argument("--role", required=True, choices=["reviewer", "technologist", "admin"])
    k.set_defaults(run=cmd_keys_create)

    p = sub.add_parser("segment", help="find the white cells of images (boxes, areas, masks)")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--home", help="use the live atlas's segmenter and scale")
    source.add_argument("--model", help="a trained segmenter folder (default: classical thresholds)")
    p.add_argument("--um-per-pixel", type=_positive_float, help="image scale without --home (default 0.1)")
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
    s.add_argument("--epochs", type=_positive_int, default=60, help="default 60")
    s.add_argument("--holdout", type=float, default=0.2, help="share of each set held out and scored (default 0.2)")
    s.add_argument("--nucleus-model", action="store_true",
                   help="also train a network for nuclei (default: the classical nucleus threshold)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=_positive_int, help="CPU threads (default: torch's)")
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

    p = sub.add_parser("demo", help="build an atlas of generated cells and query it")
    p.add_argument("--home", default=".demo-atlas")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--no-serve", action="store_true", help="build and query only")
    p.set_defaults(run=cmd_demo)
    return parser


def _read_file(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"image file {path} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a folder; give one image file") from None


def _shape(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--som-shape must look like 20x30, got {text!r}") from None
    if rows < 1 or cols < 1:
        raise ValueError(f"--som-shape must be positive, got {text!r}")
    return rows, cols


def _scales(values: list[str] | None) -> float | dict[str, float] | None:
    """--um-per-pixel as given: None, one value for every set, or {set: value}."""
    if not values:
        return None
    named = {}
    for value in values:
        name, _, number = value.rpartition("=")
        try:
            scale = float(number)
        except ValueError:
            raise ValueError(f"--um-per-pixel must be a number or SET=NUMBER, got {value!r}") from None
        if not scale > 0:
            raise ValueError(f"--um-per-pixel must be positive, got {value!r}")
        if not name and len(values) == 1:
            return scale
        if not name:
            raise ValueError("give --um-per-pixel once as a number, or once per set as SET=NUMBER")
        named[name] = scale
    return named


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


if __name__ == "__main__":
    sys.exit(main())
