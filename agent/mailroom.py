"""The bids and results of this device's orchestrations: routed by rid, gathered, waited for.

Theory of operation. The call for bids goes out at QoS 1 (QoS 0 for invitations) with a
message expiry of the bid window. ``Mailroom`` takes every bid and result addressed to
this device off the bus and hands each to the open ``Inbox`` of its rid; an inbox's
``BidBook`` gathers the bids on the network thread (decoded where they arrive) and wakes
the orchestrator only when something could close the window. ``collect`` is the wait:
it asks the pure rules of ``agent.auction`` whether the window closes, sleeping on the
book's event until the next moment one of them could change its mind, and calls again
when our link comes back.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.auction import AuctionResult, decided, first_overdue, patience, should_close, wake_at
from agent.messages import Bid, decoded
from agent.topics import ParsedTopic, Topics

if TYPE_CHECKING:  # the bus (and paho) only when a fleet is connected
    from agent.bus import Bus, Message

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 1.0


class BidBook:
    """The bids of one auction, gathered on the network thread."""

    def __init__(self, rid: str, origin: str, topics: Topics, max_bytes: int,
                 clock: Callable[[], float] = time.monotonic, on_late: Callable[[Bid], None] = lambda bid: None):
        self.rid = rid
        self._on_late = on_late  # a bid after the window closed, from the device asked again (want_late)
        self._wanted_late: str | None = None
        self.origin = origin
        self._topics = topics
        self._max_bytes = max_bytes
        self._clock = clock
        self._lock = threading.Lock()
        self._bids: dict[str, Bid] = {}
        self._opened: float | None = None
        self._arrived: dict[str, float] = {}  # device -> when its (first) bid arrived, late ones too
        self._expected: set[str] | None = None
        self._suspects: set[str] = set()
        self._late: set[str] = set()   # bid after the window closed: punctual again next time
        self._open = True
        self._first_wakes_at: float | None = None  # from then on the first bid wakes the orchestrator
        self.wake = threading.Event()  # something that could close the window, or a roster change

    def add(self, msg: Message, parsed: ParsedTopic | None = None) -> None:
        """A message on ``bid/reply/<origin>/<rid>/+`` (``parsed``, if the caller has)."""
        parsed = parsed or self._topics.parse(msg.topic)
        if parsed is None or parsed.origin != self.origin or parsed.rid != self.rid:
            return
        bid = decoded(msg.topic, msg.payload, lambda p: Bid.from_payload(p, self._max_bytes), what="bid",
                      logger=log, matches=lambda b: (b.rid, b.device, b.origin) == (self.rid, parsed.device,
                                                                                    self.origin))
        if bid is None:
            return
        with self._lock:
            now = self._clock()
            self._arrived.setdefault(bid.device, now)
            hand_over = False
            if self._open:
                self._take(bid, now)
            else:
                self._late.add(bid.device)
                hand_over = bid.device == self._wanted_late
        if hand_over:  # outside the lock: the run's queue
            self._on_late(bid)

    def want_late(self, device: str) -> None:
        """From now on, a bid from ``device`` after the window closed goes to ``on_late`` (it
        was asked to bid again); the others' late bids only count as late."""
        with self._lock:
            self._wanted_late = device

    def _take(self, bid: Bid, now: float) -> None:
        """A bid in the window (under the lock)."""
        self._bids[bid.device] = bid
        if self._expected is None:
            return
        missing = self._expected - self._bids.keys()
        # Wake the orchestrator only when this bid could close the window: the last
        # one it waits for (measured: a wake-up per bid cost ~120 µs), the last of the
        # punctual ones, a free NPU, or the first bid once the overdue rule could close
        # (it needs one; before then the orchestrator looks by itself: auction.wake_at).
        first = self._first_wakes_at
        if not (missing - self._suspects) or (bid.snapshot.has_npu and bid.snapshot.npu_free) \
                or (len(self._bids) == 1 and first is not None and now >= first):
            self.wake.set()

    def expect(self, devices: Iterable[str], suspects: Iterable[str] = (), opened: float | None = None,
               first_overdue: float | None = None) -> set[str]:
        """The peers that must bid for the window to close early, and those of them that
        have been missing calls lately; ``opened``: when the call went out (on ``clock``);
        ``first_overdue``: from when the first bid could let the overdue rule close (None:
        there is no such rule)."""
        with self._lock:
            self._opened = self._clock() if opened is None else opened
            self._first_wakes_at = first_overdue
            self._expected = set(devices)
            self._suspects = set(suspects) & self._expected
            self.wake.set()
            return set(self._expected)

    def drop(self, device: str) -> None:
        """A peer's Will fired: stop waiting for it."""
        with self._lock:
            if self._expected is not None:
                self._expected.discard(device)
                self.wake.set()

    def poke(self) -> None:
        self.wake.set()

    def view(self) -> tuple[set[str], set[str], dict[str, Bid]]:
        """(expected, suspects, bids so far)."""
        with self._lock:
            return set(self._expected or ()), set(self._suspects), dict(self._bids)

    def close(self) -> dict[str, Bid]:
        with self._lock:
            self._open = False
            return dict(self._bids)

    def all_bidders(self) -> set[str]:
        """Every device that bid, in the window or after it."""
        with self._lock:
            return set(self._bids) | self._late

    def latencies(self) -> dict[str, float]:
        """Seconds from the call to each device's bid, in the window or after it."""
        with self._lock:
            if self._opened is None:
                return {}
            return {d: max(0.0, at - self._opened) for d, at in self._arrived.items()}


