"""The `cellatlas` command line: build, query and serve an atlas of white cells.

One module per group of commands: `atlas_commands` (build,
rebuild, query, evaluate, split, demo), `service_commands` (serve, keys), `segmentation_commands`
(segment, segmenter train/evaluate), `archive_commands` (export), `bench_commands` (bench);
what they print for a person is in `indexer.report`.

Every command fails with a one-line message and a non-zero exit on bad input, never with a
traceback (set CELLATLAS_DEBUG=1 to see one).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from atlas.runtime import keep_freed_memory, set_openmp_wait
from indexer.cli import (
    archive_commands,
    atlas_commands,
    bench_commands,
    segmentation_commands,
    service_commands,
)
from indexer.cli.args import EXIT_BAD_INPUT, EXIT_INTERRUPTED

COMMAND_GROUPS = (atlas_commands, service_commands, segmentation_commands, archive_commands,
                  bench_commands)


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()  # reuse freed memory instead of page-faulting fresh maps (atlas/runtime.py)
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (docker stop, kill) unwinds like Ctrl-C: a job is marked failed, staging removed.
        signal.signal(signal.SIGTERM, _interrupt)
    parser = _parser()
    args = parser.parse_args(argv)
    # before any parallel region: the server shares its cores, a batch job has them (runtime.py)
    set_openmp_wait(shares_cores=getattr(args, "shares_cores", False))
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
    from atlas.cell import SegmentationError
    from atlas.ingest import ImageReadError, IngestError
    from atlas.jobs import RebuildRunning
    from atlas.reference import UnknownCell
    from atlas.runtime import DeviceError
    from atlas.store import AtlasNotFound
    from indexer.config import BuildError
    from indexer.rebuild import RebuildError

    return isinstance(error, (BuildError, IngestError, ImageReadError, SegmentationError, AtlasNotFound,
                              BackboneError, DeviceError, UnknownCell, RebuildError, RebuildRunning,
                              ValueError, FileNotFoundError))


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signum}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cellatlas", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(title="commands")
    for group in COMMAND_GROUPS:
        group.add_commands(sub)
    return parser


if __name__ == "__main__":
    sys.exit(main())
