"""The CPU admission gate of a device: a slot limit and a FIFO queue behind it.

``slots`` jobs run at once, each on its own worker thread; up to ``max_queue`` more wait
in arrival order; beyond that a job is refused (``queue_full``). ``depth`` (running plus
waiting) is what the device advertises in its bids and metrics.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class Gate(Generic[T]):
    def __init__(self, slots: int, max_queue: int, work: Callable[[T], None], *, name: str = "cpu-slot"):
        self.slots = slots
        self.max_queue = max_queue
        self._work = work
        self._queue: queue.Queue[T | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self._busy = 0
        self._threads = [threading.Thread(target=self._worker, name=f"{name}-{i}", daemon=True)
                         for i in range(slots)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    @property
    def depth(self) -> int:
        """Jobs running or waiting."""
        with self._lock:
            return self._waiting + self._busy

    def has_room(self) -> bool:
        with self._lock:
            return self._waiting + self._busy < self.slots + self.max_queue

    def offer(self, item: T) -> int | None:
        """Queue ``item``: its position (0 = runs at once), or None if the gate is full."""
        with self._lock:
            depth = self._waiting + self._busy
            if depth >= self.slots + self.max_queue:
                return None
            self._waiting += 1
        self._queue.put(item)
        return depth

    def stop(self, timeout: float = 5.0) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout)

    def _worker(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            with self._lock:
                self._waiting -= 1
                self._busy += 1
            try:
                self._work(item)
            except Exception:  # a bug in one job must not take a slot away for good
                log.exception("%s: a job failed outside its executor", threading.current_thread().name)
            finally:
                with self._lock:
                    self._busy -= 1
