"""The CPU admission gate of a device: a slot limit and a FIFO queue behind it.

``slots`` jobs run at once, each on its own worker thread; up to ``max_queue`` more wait
in arrival order; beyond that a job is refused (``queue_full``). Every CPU job the device
runs passes here — a peer's, its own trigger's, a Home Assistant prompt's — so ``depth``
(running plus waiting) and ``backlog_s`` (when a job arriving now would start, from the
expected time of each job: ``agent.servicemodel``) are the one capacity truth it
advertises in its bids and metrics.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

from agent.servicemodel import expected_wait, remaining

log = logging.getLogger(__name__)
T = TypeVar("T")


class Gate(Generic[T]):
    def __init__(self, slots: int, max_queue: int, work: Callable[[T, int], None], *,
                 expected: Callable[[T], float], clock: Callable[[], float] = time.monotonic,
                 name: str = "cpu-slot"):
        """``work(item, slot)`` runs an item on slot ``slot``; ``expected(item)`` is its
        expected service time in seconds."""
        self.slots = slots
        self.max_queue = max_queue
        self._work = work
        self._expected = expected
        self._clock = clock
        self._cond = threading.Condition()
        self._waiting: deque[tuple[T, float]] = deque()       # (item, expected s)
        self._running: dict[int, tuple[float, float]] = {}    # slot -> (started, expected s)
        self._stopping = False
        self._threads = [threading.Thread(target=self._worker, args=(i,), name=f"{name}-{i}", daemon=True)
                         for i in range(slots)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    @property
    def depth(self) -> int:
        """Jobs running or waiting."""
        with self._cond:
            return len(self._waiting) + len(self._running)

    def has_room(self) -> bool:
        with self._cond:
            return len(self._waiting) + len(self._running) < self.slots + self.max_queue

    def backlog_s(self) -> float:
        """Expected seconds before a job arriving now would start."""
        now = self._clock()
        with self._cond:
            running = [remaining(expected, now - started) for started, expected in self._running.values()]
            queued = [expected for _, expected in self._waiting]
        return expected_wait(self.slots, running, queued) if self.slots else 0.0

    def offer(self, item: T) -> int | None:
        """Queue ``item``: its position (0 = runs at once), or None if the gate is full."""
        with self._cond:
            depth = len(self._waiting) + len(self._running)
            if depth >= self.slots + self.max_queue or self._stopping:
                return None
            self._waiting.append((item, self._expected(item)))
            self._cond.notify()
        return depth

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing runs or waits (a draining node); False if time ran out."""
        deadline = self._clock() + timeout
        with self._cond:
            while self._waiting or self._running:
                left = deadline - self._clock()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """No more work is taken; waits up to ``timeout`` for the workers to return."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout)

    def _worker(self, slot: int) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                item, expected = self._waiting.popleft()
                self._running[slot] = (self._clock(), expected)
            try:
                self._work(item, slot)
            except Exception:  # a bug in one job must not take a slot away for good
                log.exception("%s: a job failed outside its executor", threading.current_thread().name)
            finally:
                with self._cond:
                    del self._running[slot]
                    self._cond.notify_all()
