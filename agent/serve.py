"""The fleet behind an OpenAI-compatible HTTP endpoint.

    POST /v1/chat/completions   POST /v1/completions   (streamed as SSE, or not)
    GET  /v1/models             GET  /health

Theory of operation. Each request is one orchestration from this device — own NPU first,
else the auction — through the same code as ``trigger``. A ``Backend`` runs it: inside
the node daemon (``serve.enabled``), a pool of long-lived orchestrators on the node's own
connection, each with its next request's subscriptions reserved ahead; as a command
(``python -m agent serve``), the same pool on a connection of its own, or — when this
device's node runs — the node itself, over its local socket.

The HTTP layer is the standard library's threading server: a thread per connection is
what a handful of streaming clients on a phone or a board need, it adds no dependency,
and a blocked client blocks only its own thread. Concurrency is bounded
(``serve.max_concurrent``; past it, 429 at once). Response headers wait for the
decision, so ``X-Edge-Agent-Device`` names who answers and an error before any token is
a proper HTTP status; a client that hangs up (noticed by a peek on its socket, or a
failed write) cancels its job on whichever device runs it.

Chat messages become one prompt: a single user message as it is, several as a
"Role: text" transcript; the executor applies its model's chat template to it.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import queue
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from agent.config import Config
from agent.errors import AgentError, ExitCode, PromptTooLarge, UsageError

log = logging.getLogger(__name__)

MAX_BODY = 4 * 1024 * 1024
DEFAULT_MAX_TOKENS = 256


@dataclass(frozen=True)
class Ask:
    prompt: str
    max_new_tokens: int
    model: str | None
    temperature: float | None = None


@dataclass(frozen=True)
class Answered:
    ok: bool
    text: str
    winner: str | None
    path: str | None
    rid: str
    exit_code: int
    error: str | None
    prompt_tokens: int
    completion_tokens: int
    total_ms: float
    finish_reason: str = ""   # the engine's; "" when it did not say


class Backend(Protocol):
    def models(self) -> list[dict[str, Any]]: ...

    def connected(self) -> bool: ...

    def run(self, ask: Ask, on_decision: Callable[[str, str | None], None], on_token: Callable[[str], None],
            stop: threading.Event) -> Answered: ...


# ----------------------------------------------------------------------------- backends

def _answered(out: Any) -> Answered:
    return Answered(ok=out.ok, text=out.text, winner=out.winner, path=out.path, rid=out.rid,
                    exit_code=int(out.exit_code), error=out.error, prompt_tokens=out.answer.prompt_tokens,
                    completion_tokens=out.answer.generated_tokens, total_ms=out.total_ms,
                    finish_reason=out.answer.finish_reason)


class OrchestratorBackend:
    """Orchestrators of this process, kept warm, one per request at a time."""

    def __init__(self, make: Callable[[], Any], fleet: Callable[[], Any], own_models: list[dict[str, Any]],
                 me: str):
        self._make = make
        self._fleet = fleet
        self._own = own_models
        self._me = me
        self._idle: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def warm_up(self) -> None:
        """One orchestrator ready before the first request (imports, connection, sync)."""
        try:
            orch = self._make()
            orch.warm_up()
        except AgentError as exc:
            log.warning("serve: not warmed up: %s", exc)
            return
        self._idle.put(orch)

    def models(self) -> list[dict[str, Any]]:
        entries = {m["name"]: {**m, "devices": [self._me]} for m in self._own}
        try:
            roster = self._fleet().roster
        except AgentError:
            return _listed(entries)
        online = roster.online()
        for device, metrics in roster.metrics().items():
            if device not in online or device == self._me:
                continue
            for info in metrics.snapshot.models.values():
                entry = entries.setdefault(info.name, {"name": info.name, "aliases": list(info.aliases),
                                                       "context": info.context, "devices": []})
                entry["devices"] = sorted({*entry["devices"], device})
        return _listed(entries)

    def connected(self) -> bool:
        try:
            return bool(self._fleet().bus.connected)
        except AgentError:
            return False

    def run(self, ask: Ask, on_decision: Callable[[str, str | None], None], on_token: Callable[[str], None],
            stop: threading.Event) -> Answered:
        try:
            orch = self._idle.get_nowait()
        except queue.Empty:
            orch = self._make()
        orch.on_token = on_token
        orch.on_decision = lambda d: on_decision(d.winner, d.path)
        orch.interrupted.clear()
        watching = True

        def watch() -> None:
            while watching and not stop.wait(0.5):
                pass
            if watching:
                orch.interrupt()
        watcher = threading.Thread(target=watch, name="serve-watch", daemon=True)
        watcher.start()
        try:
            out = orch.run(ask.prompt, max_new_tokens=ask.max_new_tokens, model=ask.model,
                           temperature=ask.temperature)
        finally:
            watching = False
            orch.on_token = lambda t: None
            orch.on_decision = lambda d: None
            self._idle.put(orch)  # its next rid is already subscribed
        return _answered(out)


class DaemonBackend:
    """This device's node daemon does the work (its local socket); serve only speaks HTTP."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def _request(self, req: dict[str, Any]) -> Iterator[dict[str, Any]]:
        from agent import control
        sock = control.connect(self.cfg.state_dir)
        if sock is None:
            raise AgentError("the node daemon of this device stopped")
        with sock:
            yield from control.request(sock, req)

    def models(self) -> list[dict[str, Any]]:
        entries: dict[str, dict[str, Any]] = {}
        for event in self._request({"op": "status"}):
            for row in event.get("devices", []):
                if not row.get("online"):
                    continue
                for info in (row.get("models") or {}).values():
                    entry = entries.setdefault(info["name"], {"name": info["name"], "aliases": info.get("aliases", []),
                                                              "context": None, "devices": []})
                    entry["devices"] = sorted({*entry["devices"], row["device"]})
        return _listed(entries)

    def connected(self) -> bool:
        from agent import control
        return control.running(self.cfg.state_dir)

    def run(self, ask: Ask, on_decision: Callable[[str, str | None], None], on_token: Callable[[str], None],
            stop: threading.Event) -> Answered:
        from agent import control
        sock = control.connect(self.cfg.state_dir)
        if sock is None:
            raise AgentError("the node daemon of this device stopped")
        watching = True

        def watch() -> None:
            while watching and not stop.wait(0.5):
                pass
            if watching:
                try:
                    sock.shutdown(socket.SHUT_WR)  # the daemon sees us leave and cancels the job
                except OSError:
                    pass
        threading.Thread(target=watch, name="serve-watch", daemon=True).start()
        try:
            with sock:
                for event in control.request(sock, {"op": "trigger", "prompt": ask.prompt,
                                                    "max_new_tokens": ask.max_new_tokens, "model": ask.model,
                                                    "temperature": ask.temperature}):
                    kind = event.get("type")
                    if kind == "decision":
                        on_decision(event["winner"], event.get("path"))
                    elif kind == "token":
                        on_token(event["text"])
                    elif kind == "outcome":
                        out = event["outcome"]
                        usage = out.get("usage") or {}
                        return Answered(ok=out["ok"], text=out["text"], winner=out["winner"], path=out["path"],
                                        rid=out["rid"], exit_code=out["exit_code"], error=out["error"],
                                        prompt_tokens=usage.get("prompt_tokens", 0),
                                        completion_tokens=usage.get("completion_tokens", 0),
                                        total_ms=out["total_ms"], finish_reason=out.get("finish_reason") or "")
                    elif kind == "error":
                        raise _DaemonError(event.get("error", "the daemon refused"), event.get("exit_code", 1))
        finally:
            watching = False
        raise AgentError("the node daemon hung up before answering")


