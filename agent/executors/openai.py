"""Any OpenAI-compatible server (llama.cpp's ``llama-server``, llama-cpp-python's server,
Ollama, vLLM), streamed.

Theory of operation.

- Request: ``POST {base_url}/chat/completions`` with ``"stream": true`` and
  ``stream_options.include_usage``, so the engine's own token counts arrive in a last
  chunk (a server that ignores the option still works: then its counts are estimated).
- Reading: server-sent events, ``data: {json}`` lines ended by ``data: [DONE]``. Every
  event goes into a ``StreamState``: the text pieces (``choices[0].delta.content``), the
  engine's ``finish_reason``, its ``usage`` and llama-server's ``timings``.
- Ending: an answer counts only when the engine said why it stopped. A ``[DONE]`` with no
  finish reason is a cut-off answer — llama-cpp-python's server ends a running stream like
  that whenever another request arrives, unless started with ``--interrupt_requests
  False`` — and fails with its partial text, never passes as a success. An HTTP error (a
  prompt over the context, an unknown model, a wrong key) fails with the engine's message.
- Cancel and time limit: a watcher thread shuts the socket down the moment the job is
  cancelled or out of time, so a read blocked on a silent engine (the request queued
  behind another client) returns at once and the engine sees its client leave.
- An engine that cannot be reached (connection refused, no route, HTTP 503 while it loads)
  is ``EngineUnavailable``: the node stops offering the mode until ``reachable()`` — a
  TCP connect, no request (some engines interrupt a running stream for any request) —
  says it is back, and the orchestrator passes the job to another device.
- Timings: with llama-server's ``timings``, ``prefill_ms`` is its ``prompt_ms`` and
  ``init_ms`` the rest of the wait for the first piece (connecting, waiting for a free
  slot in the engine): the service time the scheduler learns is the engine's work. Without
  them, ``prefill_ms`` is the time to the first piece.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from agent.config import OpenAIExecutorConfig
from agent.errors import Cancelled, EngineUnavailable, ExecutionTimeout, ExecutorError
from agent.executors import OnToken, Params, Result, estimate_tokens
from agent.messages import MAX_TOKENS, ChatMessage, Timings, ToolCall

log = logging.getLogger(__name__)

_BODY_TAIL = 300
_ERROR_BODY_MAX = 64 * 1024
_LINE_MAX = 4 * 1024 * 1024      # one SSE line; a longer one is not an engine talking
CONNECT_TIMEOUT_S = 5.0          # a server on the LAN that takes longer is not there
WATCH_POLL_S = 0.05              # how soon a cancel is noticed while the engine is silent
# check: how long to wait for GET /models from an engine that may be busy with a stream
# (llama-cpp-python answers it only between requests).
PROBE_TIMEOUT_S = 30.0
FINISH_REASONS = ("stop", "length", "tool_calls", "content_filter", "function_call")


class OpenAIExecutor:
    def __init__(self, cfg: OpenAIExecutorConfig, *, name: str):
        self.cfg = cfg
        self.name = f"{name}:openai"
        self.base = cfg.base_url.rstrip("/")
        self.url = self.base + "/chat/completions"
        self._split = urllib.parse.urlsplit(self.url)

    def check(self) -> str | None:
        try:
            self._api_key()
        except ExecutorError as exc:
            return exc.reason
        return None

    # ------------------------------------------------------------------ health
    def reachable(self, timeout_s: float = 2.0) -> bool:
        """Whether the server accepts a TCP connection (no request is sent)."""
        try:
            with socket.create_connection(self._address(), timeout=timeout_s):
                return True
        except OSError:
            return False

    def probe(self, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
        """Whether the server answers ``GET {base_url}/models`` and serves the configured
        model (``check`` only: a node does not need the server up to start). A refused
        connection is reported at once; a server that accepts but is busy (llama-cpp-python
        answers between requests only) is given ``timeout_s``."""
        problem = self.check()
        if problem is not None:
            return problem
        url = self.base + "/models"
        if not self.reachable(CONNECT_TIMEOUT_S):
            return f"cannot reach {url}: nothing accepts connections there (is the model server running?)"
        key = self._api_key()
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as resp:
                listing = json.loads(resp.read(1 << 20))
        except urllib.error.HTTPError as exc:
            with exc:  # it holds the connection
                message = engine_message(exc.read(_ERROR_BODY_MAX))
            return f"{url} answered HTTP {exc.code} {exc.reason}" + (f": {message}" if message else "")
        except TimeoutError:
            return f"{url} did not answer within {timeout_s:g} s (busy with a long answer?)"
        except (urllib.error.URLError, OSError) as exc:
            why = getattr(exc, "reason", exc)
            if isinstance(why, TimeoutError):
                return f"{url} did not answer within {timeout_s:g} s (busy with a long answer?)"
            return f"cannot reach {url}: {getattr(why, 'strerror', None) or why} (is the model server running?)"
        except ValueError:
            return f"{url} did not answer JSON"
        data = listing.get("data") if isinstance(listing, dict) else None
        served = {m.get("id") for m in data if isinstance(m, dict)} if isinstance(data, list) else set()
        if served and self.cfg.model and self.cfg.model not in served:
            return f"{url} does not serve model {self.cfg.model!r} (it serves: {', '.join(sorted(map(str, served)))})"
        return None

    def _api_key(self) -> str | None:
        if self.cfg.api_key_file:
            try:
                with open(self.cfg.api_key_file, encoding="utf-8") as fh:
                    return fh.read().strip()
            except OSError as exc:
                raise ExecutorError(self.name, f"cannot read api_key_file {self.cfg.api_key_file}: "
                                               f"{exc.strerror or exc}") from None
        if self.cfg.api_key_env:
            key = os.environ.get(self.cfg.api_key_env)
            if not key:
                raise ExecutorError(self.name, f"environment variable {self.cfg.api_key_env} is not set")
            return key
        return None

    def _address(self) -> tuple[str, int]:
        s = self._split
        return s.hostname or "127.0.0.1", s.port or (443 if s.scheme == "https" else 80)

    # ------------------------------------------------------------------ run
    def run(self, prompt: str, params: Params, on_token: OnToken,
            cancel: threading.Event | None = None) -> Result:
        return self.stream(self.request_body(prompt, params), params, on_token, cancel,
                           prompt_estimate=estimate_tokens(prompt))

    def request_body(self, prompt: str, params: Params) -> dict[str, Any]:
        """The JSON of one chat completion request for ``prompt`` (or the job's conversation),
        asking for the engine's token counts in the stream."""
        return {**request_body(self.cfg.model, prompt, params), "stream_options": {"include_usage": True}}

    def stream(self, body: dict[str, Any], params: Params, on_token: OnToken,
               cancel: threading.Event | None = None, *, prompt_estimate: int = 0) -> Result:
        """POST ``body`` (a streamed request), pass each piece to ``on_token``, and return
        the answer with the engine's finish reason, token counts and timings."""
        start = time.monotonic()
        limit_s = min(params.timeout_s, self.cfg.timeout_s)
        deadline = start + limit_s
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        key = self._api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        if cancel is not None and cancel.is_set():
            raise Cancelled(self.name, "cancelled before it started")
        state = StreamState(calls=ToolCallDeltas() if "tools" in body else None)
        conn = self._connection(min(CONNECT_TIMEOUT_S, limit_s))
        watch = _Watch(cancel, deadline)
        resp: http.client.HTTPResponse | None = None
        try:
            try:
                conn.connect()
            except OSError as exc:
                if isinstance(exc, TimeoutError) and time.monotonic() >= deadline:
                    raise ExecutionTimeout(self.name, limit_s) from None
                raise EngineUnavailable(self.name, f"cannot reach {self.url}: {_why(exc)}") from None
            assert conn.sock is not None
            conn.sock.settimeout(max(0.05, deadline - time.monotonic()))  # a backstop to the watch
            watch.start(conn.sock, self.name)
            try:
                conn.request("POST", self._path(), body=json.dumps(body).encode(), headers=headers)
                resp = conn.getresponse()
                if resp.status != 200:
                    raise self._http_error(resp)
                self._read_events(resp, state, on_token)
            except ExecutorError:
                raise
            except Exception as exc:  # OSError, HTTPException; an SSL socket shut down under a read
                if watch.why is None and not isinstance(exc, (OSError, http.client.HTTPException)):
                    raise
                if watch.why is None and isinstance(exc, TimeoutError):
                    watch.why = "deadline"
                if watch.why is None:
                    raise ExecutorError(self.name, f"connection to {self.url} dropped mid-stream "
                                                   f"({_why(exc)})", partial_text=state.text) from None
        finally:
            watch.stop()
            if resp is not None:
                resp.close()  # with "Connection: close" the response holds the socket
            conn.close()
        if not state.ended and watch.why == "cancel":
            raise Cancelled(self.name, partial_text=state.text)
        if not state.ended and watch.why == "deadline":
            raise ExecutionTimeout(self.name, params.timeout_s, partial_text=state.text)
        return state.result(self.name, self.url, start, time.monotonic(), prompt_estimate)

    def _read_events(self, resp: http.client.HTTPResponse, state: StreamState, on_token: OnToken) -> None:
        while not state.done:
            line = resp.readline(_LINE_MAX)
            if not line:
                return
            line = line.strip()
            if not line.startswith(b"data:"):
                continue  # comments, event:/id: fields, keep-alives
            piece = state.feed(line[5:].strip(), name=self.name, url=self.url)
            if piece:
                on_token(piece)

    def _connection(self, timeout_s: float) -> http.client.HTTPConnection:
        host, port = self._address()
        if self._split.scheme == "https":
            return http.client.HTTPSConnection(host, port, timeout=timeout_s)
        return http.client.HTTPConnection(host, port, timeout=timeout_s)

    def _path(self) -> str:
        s = self._split
        return (s.path or "/") + (f"?{s.query}" if s.query else "")

    def _http_error(self, resp: http.client.HTTPResponse) -> ExecutorError:
        """An HTTP error answer as an ExecutorError carrying the engine's own message."""
        try:
            raw = resp.read(_ERROR_BODY_MAX)
        except (OSError, http.client.HTTPException):
            raw = b""
        message = engine_message(raw)
        reason = f"{self.url} answered HTTP {resp.status} {resp.reason}" + (f": {message}" if message else "")
        if resp.status == 503:  # llama-server while it loads the model; a proxy with no engine behind it
            return EngineUnavailable(self.name, reason)
        return ExecutorError(self.name, reason)


@dataclass
class StreamState:
    """What an engine's stream has said so far."""

    parts: list[str] = field(default_factory=list)
    first_at: float | None = None
    finish_reason: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)
    done: bool = False          # [DONE] seen
    calls: ToolCallDeltas | None = None  # a job with tools: the calls, assembled from their pieces

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def ended(self) -> bool:
        """The engine said the answer is complete (a finish reason; [DONE] or not)."""
        return self.finish_reason is not None

    def feed(self, data: bytes, *, name: str, url: str) -> str:
        """One ``data:`` payload; returns its text piece ('' for none)."""
        if data == b"[DONE]":
            self.done = True
            return ""
        event = parse_json_event(data, self.parts, name=name, url=url)
        if self.calls is not None:
            self.calls.feed(data)
        usage = event.get("usage")
        if isinstance(usage, dict):
            self.usage.update(usage)
        timings = event.get("timings")
        if isinstance(timings, dict):
            self.timings = timings
        piece, finish = choice_of(event)
        if finish is not None:
            self.finish_reason = finish
        if piece:
            if self.first_at is None:
                self.first_at = time.monotonic()
            self.parts.append(piece)
        return piece

    def result(self, name: str, url: str, start: float, end: float, prompt_estimate: int) -> Result:
        """The answer, or an ExecutorError if the engine never said it was complete."""
        if self.finish_reason is None:
            how = ("sent [DONE] without a finish reason: the answer was cut off (llama-cpp-python's server "
                   "does this to a running answer when another request arrives; start it with "
                   "--interrupt_requests False)") if self.done else "closed the stream before the answer was complete"
            raise ExecutorError(name, f"{url} {how}", partial_text=self.text)
        first = self.first_at or end
        ttft_ms = (first - start) * 1000
        engine_prefill = _number(self.timings.get("prompt_ms"))
        prefill_ms = min(engine_prefill, ttft_ms) if engine_prefill is not None else ttft_ms
        prompt_tokens, generated = usage_counts(self.usage)
        if prompt_tokens is None:
            prompt_n, cache_n = _count(self.timings.get("prompt_n")), _count(self.timings.get("cache_n"))
            prompt_tokens = prompt_n + (cache_n or 0) if prompt_n is not None else None
        if generated is None:
            generated = _count(self.timings.get("predicted_n"))
        return Result(text=self.text,
                      timings=Timings(init_ms=ttft_ms - prefill_ms, prefill_ms=prefill_ms,
                                      decode_ms=(end - first) * 1000, total_ms=(end - start) * 1000),
                      prompt_tokens=prompt_tokens if prompt_tokens is not None else prompt_estimate,
                      generated_tokens=generated if generated is not None else len(self.parts),
                      finish_reason=self.finish_reason,
                      tool_calls=self.calls.calls() if self.calls is not None else ())


