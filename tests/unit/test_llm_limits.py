"""LLM requests have a deadline, a run has a time budget, and hostile JSON is one line (issue 21, item 11)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from _llm_stub import Stub
from cliplab.errors import LLMError
from cliplab.llm import OpenAICompatible, Replay, ask_each

ANSWER = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": "a slow answer"},
                                  "finish_reason": "stop"}]}).encode()


class _Trickle:
    """Sends the headers at once, then the body one byte every ``gap`` seconds (each gap below the timeout)."""

    def __init__(self, gap: float):
        trickle = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                self.rfile.read(int(self.headers["Content-Length"]))
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(ANSWER)))
                    self.end_headers()
                    for byte in ANSWER:
                        if trickle.stop.is_set():
                            return
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(gap)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        self.stop = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


def test_a_server_trickling_bytes_is_cut_off_at_the_deadline(tmp_path):
    gap = 0.1  # the whole answer would take len(ANSWER) * 0.1 s, about 15 s; no single read waits 1 s
    with _Trickle(gap) as server:
        llm = OpenAICompatible(base_url=server.url, model="m", timeout=1.0, attempts=1, cache=False)
        started = time.monotonic()
        with pytest.raises(LLMError) as caught:
            llm.complete("hello")
        elapsed = time.monotonic() - started
    assert elapsed < 3.0, elapsed
    assert "within 1 s" in str(caught.value) and "\n" not in str(caught.value)


def test_a_run_stops_when_its_time_budget_is_spent(tmp_path):
    with Stub(lambda body, n: (503, "busy", 0.3)) as stub:
        llm = OpenAICompatible(base_url=stub.url, model="m", timeout=5.0, attempts=3, backoff=0.0, cache=False,
                               budget=1.0)
        started = time.monotonic()
        answers, failures = ask_each(llm, {f"k{i}": f"prompt {i}" for i in range(20)}, json=False)
        elapsed = time.monotonic() - started
    assert answers == {} and len(failures) == 20
    assert elapsed < 2.5, elapsed  # 20 keys x 3 attempts x 0.3 s would be 18 s
    assert stub.count <= 5
    assert any("budget of 1 s" in reason for reason in failures.values())
    assert llm.time_left() == 0.0


def test_the_budget_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("CLIPLAB_LLM_BUDGET", "12.5")
    assert OpenAICompatible(base_url="http://127.0.0.1:9/v1", model="m", cache=False).budget == 12.5
    monkeypatch.setenv("CLIPLAB_LLM_BUDGET", "soon")
    with pytest.raises(LLMError, match="CLIPLAB_LLM_BUDGET"):
        OpenAICompatible(base_url="http://127.0.0.1:9/v1", model="m", cache=False)


def test_a_deeply_nested_replay_file_is_one_line(tmp_path):
    path = tmp_path / "replay.json"
    path.write_text('{"prompt": ' + "[" * 200_000 + "]" * 200_000 + "}")
    with pytest.raises(LLMError) as caught:
        Replay(path)
    assert "nested too deeply" in str(caught.value) and "\n" not in str(caught.value)


def test_a_deeply_nested_answer_is_a_malformed_answer(tmp_path):
    nested = "[" * 200_000 + "]" * 200_000
    with Stub(lambda body, n: (200, nested, 0)) as stub:
        llm = OpenAICompatible(base_url=stub.url, model="m", attempts=2, backoff=0.0, cache=False)
        with pytest.raises(LLMError) as caught:
            llm.complete("hello", json_schema=True)
    assert "malformed JSON" in str(caught.value) and "\n" not in str(caught.value)
