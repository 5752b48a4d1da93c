"""The playground in a real browser: headless Chromium (Debian's `chromium`, `make browser-deps`)
driven by Playwright's Python client, against the real server on the tiny model.

The tests type a prompt and the token, draw a box on the canvas, generate, and check that the
image, its layout and (when the server offers `attention`) its heatmap appear; they skip with a
reason where Playwright or Chromium is missing. `make test-browser` also writes the README's
screenshot (COMPINV_PLAYGROUND_SCREENSHOT=docs/playground.png).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path

import httpx
import pytest
from PIL import Image

pytestmark = [pytest.mark.browser, pytest.mark.xdist_group("browser")]  # one server, one browser

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed "
                               "(pip install -r requirements-dev.txt)")
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
if CHROMIUM is None:
    pytest.skip("no chromium on PATH: `make browser-deps` (apt-get install -y chromium)",
                allow_module_level=True)

TOKEN = "b" * 24
PROMPT = "a red star and a blue circle on grass"
TIMEOUT_MS = 15_000  # page actions
GENERATE_MS = 120_000  # one generation on the tiny model takes about a second; 2 shared cores


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    from compinv_rt.apps.serve.app import create_app
    from compinv_rt.apps.serve.engine import SessionEngine
    from compinv_rt.apps.serve.playground import add_playground
    from compinv_rt.apps.serve.run import ServerThread
    from compinv_rt.apps.serve.settings import ServeSettings
    from compinv_rt.generate.session import GenerationSession, SessionOptions

    session = GenerationSession.open(SessionOptions(model=str(tiny_model), device="cpu", max_batch=2))
    engine = SessionEngine(session, tmp_path_factory.mktemp("concepts"))
    app = create_app(engine, ServeSettings(max_batch=2, max_wait_ms=10, token=TOKEN))
    add_playground(app)  # a no-op once create_app wires it in
    with ServerThread(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def features(server) -> set[str]:
    """The optional request fields this server accepts (what the page feature-detects)."""
    schema = httpx.get(f"{server.url}/openapi.json", timeout=30).json()
    props = schema["components"]["schemas"]["GenerateRequest"]["properties"]
    return {f for f in ("quality", "attention", "stream") if f in props}


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        # --no-sandbox: Chromium's sandbox cannot start as root in a container
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    """A fresh page at the playground, with every request and script error recorded."""
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    p = context.new_page()
    p.set_default_timeout(TIMEOUT_MS)
    p.errors, p.urls = [], []
    p.on("pageerror", lambda exc: p.errors.append(str(exc)))
    p.on("request", lambda req: p.urls.append(req.url))
    p.goto(server.url + "/")
    p.wait_for_selector("body[data-ready=true]")
    yield p
    assert not p.errors, p.errors
    assert all(u.startswith(server.url) or u.startswith("data:") for u in p.urls), p.urls
    context.close()


def _draw_box(page, x0: float, y0: float, x1: float, y1: float) -> None:
    page.locator("#canvas").scroll_into_view_if_needed()
    box = page.locator("#canvas").bounding_box()
    at = lambda fx, fy: (box["x"] + fx * box["width"], box["y"] + fy * box["height"])  # noqa: E731
    page.mouse.move(*at(x0, y0))
    page.mouse.down()
    page.mouse.move(*at(x1, y1), steps=6)
    page.mouse.up()


def _generate(page, cards_before: int) -> None:
    page.click("#generate")
    page.wait_for_selector(f"#gallery article.card:nth-of-type({cards_before + 1}), #error:not([hidden])",
                           timeout=GENERATE_MS)
    assert page.locator("#error").is_hidden(), page.locator("#error").inner_text()


def _image_loaded(page, selector: str) -> bool:
    return page.eval_on_selector(selector, "img => img.complete && img.naturalWidth > 0")


def test_draw_a_box_generate_and_see_the_image(page, server, features, tmp_path):
    # Without the token the API refuses, and the page says so.
    page.fill("#prompt", PROMPT)
    page.fill("#steps", "2")
    page.fill("#seed", "3")
    page.click("#generate")
    page.wait_for_selector("#error:not([hidden])")
    assert "401" in page.inner_text("#error") and "token" in page.inner_text("#error")
    page.fill("#token", TOKEN)
    page.press("#token", "Tab")  # change: the concepts load with the token
    page.wait_for_selector("#concepts:has-text('none served')")

    _draw_box(page, 0.1, 0.2, 0.5, 0.8)
    assert page.locator("#boxes li").count() == 1
    assert page.input_value("#boxes li input.phrase") == "red star"  # the prompt's first concept
    assert page.input_value("#spatial") == "bias"  # a box switches spatial from none to bias
    _generate(page, 0)

    card = page.locator("#gallery .card").first
    assert _image_loaded(page, "#gallery .card img.result")
    assert card.locator("canvas.layout").get_attribute("data-source") == "explicit"
    sidecar = json.loads(card.locator("details.sidecar pre").text_content())
    assert sidecar["seed"] == 3 and sidecar["prompt"] == PROMPT
    concepts = sidecar["spatial"]["layout"]["concepts"]
    assert [c["phrase"] for c in concepts] == ["red star"]
    assert concepts[0]["boxes"][0] == pytest.approx([0.1, 0.2, 0.5, 0.8], abs=0.02)
    assert "step 2 / 2" in page.inner_text("#progress-text")
    if "stream" in features:  # the bar followed the server-sent progress events
        assert int(page.get_attribute("body", "data-progress-events") or 0) >= 1
    if "attention" in features:
        assert _image_loaded(page, "#gallery .card .heatmap img")  # the server's grid
        tokens = card.locator(".heatmap .tile figcaption").all_inner_texts()  # cut into tiles
        assert "star" in tokens and "circle" in tokens, tokens
    else:
        assert card.locator(".heatmap").count() == 0
    card.locator("details.sidecar summary").click()
    _screenshot(page, tmp_path)


def _screenshot(page, tmp_path: Path) -> None:
    out = Path(os.environ.get("COMPINV_PLAYGROUND_SCREENSHOT") or tmp_path / "playground.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    page.evaluate("window.scrollTo(0, 0)")
    shot = Image.open(io.BytesIO(page.screenshot()))  # the 1200x800 viewport
    # 256 colours: the same picture at about half the bytes (the README's copy stays small)
    shot.convert("RGB").quantize(256).save(out, optimize=True)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 300_000, len(data)


def test_auto_layout_is_drawn_over_the_image(page, features):
    page.fill("#token", TOKEN)
    page.fill("#prompt", PROMPT)
    if "quality" in features:  # steps left empty: the preset's (fast: 10 DPM-Solver++ steps)
        assert page.input_value("#steps") == "" and page.is_enabled("#quality")
        page.select_option("#quality", "fast")
    else:
        page.fill("#steps", "2")
    page.check("input[name=layout-kind][value=auto]")
    assert page.input_value("#spatial") == "bias"
    _generate(page, 0)
    card = page.locator("#gallery .card").first
    assert _image_loaded(page, "#gallery .card img.result")
    source = card.locator("canvas.layout").get_attribute("data-source")
    assert source in ("model", "fixed"), source  # predicted: the layout model, else fixed boxes
    sidecar = json.loads(card.locator("details.sidecar pre").text_content())
    assert [c["phrase"] for c in sidecar["spatial"]["layout"]["concepts"]] == ["red star", "blue circle"]
    assert "predicted" in card.locator(".meta").inner_text()
    if "quality" in features:
        assert sidecar["settings"]["scheduler"] != "ddim", sidecar["settings"]
        total = sidecar["settings"]["steps"]
        assert f"step {total} / {total}" in page.inner_text("#progress-text")


def test_a_refused_upload_and_a_bad_layout_are_shown(page):
    page.fill("#token", TOKEN)
    page.click("#upload summary")
    page.fill("#upload-name", "bogus")
    page.set_input_files("#upload-embeddings", files=[
        {"name": "embeddings.safetensors", "mimeType": "application/octet-stream", "buffer": b"not a tensor"}])
    page.set_input_files("#upload-artifact", files=[
        {"name": "artifact.json", "mimeType": "application/json", "buffer": b"{}"}])
    page.click("#upload-button")
    page.wait_for_selector("#error:not([hidden])")
    assert "Error 400: concept refused" in page.inner_text("#error")

    page.fill("#prompt", PROMPT)
    page.fill("#steps", "2")
    _draw_box(page, 0.6, 0.2, 0.9, 0.7)
    page.fill("#boxes li input.phrase", "moon")  # not in the prompt: the server says so
    page.click("#generate")
    page.wait_for_selector("#error:has-text('moon')", timeout=GENERATE_MS)
    # a 400 before the stream starts, or the stream's error event (after its 200)
    assert re.match(r"Error( 400)?: the layout phrase 'moon'", page.inner_text("#error"))
    assert page.locator("#gallery .card").count() == 0


def _png(width: int, height: int, color: str) -> str:
    import base64

    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _canned_response(n: int) -> dict:
    """What the API answers, for the page's rendering: n images with a layout and a 3-token grid."""
    layout = {"source": "explicit", "concepts": [{"phrase": "<my-heart>", "boxes": [[0.1, 0.1, 0.4, 0.4]],
                                                  "tokens": [2]}]}
    return {"images": [{"png_base64": _png(64, 64, "navy"),
                        "sidecar": {"prompt": "a blue circle <my-heart>", "seed": 5 + i,
                                    "settings": {"steps": 3}, "spatial": {"mode": "adaptive", "layout": layout}},
                        "attention": {"tokens": ["a", "blue", "circle"], "png_base64": _png(4 * 40, 40, "orange")}}
                       for i in range(n)], "batch_sizes": [n] * n, "seconds": 0.5}