def parse_json_event(data: bytes, parts: list[str], *, name: str, url: str) -> dict[str, Any]:
    """One SSE ``data:`` payload as a JSON object ({} for anything else); an error event,
    or one that is not JSON, is an ExecutorError carrying ``parts`` so far."""
    try:
        event = json.loads(data)
    except (ValueError, RecursionError):
        raise ExecutorError(name, f"{url} sent an event that is not JSON: {data[:120]!r}",
                            partial_text="".join(parts)) from None
    if not isinstance(event, dict):
        return {}
    if "error" in event:
        raise ExecutorError(name, f"{url} reported an error: {engine_message(event) or '(no message)'}",
                            partial_text="".join(parts))
    return event


def choice_of(event: dict[str, Any]) -> tuple[str, str | None]:
    """(text piece, finish reason or None) of a chat or completion chunk's first choice."""
    choices = event.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return "", None
    choice = choices[0]
    delta = choice.get("delta")
    content = delta.get("content") if isinstance(delta, dict) else choice.get("text")
    finish = choice.get("finish_reason")
    return (content if isinstance(content, str) else ""), (finish[:32] if isinstance(finish, str) and finish
                                                           else None)


def parse_event(data: bytes, parts: list[str], *, name: str, url: str) -> tuple[str, dict[str, Any]]:
    """One SSE ``data:`` payload -> (the text piece, its usage object or {})."""
    event = parse_json_event(data, parts, name=name, url=url)
    usage = event.get("usage")
    return choice_of(event)[0], (usage if isinstance(usage, dict) else {})


