"""Label corrections: append-only and audited; the next rebuild applies them, the API serves
them at once."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, status
from fastapi.responses import JSONResponse

from api import schemas
from api.deps import State, Technologist, View
from api.idempotency import IDEMPOTENT_RESPONSES, IdempotencyKey, idempotent

router = APIRouter(tags=["corrections"])


@router.post("/cells/{cell_id}/corrections", response_model=schemas.Correction,
             status_code=status.HTTP_201_CREATED, summary="Correct a cell's label (technologist)",
             responses={404: {"model": schemas.Problem}, 413: {"model": schemas.Problem},
                        **IDEMPOTENT_RESPONSES})
def correct_label(cell_id: str, body: schemas.CorrectionRequest, author: Technologist,
                  view: View, state: State, request: Request,
                  idempotency_key: IdempotencyKey = None) -> JSONResponse:
    old_label, new_label = view.label_of(cell_id), view.check_label(body.label)
    answer = idempotent(state.catalog, author.name, idempotency_key, request, body, lambda db: (
        status.HTTP_201_CREATED,
        state.corrections.add(cell_id, old_label=old_label, new_label=new_label, note=body.note,
                              author=author.name, atlas_version=view.version, db=db)))
    state.corrections.changed()
    return answer


@router.get("/corrections", response_model=schemas.CorrectionPage, summary="The corrections log, newest first")
def list_corrections(
    state: State,
    cell_id: str | None = None,
    author: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[int | None, Query(description="next_cursor of the previous page")] = None,
) -> schemas.CorrectionPage:
    return state.corrections.page(cell_id, author, limit, cursor)
