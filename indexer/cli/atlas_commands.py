"""`cellatlas build | rebuild | query | evaluate | evaluate-novelty | split | demo`: make, rebuild, ask and measure
an atlas."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from indexer import report
from indexer.cli.args import build_scales, positive_float, positive_int, som_shape

EPOCHS_HELP = ("backbone epochs (default: the preset's, more for a small archive: enough for the preset's "
               "minimum of steps, at most twice)")
SCALE_HELP = "the images' scale (default: the atlas's); they are resampled to the atlas's scale"


def add_commands(sub) -> None:
    from atlas.backbone import PRESETS
    from atlas.calibration import (
        AUTO_LEVELS,
        AUTO_MAX_FLAGGED,
        AUTO_MISCLASSIFIED_FLAGGED,
        DEFAULT_COVERAGE,
    )
    from atlas.classifier import DEFAULT_FLAG_BITS
    from atlas.reference import METHODS

    p = sub.add_parser("build", help="build and publish an atlas version from a folder of images")
    p.add_argument("--images", required=True, help="folder with one sub-folder per class (or a flat folder)")
    p.add_argument("--home", required=True, help="ATLAS_HOME: where versions are published")
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="backbone size (default: cpu)")
    p.add_argument("--epochs", type=positive_int, help=EPOCHS_HELP)
    p.add_argument("--latent-dim", type=positive_int, default=50, help="VAE latent size (default 50)")
    p.add_argument("--som-shape", help="SOM grid as ROWSxCOLS (default: from the archive size)")
    p.add_argument("--som-epochs", type=positive_int, default=30)
    p.add_argument("--flag-entropy", default=str(DEFAULT_FLAG_BITS),
                   help="entropy (bits) above which a prediction is flagged when the classifier has no "
                        "prediction sets (atlases built before them), or 'auto' (default 1.3)")
    p.add_argument("--coverage", default=DEFAULT_COVERAGE,
                   help=f"prediction sets hold the true class this often, e.g. 0.99, or 'auto' (default): the "
                        f"lowest level from {AUTO_LEVELS[0]:g} up whose out-of-fold sets flag "
                        f"{AUTO_MISCLASSIFIED_FLAGGED * 100:.0f}%% of the misclassified cells with at most "
                        f"{AUTO_MAX_FLAGGED * 100:.0f}%% flagged; a cell is flagged when its set holds more than one class or none")
    p.add_argument("--um-per-pixel", action="append", metavar="X or FOLDER=X",
                   help="the atlas's scale (default 0.1 um per pixel); repeat as FOLDER=X for images of "
                        "another acquisition under FOLDER (relative to --images), resampled to the atlas's")
    p.add_argument("--segmenter", metavar="MODEL",
                   help="a trained segmenter folder (cellatlas segmenter train); default: classical thresholds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, help="CPU threads (default: all cores)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--pretrained", action="store_true",
                   help="start from public weights (preset xception41; needs network access)")
    p.add_argument("--stain-jitter", action="store_true",
                   help="train the backbone with stain, hue, blur and grey jitter, for archives pooled from "
                        "several stains or scanners (on PBC: other labs' cells found more often, 0.6 points "
                        "less accuracy on its own; README, 'Other scanners and stains')")
    p.add_argument("--quiet", action="store_true", help="no progress; print only the version")
    _engine_arguments(p)
    p.set_defaults(run=cmd_build)

    p = sub.add_parser("rebuild", help="publish a new version of the live atlas with the label corrections")
    p.add_argument("--home", required=True, help="ATLAS_HOME whose live version is rebuilt")
    p.add_argument("--retrain-backbone", action="store_true",
                   help="also retrain backbone, VAE, index and SOM (a full build on the live version's images)")
    p.add_argument("--threads", type=positive_int, help="CPU threads (default: all cores)")
    p.add_argument("--job-id", help="the jobs-table row to report progress in (default: a new one)")
    p.add_argument("--lock-fd", type=int, help=argparse.SUPPRESS)  # the API hands its rebuild lock over
    p.add_argument("--quiet", action="store_true", help="no progress; print only the version")
    p.set_defaults(run=cmd_rebuild)

    p = sub.add_parser("add", help="add new images to the live atlas with its frozen models (a new version, "
                                   "no training)")
    p.add_argument("--home", required=True, help="ATLAS_HOME whose live version is extended")
    p.add_argument("--images", required=True, help="folder of new images (flat, or one sub-folder per class)")
    p.add_argument("--label-from-folders", action="store_true",
                   help="label each image by its sub-folder (a class of the atlas); default: unlabelled, "
                        "for the review queue")
    p.add_argument("--um-per-pixel", type=positive_float, help=SCALE_HELP)
    p.add_argument("--threads", type=positive_int, help="CPU threads (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress; print only the version")
    _engine_arguments(p)
    p.set_defaults(run=cmd_add)

    p = sub.add_parser("query", help="reference cells and prediction for one image "
                                     "(labels with the catalogue's corrections)")
    p.add_argument("image")
    p.add_argument("--home", required=True)
    p.add_argument("--k", type=positive_int, default=8)
    p.add_argument("--method", default="latent", choices=METHODS)
    p.add_argument("--json", action="store_true")
    p.add_argument("--um-per-pixel", type=float, help=SCALE_HELP)
    p.set_defaults(run=cmd_query)

    p = sub.add_parser("evaluate", help="measure the live atlas on labelled images not in its build")
    p.add_argument("--home", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--out", help="write the JSON report here too")
    p.add_argument("--rotation-per-class", type=int, default=50,
                   help="archived cells per class for the rotation check (default 50)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--um-per-pixel", type=float, help=SCALE_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress; print only the report")
    p.set_defaults(run=cmd_evaluate)

    p = sub.add_parser("evaluate-novelty",
                       help="leave one class out: build without it, then measure how well novelty finds it "
                            "(for each class given, or each class)")
    p.add_argument("--images", required=True, help="training folder, one sub-folder per class")
    p.add_argument("--test", required=True, help="held-out folder with the same classes")
    p.add_argument("--leave-out", required=True, nargs="+", metavar="CLASS",
                   help="the class the atlas is built without; several: one build each; 'each': every class")
    p.add_argument("--home", required=True,
                   help="a new folder; the atlas built without CLASS is the ATLAS_HOME HOME/without-CLASS")
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="backbone size (default: cpu)")
    p.add_argument("--epochs", type=positive_int, help=EPOCHS_HELP)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, help="CPU threads (default: all cores)")
    p.add_argument("--out", help="write the JSON report here too")
    p.add_argument("--quiet", action="store_true", help="no progress; print only the report")
    p.set_defaults(run=cmd_evaluate_novelty)

    p = sub.add_parser("split", help="stratified train/test split of a class folder, as symlinks")
    p.add_argument("--images", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=cmd_split)

    p = sub.add_parser("demo", help="build an atlas of generated cells and query it")
    p.add_argument("--home", default=".demo-atlas")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--no-serve", action="store_true", help="build and query only")
    p.set_defaults(run=cmd_demo)


def _engine_arguments(p) -> None:
    g = p.add_argument_group("engine (where the per-cell stages run)")
    g.add_argument("--engine", default="local", choices=("local", "ray"),
                   help="local (default): this machine; ray: a Ray cluster (pip install 'cellatlas[ray]')")
    g.add_argument("--ray-address", help="a running Ray cluster (host:6379, ray://host:10001 or auto); "
                                         "default: start Ray on this machine for the job")
    g.add_argument("--ray-workers", type=positive_int, help="actors per stage (default: cluster CPUs / CPUs per worker)")
    g.add_argument("--ray-cpus-per-worker", type=positive_float, default=1.0)
    g.add_argument("--ray-gpus-per-worker", type=float, default=0.0, help="> 0: embedding actors use a GPU")


def _open_engine(args, threads: int | None):
    from atlas.runtime import default_threads
    from indexer.config import BuildError
    from indexer.engines import RayOptions, open_engine

    if args.engine == "local" and (args.ray_address or args.ray_workers):
        raise BuildError("--ray-address and --ray-workers need --engine ray")
    if args.ray_gpus_per_worker < 0:
        raise BuildError("--ray-gpus-per-worker must be 0 or more")
    return open_engine(args.engine, threads or default_threads(),
                       RayOptions(args.ray_address, args.ray_workers, args.ray_cpus_per_worker, args.ray_gpus_per_worker))


def cmd_build(args) -> int:
    from atlas.cell import REFERENCE_UM_PER_PIXEL
    from indexer.build import build
    from indexer.config import BuildConfig

    scale, folder_scales = build_scales(args.um_per_pixel)

    config = BuildConfig(
        images=Path(args.images), home=Path(args.home), preset=args.preset, epochs=args.epochs,
        latent_dim=args.latent_dim, som_shape=som_shape(args.som_shape), som_epochs=args.som_epochs,
        flag_entropy=args.flag_entropy if args.flag_entropy == "auto" else float(args.flag_entropy),
        coverage=args.coverage,
        um_per_pixel=scale if scale is not None else REFERENCE_UM_PER_PIXEL, folder_scales=folder_scales,
        segmenter=args.segmenter, seed=args.seed, device=args.device,
        pretrained=args.pretrained, stain_jitter=args.stain_jitter, progress=not args.quiet,
        **({"threads": args.threads} if args.threads else {}),
    )
    with _open_engine(args, config.threads) as engine:
        result = build(config, engine=engine)
    if args.quiet:
        print(result.version)
    return 0


def cmd_rebuild(args) -> int:
    from indexer.rebuild import rebuild

    version = rebuild(Path(args.home), retrain_backbone=args.retrain_backbone, progress=not args.quiet,
                      threads=args.threads, job_id=args.job_id, lock_fd=args.lock_fd)
    print(version)
    return 0


def cmd_add(args) -> int:
    from indexer.add import add

    with _open_engine(args, args.threads) as engine:
        result = add(Path(args.home), Path(args.images), label_from_folders=args.label_from_folders,
                     um_per_pixel=args.um_per_pixel, threads=args.threads, progress=not args.quiet, engine=engine)
    if args.quiet:
        print(result.version)
    return 0


def cmd_query(args) -> int:
    """Reference cells of one image file, with the catalogue's corrections (as the API shows)."""
    from dataclasses import asdict

    from atlas import Atlas
    from atlas.scale import check_um_per_pixel

    if args.um_per_pixel is not None:
        check_um_per_pixel(args.um_per_pixel)  # before the slow load of the atlas
    result = Atlas.open(args.home).reference_cells(Path(args.image), k=args.k, method=args.method,
                                                   um_per_pixel=args.um_per_pixel)
    print(json.dumps(asdict(result), indent=2) if args.json else report.query_text(result, args.method))
    return 0