def engine_message(body: bytes | dict[str, Any]) -> str:
    """The message in an engine's error body, whatever its shape: OpenAI's and llama.cpp's
    ``{"error": {"message"}}``, Ollama's ``{"error": "..."}``, FastAPI's ``{"detail"}``;
    else the body's tail as text."""
    obj: Any = body
    if isinstance(body, bytes):
        try:
            obj = json.loads(body)
        except (ValueError, RecursionError):
            return body[-_BODY_TAIL:].decode("utf-8", "replace").strip()
    if isinstance(obj, dict):
        for key in ("error", "detail", "message"):
            value = obj.get(key)
            if isinstance(value, dict):
                value = value.get("message", value.get("msg"))
            if isinstance(value, list) and value and isinstance(value[0], dict):
                value = value[0].get("msg")  # FastAPI's validation errors
            if isinstance(value, str) and value:
                return value[:_BODY_TAIL]
            if value is not None:
                return f"(an error of type {type(value).__name__})"
    return json.dumps(obj)[-_BODY_TAIL:] if not isinstance(body, bytes) else body[-_BODY_TAIL:].decode(
        "utf-8", "replace").strip()


def usage_counts(usage: dict[str, Any]) -> tuple[int | None, int | None]:
    """(prompt_tokens, completion_tokens) from a server's usage object, each None unless
    it is a sane non-negative integer."""
    return _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))


