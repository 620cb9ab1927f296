"""The viewer in a real browser: Debian's chromium driven by Playwright against a live server over
an atlas built from a small real subset of ../shared/data/pbc. Open the map, click a node, open a
cell, see its 8 reference cells, correct a label, walk the review queue with the keyboard; no
request ever leaves 127.0.0.1. Screenshots at 1280x800 go to /tmp/viewer-shots/ (or $CELLATLAS_SHOTS).

`scripts/readme_screenshots.sh ATLAS_HOME` runs the same tests on a copy of a real atlas
($CELLATLAS_VIEWER_ATLAS) to make the README's pictures."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip("the browser tests need Debian's chromium at /usr/bin/chromium (apt-get install -y chromium)",
                allow_module_level=True)

import uvicorn  # noqa: E402
from playwright.sync_api import Browser, Page, expect, sync_playwright  # noqa: E402

from api import server as api_server  # noqa: E402
from api.app import create_app  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:n_jobs value .* overridden:UserWarning")  # umap, in the build

PBC = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pbc"
PER_CLASS = 12
SHOTS = Path(os.environ.get("CELLATLAS_SHOTS", "/tmp/viewer-shots"))
GIVEN_ATLAS = os.environ.get("CELLATLAS_VIEWER_ATLAS")  # an atlas home to show instead of the tiny one
VIEWPORT = {"width": 1280, "height": 800}
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CANVAS_PADDING = 12  # PanZoomCanvas's default: the fitted content sits this far inside the canvas


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def atlas_home(tmp_path_factory) -> Path:
    """An atlas of PER_CLASS real images of each PBC class (symlinks), built with the tiny preset;
    or a copy of $CELLATLAS_VIEWER_ATLAS (the tests correct labels: never the original)."""
    if GIVEN_ATLAS:
        copy = tmp_path_factory.mktemp("viewer") / "home"
        shutil.copytree(GIVEN_ATLAS, copy, ignore=shutil.ignore_patterns("*.lock", "logs"))
        return copy
    if not PBC.is_dir():
        pytest.skip(f"real data not found at {PBC} (it sits beside the repository in ../shared/data)")
    from indexer.build import build
    from indexer.config import BuildConfig

    root = tmp_path_factory.mktemp("viewer")
    images = root / "images"
    for class_dir in sorted(p for p in PBC.iterdir() if p.is_dir()):
        (images / class_dir.name).mkdir(parents=True)
        for image in sorted(class_dir.glob("*.jpg"))[:PER_CLASS]:
            (images / class_dir.name / image.name).symlink_to(image)
    build(BuildConfig(images=images, home=root / "home", preset="tiny", epochs=1, vae_epochs=3,
                      som_epochs=5, threads=1, progress=False))
    return root / "home"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def _serve(app) -> Iterator[str]:
    """A live uvicorn server for `app` on a free port of 127.0.0.1, in a background thread."""
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def base_url(atlas_home) -> Iterator[str]:
    """The demo's setup: open access."""
    with _serve(create_app(atlas_home, open_access=True)) as url:
        yield url


