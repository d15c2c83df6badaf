"""The fleet behind an HTTP endpoint that speaks OpenAI's API and Ollama's.

    POST /v1/chat/completions   POST /v1/completions   (streamed as SSE, or not)
    GET  /v1/models             GET  /health
    Ollama's API (agent/ollama.py): GET /, /api/tags, /api/ps, /api/version,
    POST /api/chat, /api/generate, /api/show, /api/pull

Theory of operation. Each request is one orchestration from this device — own NPU first,
else the auction — through the same code as ``trigger``. A ``Backend`` runs it: inside
the node daemon (``serve.enabled``), a pool of long-lived orchestrators on the node's own
connection, each with its next request's subscriptions reserved ahead; as a command
(``python -m agent serve``), the same pool on a connection of its own, or — when this
device's node runs — the node itself, over its local socket.

The HTTP layer is the standard library's threading server: a thread per connection is
what a handful of streaming clients on a phone or a board need, it adds no dependency,
and a blocked client blocks only its own thread. Concurrency is bounded
(``serve.max_concurrent``); past it requests wait in one line shared by both fronts
(agent/admission.py), and past ``serve.max_queue`` get 503 at once. Response headers wait for the
decision, so ``X-Edge-Agent-Device`` names who answers and an error before any token is
a proper HTTP status; a client that hangs up (noticed by a peek on its socket, or a
failed write) cancels its job on whichever device runs it.

Chat travels as chat (messages, tools, output format) to executors that speak it; the
others get a "Role: text" transcript and apply their model's chat template. Tool calls
come back with arguments as an object; this front sends them on as a JSON string.
"""

from __future__ import annotations

import _thread
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

from agent import control
from agent.admission import FULL, Admission
from agent.config import DEFAULT_MODEL, Config
from agent.errors import AgentError, BadPrompt, ExitCode, PromptTooLarge, UsageError
from agent.messages import Chat, ChatMessage, Prompt, Timings, ToolCall, tool_name

log = logging.getLogger(__name__)

MAX_BODY = 4 * 1024 * 1024
DEFAULT_MAX_TOKENS = 256


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
    tool_calls: tuple[ToolCall, ...] = ()
    timings: Timings = Timings()
    kind: str = ""            # why no device ran it, where that has a name (dispatch.Answer.kind)


class Stop(threading.Event):
    """Set when the request is over for its client (it hung up, a write failed); hooks
    registered with ``on_set`` run at that moment, in the thread that sets it, so a
    backend cancels its job without a thread of its own watching."""

    def __init__(self) -> None:
        super().__init__()
        self._hooks: list[Callable[[], None]] = []
        self._guard = threading.Lock()

    def on_set(self, hook: Callable[[], None]) -> Callable[[], None]:
        """Run ``hook`` when this is set (now, if it is); returns what unregisters it."""
        with self._guard:
            if not self.is_set():
                self._hooks.append(hook)
                return lambda: self._drop(hook)
        hook()
        return lambda: None

    def _drop(self, hook: Callable[[], None]) -> None:
        with self._guard:
            if hook in self._hooks:
                self._hooks.remove(hook)

    def set(self) -> None:
        with self._guard:
            hooks, self._hooks = self._hooks, []
            super().set()
        for hook in hooks:
            hook()


class Backend(Protocol):
    def models(self) -> list[dict[str, Any]]: ...

    def connected(self) -> bool: ...

    def run(self, ask: Prompt, on_decision: Callable[[str, str | None], None], on_token: Callable[[str], None],
            stop: Stop) -> Answered: ...


# ----------------------------------------------------------------------------- backends

