"""Keeps an asker's view of a large fleet up to date between its auctions.

An invited auction chooses from a view of the fleet (``agent.invite.Rows``) that reads
only the devices whose metrics, or whose standing in the asker's memory, changed since
it last read them. Read by the auction itself, that is every change since the previous
auction: at a thousand devices, a hundred metrics a second, an asker idle for ten seconds
decoded a thousand messages before its first invitation could leave (36 ms here, where
back-to-back auctions read two: 0.2 ms). ``ViewKeeper`` reads them on a daemon thread of
its own, every ``KEEP_EVERY_S`` and once more as soon as an orchestration ends, so an
auction finds a tenth of a second's changes at most.

It starts with a process's first invited auction of a job kind (``keeper``, then
``used``), follows the roster the last auction used, steps aside while an auction holds
the view (the auction reads what it needs), and stops after ``KEEP_IDLE_S`` without an
auction or orchestration end; the next one starts it again. At most ``MAX_KEPT`` run at
once, the least recently used stopped first: a job kind is the caller's (a model name),
and each kept kind costs the roster a kept bidders set (``roster.BIDDER_KINDS``), which
more kinds than that would push out of one another every tick.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from agent.invite import AskerMemory, Fleet, Rows

log = logging.getLogger("agent.orchestrator")

KEEP_EVERY_S = 0.1    # at N=1000 that leaves about ten devices' metrics to an auction
KEEP_IDLE_S = 600.0   # no auction for this long: no longer kept (the next one reads what came)
MAX_KEPT = 8          # views kept at once in a process (fewer than roster.BIDDER_KINDS, 16)

Kind = tuple[str | None, str, bool]  # (model, need, tools)


class Source(Fleet, Protocol):
    """What the keeper reads: the roster (``agent.roster.Roster``)."""

    def bidders(self, model: str | None = None, need: str = "any", tools: bool = False) -> frozenset[str]: ...


class ViewKeeper:
    """One view, kept in step with the roster and the memory its auctions use."""

    def __init__(self, view: Rows, kind: Kind, memory: AskerMemory, *, every_s: float = KEEP_EVERY_S,
                 idle_s: float = KEEP_IDLE_S, clock: Callable[[], float] = time.monotonic):
        self.view, self.kind, self.memory = view, kind, memory
        self.every_s, self.idle_s, self._clock = every_s, idle_s, clock
        self._lock = threading.Condition()
        self._roster: Source | None = None
        self._used = clock()
        self._nudged = False
        self._thread: threading.Thread | None = None
        self._stop = False
        self._failing = False  # the last round failed (said once, at warning)
        self.rounds = 0  # rounds that brought the view up to date
        self.tries = 0   # rounds begun (one that finds an auction reading the view steps aside)

    def used(self, roster: Source) -> None:
        """An auction chose from the view just now, with ``roster``: keep it from now on."""
        with self._lock:
            self._roster = roster
            self._used = self._clock()
            self._stop = False
            if self._thread is None:
                thread = threading.Thread(target=self._run, name="view-keeper", daemon=True)
                try:
                    thread.start()
                except RuntimeError as exc:  # no thread to be had: auctions read the view themselves
                    log.warning("cannot keep the fleet's view up to date between auctions: %s", exc)
                    return
                self._thread = thread
        _running(self)

    def nudge(self) -> None:
        """An orchestration ended: read what it heard now rather than at the next tick."""
        with self._lock:
            self._used = self._clock()  # a job as long as KEEP_IDLE_S still counts as use
            self._nudged = True
            self._lock.notify_all()

    def stop(self) -> None:
        """Stop the thread (it ends within a tick); ``used`` starts it again."""
        with self._lock:
            self._stop = True
            self._lock.notify_all()

    def wait(self, done: Callable[[ViewKeeper], bool], timeout_s: float) -> bool:
        """Wait until ``done(self)``, checked after each round and when the thread stops (tests)."""
        with self._lock:
            return self._lock.wait_for(lambda: done(self), timeout_s)

    @property
    def running(self) -> bool:
        with self._lock:
            return self._thread is not None

    def _run(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._nudged or self._stop, self.every_s)
                self._nudged = False
                roster = self._roster
                if roster is None or self._stop or self._clock() - self._used >= self.idle_s:
                    self._thread = None  # the next auction starts it again
                    self._lock.notify_all()
                    return
                self.tries += 1
                self._lock.notify_all()
            self._round(roster)

    def _round(self, roster: Source) -> None:
        if not self.view.lock.acquire(blocking=False):
            return  # an auction is reading it
        try:
            self.view.sync(roster, roster.bidders(*self.kind))
            self.view.read(self.memory)
        except Exception:  # the next auction reads it again itself, and reports what fails
            log.log(logging.DEBUG if self._failing else logging.WARNING,
                    "keeping the fleet's view up to date failed", exc_info=True)
            self._failing = True
            return
        finally:
            self.view.lock.release()
        self._failing = False
        with self._lock:
            self.rounds += 1
            self._lock.notify_all()


_KEEPERS_LOCK = threading.Lock()
_RUNNING: dict[ViewKeeper, None] = {}  # the keepers started, the most recently used last


def keeper(view: Rows, kind: Kind, memory: AskerMemory) -> ViewKeeper:
    """The one keeper of ``view`` (kept on it: it goes with the view)."""
    with _KEEPERS_LOCK:
        if not isinstance(view.keeper, ViewKeeper):
            view.keeper = ViewKeeper(view, kind, memory)
        return view.keeper


def _running(kept: ViewKeeper) -> None:
    """``kept`` was used just now; the least recently used past ``MAX_KEPT`` are stopped."""
    with _KEEPERS_LOCK:
        _RUNNING.pop(kept, None)
        _RUNNING[kept] = None
        while len(_RUNNING) > MAX_KEPT:
            oldest = next(iter(_RUNNING))
            del _RUNNING[oldest]
            oldest.stop()


def stop_all() -> None:
    """Stop every keeper of this process (a daemon's shutdown; tests)."""
    with _KEEPERS_LOCK:
        kept = list(_RUNNING)
        _RUNNING.clear()
    for k in kept:
        k.stop()
