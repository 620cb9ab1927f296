"""The FastAPI application: versioned routes under /v1, health and metrics, error answers.

`create_app(home)` serves the live atlas version of ATLAS_HOME; every /v1 route needs an API
key (`Authorization: Bearer <token>`) unless `open_access=True`.
"""

from __future__ import annotations

import asyncio
import logging
import math
from contextlib import asynccontextmanager
from pathlib import Path

import duckdb
from fastapi import Depends, FastAPI, HTTPException, Request, status
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

import atlas
from api import schemas
from api.deps import ApiState, UploadTooLarge, require
from api.jobs import RebuildAlreadyRunning, UnknownJob
from api.metrics import MetricsMiddleware
from api.routes import (
    atlas_map,
    cells,
    classify,
    corrections,
    health,
    rebuilds,
    reference_cells,
    review,
    segment,
    viewer_support,
)
from api.settings import Settings
from api.views import InvalidValue, MissingCrop, UnknownNode
from atlas.archive import CellCopiesArchive, NotWithdrawn
from atlas.catalog import IdempotencyKeyReused
from atlas.cell import SegmentationError
from atlas.ingest import ImageReadError, ImageTooLarge
from atlas.reference import UnknownCell, WithdrawnCell
from atlas.store import AtlasNotFound

log = logging.getLogger("cellatlas.api")

V1_ROUTERS = (reference_cells, cells, classify, segment, atlas_map, review, corrections, rebuilds,
              viewer_support)


V1_ERRORS = {401: {"model": schemas.Problem, "description": "no valid API key"},
             403: {"model": schemas.Problem, "description": "the key's role is too low"},
             503: {"model": schemas.Problem,
                   "description": "no atlas version is served, or the catalogue is busy"}}


VIEWER_DIR = Path(__file__).resolve().parents[1] / "viewer"


def create_app(home: Path | str, open_access: bool = False, settings: Settings | None = None) -> FastAPI:
    """The app serving ATLAS_HOME `home`. `settings`, when given, replaces every default
    (home and open_access included); otherwise they come from the environment
    (`Settings.from_environment`)."""
    settings = settings or Settings.from_environment(home, open_access)
    state = ApiState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:  # load the live version before the first request asks for it
            state.live.get()
        except AtlasNotFound as error:
            log.warning("%s; /readyz answers 503 until one is published", error)
        yield

    app = FastAPI(
        title="CellAtlas",
        version=atlas.__version__,
        summary="Adaptive reference cells, class predictions and a browsable map of a white-cell archive",
        lifespan=lifespan,
    )
    app.state.cellatlas = state
    reviewer = [Depends(require("reviewer"))]
    for module in V1_ROUTERS:
        app.include_router(module.router, prefix="/v1", dependencies=reviewer, responses=V1_ERRORS)
    app.include_router(health.router)
    # Before the viewer's mount at "/", which would otherwise answer every other /v1 request.
    app.router.add_route("/v1/{path:path}", _undeclared_v1_request(), methods=HTTP_METHODS,
                         include_in_schema=False)
    # The viewer: static files, talking to /v1 over HTTP like any other client.
    app.mount("/", StaticFiles(directory=VIEWER_DIR, html=True, check_dir=False), name="viewer")
    _add_error_handlers(app)
    app.add_middleware(UploadConcurrencyMiddleware, limit=settings.max_concurrent_uploads,
                       wait_s=settings.upload_wait_s)
    app.add_middleware(UploadLimitMiddleware, max_bytes=settings.max_upload_bytes)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    app.openapi = lambda: _openapi_with_problem_422(app)
    return app


HTTP_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"]


def _undeclared_v1_request():
    """An endpoint for /v1 requests no route takes: 405 with `Allow` when the path exists with
    other methods, 404 when it does not exist at all."""
    declared = [(compile_path("/v1" + route.path)[0], route.methods)
                for module in V1_ROUTERS for route in module.router.routes
                if isinstance(route, APIRoute)]

    async def answer(request: Request) -> JSONResponse:
        path = request.scope["path"]
        allowed = sorted({method for pattern, methods in declared if pattern.match(path)
                          for method in methods})
        if not allowed:
            return _problem(status.HTTP_404_NOT_FOUND, f"no API path {path}; see /docs")
        response = _problem(status.HTTP_405_METHOD_NOT_ALLOWED,
                            f"{request.method} is not allowed on {path}; use {', '.join(allowed)}")
        response.headers["Allow"] = ", ".join(allowed)
        return response

    return answer


