"""``cliplab caption-score`` and ``cliplab match`` end to end (tiny model), and ``POST /score`` of ``cliplab serve``."""

from __future__ import annotations

import csv
import io
import json
import socket
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cliplab.cli.app import app

runner = CliRunner()


def _invoke(*args):
    return runner.invoke(app, list(map(str, args)), catch_exceptions=False)


def _hessel(image: np.ndarray, text: np.ndarray, w: float = 2.5) -> float:
    """CLIPScore's per-instance score written out: normalise both, w * clip(sum(product), 0)."""
    image, text = image / np.linalg.norm(image), text / np.linalg.norm(text)
    return float(w * max(float(np.sum(image * text)), 0.0))


@pytest.fixture()
def captions(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"img{i}.png")
    rows = [{"image": "img0.png", "caption": "a red car", "references": ["a car", "a red vehicle"]},
            {"image": "img1.png", "caption": "two dogs", "baseline": "two dogs"},
            {"image": "img2.png", "caption": "a tree", "baseline": "a house"},
            {"image": "missing.png", "caption": "nothing"}]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_caption_score_writes_per_caption_scores(captions, tmp_path, tiny):
    out = tmp_path / "scores.jsonl"
    result = _invoke("caption-score", "--captions", captions, "-o", out, "--model", "tiny", "-q", "-j", "0")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["caption"] for r in rows] == ["a red car", "two dogs", "a tree", "nothing"]
    assert "error" in rows[3] and "clip_s" not in rows[3]
    image = tiny.encode_images(tiny.preprocess(Image.open(tmp_path / "img0.png").convert("RGB"))[None])[0].numpy()
    texts = tiny.encode_texts(["A photo depicts a red car", "A photo depicts a car",
                               "A photo depicts a red vehicle"]).numpy()
    assert rows[0]["clip_s"] == pytest.approx(_hessel(image, texts[0]), abs=1e-5)
    best = max(float(texts[0] @ texts[1]), float(texts[0] @ texts[2]))
    a = rows[0]["clip_s"]
    assert rows[0]["refclip_s"] == pytest.approx(2 * a * best / (a + best), abs=1e-5)
    assert rows[1]["reward"] == 0.0  # sample = greedy
    assert "reward" in rows[2] and "refclip_s" not in rows[1]

    out_csv = tmp_path / "scores.csv"
    refs = tmp_path / "refs.json"
    refs.write_text(json.dumps({"img0": ["a car"], "img1.png": "dogs", "img2": ["a tree"], "missing": ["x"]}))
    result = _invoke("caption-score", "-c", captions, "-r", refs, "-o", out_csv, "--model", "tiny", "-q", "-j", "0")
    assert result.exit_code == 0, result.output
    table = list(csv.DictReader(out_csv.open()))
    assert table[0]["refclip_s"] and table[2]["refclip_s"] and table[3]["error"]


def test_caption_score_refuses_bad_input_before_loading_a_model(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "x.png"}\n')
    result = _invoke("caption-score", "--captions", bad, "--model", "no-such-model")
    assert result.exit_code != 0 and "caption" in result.output and "no-such-model" not in result.output


def test_match_items_whole_picture_parts_equal_clip(tmp_path, tiny):
    Image.fromarray(np.full((40, 40, 3), 90, dtype=np.uint8)).save(tmp_path / "p.png")
    items = [{"image": "p.png", "caption": "a cat on a mat"},
             {"image": "p.png", "caption": "a cat on a mat",
              "boxes": {"cat": [[0, 0, 10, 10]], "mat": [[0, 20, 40, 20]]}}]
    (tmp_path / "items.json").write_text(json.dumps(items))
    out = tmp_path / "m.json"
    result = _invoke("match", "--items", tmp_path / "items.json", "-o", out, "--model", "tiny", "-q")
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    # parsed without boxes: every word's sub-image is the whole picture, e = (1 + sum of weights) e_image: CLIP
    assert rows[0]["comclip"] == pytest.approx(rows[0]["clip"], abs=1e-9) and rows[0]["parts"] == ["cat", "mat", "on"]
    assert rows[1]["parts"] == ["cat", "mat", "on"] and rows[1]["clip"] == pytest.approx(rows[0]["clip"], abs=1e-9)


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_served_score_route(tmp_path, tiny):
    import httpx

    from _server import serving
    from cliplab.search import build_index

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images / f"i{i}.png")
    build_index(tiny, images, tmp_path / "index", cache_dir=tmp_path / "cache", progress=False, workers=0)
    port = _port()
    command = [sys.executable, "-m", "cliplab", "serve", "--index-dir", str(tmp_path / "index"), "--model", "tiny",
               "--device", "cpu", "--host", "127.0.0.1", "--port", str(port), "--quiet"]
    base = f"http://127.0.0.1:{port}"
    data = (images / "i0.png").read_bytes()
    with serving(command, f"{base}/healthz", tmp_path / "server"):
        answer = httpx.post(f"{base}/score", files={"image": ("i0.png", data, "image/png")},
                            data={"captions": ["a dog", "a cat"], "references": ["a puppy"]}, timeout=60)
        empty = httpx.post(f"{base}/score", files={"image": ("i0.png", data, "image/png")},
                           data={"captions": " "}, timeout=60)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    image = tiny.encode_images(tiny.preprocess(Image.open(io.BytesIO(data)).convert("RGB"))[None])[0].numpy()
    texts = tiny.encode_texts(["A photo depicts a dog", "A photo depicts a cat", "A photo depicts a puppy"]).numpy()
    for n in range(2):
        a = _hessel(image, texts[n])
        assert body["scores"][n]["clip_s"] == pytest.approx(a, abs=1e-5)
        b = float(texts[n] @ texts[2])
        assert body["scores"][n]["refclip_s"] == pytest.approx(2 * a * b / (a + b) if a + b else 0.0, abs=1e-5)
    assert empty.status_code == 422 and "captions" in empty.json()["detail"]


def test_caption_score_with_a_grammar_head(captions, tmp_path):
    corpus = tmp_path / "corpus.txt"
    words = ["a", "red", "car", "on", "the", "road", "two", "dogs", "in", "park", "tree", "by", "house"]
    rng = np.random.default_rng(0)
    corpus.write_text("\n".join(" ".join(rng.choice(words, 6)) for _ in range(20)))
    out = tmp_path / "g.jsonl"
    result = _invoke("caption-score", "-c", captions, "--grammar-train", corpus, "-o", out, "--model", "tiny",
                     "-q", "-j", "0")
    assert result.exit_code == 0, result.output
    assert "grammar head: 20 captions" in result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(0.0 <= r["grammar"] <= 1.0 for r in rows[:3]) and "grammar" not in rows[3]
