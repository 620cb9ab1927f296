"""The `cellatlas` command line: build, query, evaluate, split, demo.

Every command fails with a one-line message and a non-zero exit on bad input, never with a
traceback (set CELLATLAS_DEBUG=1 to see one).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
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
        um_per_pixel=args.um_per_pixel, seed=args.seed, device=args.device,
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
