"""The server fixtures' readiness wait (tests/_server.py): a slow start is waited for, a dead server fails at once
with its stderr, a live but silent one fails at the deadline."""

from __future__ import annotations

import socket
import sys
import time

import pytest

from _server import serving


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _slow_server(port: int, delay: float) -> list[str]:
    code = (f"import time, http.server as h; time.sleep({delay}); "
            f"h.ThreadingHTTPServer(('127.0.0.1', {port}), h.SimpleHTTPRequestHandler).serve_forever()")
    return [sys.executable, "-c", code]


def test_a_slow_start_is_waited_for(tmp_path):
    port = _port()
    with serving(_slow_server(port, 2.0), f"http://127.0.0.1:{port}/", tmp_path, deadline=60) as waited:
        assert waited >= 1.5


def test_a_dead_server_fails_at_once_with_its_stderr(tmp_path):
    command = [sys.executable, "-c", "import sys; sys.stderr.write('error: no index at /nowhere'); sys.exit(3)"]
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception) as failed, serving(command, f"http://127.0.0.1:{_port()}/", tmp_path,
                                                                 deadline=120):
        pass
    assert time.monotonic() - start < 30  # not the deadline
    assert "exited with 3" in str(failed.value) and "error: no index at /nowhere" in str(failed.value)


def test_a_silent_server_fails_at_the_deadline(tmp_path):
    command = [sys.executable, "-c", "import sys, time; sys.stderr.write('loading...'); sys.stderr.flush(); "
               "time.sleep(60)"]
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception) as failed, serving(command, f"http://127.0.0.1:{_port()}/", tmp_path,
                                                                 deadline=2):
        pass
    assert 2 <= time.monotonic() - start < 30
    assert "did not answer" in str(failed.value) and "loading..." in str(failed.value)
