"""Liveness, readiness and Prometheus metrics (outside /v1, no key needed)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from api import schemas
from api.deps import State
from api.metrics import CONTENT_TYPE_LATEST

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=schemas.Health, summary="The process answers")
def healthz() -> schemas.Health:
    return schemas.Health(status="ok")


@router.get("/readyz", response_model=schemas.Ready, summary="An atlas version is loaded and served",
            responses={503: {"model": schemas.Problem}})
def readyz(state: State) -> schemas.Ready:
    return schemas.Ready(status="ready", version=state.live.get().version)


@router.get("/metrics", response_class=Response, summary="Prometheus metrics",
            responses={200: {"content": {"text/plain": {}}}})
def metrics(state: State) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