@pytest.fixture(scope="module")
def api(base_url) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def _local(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("data", "blob") or parts.hostname == "127.0.0.1"


@pytest.fixture
def page(browser) -> Iterator[Page]:
    """A 1280x800 page; fails the test on a script error or on any request leaving 127.0.0.1."""
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.set_default_timeout(20_000)
    outside: list[str] = []
    errors: list[str] = []
    page.on("request", lambda request: None if _local(request.url) else outside.append(request.url))
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert outside == [], f"requests left 127.0.0.1: {outside}"
    assert errors == [], f"script errors: {errors}"


def _screenshot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"))


def _fitted_point(page: Page, selector: str, world_w: float, world_h: float, wx: float, wy: float):
    """Page coordinates of world point (wx, wy) on a PanZoomCanvas that has just fitted its content."""
    box = page.locator(selector).bounding_box()
    scale = min((box["width"] - 2 * CANVAS_PADDING) / world_w, (box["height"] - 2 * CANVAS_PADDING) / world_h)
    left = (box["width"] - world_w * scale) / 2
    top = (box["height"] - world_h * scale) / 2
    return box["x"] + left + wx * scale, box["y"] + top + wy * scale


def _busiest_node(api: httpx.Client) -> tuple[int, int, int]:
    hits = api.get("/v1/atlas/hits").json()
    count, row, col = max((n, r, c) for r, line in enumerate(hits["counts"]) for c, n in enumerate(line))
    return row, col, count


# -- flows ---------------------------------------------------------------------------------------
def test_map_node_gallery_opens_a_cell_with_8_reference_cells(page: Page, base_url, api):
    summary = api.get("/v1/atlas").json()
    rows, cols = summary["som"]["rows"], summary["som"]["cols"]
    row, col, count = _busiest_node(api)
    page.goto(base_url + "/")
    expect(page.locator("#atlas-version")).to_have_text(f"atlas {summary['version']}")
    expect(page.locator("#session")).to_contain_text("open access")  # no sign-in with open access
    expect(page.locator("#map-shape")).to_contain_text(f"{rows}×{cols} nodes")
    page.wait_for_timeout(300)  # the first fitted frame
    x, y = _fitted_point(page, "#map-canvas", cols, rows, col + 0.5, row + 0.5)

    page.mouse.move(x, y)
    tooltip = page.locator(".page-map .tooltip")
    expect(tooltip).to_contain_text(f"Node ({row}, {col})")
    expect(tooltip).to_contain_text(f"{count} cell")
    page.mouse.click(x, y)
    expect(page).to_have_url(f"{base_url}/#/map/{row}/{col}")
    gallery = page.locator("#gallery li")
    expect(gallery).to_have_count(min(count, 200))
    expect(gallery.first.locator("b")).not_to_be_empty()
    expect(gallery.first.locator("img")).to_have_attribute("loading", "lazy")
    page.mouse.move(x, y)
    _screenshot(page, "map")

    page.locator("#map-canvas").focus()  # the keyboard walks the grid from the open node
    fitted = page.locator("#map-canvas").screenshot()
    page.keyboard.press("+")  # zoom keys: in, then back to the whole map
    page.wait_for_timeout(200)
    assert page.locator("#map-canvas").screenshot() != fitted
    page.keyboard.press("0")
    page.wait_for_timeout(200)
    page.keyboard.press("ArrowLeft" if col > 0 else "ArrowRight")
    page.keyboard.press("Enter")
    expect(page).to_have_url(f"{base_url}/#/map/{row}/{col - 1 if col > 0 else col + 1}")
    page.go_back()
    expect(page.locator("#gallery-title")).to_have_text(f"Node ({row}, {col})")

    cell_id = gallery.first.locator("a").get_attribute("href").rsplit("/", 1)[1]
    gallery.first.locator("a").click()
    expect(page).to_have_url(f"{base_url}/#/review/{cell_id}")
    tiles = page.locator("#reference-grid > figure")
    expect(tiles).to_have_count(9)
    expect(tiles.nth(4)).to_have_class("tile query")  # the query in the centre
    references = page.locator("#reference-grid .tile.reference")
    expect(references).to_have_count(8)
    for i in range(8):
        expect(references.nth(i).locator("figcaption b")).not_to_be_empty()
        expect(references.nth(i).locator(".tile-sub")).to_contain_text(f"#{i + 1} · d ")
    page.wait_for_function(
        "[...document.querySelectorAll('#reference-grid img')].every(i => i.complete && i.naturalWidth > 0)")
    expected = api.get(f"/v1/cells/{cell_id}/reference-cells", params={"k": 8}).json()
    shown = [a.get_attribute("href").rsplit("/", 1)[1] for a in references.locator("a").all()]
    assert shown == [r["cell_id"] for r in expected["references"]]
    detail = api.get(f"/v1/cells/{cell_id}").json()
    expect(page.locator("#predicted-label")).to_have_text(detail["predicted_label"])
    expect(page.locator(".prediction-panel .flag")).to_contain_text("Uncertain" if detail["flagged"] else "Confident")
    if expected["prediction"].get("prediction_set") is not None:  # shown where the entropy was
        expect(page.locator(".prediction-panel .prediction-set")).to_have_text(
            "{" + ", ".join(expected["prediction"]["prediction_set"]) + "}")
    expect(page.locator(".distribution-panel table.bars tr")).not_to_have_count(0)
    first_feature = page.locator(".features-panel table.features tbody tr").first
    expect(first_feature).to_be_visible()
    if "/v1/cells/{cell_id}/feature-positions" in api.get("/openapi.json").json()["paths"]:
        area = detail["features"]["cell_area_um2"]  # the stored value, formatted as the page does
        expect(first_feature.locator("td.num")).to_have_text(f"{area:.{1 if area >= 100 else 2}f}")
    _screenshot(page, "review")

    page.get_by_label("SOM node").check()
    expect(page.locator("#reference-grid")).to_have_attribute("data-method", "som")
    expect(references).to_have_count(8)


def test_correction_shows_the_new_label_at_once(page: Page, base_url, api):
    cell = api.get("/v1/cells", params={"label": "monocyte", "limit": 1}).json()["items"][0]
    page.goto(f"{base_url}/#/review/{cell['cell_id']}")
    expect(page.locator("#current-label")).to_have_text("monocyte")
    page.select_option("#label-select", "lymphocyte")
    page.fill("#note", "granules missed at first look")
    page.click("#save-correction")
    expect(page.locator("#current-label")).to_have_text("lymphocyte")
    expect(page.locator("#query-label")).to_have_text("lymphocyte")
    expect(page.locator(".label-panel")).to_contain_text("was monocyte")
    expect(page.locator("#corrected-count")).to_have_text("1 corrected")
    assert api.get(f"/v1/cells/{cell['cell_id']}").json()["label"] == "lymphocyte"
    latest = api.get("/v1/corrections", params={"cell_id": cell["cell_id"]}).json()["items"][0]
    assert (latest["old_label"], latest["new_label"], latest["note"]) == (
        "monocyte", "lymphocyte", "granules missed at first look")


def test_review_queue_walks_with_the_keyboard(page: Page, base_url, api):
    queue = api.get("/v1/review-queue", params={"limit": 5}).json()["items"]
    page.goto(f"{base_url}/#/queue")
    items = page.locator("#queue-list li")
    current = page.locator("#queue-list li[aria-current=true]")
    query_id = page.locator(".page-queue .tile.query .tile-sub")
    expect(items.first).to_have_attribute("aria-current", "true")
    expect(query_id).to_have_text(queue[0]["cell_id"])
    expect(page.locator(".page-queue .tile.reference")).to_have_count(8)

    page.keyboard.press("j")
    expect(items.nth(1)).to_have_attribute("aria-current", "true")
    expect(query_id).to_have_text(queue[1]["cell_id"])
    page.keyboard.press("ArrowDown")
    expect(query_id).to_have_text(queue[2]["cell_id"])
    page.keyboard.press("k")
    page.keyboard.press("k")
    expect(query_id).to_have_text(queue[0]["cell_id"])
    expect(current).to_have_count(1)
    _screenshot(page, "queue")

    page.keyboard.press("a")  # accept the label: recorded, then on to the next cell
    expect(items.first).to_have_class("reviewed")
    expect(query_id).to_have_text(queue[1]["cell_id"])
    accepted = api.get(f"/v1/cells/{queue[0]['cell_id']}").json()
    assert accepted["corrected"] and accepted["label"] == queue[0]["label"]

    new_label = next(c for c in api.get("/v1/atlas").json()["classes"] if c != queue[1]["label"])
    page.keyboard.press("c")  # correct: focus the class list, choose, Enter
    expect(page.locator("#queue-label-select")).to_be_focused()
    page.select_option("#queue-label-select", new_label)
    page.keyboard.press("Enter")
    expect(items.nth(1)).to_contain_text(new_label)
    expect(query_id).to_have_text(queue[2]["cell_id"])
    assert api.get(f"/v1/cells/{queue[1]['cell_id']}").json()["label"] == new_label
    remaining = api.get("/v1/review-queue", params={"limit": 1000}).json()["items"]
    assert {queue[0]["cell_id"], queue[1]["cell_id"]}.isdisjoint(i["cell_id"] for i in remaining)

    page.get_by_role("tab", name="Suspect labels").click()
    suspects = api.get("/v1/suspect-labels").json()
    expect(page.locator(".page-queue .queue-pane p")).to_contain_text(f"{suspects['total']} cells")
    if suspects["items"]:
        expect(query_id).to_have_text(suspects["items"][0]["cell_id"])


def test_projection_click_reviews_the_cell(page: Page, base_url, api):
    projection = api.get("/v1/atlas/projection").json()
    xs, ys = projection["x"], projection["y"]
    unit = 1000 / max(max(xs) - min(xs), max(ys) - min(ys))
    width, height = (max(xs) - min(xs)) * unit, (max(ys) - min(ys)) * unit
    page.goto(f"{base_url}/#/projection")
    expect(page.locator(".page-projection .legend-item")).to_have_count(len(api.get("/v1/atlas").json()["classes"]))
    page.wait_for_timeout(300)
    # The point farthest from any other, so that the pointer cannot land on a neighbour.
    i = max(range(len(xs)), key=lambda j: min(
        (xs[j] - xs[o]) ** 2 + (ys[j] - ys[o]) ** 2 for o in range(len(xs)) if o != j))
    x, y = _fitted_point(page, "#projection-canvas", width, height,
                         (xs[i] - min(xs)) * unit, (max(ys) - ys[i]) * unit)
    page.mouse.move(x, y)
    expect(page.locator(".page-projection .tooltip")).to_contain_text(projection["cell_ids"][i])
    _screenshot(page, "projection")
    page.mouse.click(x, y)
    expect(page).to_have_url(f"{base_url}/#/review/{projection['cell_ids'][i]}")
    expect(page.locator("#reference-grid .tile.reference")).to_have_count(8)


def test_upload_by_file_input_and_by_drop(page: Page, base_url):
    image = sorted((PBC / "neutrophil").glob("*.jpg"))[-1]  # not one of the archived images
    page.goto(f"{base_url}/#/review")
    expect(page.locator(".page-review .empty-state")).to_contain_text("drop a cell image")
    page.set_input_files("#upload-input", str(image))
    expect(page.locator("#query-label")).to_have_text("uploaded image")
    expect(page.locator("#reference-grid .tile.reference")).to_have_count(8)
    expect(page.locator("#predicted-label")).not_to_be_empty()
    expect(page.locator(".features-panel table.features tbody tr").first).to_be_visible()

    page.evaluate("""async (bytes) => {
        const file = new File([new Uint8Array(bytes)], "dropped.jpg", {type: "image/jpeg"});
        const data = new DataTransfer();
        data.items.add(file);
        document.getElementById("page-review").dispatchEvent(new DragEvent("drop", {dataTransfer: data, bubbles: true}));
    }""", list(image.read_bytes()))
    expect(page.locator(".page-review .tile.query .tile-sub")).to_have_text("dropped.jpg")
    expect(page.locator("#reference-grid .tile.reference")).to_have_count(8)


def test_rebuild_banner_shows_while_a_rebuild_runs(page: Page, base_url):
    job = {"job_id": "rebuild-1", "state": "running", "started_at": "2026-01-01T00:00:00Z", "finished_at": None,
           "version": None, "message": None, "progress": {"step": "classifier", "done": 2, "total": 5},
           "url": "/v1/rebuilds/rebuild-1"}
    page.route("**/v1/rebuilds", lambda route: route.fulfill(json={"items": [job]}))
    page.goto(f"{base_url}/#/map")
    expect(page.locator("#rebuild-banner")).to_contain_text("Rebuilding the atlas… 40% (classifier)")


def test_sign_in_with_an_api_key(browser: Browser, atlas_home):
    """Without open access the viewer asks for a key, keeps it in the tab's session, and sends it
    with every request, images included."""
    token = api_server.create_key(str(atlas_home), "viewer-test", "technologist")
    with _serve(create_app(atlas_home)) as url:
        context = browser.new_context(viewport=VIEWPORT)
        page = context.new_page()
        page.goto(url + "/")
        page.fill("#api-key", "cak_not-a-key")
        page.keyboard.press("Enter")
        expect(page.locator(".signin .status")).to_have_text("That key was not accepted.")
        page.fill("#api-key", token)
        page.keyboard.press("Enter")
        expect(page.locator("#atlas-version")).to_be_visible()
        expect(page.locator("#session")).to_contain_text("signed in")
        assert page.evaluate("sessionStorage.getItem('cellatlas.api-key')") == token
        page.reload()  # the key survives a reload of the tab
        expect(page.locator("#map-shape")).to_contain_text("nodes")
        cell_id = httpx.get(url + "/v1/cells", params={"limit": 1},
                            headers={"Authorization": f"Bearer {token}"}).json()["items"][0]["cell_id"]
        page.goto(f"{url}/#/review/{cell_id}")
        expect(page.locator("#reference-grid .tile.reference")).to_have_count(8)
        page.wait_for_function("[...document.querySelectorAll('#reference-grid img')]"
                               ".every(i => i.src.startsWith('blob:') && i.naturalWidth > 0)")
        context.close()


def test_a_244x244_map_and_100k_points_stay_fluid(page: Page, base_url, api):
    """The largest map the design names, and a 100k-cell projection (answers faked in the
    browser): wheel-zoom and drag frames stay well under a tenth of a second."""
    size, cells = 244, 100_000
    classes = api.get("/v1/atlas").json()["classes"]
    u_matrix = [[round(abs(math.sin(r / 9) * math.cos(c / 13)), 3) for c in range(size)] for r in range(size)]
    hits = {label: [[(r * 7 + c * 3 + k) % 11 // 8 for c in range(size)] for r in range(size)]
            for k, label in enumerate(classes)}
    total = [[sum(hits[label][r][c] for label in classes) for c in range(size)] for r in range(size)]
    projection = {"version": "x", "cell_ids": [f"c{i}" for i in range(cells)],
                  "x": [math.cos(i) * (i % 997) for i in range(cells)],
                  "y": [math.sin(i) * (i % 991) for i in range(cells)],
                  "labels": [classes[i % len(classes)] for i in range(cells)], "flagged": [i % 7 == 0 for i in range(cells)]}

    def fake_hits(route):
        label = dict(p.split("=") for p in urlsplit(route.request.url).query.split("&") if p).get("label")
        counts = hits[label] if label else total
        route.fulfill(json={"version": "x", "rows": size, "cols": size, "label": label,
                            "total": sum(map(sum, counts)), "counts": counts})

    page.route("**/v1/atlas/u-matrix", lambda route: route.fulfill(
        json={"version": "x", "rows": size, "cols": size, "values": u_matrix}))
    page.route("**/v1/atlas/hits*", fake_hits)
    page.route("**/v1/atlas/projection", lambda route: route.fulfill(body=json.dumps(projection),
                                                                        content_type="application/json"))
    frame_ms = """async (selector) => {
        const canvas = document.querySelector(selector);
        const box = canvas.getBoundingClientRect();
        const frame = () => new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)));
        const at = {clientX: box.left + box.width / 2, clientY: box.top + box.height / 2, bubbles: true};
        await frame();
        const start = performance.now();
        for (let i = 0; i < 20; i++) {
            canvas.dispatchEvent(new WheelEvent("wheel", {...at, deltaY: i < 10 ? -120 : 120, cancelable: true}));
            await frame();
        }
        canvas.dispatchEvent(new PointerEvent("pointerdown", {...at, pointerId: 1, button: 0}));
        for (let i = 0; i < 20; i++) {
            canvas.dispatchEvent(new PointerEvent("pointermove", {...at, clientX: at.clientX + 10 * i, pointerId: 1}));
            await frame();
        }
        canvas.dispatchEvent(new PointerEvent("pointerup", {...at, pointerId: 1, button: 0}));
        return (performance.now() - start) / 40 / 2;  // two animation frames per step
    }"""
    page.goto(f"{base_url}/#/map")
    expect(page.locator("#map-shape")).to_contain_text(f"{size}×{size} nodes")
    map_ms = page.evaluate(frame_ms, "#map-canvas")
    _screenshot(page, "map-244x244")
    page.goto(f"{base_url}/#/projection")
    expect(page.locator(".page-projection .toolbar")).to_contain_text(f"{cells:,} cells")
    projection_ms = page.evaluate(frame_ms, "#projection-canvas")
    _screenshot(page, "projection-100k")
    print(f"\nframe time: 244x244 map {map_ms:.1f} ms, 100k-point projection {projection_ms:.1f} ms")
    assert map_ms < 100 and projection_ms < 100
