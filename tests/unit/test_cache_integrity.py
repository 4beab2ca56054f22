"""No corrupted feature is served, and a read-only cache can be read (issue 21, items 6 and 12).

A flipped byte in a shard or in a stored view, a view header claiming another width, and a view gathered
from a shard that was later dropped are each caught on the next read: the rows are recomputed or
re-gathered, never served.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cliplab.data import image_folder
from cliplab.features import embed_images, image_cache
from cliplab.features.cache_check import repair_space, verify_space

N_PER_CLASS = 24


def _images(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / "imgs" / cls).mkdir(parents=True)
        for i in range(N_PER_CLASS):
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / "imgs" / cls / f"{i}.png")
    return root / "imgs"


@pytest.fixture()
def folder(tmp_path):
    return image_folder(_images(tmp_path))


@pytest.fixture(autouse=True)
def small_shards(monkeypatch):
    monkeypatch.setattr("cliplab.features.embed.SHARD_ITEMS", 16)


def _embed(tiny, data, cache):
    return embed_images(tiny, data, cache, batch_size=16, num_workers=0, progress=False)


@pytest.fixture()
def clean(tiny, folder, tmp_path):
    return np.array(_embed(tiny, folder, tmp_path / "clean").features)


def _flip(path: Path, offset_from_end: int = 9) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x40  # same size, one float changed: only a checksum can tell
    path.write_bytes(bytes(data))


def _views(space) -> list[Path]:
    return sorted((space.dir / "views").glob("*.npy"))


def _shards(space) -> list[Path]:
    return sorted((space.dir / "shards").glob("*.npy"))


def test_a_flipped_byte_in_a_shard_is_recomputed_not_served(tiny, folder, tmp_path, clean):
    _embed(tiny, folder, tmp_path / "c")
    space = image_cache(tiny, tmp_path / "c")
    for view in _views(space):  # make the next run read the shards
        view.unlink()
    victim = _shards(space)[1]
    rows = len(np.load(victim))
    _flip(victim)
    again = _embed(tiny, folder, tmp_path / "c")
    np.testing.assert_array_equal(np.asarray(again.features), clean)
    assert again.computed == rows
    assert any("checksum" in line for line in again.repairs)
    assert verify_space(image_cache(tiny, tmp_path / "c")) == []


def test_a_view_is_invalidated_with_the_shards_it_was_built_from(tiny, folder, tmp_path, clean):
    _embed(tiny, folder, tmp_path / "c")
    space = image_cache(tiny, tmp_path / "c")
    victim = _shards(space)[0]
    rows = len(np.load(victim))
    _flip(victim)
    repair_space(space, verify_space(space))  # cliplab cache --repair drops the shard
    assert _views(space) == []  # and with it the view gathered from it
    assert verify_space(space) == []
    again = _embed(tiny, folder, tmp_path / "c")
    np.testing.assert_array_equal(np.asarray(again.features), clean)
    assert again.computed == rows


def test_a_flipped_byte_in_a_view_is_never_served(tiny, folder, tmp_path, clean):
    _embed(tiny, folder, tmp_path / "c")
    space = image_cache(tiny, tmp_path / "c")
    (view,) = _views(space)
    _flip(view)
    assert [(p.kind, "checksum" in p.detail) for p in verify_space(space)] == [("view", True)]
    again = _embed(tiny, folder, tmp_path / "c")
    np.testing.assert_array_equal(np.asarray(again.features), clean)
    assert again.computed == 0 and any("damaged view" in line for line in again.repairs)


def test_a_view_header_claiming_another_width_is_refused(tiny, folder, tmp_path, clean):
    _embed(tiny, folder, tmp_path / "c")
    space = image_cache(tiny, tmp_path / "c")
    (view,) = _views(space)
    n = len(clean)
    np.save(view, np.load(view).reshape(-1)[: n * 32].reshape(n, 32))  # same rows, half the width
    assert [p.kind for p in verify_space(space)] == ["view"]
    again = _embed(tiny, folder, tmp_path / "c")
    assert again.features.shape == clean.shape
    np.testing.assert_array_equal(np.asarray(again.features), clean)
    assert again.computed == 0


READER = """
import sys
import numpy as np
from cliplab.data import image_folder
from cliplab.features import embed_images
from cliplab.models import load_model
tiny = load_model("tiny", device="cpu")
data = image_folder(sys.argv[1])
for cache in sys.argv[2:]:
    got = embed_images(tiny, data, cache, batch_size=16, num_workers=0, progress=False)
    assert got.computed == 0, got.computed
    np.save(sys.stdout.buffer, np.asarray(got.features))
"""


def _read_only(path: Path) -> None:
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            target = Path(root) / name
            target.chmod(target.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    path.chmod(0o555)


def _as_reader() -> list[str]:
    """A command prefix under which permission bits bind: root keeps its uid but loses the capabilities that
    override them (setpriv); anyone else needs nothing."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot make a folder read-only to this user")
    caps = "-dac_override,-dac_read_search,-fowner,-linux_immutable"
    return ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}"]


def test_a_read_only_cache_that_holds_everything_can_be_read(tiny, folder, tmp_path):
    expected = np.asarray(_embed(tiny, folder, tmp_path / "with-view").features)
    _embed(tiny, folder, tmp_path / "no-view")
    for view in (tmp_path / "no-view").rglob("views/*"):
        view.unlink()  # the reader must gather these rows in memory
    for cache in ("with-view", "no-view"):
        _read_only(tmp_path / cache)
    try:
        command = [*_as_reader(), sys.executable, "-c", READER, str(tmp_path / "imgs"), str(tmp_path / "with-view"),
                   str(tmp_path / "no-view")]
        result = subprocess.run(command, capture_output=True, timeout=300,
                                env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
        assert result.returncode == 0, result.stderr.decode()[-2000:]
        stream = io.BytesIO(result.stdout)
        for _ in range(2):
            np.testing.assert_array_equal(np.load(stream), expected)
        assert not list((tmp_path / "no-view").rglob("views/*"))  # nothing was written
        probe = [*_as_reader(), "sh", "-c", f"touch {tmp_path / 'no-view' / 'x'}"]
        assert subprocess.run(probe, capture_output=True, timeout=60).returncode != 0  # it really was read-only
    finally:
        for root, dirs, _ in os.walk(tmp_path):
            for name in dirs:
                (Path(root) / name).chmod(0o755)
