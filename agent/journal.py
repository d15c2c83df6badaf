"""Completed request ids, remembered on disk so a redelivered job is never run twice.

An append-only JSON-lines file under ``state_dir``: one line per finished rid with the
digest of the job and the final result event to send again. Entries older than the TTL
are forgotten; the file is rewritten (``statefiles.atomic_write``) when it holds twice as
many lines as live entries. The file is 0600: it keeps answers for a day.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from agent.errors import StateError
from agent.statefiles import append_line, atomic_write, describe

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 24 * 3600


class Recorded(NamedTuple):
    digest: str       # of the job that ran (messages.Job.digest)
    payload: bytes    # its final result event, as sent


class Journal:
    """Two locks, so that a lookup never waits for the disk: ``_lock`` guards the entries
    in memory (held for microseconds; a node looks a rid up on every job, and the ledger
    does it under its own lock, which the bid handler on paho's network thread takes);
    ``_disk`` orders the writes (held through an fsync, which on an SD card can take
    hundreds of milliseconds)."""

    def __init__(self, state_dir: Path, ttl_s: float = DEFAULT_TTL_S,
                 clock: Callable[[], float] = time.time):
        self.path = Path(state_dir) / "completed.jsonl"
        self.ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._disk = threading.Lock()
        self._entries: dict[str, tuple[float, Recorded]] = {}
        self._unwritten: list[bytes] = []  # lines not on disk yet (or that the disk refused); flush() retries
        self._lines = 0
        self._load()

    def _load(self) -> None:
        try:
            lines = self.path.read_bytes().decode("utf-8", "replace").splitlines()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StateError(self.path, f"cannot read: {describe(exc)}") from None
        cutoff = self._clock() - self.ttl_s
        bad = 0
        for line in lines:
            try:
                obj = json.loads(line)
                rid, ts = str(obj["rid"]), float(obj["ts"])
                entry = Recorded(str(obj["digest"]), obj["result"].encode("utf-8"))
            except (ValueError, KeyError, TypeError, AttributeError, RecursionError, OverflowError):
                bad += 1  # a torn last line after a crash (or an older format); the rest is intact
                continue
            if ts >= cutoff:
                self._entries[rid] = (ts, entry)
        self._lines = len(lines)
        if bad:
            log.warning("journal %s: skipped %d unreadable line(s)", self.path, bad)

    def get(self, rid: str) -> Recorded | None:
        with self._lock:
            entry = self._entries.get(rid)
        return entry[1] if entry else None

    def record(self, rid: str, digest: str, result_payload: bytes) -> None:
        """Remember a finished rid's final event; StateError if it cannot be written (the
        entry is then still answered from memory until this process ends)."""
        now = self._clock()
        entry = Recorded(digest, result_payload)
        with self._lock:
            self._entries[rid] = (now, entry)
            self._unwritten.append(_line(rid, now, entry))
        self.flush()

    def flush(self) -> None:
        """Write what is not on disk yet (lines the disk refused before included); StateError
        if it still cannot. Lookups go on meanwhile."""
        with self._disk:
            while True:
                with self._lock:
                    if not self._unwritten:
                        break
                    line = self._unwritten[0]
                append_line(self.path, line)  # the fsync: outside the entries' lock
                with self._lock:
                    self._unwritten.pop(0)
                    self._lines += 1
            with self._lock:
                if self._lines % 64 == 0:
                    cutoff = self._clock() - self.ttl_s
                    self._entries = {r: e for r, e in self._entries.items() if e[0] >= cutoff}
                compact = self._lines > 2 * len(self._entries) + 64
            if compact:
                self._compact()

    def _compact(self) -> None:
        """Rewrite the file with the live entries only (``_disk`` held, or no writer)."""
        with self._lock:
            live = list(self._entries.items())
        atomic_write(self.path, b"".join(_line(rid, ts, entry) for rid, (ts, entry) in live))
        with self._lock:
            self._lines = len(live)


def _line(rid: str, ts: float, entry: Recorded) -> bytes:
    return (json.dumps({"rid": rid, "ts": ts, "digest": entry.digest, "result": entry.payload.decode("utf-8")},
                       separators=(",", ":")) + "\n").encode("utf-8")
