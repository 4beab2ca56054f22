"""cliplab.search: build / update / open, exactness, approximate recall, damage and model checks."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from cliplab.errors import CliplabError, ModelMismatchError, SearchIndexError, UnknownItemError
from cliplab.search import SearchIndex, build_index, index_spec, update_index
from cliplab.search import index as index_module


def _image(path, seed):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "photos"
    for i in range(8):
        _image(root / ("a" if i % 2 else "b") / f"img{i}.png", i)
    (root / "broken.png").write_bytes(b"not an image at all")
    return root


def _ids_by_name(index):
    return {index.item(int(i))["extra"]["name"]: int(i) for i in index.ids()}


def test_build_search_update_round_trip(tiny, folder, tmp_path):
    out = tmp_path / "index"
    report = build_index(tiny, folder, out, progress=False, workers=0)
    assert (report.count, report.added, report.computed, report.index_type) == (8, 8, 8, "flat")
    assert [name for name, _ in report.failures] == ["broken.png"]  # listed, not silently dropped
    with SearchIndex.open(out) as index:
        assert (index.count, index.dim, index.model_id) == (8, tiny.embed_dim, tiny.model_id)
        assert index.failures[0][0] == "broken.png"
        before = _ids_by_name(index)
        hits = index.search_image(tiny, Image.open(folder / "a" / "img1.png"), k=3)
        assert hits[0].id == before["a/img1.png"] and hits[0].score == pytest.approx(1.0, abs=1e-4)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        assert index.image_file(hits[0].id) == (folder / "a" / "img1.png").resolve()
        assert len(index.search_text(tiny, "a photo of a dog", k=50)) == 8

    (folder / "b" / "img0.png").unlink()  # removed
    _image(folder / "a" / "img3.png", 100)  # changed content
    os.utime(folder / "a" / "img3.png", ns=(1, 1))
    _image(folder / "new" / "fresh.png", 200)  # added
    report = update_index(tiny, out, progress=False, workers=0)
    assert (report.added, report.changed, report.removed, report.unchanged, report.count) == (1, 1, 1, 6, 8)
    assert report.computed == 2  # only the new and the changed file were encoded

    with SearchIndex.open(out) as index:
        after = _ids_by_name(index)
        assert "b/img0.png" not in after and before["b/img0.png"] not in set(after.values())
        assert after["a/img3.png"] == before["a/img3.png"]  # a changed file keeps its id
        assert after["new/fresh.png"] > max(before.values())  # ids are never reused
        assert all(after[name] == before[name] for name in after if name not in ("new/fresh.png",))
        for name in ("a/img3.png", "new/fresh.png"):
            hit = index.search_image(tiny, Image.open(folder / name), k=1)[0]
            assert hit.id == after[name] and hit.score == pytest.approx(1.0, abs=1e-4)
        assert index.item(before["b/img0.png"]) is None

    again = update_index(tiny, out, progress=False, workers=0)  # nothing changed: nothing encoded
    assert (again.added, again.changed, again.removed, again.unchanged, again.computed) == (0, 0, 0, 8, 0)


def test_exact_index_equals_numpy_brute_force(tiny, folder, tmp_path):
    build_index(tiny, folder, tmp_path / "index", progress=False, workers=0)
    with SearchIndex.open(tmp_path / "index") as index:
        vectors, ids = np.load(index.root / "vectors.npy"), index.ids()
        queries = np.random.default_rng(0).normal(size=(5, index.dim)).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        expected = queries @ vectors.T
        for query, hits in zip(expected, index.search_vectors(queries, k=5)):
            order = np.argsort(-query)[:5]
            assert [h.id for h in hits] == [int(ids[i]) for i in order]
            np.testing.assert_allclose([h.score for h in hits], query[order], rtol=1e-5, atol=1e-6)


def _clustered(n, dim, clusters, seed, spread=0.35):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(0, clusters, n)
    points = centres[labels] + spread * rng.normal(size=(n, dim)) / np.sqrt(dim) * 3
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    return points.astype(np.float32), centres


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_types_recall_vs_exact(kind):
    n, dim = 20_000 if kind == "ivf" else 10_000, 32  # HNSW construction is the slow part
    data, centres = _clustered(n + 200, dim, 50, seed=1)
    base, image_queries = data[:n], data[n:]
    gap = np.random.default_rng(2).normal(size=dim)
    gap /= np.linalg.norm(gap)
    text_queries = image_queries + 1.5 * gap  # a constant "modality gap" shift, as text vs image embeddings
    text_queries /= np.linalg.norm(text_queries, axis=1, keepdims=True)
    ids = np.arange(1, n + 1, dtype=np.int64)
    got_kind, factory, params = index_spec(kind, n, dim)
    assert got_kind == kind
    index = index_module._make_index(factory, base, ids)
    index_module._apply_params(index, params)
    for queries in (image_queries, text_queries):
        exact = np.argsort(-(queries @ base.T), axis=1)[:, :10] + 1
        _, found = index.search(np.ascontiguousarray(queries), 10)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, found)])
        assert recall >= 0.9, (kind, recall)


def test_index_spec_choices():
    assert index_spec("auto", 1000, 64)[0] == "flat"
    kind, factory, params = index_spec("auto", 100_000, 512)
    assert kind == "ivf" and factory == "IVF316,Flat" and params["nprobe"] == 20  # nlist/16, at least 16
    assert index_spec("ivfpq", 100_000, 512)[1] == "IVF316,PQ64x8"
    # practical at 1M on a 2-core CPU: ~sqrt(n) cells, ~64 training vectors a cell, not all 1M
    assert index_spec("ivf", 1_000_000, 512)[1] == "IVF1000,Flat"
    assert index_module.train_sample_size("IVF1000,Flat", 1_000_000) == 64_000
    assert index_module.train_sample_size("IVF25,Flat", 1000) == 1000
    assert index_spec("IVF64,Flat", 10_000, 32) == ("factory", "IVF64,Flat", {"nprobe": 16})
    assert index_spec("ivf", 1_000_000, 512)[2] == {"nprobe": 62}
    with pytest.raises(CliplabError, match="index type 'bogus'"):
        index_spec("bogus", 10, 4)


def test_index_type_is_recorded_and_kept_by_update(tiny, folder, tmp_path):
    out = tmp_path / "index"
    build_index(tiny, folder, out, index_type="hnsw", progress=False, workers=0)
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["index_type"], manifest["factory"], manifest["search_params"]) == (
        "hnsw", "HNSW32,Flat", {"efSearch": 256})
    _image(folder / "c" / "more.png", 7)
    update_index(tiny, out, progress=False, workers=0)
    with SearchIndex.open(out) as index:
        assert (index.index_type, index.count) == ("hnsw", 9)


def test_damaged_index_is_refused_and_rebuilt(tiny, folder, tmp_path):
    out = tmp_path / "index"
    build_index(tiny, folder, out, progress=False, workers=0)
    faiss_file = out / "index.faiss"
    data = faiss_file.read_bytes()
    faiss_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(SearchIndexError, match="half-written or damaged.*index.faiss.*cliplab index build again"):
        SearchIndex.open(out)
    middle = len(data) // 2
    faiss_file.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:])  # same size: verify
    with pytest.raises(SearchIndexError, match="damaged"):
        SearchIndex.open(out, verify=True)
    (out / "manifest.json").unlink()
    with pytest.raises(SearchIndexError, match="half-written or damaged.*cliplab index build again"):
        SearchIndex.open(out)
    with pytest.raises(SearchIndexError, match="no search index"):
        SearchIndex.open(tmp_path / "nowhere")
    build_index(tiny, folder, out, progress=False, workers=0)  # build over a damaged folder repairs it
    assert SearchIndex.open(out).count == 8


def test_killed_build_leaves_previous_index(tiny, folder, tmp_path, monkeypatch):
    out = tmp_path / "index"
    build_index(tiny, folder, out, progress=False, workers=0)
    before = (out / "manifest.json").read_text()
    _image(folder / "c" / "more.png", 7)

    def die(folder, *args, **kwargs):
        (folder / "index.faiss").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(index_module, "_write_folder", die)
    with pytest.raises(KeyboardInterrupt):
        build_index(tiny, folder, out, progress=False, workers=0)
    assert (out / "manifest.json").read_text() == before
    assert SearchIndex.open(out).count == 8
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".index.lock") == ["cliplab-cache", "index",
                                                                                     "photos"]


def test_build_refuses_a_folder_that_is_not_an_index(tiny, folder, tmp_path):
    with pytest.raises(SearchIndexError, match="not a cliplab search index"):
        build_index(tiny, folder, folder, progress=False, workers=0)


def test_other_model_and_unknown_ids(tiny, folder, tmp_path):
    from cliplab.models import load_model

    build_index(tiny, folder, tmp_path / "index", progress=False, workers=0)
    other = load_model("tiny", device="cpu", seed=1)
    with SearchIndex.open(tmp_path / "index") as index:
        with pytest.raises(ModelMismatchError, match=f"{tiny.model_id}.*{other.model_id}"):
            index.search_text(other, "a cat")
        with pytest.raises(ModelMismatchError):
            update_index(other, tmp_path / "index", progress=False)
        for bad in (0, 999, -1):
            assert index.item(bad) is None
            with pytest.raises(UnknownItemError, match="no item with id"):
                index.image_file(bad)
        with pytest.raises(CliplabError, match="dimension"):
            index.search_vectors(np.zeros((1, index.dim + 1), np.float32))


def test_captions_are_indexed_and_searched_exactly(tiny, tmp_path):
    rows = []
    for i in range(5):
        _image(tmp_path / "data" / f"p{i}.png", i)
        rows.append({"path": f"p{i}.png", "captions": [f"caption {i} one", f"caption {i} two"]})
    manifest = tmp_path / "data" / "pairs.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = build_index(tiny, manifest, tmp_path / "index", progress=False, workers=0)
    assert report.captions == 10
    from cliplab.features.text import embed_texts

    with SearchIndex.open(tmp_path / "index") as index:
        query = Image.open(tmp_path / "data" / "p2.png")
        hits = index.search_captions(tiny, query, k=4)
        texts = [f"caption {i} {w}" for i in range(5) for w in ("one", "two")]
        scores = embed_texts(tiny, texts) @ index.image_vector(tiny, query)[0]
        order = np.argsort(-scores)[:4]
        assert [h.text for h in hits] == [texts[i] for i in order]
        np.testing.assert_allclose([h.score for h in hits], scores[order], rtol=1e-5, atol=1e-6)
        assert index.item(hits[0].item)["caption"].startswith("caption ")
        assert index.search_text(tiny, "anything", k=1)[0].caption is not None


def test_build_from_parquet_shards(tiny, tmp_path):
    from cliplab.features.shards import write_shards

    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(6, tiny.embed_dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    paths = [str(tmp_path / f"s{i}.png") for i in range(6)]
    common = dict(dim=tiny.embed_dim, preprocess_id=tiny.preprocess_id, encoding_id="fp32", paths=paths,
                  sizes=[1] * 6, mtimes=[0.0] * 6, identities=[f"id{i}" for i in range(6)],
                  captions=[f"shard caption {i}" for i in range(6)], embeddings=vectors,
                  failures=[("bad.png", "unreadable")])
    write_shards(tmp_path / "shards", model_id=tiny.model_id, **common)
    report = build_index(tiny, tmp_path / "shards", tmp_path / "index", progress=False)
    assert (report.count, report.computed, report.captions, report.failures) == (6, 0, 6, [("bad.png", "unreadable")])
    with SearchIndex.open(tmp_path / "index") as index:
        hit = index.search_vectors(vectors[4:5], k=1)[0][0]
        assert hit.path == paths[4] and hit.caption == "shard caption 4" and hit.score == pytest.approx(1.0)
    write_shards(tmp_path / "other", model_id="someone-else", **common)
    with pytest.raises(ModelMismatchError, match="someone-else"):
        build_index(tiny, tmp_path / "other", tmp_path / "index2", progress=False)


def test_shards_index_keeps_every_caption_and_no_absolute_path(tiny, tmp_path):
    from cliplab.features.shards import write_shards

    vectors = np.eye(3, tiny.embed_dim, dtype=np.float32)
    paths = [str(tmp_path / "private" / f"s{i}.png") for i in range(3)]
    captions = [["a red car", "a car on a road"], ["a dog"], []]
    write_shards(tmp_path / "shards", model_id=tiny.model_id, dim=tiny.embed_dim, preprocess_id=tiny.preprocess_id,
                 encoding_id="fp32", paths=paths, sizes=[1] * 3, mtimes=[0.0] * 3, identities=["a", "b", "c"],
                 captions=captions, embeddings=vectors)
    report = build_index(tiny, tmp_path / "shards", tmp_path / "index", progress=False)
    assert report.captions == 3  # both captions of the first image, not only its first one
    with SearchIndex.open(tmp_path / "index") as index:
        hits = index.search_vectors(vectors, k=1)
        assert [h[0].extra["name"] for h in hits] == ["s0.png", "s1.png", "s2.png"]
        assert all("private" not in json.dumps(h[0].extra) for h in hits)


def test_ivf_update_in_place_keeps_trained_index(tiny, folder, tmp_path):
    out = tmp_path / "index"
    build_index(tiny, folder, out, index_type="ivf", progress=False, workers=0)
    (folder / "a" / "img1.png").unlink()
    _image(folder / "c" / "more.png", 9)
    report = update_index(tiny, out, progress=False, workers=0)
    assert (report.rebuilt, report.added, report.removed, report.index_type) == (False, 1, 1, "ivf")
    with SearchIndex.open(out) as index:
        assert index.count == 8 and "nprobe" in index.search_params
        hit = index.search_image(tiny, Image.open(folder / "c" / "more.png"), k=1)[0]
        assert hit.extra["name"] == "c/more.png" and hit.score == pytest.approx(1.0, abs=1e-4)
        assert "a/img1.png" not in {h.extra["name"] for h in index.search_text(tiny, "x", k=20)}


def test_ivf_update_reuses_factory_and_params_when_nlist_would_change(tiny, folder, tmp_path, monkeypatch):
    monkeypatch.setattr(index_module, "ivf_nlist", lambda n: max(1, n // 2))  # the old code recomputed this
    out = tmp_path / "index"
    build_index(tiny, folder, out, index_type="ivf", search_params={"nprobe": 3}, progress=False, workers=0)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["factory"] == "IVF4,Flat" and manifest["train_sample"] == 8
    _image(folder / "c" / "more.png", 9)
    _image(folder / "c" / "most.png", 10)
    report = update_index(tiny, out, progress=False, workers=0)
    assert (report.rebuilt, report.added, report.count) == (False, 2, 10)
    after = json.loads((out / "manifest.json").read_text())
    assert (after["factory"], after["search_params"]) == ("IVF4,Flat", {"nprobe": 3})  # the user's nprobe survives
    with SearchIndex.open(out, search_params={"nprobe": 4}) as index:  # all cells: equals exact search
        vectors, ids = np.load(out / "vectors.npy"), index.ids()
        queries = vectors[:4] + 0.1
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        exact = ids[np.argsort(-(queries @ vectors.T), axis=1)[:, :5]]
        found = [[h.id for h in hits] for hits in index.search_vectors(queries, k=5)]
        assert found == exact.tolist()


def test_ids_continue_across_rebuilds(tiny, folder, tmp_path):
    out = tmp_path / "index"
    build_index(tiny, folder, out, progress=False, workers=0)
    with SearchIndex.open(out) as index:
        first = set(index.ids().tolist())
    build_index(tiny, folder, out, progress=False, workers=0)
    with SearchIndex.open(out) as index:
        second = set(index.ids().tolist())
        assert index.manifest["next_id"] == max(second) + 1
    assert min(second) > max(first)  # the service caches /images/{id}: an id never names another image


def test_kill_between_publish_renames_keeps_the_index(tiny, folder, tmp_path, monkeypatch):
    out = tmp_path / "index"
    build_index(tiny, folder, out, progress=False, workers=0)
    _image(folder / "c" / "more.png", 7)
    real = os.rename

    def killed(src, dst):
        if ".build-" in str(src):
            raise KeyboardInterrupt  # after the old index was set aside, before the new one is in place
        return real(src, dst)

    monkeypatch.setattr(index_module.os, "rename", killed)
    with pytest.raises(KeyboardInterrupt):
        build_index(tiny, folder, out, progress=False, workers=0)
    monkeypatch.setattr(index_module.os, "rename", real)
    assert not out.exists()
    with SearchIndex.open(out) as index:  # a reader recovers the set-aside previous index
        assert index.count == 8
    assert out.is_dir() and not list(tmp_path.glob(".index.old-*"))
    assert build_index(tiny, folder, out, progress=False, workers=0).count == 9


def test_a_second_writer_is_refused_with_one_line(tiny, folder, tmp_path):
    out = tmp_path / "index"
    build_index(tiny, folder, out, progress=False, workers=0)
    with index_module.writer_lock(out):
        with pytest.raises(SearchIndexError, match="another cliplab index build or update is writing"):
            build_index(tiny, folder, out, progress=False, workers=0)
        with pytest.raises(SearchIndexError, match="another cliplab index build or update is writing"):
            update_index(tiny, out, progress=False, workers=0)
        assert SearchIndex.open(out).count == 8  # readers are not blocked


def test_untrainable_index_type_is_one_clear_error_before_embedding(tiny, folder, tmp_path, monkeypatch):
    import cliplab.features.embed as embed_module

    def no_embedding(*args, **kwargs):
        raise AssertionError("embedded before checking the index type")

    monkeypatch.setattr(embed_module, "embed_images", no_embedding)
    with pytest.raises(CliplabError, match=r"index type ivfpq .*needs at least 16 vectors to train, the source has 9"):
        build_index(tiny, folder, tmp_path / "i1", index_type="ivfpq", progress=False, workers=0)
    with pytest.raises(CliplabError, match=r"needs at least 256 vectors to train.*use flat"):
        build_index(tiny, folder, tmp_path / "i2", index_type="HNSW32,PQ8", progress=False, workers=0)
    vectors = np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32)
    with pytest.raises(CliplabError, match="needs at least 256 vectors"):  # after embedding (failures) too
        index_module._make_index("IVF2,PQ4", vectors, np.arange(8))


def test_identical_files_at_two_paths_are_both_indexed(tiny, tmp_path):
    root = tmp_path / "dups"
    _image(root / "one" / "same.png", 5)
    (root / "two").mkdir()
    (root / "two" / "same.png").write_bytes((root / "one" / "same.png").read_bytes())
    report = build_index(tiny, root, tmp_path / "index", hash_content=True, progress=False, workers=0)
    assert report.count == 2
    with SearchIndex.open(tmp_path / "index") as index:
        hits = index.search_image(tiny, Image.open(root / "one" / "same.png"), k=2)
        assert sorted(h.extra["name"] for h in hits) == ["one/same.png", "two/same.png"]
        assert len({h.id for h in hits}) == 2


def test_manifest_extra_columns_are_stored(tiny, tmp_path):
    data = tmp_path / "data"
    for i in range(3):
        _image(data / f"p{i}.png", i)
    (data / "m.csv").write_text("path,label,photographer,licence\n" + "".join(
        f"p{i}.png,c{i % 2},ann{i},CC-BY\n" for i in range(3)))
    build_index(tiny, data / "m.csv", tmp_path / "index", progress=False, workers=0)
    with SearchIndex.open(tmp_path / "index") as index:
        hit = index.search_image(tiny, Image.open(data / "p2.png"), k=1)[0]
        assert hit.extra["photographer"] == "ann2" and hit.extra["licence"] == "CC-BY"
        assert hit.extra["label"] == "c0" and "path" not in hit.extra


def test_empty_query_and_caption_lookup_by_hit(tiny, tmp_path, monkeypatch):
    rows = []
    for i in range(3):
        _image(tmp_path / "data" / f"p{i}.png", i)
        rows.append({"path": f"p{i}.png", "caption": f"caption {i}"})
    (tmp_path / "data" / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    build_index(tiny, tmp_path / "data" / "m.jsonl", tmp_path / "index", progress=False, workers=0)
    with SearchIndex.open(tmp_path / "index") as index:
        for empty in ("", "   \n"):
            with pytest.raises(CliplabError, match="empty"):
                index.search_text(tiny, empty)

        def every_caption(self):
            raise AssertionError("read every caption row for one query")

        monkeypatch.setattr(type(index._store), "captions", every_caption)
        hits = index.search_captions(tiny, Image.open(tmp_path / "data" / "p1.png"), k=2)
        assert len(hits) == 2 and all(h.text.startswith("caption ") for h in hits)


def test_model_flags_are_the_cli_flags_that_reload_the_model():
    spec = {"name": "ViT-B-32", "pretrained": "openai", "seed": 3, "device": "cpu", "quick_gelu": False,
            "long_text_positions": False, "precision": None}
    assert index_module.model_flags(spec) == "--model ViT-B-32 --pretrained openai --seed 3 --no-quick-gelu"
    assert index_module.model_flags({"name": "tiny", "seed": 0, "long_text_positions": True}) == \
        "--model tiny --long-positions"
    assert index_module.model_flags("tiny") == "--model tiny"
