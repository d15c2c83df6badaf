"""A loopback TCP proxy with a `cut()` switch: a client's network connection, broken on demand.

    with CuttableProxy(broker_host, broker_port) as proxy:
        ...connect a client to 127.0.0.1:proxy.port...
        proxy.cut()      # every live connection is reset, as a network blink would

New connections are accepted again right after a cut, so the client's reconnect works.
``delay_s`` makes it a slow link: every byte is held that long in each direction (a
round trip costs twice it), without limiting throughput.
"""

from __future__ import annotations

import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable


class CuttableProxy:
    def __init__(self, target_host: str, target_port: int, delay_s: float = 0.0):
        self.target = (target_host, target_port)
        self.delay_s = delay_s
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._stop = threading.Event()
        self.cuts = 0
        self._thread = threading.Thread(target=self._serve, daemon=True, name="proxy")

    def __enter__(self) -> CuttableProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._listener.close()
        self.cut()

    def cut(self) -> None:
        """Reset every connection now (RST, not a polite close)."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
            self.cuts += 1
        for pair in pairs:
            for s in pair:
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    s.close()
                except OSError:
                    pass

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._pairs.append((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True, name="proxy-pump").start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        sel.register(a, selectors.EVENT_READ, self._sender(b))
        sel.register(b, selectors.EVENT_READ, self._sender(a))
        try:
            while True:
                for key, _ in sel.select():
                    data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                    if not data:
                        return
                    key.data(data)
        except (OSError, ValueError):
            return
        finally:
            for key in list(sel.get_map().values()):
                try:
                    key.data(b"")  # a slow link's carrier thread ends (what it still holds is lost, as on a cut)
                except OSError:
                    pass
            sel.close()
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass

    def _sender(self, dest: socket.socket) -> Callable[[bytes], None]:
        """How bytes are passed on to ``dest``: at once, or ``delay_s`` after they were read
        (by a thread of their own, in order, so a slow link still carries a stream)."""
        if not self.delay_s:
            return dest.sendall
        line: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()

        def carry() -> None:
            while True:
                due, data = line.get()
                if not data:
                    return
                if self._stop.wait(max(0.0, due - time.monotonic())):  # the link's latency; ends with the proxy
                    return
                try:
                    dest.sendall(data)
                except OSError:
                    return

        threading.Thread(target=carry, daemon=True, name="proxy-slow-link").start()
        return lambda data: line.put((time.monotonic() + self.delay_s, data))