def _count(value: Any) -> int | None:
    return value if type(value) is int and 0 <= value <= MAX_TOKENS else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        and 0 <= value < 1e10 else None


def _why(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    return str(getattr(exc, "strerror", None) or reason or exc or type(exc).__name__)


class _Watch:
    """Shuts a socket down when the job is cancelled or out of time, so that a read
    blocked on a silent engine returns at once; ``why`` says which ('cancel', 'deadline')."""

    def __init__(self, cancel: threading.Event | None, deadline: float):
        self._cancel = cancel
        self._deadline = deadline
        self._finished = threading.Event()
        self._thread: threading.Thread | None = None
        self.why: str | None = None

    def start(self, sock: socket.socket, name: str) -> None:
        self._thread = threading.Thread(target=self._watch, args=(sock,), name=f"{name}-watch", daemon=True)
        self._thread.start()

    def _watch(self, sock: socket.socket) -> None:
        while not self._finished.is_set():
            left = self._deadline - time.monotonic()
            if left <= 0:
                self._fire("deadline", sock)
                return
            if self._cancel is None:
                self._finished.wait(left)
            elif self._cancel.wait(min(WATCH_POLL_S, left)):
                self._fire("cancel", sock)
                return

    def _fire(self, why: str, sock: socket.socket) -> None:
        if self._finished.is_set():
            return
        self.why = why
        try:
            sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked read; the engine sees us leave
        except OSError:
            pass

    def stop(self) -> None:
        self._finished.set()


# ----------------------------------------------------------------------------- chat and tools

def request_body(model: str, prompt: str, params: Params) -> dict[str, Any]:
    """The chat completion request for one job: the conversation as it came (or the prompt
    as one user message), its tools and output format."""
    chat = params.chat
    messages = [{"role": "user", "content": prompt}] if chat is None else openai_messages(chat.messages)
    body: dict[str, Any] = {"model": model, "stream": True, "messages": messages,
                            "max_tokens": params.max_new_tokens}
    if params.temperature is not None:
        body["temperature"] = params.temperature
    if chat is not None and chat.tools:
        body["tools"] = [dict(t) for t in chat.tools]
    fmt = chat.format if chat is not None else None
    if isinstance(fmt, str):
        body["response_format"] = {"type": "json_object"}
    elif fmt is not None:
        schema = {"name": "output", "schema": dict(fmt)}
        body["response_format"] = {"type": "json_schema", "json_schema": schema}
    return body


def openai_messages(messages: tuple[ChatMessage, ...]) -> list[dict[str, Any]]:
    """The turns in OpenAI's shape: tool call arguments as a JSON string, and every call
    with an id that its tool result names (Ollama's clients send neither: a call gets one,
    and a result answers the earliest call not yet answered)."""
    out: list[dict[str, Any]] = []
    unanswered: list[str] = []
    for i, m in enumerate(messages):
        turn: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            ids = [c.id or f"call_{i}_{j}" for j, c in enumerate(m.tool_calls)]
            turn["tool_calls"] = [{"id": cid, "type": "function",
                                   "function": {"name": c.name, "arguments": json.dumps(dict(c.arguments))}}
                                  for cid, c in zip(ids, m.tool_calls, strict=True)]
            unanswered = ids
        if m.role == "tool":
            cid = m.tool_call_id or (unanswered[0] if unanswered else f"call_{i}")
            unanswered = [u for u in unanswered if u != cid]
            turn["tool_call_id"] = cid
            if m.name:
                turn["name"] = m.name
        out.append(turn)
    return out


class ToolCallDeltas:
    """Tool calls assembled from streamed ``delta.tool_calls`` pieces: each names its
    ``index``; the first piece of a call brings its id and name, the arguments arrive as
    string fragments to join."""

    def __init__(self) -> None:
        self._calls: dict[int, dict[str, str]] = {}

    def feed(self, data: bytes) -> None:
        try:
            event = json.loads(data)
            deltas = event["choices"][0]["delta"].get("tool_calls") or []
        except (ValueError, RecursionError, LookupError, TypeError, AttributeError):
            return
        if not isinstance(deltas, list):
            return
        for d in deltas:
            if not isinstance(d, dict):
                continue
            index = d.get("index", len(self._calls))
            call = self._calls.setdefault(index if type(index) is int else len(self._calls),
                                          {"id": "", "name": "", "arguments": ""})
            raw_fn = d.get("function")
            fn: dict[str, Any] = raw_fn if isinstance(raw_fn, dict) else {}
            if isinstance(d.get("id"), str):
                call["id"] = d["id"]
            if isinstance(fn.get("name"), str):
                call["name"] += fn["name"]
            if isinstance(fn.get("arguments"), str):
                call["arguments"] += fn["arguments"]
            elif isinstance(fn.get("arguments"), dict):
                call["arguments"] = json.dumps(fn["arguments"])

    def calls(self) -> tuple[ToolCall, ...]:
        out = []
        for _, call in sorted(self._calls.items()):
            if not call["name"]:
                continue
            try:
                arguments = json.loads(call["arguments"]) if call["arguments"].strip() else {}
            except (ValueError, RecursionError):
                arguments = {"_raw": call["arguments"]}  # what the model wrote, kept for the client to see
            if not isinstance(arguments, dict):
                arguments = {"_raw": arguments}
            out.append(ToolCall(name=call["name"], arguments=arguments, id=call["id"]))
        return tuple(out)
