"""The HTTP API keeps its published contract (issue 14, items 3-5): error answers carry no
internal object text, every 4xx is declared with the one error schema and answers match it,
undeclared methods answer 405, and a chunked upload is cut as soon as it passes the limit."""

from __future__ import annotations

import asyncio
import io

import httpx
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.settings import Settings
from atlas.catalog import Catalog
from atlas.ingest import ImageReadError, read_image_bytes
from tests.conftest import home_copy, open_client

pytestmark = pytest.mark.filterwarnings("ignore:n_jobs value .* overridden:UserWarning")  # umap

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def home(built_atlas, tmp_path_factory):
    return home_copy(built_atlas[0], tmp_path_factory.mktemp("contract"))


@pytest.fixture(scope="module")
def client(home):
    with open_client(home) as client:
        yield client


@pytest.fixture(scope="module")
def openapi(client) -> dict:
    return client.get("/openapi.json").json()


def a_cell_id(client) -> str:
    return client.get("/v1/cells", params={"limit": 1}).json()["items"][0]["cell_id"]


# -- item 3: no internal object text ---------------------------------------------------------
def test_unreadable_image_message_has_no_object_repr(client):
    with pytest.raises(ImageReadError) as raised:
        read_image_bytes(b"this is not an image")
    assert "object at 0x" not in str(raised.value) and "BytesIO" not in str(raised.value)
    for path in ("/v1/reference-cells", "/v1/classify", "/v1/segment"):
        response = client.post(path, files={"image": ("x.png", b"not an image", "image/png")})
        assert response.status_code == 400, response.text
        detail = response.json()["detail"]
        assert detail == "not a readable image (not a JPEG, PNG, TIFF or BMP file)"
        assert "0x" not in detail and "<" not in detail


def test_truncated_image_message_has_no_object_repr():
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buffer, format="PNG")
    with pytest.raises(ImageReadError) as raised:
        read_image_bytes(buffer.getvalue()[:60])
    assert str(raised.value).startswith("corrupt or truncated image (")
    assert " at 0x" not in str(raised.value)


# -- item 4: an honest OpenAPI contract ------------------------------------------------------
def test_every_v1_4xx_is_declared_with_the_error_schema(openapi):
    assert "HTTPValidationError" not in openapi["components"]["schemas"]
    detail = openapi["components"]["schemas"]["Problem"]["properties"]["detail"]
    assert detail["type"] == "string"
    v1 = {(method, path): operation for path, operations in openapi["paths"].items()
          if path.startswith("/v1") for method, operation in operations.items()}
    assert len(v1) >= 17
    for (method, path), operation in v1.items():
        answers = operation["responses"]
        for code in ("401", "403", "503"):
            assert code in answers, (method, path, code)
        for code, answer in answers.items():
            if code.startswith(("4", "5")):
                schema = answer["content"]["application/json"]["schema"]["$ref"]
                declared = openapi["components"]["schemas"][schema.rsplit("/", 1)[-1]]
                # Problem, ValidationProblem, or a Problem with more fields (a 409 names what it copies)
                assert declared["properties"]["detail"]["type"] == "string", (method, path, code)
                assert "detail" in declared["required"], (method, path, code)
        if operation.get("parameters") or "requestBody" in operation:
            assert "422" in answers, (method, path)
    uploads = [("post", "/v1/reference-cells"), ("post", "/v1/classify"), ("post", "/v1/segment")]
    for key in uploads:
        assert {"400", "413", "422"} <= set(v1[key]["responses"]), key
    assert "409" in v1[("post", "/v1/rebuilds")]["responses"]
    assert "404" in v1[("get", "/v1/cells/{cell_id}")]["responses"]
    assert "404" in v1[("post", "/v1/cells/{cell_id}/corrections")]["responses"]


def test_422_body_matches_the_declared_schema(client, openapi):
    declared = openapi["components"]["schemas"]["ValidationProblem"]
    assert declared["properties"]["detail"]["type"] == "string"
    assert set(declared["required"]) >= {"detail", "errors"}
    response = client.get("/v1/cells", params={"limit": 0})
    assert response.status_code == 422
    body = response.json()
    assert isinstance(body["detail"], str) and "query parameter limit" in body["detail"]
    assert body["errors"][0]["loc"] == ["query", "limit"]
    assert set(body["errors"][0]) == {"loc", "msg", "type"}


