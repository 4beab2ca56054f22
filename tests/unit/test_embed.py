"""embed_images / embed_texts: correctness against the backbone, bad files, caching, resume."""

import numpy as np
import pytest
import torch
from PIL import Image

from cliplab.data import image_files, image_folder, load_image
from cliplab.errors import DimensionMismatchError
from cliplab.features import FeatureCache, embed_images, embed_texts, image_cache


def _folder_with_bad_files(root):
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (root / cls).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    (root / "cats" / "empty.jpg").write_bytes(b"")
    (root / "dogs" / "fake.png").write_bytes(b"not a png")
    Image.new("I;16", (8, 8), 40000).save(root / "dogs" / "deep.png")
    Image.new("RGB", (8, 8)).save(root / "dogs" / "ünïcødé.jpg")
    return root


def test_features_equal_direct_encoding_and_bad_files_are_reported(tmp_path, tiny):
    data = image_folder(_folder_with_bad_files(tmp_path / "imgs"))
    out = embed_images(tiny, data, tmp_path / "cache", batch_size=4, num_workers=0, progress=False)
    assert len(out) + len(out.failures) == len(data) == 14
    assert sorted(reason.split(" ")[0] for _, reason in out.failures) == ["empty", "not"]
    assert {item for item, _ in out.failures} == {"cats/empty.jpg", "dogs/fake.png"}
    expected = tiny.encode_images(torch.stack([tiny.preprocess(load_image(data.paths[i])) for i in out.indices]))
    np.testing.assert_allclose(np.asarray(out.features), expected.numpy(), atol=1e-5)
    assert out.features.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out.features, axis=1), 1.0, atol=1e-5)
    assert list(out.labels) == [int(data.labels[i]) for i in out.indices]
    assert "dogs/ünïcødé.jpg" in out.item_ids


def test_warm_rerun_computes_nothing_and_reads_memory_mapped(tmp_path, tiny):
    data = image_folder(_folder_with_bad_files(tmp_path / "imgs"))
    cold = embed_images(tiny, data, tmp_path / "cache", batch_size=4, num_workers=0, progress=False)
    warm = embed_images(tiny, data, tmp_path / "cache", batch_size=4, num_workers=0, progress=False)
    assert cold.computed == 12 and warm.computed == 0  # 14 files, 2 undecodable: 12 encoded
    assert isinstance(warm.features, np.memmap)
    np.testing.assert_array_equal(np.asarray(cold.features), np.asarray(warm.features))
    assert warm.failures == cold.failures


def test_changed_file_is_recomputed_and_new_file_only_is_added(tmp_path, tiny):
    root = _folder_with_bad_files(tmp_path / "imgs")
    embed_images(tiny, image_folder(root), tmp_path / "cache", num_workers=0, progress=False)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(root / "cats" / "new.png")
    (root / "cats" / "empty.jpg").unlink()
    Image.new("RGB", (8, 8), (0, 255, 0)).save(root / "cats" / "empty.jpg")  # fixed file, same name
    again = embed_images(tiny, image_folder(root), tmp_path / "cache", num_workers=0, progress=False)
    assert again.computed == 2
    assert [item for item, _ in again.failures] == ["dogs/fake.png"]


def test_worker_processes_give_the_same_features(tmp_path, tiny):
    data = image_folder(_folder_with_bad_files(tmp_path / "imgs"))
    serial = embed_images(tiny, data, tmp_path / "a", batch_size=4, num_workers=0, progress=False)
    parallel = embed_images(tiny, data, tmp_path / "b", batch_size=4, num_workers=2, progress=False)
    np.testing.assert_array_equal(np.asarray(serial.features), np.asarray(parallel.features))
    assert serial.item_ids == parallel.item_ids


def test_unlabelled_files_and_folders(tmp_path, tiny):
    root = _folder_with_bad_files(tmp_path / "imgs")
    data = image_files([root / "cats", root / "dogs" / "0.png"])
    assert len(data) == 7 and (data.labels == -1).all()
    out = embed_images(tiny, data, tmp_path / "cache", num_workers=0, progress=False)
    assert len(out) == 6 and len(out.failures) == 1


def test_text_embeddings_cached_and_equal_direct(tmp_path, tiny):
    texts = ["a cat", "a dog", "a cat", "a car"]
    first = embed_texts(tiny, texts, tmp_path / "cache")
    np.testing.assert_allclose(first, tiny.encode_texts(texts).numpy(), atol=1e-6)
    cache = FeatureCache(tmp_path / "cache", next(p.name for p in (tmp_path / "cache").iterdir()))
    assert len(cache) == 3  # duplicates stored once
    np.testing.assert_array_equal(embed_texts(tiny, texts, tmp_path / "cache"), first)


