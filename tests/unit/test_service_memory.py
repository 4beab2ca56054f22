"""Issue 21 item 3: upload memory is bounded. Decoded pictures never wait for the model: only its input tensor
leaves the bounded decoding section, so 40 concurrent large uploads keep the process's memory flat, and it is
back near where it started afterwards."""

from __future__ import annotations

import io
import os
import sys
import threading
import time
import zlib

import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

LOCAL = "http://localhost"
UPLOADS = 40
SIDE = (2500, 1600)  # 4 Mpx: PIL holds 16 MB decoded (4 bytes a pixel); 40 at once would be 640 MB
PEAK_BOUND = 200 * 2**20  # stated bound on the growth while the 40 uploads run
AFTER_BOUND = 64 * 2**20  # and on what is left afterwards


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _large_png() -> bytes:
    """A ~10 kB PNG that decodes to SIDE pixels (a gradient, so it is not a single-colour shortcut)."""
    picture = Image.linear_gradient("L").resize(SIDE).convert("RGB")
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=9)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def index_dir(tiny, tmp_path_factory):
    import numpy as np

    from cliplab.search import build_index

    root = tmp_path_factory.mktemp("memory")
    images = root / "images"
    images.mkdir()
    for i in range(4):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(
            images / f"img{i}.png")
    build_index(tiny, images, root / "index", cache_dir=root / "cache", progress=False, workers=0)
    return root / "index"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_memory_stays_flat_under_40_concurrent_large_uploads(tiny, index_dir, monkeypatch):
    """The model is busy (each forward pass waits until all 40 requests have reached it, as behind a queue):
    the requests' pictures must not pile up meanwhile."""
    from cliplab.service import create_app
    from cliplab.service.uploads import GATE, PIXELS_IN_FLIGHT, release_free_memory

    data = _large_png()
    assert len(data) < 64 * 1024 and zlib.crc32(data)
    client = TestClient(create_app(index_dir, tiny), base_url=LOCAL)
    for url, fields in (("/search/image", {}), ("/classify", {"labels": "red,green"})):  # imports, label set
        assert client.post(url, files={"image": ("q.png", data, "image/png")}, data=fields).status_code == 200
    arrived, everyone, lock = [0], threading.Event(), threading.Lock()
    original = tiny.encode_images

    def busy_model(pixels):
        with lock:
            arrived[0] += 1
            if arrived[0] >= UPLOADS:
                everyone.set()
        everyone.wait(30)
        return original(pixels)

    monkeypatch.setattr(tiny, "encode_images", busy_model)
    release_free_memory()
    baseline = _rss()
    peak, stop = [baseline], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    answers: list[int] = []

    def upload(i):
        url = "/search/image" if i % 2 else "/classify"
        fields = {"labels": "red,green"} if url == "/classify" else {}
        response = client.post(url, files={"image": ("q.png", data, "image/png")}, data=fields)
        answers.append(response.status_code)

    GATE.peak_pixels = 0
    started = time.perf_counter()
    workers = [threading.Thread(target=upload, args=(i,)) for i in range(UPLOADS)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    seconds = time.perf_counter() - started
    stop.set()
    sampler.join()
    time.sleep(0.2)
    after = _rss()
    assert answers == [200] * UPLOADS and everyone.is_set()
    grew, left = peak[0] - baseline, after - baseline
    print(f"\n40 uploads of {SIDE[0]}x{SIDE[1]}: {seconds:.1f} s, peak +{grew / 2**20:.0f} MiB, "
          f"after +{left / 2**20:.0f} MiB, peak pixels held {GATE.peak_pixels:,}")
    assert GATE.peak_pixels <= PIXELS_IN_FLIGHT
    assert grew < PEAK_BOUND, f"memory grew by {grew / 2**20:.0f} MiB under {UPLOADS} uploads"
    assert left < AFTER_BOUND, f"{left / 2**20:.0f} MiB still held after the uploads"


def test_uploads_beyond_the_queue_are_503_with_retry_after():
    from fastapi import HTTPException

    from cliplab.service.uploads import UploadGate

    gate = UploadGate(slots=1, pixels=100, waiting=1)
    holding, release, queued = threading.Event(), threading.Event(), []

    def hold():
        with gate.slot():
            holding.set()
            release.wait(10)

    def wait_in_line():
        with gate.slot():
            queued.append(True)

    first, second = threading.Thread(target=hold), threading.Thread(target=wait_in_line)
    first.start()
    assert holding.wait(10)
    second.start()
    deadline = time.time() + 10
    while gate._queued < 1 and time.time() < deadline:
        time.sleep(0.01)
    with pytest.raises(HTTPException) as refused, gate.slot():
        pass
    assert refused.value.status_code == 503 and refused.value.headers == {"Retry-After": "1"}
    release.set()
    first.join(10)
    second.join(10)
    assert queued == [True]
    with gate.slot():  # free again
        pass


def test_the_pixel_budget_holds_large_pictures_back():
    """Two pictures that together pass the budget are never decoded at the same time; one larger than the whole
    budget still runs (alone)."""
    from cliplab.service.uploads import UploadGate

    gate = UploadGate(slots=4, pixels=100, waiting=8)
    inside, overlap, guard = [0], [0], threading.Lock()

    def decode(count):
        with gate.pixels(count):
            with guard:
                inside[0] += 1
                overlap[0] = max(overlap[0], inside[0])
            time.sleep(0.2)
            with guard:
                inside[0] -= 1

    for counts, most in (([60, 60, 60], 1), ([40, 40, 40, 40], 2), ([500, 10], 1)):
        overlap[0] = 0
        threads = [threading.Thread(target=decode, args=(c,)) for c in counts]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert overlap[0] == most, counts
    assert gate.peak_pixels == 500


def test_the_uploaded_image_gives_the_same_vector_as_the_index(tiny, index_dir):
    """Preprocessing inside the bounded section changes nothing: an indexed image found with score 1."""
    from cliplab.service import create_app

    client = TestClient(create_app(index_dir, tiny), base_url=LOCAL)
    data = (index_dir.parent / "images" / "img2.png").read_bytes()
    hit = client.post("/search/image", files={"image": ("q.png", data, "image/png")}).json()["hits"][0]
    assert hit["name"] == "img2.png" and hit["score"] == pytest.approx(1.0, abs=1e-5)
