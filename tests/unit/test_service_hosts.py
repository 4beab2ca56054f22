"""Issue 21 item 4: the Host header is checked (DNS rebinding), and /classify label sets are bounded on disk,
garbage-collected, and computed outside any shared lock."""

from __future__ import annotations

import io
import socket
import threading
import types

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(
        buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def index_dir(tiny, tmp_path_factory):
    from cliplab.search import build_index

    root = tmp_path_factory.mktemp("hosts")
    images = root / "images"
    images.mkdir()
    for i in range(3):
        (images / f"img{i}.png").write_bytes(_png(i))
    build_index(tiny, images, root / "index", cache_dir=root / "cache", progress=False, workers=0)
    return root / "index"


# ------------------------------------------------------------------------------------------------ Host header

def test_allowed_hosts_follow_the_bound_address():
    from cliplab.service.hosts import AllowedHosts, host_name

    assert host_name("LocalHost.:8000") == "localhost" and host_name("[::1]:8000") == "::1"
    loopback = AllowedHosts("127.0.0.1")
    for good in ("localhost", "localhost:8000", "127.0.0.1:8000", "[::1]:8000", "LOCALHOST"):
        assert loopback.allows(good), good
    for bad in ("evil.example", "evil.example:8000", "127.0.0.1.nip.io", "localhost.evil.example", "", None,
                "192.168.1.20", "evil.example:8000@localhost"):
        assert not loopback.allows(bad), bad
    anywhere = AllowedHosts("0.0.0.0")
    for good in ("192.168.1.20:8000", "[fe80::1]:8000", "10.0.0.1", "localhost", socket.gethostname()):
        assert anywhere.allows(good), good
    assert not anywhere.allows("evil.example")
    named = AllowedHosts("127.0.0.1", ["photos.lan,*.example.org", "other.lan"])
    for good in ("photos.lan", "other.lan:80", "a.example.org", "b.a.example.org:8000", "localhost"):
        assert named.allows(good), good
    for bad in ("example.org", "evilexample.org", "photos.lan.evil.example"):
        assert not named.allows(bad), bad
    assert AllowedHosts("photos.lan").allows("photos.lan:8000") and not AllowedHosts("photos.lan").allows(
        "localhost")
    assert AllowedHosts("127.0.0.1", ["*"]).allows("anything.example")


def test_a_rebinding_host_is_refused_on_every_route(index_dir, tiny):
    from cliplab.service import create_app
    from cliplab.service.hosts import AllowedHosts

    app = create_app(index_dir, tiny)
    evil = TestClient(app, base_url="http://evil.example:8000")
    good = TestClient(app, base_url="http://localhost:8000")
    hit = good.get("/search", params={"q": "x", "k": 1}).json()["hits"][0]
    for url in ("/", "/healthz", "/search?q=x&k=3", hit["url"], "/static/app.js", "/openapi.json", "/docs"):
        refused = evil.get(url)
        assert refused.status_code == 400, url
        detail = refused.json()["detail"]
        assert "DNS-rebinding" in detail and "--allowed-hosts" in detail
        assert "img" not in refused.text and "localhost" not in detail and "127.0.0.1" not in detail
        assert good.get(url).status_code == 200, url
    upload = evil.post("/search/image", files={"image": ("q.png", _png(1), "image/png")})
    assert upload.status_code == 400
    named = TestClient(create_app(index_dir, tiny, allowed_hosts=AllowedHosts("127.0.0.1", ["photos.lan"])),
                       base_url="http://photos.lan:8000")
    assert named.get("/healthz").status_code == 200


def test_serve_passes_its_host_and_allowed_hosts(index_dir, tmp_path, monkeypatch):
    import uvicorn
    from typer.testing import CliRunner

    from cliplab.cli.app import app

    ran = {}
    monkeypatch.setattr(uvicorn, "run", lambda application, **kwargs: ran.update(app=application, **kwargs))
    result = CliRunner().invoke(app, ["serve", "--index-dir", str(index_dir), "--model", "tiny", "--device", "cpu",
                                      "--allowed-hosts", "photos.lan", "--label-cache", str(tmp_path / "labels"),
                                      "--max-connections", "50"])
    assert result.exit_code == 0, result.output
    assert ran["limit_concurrency"] == 50
    assert TestClient(ran["app"], base_url="http://photos.lan").get("/healthz").status_code == 200
    assert TestClient(ran["app"], base_url="http://127.0.0.1:8000").get("/healthz").status_code == 200
    assert TestClient(ran["app"], base_url="http://evil.example").get("/healthz").status_code == 400


# ------------------------------------------------------------------------------------------------ label sets

def _head(names):
    """A stand-in fitted head: distinct weights per label set."""
    seed = sum(map(ord, "".join(names)))
    return types.SimpleNamespace(weights_=np.random.default_rng(seed).normal(size=(8, len(names))),
                                 logit_scale_=100.0)


def test_label_sets_on_disk_are_bounded_and_collected(tmp_path):
    import os
    import time

    from cliplab.service.labels import LabelSets

    made = []

    def compute(names):
        made.append(tuple(names))
        return _head(names)

    folder = tmp_path / "labels"
    sets = LabelSets(compute, {"model": "m"}, folder, dim=8, memory=2, disk_sets=3)
    wanted = [[f"a{i}", f"b{i}"] for i in range(5)]
    for i, names in enumerate(wanted):
        head = sets.get(names)
        assert head.weights_.shape == (8, 2) and np.array_equal(head.weights_, _head(names).weights_)
        for path in folder.glob("*.npz"):  # distinct times: the order of use is what collection keeps
            os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns - (10 - i) * 10**9))
    files = sorted(folder.glob("*.npz"))
    assert len(files) == 3 and {sets.path(n) for n in wanted[2:]} == set(files)
    assert made == [tuple(n) for n in wanted]
    sets.get(wanted[4])  # in memory: nothing computed
    sets.get(wanted[0])  # dropped from memory and disk: computed again
    assert made[-1] == ("a0", "b0") and len(made) == 6
    # a restart reads what is on disk; a damaged or mismatching file is computed again and replaced
    again = LabelSets(compute, {"model": "m"}, folder, dim=8, disk_sets=3)
    assert np.array_equal(again.get(wanted[3]).weights_, _head(wanted[3]).weights_) and len(made) == 6
    sets.path(wanted[4]).write_bytes(b"garbage")
    assert np.array_equal(again.get(wanted[4]).weights_, _head(wanted[4]).weights_) and len(made) == 7
    assert LabelSets(compute, {"model": "m"}, folder, dim=16).get(wanted[3]) is not None and len(made) == 8  # width
    assert LabelSets(compute, {"model": "other"}, folder, dim=8).path(wanted[3]) != sets.path(wanted[3])
    # a byte bound: room for one file keeps the newest only
    size = sets.path(wanted[4]).stat().st_size
    small = LabelSets(compute, {"model": "m"}, tmp_path / "small", dim=8, disk_bytes=size + size // 2)
    small.get(["x0", "y0"])
    time.sleep(0.02)
    small.get(["x1", "y1"])
    assert list((tmp_path / "small").glob("*.npz")) == [small.path(["x1", "y1"])]


def test_classify_labels_stay_out_of_the_feature_cache(index_dir, tiny, tmp_path, monkeypatch):
    """Labels sent to the service never pile up in the shared feature cache; they go to the bounded label
    folder, which a restarted service reads."""
    import cliplab.eval.inputs
    from cliplab.service import create_app

    monkeypatch.setenv("CLIPLAB_CACHE", str(tmp_path / "cache-root"))
    built = []
    original = cliplab.eval.inputs.build_head

    def counting(*args, **kwargs):
        built.append(args[2])
        return original(*args, **kwargs)

    monkeypatch.setattr(cliplab.eval.inputs, "build_head", counting)
    client = TestClient(create_app(index_dir, tiny, label_cache_dir=tmp_path / "labels"), base_url="http://localhost")
    data = _png(3)
    first = client.post("/classify", files={"image": ("q.png", data, "image/png")}, data={"labels": "cat,dog"})
    assert first.status_code == 200, first.text
    assert not (tmp_path / "cache-root").exists() or not any((tmp_path / "cache-root").rglob("*.sqlite"))
    assert len(list((tmp_path / "labels").glob("*.npz"))) == 1
    restarted = TestClient(create_app(index_dir, tiny, label_cache_dir=tmp_path / "labels"),
                           base_url="http://localhost")
    second = restarted.post("/classify", files={"image": ("q.png", data, "image/png")}, data={"labels": "cat,dog"})
    assert second.json()["probabilities"] == pytest.approx(first.json()["probabilities"], abs=1e-6)
    assert built == [["cat", "dog"]]


def test_new_label_sets_are_computed_at_the_same_time_and_each_once(index_dir, tiny, monkeypatch):
    """Two different new label sets are computed concurrently (no lock around the computation); concurrent
    requests for the same set share one computation."""
    import cliplab.eval.inputs
    from cliplab.service import create_app

    original = cliplab.eval.inputs.build_head
    second_started, calls, guard, overlapped = threading.Event(), [], threading.Lock(), []

    def slow(method, backbone, names, *args, **kwargs):
        with guard:
            calls.append(list(names))
        if names == ["a", "b"]:
            overlapped.append(second_started.wait(5))  # the other set starts while this one is computed
        else:
            second_started.set()
        return original(method, backbone, names, *args, **kwargs)

    monkeypatch.setattr(cliplab.eval.inputs, "build_head", slow)
    client = TestClient(create_app(index_dir, tiny), base_url="http://localhost")
    data = _png(4)
    answers = []

    def classify(labels):
        answers.append(client.post("/classify", files={"image": ("q.png", data, "image/png")},
                                   data={"labels": labels}))

    first = threading.Thread(target=classify, args=("a,b",))
    first.start()
    while not calls:
        threading.Event().wait(0.01)
    others = [threading.Thread(target=classify, args=("c,d",)) for _ in range(3)]
    for thread in others:
        thread.start()
    for thread in [first, *others]:
        thread.join(60)
    assert overlapped == [True] and [a.status_code for a in answers] == [200] * 4
    assert sorted(map(tuple, calls)) == [("a", "b"), ("c", "d")]  # c,d computed once for three requests
