"""Rebuilds: publish a new atlas version with the corrections applied, and follow its progress."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, status
from fastapi.responses import JSONResponse

from api import schemas
from api.deps import Admin, State
from api.idempotency import IDEMPOTENT_RESPONSES, IdempotencyKey, idempotent

router = APIRouter(tags=["rebuilds"])


def _job(job: dict) -> schemas.RebuildJob:
    return schemas.RebuildJob(**job, url=f"/v1/rebuilds/{job['job_id']}")


@router.post("/rebuilds", response_model=schemas.RebuildJob, status_code=status.HTTP_202_ACCEPTED,
             summary="Start a rebuild with the current corrections (admin)",
             description="With an Idempotency-Key, a retry answers the job the first request "
                         "started instead of starting another. The key is recorded once the "
                         "rebuild process has started: a server killed in between forgets it.",
             responses={409: {"model": schemas.Problem, "description": "a rebuild is already running"},
                        413: {"model": schemas.Problem}, **IDEMPOTENT_RESPONSES})
def start_rebuild(state: State, admin: Admin, request: Request,
                  body: schemas.RebuildRequest | None = None,
                  idempotency_key: IdempotencyKey = None) -> JSONResponse:
    body = body or schemas.RebuildRequest()
    return idempotent(state.catalog, admin.name, idempotency_key, request, body, lambda db: (
        status.HTTP_202_ACCEPTED, _job(state.rebuilds.start(retrain_backbone=body.retrain_backbone))))


@router.get("/rebuilds", response_model=schemas.RebuildJobs, summary="Recent rebuilds, newest first")
def list_rebuilds(state: State, limit: Annotated[int, Query(ge=1, le=100)] = 20) -> schemas.RebuildJobs:
    return schemas.RebuildJobs(items=[_job(job) for job in state.rebuilds.recent(limit)])


@router.get("/rebuilds/{job_id}", response_model=schemas.RebuildJob, summary="One rebuild's state and progress",
            responses={404: {"model": schemas.Problem}})
def get_rebuild(job_id: str, state: State) -> schemas.RebuildJob:
    return _job(state.rebuilds.job(job_id))
