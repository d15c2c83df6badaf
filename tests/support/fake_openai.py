"""A small OpenAI-compatible server (standard library): the stand-in for a real engine.

``FakeOpenAI(...)`` serves, on a free port (or ``port``), ``POST /v1/chat/completions``
and ``POST /v1/completions`` (streamed as SSE, or one JSON answer) and ``GET /v1/models``
listing ``models``. tests/test_engines.py runs the same tests against it and against
llama.cpp's llama-server and llama-cpp-python's server, so each behaviour below is one a
real engine has:

- The answer is ``answer`` split into words, or (``answer=None``) ``max_tokens`` words, as
  the tiny test model gives: it runs to ``max_tokens`` (finish reason "length") unless the
  prompt ends with the word "bye" (then nothing, finish reason "stop"), and never past the
  context (``context`` tokens; the prompt counts one token a word, plus one).
- ``stream_options.include_usage``: the usage in a last chunk with no choices; ``timings``
  (llama-server's prompt/predicted counts and milliseconds) in the last chunk.
- ``slots`` requests run at once, the others wait for a slot; a client that leaves while
  waiting is dropped. ``interrupt``: llama-cpp-python's default, a running stream ends with
  a bare ``[DONE]`` (no finish reason) as soon as another request arrives.
- Errors as the engines send them: a prompt over the context is HTTP 400 with llama-server's
  message; a wrong Bearer key is 401; ``strict_models`` (Ollama, OpenAI) answers 404 for a
  model it does not serve (llama-server and llama-cpp-python accept any name).
- ``kill()`` stops it as a crash would: open connections are cut, new ones refused.

Fault modes (``mode``): ``ok``; ``slow`` (a pause between tokens); ``http500``; ``drop``
(closes the connection mid-stream); ``error_event`` (an ``{"error": …}`` event mid-stream).
Every request is recorded in ``requests``.
"""

from __future__ import annotations

import json
import re
import select
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

STOP_WORD = "bye"
_WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog")


