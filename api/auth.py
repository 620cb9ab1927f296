"""Who is calling: the principal behind a bearer token, and whether its role suffices.

The keys themselves (roles, hashing, create, revoke, look-up) are the catalogue's
(`atlas.catalog`); this module is what HTTP adds: the principal a request acts as, the
open-access principal, and a short cache of verified tokens.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from atlas.catalog import ROLES, Catalog, hash_token


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's name (the author of corrections) and its role."""

    name: str
    role: str
    key_id: str | None = None

    def has_role(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


OPEN_ACCESS = Principal(name="open-access", role="admin")


class KeyVerifier:
    """Looks bearer tokens up in the catalogue. A verified token is remembered for `cache_s`
    seconds so that a burst of requests does not open the catalogue each time; a revoked key
    stops working within that time. It lives here, not in the catalogue, because only a
    server answering many requests wants it (the command line never does)."""

    def __init__(self, catalog: Catalog, cache_s: float = 10.0):
        self.catalog = catalog
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
        key = self.catalog.active_key(token)
        principal = (Principal(name=key["name"], role=key["role"], key_id=key["key_id"])
                     if key else None)
        with self._lock:
            if len(self._cache) > 10_000:  # unknown tokens must not grow memory without bound
                self._cache.clear()
            self._cache[digest] = (principal, now + self.cache_s)
        return principal
