"""What a technologist should look at next: uncertain predictions and suspect labels."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api import schemas
from api.deps import View

router = APIRouter(tags=["review"])


@router.get("/review-queue", response_model=schemas.ReviewQueue,
            summary="Uncorrected cells, highest prediction entropy first")
def review_queue(view: View, label: Annotated[str | None, Query(min_length=1)] = None,
                 limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> schemas.ReviewQueue:
    return view.review_queue(limit, label)


@router.get("/suspect-labels", response_model=schemas.SuspectLabels,
            summary="Cells whose label disagrees with the majority of their 8 latent reference cells")
def suspect_labels(view: View, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> schemas.SuspectLabels:
    suspects = view.suspect_labels()
    return schemas.SuspectLabels(version=view.version, total=len(suspects), items=suspects[:limit])
