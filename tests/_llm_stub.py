"""A local server speaking OpenAI chat completions, for tests of the HTTP LLM backend and what uses it.

``Stub(script)`` where ``script(body, n)``
returns ``(status, content or None, delay)`` for the n-th request; ``stub.count`` counts requests.
Import it as ``from _llm_stub import Stub`` (tests/ is on sys.path through tests/conftest.py).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Stub:
    """A chat-completions server whose answers come from ``script(body, n)`` -> (status, content|None, delay)."""

    def __init__(self, script):
        self.script = script
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.bodies.append(body)
                stub.headers.append(dict(self.headers))
                status, content, delay = stub.script(body, len(stub.bodies))
                if delay:
                    time.sleep(delay)
                if self.path != "/v1/chat/completions":
                    status, content = 404, "not found"
                if status == 200:
                    message = {"role": "assistant", "content": content}
                    payload = {"id": "x", "object": "chat.completion", "model": body["model"],
                               "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}
                    data = json.dumps(payload).encode()
                else:
                    data = json.dumps({"error": {"message": content}}).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    @property
    def count(self) -> int:
        return len(self.bodies)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
