"""/docs and /redoc render offline: every script, style and icon they load comes from this server."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

LOCAL = "http://localhost"
URL = re.compile(r"""(?:src|href|spec-url)\s*=\s*["']([^"']+)["']|\burl\s*:\s*["']([^"']+)["']""")


@pytest.fixture(scope="module")
def client(tiny, tmp_path_factory):
    from cliplab.search import build_index
    from cliplab.service import create_app

    root = tmp_path_factory.mktemp("docs")
    (root / "images").mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(root / "images" / f"{i}.png")
    build_index(tiny, root / "images", root / "index", cache_dir=root / "cache", progress=False, workers=0)
    with TestClient(create_app(root / "index", tiny), base_url=LOCAL) as test_client:
        yield test_client


@pytest.mark.parametrize("route", ["/docs", "/redoc"])
def test_docs_load_nothing_from_another_host(client, route):
    page = client.get(route)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    urls = [a or b for a, b in URL.findall(page.text)]
    assert "/openapi.json" in urls
    scripts = [u for u in urls if u.endswith(".js")]
    assert scripts, page.text  # the UI's script is referenced ...
    assert not re.search(r"(?:https?:)?//[A-Za-z0-9.-]+\.[a-z]{2,}", page.text), page.text  # ... and no host is named
    for url in urls:
        assert url.startswith("/"), url  # a path on this server
        asset = client.get(url)
        assert asset.status_code == 200, url
        assert len(asset.content) > 100, url
    for script in scripts:
        body = client.get(script)
        assert "javascript" in body.headers["content-type"]
        assert len(body.content) > 500_000  # the real bundle, not a placeholder


def test_swagger_ui_reads_this_openapi_version(client):
    """FastAPI writes OpenAPI 3.1, which Swagger UI reads from version 5 on: the bundle served is a 5.x."""
    assert client.get("/openapi.json").json()["openapi"].startswith("3.1")
    bundle = client.get("/docs-assets/swagger-ui-bundle.js").text
    assert re.search(r'"5\.\d+\.\d+"', bundle)
