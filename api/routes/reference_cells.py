"""Adaptive reference cells: the most similar labelled cells of the archive."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query

from api import schemas
from api.deps import Upload, View
from atlas.reference import MAX_K
from atlas.scale import UM_PER_PIXEL_RANGE

router = APIRouter(tags=["reference cells"])

K = Annotated[int, Query(ge=1, le=MAX_K, description="how many reference cells")]
Method = Annotated[Literal["latent", "som"], Query(
    description="latent: nearest VAE latents; som: same SOM node first, then the nearest nodes")]
UmPerPixel = Annotated[float | None, Query(
    ge=UM_PER_PIXEL_RANGE[0], le=UM_PER_PIXEL_RANGE[1], allow_inf_nan=False,
    description="the image's scale in um per pixel (default: the atlas's); the image is resampled "
                "to the atlas's scale before segmentation")]
ERRORS = {400: {"model": schemas.Problem}, 413: {"model": schemas.Problem}, 422: {"model": schemas.Problem}}


@router.post("/reference-cells", response_model=schemas.ReferenceCellsResponse,
             summary="Reference cells for the main cell of an uploaded image", responses=ERRORS)
def reference_cells_for_image(upload: Upload, view: View, k: K = 8, method: Method = "latent",
                              um_per_pixel: UmPerPixel = None) -> schemas.ReferenceCellsResponse:
    result = view.atlas.query_image(upload.image, k=k, method=method, image_sha=upload.sha256,
                                    um_per_pixel=um_per_pixel)
    return view.reference_response(result, method, k)


@router.get("/cells/{cell_id}/reference-cells", response_model=schemas.ReferenceCellsResponse,
            summary="Reference cells for an archived cell", responses={404: {"model": schemas.Problem}})
def reference_cells_for_cell(cell_id: str, view: View, k: K = 8,
                             method: Method = "latent") -> schemas.ReferenceCellsResponse:
    return view.reference_response(view.atlas.query_cell(cell_id, k=k, method=method), method, k)
