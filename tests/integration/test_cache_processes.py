"""Kill -9 during embedding, and two processes filling one cache, on real CIFAR-10 images.

Nothing here waits on a sleep or a clock: the child processes stop at points they report themselves.
The kill test's child stops inside the dataset when it is asked for item ``K`` (it prints ``REACHED`` and
blocks), so what the cache holds when it is killed follows from the batch and shard sizes alone. The
two-process test's children meet at a barrier before either can store anything, so both do part of the
work. (Timeouts below are only safety nets for a hung child; nothing depends on them being reached.)
"""

import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N = 1500  # CIFAR-10 test images used by every run here
BATCH = 64
STOP_AT = 1300  # the kill test's child blocks when asked for this item (one 1024-item shard flushed by then)
HANG_GUARD_S = 300  # only reached if a child hangs: then the test fails instead of waiting forever

# argv: data root, cache dir, n, result .npy, mode ("plain" | "stop" | "barrier"), mode argument.
CHILD = """
import os, sys, threading, time
import numpy as np
from cliplab.data import load_dataset
from cliplab.data.base import ArrayImageDataset
from cliplab.features import embed_images
from cliplab.models import load_model

root, cache, n, result, mode, arg = sys.argv[1:7]
n, batch = int(n), int(os.environ["BATCH"])

class Hooked(ArrayImageDataset):
    def load_image(self, index):
        if mode == "stop" and index == int(arg):
            print("REACHED", flush=True)
            threading.Event().wait()  # until SIGKILL
        if mode == "barrier" and index == batch:
            # First image of the second batch: this process has checked batch 0 against the cache and
            # encoded it, and neither process can have stored anything (the first flush comes after
            # 1024 items), so both processes encode batch 0 whatever the scheduling.
            open(os.path.join(arg, str(os.getpid())), "w").close()
            deadline = time.monotonic() + float(os.environ["HANG_GUARD_S"])
            while len(os.listdir(arg)) < 2:
                if time.monotonic() > deadline:
                    sys.exit("barrier: the other process never arrived")
                time.sleep(0.01)
        return super().load_image(index)

full = load_dataset("cifar10", root=root)
data = Hooked(full.images[:n], full.labels[:n], full.class_names, full.source, "cifar10")
out = embed_images(load_model("tiny"), data, cache, batch_size=batch, num_workers=0, progress=False)
np.save(result, np.asarray(out.features))
print(out.computed, flush=True)
"""


def _start(data_root, cache: Path, result: Path, mode="plain", arg="") -> subprocess.Popen:
    env = {**os.environ, "BATCH": str(BATCH), "HANG_GUARD_S": str(HANG_GUARD_S)}
    with open(result.with_suffix(".stderr"), "w") as stderr:  # a file, not a pipe: a chatty child never blocks
        return subprocess.Popen(
            [sys.executable, "-c", CHILD, str(data_root), str(cache), str(N), str(result), mode, str(arg)],
            stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)


def _stderr(result: Path) -> str:
    return result.with_suffix(".stderr").read_text()[-3000:]


def _finish(proc: subprocess.Popen, result: Path) -> int:
    """Wait for a child; return the ``computed`` it printed."""
    out, _ = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == 0, _stderr(result)
    return int(out.split()[-1])


def _wait_for_line(proc: subprocess.Popen, expected: str, result: Path) -> None:
    """Block until the child prints ``expected`` (fails if it exits first)."""
    lines: queue.Queue = queue.Queue()

    def read():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    while True:
        line = lines.get(timeout=HANG_GUARD_S)
        assert line is not None, f"child exited ({proc.wait()}) before printing {expected!r}: {_stderr(result)}"
        if line.strip() == expected:
            return


def _space(cache: Path) -> Path:
    spaces = [p for p in cache.iterdir() if p.name.startswith("img-")]
    assert len(spaces) == 1, spaces
    return spaces[0]


def _stored(cache: Path) -> int:
    with sqlite3.connect(_space(cache) / "index.sqlite") as db:
        return db.execute("SELECT COUNT(*) FROM items").fetchone()[0]


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory):
    """Features of an uninterrupted single run, to compare every other run with: a function that waits for
    them (the run is started at once and overlaps the first test's children)."""
    folder = tmp_path_factory.mktemp("reference")
    proc = _start(data_root, folder / "cache", folder / "result.npy")
    features = []

    def get() -> np.ndarray:
        if not features:
            assert _finish(proc, folder / "result.npy") == N
            features.append(np.load(folder / "result.npy"))
        return features[0]

    yield get
    proc.kill()
    proc.wait(timeout=HANG_GUARD_S)


def test_kill_9_then_resume_computes_only_the_missing_items(tmp_path, data_root, reference):
    from cliplab.features.embed import SHARD_ITEMS

    cache = tmp_path / "cache"
    victim = _start(data_root, cache, tmp_path / "killed.npy", "stop", STOP_AT)
    try:
        _wait_for_line(victim, "REACHED", tmp_path / "killed.npy")
    finally:
        victim.kill()  # SIGKILL
        victim.wait(timeout=HANG_GUARD_S)
    assert victim.returncode == -signal.SIGKILL

    # num_workers=0: the child asks for item STOP_AT only once every earlier batch has been encoded and
    # every full shard among them flushed; what it held in memory beyond the last flush is lost.
    shard = BATCH * max(1, SHARD_ITEMS // BATCH)
    flushed = (STOP_AT // BATCH * BATCH) // shard * shard
    assert 0 < flushed < STOP_AT < N  # the scenario stays meaningful: 1024 with 1024-item shards
    assert _stored(cache) == flushed
    assert not (tmp_path / "killed.npy").exists()

    resumed = _start(data_root, cache, tmp_path / "resumed.npy")
    assert _finish(resumed, tmp_path / "resumed.npy") == N - flushed  # only the missing items
    assert _stored(cache) == N
    np.testing.assert_array_equal(np.load(tmp_path / "resumed.npy"), reference())


def test_two_processes_share_the_work_of_one_cache_without_corruption(tmp_path, data_root, reference):
    from cliplab.data import load_dataset
    from cliplab.data.base import ArrayImageDataset
    from cliplab.features import embed_images
    from cliplab.models import load_model

    cache, barrier = tmp_path / "cache", tmp_path / "barrier"
    barrier.mkdir()
    results = [tmp_path / "first.npy", tmp_path / "second.npy"]
    procs = [_start(data_root, cache, result, "barrier", barrier) for result in results]
    try:
        computed = [_finish(proc, result) for proc, result in zip(procs, results)]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=HANG_GUARD_S)
    assert len(os.listdir(barrier)) == 2
    # ``computed`` = items this process encoded itself; each batch is encoded by at least one of them.
    assert computed[0] > 0 and computed[1] > 0, computed
    assert sum(computed) >= N, computed
    for result in results:
        np.testing.assert_array_equal(np.load(result), reference())

    space = _space(cache)
    full = load_dataset("cifar10", root=data_root)
    expected = ArrayImageDataset(full.images[:N], full.labels[:N], full.class_names, full.source, "cifar10")
    with sqlite3.connect(space / "index.sqlite") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT COUNT(DISTINCT identity) FROM items").fetchone()[0] == len(
            set(expected.identities()))

    again = embed_images(load_model("tiny"), expected, cache, batch_size=BATCH, num_workers=0, progress=False)
    assert again.computed == 0  # all cached: nothing encoded again
    np.testing.assert_array_equal(np.asarray(again.features), reference())
    assert not list(space.rglob("*.tmp"))