def test_cache_rejects_wrong_dimension(tmp_path, tiny):
    cache = image_cache(tiny, tmp_path / "cache")
    with pytest.raises(DimensionMismatchError):
        cache.add(["x"], np.zeros((1, tiny.embed_dim + 1), np.float32))


def test_different_preprocessing_uses_a_different_cache_space(tmp_path, tiny):
    from cliplab.models import load_model

    other = load_model("tiny")
    assert image_cache(tiny, tmp_path).space == image_cache(other, tmp_path).space
    other.preprocess_config = {**other.preprocess_config, "interpolation": "bilinear"}
    assert image_cache(tiny, tmp_path).space != image_cache(other, tmp_path).space


def test_text_cache_is_keyed_by_the_tokenizer(tmp_path, tiny):
    from cliplab.features import text_cache
    from cliplab.models import load_model

    other = load_model("tiny")
    assert text_cache(tiny, tmp_path).space == text_cache(other, tmp_path).space
    other._tokenizer_id = "another-tokenizer"  # same weights, another tokenizer: other token ids, other embeddings
    assert text_cache(tiny, tmp_path).space != text_cache(other, tmp_path).space


def test_content_hash_identity_survives_a_move(tmp_path, tiny):
    root = _folder_with_bad_files(tmp_path / "imgs")
    first = embed_images(tiny, image_folder(root, hash_content=True), tmp_path / "cache", num_workers=0,
                         progress=False)
    root.rename(tmp_path / "moved")
    again = embed_images(tiny, image_folder(tmp_path / "moved", hash_content=True), tmp_path / "cache",
                         num_workers=0, progress=False)
    assert first.computed == 12 and again.computed == 0
    np.testing.assert_array_equal(np.asarray(first.features), np.asarray(again.features))


def test_non_utf8_file_name_is_embedded_and_reported_printably(tmp_path, tiny):
    import os

    root = tmp_path / "imgs" / "cls"
    root.mkdir(parents=True)
    Image.new("RGB", (8, 8), (9, 9, 9)).save(root / "ok.png")
    raw = os.path.join(os.fsencode(root), b"caf\xe9.png")
    with open(raw, "wb") as handle:
        Image.new("RGB", (8, 8), (200, 0, 0)).save(handle, "PNG")
    out = embed_images(tiny, image_folder(tmp_path / "imgs"), tmp_path / "cache", num_workers=0, progress=False)
    assert len(out) == 2 and not out.failures
    assert "cls/caf\\xe9.png" in out.item_ids


def test_unreadable_file_is_reported_but_not_remembered(tmp_path, tiny, monkeypatch):
    import cliplab.data.base as base
    from cliplab.errors import ImageDecodeError

    root = _folder_with_bad_files(tmp_path / "imgs")
    real = base.load_image

    def flaky(path):
        if path.name == "0.png" and path.parent.name == "cats":
            raise ImageDecodeError(str(path), "permission denied", permanent=False)
        return real(path)

    monkeypatch.setattr(base, "load_image", flaky)
    first = embed_images(tiny, image_folder(root), tmp_path / "cache", num_workers=0, progress=False)
    assert ("cats/0.png", "permission denied") in first.failures and len(first) == 11
    monkeypatch.setattr(base, "load_image", real)
    second = embed_images(tiny, image_folder(root), tmp_path / "cache", num_workers=0, progress=False)
    assert second.computed == 1 and len(second) == 12  # retried, and nothing else recomputed
    assert "cats/0.png" not in {item for item, _ in second.failures}


def test_files_without_image_extension_are_listed(tmp_path):
    root = _folder_with_bad_files(tmp_path / "imgs")
    (root / "cats" / "notes.txt").write_text("x")
    Image.new("RGB", (4, 4)).save(root / "cats" / "pic.qoi")
    data = image_folder(root)
    assert [p.name for p in data.ignored] == ["notes.txt"]
    assert "cats/pic.qoi" in data.item_ids()


def test_array_subset_does_not_reuse_the_full_arrays_cache(tmp_path, tiny):
    from cliplab.data import ArrayImageDataset

    source = tmp_path / "arr.bin"
    source.write_bytes(b"x")
    images = np.random.default_rng(0).integers(0, 255, (6, 8, 8, 3), dtype=np.uint8)
    full = ArrayImageDataset(images, np.arange(6), [str(i) for i in range(6)], source, "arr")
    odd = ArrayImageDataset(images[1::2], np.arange(3), ["a", "b", "c"], source, "arr")
    a = embed_images(tiny, full, tmp_path / "c", num_workers=0, progress=False)
    b = embed_images(tiny, odd, tmp_path / "c", num_workers=0, progress=False)
    assert b.computed == 0  # same pixels, same identities
    np.testing.assert_array_equal(np.asarray(b.features), np.asarray(a.features)[1::2])


