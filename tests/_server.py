"""Start a server process for a test and wait until it answers, tolerating a slow start but not a dead server.

``serving(command, url, log_dir)`` starts ``command`` (stdout and stderr to separate files in ``log_dir``), polls
``url`` until it answers 200, yields, then stops the process. The wait has one overall deadline
(``CLIPLAB_TEST_SERVER_DEADLINE`` seconds, default 300: importing torch and loading a model can take minutes on a
loaded 2-core machine) but fails at once, with the server's stderr, if the process exits before answering.
Import it as ``from _server import serving`` (tests/ is on sys.path through tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

DEFAULT_DEADLINE_S = 300.0
POLL_S = 0.25
REQUEST_TIMEOUT_S = 10.0  # one probe; a loaded machine may take seconds to answer the first request


def deadline_s() -> float:
    return float(os.environ.get("CLIPLAB_TEST_SERVER_DEADLINE", DEFAULT_DEADLINE_S))


def _tail(path: Path, limit: int = 4000) -> str:
    text = path.read_text(errors="replace") if path.is_file() else ""
    return text[-limit:] or "(nothing)"


def wait_until_ready(process: subprocess.Popen, url: str, stderr: Path, deadline: float | None = None) -> float:
    """Poll ``url`` until it answers 200; seconds waited. Fails at once if ``process`` has exited (with its
    stderr), or when the overall ``deadline`` (seconds, default :func:`deadline_s`) has passed."""
    import httpx

    deadline = deadline_s() if deadline is None else deadline
    start = time.monotonic()
    while True:
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode} before answering {url}; its stderr:\n"
                        f"{_tail(stderr)}", pytrace=False)
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=REQUEST_TIMEOUT_S).status_code == 200:
                return time.monotonic() - start
        waited = time.monotonic() - start
        if waited > deadline:
            pytest.fail(f"the server did not answer {url} within {deadline:.0f} s (still running; raise "
                        f"CLIPLAB_TEST_SERVER_DEADLINE on a slow machine); its stderr:\n{_tail(stderr)}",
                        pytrace=False)
        time.sleep(POLL_S)


@contextlib.contextmanager
def serving(command: Sequence[str], url: str, log_dir: Path, deadline: float | None = None) -> Iterator[float]:
    """Run ``command`` until the block ends; yields the seconds the server took to answer ``url``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    stdout, stderr = log_dir / "server.out", log_dir / "server.err"
    with stdout.open("w") as out, stderr.open("w") as err:
        process = subprocess.Popen(list(command), stdout=out, stderr=err)
    try:
        yield wait_until_ready(process, url, stderr, deadline)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