def cmd_evaluate(args) -> int:
    from indexer.evaluate import evaluate

    result = evaluate(Path(args.home), Path(args.images), rotmes_per_class=args.rotation_per_class,
                      seed=args.seed, progress=not args.quiet, um_per_pixel=args.um_per_pixel)
    return _print_json(result, args.out)


def _print_json(result: dict, out: str | None) -> int:
    """Print an evaluation's JSON report, and write it to `out` too when given."""
    text = json.dumps(result, indent=2)
    if out:
        Path(out).write_text(text)
    print(text)
    return 0


def cmd_evaluate_novelty(args) -> int:
    from indexer.config import BuildConfig
    from indexer.evaluate import evaluate_novelty

    config = BuildConfig(images=Path(args.images), home=Path(args.home), preset=args.preset, epochs=args.epochs,
                         seed=args.seed, progress=not args.quiet,
                         **({"threads": args.threads} if args.threads else {}))
    result = evaluate_novelty(config, Path(args.test), args.leave_out, progress=not args.quiet)
    return _print_json(result, args.out)


def cmd_split(args) -> int:
    from indexer.split import split_folder

    print(json.dumps(split_folder(Path(args.images), Path(args.out), args.test_fraction, args.seed), indent=2))
    return 0


def cmd_demo(args) -> int:
    from indexer.demo import run_demo

    return run_demo(Path(args.home), serve=not args.no_serve, port=args.port)