def test_the_request_the_page_builds(page, features):
    """Concept picker, two boxes, mode and quality -> the JSON body the API gets (intercepted in
    the browser, answered with a canned response: no model needed)."""
    sent = []
    page.route("**/v1/concepts", lambda route: route.fulfill(json={"concepts": [
        {"name": "heart", "token": "<my-heart>", "vectors": 2, "class_word": "heart"}]}))

    def answer(route):
        sent.append(json.loads(route.request.post_data))
        route.fulfill(json=_canned_response(sent[-1]["n"]))

    page.route("**/v1/generate", answer)
    page.fill("#token", TOKEN)
    page.press("#token", "Tab")
    page.fill("#prompt", "a blue circle")
    page.click("#concepts code:has-text('<my-heart>')")
    assert page.input_value("#prompt") == "a blue circle <my-heart>"
    assert page.is_checked("#concepts input[value=heart]")
    _draw_box(page, 0.1, 0.1, 0.4, 0.4)
    _draw_box(page, 0.5, 0.5, 0.9, 0.95)
    page.locator("#boxes li input.phrase").nth(0).fill("<my-heart>")
    page.locator("#boxes li input.phrase").nth(1).fill("blue circle")
    page.select_option("#spatial", "adaptive")
    if "quality" in features:
        page.select_option("#quality", "reference")
    page.fill("#steps", "3")
    page.fill("#seed", "5")
    page.fill("#n", "2")
    _generate(page, 0)
    body = sent[0]
    assert body["concepts"] == ["heart"] and body["spatial"] == "adaptive" and body["n"] == 2
    assert re.fullmatch(r"<my-heart>=0\.1\d\d,0\.1\d\d,0\.[34]\d\d,0\.[34]\d\d;"
                        r"blue circle=0\.[45]\d\d,0\.[45]\d\d,0\.[89]\d\d,0\.9\d\d", body["layout"]), body
    assert body["seed"] == 5 and body["steps"] == 3 and body["prompt"] == "a blue circle <my-heart>"
    assert body.get("quality") == ("reference" if "quality" in features else None)
    assert body.get("stream", False) == ("stream" in features)
    assert page.locator("#gallery .card").count() == 2
    tiles = page.locator("#gallery .card").first.locator(".heatmap .tile figcaption").all_inner_texts()
    assert tiles == ["a", "blue", "circle"]  # the grid cut into one tile per token
