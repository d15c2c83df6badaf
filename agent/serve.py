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

The HTTP layer is the standard library's HTTP server with a thread per connection: what
a handful of streaming clients on a phone or a board need, it adds no dependency, and a
blocked client blocks only its own thread. The threads are kept waiting between
connections (``Workers``): starting one was the largest single cost on a request's path.
Concurrency is bounded (``serve.max_concurrent``); past it requests wait in one line
shared by both fronts (agent/admission.py), and past ``serve.max_queue`` get 503 at once.
Response headers wait for the decision, so ``X-Edge-Agent-Device`` names who answers and
an error before any token is a proper HTTP status; a client that hangs up (noticed by a
peek on its socket, or a failed write) cancels its job on whichever device runs it.

What OpenAI's requests mean and how its answers are shaped is pure, in agent/openai_api.py
(Ollama's, in agent/ollama.py); this module routes, admits, runs and streams.

Chat travels as chat (messages, tools, output format) to executors that speak it; the
others get a "Role: text" transcript and apply their model's chat template. Tool calls
come back with arguments as an object; this front sends them on as a JSON string.
"""

from __future__ import annotations

import _thread
import hmac
import itertools
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
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, Protocol

from agent import control
from agent.admission import FULL, Admission
from agent.config import Config
from agent.errors import AgentError, ExitCode, PromptTooLarge, UsageError
from agent.messages import ModelInfo, Prompt, Timings, ToolCall
from agent.openai_api import (
    STATUS_OF,
    Answered,
    BadRequest,
    Completion,
    Reply,
    completion_request,
    error_body,
    error_kind,
    failure_of,
    finish_of,
    fleet_models,
    json_body,
    models_list,
    stream_error,
)

log = logging.getLogger(__name__)

MAX_BODY = 4 * 1024 * 1024
# Connection threads kept waiting (Workers): serve.max_concurrent of them, up to this many;
# WARM_WORKERS of them started with the server, so the first request finds one.
MAX_IDLE_WORKERS = 32
WARM_WORKERS = 2


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

    def __init__(self, make: Callable[[], Any], fleet: Callable[[], Any], own_models: list[ModelInfo], me: str):
        self._make = make
        self._fleet = fleet
        self._own = own_models
        self._me = me
        # Last in, first out: the orchestrator used last is the one whose caches (the arm
        # store's parsed state) are still valid; alternating between two reparsed the arm
        # store on every decision (~0.3 ms of CPU before the job is sent).
        self._idle: queue.LifoQueue[Any] = queue.LifoQueue()

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
        served = [(self._me, info) for info in self._own]
        try:
            roster = self._fleet().roster
        except AgentError:
            return fleet_models(served)
        online = roster.online()
        served += [(device, info) for device, metrics in roster.metrics().items()
                   if device in online and device != self._me for info in metrics.snapshot.models.values()]
        return fleet_models(served)

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
        served = [(row["device"], ModelInfo(info["name"], tuple(info.get("aliases", [])), info.get("context"),
                                            tools=info.get("tools") is True))
                  for event in self._request(control.StatusRequest()) if isinstance(event, control.Status)
                  for row in event.devices if row.get("online") for info in (row.get("models") or {}).values()]
        return fleet_models(served)

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


def own_models(*executors: Any) -> list[ModelInfo]:
    """What this process's own executors serve (None: not running), for ``fleet_models``."""
    return [e.model_info() for e in executors if e is not None]


# ----------------------------------------------------------------------------- the server

class Gateway:
    def __init__(self, cfg: Config, backend: Backend):
        self.cfg = cfg
        self.backend = backend
        self.admission = Admission(cfg.serve.max_concurrent, cfg.serve.max_queue, cfg.serve.max_wait_s)
        self.key = _api_key(cfg)
        self.server: _PooledServer | None = None
        self.workers = Workers(min(cfg.serve.max_concurrent, MAX_IDLE_WORKERS), "serve-conn")
        self._thread: threading.Thread | None = None

    def start(self) -> tuple[str, int]:
        gateway = self

        class Handler(_Handler):
            pass
        Handler.gateway = gateway

        class Server(_PooledServer):
            # The listen backlog: socketserver's default of 5 resets the sixth client of a
            # burst before it is accepted; the line holds max_queue of them.
            request_queue_size = min(max(64, self.cfg.serve.max_concurrent + self.cfg.serve.max_queue), 4096)
        server = Server((self.cfg.serve.host, self.cfg.serve.port), Handler)
        server.workers = self.workers
        self.server = server
        self.workers.start(WARM_WORKERS)
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
        self.workers.stop()


class Workers:
    """Threads kept waiting for the next connection to serve. A new thread ran ~1.8 ms
    after it was started on the 2-core test VM (``Thread.start`` waits for that), on
    every request's path, while one waiting on a queue takes its job in ~0.03 ms. A job
    that finds none waiting gets a thread of its own, so a slow client still holds up
    only its own thread; once done, up to ``keep`` of them wait for the next."""

    def __init__(self, keep: int, name: str):
        self.keep = keep
        self.name = name
        self._lock = threading.Condition()  # notified when a thread is back to wait
        self._idle = 0          # threads waiting on _jobs for which no job has been put yet
        self._stopped = False
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._numbers = itertools.count(1)

    def wait_idle(self, n: int, timeout: float) -> bool:
        """Until ``n`` threads wait for jobs, or ``timeout`` passes (tests)."""
        with self._lock:
            return self._lock.wait_for(lambda: self._idle == n, timeout)

    def start(self, n: int) -> None:
        """Start ``n`` threads (at most ``keep``) that wait for jobs."""
        for _ in range(min(n, self.keep)):
            with self._lock:
                self._idle += 1
            self._spawn(None)

    def run(self, job: Callable[[], None]) -> None:
        """Run ``job`` on a waiting thread, or on a new one if none waits."""
        with self._lock:
            if self._idle and not self._stopped:
                self._idle -= 1
                self._jobs.put(job)
                return
        self._spawn(job)

    def stop(self) -> None:
        """Let the waiting threads end (those at work end after their job)."""
        with self._lock:
            self._stopped = True
            idle, self._idle = self._idle, 0
        for _ in range(idle):
            self._jobs.put(None)

    def _spawn(self, job: Callable[[], None] | None) -> None:
        threading.Thread(target=self._serve, args=(job,), name=f"{self.name}-{next(self._numbers)}",
                         daemon=True).start()

    def _serve(self, job: Callable[[], None] | None) -> None:
        if job is None:
            job = self._jobs.get()
        while job is not None:
            try:
                job()
            except Exception:  # a job's bug must not end the thread quietly
                log.exception("%s: a job failed", threading.current_thread().name)
            with self._lock:
                if self._stopped or self._idle >= self.keep:
                    return
                self._idle += 1
                self._lock.notify_all()
            job = self._jobs.get()


class _PooledServer(HTTPServer):
    """The standard library's HTTP server with each connection served on a ``Workers``
    thread (``ThreadingHTTPServer`` starts a thread per connection)."""

    workers: Workers

    def process_request(self, request: Any, client_address: Any) -> None:
        self.workers.run(lambda: self._serve(request, client_address))

    def _serve(self, request: Any, client_address: Any) -> None:
        """What ``ThreadingMixIn.process_request_thread`` does."""
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)


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