# ("result", Message) | ("roster", device, online) | ("link", up, session_present)
# | ("bid", Bid): one after its auction closed | ("interrupt",): put by
# Orchestrator.interrupt (Ctrl-C) to cancel the job in flight.
Event = tuple[Any, ...]


class Mailroom:
    """Every bid and result addressed to this device, handed to the open ``Inbox`` of its
    rid. Two wildcard subscriptions made once per connection (and covered by the fleet's
    sync), not a SUBSCRIBE and an UNSUBSCRIBE per orchestration: those round trips were a
    quarter of a long-lived orchestrator's CPU. Mail for a rid with no open inbox (a bid
    after its auction, a result after its run) is dropped."""

    def __init__(self, bus: Bus, topics: Topics, me: str):
        self.bus = bus
        self.topics = topics
        self.me = me
        self._lock = threading.Lock()
        self._boxes: dict[str, Inbox] = {}
        # Inline: both handlers are quick and never block, which saves two thread
        # hand-offs per message.
        bus.subscribe(topics.all_bid_replies(me), self._bid, qos=0, inline=True)  # bids are sent at QoS 0
        bus.subscribe(topics.all_results(me), self._result, inline=True)

    def _box(self, msg: Message, kind: str) -> tuple[Inbox, ParsedTopic] | None:
        parsed = self.topics.parse(msg.topic)
        if parsed is None or parsed.kind != kind or parsed.origin != self.me or parsed.rid is None:
            return None
        with self._lock:
            box = self._boxes.get(parsed.rid)
        return None if box is None else (box, parsed)

    def _bid(self, msg: Message) -> None:
        found = self._box(msg, "bid_reply")
        if found is not None:
            found[0].book.add(msg, found[1])

    def _result(self, msg: Message) -> None:
        found = self._box(msg, "result")
        if found is not None:
            found[0].events.put(("result", msg))

    def register(self, inbox: Inbox) -> None:
        with self._lock:
            self._boxes[inbox.rid] = inbox

    def unregister(self, inbox: Inbox) -> None:
        with self._lock:
            if self._boxes.get(inbox.rid) is inbox:
                del self._boxes[inbox.rid]


