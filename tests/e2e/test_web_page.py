"""The web page end to end: ``cliplab serve`` in a subprocess, driven by headless Debian Chromium via Playwright.

Skipped when Playwright or Chromium is missing, unless CLIPLAB_REQUIRE_BROWSER=1 (CI): then it fails.
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _server import serving

CHROMIUM = os.environ.get("CLIPLAB_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
K = 4
N_IMAGES = 8
TIMEOUT_MS = 20_000


def _unavailable(why: str):
    if os.environ.get("CLIPLAB_REQUIRE_BROWSER") == "1":
        pytest.fail(f"CLIPLAB_REQUIRE_BROWSER=1 but {why}")
    pytest.skip(why)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("web") / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


@pytest.fixture(scope="module")
def server(tiny, images):
    """Base URL of ``cliplab serve`` (a real uvicorn process) over an index of ``images``."""

    from cliplab.search import build_index

    index_dir = images.parent / "index"
    build_index(tiny, images, index_dir, cache_dir=images.parent / "cache", progress=False, workers=0)
    port = _free_port()
    command = [sys.executable, "-m", "cliplab", "serve", "--index-dir", str(index_dir), "--model", "tiny",
               "--device", "cpu", "--host", "127.0.0.1", "--port", str(port), "--quiet"]
    base = f"http://127.0.0.1:{port}"
    with serving(command, f"{base}/healthz", images.parent / "server"):  # slow start tolerated, death reported
        yield base


@pytest.fixture(scope="module")
def page(request):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed")
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        _unavailable(f"no chromium at {CHROMIUM}")
    server = request.getfixturevalue("server")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            tab = browser.new_page(viewport={"width": 1100, "height": 800})
            tab.set_default_timeout(TIMEOUT_MS)
            tab.goto(server)
            tab.wait_for_function("document.querySelector('#status').textContent.includes('images')")
            yield tab
        finally:
            browser.close()


def _tiles(page) -> list[dict]:
    return page.eval_on_selector_all(
        "#results .tile",
        "tiles => tiles.map(t => ({id: t.dataset.id, src: t.querySelector('img').getAttribute('src'),"
        " score: t.querySelector('.score').textContent, caption: t.querySelector('.caption').textContent}))")


def _wait_images_loaded(page, count: int) -> None:
    page.wait_for_function(
        "n => { const imgs = Array.from(document.querySelectorAll('#results .tile img'));"
        " return imgs.length === n && imgs.every(i => i.complete && i.naturalWidth > 0); }", arg=count)


@pytest.mark.slow
def test_text_search_shows_a_grid_of_loaded_images(page, tmp_path):
    assert f"{N_IMAGES} images" in page.text_content("#status")
    page.fill("#k", str(K))
    page.fill("#q", "a colourful photo")
    page.press("#q", "Enter")
    page.wait_for_function("n => document.querySelectorAll('#results .tile').length === n", arg=K)
    tiles = _tiles(page)
    assert len(tiles) == K
    for tile in tiles:
        assert re.fullmatch(r"/images/\d+", tile["src"]) and tile["src"] == f"/images/{tile['id']}"
        assert re.fullmatch(r"-?\d\.\d{3}", tile["score"])
        assert re.fullmatch(r"img\d\.png", tile["caption"])
    _wait_images_loaded(page, K)
    assert page.is_hidden("#error")
    shot = tmp_path / "grid.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 1000
    with Image.open(shot) as picture:
        assert picture.size[0] >= 1000


@pytest.mark.slow
def test_an_uploaded_image_finds_itself_first(page, images):
    page.fill("#labels", "cat, dog")
    page.set_input_files("#file", str(images / "img3.png"))
    page.wait_for_function("document.querySelector('#query-info').textContent.includes('img3.png')")
    first = _tiles(page)[0]
    assert first["caption"] == "img3.png" and float(first["score"]) == pytest.approx(1.0, abs=2e-3)
    _wait_images_loaded(page, K)
    page.wait_for_function("document.querySelectorAll('#classes li').length === 2")
    assert "cat" in page.text_content("#classes") and "%" in page.text_content("#classes")
    page.fill("#labels", "")


@pytest.mark.slow
def test_a_dropped_image_finds_itself_first(page, images):
    data = base64.b64encode((images / "img5.png").read_bytes()).decode()
    page.evaluate(
        """data => {
            const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], 'img5.png', {type: 'image/png'}));
            const zone = document.getElementById('drop');
            zone.dispatchEvent(new DragEvent('dragover', {dataTransfer: transfer, bubbles: true, cancelable: true}));
            zone.dispatchEvent(new DragEvent('drop', {dataTransfer: transfer, bubbles: true, cancelable: true}));
        }""", data)
    page.wait_for_function("document.querySelector('#query-info').textContent.includes('img5.png')")
    first = _tiles(page)[0]
    assert first["caption"] == "img5.png" and float(first["score"]) == pytest.approx(1.0, abs=2e-3)


@pytest.mark.slow
def test_errors_are_shown_on_the_page(page, tmp_path):
    page.set_input_files("#file", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not an image"}])
    page.wait_for_selector("#error:not([hidden])")
    assert "415" in page.text_content("#error") and "image" in page.text_content("#error")
    buffer = io.BytesIO()
    Image.new("RGB", (10, 10)).save(buffer, format="PNG")
    page.set_input_files("#file", files=[{"name": "ok.png", "mimeType": "image/png", "buffer": buffer.getvalue()}])
    page.wait_for_function("document.querySelector('#query-info').textContent.includes('ok.png')")
    assert page.is_hidden("#error")  # a good request after a bad one works and clears the message
    page.fill("#q", "   ")
    page.press("#q", "Enter")
    page.wait_for_selector("#error:not([hidden])")
    assert "words" in page.text_content("#error")
    page.fill("#k", "500")  # out of range: the service's 422 message is shown
    page.fill("#q", "a photo")
    page.press("#q", "Enter")
    page.wait_for_function("document.querySelector('#error').textContent.includes('422')")
    page.screenshot(path=str(tmp_path / "error.png"))
    assert (tmp_path / "error.png").stat().st_size > 0


@pytest.mark.slow
def test_api_docs_render_offline(page, server):
    """/docs draws the API in Swagger UI with nothing fetched from another host (requests there are refused)."""
    context = page.context.browser.new_context()
    tab = context.new_page()
    elsewhere = []

    def only_this_server(route):
        if route.request.url.startswith(server):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    tab.route("**/*", only_this_server)
    try:
        tab.goto(f"{server}/docs")
        tab.wait_for_selector(".swagger-ui .info .title", timeout=TIMEOUT_MS)
        assert "cliplab search" in tab.text_content(".swagger-ui .info .title")
        tab.wait_for_selector(".swagger-ui .opblock", timeout=TIMEOUT_MS)  # the operations are listed
        assert "/search" in tab.text_content(".swagger-ui")
        assert elsewhere == []
    finally:
        context.close()