def test_batches_stored_meanwhile_by_another_process_are_not_recomputed(tmp_path, tiny, monkeypatch):
    from cliplab.features.embed import _compute

    data = image_folder(_folder_with_bad_files(tmp_path / "imgs"))
    identities = data.identities()
    cache = image_cache(tiny, tmp_path / "cache")
    good = [i for i in range(len(data)) if data.paths[i].name not in ("empty.jpg", "fake.png")]
    first_batch = [i for i in range(4) if i in good]
    cache.add([identities[i] for i in first_batch], np.zeros((len(first_batch), tiny.embed_dim), np.float32))
    calls = []
    real = tiny.encode_images
    monkeypatch.setattr(tiny, "encode_images", lambda x: calls.append(len(x)) or real(x))
    _compute(tiny, data, list(range(len(data))), identities, cache, 4, 0, False)
    assert sum(calls) == len(good) - len(first_batch)  # the already-stored first batch skipped its forward
    found, failed = cache.lookup(identities)
    assert len(found) == len(good) and len(failed) == 2


def test_cache_gc_removes_only_old_orphans(tmp_path, tiny):
    import os
    import time

    from typer.testing import CliRunner

    from cliplab.cli.app import app

    data = image_folder(_folder_with_bad_files(tmp_path / "imgs"))
    embed_images(tiny, data, tmp_path / "cache", num_workers=0, progress=False)
    cache = image_cache(tiny, tmp_path / "cache")
    shards = cache.dir / "shards"
    registered = sorted(p.name for p in shards.iterdir())
    old, fresh, tmp = shards / "orphan.npy", shards / "fresh-orphan.npy", shards / ".x.npy.1.ab.tmp"
    for path in (old, fresh, tmp):
        path.write_bytes(b"0" * 100)
    past = time.time() - 7200
    os.utime(old, (past, past))
    os.utime(tmp, (past, past))
    for path in shards.iterdir():
        if path.name in registered:
            os.utime(path, (past, past))
    result = CliRunner().invoke(app, ["cache", "--cache-dir", str(tmp_path / "cache"), "--gc"])
    assert result.exit_code == 0, result.output
    assert "removed 2 leftover file(s)" in result.output and "tiny-seed0" in result.output
    assert sorted(p.name for p in shards.iterdir()) == sorted(registered + ["fresh-orphan.npy"])
    again = embed_images(tiny, data, tmp_path / "cache", num_workers=0, progress=False)
    assert again.computed == 0


def test_cache_gc_removes_views_unused_for_long_and_they_rebuild_without_recomputing(tmp_path, tiny):
    import os
    import time

    first = image_folder(_folder_with_bad_files(tmp_path / "a"))
    second = image_folder(_folder_with_bad_files(tmp_path / "b"))
    for data in (first, second):
        embed_images(tiny, data, tmp_path / "cache", num_workers=0, progress=False)
    views = image_cache(tiny, tmp_path / "cache").dir / "views"
    assert len(list(views.glob("*.npy"))) == 2
    old_key = embed_images(tiny, first, tmp_path / "cache", num_workers=0, progress=False).cache_key.split("/")[1]
    past = time.time() - 40 * 86400
    os.utime(views / f"{old_key}.json", (past, past))
    removed, _ = image_cache(tiny, tmp_path / "cache").collect_garbage()
    assert removed == 2 and not (views / f"{old_key}.npy").exists()
    assert len(list(views.glob("*.json"))) == 1  # the recently used view is kept
    again = embed_images(tiny, first, tmp_path / "cache", num_workers=0, progress=False)
    assert again.computed == 0 and (views / f"{old_key}.npy").exists()  # rebuilt from the shards


def test_reading_a_view_marks_it_used(tmp_path, tiny):
    import os

    data = image_folder(_folder_with_bad_files(tmp_path / "a"))
    key = embed_images(tiny, data, tmp_path / "cache", num_workers=0, progress=False).cache_key.split("/")[1]
    side = image_cache(tiny, tmp_path / "cache").dir / "views" / f"{key}.json"
    os.utime(side, (1_000_000, 1_000_000))
    embed_images(tiny, data, tmp_path / "cache", num_workers=0, progress=False)
    assert side.stat().st_mtime > 1_000_000
