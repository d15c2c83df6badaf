"""Which devices changed since a consumer last looked: a source's feed of them.

A source (the roster, an asker's memory) keeps one ``Changes`` per consumer and adds a
device to each whenever that device's entry changes, its own lock held; the consumer
``take``s the set under the same lock and reads only those entries again. A thousand
devices then cost their changes, not a pass over all of them, wherever something is
kept in step with a source (``agent.invite.Rows``).
"""

from __future__ import annotations

import threading
import weakref


class Changes:
    """The devices changed since the consumer last took them."""

    def __init__(self, lock: threading.Lock | threading.RLock):
        self._lock = lock
        self.devices: set[str] = set()

    def take(self) -> set[str]:
        with self._lock:
            return self.drain()

    def drain(self) -> set[str]:
        """``take`` with the source's lock held already."""
        out, self.devices = self.devices, set()
        return out


class Feeds:
    """A source's consumers' ``Changes``, held weakly: a consumer that is gone is dropped when
    the next one opens (a WeakSet cost 3 µs a change in its iteration guard)."""

    def __init__(self, lock: threading.Lock | threading.RLock):
        self._lock = lock
        self._all: list[weakref.ref[Changes]] = []

    def open(self) -> Changes:
        with self._lock:
            return self.opened()

    def opened(self) -> Changes:
        """``open`` with the source's lock held already."""
        changes = Changes(self._lock)
        self._all = [ref for ref in self._all if ref() is not None] + [weakref.ref(changes)]
        return changes

    def touch(self, device: str) -> None:
        """``device`` changed (the source's lock held)."""
        for ref in self._all:
            if (changes := ref()) is not None:
                changes.devices.add(device)
