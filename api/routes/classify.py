"""Class prediction for an uploaded cell, with its uncertainty and its features against the
archive's classes."""

from __future__ import annotations

from fastapi import APIRouter

from api import schemas
from api.deps import Upload, View
from api.routes.reference_cells import ERRORS

router = APIRouter(tags=["classify"])


@router.post("/classify", response_model=schemas.ClassifyResponse, responses=ERRORS,
             summary="Predict the class of the main cell of an uploaded image")
def classify(upload: Upload, view: View) -> schemas.ClassifyResponse:
    return view.classify_response(view.atlas.query_image(
        upload.image, k=1, image_sha=upload.sha256, um_per_pixel=upload.decoded_um_per_pixel))