class FakeOpenAI:
    def __init__(self, *, mode: str = "ok", answer: str | None = "Hello from the server.", delay_ms: float = 1,
                 api_key: str | None = None, models: tuple[str, ...] = ("llama3.2:1b",), slots: int = 4,
                 context: int = 4096, interrupt: bool = False, strict_models: bool = False, timings: bool = False,
                 prefill_ms: float = 0.0, port: int = 0, interrupt_hold_s: float = 0.0):
        self.mode = mode
        self.models = models
        self.answer = answer
        self.delay_s = delay_ms / 1000
        self.prefill_s = prefill_ms / 1000
        self.api_key = api_key
        self.context = context
        self.interrupt = interrupt
        # With interrupt: the first stream, once begun, waits (up to this long) for another
        # request to arrive, as a real engine is still busy with it when the next one comes.
        self.interrupt_hold_s = interrupt_hold_s
        self._arrival = threading.Condition()
        self._first_answer: int | None = None  # the arrival number of the first completion
        self.strict_models = strict_models
        self.timings = timings
        self.requests: list[dict[str, Any]] = []
        self.arrivals = 0
        self._slots = threading.Semaphore(slots)
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                with outer._lock:
                    outer._open.add(self.connection)

            def finish(self) -> None:
                with outer._lock:
                    outer._open.discard(self.connection)
                try:
                    super().finish()
                except OSError:
                    pass  # the client (or kill()) cut the connection

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization")})
                outer.arrived()
                if self.path != "/v1/models":
                    return self._plain(404, {"error": "not found"})
                if not self._authorised():
                    return None
                listing = {"object": "list", "data": [{"id": m, "object": "model"} for m in outer.models]}
                return self._plain(200, listing)

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                outer.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                self.arrival = outer.arrived(answering=True)  # what a later request interrupts (interrupt)
                chat = self.path == "/v1/chat/completions"
                if not chat and self.path != "/v1/completions":
                    return self._plain(404, {"error": "not found"})
                if not self._authorised():
                    return None
                if outer.mode == "http500":
                    return self._plain(500, {"error": {"message": "model failed to load"}})
                model = body.get("model")
                if outer.strict_models and model not in outer.models:
                    return self._plain(404, {"error": {"message": f"model '{model}' not found",
                                                       "type": "invalid_request_error", "code": "model_not_found"}})
                prompt = ("\n".join(str(m.get("content", "")) for m in body.get("messages", []))
                          if chat else str(body.get("prompt", "")))
                prompt_tokens = 1 + len(prompt.split())
                if prompt_tokens >= outer.context:
                    message = (f"request ({prompt_tokens} tokens) exceeds the available context size "
                               f"({outer.context} tokens), try increasing it")
                    return self._plain(400, {"error": {"code": 400, "type": "exceed_context_size_error",
                                                       "n_prompt_tokens": prompt_tokens, "n_ctx": outer.context,
                                                       "message": message}})
                if not self._wait_for_slot():
                    return None
                try:
                    self._answer(body, chat, prompt, prompt_tokens)
                finally:
                    outer._slots.release()
                return None

            def _authorised(self) -> bool:
                if outer.api_key and self.headers.get("Authorization") != f"Bearer {outer.api_key}":
                    self._plain(401, {"error": {"code": 401, "message": "Invalid API Key",
                                                "type": "authentication_error"}})
                    return False
                return True

            def _wait_for_slot(self) -> bool:
                """A free slot, or False once the client has left while it waited."""
                while not outer._slots.acquire(timeout=0.02):
                    if _gone(self.connection):
                        return False
                return True

            def _answer(self, body: dict[str, Any], chat: bool, prompt: str, prompt_tokens: int) -> None:
                max_tokens = min(int(body.get("max_tokens") or 10**6), outer.context - prompt_tokens)
                if prompt.split()[-1:] == [STOP_WORD]:
                    words: list[str] = []
                elif outer.answer is not None:
                    words = re.findall(r"\s*\S+", outer.answer)
                else:
                    words = [f" {_WORDS[i % len(_WORDS)]}" for i in range(max_tokens + 1)]  # never done early
                finish = "length" if len(words) > max_tokens else "stop"
                tokens = words[:max_tokens]
                kind = "chat.completion" if chat else "text_completion"
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(tokens),
                         "total_tokens": prompt_tokens + len(tokens)}
                if not body.get("stream"):
                    choice = ({"message": {"role": "assistant", "content": "".join(tokens)}} if chat
                              else {"text": "".join(tokens)})
                    return self._plain(200, {"id": "c1", "object": kind, "model": body.get("model"),
                                             "choices": [{"index": 0, **choice, "finish_reason": finish}],
                                             "usage": usage})
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                # Counted when the request came in, not when its stream starts: two requests
                # that arrive together still interrupt the earlier one.
                arrived = self.arrival
                started = time.monotonic()
                if outer.prefill_s:
                    time.sleep(outer.prefill_s)  # a stand-in for the engine's work on the prompt
                prompt_ms = (time.monotonic() - started) * 1000
                for i, token in enumerate(tokens):
                    if outer.mode in ("slow", "ok") and outer.delay_s:
                        time.sleep(outer.delay_s)  # a stand-in server simulating per-token work
                    if outer.interrupt and i == 1 and outer.interrupt_hold_s:
                        with outer._arrival:
                            hold, outer.interrupt_hold_s = outer.interrupt_hold_s, 0.0  # the first stream only
                            # The first request's stream: a later one that gets here first (the
                            # first was cut off at its first token) would wait out the hold for
                            # a request that never comes.
                            if arrived == outer._first_answer:
                                outer._arrival.wait_for(lambda: outer.arrivals != arrived, hold)
                    if outer.interrupt and outer.arrivals != arrived:
                        self.wfile.write(b"data: [DONE]\n\n")  # llama-cpp-python's interrupt_requests
                        self.wfile.flush()
                        return None
                    if outer.mode == "drop" and i == len(tokens) // 2:
                        self.wfile.flush()
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return None
                    if outer.mode == "error_event" and i == len(tokens) // 2:
                        self._event({"error": {"message": "out of memory"}})
                        return None
                    piece = {"delta": {"content": token}} if chat else {"text": token}
                    self._event({"id": "c1", "object": f"{kind}.chunk" if chat else kind,
                                 "choices": [{"index": 0, **piece, "finish_reason": None}]})
                last: dict[str, Any] = {"id": "c1", "object": f"{kind}.chunk" if chat else kind,
                                        "choices": [{"index": 0, **({"delta": {}} if chat else {"text": ""}),
                                                     "finish_reason": finish}]}
                chunks = [last]
                options = body.get("stream_options")
                if isinstance(options, dict) and options.get("include_usage") is True:
                    chunks.append({"id": "c1", "object": last["object"], "choices": [], "usage": usage})
                if outer.timings:
                    chunks[-1]["timings"] = {"cache_n": 0, "prompt_n": prompt_tokens, "prompt_ms": prompt_ms,
                                             "predicted_n": len(tokens),
                                             "predicted_ms": (time.monotonic() - started) * 1000 - prompt_ms}
                for chunk in chunks:
                    self._event(chunk)
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
                return None

            def _event(self, obj: dict[str, Any]) -> None:
                self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
                self.wfile.flush()

            def _plain(self, code: int, obj: dict[str, Any]) -> None:
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = _Server(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True, name="fake-openai")
        self._closed = False

    def kill(self) -> None:
        """Stop as a crashed engine does: cut every open connection, refuse new ones."""
        if self._closed:
            return
        self._closed = True
        self.server.shutdown()
        self.server.server_close()
        with self._lock:
            for conn in list(self._open):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def arrived(self, answering: bool = False) -> int:
        """Count a request, and wake a stream holding for one (interrupt_hold_s); its number.
        ``answering``: a completion (not a model list)."""
        with self._arrival:
            self.arrivals += 1
            if answering and self._first_answer is None:
                self._first_answer = self.arrivals
            self._arrival.notify_all()
            return self.arrivals

    def __enter__(self) -> FakeOpenAI:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._closed:
            self._closed = True
            self.server.shutdown()
            self.server.server_close()


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # a client that left mid-answer is no news
            super().handle_error(request, client_address)


def _gone(conn: socket.socket) -> bool:
    """Whether the client closed its end (readable, and nothing to read)."""
    try:
        readable, _, _ = select.select([conn], [], [], 0)
        return bool(readable) and conn.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True