def _answered(out: Any) -> Answered:
    return Answered(ok=out.ok, text=out.text, winner=out.winner, path=out.path, rid=out.rid,
                    exit_code=int(out.exit_code), error=out.error, prompt_tokens=out.answer.prompt_tokens,
                    completion_tokens=out.answer.generated_tokens, total_ms=out.total_ms,
                    finish_reason=out.answer.finish_reason, tool_calls=out.answer.tool_calls,
                    timings=out.timings, kind=out.answer.kind)


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
        entries = {m["name"]: {"tools": False, **m, "devices": [self._me]} for m in self._own}
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
                                                       "context": info.context, "devices": [], "tools": False})
                entry["devices"] = sorted({*entry["devices"], device})
                entry["tools"] = entry["tools"] or info.tools
        return _listed(entries)

    def connected(self) -> bool:
        try:
            return bool(self._fleet().bus.connected)
        except AgentError:
            return False

    def run(self, ask: Prompt, on_decision: Callable[[str, str | None], None], on_token: Callable[[str], None],
            stop: Stop) -> Answered:
        try:
            orch = self._idle.get_nowait()
        except queue.Empty:
            orch = self._make()
        orch.on_token = on_token
        orch.on_decision = lambda d: on_decision(d.winner, d.path)
        orch.interrupted.clear()
        unhook = stop.on_set(orch.interrupt)  # the client left: cancel the job where it runs
        try:
            out = orch.run(ask.prompt, max_new_tokens=ask.max_new_tokens, model=ask.model,
                           temperature=ask.temperature, chat=ask.chat)
        finally:
            unhook()
            orch.on_token = lambda t: None
            orch.on_decision = lambda d: None
            self._idle.put(orch)  # its next rid is already subscribed
        return _answered(out)


class DaemonBackend:
    """This device's node daemon does the work (its local socket); serve only speaks HTTP."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def _request(self, req: control.Request) -> Iterator[control.Event]:
        sock = control.connect(self.cfg.state_dir)
        if sock is None:
            raise AgentError("the node daemon of this device stopped")
        with sock:
            yield from control.request(sock, req)

    def models(self) -> list[dict[str, Any]]:
        entries: dict[str, dict[str, Any]] = {}
        for event in self._request(control.StatusRequest()):
            if not isinstance(event, control.Status):
                continue
            for row in event.devices:
                if not row.get("online"):
                    continue
                for info in (row.get("models") or {}).values():
                    entry = entries.setdefault(info["name"], {"name": info["name"], "aliases": info.get("aliases", []),
                                                              "context": info.get("context"), "devices": [],
                                                              "tools": False})
                    entry["devices"] = sorted({*entry["devices"], row["device"]})
                    entry["tools"] = entry["tools"] or info.get("tools") is True
        return _listed(entries)

    def connected(self) -> bool:
        return control.running(self.cfg.state_dir)

    def run(self, ask: Prompt, on_decision: Callable[[str, str | None], None], on_token: Callable[[str], None],
            stop: Stop) -> Answered:
        sock = control.connect(self.cfg.state_dir)
        if sock is None:
            raise AgentError("the node daemon of this device stopped")

        def leave() -> None:
            try:
                sock.shutdown(socket.SHUT_WR)  # the daemon sees us leave and cancels the job
            except OSError:
                pass
        unhook = stop.on_set(leave)
        try:
            with sock:
                for event in control.request(sock, control.PromptRequest(ask)):
                    if isinstance(event, control.Decision):
                        on_decision(event.winner, event.path)
                    elif isinstance(event, control.Text):
                        on_token(event.text)
                    elif isinstance(event, control.Outcome):
                        return _from_outcome(event)
                    elif isinstance(event, control.Failure):
                        raise _DaemonError(event.error, event.exit_code)
        except ValueError as exc:
            raise AgentError(f"the node daemon sent something unexpected: {exc}") from None
        finally:
            unhook()
        raise AgentError("the node daemon hung up before answering")


def _from_outcome(event: control.Outcome) -> Answered:
    """What the daemon's outcome (the ``trigger --json`` object) says, for an HTTP answer."""
    out = event.outcome
    usage = out.get("usage") or {}
    return Answered(ok=out["ok"], text=out["text"], winner=out["winner"], path=out["path"], rid=out["rid"],
                    exit_code=out["exit_code"], error=out["error"], prompt_tokens=usage.get("prompt_tokens", 0),
                    completion_tokens=usage.get("completion_tokens", 0), total_ms=out["total_ms"],
                    finish_reason=out.get("finish_reason") or "",
                    tool_calls=tuple(ToolCall(c["name"], c["arguments"], c.get("id", ""))
                                     for c in out.get("tool_calls") or ()),
                    timings=Timings(**{k: float(v) for k, v in (out.get("timings") or {}).items()
                                       if k in Timings.__dataclass_fields__}), kind=event.kind)


