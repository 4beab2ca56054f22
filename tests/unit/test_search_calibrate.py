"""Search breadth from measured recall: exact top-k, recall, the ladder, and what a build records."""

import json

import faiss
import numpy as np
import pytest
from PIL import Image

from cliplab.search import build_index
from cliplab.search import index as index_module
from cliplab.search.calibrate import calibrate, exact_top_k, recall_at_k, text_probe_texts


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_exact_top_k_equals_a_full_sort_across_chunks():
    rng = np.random.default_rng(0)
    vectors, queries = _unit(rng, 1000, 16), _unit(rng, 7, 16)
    found = exact_top_k(vectors, queries, k=10, chunk=128)
    expected = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    assert [set(r) for r in found.tolist()] == [set(r) for r in expected.tolist()]
    assert exact_top_k(vectors[:3], queries, k=10).shape == (7, 3)  # k capped at the collection size


def test_recall_at_k_by_hand():
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    found = np.array([[1, 2, 9, -1], [8, 7, 6, 5]])  # 2 of 4, 4 of 4 (-1: FAISS's "nothing found")
    assert recall_at_k(found, exact) == pytest.approx(0.75)


def _ivf(vectors, ids, nlist):
    index = faiss.IndexIDMap2(faiss.index_factory(vectors.shape[1], f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT))
    faiss.extract_index_ivf(index.index).cp.min_points_per_centroid = 1
    index.index.train(vectors)
    index.add_with_ids(vectors, ids)
    return index


def test_ladder_stops_at_the_first_breadth_reaching_the_target_and_measures_it_honestly():
    rng = np.random.default_rng(1)
    vectors = _unit(rng, 5000, 24)  # isotropic: an IVF cell holds few of a query's neighbours
    ids = np.arange(100, 5100, dtype=np.int64)
    text = _unit(rng, 40, 24)
    index = _ivf(vectors, ids, 64)
    params, record = calibrate(index, vectors, ids, "ivf", {"nprobe": 2}, text, target=0.99)
    assert [t["nprobe"] for t in record["tried"]] == [2, 4, 8]  # 4x the default at most
    assert not record["met"] and params["nprobe"] == 8 and record["chosen"] == {"nprobe": 8}
    # the recorded recall is what that breadth really gives, recomputed here without the module
    faiss.extract_index_ivf(index.index).nprobe = 8
    truth = ids[np.argsort(-(text @ vectors.T), axis=1)[:, :10]]
    hits = index.search(text, 10)[1]
    by_hand = np.mean([len(set(h) & set(t)) / 10 for h, t in zip(hits.tolist(), truth.tolist())])
    assert record["recall"]["text"] == pytest.approx(by_hand)
    params, record = calibrate(index, vectors, ids, "ivf", {"nprobe": 2}, text, target=0.05)
    assert record["met"] and params["nprobe"] == 2 and len(record["tried"]) == 1
    params, record = calibrate(index, vectors, ids, "ivf", {"nprobe": 3}, text, tune=False)
    assert params["nprobe"] == 3 and [t["nprobe"] for t in record["tried"]] == [3]  # measured, not tuned


def test_text_probes_prefer_captions_then_class_names_then_imagenet():
    assert text_probe_texts(["a cat", "a cat", "a dog"], ["x"])[0] == ["a cat", "a dog"]
    assert text_probe_texts([], ["apple", "pear"])[0] == ["a photo of a apple.", "a photo of a pear."]
    texts, source = text_probe_texts(None, None, n=5)
    assert len(texts) == 5 and "ImageNet" in source
    assert texts == text_probe_texts(None, None, n=5)[0]  # seeded


def test_a_large_enough_build_records_its_measured_recall(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(index_module, "CALIBRATE_MIN", 8)
    rng = np.random.default_rng(2)
    for i in range(40):
        path = tmp_path / "photos" / ("pear" if i % 2 else "apple") / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(path)
    report = build_index(tiny, tmp_path / "photos", tmp_path / "index", index_type="ivf", progress=False, workers=0)
    calibration = report.calibration
    assert set(calibration["recall"]) == {"image", "text"} and calibration["queries"]["image"] == 40
    assert "class names" in calibration["text_queries_from"]  # apple/pear: the folder's labels
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest["calibration"]["chosen"] == {"nprobe": manifest["search_params"]["nprobe"]}
    fixed = build_index(tiny, tmp_path / "photos", tmp_path / "index2", index_type="ivf", progress=False,
                        workers=0, search_params={"nprobe": 1})
    assert fixed.calibration["chosen"] == {"nprobe": 1} and len(fixed.calibration["tried"]) == 1  # the user's
