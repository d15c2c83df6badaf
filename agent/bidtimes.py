"""What this device remembers of its peers' bids, in ``state_dir``: who missed recent
calls (``Stragglers``) and how long after the call each one's bids usually arrive
(``BidLatency``). Shared by the node and every trigger of the device; best effort (a
device that cannot be written to just waits longer). What to remember is decided by the
pure ``auction.missed`` and ``auction.averaged``; this module reads and writes the files.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from agent.auction import absent, averaged, missed, patience
from agent.errors import StateError
from agent.statefiles import atomic_write, read_json_object, stamp

log = logging.getLogger(__name__)


class Stragglers:
    """How many calls for bids in a row each device has missed, shared by every process of
    this device through ``state_dir/stragglers.json`` (best effort: a device that cannot be
    written to just waits longer)."""

    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / "stragglers.json"

    def load(self) -> dict[str, int]:
        return {str(d): n for d, n in read_json_object(self.path).items() if type(n) is int and n > 0}

    def suspects(self) -> set[str]:
        return set(self.load())

    def suspects_and_absent(self) -> tuple[set[str], set[str]]:
        """(the devices that missed the last call or more, those that missed ``ABSENT_AFTER`` or more), one read."""
        counts = self.load()
        return set(counts), absent(counts)

    def update(self, expected: Iterable[str], bids: Iterable[str]) -> None:
        """After an auction: those who bid are punctual again, the rest missed one more."""
        before = self.load()
        after = missed(before, expected, bids)
        if after != before:
            try:
                atomic_write(self.path, json.dumps(after, sort_keys=True).encode(), durable=False)
            except StateError as exc:
                log.warning("could not remember late peers: %s", exc)


class BidLatency:
    """How long after the call each device's bids usually arrive (seconds, a moving
    average), learnt by this asker and shared by its processes through
    ``state_dir/bid_latency.json`` (best effort, as ``Stragglers``).

    The averages live in memory; what reads them is ``auction.patience`` (four times the
    average, at least a second), so the file is rewritten only when the patience it gives
    some device moved by more than ``REWRITE_CHANGE`` (a device never written counts as
    unknown, ``PATIENCE_NEW_S``), or ``REWRITE_S`` passed with anything unwritten (and
    always on a process's first auction, so a one-shot ``trigger`` leaves what it learnt).
    A rename per auction was a fifth of a busy asker's CPU; at a thousand devices, where
    most auctions hear someone new, rewriting a thousand averages whenever one was new or
    moved was a twelfth (py-spy, bench --scale), though nearly all sit under the floor of a
    second and move nothing. Only the devices an auction heard are looked at. What another
    process wrote is read when the file changes."""

    REWRITE_CHANGE = 0.2
    REWRITE_S = 30.0

    def __init__(self, state_dir: Path, clock: Callable[[], float] = time.monotonic):
        self.path = Path(state_dir) / "bid_latency.json"
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: tuple[int, int, int] | None = None  # the file as last read or written (statefiles.stamp)
        self._mine: dict[str, float] = {}             # every average this process knows
        self._written: dict[str, float] = {}          # what the file holds, as far as this process knows
        self._unwritten: set[str] = set()             # devices whose average is not what the file holds
        self._written_at: float | None = None

    def load(self, devices: Iterable[str] | None = None) -> dict[str, float]:
        """Every average known, or those of ``devices`` only (an auction's twenty, not a
        thousand copied to read twenty)."""
        with self._lock:
            self._refresh()
            if devices is None:
                return dict(self._mine)
            mine = self._mine
            return {d: mine[d] for d in devices if d in mine}

    def update(self, took: Mapping[str, float]) -> None:
        """After an auction: fold each bidder's latency into its average."""
        if not took:
            return
        with self._lock:
            self._refresh()
            moved = False
            for device, seconds in took.items():
                value = self._mine[device] = averaged(self._mine.get(device), seconds)
                was = self._written.get(device)
                if value != was:
                    self._unwritten.add(device)
                    before = patience(was)
                    moved = moved or abs(patience(value) - before) > self.REWRITE_CHANGE * before
            now = self._clock()
            if not self._unwritten or not (moved or self._written_at is None
                                           or now - self._written_at >= self.REWRITE_S):
                return
            try:
                atomic_write(self.path, json.dumps(self._mine, sort_keys=True).encode(), durable=False)
            except StateError as exc:
                log.warning("could not remember bid latencies: %s", exc)
                return
            self._seen, self._written, self._written_at = stamp(self.path), dict(self._mine), now
            self._unwritten.clear()

    def _refresh(self) -> None:
        now_seen = stamp(self.path)
        if now_seen is None or now_seen == self._seen:
            return
        disk = {str(d): float(s) for d, s in read_json_object(self.path).items()
                if type(s) in (int, float) and math.isfinite(s) and s >= 0}
        self._mine.update(disk)  # another process's newer view, for the devices it names
        self._written, self._seen = disk, now_seen
        self._unwritten = {d for d in self._unwritten if self._mine.get(d) != disk.get(d)}

