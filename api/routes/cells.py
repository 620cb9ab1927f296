"""Archived cells: pages of cells, one cell, its crop image."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse

from api import schemas
from api.deps import View
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
