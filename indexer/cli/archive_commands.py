"""`cellatlas export`: the live atlas version written out so that it can leave CellAtlas."""

from __future__ import annotations

from pathlib import Path

from indexer import report


def add_commands(sub) -> None:
    from indexer.export import FORMATS

    p = sub.add_parser("export", help="write the atlas's crops, cells table, corrections and masks "
                                      "to a folder that other tools read")
    p.add_argument("--home", required=True, help="ATLAS_HOME to export from")
    p.add_argument("--out", required=True, help="a new (or empty) folder to write the export into")
    # Checked by the export itself (not argparse choices) so that a wrong name is one line.
    p.add_argument("--format", default="imagefolder", metavar="|".join(FORMATS),
                   help="imagefolder: class folders + CSV tables; parquet: class folders + Parquet "
                        "tables; coco: class folders + CSV tables + COCO instances JSON "
                        "(default: imagefolder)")
    p.add_argument("--version", help="the atlas version to export (default: the live one)")
    p.add_argument("--quiet", action="store_true", help="no progress; print only the export folder")
    p.set_defaults(run=cmd_export)


def cmd_export(args) -> int:
    from indexer.export import export_atlas

    result = export_atlas(Path(args.home), Path(args.out), format=args.format, version=args.version,
                          show_progress=not args.quiet)
    print(result.out if args.quiet else report.export_text(result))
    return 0
