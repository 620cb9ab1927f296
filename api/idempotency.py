"""Idempotent writes: a client that did not get the answer to a write (timeout, lost
connection, a server killed mid-request) sends it again with the same `Idempotency-Key` header
and gets the first answer back, with nothing stored twice.

How a route applies it (corrections, rebuilds, archived cells):

    @router.post(..., responses=IDEMPOTENT_RESPONSES)
    def write_something(body: Model, author: Technologist, state: State, request: Request,
                        idempotency_key: IdempotencyKey = None) -> JSONResponse:
        return idempotent(state.catalog, author.name, idempotency_key, request, body,
                          lambda db: (201, make_it(db)))

`make_it(db)` does the write on the catalogue connection `db` (inside the transaction that
also records the answer: `Catalog.once`) and returns a pydantic model or a JSON-able dict;
the answer is kept per (author, key), its request identified by method, path, query and body.
A replay answers the stored status and body with `Idempotent-Replayed: true`; the same key
with another request is refused with 422. A write whose effects lie outside the catalogue
(a rebuild process) is recorded after they happen; a kill between the two is the one window
where a retry is not recognised (documented on the route).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Annotated

from fastapi import Header, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from api import schemas
from atlas.catalog import Catalog

IdempotencyKey = Annotated[str | None, Header(
    alias="Idempotency-Key", min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$",
    description="a client-chosen unique key (e.g. a UUID) for this write: a retry with the same "
                "key returns the first answer and stores nothing new")]

IDEMPOTENT_RESPONSES = {
    422: {"model": schemas.Problem,
          "description": "invalid request, or an Idempotency-Key already used for another request"},
}


def request_fingerprint(request: Request, body: BaseModel | dict | None) -> str:
    """SHA-256 of what makes two requests the same write: method, path, query and body."""
    if isinstance(body, BaseModel):
        body = body.model_dump(mode="json")
    text = json.dumps([request.method, request.url.path, sorted(request.query_params.multi_items()),
                       body], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def idempotent(catalog: Catalog, author: str, key: str | None, request: Request,
               body: BaseModel | dict | None,
               write: Callable[[object], tuple[int, BaseModel | dict]]) -> JSONResponse:
    """The answer of `write` (run once per author and key; see the module's docstring)."""

    def run(db) -> tuple[int, dict]:
        status, answer = write(db)
        return status, answer.model_dump(mode="json") if isinstance(answer, BaseModel) else answer

    status, answer, replayed = catalog.once(author, key, request_fingerprint(request, body), run)
    headers = {"Idempotent-Replayed": "true"} if replayed else None
    return JSONResponse(answer, status_code=status, headers=headers)
