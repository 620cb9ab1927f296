"""Archived cells: pages of cells, one cell, its crop image; archiving one confirmed cell
(technologist), withdrawing and restoring a cell (admin)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Query, Request, status
from fastapi.responses import FileResponse, JSONResponse

from api import schemas
from api.deps import Admin, State, Technologist, Upload, View
from api.idempotency import IDEMPOTENT_RESPONSES, IdempotencyKey, idempotent
from api.views import parse_node

router = APIRouter(tags=["cells"])


@router.get("/cells", response_model=schemas.CellPage, summary="Page through archived cells")
def list_cells(
    view: View,
    label: Annotated[str | None, Query(min_length=1, description="effective label")] = None,
    node: Annotated[str | None, Query(description="SOM node as ROW,COL", examples=["3,4"])] = None,
    flagged: bool | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
) -> schemas.CellPage:
    return view.list_cells(label, parse_node(node), flagged, limit, cursor)


@router.get("/cells/{cell_id}", response_model=schemas.CellDetail, summary="One archived cell",
            responses={404: {"model": schemas.Problem}})
def get_cell(cell_id: str, view: View) -> schemas.CellDetail:
    return view.detail(cell_id)


@router.get("/cells/{cell_id}/image", response_class=FileResponse, summary="The cell's JPEG crop",
            responses={200: {"content": {"image/jpeg": {}}}, 404: {"model": schemas.Problem}})
def get_cell_image(cell_id: str, view: View) -> FileResponse:
    return FileResponse(view.existing_crop_path(cell_id), media_type="image/jpeg")


# -- the living archive ---------------------------------------------------------------------------
ARCHIVE_ERRORS = {400: {"model": schemas.Problem}, 413: {"model": schemas.Problem}, **IDEMPOTENT_RESPONSES,
                  409: {"model": schemas.CellCopiesArchive,
                        "description": "the cell is already archived (the same file, or a near copy of an "
                                       "archived cell): nothing was added; `duplicates` names the archived cell"}}
WITHDRAWAL_ERRORS = {404: {"model": schemas.Problem},
                     409: {"model": schemas.Problem, "description": "a restore of a cell that is not withdrawn"},
                     410: {"model": schemas.Problem, "description": "the cell is withdrawn (already)"}}


@router.post("/cells", response_model=schemas.ArchivedCell, status_code=status.HTTP_201_CREATED,
             summary="Archive one confirmed cell (technologist): a reference at once, in the next version",
             responses=ARCHIVE_ERRORS)
def archive_cell(
    upload: Upload, author: Technologist, view: View, state: State, request: Request,
    label: Annotated[str, Form(min_length=1, max_length=100, description="the confirmed label: a class of the atlas")],
    source: Annotated[str | None, Form(max_length=500, description="free text: where the cell comes from")] = None,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    described = state.archive.describe(view, upload, label)  # the slow part, outside the catalogue
    request_body = {"image_sha256": upload.sha256, "label": label, "source": source}
    answer = idempotent(state.catalog, author.name, idempotency_key, request, request_body, lambda db: (
        status.HTTP_201_CREATED, state.archive.archive_cell(view, described, source, author.name, db=db)))
    state.archive.changed()
    return answer


@router.delete("/cells/{cell_id}", response_model=schemas.Withdrawal,
               summary="Withdraw a cell (admin): no longer served, left out of the next version",
               responses=WITHDRAWAL_ERRORS)
def withdraw_cell(cell_id: str, body: schemas.WithdrawalRequest, author: Admin, view: View,
                  state: State) -> schemas.Withdrawal:
    return state.archive.withdraw(view, cell_id, body.reason, author.name)


@router.post("/cells/{cell_id}/restore", response_model=schemas.Withdrawal,
             summary="Restore a withdrawn cell (admin): a new audited event", responses=WITHDRAWAL_ERRORS)
def restore_cell(cell_id: str, body: schemas.WithdrawalRequest, author: Admin, view: View,
                 state: State) -> schemas.Withdrawal:
    return state.archive.restore(view, cell_id, body.reason, author.name)
