"""Adaptive reference cells: the most similar labelled cells of the archive."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query

from api import deps, schemas
from api.deps import Upload, View
from atlas.reference import MAX_K

router = APIRouter(tags=["reference cells"])

K = Annotated[int, Query(ge=1, le=MAX_K, description="how many reference cells")]
Method = Annotated[Literal["latent", "som"], Query(
    description="latent: nearest VAE latents; som: same SOM node first, then the nearest nodes")]
UmPerPixel = deps.UmPerPixel  # declared by the upload dependency (api.deps.uploaded_image)
ERRORS = {400: {"model": schemas.Problem},
          413: {"model": schemas.Problem,
                "description": "the upload is larger than the byte limit, or has more pixels at "
                               "the atlas's scale than one upload is worked on"},
          422: {"model": schemas.Problem},
          503: {"model": schemas.Problem,
                "description": "as many uploads as allowed are being worked on (and none finished "
                               "within the wait), or no atlas version is served",
                "headers": {"Retry-After": {"description": "seconds to wait before trying again",
                                            "schema": {"type": "integer"}}}}}


@router.post("/reference-cells", response_model=schemas.ReferenceCellsResponse,
             summary="Reference cells for the main cell of an uploaded image", responses=ERRORS)
def reference_cells_for_image(upload: Upload, view: View, k: K = 8,
                              method: Method = "latent") -> schemas.ReferenceCellsResponse:
    result = view.atlas.query_image(upload.image, k=k, method=method, image_sha=upload.sha256,
                                    um_per_pixel=upload.decoded_um_per_pixel)
    return view.reference_response(result, method, k)


@router.get("/cells/{cell_id}/reference-cells", response_model=schemas.ReferenceCellsResponse,
            summary="Reference cells for an archived cell", responses={404: {"model": schemas.Problem}})
def reference_cells_for_cell(cell_id: str, view: View, k: K = 8,
                             method: Method = "latent") -> schemas.ReferenceCellsResponse:
    return view.reference_response(view.atlas.query_cell(cell_id, k=k, method=method), method, k)
