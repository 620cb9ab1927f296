"""`cellatlas serve` and `cellatlas keys create`: the HTTP service and its API keys."""

from __future__ import annotations

import sys


def add_commands(sub) -> None:
    from atlas.catalog import ROLES

    p = sub.add_parser("serve", help="serve the live atlas over HTTP (API + viewer)")
    p.add_argument("--home", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--open", action="store_true", help="no authentication (demo only)")
    p.set_defaults(run=cmd_serve, shares_cores=True)

    p = sub.add_parser("keys", help="manage API keys")
    keys = p.add_subparsers(title="keys commands")
    k = keys.add_parser("create", help="create an API key and print its token once")
    k.add_argument("--home", required=True)
    k.add_argument("--name", required=True)
    k.add_argument("--role", required=True, choices=list(ROLES))
    k.set_defaults(run=cmd_keys_create)


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
    from atlas.catalog import Catalog

    print(Catalog(args.home).create_key(args.name, args.role))
    print(f"API key {args.name!r} ({args.role}) created; the token above is shown only once.", file=sys.stderr)
    return 0
