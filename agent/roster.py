"""The live roster: which devices are online, learned from retained availability topics.

A node's Will sets its availability to ``offline`` the moment the broker loses it, so the
roster shrinks during an auction and the auction can close early. Listeners hear every
change; they are called on the bus dispatcher thread and must only queue.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

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


class ArrivalWatch:
    """Waits for devices to announce ``online`` live (not a retained value from the past):
    what a launcher (the demo, the benchmarks, the soak) needs after starting a node."""

    def __init__(self, bus: Any, topics: Topics):
        self._topics = topics
        self._lock = threading.Lock()
        self._events: dict[str, threading.Event] = {}
        bus.subscribe(topics.all_availability(), self._handle)

    def _event(self, device: str) -> threading.Event:
        with self._lock:
            return self._events.setdefault(device, threading.Event())

    def _handle(self, msg: Message) -> None:
        parsed = self._topics.parse(msg.topic)
        if parsed and parsed.device and msg.payload == b"online" and not msg.retain:
            self._event(parsed.device).set()

    def expect(self, device: str) -> None:
        """Call before starting the device: forget any earlier arrival."""
        self._event(device).clear()

    def wait(self, device: str, timeout: float) -> bool:
        return self._event(device).wait(timeout)