@dataclass
class Inbox:
    """Where one rid's bids, results and link changes arrive, while its orchestration runs."""

    rid: str
    mail: Mailroom
    book: BidBook
    events: queue.SimpleQueue[Event]
    unlink: Callable[[], None]

    @classmethod
    def open(cls, mail: Mailroom, rid: str, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> Inbox:
        events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        book = BidBook(rid, mail.me, mail.topics, max_bytes, clock, on_late=lambda bid: events.put(("bid", bid)))

        def on_link(up: bool, session_present: bool) -> None:
            events.put(("link", up, session_present))
            book.poke()

        inbox = cls(rid, mail, book, events, mail.bus.on_link(on_link))
        mail.register(inbox)
        return inbox

    def on_roster(self, device: str, online: bool) -> None:
        """Roster listener: queue the change and wake an auction that waits on bids."""
        self.events.put(("roster", device, online))
        self.book.poke()

    def close(self) -> None:
        self.unlink()
        self.mail.unregister(self)


def collect(inbox: Inbox, *, expected: Iterable[str], suspects: Iterable[str], window_s: float, need: str,
            may_have_free_npu: Callable[[str], bool], clock: Callable[[], float], steady: Callable[[], bool],
            resend: Callable[[], None], on_progress: Callable[[str], None],
            interrupted: threading.Event | None = None, latency: Mapping[str, float] | None = None,
            absent: Iterable[str] = ()) -> AuctionResult:
    """Wait for the bids (the call has been published); return when the window closes.
    ``resend`` publishes the call again (after our link came back: bids are QoS 0);
    ``interrupted`` (set by Ctrl-C) closes it at once, as ``interrupted``; ``latency``:
    how long each device's bids usually take (``bidtimes.BidLatency``), None for no ``overdue`` rule;
    ``absent``: the suspects given no grace (``auction.absent``)."""
    book = inbox.book
    opened = clock()
    expecting = set(expected)
    waits = None if latency is None else {d: patience(latency.get(d)) for d in expecting}
    roster = tuple(sorted(book.expect(expecting, suspects, opened,
                                      None if waits is None else first_overdue(expecting, opened, waits))))
    gone = frozenset(absent)
    deadline = opened + window_s
    next_progress = opened + PROGRESS_EVERY_S
    punctual_at: float | None = None
    decided_at: float | None = None
    while True:
        now = clock()
        want, late, bids = book.view()
        if punctual_at is None and not (want - late - bids.keys()):
            punctual_at = now
        if decided_at is None and decided(expected=want, bids=bids, may_have_free_npu=may_have_free_npu, need=need):
            decided_at = now
        closing = should_close(expected=want, suspects=late, bids=bids, now=now, opened=opened,
                               punctual_at=punctual_at, decided_at=decided_at, patience=waits, absent=gone)
        if closing is None and now >= deadline:
            closing = "timeout"
        if interrupted is not None and interrupted.is_set():
            closing = "interrupted"
        if closing is not None:
            break
        if now >= next_progress:
            missing = sorted(want - bids.keys())
            on_progress(f"waiting for bids: {len(want) - len(missing)} of {len(want)} in, missing "
                        f"{', '.join(missing)} ({deadline - now:.0f} s left)")
            next_progress = now + PROGRESS_EVERY_S
        look_at = wake_at(now=now, opened=opened, until=min(deadline, next_progress), punctual_at=punctual_at,
                          decided_at=decided_at, missing=want - bids.keys(), any_bid=bool(bids), patience=waits)
        book.wake.wait(max(0.0, look_at - now))
        book.wake.clear()
        while True:  # roster and link changes
            try:
                event = inbox.events.get_nowait()
            except queue.Empty:
                break
            if event[0] == "roster" and not event[2] and steady():
                book.drop(event[1])  # its Will fired: not waited for
            elif event[0] == "link" and event[1]:
                # Back: bids come at QoS 0, so the ones sent while we were away are gone
                # even where our session survived. Call again; a node bids the same claim.
                resend()
    want, _, _ = book.view()
    bids = book.close()
    return AuctionResult(bids, roster, (clock() - opened) * 1000, closing, tuple(sorted(want - bids.keys())))
