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
``trigger --json`` prints) or ``error``. A client that hangs up (Ctrl-C) cancels its job.
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
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024 * 1024  # a prompt is refused by size later, with a clear message


def address(state_dir: Path) -> str:
    """The abstract socket name of the daemon that owns ``state_dir``."""
    real = os.path.realpath(state_dir)
    return "\0edge-agent-" + hashlib.sha256(real.encode()).hexdigest()[:24]


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

    def send(self, event: dict[str, Any]) -> None:
        data = (json.dumps(event, ensure_ascii=False) + "\n").encode()
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


Handler = Callable[[dict[str, Any], Channel], None]


class ControlServer:
    def __init__(self, state_dir: Path, handler: Handler):
        self.name = address(state_dir)
        self._handler = handler
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> bool:
        """Listen; False (logged) if another daemon already owns this state_dir."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(self.name)
        except OSError as exc:
            sock.close()
            log.warning("control socket for this state_dir is taken (%s): is another node running here?", exc)
            return False
        sock.listen(64)
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self._thread.start()
        return True

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
                    channel.send({"type": "error", "error": "not the daemon's user", "exit_code": 2})
                    return
                request = _read_request(conn)
            except (OSError, ValueError) as exc:
                channel.send({"type": "error", "error": f"bad request: {exc}", "exit_code": 2})
                return
            try:
                self._handler(request, channel)
            except Exception as exc:  # never let one request take the daemon down
                log.exception("control request failed")
                channel.send({"type": "error", "error": f"internal error in the daemon: {exc}", "exit_code": 70})


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


def request(sock: socket.socket, req: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Send one request; yield the daemon's events until it hangs up."""
    sock.sendall((json.dumps(req, ensure_ascii=False) + "\n").encode())
    for line in _lines(sock, MAX_REQUEST):
        if line.strip():
            yield json.loads(line)
