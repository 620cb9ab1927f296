"""The FastAPI application: versioned routes under /v1, health and metrics, error answers.

`create_app(home)` serves the live atlas version of ATLAS_HOME; every /v1 route needs an API
key (`Authorization: Bearer <token>`) unless `open_access=True`.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from pathlib import Path

import duckdb
from fastapi import Depends, FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

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
from atlas.cell import SegmentationError
from atlas.ingest import ImageReadError
from atlas.reference import UnknownCell
from atlas.store import AtlasNotFound

log = logging.getLogger("cellatlas.api")

V1_ROUTERS = (reference_cells, cells, classify, segment, atlas_map, review, corrections, rebuilds,
              viewer_support)


AUTH_ERRORS = {401: {"model": schemas.Problem, "description": "no valid API key"},
               403: {"model": schemas.Problem, "description": "the key's role is too low"}}


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
        app.include_router(module.router, prefix="/v1", dependencies=reviewer, responses=AUTH_ERRORS)
    app.include_router(health.router)
    # The viewer: static files, talking to /v1 over HTTP like any other client.
    app.mount("/", StaticFiles(directory=VIEWER_DIR, html=True, check_dir=False), name="viewer")
    _add_error_handlers(app)
    app.add_middleware(UploadLimitMiddleware, max_bytes=settings.max_upload_bytes)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    return app


# -- errors -------------------------------------------------------------------------------------
ERROR_STATUS: dict[type[Exception], int] = {
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
}


def _problem(code: int, detail: str, **extra) -> JSONResponse:
    return JSONResponse({"detail": detail, **extra}, status_code=code)


def _add_error_handlers(app: FastAPI) -> None:
    def domain_error(request: Request, error: Exception) -> JSONResponse:
        if isinstance(error, UnknownCell):
            return _problem(status.HTTP_404_NOT_FOUND, f"no cell {error.args[0]!r} in the live atlas")
        if isinstance(error, UnknownJob):
            return _problem(status.HTTP_404_NOT_FOUND, f"no rebuild job {error.args[0]!r}")
        if isinstance(error, RebuildAlreadyRunning):
            return _problem(status.HTTP_409_CONFLICT, str(error), job_id=error.job_id)
        code = next(code for kind, code in ERROR_STATUS.items() if isinstance(error, kind))
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
        messages = [f"{_where(e['loc'])}: {e['msg']}" for e in error.errors()]
        return _problem(422, "; ".join(messages),
                        errors=[{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in error.errors()])

    @app.exception_handler(Exception)
    def server_bug(request: Request, error: Exception) -> JSONResponse:
        log.error("unexpected error answering %s %s", request.method, request.url.path, exc_info=error)
        return _problem(status.HTTP_500_INTERNAL_SERVER_ERROR,
                        "internal server error; it has been logged")


def _where(loc) -> str:
    kinds = {"query": "query parameter", "path": "path parameter", "body": "body field", "header": "header"}
    if len(loc) >= 2 and loc[0] in kinds:
        return f"{kinds[loc[0]]} {'.'.join(str(part) for part in loc[1:])}"
    return ".".join(str(part) for part in loc) or "request"


class UploadLimitMiddleware:
    """Answers 413 before reading a body whose declared size is over the limit (plus room for
    the multipart envelope), so that a huge upload is not spooled to disk first."""

    ENVELOPE_BYTES = 64 * 1024

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_bytes + self.ENVELOPE_BYTES:
                limit_mb = self.max_bytes // (1024 * 1024)
                response = _problem(413,
                                    f"the request body is larger than the {limit_mb} MB allowed")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
