"""API keys: bearer tokens with a role (reviewer < technologist < admin).

A token is shown once, when it is created; the catalogue keeps only its SHA-256 hash in the
`api_keys` table of ATLAS_HOME/catalog.duckdb. A reviewer reads, a technologist also
corrects labels, an admin also runs rebuilds and manages keys.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timezone

ROLES: tuple[str, ...] = ("reviewer", "technologist", "admin")
TOKEN_PREFIX = "cak_"

SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_id       VARCHAR PRIMARY KEY,
    name         VARCHAR NOT NULL,
    role         VARCHAR NOT NULL,
    token_sha256 VARCHAR NOT NULL UNIQUE,
    created_at   TIMESTAMPTZ NOT NULL,
    revoked_at   TIMESTAMPTZ
);
"""

Connect = Callable[[], AbstractContextManager]  # opens a DuckDB connection to the catalogue


class ApiKeyError(ValueError):
    """A key cannot be created or revoked (bad role, name taken, unknown name)."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's name (the author of corrections) and its role."""

    name: str
    role: str
    key_id: str | None = None

    def has_role(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


OPEN_ACCESS = Principal(name="open-access", role="admin")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_role(role: str) -> str:
    if role not in ROLES:
        raise ApiKeyError(f"unknown role {role!r}; choose from {', '.join(ROLES)}")
    return role


def ensure_schema(connect: Connect) -> None:
    with connect() as db:
        db.execute(SCHEMA)


def create_key(connect: Connect, name: str, role: str) -> str:
    """Store a new key and return its token (the only time the token exists in clear)."""
    check_role(role)
    name = name.strip()
    if not name:
        raise ApiKeyError("a key needs a name (a person or a system, e.g. 'review-station-3')")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with connect() as db:
        db.execute(SCHEMA)
        taken = db.execute(
            "SELECT count(*) FROM api_keys WHERE name = ? AND revoked_at IS NULL", [name]).fetchone()[0]
        if taken:
            raise ApiKeyError(f"an active key named {name!r} exists; revoke it first or choose another name")
        db.execute(
            "INSERT INTO api_keys (key_id, name, role, token_sha256, created_at) VALUES (?, ?, ?, ?, ?)",
            [uuid.uuid4().hex[:12], name, role, hash_token(token), datetime.now(timezone.utc)])
    return token


def revoke_key(connect: Connect, name: str) -> int:
    """Revoke the active keys named `name`; returns how many were revoked."""
    with connect() as db:
        db.execute(SCHEMA)
        revoked = db.execute(
            "UPDATE api_keys SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL RETURNING key_id",
            [datetime.now(timezone.utc), name]).fetchall()
    if not revoked:
        raise ApiKeyError(f"no active key named {name!r}")
    return len(revoked)


class KeyVerifier:
    """Looks bearer tokens up in the catalogue. A verified token is remembered for `cache_s`
    seconds so that a burst of requests does not open the catalogue each time; a revoked key
    stops working within that time."""

    def __init__(self, connect: Connect, cache_s: float = 10.0):
        """`connect` may be read-only: the `api_keys` table must exist (`ensure_schema`)."""
        self.connect = connect
        self.cache_s = cache_s
        self._cache: dict[str, tuple[Principal | None, float]] = {}
        self._lock = threading.Lock()

    def verify(self, token: str) -> Principal | None:
        digest = hash_token(token)
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(digest)
        if cached is not None and cached[1] > now:
            return cached[0]
        with self.connect() as db:
            row = db.execute(
                "SELECT key_id, name, role FROM api_keys WHERE token_sha256 = ? AND revoked_at IS NULL",
                [digest]).fetchone()
        principal = Principal(name=row[1], role=row[2], key_id=row[0]) if row else None
        with self._lock:
            if len(self._cache) > 10_000:  # unknown tokens must not grow memory without bound
                self._cache.clear()
            self._cache[digest] = (principal, now + self.cache_s)
        return principal
