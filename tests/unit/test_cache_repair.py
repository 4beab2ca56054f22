"""The feature cache repairs itself: each part corrupted in turn, the next run equals a clean run."""

import sqlite3

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cliplab.cli.app import app
from cliplab.data import image_folder
from cliplab.errors import CacheError
from cliplab.features import embed_images, image_cache
from cliplab.features.cache_check import repair_space, verify_space

N_PER_CLASS = 40  # with batch 16: several shards of 64 items (SHARD_ITEMS rounds to whole batches)


@pytest.fixture()
def folder(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(N_PER_CLASS):
            pixels = rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "imgs" / cls / f"{i}.png")
    return image_folder(tmp_path / "imgs")


def _embed(tiny, data, cache):
    return embed_images(tiny, data, cache, batch_size=16, num_workers=0, progress=False)


@pytest.fixture()
def clean(tiny, folder, tmp_path):
    return np.array(_embed(tiny, folder, tmp_path / "clean").features)


def _space(tiny, root):
    return image_cache(tiny, root)


def _shards(space):
    return sorted((space.dir / "shards").glob("*.npy"))


def _drop_views(space):
    for path in (space.dir / "views").iterdir():
        path.unlink()


def test_shards_are_small_enough_to_corrupt_one(tiny, folder, tmp_path, monkeypatch):
    monkeypatch.setattr("cliplab.features.embed.SHARD_ITEMS", 32)
    _embed(tiny, folder, tmp_path / "c")
    assert len(_shards(_space(tiny, tmp_path / "c"))) >= 3


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_damaged_shard_is_dropped_and_recomputed_in_the_same_run(tiny, folder, tmp_path, clean, damage,
                                                                   monkeypatch):
    monkeypatch.setattr("cliplab.features.embed.SHARD_ITEMS", 32)
    _embed(tiny, folder, tmp_path / "c")
    space = _space(tiny, tmp_path / "c")
    _drop_views(space)  # make the run read the shards
    victim = _shards(space)[1]
    rows = len(np.load(victim))
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    else:
        victim.unlink()
    again = _embed(tiny, folder, tmp_path / "c")
    np.testing.assert_array_equal(np.asarray(again.features), clean)
    assert again.computed == rows  # only the lost shard's items, never the healthy rest
    assert len(again.repairs) == 1 and "damaged shard" in again.repairs[0]
    assert verify_space(_space(tiny, tmp_path / "c")) == []


@pytest.mark.parametrize("damage", ["garbage", "truncate"])
def test_a_damaged_index_is_rebuilt_from_the_shards(tiny, folder, tmp_path, clean, damage):
    _embed(tiny, folder, tmp_path / "c")
    space = _space(tiny, tmp_path / "c")
    _drop_views(space)
    index = space.index_path
    with sqlite3.connect(index) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    for suffix in ("-wal", "-shm"):
        index.with_name(index.name + suffix).unlink(missing_ok=True)
    data = index.read_bytes()
    index.write_bytes(b"this is not a database" * 100 if damage == "garbage" else data[: len(data) // 2])
    again = _embed(tiny, folder, tmp_path / "c")
    np.testing.assert_array_equal(np.asarray(again.features), clean)
    assert again.computed == 0  # every feature recovered from the shard sidecars
    assert any("rebuilt from" in line for line in again.repairs)


@pytest.mark.parametrize("damage", ["truncate-array", "garbage-sidecar", "missing-sidecar"])
def test_a_damaged_view_is_deleted_and_rebuilt(tiny, folder, tmp_path, clean, damage):
    _embed(tiny, folder, tmp_path / "c")
    view = next((_space(tiny, tmp_path / "c").dir / "views").glob("*.npy"))
    if damage == "truncate-array":
        view.write_bytes(view.read_bytes()[:200])
    elif damage == "garbage-sidecar":
        view.with_suffix(".json").write_text("{not json")
    else:
        view.with_suffix(".json").unlink()
    again = _embed(tiny, folder, tmp_path / "c")
    np.testing.assert_array_equal(np.asarray(again.features), clean)
    assert again.computed == 0 and len(again.repairs) == 1 and "damaged view" in again.repairs[0]


def test_verify_finds_a_flipped_byte_and_repair_fixes_it(tiny, folder, tmp_path, clean, monkeypatch):
    monkeypatch.setattr("cliplab.features.embed.SHARD_ITEMS", 32)
    _embed(tiny, folder, tmp_path / "c")
    space = _space(tiny, tmp_path / "c")
    victim = _shards(space)[0]
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0xFF  # same size, different content: only the checksum can tell
    victim.write_bytes(bytes(data))
    problems = verify_space(space)
    assert [(p.kind, p.name) for p in problems] == [("shard", victim.name)] and "checksum" in problems[0].detail
    repair_space(space, problems)
    _drop_views(space)
    assert verify_space(space) == []
    again = _embed(tiny, folder, tmp_path / "c")
    np.testing.assert_array_equal(np.asarray(again.features), clean)


def test_cache_command_on_a_garbage_index_lists_verifies_and_repairs(tiny, folder, tmp_path):
    _embed(tiny, folder, tmp_path / "c")
    space = _space(tiny, tmp_path / "c")
    for suffix in ("-wal", "-shm"):
        space.index_path.with_name(space.index_path.name + suffix).unlink(missing_ok=True)
    space.index_path.write_bytes(b"\x00garbage" * 64)
    runner = CliRunner()
    listing = runner.invoke(app, ["cache", "--cache-dir", str(tmp_path / "c")])
    assert listing.exit_code == 0 and "damaged index" in listing.output and "Traceback" not in listing.output
    verify = runner.invoke(app, ["cache", "--cache-dir", str(tmp_path / "c"), "--verify"])
    assert verify.exit_code == 1 and "damaged index" in verify.output
    fixed = runner.invoke(app, ["cache", "--cache-dir", str(tmp_path / "c"), "--repair"])
    assert fixed.exit_code == 0 and "repaired:" in fixed.output
    assert runner.invoke(app, ["cache", "--cache-dir", str(tmp_path / "c"), "--verify"]).exit_code == 0


def test_a_cache_that_cannot_be_written_is_one_clear_error(tiny, folder, tmp_path, monkeypatch):
    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("pathlib.Path.mkdir", refuse)
    with pytest.raises(CacheError, match="not writable.*--cache-dir"):
        _embed(tiny, folder, tmp_path / "ro")
    result = CliRunner().invoke(app, ["embed", str(tmp_path / "imgs"), "--model", "tiny", "-q",
                                      "--cache-dir", str(tmp_path / "ro")])
    assert result.exit_code == 2 and "not writable" in result.output and "Traceback" not in result.output
