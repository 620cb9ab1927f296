"""The atlas as a map: its summary, the SOM U-matrix, hits per node, cells of a node, the 2-D
projection, and the published versions."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from api import schemas
from api.deps import State, View
from api.views import atlas_summary, drift_report, u_matrix_png, versions

router = APIRouter(tags=["atlas"])


@router.get("/atlas", response_model=schemas.AtlasSummary, summary="The live atlas version")
def get_atlas(view: View) -> schemas.AtlasSummary:
    return atlas_summary(view)


@router.get("/atlas/drift", response_model=schemas.DriftReport,
            summary="How the latest added cells sit against the archive; drift says: retrain")
def get_drift(view: View) -> schemas.DriftReport:
    return drift_report(view)


@router.get("/atlas/u-matrix", response_model=schemas.UMatrix, summary="SOM U-matrix as numbers")
def get_u_matrix(view: View) -> schemas.UMatrix:
    u_matrix = view.base.u_matrix
    return schemas.UMatrix(version=view.version, rows=u_matrix.shape[0], cols=u_matrix.shape[1],
                           values=u_matrix.astype(float).tolist())


@router.get("/atlas/u-matrix.png", response_class=Response, summary="SOM U-matrix as an image",
            responses={200: {"content": {"image/png": {}}}})
def get_u_matrix_png(view: View, scale: Annotated[int, Query(ge=1, le=64, description="pixels per node")] = 16,
                     ) -> Response:
    return Response(u_matrix_png(view.base.u_matrix, scale), media_type="image/png")


@router.get("/atlas/nodes/{row}/{col}/cells", response_model=schemas.NodeCells,
            summary="Cells of one SOM node, closest to the node first", responses={404: {"model": schemas.Problem}})
def get_node_cells(row: int, col: int, view: View,
                   limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> schemas.NodeCells:
    return view.node_cells(row, col, limit)


@router.get("/atlas/hits", response_model=schemas.Hits, summary="Cells per SOM node, of one label or all")
def get_hits(view: View, label: Annotated[str | None, Query(min_length=1)] = None) -> schemas.Hits:
    return view.hits(label)


@router.get("/atlas/projection", response_model=schemas.Projection, summary="2-D UMAP projection of every cell")
def get_projection(view: View) -> schemas.Projection:
    return view.projection()


@router.get("/versions", response_model=schemas.Versions, summary="Published atlas versions")
def get_versions(state: State) -> schemas.Versions:
    return versions(state.settings.home)