def _busy(admission: Admission, why: str) -> str | None:
    """Why a request got no slot, for the client (None: it hung up while waiting)."""
    if why == FULL:
        return (f"server busy: {admission.limit} requests are running and {admission.max_waiting} "
                "waiting on this gateway; try again shortly")
    if why == "timeout":
        return f"server busy: no slot came free within {admission.max_wait_s:g} s; try again shortly"
    return None


def _hung_up(conn: socket.socket) -> bool:
    """Whether the peer of ``conn`` has hung up (an EOF waits on it), without reading."""
    try:
        readable, _, _ = select.select([conn], [], [], 0)
        return bool(readable) and not conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    except (OSError, ValueError):
        return True


def _watch_gone(conn: socket.socket, stop: Stop) -> None:
    """Start a thread that sets ``stop`` when the client hangs up (an EOF on its
    socket). (It waits for readability with select, so the socket's own timeout, which
    the writes use, is left alone.) A bare thread: ``threading.Thread.start`` waits
    for the new thread to run, which on a busy machine put a millisecond or more
    before every request's orchestration."""
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
        self._json(status, error_body(message, kind=kind, code=code, param=param), headers)

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
        message = _busy(admission, why)
        if message is None:
            log.info("a client waiting for a slot hung up")
            self.close_connection = True
            return False
        refuse(503, message, {"Retry-After": "1" if why == FULL else "5"})
        return False

    def client_gone(self) -> bool:
        """Whether the client has hung up (an EOF waits on its socket), without reading."""
        return _hung_up(self.connection)

    def _body(self) -> dict[str, Any]:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise BadRequest(411 if length is None else 400, "a JSON body with Content-Length is required")
        if int(length) > MAX_BODY:
            raise BadRequest(413, f"request body over {MAX_BODY} bytes")
        return json_body(self.rfile.read(int(length)))

    # ------------------------------------------------------------------ routes
    def do_GET(self) -> None:
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
            self._json(200, models_list(self.gateway.backend.models()))
            return
        self._error(404, f"no route {path}", code="not_found")

    def do_HEAD(self) -> None:
        path = self.path.split("?", 1)[0]
        from agent import ollama
        ollama.head(self, path)

    def do_POST(self) -> None:
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
        try:
            request = completion_request(self._body(), chat=path == "/v1/chat/completions")
        except BadRequest as exc:
            self._error(exc.status, str(exc), code=exc.code, param=exc.param)
            return
        if not self.admit(lambda status, message, headers: self._error(
                status, message, kind="server_error", code="server_busy", headers=headers)):
            return
        try:
            self._complete(request)
        finally:
            self.gateway.admission.leave()

    # ------------------------------------------------------------------ one completion
    def _complete(self, request: Completion) -> None:
        stop = Stop()
        reply = Reply(("chatcmpl-" if request.chat else "cmpl-") + uuid.uuid4().hex[:24], int(time.time()),
                      request.shown_model, request.chat)
        sse = _Events(self, reply, stop) if request.stream else None
        lock = threading.Lock()  # tokens and the decision come from the backend's threads

        def on_decision(device: str, path: str | None) -> None:
            with lock:
                if sse is not None:
                    sse.begin(device)

        def on_token(text: str) -> None:
            with lock:
                if sse is not None:
                    sse.begin(None)
                    sse.send(reply.token(text))

        answered, failure = self.run_backend(request.ask, on_decision, on_token, stop)
        if failure is not None and failure[2] == "client_gone":
            return
        with lock:
            if failure is not None:
                status, message, code_name = failure
                if sse is not None and sse.started:  # mid-stream: the error as an event, then the end
                    sse.send(stream_error(message, code_name))
                    sse.end()
                else:
                    self._error(status, message, kind=error_kind(status), code=code_name)
                return
            assert answered is not None
            finish = finish_of(answered, request.ask.max_new_tokens)
            if sse is None:
                self._json(200, reply.whole(answered, finish), headers={"X-Edge-Agent-Device": answered.winner or ""})
                return
            sse.begin(answered.winner)
            for chunk in reply.stream(answered, finish=finish, usage=request.usage_in_stream):
                sse.send(chunk)
            sse.end()

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
        _watch_gone(self.connection, stop)
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
        return answered, failure_of(answered)


class _Events:
    """One answer streamed as server-sent events: the headers once (and a chat's first
    chunk), then events, then ``[DONE]``. A failed write sets ``stop``: the client is
    gone, and the backend cancels the job."""

    def __init__(self, handler: _Handler, reply: Reply, stop: Stop):
        self.handler, self.reply, self.stop = handler, reply, stop
        self.started = False

    def begin(self, device: str | None) -> None:
        if self.started:
            return
        self.started = True
        self.handler.begin_stream("text/event-stream", device)
        opening = self.reply.opening()
        if opening is not None:
            self.send(opening)

    def send(self, obj: dict[str, Any]) -> None:
        try:
            self.handler.wfile.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")
            self.handler.wfile.flush()
        except OSError:
            self.stop.set()

    def end(self) -> None:
        try:
            self.handler.wfile.write(b"data: [DONE]\n\n")
            self.handler.wfile.flush()
        except OSError:
            pass
        self.handler.close_connection = True
