"""How many HTTP requests run at once, and how the rest wait (both fronts of ``serve``).

Theory of operation. At most ``running`` requests hold a slot; the next ``waiting`` wait
in line, first come first served, each for at most ``max_wait_s``; one more is refused at
once ("full"). A slot that frees is handed straight to the head of the line (the running
count does not drop and rise again, so nobody can jump the line in between). A waiter
whose client hangs up leaves the line as soon as it looks (every ``poll_s``), and if a
slot was handed to it in that instant it passes the slot on.

The anchors do the same: Ollama holds up to 512 waiting requests (``OLLAMA_MAX_QUEUE``)
before it answers 503; llama.cpp's server defers tasks until a slot frees.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

# Why a request was not admitted: the line was full, it waited max_wait_s, its client left.
FULL, TIMEOUT, GONE = "full", "timeout", "gone"


class Admission:
    def __init__(self, running: int, waiting: int, max_wait_s: float, *,
                 clock: Callable[[], float] = time.monotonic, poll_s: float = 0.1):
        self.limit = running
        self.max_waiting = waiting
        self.max_wait_s = max_wait_s
        self._clock = clock
        self._poll_s = poll_s
        self._lock = threading.Lock()
        self._running = 0
        self._line: deque[threading.Event] = deque()
        self.changed = threading.Condition(self._lock)  # for tests and metrics: notified on every change

    @property
    def running(self) -> int:
        with self._lock:
            return self._running

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._line)

    def enter(self, gone: Callable[[], bool] = lambda: False) -> str | None:
        """Take a slot, waiting in line if need be: None once admitted (call ``leave``
        after), else FULL, TIMEOUT or GONE."""
        with self._lock:
            if self._running < self.limit and not self._line:
                self._running += 1
                self.changed.notify_all()
                return None
            if len(self._line) >= self.max_waiting:
                return FULL
            turn = threading.Event()
            self._line.append(turn)
            self.changed.notify_all()
        deadline = self._clock() + self.max_wait_s
        while True:
            left = deadline - self._clock()
            if turn.wait(max(0.0, min(self._poll_s, left))):
                return None
            why = GONE if gone() else TIMEOUT if self._clock() >= deadline else None
            if why is None:
                continue
            with self._lock:
                handed = turn.is_set()
                if not handed:
                    self._line.remove(turn)
                    self.changed.notify_all()
            if handed:
                self.leave()  # the slot came in the same instant: pass it on
            return why

    def leave(self) -> None:
        """Give the slot back: to the head of the line, if anyone waits."""
        with self._lock:
            if self._line:
                self._line.popleft().set()
            else:
                self._running -= 1
            self.changed.notify_all()

    def wait_for(self, predicate: Callable[[int, int], bool], timeout: float) -> bool:
        """Until ``predicate(running, waiting)`` holds, or ``timeout`` passes (tests, and
        anyone watching the line)."""
        end = time.monotonic() + timeout
        with self._lock:
            while not predicate(self._running, len(self._line)):
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self.changed.wait(left)
            return True
