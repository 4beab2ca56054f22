"""The search service (FastAPI TestClient) over a real index built with the tiny model: answers, limits, errors."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

N_IMAGES = 8
LOCAL = "http://localhost"  # the service answers only the Host names it is served under


def _png(seed: int, size: int = 40) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def built(tiny, tmp_path_factory):
    """(index dir, image folder) of a flat index over N_IMAGES random PNGs."""
    from cliplab.search import build_index

    root = tmp_path_factory.mktemp("service")
    images = root / "images"
    images.mkdir()
    for i in range(N_IMAGES):
        (images / f"img{i}.png").write_bytes(_png(i))
    index_dir = root / "index"
    build_index(tiny, images, index_dir, cache_dir=root / "cache", progress=False, workers=0)
    return index_dir, images


@pytest.fixture(scope="module")
def client(built, tiny):
    from cliplab.service import create_app

    with TestClient(create_app(built[0], tiny), base_url=LOCAL) as test_client:
        yield test_client


def _ok(client) -> None:
    """The service still answers a good request."""
    response = client.get("/search", params={"q": "a photo", "k": 2})
    assert response.status_code == 200, response.text
    assert len(response.json()["hits"]) == 2


def _error(response, status: int) -> str:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail
    return detail


def _upload(client, data: bytes, url: str = "/search/image", name: str = "q.png", **fields):
    return client.post(url, files={"image": (name, data, "image/png")}, data=fields)


def test_healthz_names_the_model_and_count(client, tiny):
    body = client.get("/healthz").json()
    assert body["status"] == "ok" and body["model_id"] == tiny.model_id
    assert body["count"] == N_IMAGES and body["dim"] == tiny.embed_dim and body["index_type"]


def test_text_search_equals_the_index_and_hides_paths(client, built, tiny):
    from cliplab.search import SearchIndex

    response = client.get("/search", params={"q": "a red square", "k": 5})
    assert response.status_code == 200
    hits = response.json()["hits"]
    expected = SearchIndex.open(built[0]).search_text(tiny, "a red square", 5)
    assert [h["id"] for h in hits] == [h.id for h in expected]
    assert [h["score"] for h in hits] == pytest.approx([h.score for h in expected], abs=1e-5)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    for hit in hits:
        assert set(hit) == {"id", "score", "caption", "extra", "url", "name"}
        assert hit["url"] == f"/images/{hit['id']}"
        assert "/" not in hit["name"] and hit["name"].startswith("img")
    assert str(built[1]) not in response.text  # no path to the files anywhere in the answer


@pytest.mark.parametrize("params", [{"q": "x", "k": 0}, {"q": "x", "k": 101}, {"q": "x", "k": "many"},
                                   {"q": ""}, {"q": "   "}, {}, {"q": "x" * 1001}])
def test_bad_search_parameters_are_422_with_a_message(client, params):
    detail = _error(client.get("/search", params=params), 422)
    assert ("q" in detail) or ("k" in detail)
    _ok(client)


def test_k_bounds_are_inclusive(client):
    assert len(client.get("/search", params={"q": "x", "k": 1}).json()["hits"]) == 1
    assert len(client.get("/search", params={"q": "x", "k": 100}).json()["hits"]) == N_IMAGES  # fewer stored


def test_image_search_finds_the_identical_image_first(client, built):
    for i in (0, 5):
        response = _upload(client, (built[1] / f"img{i}.png").read_bytes(), k=3)
        assert response.status_code == 200, response.text
        first = response.json()["hits"][0]
        assert first["name"] == f"img{i}.png" and first["score"] == pytest.approx(1.0, abs=1e-3)
    # the same picture in another format and mode still decodes (JPEG, grayscale, palette with alpha)
    picture = Image.open(built[1] / "img3.png")
    for mode, fmt in (("L", "JPEG"), ("RGBA", "PNG"), ("P", "GIF")):
        buffer = io.BytesIO()
        picture.convert(mode).save(buffer, format=fmt)
        assert _upload(client, buffer.getvalue(), name=f"q.{fmt.lower()}").status_code == 200


def test_images_are_served_by_id_only(client, built):
    hits = client.get("/search", params={"q": "anything", "k": N_IMAGES}).json()["hits"]
    assert sorted(h["name"] for h in hits) == sorted(f"img{i}.png" for i in range(N_IMAGES))
    for hit in hits[:3]:
        response = client.get(hit["url"])
        assert response.status_code == 200
        assert response.headers["content-type"] == "image/png"
        assert response.content == (built[1] / hit["name"]).read_bytes()
    unknown = max(h["id"] for h in hits) + 1000
    assert "no image" in _error(client.get(f"/images/{unknown}"), 404)
    for bad in ("abc", "-1", "1.5", str(2**70), "%2e%2e"):
        _error(client.get(f"/images/{bad}"), 422)
    _ok(client)


@pytest.mark.parametrize("url", ["/images/../etc/passwd", "/images/%2e%2e%2fetc%2fpasswd",
                                 "/images/..%2f..%2f..%2fetc%2fpasswd", "/images/%2e%2e/%2e%2e/etc/passwd",
                                 "/images//etc/passwd", "/static/../app.py", "/static/%2e%2e%2fapp.py"])
def test_path_traversal_gives_4xx(client, url):
    response = client.get(url)
    assert 400 <= response.status_code < 500, (url, response.status_code)
    assert b"root:" not in response.content and b"create_app" not in response.content
    _ok(client)


def test_non_images_are_refused_with_a_message(client, built):
    good = (built[1] / "img1.png").read_bytes()
    cases = [(b"this is not an image at all", 415), (good[: len(good) // 3], 415), (b"", 400),
             (b"<svg xmlns='http://www.w3.org/2000/svg'/>", 415), (b"\x89PNG\r\n\x1a\n" + b"\0" * 64, 415)]
    for data, status in cases:
        for url in ("/search/image", "/classify"):
            fields = {"labels": "cat,dog"} if url == "/classify" else {}
            detail = _error(_upload(client, data, url, **fields), status)
            assert "image" in detail or "empty" in detail
            _ok(client)


def _bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG file whose header claims width x height pixels (a decompression bomb's signature)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(
        b"IEND", b"")


def test_decompression_bombs_are_refused_before_decoding(client):
    detail = _error(_upload(client, _bomb_png(100_000, 100_000)), 413)
    assert "pixels" in detail
    _ok(client)


def test_uploads_over_the_limit_are_413(built, tiny):
    from cliplab.service import create_app
    from cliplab.service.app import FORM_OVERHEAD

    limit = 5000
    small = TestClient(create_app(built[0], tiny, max_upload_bytes=limit), base_url=LOCAL)
    # a file just over the limit (the request still fits the framing allowance: the endpoint's chunked read refuses)
    assert "limit" in _error(_upload(small, b"\0" * (limit + 1)), 413)
    # a request much larger than the limit: refused from its Content-Length before the body is read
    assert "limit" in _error(_upload(small, b"\0" * (limit + FORM_OVERHEAD + 10)), 413)
    assert small.get("/healthz").status_code == 200


def test_the_upload_guard_stops_reading_a_streamed_body_at_the_limit():
    """A chunked body (no Content-Length) is read only up to the limit, then answered 413."""
    import asyncio

    from cliplab.service.app import UploadLimit

    consumed, sent, reached = [], [], []

    async def receive():
        consumed.append(1)
        return {"type": "http.request", "body": b"\0" * 1024, "more_body": len(consumed) < 1000}

    async def send(message):
        sent.append(message)

    async def reader(scope, receive, send):  # an app that reads the whole body, then answers 200
        while (await receive()).get("more_body"):
            pass
        reached.append(True)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    scope = {"type": "http", "method": "POST", "headers": [(b"transfer-encoding", b"chunked")]}
    asyncio.run(UploadLimit(reader, limit=10 * 1024)(scope, receive, send))
    assert len(consumed) == 11 and not reached
    assert sent[0]["status"] == 413 and b"limit" in sent[1]["body"]
    consumed.clear()
    sent.clear()
    asyncio.run(UploadLimit(reader, limit=2**20)(scope, receive, send))  # under the limit: untouched
    assert len(consumed) == 1000 and reached and sent[0]["status"] == 200


def test_a_50_mb_upload_is_413_and_the_service_keeps_running(client):
    _error(_upload(client, b"\0" * (50 * 2**20)), 413)
    _ok(client)


def test_classify_gives_probabilities_and_caches_the_label_weights(built, tiny, monkeypatch):
    import cliplab.eval.inputs
    from cliplab.heads import create_head
    from cliplab.service import create_app

    made = []
    original = cliplab.eval.inputs.build_head  # the one provider `cliplab classify` builds its head with

    def counting(method, backbone, names, *args, **kwargs):
        made.append(list(names))
        return original(method, backbone, names, *args, **kwargs)

    monkeypatch.setattr(cliplab.eval.inputs, "build_head", counting)
    local = TestClient(create_app(built[0], tiny), base_url=LOCAL)
    data = (built[1] / "img2.png").read_bytes()
    body = _upload(local, data, "/classify", labels="cat, dog ,car").json()
    assert body["labels"] == ["cat", "dog", "car"]
    assert sum(body["probabilities"]) == pytest.approx(1.0, abs=1e-5)
    assert [p["probability"] for p in body["predictions"]] == sorted(body["probabilities"], reverse=True)
    head = create_head("zeroshot", backbone=tiny, class_names=["cat", "dog", "car"], templates="imagenet7").fit()
    features = tiny.encode_images(tiny.preprocess(Image.open(io.BytesIO(data)).convert("RGB")).unsqueeze(0)).numpy()
    assert body["probabilities"] == pytest.approx(head.predict_proba(features)[0].tolist(), abs=1e-5)
    # repeated form fields are the same label set: the weights are not computed again
    again = local.post("/classify", files={"image": ("q.png", data, "image/png")},
                       data={"labels": ["cat", "dog", "car"]})
    assert again.json()["probabilities"] == pytest.approx(body["probabilities"])
    assert made == [["cat", "dog", "car"]]
    for labels in (" , ,", "cat,cat"):
        assert "labels" in _error(_upload(local, data, "/classify", labels=labels), 422)
    _error(local.post("/classify", files={"image": ("q.png", data, "image/png")}), 422)  # no labels field


def test_repeated_label_fields_keep_their_commas(built, tiny):
    from cliplab.service import create_app
    from cliplab.service.app import MAX_LABELS, parse_labels

    assert parse_labels(["hot dog, sausage", "cat"]) == ["hot dog, sausage", "cat"]
    assert parse_labels(["hot dog, sausage"]) == ["hot dog", "sausage"]  # one field: comma-separated
    local = TestClient(create_app(built[0], tiny), base_url=LOCAL)
    data = (built[1] / "img2.png").read_bytes()
    response = local.post("/classify", files={"image": ("q.png", data, "image/png")},
                          data={"labels": ["hot dog, sausage", " cat "]})
    assert response.status_code == 200, response.text
    assert response.json()["labels"] == ["hot dog, sausage", "cat"]
    assert MAX_LABELS == 64
    many = ",".join(f"label {i}" for i in range(MAX_LABELS + 1))
    assert "at most 64" in _error(_upload(local, data, "/classify", labels=many), 422)


def test_a_new_label_set_does_not_stall_searches(built, tiny, monkeypatch):
    """The label-set text encodings run outside the index lock: /search answers while they are under way."""
    import threading

    import cliplab.eval.inputs
    from cliplab.service import create_app

    started, release = threading.Event(), threading.Event()
    original = cliplab.eval.inputs.build_head

    def slow(*args, **kwargs):
        started.set()
        release.wait(20)
        return original(*args, **kwargs)

    monkeypatch.setattr(cliplab.eval.inputs, "build_head", slow)
    local = TestClient(create_app(built[0], tiny), base_url=LOCAL)
    data = (built[1] / "img2.png").read_bytes()
    answers = []
    worker = threading.Thread(target=lambda: answers.append(_upload(local, data, "/classify", labels="a,b")))
    worker.start()
    try:
        assert started.wait(20)
        _ok(local)  # answered while the label set is still being embedded
        assert not release.is_set() and worker.is_alive()
    finally:
        release.set()
        worker.join(30)
    assert answers[0].status_code == 200, answers[0].text


def test_faiss_searches_on_one_thread_in_the_server(built, tiny):
    import faiss

    from cliplab.service import create_app

    faiss.omp_set_num_threads(4)
    create_app(built[0], tiny)
    assert faiss.omp_get_max_threads() == 1


def test_images_revalidate_with_an_etag(tiny, tmp_path):
    import os

    from cliplab.search import build_index
    from cliplab.service import create_app
    from cliplab.service.app import image_etag

    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        (images / f"img{i}.png").write_bytes(_png(200 + i))
    build_index(tiny, images, tmp_path / "index", cache_dir=tmp_path / "cache", progress=False, workers=0)
    local = TestClient(create_app(tmp_path / "index", tiny), base_url=LOCAL)
    hit = local.get("/search", params={"q": "x", "k": 1}).json()["hits"][0]
    first = local.get(hit["url"])
    assert first.status_code == 200 and first.headers["cache-control"] == "no-cache"
    tag = first.headers["etag"]
    assert tag.startswith('"') and "max-age" not in first.headers["cache-control"]
    cached = local.get(hit["url"], headers={"If-None-Match": tag})
    assert cached.status_code == 304 and not cached.content and cached.headers["etag"] == tag
    assert local.get(hit["url"], headers={"If-None-Match": f'"other", W/{tag}'}).status_code == 304
    assert local.get(hit["url"], headers={"If-None-Match": '"other"'}).status_code == 200
    # the file changes: a new tag
    path = images / hit["name"]
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    changed = local.get(hit["url"], headers={"If-None-Match": tag})
    assert changed.status_code == 200 and changed.headers["etag"] != tag
    # a rebuilt index (an id may now name another file): every tag changes, even for the same id and file
    build_index(tiny, images, tmp_path / "index", cache_dir=tmp_path / "cache", progress=False, workers=0)
    again = TestClient(create_app(tmp_path / "index", tiny), base_url=LOCAL)
    same = next(h for h in again.get("/search", params={"q": "x", "k": 3}).json()["hits"] if h["name"] == hit["name"])
    rebuilt = again.get(same["url"], headers={"If-None-Match": changed.headers["etag"]})
    assert rebuilt.status_code == 200 and rebuilt.headers["etag"] not in (tag, changed.headers["etag"])
    assert image_etag("build-a", 1, 10, 5) != image_etag("build-b", 1, 10, 5) != image_etag("build-b", 1, 10, 6)


def test_a_shards_built_index_hides_paths(tiny, tmp_path):
    """Shard rows store absolute paths (also as extra["name"]): the service shows base names only."""
    from cliplab.features.shards import write_shards
    from cliplab.search import build_index
    from cliplab.service import create_app

    images = tmp_path / "home" / "secret" / "photos"
    images.mkdir(parents=True)
    paths = []
    for i in range(3):
        paths.append(images / f"s{i}.png")
        paths[-1].write_bytes(_png(300 + i))
    pixels = __import__("torch").stack([tiny.preprocess(Image.open(p).convert("RGB")) for p in paths])
    vectors = tiny.encode_images(pixels).numpy()
    write_shards(tmp_path / "shards", model_id=tiny.model_id, dim=tiny.embed_dim, preprocess_id=tiny.preprocess_id,
                 encoding_id=tiny.encoding_id, paths=[str(p) for p in paths], sizes=[p.stat().st_size for p in paths],
                 mtimes=[p.stat().st_mtime for p in paths], identities=[f"id{i}" for i in range(3)],
                 captions=["a photo", None, None], embeddings=vectors)
    build_index(tiny, tmp_path / "shards", tmp_path / "index", cache_dir=tmp_path / "cache", progress=False)
    local = TestClient(create_app(tmp_path / "index", tiny), base_url=LOCAL)
    response = local.get("/search", params={"q": "a photo", "k": 3})
    assert response.status_code == 200, response.text
    assert "secret" not in response.text and str(tmp_path) not in response.text
    hits = response.json()["hits"]
    assert sorted(h["name"] for h in hits) == ["s0.png", "s1.png", "s2.png"]
    assert all(h["extra"].get("name") == h["name"] for h in hits)
    found = _upload(local, paths[1].read_bytes(), k=3)
    assert found.status_code == 200 and "secret" not in found.text
    assert found.json()["hits"][0]["name"] == "s1.png"
    assert local.get(hits[0]["url"]).content == (images / hits[0]["name"]).read_bytes()


def test_extra_fields_never_carry_paths():
    from cliplab.service.app import sanitize_extra

    extra = {"name": "/home/secret/user/photos/s0.png", "label": "cat", "source": "/home/secret/list.txt",
             "home": "~/photos/a.png", "win": "C:\\Users\\me\\a.png", "unc": "\\\\server\\share\\a.png",
             "uri": "file:///home/secret/a.png", "nested": {"p": "/etc/passwd", "q": 3}, "list": ["/x/y", "ok"],
             "score": 0.5, "relative": "sub/a.png"}
    assert sanitize_extra(extra) == {"name": "s0.png", "label": "cat", "nested": {"q": 3}, "list": ["ok"],
                                     "score": 0.5, "relative": "sub/a.png"}
    assert sanitize_extra({"name": "/data/photos/2020/a.png"}, "/data/photos") == {"name": "2020/a.png"}
    assert sanitize_extra({"name": "/elsewhere/a.png"}, "/data/photos") == {"name": "a.png"}
    assert sanitize_extra({"name": "C:\\Users\\me\\a.png"}) == {"name": "a.png"}
    assert sanitize_extra(None) == {}


def _encoded(fmt: str, size=(32, 32), **options) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def test_only_common_formats_are_decoded(client):
    """TIFF, EPS, PSD... never reach their PIL decoders: 415 naming the accepted formats."""
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\n" + b"%" * 200
    psd = b"8BPS\x00\x01" + b"\x00" * 6 + b"\x00\x03\x00\x00\x00\x20\x00\x00\x00\x20\x00\x08\x00\x03" + b"\x00" * 64
    for data in (_encoded("TIFF"), _encoded("TIFF", compression="tiff_lzw"), eps, psd, _encoded("ICO"),
                 _encoded("PPM"), _encoded("TGA")):
        for url in ("/search/image", "/classify"):
            fields = {"labels": "cat,dog"} if url == "/classify" else {}
            detail = _error(_upload(client, data, url, **fields), 415)
            assert "JPEG, PNG, GIF, WebP or BMP" in detail
    for fmt in ("JPEG", "PNG", "GIF", "WEBP", "BMP"):
        assert _upload(client, _encoded(fmt), name="q").status_code == 200, fmt
    _ok(client)


def test_images_over_24_megapixels_are_413(client):
    from cliplab.service.app import MAX_PIXELS

    assert MAX_PIXELS == 24_000_000
    detail = _error(_upload(client, _bomb_png(5000, 5000)), 413)  # 25 Mpx: the header alone is refused
    assert "5000x5000" in detail
    _ok(client)


def test_large_jpegs_decode_in_draft_mode():
    from cliplab.service.app import DRAFT_SIDE, decode_image

    image = decode_image(_encoded("JPEG", size=(2400, 1600)))
    assert image.mode == "RGB" and min(image.size) >= DRAFT_SIDE and image.size == (1200, 800)
    assert decode_image(_encoded("JPEG", size=(600, 500))).size == (600, 500)  # small: decoded as is
    assert decode_image(_encoded("PNG", size=(2400, 1600))).size == (2400, 1600)


def test_concurrent_decodes_are_bounded(monkeypatch):
    import threading
    import time

    from cliplab.service import uploads as service_app

    running, peak, guard = [0], [0], threading.Lock()
    original = service_app._decode

    def tracked(data, max_pixels):
        with guard:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        try:
            return original(data, max_pixels)
        finally:
            with guard:
                running[0] -= 1

    monkeypatch.setattr(service_app, "_decode", tracked)
    data = _encoded("PNG")
    threads = [threading.Thread(target=service_app.decode_image, args=(data,)) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert peak[0] == service_app.DECODE_SLOTS and 2 <= service_app.DECODE_SLOTS <= 4


def test_page_docs_and_schema_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and 'id="q"' in page.text and 'id="file"' in page.text
    assert "http" not in page.text.replace("http-equiv", "")  # no CDN: everything from this server
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/style.css").status_code == 200
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/healthz", "/search", "/search/image", "/classify", "/images/{image_id}"} <= set(paths)
    _error(client.get("/nowhere"), 404)
    _error(client.delete("/search"), 405)


def test_another_model_or_a_broken_index_is_refused(built, tmp_path):
    from cliplab.errors import ModelMismatchError, SearchIndexError
    from cliplab.models import load_model
    from cliplab.service import create_app

    other = load_model("tiny", device="cpu", seed=1)
    with pytest.raises(ModelMismatchError):
        create_app(built[0], other)
    with pytest.raises(SearchIndexError):
        create_app(tmp_path / "missing", other)


def test_serve_command_reports_a_missing_index_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from cliplab.cli.app import app

    result = CliRunner().invoke(app, ["serve", "--index-dir", str(tmp_path / "none"), "--model", "tiny"])
    assert result.exit_code == 2
    assert "error" in result.output and "Traceback" not in result.output


def test_serve_command_builds_the_app_with_the_index_model(built, tmp_path, monkeypatch):
    """`cliplab serve` checks the model against the index and hands the app to uvicorn (faked here)."""
    import uvicorn
    from typer.testing import CliRunner

    from cliplab.cli.app import app
    from cliplab.search import build_index

    ran = {}
    monkeypatch.setattr(uvicorn, "run", lambda application, **kwargs: ran.update(app=application, **kwargs))
    # an index that records its model spec: serve loads that model without --model
    from cliplab.models import load_model

    index_dir = tmp_path / "index"
    build_index(load_model("tiny", device="cpu"), built[1], index_dir, cache_dir=tmp_path / "cache",
                progress=False, workers=0, model_spec="tiny")
    result = CliRunner().invoke(app, ["serve", "--index-dir", str(index_dir), "--port", "8123", "--device", "cpu",
                                      "-q", "--max-upload-mb", "1"])
    assert result.exit_code == 0, result.output
    assert ran["port"] == 8123 and ran["host"] == "127.0.0.1" and "serving 8 images" in result.output
    assert ran["app"].state.max_upload_bytes == 2**20
    assert TestClient(ran["app"], base_url=LOCAL).get("/healthz").json()["count"] == N_IMAGES
    # another model: refused in one line naming the mismatch, nothing served
    ran.clear()
    result = CliRunner().invoke(app, ["serve", "--index-dir", str(index_dir), "--model", "tiny", "--seed", "1",
                                      "--device", "cpu", "-q"])
    assert result.exit_code == 2 and "error" in result.output and not ran


def test_an_image_deleted_after_indexing_is_404_not_500(tiny, tmp_path):
    from cliplab.search import build_index
    from cliplab.service import create_app

    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        (images / f"img{i}.png").write_bytes(_png(100 + i))
    build_index(tiny, images, tmp_path / "index", cache_dir=tmp_path / "cache", progress=False, workers=0)
    local = TestClient(create_app(tmp_path / "index", tiny), base_url=LOCAL)
    hits = local.get("/search", params={"q": "x", "k": 3}).json()["hits"]
    gone = next(h for h in hits if h["name"] == "img1.png")
    (images / "img1.png").unlink()
    detail = _error(local.get(gone["url"]), 404)
    assert "no longer on disk" in detail and str(tmp_path) not in detail
    assert local.get(next(h for h in hits if h["name"] == "img0.png")["url"]).status_code == 200