def _openapi_with_problem_422(app: FastAPI) -> dict:
    """FastAPI's document with its 422 schema (a list `detail`) replaced by what
    `invalid_request` answers: `schemas.ValidationProblem`."""
    if app.openapi_schema is None:
        document = FastAPI.openapi(app)  # kept as app.openapi_schema, changed in place below
        fastapi_422 = "#/components/schemas/HTTPValidationError"
        ours = "#/components/schemas/ValidationProblem"
        for operations in document.get("paths", {}).values():
            for operation in operations.values():
                answer = operation.get("responses", {}).get("422", {})
                schema = answer.get("content", {}).get("application/json", {}).get("schema", {})
                if schema.get("$ref") == fastapi_422:
                    schema["$ref"] = ours
        components = document.setdefault("components", {}).setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        model = schemas.ValidationProblem.model_json_schema(
            ref_template="#/components/schemas/{model}")
        components.update(model.pop("$defs", {}))
        components["ValidationProblem"] = model
        app.openapi_schema = document
    return app.openapi_schema


# -- errors -------------------------------------------------------------------------------------
ERROR_STATUS: dict[type[Exception], int] = {  # the first kind an error is of decides
    ImageTooLarge: 413,  # more pixels than one upload is worked on
    ImageReadError: status.HTTP_400_BAD_REQUEST,
    UploadTooLarge: 413,
    SegmentationError: 422,  # too small, no cell found
    InvalidValue: 422,  # unknown label, bad node
    UnknownCell: status.HTTP_404_NOT_FOUND,
    UnknownNode: status.HTTP_404_NOT_FOUND,
    MissingCrop: status.HTTP_404_NOT_FOUND,
    AtlasNotFound: status.HTTP_503_SERVICE_UNAVAILABLE,
    UnknownJob: status.HTTP_404_NOT_FOUND,
    RebuildAlreadyRunning: status.HTTP_409_CONFLICT,
    IdempotencyKeyReused: 422,  # an Idempotency-Key sent again with another request
    WithdrawnCell: status.HTTP_410_GONE,
    CellCopiesArchive: status.HTTP_409_CONFLICT,  # answered with the archived cells it copies
    NotWithdrawn: status.HTTP_409_CONFLICT,
}


def _problem(code: int, detail: str, **extra) -> JSONResponse:
    return JSONResponse({"detail": detail, **extra}, status_code=code)


def _add_error_handlers(app: FastAPI) -> None:
    def domain_error(request: Request, error: Exception) -> JSONResponse:
        if isinstance(error, UnknownCell):
            return _problem(status.HTTP_404_NOT_FOUND, f"no cell {error.args[0]!r} in the live atlas")
        if isinstance(error, CellCopiesArchive):
            return _problem(status.HTTP_409_CONFLICT, str(error), duplicates=error.copies)
        if isinstance(error, UnknownJob):
            return _problem(status.HTTP_404_NOT_FOUND, f"no rebuild job {error.args[0]!r}")
        if isinstance(error, RebuildAlreadyRunning):
            return _problem(status.HTTP_409_CONFLICT, str(error), job_id=error.job_id)
        code = next(code for kind, code in ERROR_STATUS.items() if isinstance(error, kind))
        if code == 422:  # every 422 has ValidationProblem's shape; a domain error names no field
            return _problem(code, str(error), errors=[])
        return _problem(code, str(error))

    for kind in ERROR_STATUS:
        app.add_exception_handler(kind, domain_error)

    @app.exception_handler(duckdb.IOException)
    def catalogue_busy(request: Request, error: duckdb.IOException) -> JSONResponse:
        # Another process (a build) held the catalogue longer than Catalog's retries wait.
        log.warning("catalogue busy answering %s %s: %s", request.method, request.url.path, error)
        response = _problem(status.HTTP_503_SERVICE_UNAVAILABLE,
                            "the catalogue is busy (another process is writing it); try again shortly")
        response.headers["Retry-After"] = "5"
        return response

    @app.exception_handler(RequestValidationError)
    def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        return _validation_problem(error.errors())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        json_body = "json" in request.headers.get("content-type", "")
        if error.status_code == 400 and json_body and error.__cause__ is not None:
            # FastAPI answers an undocumented 400 for a JSON body that json.loads cannot read
            # (not UTF-8, nested too deep); its other JSON errors are already a 422.
            reason = ("not valid UTF-8" if isinstance(error.__cause__, UnicodeDecodeError)
                      else "not readable JSON")
            return _validation_problem([{"loc": ("body",), "msg": f"the JSON body is {reason}",
                                         "type": "json_invalid"}])
        return await http_exception_handler(request, error)

    @app.exception_handler(Exception)
    def server_bug(request: Request, error: Exception) -> JSONResponse:
        log.error("unexpected error answering %s %s", request.method, request.url.path, exc_info=error)
        return _problem(status.HTTP_500_INTERNAL_SERVER_ERROR,
                        "internal server error; it has been logged")