class _DaemonError(AgentError):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.exit_code = ExitCode(code) if code in ExitCode._value2member_map_ else ExitCode.FAILED


def _listed(entries: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [entries[name] for name in sorted(entries)]


# ----------------------------------------------------------------------------- requests

class BadRequest(Exception):
    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


def prompt_of_messages(messages: Any) -> str:
    """One prompt from OpenAI chat messages (see the module docstring)."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest(400, "messages must be a non-empty list", param="messages")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(400, f"messages[{i}] must be an object with a role", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
                raise BadRequest(400, f"messages[{i}]: only text content is supported", param="messages")
            content = "".join(t for t in texts if isinstance(t, str))
        if not isinstance(content, str):
            raise BadRequest(400, f"messages[{i}].content must be text", param="messages")
        turns.append((m["role"], content))
    if len(turns) == 1 and turns[0][0] == "user":
        return turns[0][1]
    return "\n\n".join(f"{role.capitalize()}: {text}" for role, text in turns) + "\n\nAssistant:"


def max_tokens_of(body: dict[str, Any]) -> int:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    if value is None:
        return DEFAULT_MAX_TOKENS
    if type(value) is not int or not 1 <= value <= 1_000_000:
        raise BadRequest(400, "max_tokens must be a positive integer", param="max_tokens")
    return value


def temperature_of(body: dict[str, Any]) -> float | None:
    value = body.get("temperature")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 2:
        raise BadRequest(400, "temperature must be a number from 0 to 2", param="temperature")
    return float(value)


def model_of(body: dict[str, Any]) -> str | None:
    model = body.get("model")
    if model is None or model in ("", "default", "edge-agent"):
        return None  # no preference: any device, as a trigger without a model
    if not isinstance(model, str) or len(model) > 128:
        raise BadRequest(400, "model must be a model name", param="model")
    return model


STATUS_OF = {ExitCode.NO_DEVICE: 503, ExitCode.TIMEOUT: 504, ExitCode.USAGE: 400, ExitCode.BROKER: 503,
             ExitCode.INTERRUPTED: 499, ExitCode.FAILED: 502}


# ----------------------------------------------------------------------------- the server

class Gateway:
    def __init__(self, cfg: Config, backend: Backend):
        self.cfg = cfg
        self.backend = backend
        self.slots = threading.BoundedSemaphore(cfg.serve.max_concurrent)
        self.key = _api_key(cfg)
        self.server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> tuple[str, int]:
        gateway = self

        class Handler(_Handler):
            pass
        Handler.gateway = gateway
        server = ThreadingHTTPServer((self.cfg.serve.host, self.cfg.serve.port), Handler)
        server.daemon_threads = True
        self.server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="serve", daemon=True)
        self._thread.start()
        warm = getattr(self.backend, "warm_up", None)
        if warm is not None:
            threading.Thread(target=warm, name="serve-warm-up", daemon=True).start()
        host, port = server.server_address[:2]
        log.info("serving the fleet on http://%s:%d/v1 (OpenAI-compatible%s)", host, port,
                 ", API key required" if self.key else "")
        return str(host), int(port)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


def _api_key(cfg: Config) -> str | None:
    s = cfg.serve
    if s.api_key_env:
        key = os.environ.get(s.api_key_env)
        if not key:
            raise UsageError(f"serve.api_key_env: {s.api_key_env} is not set")
        return key
    if s.api_key_file:
        from agent.credentials import file_problem
        problem = file_problem(s.api_key_file, private=True)
        if problem:
            raise UsageError(f"serve.api_key_file: {problem}")
        with open(s.api_key_file, encoding="utf-8") as fh:
            return fh.read().strip()
    return None


class _Handler(BaseHTTPRequestHandler):
    gateway: Gateway
    protocol_version = "HTTP/1.1"
    server_version = "edge-agent"

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), fmt % args)

    # ------------------------------------------------------------------ plumbing
    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str, *, kind: str = "invalid_request_error", code: str | None = None,
               param: str | None = None, headers: dict[str, str] | None = None) -> None:
        self._json(status, {"error": {"message": message, "type": kind, "param": param, "code": code}}, headers)

    def _authorised(self) -> bool:
        key = self.gateway.key
        if key is None:
            return True
        given = self.headers.get("Authorization", "")
        if given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), key.encode()):
            return True
        self._error(401, "missing or wrong API key (Authorization: Bearer …)", kind="authentication_error",
                    code="invalid_api_key")
        return False

    def _body(self) -> dict[str, Any]:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise BadRequest(411 if length is None else 400, "a JSON body with Content-Length is required")
        if int(length) > MAX_BODY:
            raise BadRequest(413, f"request body over {MAX_BODY} bytes")
        raw = self.rfile.read(int(length))
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            raise BadRequest(400, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise BadRequest(400, "the body must be a JSON object")
        return body

    # ------------------------------------------------------------------ routes
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        if path in ("/health", "/v1/health"):
            connected = self.gateway.backend.connected()
            self._json(200 if connected else 503, {"status": "ok" if connected else "broker not connected",
                                                   "device": self.gateway.cfg.device_id})
            return
        if not self._authorised():
            return
        if path == "/v1/models":
            data = [{"id": m["name"], "object": "model", "created": 0, "owned_by": "edge-agent",
                     "aliases": m.get("aliases", []), "context_length": m.get("context"),
                     "devices": m.get("devices", [])} for m in self.gateway.backend.models()]
            self._json(200, {"object": "list", "data": data})
            return
        self._error(404, f"no route {path}", code="not_found")

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        if path not in ("/v1/chat/completions", "/v1/completions"):
            self._error(404, f"no route {path}", code="not_found")
            return
        if not self._authorised():
            return
        chat = path == "/v1/chat/completions"
        try:
            body = self._body()
            if chat:
                prompt = prompt_of_messages(body.get("messages"))
            else:
                raw: Any = body.get("prompt")
                if isinstance(raw, list) and len(raw) == 1:
                    raw = raw[0]
                if not isinstance(raw, str) or not raw.strip():
                    raise BadRequest(400, "prompt must be a non-empty string", param="prompt")
                prompt = raw
            ask = Ask(prompt, max_tokens_of(body), model_of(body), temperature_of(body))
            stream = body.get("stream") is True
            usage_in_stream = isinstance(body.get("stream_options"), dict) and \
                body["stream_options"].get("include_usage") is True
        except BadRequest as exc:
            self._error(exc.status, str(exc), code=exc.code, param=exc.param)
            return
        if not self.gateway.slots.acquire(blocking=False):
            self._error(429, f"{self.gateway.cfg.serve.max_concurrent} requests are already running on this "
                             "gateway; try again shortly", kind="rate_limit_error", code="too_many_requests",
                        headers={"Retry-After": "1"})
            return
        try:
            self._complete(ask, chat=chat, stream=stream, usage_in_stream=usage_in_stream,
                           shown_model=str(body.get("model") or "edge-agent"))
        finally:
            self.gateway.slots.release()

    # ------------------------------------------------------------------ one completion
    def _complete(self, ask: Ask, *, chat: bool, stream: bool, usage_in_stream: bool, shown_model: str) -> None:
        stop = threading.Event()
        cid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        started = {"headers": False}
        lock = threading.Lock()
        obj_kind = "chat.completion.chunk" if chat else "text_completion"

        def gone_watch() -> None:
            """A client that hangs up cancels its job: an EOF on its socket says so. (It
            waits for readability with select, so the socket's own timeout, which the
            writes use, is left alone.)"""
            conn = self.connection
            try:
                while not stop.is_set():
                    readable, _, _ = select.select([conn], [], [], 0.5)
                    if not readable:
                        continue
                    if not conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                        stop.set()
                    return  # data: the client's next request, not ours to read
            except (OSError, ValueError):
                stop.set()

        def headers(device: str | None) -> None:
            if started["headers"] or not stream:
                return
            started["headers"] = True
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            if device:
                self.send_header("X-Edge-Agent-Device", device)
            self.end_headers()
            if chat:
                self._event({"id": cid, "object": obj_kind, "created": created, "model": shown_model,
                             "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                          "finish_reason": None}]}, stop)

        def on_decision(device: str, path: str | None) -> None:
            with lock:
                headers(device)

        def on_token(text: str) -> None:
            if not stream:
                return
            piece: dict[str, Any] = {"delta": {"content": text}} if chat else {"text": text}
            with lock:
                headers(None)
                self._event({"id": cid, "object": obj_kind, "created": created, "model": shown_model,
                             "choices": [{"index": 0, **piece, "finish_reason": None}]}, stop)

        watcher = threading.Thread(target=gone_watch, name="serve-gone", daemon=True)
        watcher.start()
        try:
            answered = self.gateway.backend.run(ask, on_decision, on_token, stop)
        except PromptTooLarge as exc:
            answered = None
            failure: tuple[int, str, str] | None = (413, str(exc), "prompt_too_large")
        except AgentError as exc:
            answered = None
            failure = (STATUS_OF.get(exc.exit_code, 500), str(exc), "edge_agent_error")
        else:
            failure = None
        finally:
            stop_was = stop.is_set()
            stop.set()  # ends the watcher
            watcher.join(1.0)
        if stop_was and answered is not None and not answered.ok:
            log.info("client of %s went away; its job was cancelled", answered.rid)
            self.close_connection = True
            return
        if answered is not None and not answered.ok:
            code = ExitCode(answered.exit_code) if answered.exit_code in ExitCode._value2member_map_ \
                else ExitCode.FAILED
            status = STATUS_OF.get(code, 502)
            err_code = "model_not_found" if ask.model and "serves model" in (answered.error or "") else None
            failure = (404 if err_code else status, answered.error or "failed", err_code or "edge_agent_error")
        finish = "stop"  # the engine's reason where it gave one; a guess for executors that cannot say
        if answered is not None and answered.finish_reason:
            finish = answered.finish_reason
        elif answered is not None and answered.completion_tokens >= ask.max_new_tokens:
            finish = "length"
        extension = {} if answered is None else {"edge_agent": {"device": answered.winner, "path": answered.path,
                                                                "rid": answered.rid,
                                                                "total_ms": round(answered.total_ms, 1)}}
        usage = None if answered is None else {
            "prompt_tokens": answered.prompt_tokens, "completion_tokens": answered.completion_tokens,
            "total_tokens": answered.prompt_tokens + answered.completion_tokens}
        with lock:
            if failure is not None:
                status, message, code_name = failure
                if started["headers"]:  # mid-stream: the error as an event, then the end
                    self._event({"error": {"message": message, "type": "server_error", "code": code_name}}, stop)
                    self._done_stream()
                else:
                    self._error(status, message, kind="server_error" if status >= 500 else "invalid_request_error",
                                code=code_name)
                return
            assert answered is not None and usage is not None
            if stream:
                headers(answered.winner)
                last: dict[str, Any] = {"delta": {}} if chat else {"text": ""}
                self._event({"id": cid, "object": obj_kind, "created": created, "model": shown_model,
                             "choices": [{"index": 0, **last, "finish_reason": finish}], **extension}, stop)
                if usage_in_stream:
                    self._event({"id": cid, "object": obj_kind, "created": created, "model": shown_model,
                                 "choices": [], "usage": usage}, stop)
                self._done_stream()
                return
            choice: dict[str, Any] = ({"message": {"role": "assistant", "content": answered.text}} if chat
                                      else {"text": answered.text})
            self._json(200, {"id": cid, "object": "chat.completion" if chat else "text_completion",
                             "created": created, "model": shown_model,
                             "choices": [{"index": 0, **choice, "finish_reason": finish}],
                             "usage": usage, **extension},
                       headers={"X-Edge-Agent-Device": answered.winner or ""})

    def _event(self, obj: dict[str, Any], stop: threading.Event) -> None:
        try:
            self.wfile.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")
            self.wfile.flush()
        except OSError:
            stop.set()  # the client is gone: the backend cancels the job

    def _done_stream(self) -> None:
        try:
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except OSError:
            pass
        self.close_connection = True