class _DaemonError(AgentError):
    def __init__(self, message: str, code: ExitCode):
        super().__init__(message)
        self.exit_code = code


def own_models(*executors: Any) -> list[dict[str, Any]]:
    """The models this process's own executors serve (None: not running), one entry a name."""
    entries: dict[str, dict[str, Any]] = {}
    for e in executors:
        if e is None:
            continue
        i = e.model_info()
        entry = entries.setdefault(i.name, {"name": i.name, "aliases": list(i.aliases), "context": i.context,
                                            "tools": False})
        entry["tools"] = entry["tools"] or i.tools
    return list(entries.values())


def _listed(entries: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [entries[name] for name in sorted(entries)]


# ----------------------------------------------------------------------------- requests

class BadRequest(Exception):
    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


def text_of(content: Any, where: str) -> str:
    """A message's content: a string, or text content parts (null: empty)."""
    if content is None:
        return ""
    if isinstance(content, list):  # content parts: text only
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
            raise BadRequest(400, f"{where}: only text content is supported", param="messages")
        return "".join(t for t in texts if isinstance(t, str))
    if not isinstance(content, str):
        raise BadRequest(400, f"{where}.content must be text", param="messages")
    return content


def arguments_of(raw: Any, where: str) -> dict[str, Any]:
    """Tool call arguments: an object, or a string holding one (OpenAI's shape)."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw) if raw.strip() else {}
        except (ValueError, RecursionError):
            raise BadRequest(400, f"{where}.arguments is not JSON", param="messages") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise BadRequest(400, f"{where}.arguments must be a JSON object", param="messages")
    return raw


def tools_of(raw: Any) -> tuple[dict[str, Any], ...]:
    """Function tools, as both APIs spell them ({"type": "function", "function": {...}})."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or len(raw) > 128:
        raise BadRequest(400, "tools must be a list of up to 128 tools", param="tools")
    for i, tool in enumerate(raw):
        if tool_name(tool) is None:
            raise BadRequest(400, f'tools[{i}] must be {{"type": "function", "function": {{"name": …}}}}',
                             param="tools")
    return tuple(raw)


def chat_of_openai(body: dict[str, Any]) -> Chat:
    """The conversation of a chat completion request: messages, tools, response format."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest(400, "messages must be a non-empty list", param="messages")
    turns = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            raise BadRequest(400, f"{where} must be an object with a role (system, user, assistant, tool)",
                             param="messages")
        calls = []
        for j, c in enumerate(m.get("tool_calls") or []):
            fn = c.get("function") if isinstance(c, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise BadRequest(400, f"{where}.tool_calls[{j}] must name a function", param="messages")
            calls.append(ToolCall(fn["name"], arguments_of(fn.get("arguments"), f"{where}.tool_calls[{j}]"),
                                  str(c.get("id") or "")))
        role = "system" if m["role"] == "developer" else m["role"]
        turns.append(ChatMessage(role, text_of(m.get("content"), where), tuple(calls),
                                 str(m.get("tool_call_id") or ""), str(m.get("name") or "")))
    fmt: Any = None
    rf = body.get("response_format")
    if isinstance(rf, dict) and rf.get("type") == "json_object":
        fmt = "json"
    elif isinstance(rf, dict) and rf.get("type") == "json_schema":
        schema = (rf.get("json_schema") or {}).get("schema") if isinstance(rf.get("json_schema"), dict) else None
        if not isinstance(schema, dict):
            raise BadRequest(400, "response_format.json_schema.schema must be an object", param="response_format")
        fmt = schema
    elif rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
        raise BadRequest(400, "response_format must be text, json_object or json_schema", param="response_format")
    tools = tools_of(body.get("tools")) if body.get("tool_choice") != "none" else ()
    return Chat(tuple(turns), tools, fmt)


def prompt_of(prompt: str, max_new_tokens: Any, model: str | None, temperature: Any, chat: Chat | None, *,
              names: dict[str, str]) -> Prompt:
    """The request as a ``Prompt`` (the bounds every front shares); a 400 naming the
    field in the API's own terms (``names``: ours -> theirs) if one is out of bounds."""
    try:
        return Prompt(prompt, max_new_tokens, model=model, temperature=temperature, chat=chat)
    except BadPrompt as exc:
        theirs = names.get(exc.field, exc.field)
        message = str(exc).replace(exc.field, theirs, 1)
        raise BadRequest(400, message, param=theirs) from None


# Our names of a prompt's fields -> OpenAI's, for the errors.
OPENAI_NAMES = {"max_new_tokens": "max_tokens"}

# Model names that ask for no model in particular: any device answers.
NO_PREFERENCE = ("", "default", DEFAULT_MODEL)


def model_of(body: dict[str, Any]) -> str | None:
    model = body.get("model")
    if model is None or model in NO_PREFERENCE:
        return None  # no preference: any device, as a trigger without a model
    if not isinstance(model, str):
        raise BadRequest(400, "model must be a model name", param="model")
    return model  # its length is checked with the rest of the request (Prompt)


# Why no device ran a job (dispatch.Answer.kind) -> OpenAI's error code for it.
ERROR_CODES = {"model_not_served": "model_not_found", "no_tools": "tools_not_supported"}

STATUS_OF = {ExitCode.NO_DEVICE: 503, ExitCode.TIMEOUT: 504, ExitCode.USAGE: 400, ExitCode.BROKER: 503,
             ExitCode.INTERRUPTED: 499, ExitCode.FAILED: 502}


# ----------------------------------------------------------------------------- the server

class Gateway:
    def __init__(self, cfg: Config, backend: Backend):
        self.cfg = cfg
        self.backend = backend
        self.admission = Admission(cfg.serve.max_concurrent, cfg.serve.max_queue, cfg.serve.max_wait_s)
        self.key = _api_key(cfg)
        self.server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> tuple[str, int]:
        gateway = self

        class Handler(_Handler):
            pass
        Handler.gateway = gateway

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            # The listen backlog: socketserver's default of 5 resets the sixth client of a
            # burst before it is accepted; the line holds max_queue of them.
            request_queue_size = min(max(64, self.cfg.serve.max_concurrent + self.cfg.serve.max_queue), 4096)
        server = Server((self.cfg.serve.host, self.cfg.serve.port), Handler)
        self.server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="serve", daemon=True)
        self._thread.start()
        warm = getattr(self.backend, "warm_up", None)
        if warm is not None:
            threading.Thread(target=warm, name="serve-warm-up", daemon=True).start()
        host, port = server.server_address[:2]
        log.info("serving the fleet on http://%s:%d (OpenAI's API under /v1, Ollama's under /api%s)", host, port,
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

    def key_ok(self) -> bool:
        """Whether the request carries the API key (if this gateway has one)."""
        key = self.gateway.key
        if key is None:
            return True
        given = self.headers.get("Authorization", "")
        return given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), key.encode())

    def _authorised(self) -> bool:
        if self.key_ok():
            return True
        self._error(401, "missing or wrong API key (Authorization: Bearer …)", kind="authentication_error",
                    code="invalid_api_key")
        return False

    def admit(self, refuse: Callable[[int, str, dict[str, str]], None]) -> bool:
        """Take a slot of the gateway, waiting in line if need be; else answer through
        ``refuse`` (503 with Retry-After) and return False. A True must be paired with
        ``self.gateway.admission.leave()``."""
        admission = self.gateway.admission
        why = admission.enter(gone=self.client_gone)
        if why is None:
            return True
        if why == FULL:
            message = (f"server busy: {admission.limit} requests are running and {admission.max_waiting} "
                       "waiting on this gateway; try again shortly")
        elif why == "timeout":
            message = f"server busy: no slot came free within {admission.max_wait_s:g} s; try again shortly"
        else:
            log.info("a client waiting for a slot hung up")
            self.close_connection = True
            return False
        refuse(503, message, {"Retry-After": "1" if why == FULL else "5"})
        return False

    def client_gone(self) -> bool:
        """Whether the client has hung up (an EOF waits on its socket), without reading."""
        conn = self.connection
        try:
            readable, _, _ = select.select([conn], [], [], 0)
            return bool(readable) and not conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except (OSError, ValueError):
            return True

    def watch_gone(self, stop: Stop) -> None:
        """Start a thread that sets ``stop`` when the client hangs up (an EOF on its
        socket). (It waits for readability with select, so the socket's own timeout, which
        the writes use, is left alone.) A bare thread: ``threading.Thread.start`` waits
        for the new thread to run, which on a busy machine put a millisecond or more
        before every request's orchestration."""
        conn = self.connection

        def watch() -> None:
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
        _thread.start_new_thread(watch, ())

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
            admission = self.gateway.admission
            self._json(200 if connected else 503, {"status": "ok" if connected else "broker not connected",
                                                   "device": self.gateway.cfg.device_id,
                                                   "running": admission.running, "waiting": admission.waiting})
            return
        if path == "/" or path.startswith("/api/"):
            from agent import ollama
            ollama.get(self, path)
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

    def do_HEAD(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        from agent import ollama
        ollama.head(self, path)

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        if path.startswith("/api/"):
            from agent import ollama
            ollama.post(self, path)
            return
        if path not in ("/v1/chat/completions", "/v1/completions"):
            self._error(404, f"no route {path}", code="not_found")
            return
        if not self._authorised():
            return
        chat = path == "/v1/chat/completions"
        try:
            body = self._body()
            conversation = None
            if chat:
                conversation = chat_of_openai(body)
                prompt = conversation.transcript()
            else:
                raw: Any = body.get("prompt")
                if isinstance(raw, list) and len(raw) == 1:
                    raw = raw[0]
                if not isinstance(raw, str) or not raw.strip():
                    raise BadRequest(400, "prompt must be a non-empty string", param="prompt")
                prompt = raw
            max_new = body.get("max_completion_tokens", body.get("max_tokens"))
            ask = prompt_of(prompt, DEFAULT_MAX_TOKENS if max_new is None else max_new, model_of(body),
                            body.get("temperature"), conversation, names=OPENAI_NAMES)
            stream = body.get("stream") is True
            usage_in_stream = isinstance(body.get("stream_options"), dict) and \
                body["stream_options"].get("include_usage") is True
        except BadRequest as exc:
            self._error(exc.status, str(exc), code=exc.code, param=exc.param)
            return
        if not self.admit(lambda status, message, headers: self._error(
                status, message, kind="server_error", code="server_busy", headers=headers)):
            return
        try:
            self._complete(ask, chat=chat, stream=stream, usage_in_stream=usage_in_stream,
                           shown_model=str(body.get("model") or DEFAULT_MODEL))
        finally:
            self.gateway.admission.leave()

    # ------------------------------------------------------------------ one completion
    def _complete(self, ask: Prompt, *, chat: bool, stream: bool, usage_in_stream: bool, shown_model: str) -> None:
        stop = Stop()
        cid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        started = {"headers": False}
        lock = threading.Lock()
        obj_kind = "chat.completion.chunk" if chat else "text_completion"

        def headers(device: str | None) -> None:
            if started["headers"] or not stream:
                return
            started["headers"] = True
            self.begin_stream("text/event-stream", device)
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

        answered, failure = self.run_backend(ask, on_decision, on_token, stop)
        if failure is not None and failure[2] == "client_gone":
            return
        finish = "stop"  # the engine's reason where it gave one; a guess for executors that cannot say
        if answered is not None and answered.finish_reason:
            finish = answered.finish_reason
        elif answered is not None and answered.completion_tokens >= ask.max_new_tokens:
            finish = "length"
        if answered is not None and answered.tool_calls:
            finish = "tool_calls"
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
            calls = [{"id": c.id or f"call_{i}", "type": "function",
                      "function": {"name": c.name, "arguments": json.dumps(dict(c.arguments), ensure_ascii=False)}}
                     for i, c in enumerate(answered.tool_calls)]
            if stream:
                headers(answered.winner)
                if calls:
                    self._event({"id": cid, "object": obj_kind, "created": created, "model": shown_model,
                                 "choices": [{"index": 0, "delta": {"tool_calls": [
                                     {"index": i, **c} for i, c in enumerate(calls)]}, "finish_reason": None}]},
                                stop)
                last: dict[str, Any] = {"delta": {}} if chat else {"text": ""}
                self._event({"id": cid, "object": obj_kind, "created": created, "model": shown_model,
                             "choices": [{"index": 0, **last, "finish_reason": finish}], **extension}, stop)
                if usage_in_stream:
                    self._event({"id": cid, "object": obj_kind, "created": created, "model": shown_model,
                                 "choices": [], "usage": usage}, stop)
                self._done_stream()
                return
            reply: dict[str, Any] = {"role": "assistant", "content": answered.text or (None if calls else "")}
            if calls:
                reply["tool_calls"] = calls
            choice: dict[str, Any] = {"message": reply} if chat else {"text": answered.text}
            self._json(200, {"id": cid, "object": "chat.completion" if chat else "text_completion",
                             "created": created, "model": shown_model,
                             "choices": [{"index": 0, **choice, "finish_reason": finish}],
                             "usage": usage, **extension},
                       headers={"X-Edge-Agent-Device": answered.winner or ""})

    def begin_stream(self, content_type: str, device: str | None) -> None:
        """The headers of a streamed answer (SSE, NDJSON): not cached, the connection closed
        at its end, and who answers once that is known."""
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        if device:
            self.send_header("X-Edge-Agent-Device", device)
        self.end_headers()

    def run_backend(self, ask: Prompt, on_decision: Callable[[str, str | None], None], on_token: Callable[[str], None],
                    stop: Stop) -> tuple[Answered | None, tuple[int, str, str] | None]:
        """Run one request through the backend while watching for the client to hang up:
        (the answer, or None; the failure as (status, message, code), or None). The code
        "client_gone" means the client left and its job was cancelled: nothing to send."""
        self.watch_gone(stop)
        try:
            answered = self.gateway.backend.run(ask, on_decision, on_token, stop)
        except PromptTooLarge as exc:
            return None, (413, str(exc), "prompt_too_large")
        except AgentError as exc:
            return None, (STATUS_OF.get(exc.exit_code, 500), str(exc), "edge_agent_error")
        finally:
            stop_was = stop.is_set()
            # Ends the watcher, at its next look (within 0.5 s). Not joined: waiting for it
            # held every answer's end back by up to 0.5 s; it only peeks, so a next
            # request on the connection is left for the handler to read.
            stop.set()
        if answered.ok:
            return answered, None
        if stop_was:
            log.info("client of %s went away; its job was cancelled", answered.rid)
            self.close_connection = True
            return answered, (499, "client gone", "client_gone")
        code = ExitCode(answered.exit_code) if answered.exit_code in ExitCode._value2member_map_ \
            else ExitCode.FAILED
        err_code = ERROR_CODES.get(answered.kind)
        status = 404 if err_code == "model_not_found" else 400 if err_code else STATUS_OF.get(code, 502)
        return answered, (status, answered.error or "failed", err_code or "edge_agent_error")

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