def _validation_problem(errors) -> JSONResponse:
    messages = [f"{_where(e['loc'])}: {e['msg']}" for e in errors]
    return _problem(422, "; ".join(messages),
                    errors=[{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in errors])


def _where(loc) -> str:
    kinds = {"query": "query parameter", "path": "path parameter", "body": "body field", "header": "header"}
    if len(loc) >= 2 and loc[0] in kinds:
        return f"{kinds[loc[0]]} {'.'.join(str(part) for part in loc[1:])}"
    return ".".join(str(part) for part in loc) or "request"


class BodyTooLarge(HTTPException):
    """A request body counted past the limit while it streamed in (no or a false Content-Length).
    An HTTPException so that FastAPI's body parsing passes it on instead of answering 400."""

    def __init__(self, limit_mb: int):
        super().__init__(413, f"the request body is larger than the {limit_mb} MB allowed")


class UploadLimitMiddleware:
    """Answers 413 before reading a body whose declared size is over the limit (plus room for
    the multipart envelope), so that a huge upload is not spooled to disk first; a body without
    a Content-Length (chunked) is counted while it streams and cut as soon as it passes the limit."""

    ENVELOPE_BYTES = 64 * 1024

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        allowed = self.max_bytes + self.ENVELOPE_BYTES
        limit_mb = self.max_bytes // (1024 * 1024)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > allowed:
            await _problem(413, BodyTooLarge(limit_mb).detail)(scope, receive, send)
            return
        received = 0
        response_started = False

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > allowed:
                    raise BodyTooLarge(limit_mb)
            return message

        async def tracked_send(message):
            nonlocal response_started
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge as error:  # read outside FastAPI's body parsing
            if response_started:
                raise
            await _problem(413, error.detail)(scope, receive, send)


class UploadConcurrencyMiddleware:
    """At most `limit` uploads (multipart POSTs: images to decode and segment) are worked on at
    once, whatever the server's thread pool holds; one more waits up to `wait_s` for a place,
    then gets 503 with Retry-After. A burst of large uploads thus costs at most `limit` times
    the bound of one, instead of exhausting memory. Runs inside UploadLimitMiddleware, so a
    body over the byte limit is refused before it waits for a place."""

    def __init__(self, app, limit: int, wait_s: float):
        self.app = app
        self.limit = limit
        self.wait_s = wait_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._places: asyncio.Semaphore | None = None  # made in (and for) the serving event loop

    async def __call__(self, scope, receive, send):
        if not _is_upload(scope):
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # the first request, or the app served by a new loop (tests)
            self._loop, self._places = loop, asyncio.Semaphore(self.limit)
        try:
            await asyncio.wait_for(self._places.acquire(), timeout=self.wait_s)
        except (asyncio.TimeoutError, TimeoutError):
            response = _problem(status.HTTP_503_SERVICE_UNAVAILABLE,
                                f"{self.limit} uploads are being worked on and none finished within "
                                f"{self.wait_s:g} s; try again shortly")
            response.headers["Retry-After"] = str(max(1, math.ceil(self.wait_s)))
            await response(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self._places.release()


def _is_upload(scope) -> bool:
    if scope["type"] != "http" or scope["method"] != "POST":
        return False
    content_type = dict(scope["headers"]).get(b"content-type", b"")
    return content_type.lower().startswith(b"multipart/form-data")
