"""The live roster: which devices are online, learned from retained availability topics.

A node's Will sets its availability to ``offline`` the moment the broker loses it, so the
roster shrinks during an auction and the auction can close early. Listeners hear every
change; they are called on the bus dispatcher thread and must only queue.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from agent.bus import Message
from agent.topics import Topics

log = logging.getLogger(__name__)

Listener = Callable[[str, bool], None]


class Roster:
    def __init__(self, topics: Topics, self_device: str):
        self.topics = topics
        self.self_device = self_device
        self._lock = threading.Lock()
        self._state: dict[str, bool] = {}
        self._listeners: list[Listener] = []

    def handle(self, msg: Message) -> None:
        """Bus handler for ``agent/+/availability``."""
        parsed = self.topics.parse(msg.topic)
        if parsed is None or parsed.kind != "availability" or parsed.device is None:
            return
        if msg.payload in (b"online", b"offline"):
            online = msg.payload == b"online"
        elif msg.payload == b"":
            online = False  # retained availability cleared: the device was retired
        else:
            log.warning("ignoring availability %r for %s (want online/offline)", msg.payload[:40], parsed.device)
            return
        with self._lock:
            changed = self._state.get(parsed.device) != online
            self._state[parsed.device] = online
            listeners = list(self._listeners)
        if changed:
            log.debug("roster: %s is %s", parsed.device, "online" if online else "offline")
            for listener in listeners:
                listener(parsed.device, online)

    def online(self) -> frozenset[str]:
        """Every online device, this one included (its node daemon, if it runs)."""
        with self._lock:
            return frozenset(d for d, up in self._state.items() if up)

    def peers_online(self) -> frozenset[str]:
        """Online devices other than this one."""
        with self._lock:
            return frozenset(d for d, up in self._state.items() if up and d != self.self_device)

    def known(self) -> dict[str, bool]:
        with self._lock:
            return dict(self._state)

    def listen(self, listener: Listener) -> Callable[[], None]:
        with self._lock:
            self._listeners.append(listener)

        def remove() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)
        return remove
