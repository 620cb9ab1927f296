"""Entry points for the command line: serve the API, create API keys."""

from __future__ import annotations

import logging
from pathlib import Path

from atlas.catalog import Catalog


def run(home: str, host: str = "127.0.0.1", port: int = 8000, open_access: bool = False) -> None:
    """Serve the live atlas of `home` with uvicorn until interrupted."""
    import uvicorn

    from api.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if open_access:
        logging.getLogger("cellatlas.api").warning(
            "open access: every route answers without an API key, corrections included")
    uvicorn.run(create_app(Path(home), open_access=open_access), host=host, port=port,
                log_level="info", proxy_headers=True)


def create_key(home: str, name: str, role: str) -> str:
    """A new API key for `name` with `role`; the token is returned once and never stored."""
    return Catalog(home).create_key(name, role)


def revoke_key(home: str, name: str) -> int:
    """Revoke the active key(s) named `name`; running servers stop accepting it within 10 s."""
    return Catalog(home).revoke_key(name)