def test_retrain_backbone_must_be_a_boolean(client):
    started = []
    state = client.app.state.cellatlas
    original = state.rebuilds.start
    state.rebuilds.start = lambda **options: started.append(options)  # never launch a build here
    try:
        for not_a_boolean in (0, 1, "true", "yes", None):
            response = client.post("/v1/rebuilds", json={"retrain_backbone": not_a_boolean})
            assert response.status_code == 422, (not_a_boolean, response.text)
            assert "retrain_backbone" in response.json()["detail"]
    finally:
        state.rebuilds.start = original
    assert started == []


def test_empty_label_is_refused_by_the_schema_too(client, openapi):
    for path in ("/v1/cells", "/v1/atlas/hits", "/v1/review-queue"):
        label = next(p for p in openapi["paths"][path]["get"]["parameters"] if p["name"] == "label")
        assert label["schema"]["anyOf"][0]["minLength"] == 1, path
        response = client.get(path, params={"label": ""})
        assert response.status_code == 422, (path, response.text)
        assert "query parameter label" in response.json()["detail"]


def test_undeclared_methods_under_v1_answer_405_with_allow(client, home):
    cell_id = a_cell_id(client)
    cases = [("GET", "/v1/classify", "POST"), ("DELETE", "/v1/atlas", "GET"),
             ("PUT", f"/v1/cells/{cell_id}/corrections", "POST"),
             ("PATCH", "/v1/rebuilds", "GET, POST")]
    for method, path, allow in cases:
        response = client.request(method, path)
        assert response.status_code == 405, (method, path, response.text)
        assert response.headers["allow"] == allow
        assert method in response.json()["detail"]
    unknown = client.get("/v1/no-such-thing")
    assert unknown.status_code == 404 and "/v1/no-such-thing" in unknown.json()["detail"]
    token = Catalog(home).create_key("contract-reviewer", "reviewer")
    with TestClient(create_app(home)) as secured:  # also without a key: the path has no GET
        assert secured.get("/v1/classify").status_code == 405
        assert secured.get("/v1/atlas", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert client.get("/").status_code == 200  # the viewer is still served


def test_unreadable_json_bodies_get_the_documented_422(client):
    path = f"/v1/cells/{a_cell_id(client)}/corrections"
    json_type = {"Content-Type": "application/json"}
    response = client.post(path, content=b'{"label": "\xff\xfe"}', headers=json_type)
    assert response.status_code == 422, response.text
    body = response.json()
    assert "not valid UTF-8" in body["detail"] and body["errors"][0]["loc"] == ["body"]
    response = client.post(path, content=b"[" * 200_000, headers=json_type)  # too deep for json
    assert response.status_code == 422, response.text
    assert "not readable JSON" in response.json()["detail"]


# -- item 5: a chunked upload is cut at the limit --------------------------------------------
def test_chunked_upload_is_refused_as_soon_as_it_passes_the_limit(home):
    limit = 2 * MIB
    app = create_app(home, settings=Settings(home=home, open_access=True, max_upload_bytes=limit))
    boundary = "contract-boundary"
    pulled = {"bytes": 0}
    total = 60 * MIB

    async def body():  # 60 MB without a Content-Length: sent chunked, pulled one chunk at a time
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="big.png"'
                "\r\nContent-Type: image/png\r\n\r\n").encode()
        pulled["bytes"] += len(head)
        yield head
        chunk = b"\0" * (256 * 1024)
        while pulled["bytes"] < total:
            pulled["bytes"] += len(chunk)
            yield chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/v1/segment", content=body(),
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})

    response = asyncio.run(send())
    assert response.status_code == 413, response.text
    assert "larger than the 2 MB allowed" in response.json()["detail"]
    assert pulled["bytes"] <= limit + 64 * 1024 + 256 * 1024 + 512  # the limit, the envelope, 1 chunk
