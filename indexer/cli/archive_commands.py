"""`cellatlas export`: the live atlas version written out so that it can leave CellAtlas;
`cellatlas backup` / `restore`: the whole home in one checked archive (indexer.backup)."""

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

    p = sub.add_parser("backup", help="write the catalogue, published versions and crops of an atlas "
                                      "home to one archive with a manifest of SHA-256 checksums")
    p.add_argument("--home", required=True, help="ATLAS_HOME to back up (it may keep serving)")
    p.add_argument("--out", required=True, help="the new archive file (.tar, or .tar.gz to compress)")
    p.set_defaults(run=cmd_backup)

    p = sub.add_parser("restore", help="restore a backup into a new atlas home, checking every file "
                                       "against its manifest first")
    p.add_argument("archive", help="a file written by `cellatlas backup`")
    p.add_argument("--home", required=True, help="the new ATLAS_HOME (must not exist or be empty)")
    p.set_defaults(run=cmd_restore)


def cmd_export(args) -> int:
    from indexer.export import export_atlas

    result = export_atlas(Path(args.home), Path(args.out), format=args.format, version=args.version,
                          show_progress=not args.quiet)
    print(result.out if args.quiet else report.export_text(result))
    return 0


def cmd_backup(args) -> int:
    from indexer.backup import backup

    result = backup(Path(args.home), Path(args.out))
    print(f"backed up {args.home} to {result.archive}: {result.files} files, "
          f"{result.bytes / 2**20:.1f} MB, versions {', '.join(result.versions) or 'none'} "
          f"(live: {result.current or 'none'})")
    return 0


def cmd_restore(args) -> int:
    from indexer.backup import restore

    result = restore(Path(args.archive), Path(args.home))
    print(f"restored {args.archive} into {result.archive}: {result.files} files checked, versions "
          f"{', '.join(result.versions) or 'none'} (live: {result.current or 'none'}); serve it with "
          f"'cellatlas serve --home {result.archive}'")
    return 0
