"""A small OpenAI-compatible server (standard library) that streams chat completions.

``FakeOpenAI(mode=...)`` serves ``POST /v1/chat/completions`` with SSE on a free port,
and ``GET /v1/models`` listing ``models``.
Modes: ``ok``; ``slow`` (a pause between tokens); ``http500``; ``drop`` (closes the
connection mid-stream); ``error_event`` (an ``{"error": …}`` event mid-stream). Every
request is recorded in ``requests``.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeOpenAI:
    def __init__(self, *, mode: str = "ok", answer: str = "Hello from the server.", delay_ms: float = 1,
                 api_key: str | None = None, models: tuple[str, ...] = ("llama3.2:1b",)):
        self.mode = mode
        self.models = models
        self.answer = answer
        self.delay_s = delay_ms / 1000
        self.api_key = api_key
        self.requests: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization")})
                if self.path != "/v1/models":
                    return self._plain(404, b'{"error": "not found"}')
                if outer.api_key and self.headers.get("Authorization") != f"Bearer {outer.api_key}":
                    return self._plain(401, b'{"error": {"message": "invalid api key"}}')
                listing = {"object": "list", "data": [{"id": m, "object": "model"} for m in outer.models]}
                self._plain(200, json.dumps(listing).encode())

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                outer.requests.append({"path": self.path, "body": body,
                                       "auth": self.headers.get("Authorization")})
                if self.path != "/v1/chat/completions":
                    return self._plain(404, b'{"error": "not found"}')
                if outer.api_key and self.headers.get("Authorization") != f"Bearer {outer.api_key}":
                    return self._plain(401, b'{"error": {"message": "invalid api key"}}')
                if outer.mode == "http500":
                    return self._plain(500, b'{"error": {"message": "model failed to load"}}')
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                tokens = re.findall(r"\s*\S+", outer.answer)[: body.get("max_tokens", 10**6)]
                for i, token in enumerate(tokens):
                    if outer.mode in ("slow", "ok") and outer.delay_s:
                        time.sleep(outer.delay_s)  # a stand-in server simulating per-token work
                    if outer.mode == "drop" and i == len(tokens) // 2:
                        self.wfile.flush()
                        self.connection.shutdown(2)
                        return
                    if outer.mode == "error_event" and i == len(tokens) // 2:
                        self._event({"error": {"message": "out of memory"}})
                        return
                    self._event({"id": "c1", "object": "chat.completion.chunk",
                                 "choices": [{"index": 0, "delta": {"content": token}, "finish_reason": None}]})
                self._event({"id": "c1", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                             "usage": {"prompt_tokens": 7, "completion_tokens": len(tokens)}})
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()

            def _event(self, obj: dict[str, Any]) -> None:
                self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
                self.wfile.flush()

            def _plain(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True, name="fake-openai")

    def __enter__(self) -> FakeOpenAI:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
