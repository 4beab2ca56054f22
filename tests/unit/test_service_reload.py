"""Issue 21 item 8: a running service picks up `cliplab index update`: the published index is reloaded atomically
when it changes, requests under way finish on the version they started with, and nothing fails meanwhile."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

LOCAL = "http://localhost"


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(
        buffer, format="PNG")
    return buffer.getvalue()


def _names(client) -> dict[str, int]:
    response = client.get("/search", params={"q": "a photo", "k": 100})
    assert response.status_code == 200, response.text
    return {h["name"]: h["id"] for h in response.json()["hits"]}


def _until(condition, seconds: float = 15.0) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def served(tiny, tmp_path):
    from cliplab.search import build_index
    from cliplab.service import create_app

    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        (images / f"img{i}.png").write_bytes(_png(i))
    build_index(tiny, images, tmp_path / "index", cache_dir=tmp_path / "cache", progress=False, workers=0)
    return TestClient(create_app(tmp_path / "index", tiny), base_url=LOCAL), images, tmp_path


def test_an_update_under_load_is_served_without_errors(served, tiny):
    from cliplab.search import update_index

    client, images, root = served
    before = _names(client)
    assert set(before) == {f"img{i}.png" for i in range(4)}
    problems, stop, answered = [], threading.Event(), [0]

    def load():
        while not stop.is_set():
            try:
                names = _names(client)
                for name, item in list(names.items())[:3]:
                    response = client.get(f"/images/{item}")
                    # 404 only for the deleted image, once the new version is served
                    if response.status_code != 200 and not (response.status_code == 404 and name == "img0.png"):
                        problems.append((name, response.status_code, response.text))
                health = client.get("/healthz")
                if health.status_code != 200 or health.json()["reload_error"]:
                    problems.append(("healthz", health.status_code, health.text))
                answered[0] += 1
            except Exception as exc:  # noqa: BLE001 - any failure under load is what this test looks for
                problems.append(("exception", repr(exc)))

    workers = [threading.Thread(target=load) for _ in range(3)]
    for worker in workers:
        worker.start()
    try:
        assert _until(lambda: answered[0] >= 3)
        (images / "new0.png").write_bytes(_png(10))
        (images / "new1.png").write_bytes(_png(11))
        (images / "img0.png").unlink()
        report = update_index(tiny, root / "index", cache_dir=root / "cache", progress=False, workers=0)
        assert report.added == 2 and report.removed == 1
        expected = {"img1.png", "img2.png", "img3.png", "new0.png", "new1.png"}
        assert _until(lambda: set(_names(client)) == expected), _names(client)
        served_at = answered[0]
        assert _until(lambda: answered[0] >= served_at + 3)  # still under load on the new version
    finally:
        stop.set()
        for worker in workers:
            worker.join(30)
    assert not problems, problems[:5]
    after = _names(client)
    assert client.get("/healthz").json()["count"] == 5
    for name in ("new0.png", "new1.png"):
        assert client.get(f"/images/{after[name]}").content == (images / name).read_bytes()
    gone = client.get(f"/images/{before['img0.png']}")
    assert gone.status_code == 404 and "no image with id" in gone.json()["detail"]
    assert {after[n] for n in ("img1.png", "img2.png", "img3.png")} == {before[n] for n in
                                                                        ("img1.png", "img2.png", "img3.png")}


def test_a_request_under_way_finishes_on_the_version_it_started_with(served, tiny, monkeypatch):
    from cliplab.search import update_index

    client, images, root = served
    entered, release = threading.Event(), threading.Event()
    original = tiny.encode_texts

    def held(texts, *args, **kwargs):
        if texts == ["held query"]:
            entered.set()
            release.wait(30)
        return original(texts, *args, **kwargs)

    monkeypatch.setattr(tiny, "encode_texts", held)
    answers = []
    worker = threading.Thread(target=lambda: answers.append(client.get("/search", params={"q": "held query",
                                                                                         "k": 100})))
    worker.start()
    assert entered.wait(30)
    (images / "img1.png").unlink()
    (images / "new.png").write_bytes(_png(20))
    update_index(tiny, root / "index", cache_dir=root / "cache", progress=False, workers=0)  # old folder deleted
    assert "new.png" in _names(client)  # other requests already answer from the new version
    release.set()
    worker.join(30)
    assert answers[0].status_code == 200, answers[0].text
    assert {h["name"] for h in answers[0].json()["hits"]} == {f"img{i}.png" for i in range(4)}


def test_a_version_that_cannot_be_served_leaves_the_previous_one_in_place(served, tiny):
    from cliplab.models import load_model
    from cliplab.search import build_index

    client, images, root = served
    other = load_model("tiny", device="cpu", seed=1)
    (images / "extra.png").write_bytes(_png(30))
    build_index(other, images, root / "index", cache_dir=root / "cache2", progress=False, workers=0)
    health = client.get("/healthz").json()
    assert health["count"] == 4 and "could not be loaded" in health["reload_error"]
    assert str(root) not in health["reload_error"]
    assert set(_names(client)) == {f"img{i}.png" for i in range(4)}
    build_index(tiny, images, root / "index", cache_dir=root / "cache", progress=False, workers=0)
    health = client.get("/healthz").json()
    assert health["count"] == 5 and health["reload_error"] is None
    assert "extra.png" in _names(client)
