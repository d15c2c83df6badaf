"""The node's local control socket: how ``trigger`` and ``status`` use a running daemon.

Theory of operation. A device has one identity on the broker — its ``device_id``, which
a production broker also enforces as the client id (``use_username_as_clientid``) — and
one capacity truth. So while a node daemon runs, the other processes of the device do not
connect to the broker themselves: they hand their request to the daemon over a Unix
socket and it answers over the same connection. That also makes a trigger faster (the
daemon's fleet connection is warm: no connect, no roster sync). With no daemon running,
``trigger`` and ``status`` connect to the broker directly, as before.

The socket lives in Linux's abstract namespace, named after the real path of
``state_dir`` (a filesystem path could exceed the 108-byte limit of a socket address);
only processes of the daemon's own user (or root) are served, checked with
``SO_PEERCRED``. The protocol is JSON lines: one request, then a stream of events —
``decision``, ``progress``, ``token`` — and a final ``outcome`` (the object
``trigger --json`` prints), ``status``, ``forgot`` or ``error``. A client that hangs up
(Ctrl-C) cancels its job. Both directions are typed: the dataclasses below, each with
``to_obj``, and ``decode_request`` / ``decode_event``, the only places a line is read.
A trigger carries a ``messages.Prompt``, checked by the same rules as on every front.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from agent.errors import ExitCode, UsageError
from agent.messages import Prompt
from agent.topics import is_id

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024 * 1024  # a prompt is refused by size later, with a clear message


def address(state_dir: Path) -> str:
    """The abstract socket name of the daemon that owns ``state_dir``."""
    real = os.path.realpath(state_dir)
    return "\0edge-agent-" + hashlib.sha256(real.encode()).hexdigest()[:24]


# ---------------------------------------------------------------------------- requests
@dataclass(frozen=True)
class StatusRequest:
    """The roster as the daemon sees it."""

    op: ClassVar[str] = "status"

    def to_obj(self) -> dict[str, Any]:
        return {"op": self.op}


@dataclass(frozen=True)
class ForgetRequest:
    """Clear a retired device's retained topics, through the daemon's connection."""

    device: str
    force: bool = False
    op: ClassVar[str] = "forget"

    def to_obj(self) -> dict[str, Any]:
        return {"op": self.op, "device": self.device, "force": self.force}


@dataclass(frozen=True)
class PromptRequest:
    """One prompt, orchestrated by the daemon; events stream back until the outcome."""

    ask: Prompt
    op: ClassVar[str] = "trigger"

    def to_obj(self) -> dict[str, Any]:
        return {"op": self.op, **self.ask.to_obj()}


Request = StatusRequest | ForgetRequest | PromptRequest


def decode_request(obj: dict[str, Any]) -> Request:
    """The typed request of a parsed line; UsageError (BadPrompt for a prompt) if wrong."""
    op = obj.get("op")
    if op == "status":
        return StatusRequest()
    if op == "forget":
        device = obj.get("device")
        if not isinstance(device, str) or not is_id(device):
            raise UsageError("forget: a device id other than this node's")
        return ForgetRequest(device, obj.get("force") is True)
    if op == "trigger":
        return PromptRequest(Prompt.from_obj(obj))
    raise UsageError(f"unknown request {op!r}")


# ---------------------------------------------------------------------------- events
@dataclass(frozen=True)
class Decision:
    winner: str
    path: str
    score: float | None = None
    type: ClassVar[str] = "decision"

    def to_obj(self) -> dict[str, Any]:
        return {"type": self.type, "winner": self.winner, "path": self.path, "score": self.score}


@dataclass(frozen=True)
class Progress:
    text: str
    type: ClassVar[str] = "progress"

    def to_obj(self) -> dict[str, Any]:
        return {"type": self.type, "text": self.text}


@dataclass(frozen=True)
class Text:
    """A piece of the answer as it streams."""

    text: str
    type: ClassVar[str] = "token"

    def to_obj(self) -> dict[str, Any]:
        return {"type": self.type, "text": self.text}


@dataclass(frozen=True)
class Outcome:
    """The end of a trigger: the object ``trigger --json`` prints (its keys are public),
    and ``kind``, why no device ran it where that has a name (``dispatch.Answer.kind``)."""

    outcome: dict[str, Any]
    kind: str = ""
    type: ClassVar[str] = "outcome"

    def to_obj(self) -> dict[str, Any]:
        return {"type": self.type, "outcome": self.outcome, "kind": self.kind}


@dataclass(frozen=True)
class Status:
    devices: list[dict[str, Any]]
    type: ClassVar[str] = "status"

    def to_obj(self) -> dict[str, Any]:
        return {"type": self.type, "devices": self.devices}


@dataclass(frozen=True)
class Forgot:
    cleared: list[str]
    type: ClassVar[str] = "forgot"

    def to_obj(self) -> dict[str, Any]:
        return {"type": self.type, "cleared": self.cleared}


@dataclass(frozen=True)
class Failure:
    """The request could not be served; ``exit_code`` is what the command exits with."""

    error: str
    exit_code: ExitCode = ExitCode.FAILED
    type: ClassVar[str] = "error"

    def to_obj(self) -> dict[str, Any]:
        return {"type": self.type, "error": self.error, "exit_code": int(self.exit_code)}


Event = Decision | Progress | Text | Outcome | Status | Forgot | Failure


def _exit_code(value: object) -> ExitCode:
    return ExitCode(value) if type(value) is int and value in ExitCode._value2member_map_ else ExitCode.FAILED


def decode_event(obj: dict[str, Any]) -> Event:
    """The typed event of a line the daemon sent; ValueError if it is not one."""
    kind = obj.get("type")
    try:
        if kind == "decision":
            score = obj.get("score")
            return Decision(str(obj["winner"]), str(obj["path"]), None if score is None else float(score))
        if kind in ("progress", "token"):
            text = obj["text"]
            if not isinstance(text, str):
                raise ValueError("text must be a string")
            return Progress(text) if kind == "progress" else Text(text)
        if kind == "outcome" and isinstance(obj.get("outcome"), dict):
            return Outcome(obj["outcome"], str(obj.get("kind") or ""))
        if kind == "status" and isinstance(obj.get("devices"), list):
            return Status(obj["devices"])
        if kind == "forgot" and isinstance(obj.get("cleared"), list):
            return Forgot([str(t) for t in obj["cleared"]])
        if kind == "error":
            return Failure(str(obj.get("error", "the daemon refused")), _exit_code(obj.get("exit_code")))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"a {kind} event that does not fit: {exc}") from None
    raise ValueError(f"unknown event {str(kind)[:40]!r}")


# ---------------------------------------------------------------------------- the socket
def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


class Channel:
    """One request's connection, from the daemon's side: events out, hang-up detection."""

    def __init__(self, conn: socket.socket):
        self._conn = conn
        self._lock = threading.Lock()
        self.gone = threading.Event()

    def send(self, event: Event) -> None:
        data = (json.dumps(event.to_obj(), ensure_ascii=False) + "\n").encode()
        with self._lock:
            if self.gone.is_set():
                return
            try:
                self._conn.sendall(data)
            except OSError:
                self.gone.set()

    def watch(self, on_gone: Callable[[], None]) -> None:
        """In a thread: the client sends nothing after its request, so EOF means it left."""
        def run() -> None:
            try:
                while self._conn.recv(4096):
                    pass
            except OSError:
                pass
            self.gone.set()
            on_gone()
        threading.Thread(target=run, name="control-watch", daemon=True).start()


Handler = Callable[[Request, Channel], None]


class ControlServer:
    def __init__(self, state_dir: Path, handler: Handler):
        self.name = address(state_dir)
        self._handler = handler
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Listen. If another daemon already owns this state_dir, say so in the log and go
        on without a control socket: this device's commands then reach that daemon."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(self.name)
        except OSError as exc:
            sock.close()
            log.warning("control socket for this state_dir is taken (%s): is another node running here?", exc)
            return
        sock.listen(64)
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _serve(self) -> None:
        while self._sock is not None:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), name="control-request", daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            channel = Channel(conn)
            try:
                if _peer_uid(conn) not in (os.getuid(), 0):
                    channel.send(Failure("not the daemon's user", ExitCode.USAGE))
                    return
                request = decode_request(_read_request(conn))
            except UsageError as exc:
                channel.send(Failure(str(exc), exc.exit_code))
                return
            except (OSError, ValueError) as exc:
                channel.send(Failure(f"bad request: {exc}", ExitCode.USAGE))
                return
            try:
                self._handler(request, channel)
            except Exception as exc:  # never let one request take the daemon down
                log.exception("control request failed")
                channel.send(Failure(f"internal error in the daemon: {exc}", ExitCode.INTERNAL))


def _read_request(conn: socket.socket) -> dict[str, Any]:
    for line in _lines(conn, MAX_REQUEST):
        return parse_request(line)
    raise ValueError("no request")


def _lines(sock: socket.socket, limit: int) -> Iterator[bytes]:
    """The newline-ended lines a socket sends, until it hangs up (ValueError past ``limit``)."""
    buffer = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield line
        if len(buffer) > limit:
            raise ValueError("request too large")


def parse_request(data: bytes) -> dict[str, Any]:
    """The request on the first line of ``data``; ValueError if it is not a JSON object."""
    line = data.split(b"\n", 1)[0]
    try:
        obj = json.loads(line.decode("utf-8"))
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if not isinstance(obj, dict):
        raise ValueError("a request is a JSON object")
    return obj


def connect(state_dir: Path) -> socket.socket | None:
    """The running daemon of ``state_dir``, or None if there is none."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(address(state_dir))
    except OSError:
        sock.close()
        return None
    return sock


def running(state_dir: Path) -> bool:
    """Whether a node daemon serves ``state_dir`` right now."""
    sock = connect(state_dir)
    if sock is None:
        return False
    sock.close()
    return True


def request(sock: socket.socket, req: Request) -> Iterator[Event]:
    """Send one request; yield the daemon's events until it hangs up (ValueError for a
    line that is not an event)."""
    sock.sendall((json.dumps(req.to_obj(), ensure_ascii=False) + "\n").encode())
    for line in _lines(sock, MAX_REQUEST):
        if line.strip():
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError("an event is a JSON object")
            yield decode_event(obj)
