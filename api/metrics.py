"""Prometheus metrics of the HTTP API: request counts and latency per route template."""

from __future__ import annotations

import re
import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,  # noqa: F401 - re-exported for the /metrics route
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from starlette.routing import compile_path

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class RequestMetrics:
    """One registry per app, so that several apps in one process (tests) do not collide."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("cellatlas_http_requests", "HTTP requests answered",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("cellatlas_http_request_duration_seconds", "time to answer an HTTP request",
                                 ["method", "route"], buckets=LATENCY_BUCKETS, registry=self.registry)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI middleware: labels each request with its route template (`/v1/cells/{cell_id}`,
    never the concrete path, to keep the number of series bounded). The templates are the
    paths of the app's OpenAPI document, which does not depend on the router's internals."""

    def __init__(self, app, metrics: RequestMetrics):
        self.app = app
        self.metrics = metrics
        self._templates: list[tuple[re.Pattern, str]] | None = None

    def route_of(self, scope) -> str:
        if self._templates is None:
            fastapi_app = scope["app"]
            paths = [*fastapi_app.openapi().get("paths", {}),
                     *(p for p in (fastapi_app.openapi_url, fastapi_app.docs_url, fastapi_app.redoc_url) if p)]
            self._templates = [(compile_path(path)[0], path) for path in paths]
        return next((template for regex, template in self._templates if regex.match(scope["path"])), "unmatched")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # unless a response starts: an exception escaped

        async def send_with_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            self.metrics.observe(scope["method"], self.route_of(scope), status, time.perf_counter() - started)
