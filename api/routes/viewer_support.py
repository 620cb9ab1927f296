"""Read-only answers the viewer needs beyond the core API: an archived cell's stored features
against the class ranges (what `POST /v1/classify` gives for an upload)."""

from __future__ import annotations

from fastapi import APIRouter

from api import schemas
from api.deps import View

router = APIRouter(tags=["cells"])


@router.get("/cells/{cell_id}/feature-positions", response_model=list[schemas.FeaturePosition],
            summary="An archived cell's features against each class's 2nd/50th/98th percentiles",
            responses={404: {"model": schemas.Problem}})
def feature_positions(cell_id: str, view: View) -> list[schemas.FeaturePosition]:
    return view.feature_positions(view.detail(cell_id).features)
