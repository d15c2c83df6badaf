"""Collecting bids: the call for bids, the book of bids, and when the window closes.

Theory of operation. The roster (retained availability, synchronised with a broker round
trip) is the set of peers that must bid. The call goes out at QoS 1 with a message expiry
of the bid window. ``BidBook`` gathers the bids on the network thread (decoded where they
arrive) and wakes the orchestrator once, when every expected peer has bid, instead of once
per bid. The window closes when every peer still online has bid — a Will that fires
shrinks the set, if our own link is steady — or at ``bid_timeout_s``.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from agent.bus import Bus, Message, Subscription
from agent.messages import Bid, decoded
from agent.topics import Topics

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 1.0


class BidBook:
    """The bids of one auction, gathered on the network thread."""

    def __init__(self, rid: str, topics: Topics, max_bytes: int):
        self.rid = rid
        self._topics = topics
        self._max_bytes = max_bytes
        self._lock = threading.Lock()
        self._bids: dict[str, Bid] = {}
        self._expected: set[str] | None = None
        self._open = True
        self.complete = threading.Event()
        self.wake = threading.Event()  # complete, or something for the orchestrator to look at

    def add(self, msg: Message) -> None:
        """Bus handler for ``bid/reply/<rid>/+``."""
        parsed = self._topics.parse(msg.topic)
        bid = decoded(msg.topic, msg.payload, lambda p: Bid.from_payload(p, self._max_bytes), what="bid",
                      logger=log, matches=lambda b: parsed is not None and b.rid == self.rid
                      and b.device == parsed.device)
        if bid is None:
            return
        with self._lock:
            if self._open:
                self._bids[bid.device] = bid
                self._check()

    def expect(self, devices: Iterable[str]) -> set[str]:
        """The peers that must bid for the window to close early."""
        with self._lock:
            self._expected = set(devices)
            self._check()
            return set(self._expected)

    def drop(self, device: str) -> None:
        """A peer's Will fired: stop waiting for it."""
        with self._lock:
            if self._expected is not None:
                self._expected.discard(device)
                self._check()

    def _check(self) -> None:
        if self._expected is not None and self._expected <= self._bids.keys():
            self.complete.set()
            self.wake.set()

    def poke(self) -> None:
        self.wake.set()

    def missing(self) -> list[str]:
        with self._lock:
            return sorted((self._expected or set()) - self._bids.keys())

    def progress(self) -> tuple[int, int]:
        with self._lock:
            expected = self._expected or set()
            return len(expected & self._bids.keys()), len(expected)

    def close(self) -> dict[str, Bid]:
        with self._lock:
            self._open = False
            return dict(self._bids)


Event = tuple[Any, ...]  # ("result", Message) | ("roster", device, online)


@dataclass
class Inbox:
    """Where one rid's bids and results arrive. Reserved ahead of use by a long-lived
    orchestrator, so its auction does not wait for a SUBSCRIBE to be processed (measured:
    ~0.4 ms of a ~1 ms auction)."""

    rid: str
    bus: Bus
    book: BidBook
    events: queue.SimpleQueue[Event]
    subs: list[Subscription]

    @classmethod
    def open(cls, bus: Bus, topics: Topics, rid: str, max_bytes: int) -> Inbox:
        events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        book = BidBook(rid, topics, max_bytes)
        # Inline: both handlers are quick and never block, which saves two thread
        # hand-offs per message.
        subs = [bus.subscribe(topics.bid_replies(rid), book.add, inline=True),
                bus.subscribe(topics.exec_results(rid), lambda m: events.put(("result", m)), inline=True)]
        return cls(rid, bus, book, events, subs)

    def on_roster(self, device: str, online: bool) -> None:
        """Roster listener: queue the change and wake an auction that waits on bids."""
        self.events.put(("roster", device, online))
        self.book.poke()

    def close(self) -> None:
        for sub in self.subs:
            self.bus.unsubscribe(sub)


@dataclass(frozen=True)
class AuctionResult:
    bids: dict[str, Bid]
    roster: tuple[str, ...]
    auction_ms: float
    closing: str                   # roster_complete | timeout
    missing: tuple[str, ...] = ()  # expected peers that did not bid


def collect(inbox: Inbox, *, expected: Iterable[str], window_s: float, clock: Callable[[], float],
            steady: Callable[[], bool], on_progress: Callable[[str], None]) -> AuctionResult:
    """Wait for the bids (the call has been published); return when the window closes."""
    book = inbox.book
    opened = clock()
    roster = tuple(sorted(book.expect(expected)))
    deadline = opened + window_s
    next_progress = opened + PROGRESS_EVERY_S
    while True:
        if book.complete.is_set():
            closing = "roster_complete"
            break
        now = clock()
        if now >= deadline:
            closing = "timeout"
            break
        if now >= next_progress:
            have, want = book.progress()
            on_progress(f"waiting for bids: {have} of {want} in, missing "
                        f"{', '.join(book.missing())} ({deadline - now:.0f} s left)")
            next_progress = now + PROGRESS_EVERY_S
        book.wake.wait(max(0.0, min(deadline, next_progress) - now))
        book.wake.clear()
        while True:  # roster changes: a peer whose Will fired is not waited for
            try:
                event = inbox.events.get_nowait()
            except queue.Empty:
                break
            if event[0] == "roster" and not event[2] and steady():
                book.drop(event[1])
    missing = tuple(book.missing())
    bids = book.close()
    return AuctionResult(bids, roster, (clock() - opened) * 1000, closing, missing)
