"""Segmentation of an uploaded image: every white cell with its cell and nucleus masks."""

from __future__ import annotations

from fastapi import APIRouter

from api import schemas
from api.deps import Upload, View
from api.routes.reference_cells import ERRORS
from api.views import segment_response

router = APIRouter(tags=["segment"])


@router.post("/segment", response_model=schemas.SegmentResponse, responses=ERRORS,
             summary="White cells of an uploaded image, masks as COCO RLE")
def segment(upload: Upload, view: View) -> schemas.SegmentResponse:
    regions = view.atlas.segment_at_atlas_scale(upload.image, upload.decoded_um_per_pixel)
    return segment_response(upload.shape, regions, view.atlas.segmenter, upload.um_per_pixel)
