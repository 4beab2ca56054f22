"""Kill -9 during embedding and two processes filling one cache, on real CIFAR-10 images."""

import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHILD = """
import sys, time
import numpy as np
from cliplab.data import Subset, load_dataset
from cliplab.data.base import ArrayImageDataset
from cliplab.features import embed_images
from cliplab.models import load_model

class Slow(ArrayImageDataset):
    def load_image(self, index):
        time.sleep(float(sys.argv[3]))
        return super().load_image(index)

full = load_dataset("cifar10", root=sys.argv[1])
data = Slow(full.images[:N], full.labels[:N], full.class_names, full.source, "cifar10")
out = embed_images(load_model("tiny"), data, sys.argv[2], batch_size=64, num_workers=0, progress=False)
np.save(sys.argv[2] + "/result.npy", np.asarray(out.features))
print(out.computed)
"""


def _run(data_root, cache, n, delay, **popen):
    script = CHILD.replace("N", str(n))
    return subprocess.Popen([sys.executable, "-c", script, str(data_root), str(cache), str(delay)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _registered(cache):
    spaces = [p for p in cache.iterdir() if p.name.startswith("img-")] if cache.exists() else []
    if not spaces or not (spaces[0] / "index.sqlite").exists():
        return 0
    try:
        with sqlite3.connect(spaces[0] / "index.sqlite", timeout=5) as db:
            return db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def test_kill_9_then_resume_gives_identical_features(tmp_path, data_root):
    n = 4096
    reference = _run(data_root, tmp_path / "ref", n, 0.0)
    assert reference.wait(timeout=300) == 0, reference.stderr.read()

    victim = _run(data_root, tmp_path / "killed", n, 0.002)
    deadline = time.time() + 120
    while _registered(tmp_path / "killed") < 1024 and time.time() < deadline:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done_before = _registered(tmp_path / "killed")
    assert 0 < done_before < n

    resumed = _run(data_root, tmp_path / "killed", n, 0.0)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert int(out.strip()) == n - done_before  # only the missing items were computed
    np.testing.assert_array_equal(np.load(tmp_path / "killed" / "result.npy"), np.load(tmp_path / "ref" / "result.npy"))


def test_two_processes_fill_one_cache_without_corruption(tmp_path, data_root):
    n = 3000
    reference = _run(data_root, tmp_path / "ref", n, 0.0)
    assert reference.wait(timeout=300) == 0, reference.stderr.read()
    shared = tmp_path / "shared"
    first, second = _run(data_root, shared, n, 0.0005), _run(data_root, shared, n, 0.0005)
    for proc in (first, second):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    space = next(p for p in shared.iterdir() if p.name.startswith("img-"))
    with sqlite3.connect(space / "index.sqlite") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT COUNT(DISTINCT identity) FROM items").fetchone()[0] == len(
            set(_identities(data_root, n)))
    again = _run(data_root, shared, n, 0.0)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err and int(out.strip()) == 0
    assert int(out.strip()) == 0
    np.testing.assert_array_equal(np.load(shared / "result.npy"), np.load(tmp_path / "ref" / "result.npy"))
    assert not list(space.rglob("*.tmp"))


def _identities(data_root, n):
    from cliplab.data import load_dataset

    data = load_dataset("cifar10", root=data_root)
    return [data.identity(i) for i in range(n)]


def test_environment_has_no_stray_cache_env():
    assert "CLIPLAB_CACHE" in os.environ  # set per test by conftest: tests never touch ~/.cache
