"""Collecting bids: the book of bids, when the window closes, and who tends to be late.

Theory of operation. The roster (retained availability, synchronised with a broker round
trip) is the set of peers that must bid; in a fleet past ``auction.invite.above``, only
the devices invited (``agent.invite``), each on its own ``bid/invite/<dev>/...`` topic.
The call goes out at QoS 1 with a message expiry of the bid window. ``BidBook`` gathers
the bids on the network thread (decoded where they arrive) and wakes the orchestrator
only when something could close the window. The window closes (``should_close``, a pure function) at the first of:

- ``roster_complete``: every peer still online has bid (a Will that fires shrinks the
  set, if our own link is steady);
- ``decided``: a free NPU has bid and no peer still missing could offer one (pass 1
  picks a free NPU whatever the CPUs say), and a short grace has passed for the CPU
  bids that make the runner-ups (twice as long as it took, between 50 ms and 1 s);
- ``stragglers``: the only peers missing are ones that missed recent calls for bids (a
  frozen peer: online by keepalive, never bidding), and the others have been in for the
  same short grace — their late bids are still welcome until then;
- ``overdue``: at least one bid is in and every peer still missing is well past what its
  bids usually take (``patience``: its usual latency times 4, at least 1 s; 1 s for a
  peer never heard from), so a peer frozen since its last bid costs its first auction
  about a second, not the window, while a slow-but-alive peer on a bad link is waited
  for as long as it usually needs. With no bid in at all there is nothing to run, so
  the window stays open for whoever bids first;
- ``timeout``: ``bid_timeout_s``, the seed's upper bound.

``Stragglers`` remembers, per device, how many calls in a row it missed, in a small file
under ``state_dir`` that the node and every trigger share, so a frozen peer costs one
auction, not every auction; a bid clears its record. ``BidLatency`` remembers, the same
way, how long after the call each device's bids usually arrive (late bids included: a
peer on a slow link that missed one window gets a longer patience next time).
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.errors import StateError
from agent.messages import Bid, decoded
from agent.statefiles import atomic_write, read_json_object, stamp
from agent.topics import ParsedTopic, Topics

if TYPE_CHECKING:  # the bus (and paho) only when a fleet is connected
    from agent.bus import Bus, Message

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 1.0
GRACE_MIN_S, GRACE_MAX_S = 0.05, 1.0
# Patience with a missing peer, counted from the call. A frozen peer with no history costs
# PATIENCE_NEW_S; a peer on a slow link is waited for PATIENCE_FACTOR times its usual
# bid latency (a bad moment on a slow link is a few times its usual, not ten), never less
# than PATIENCE_FLOOR_S (a healthy peer on a loaded 2-core board can stall that long) and
# never more than PATIENCE_MAX_S (one outlier does not make a frozen peer cost the window).
PATIENCE_NEW_S, PATIENCE_FLOOR_S, PATIENCE_FACTOR, PATIENCE_MAX_S = 1.0, 1.0, 4.0, 10.0
LATENCY_WEIGHT = 0.3  # of the newest bid in the moving average: after one slower bid, 4 x 0.3 of it is waited for


class BidBook:
    """The bids of one auction, gathered on the network thread."""

    def __init__(self, rid: str, origin: str, topics: Topics, max_bytes: int,
                 clock: Callable[[], float] = time.monotonic):
        self.rid = rid
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
            self._arrived.setdefault(bid.device, self._clock())
            if not self._open:
                self._late.add(bid.device)
                return
            self._bids[bid.device] = bid
            if self._expected is None:
                return
            missing = self._expected - self._bids.keys()
            # Wake the orchestrator only when this bid could close the window: the last
            # one it waits for (measured: a wake-up per bid cost ~120 µs), the last of the
            # punctual ones, a free NPU, or the first bid (the overdue rule needs one).
            if not (missing - self._suspects) or (bid.snapshot.has_npu and bid.snapshot.npu_free) \
                    or len(self._bids) == 1:
                self.wake.set()

    def expect(self, devices: Iterable[str], suspects: Iterable[str] = (), opened: float | None = None) -> set[str]:
        """The peers that must bid for the window to close early, and those of them that
        have been missing calls lately; ``opened``: when the call went out (on ``clock``)."""
        with self._lock:
            self._opened = self._clock() if opened is None else opened
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


def decided(*, expected: set[str], bids: Mapping[str, Bid], may_have_free_npu: Callable[[str], bool],
            need: str) -> bool:
    """Whether the winner is known whatever the missing peers say: a free NPU is in and
    none of them could offer one (or, for an NPU-only job, none of them could run it)."""
    missing = expected - bids.keys()
    if any(may_have_free_npu(d) for d in missing):
        return False
    return need == "npu" or any(b.snapshot.has_npu and b.snapshot.npu_free for b in bids.values())


def should_close(*, expected: set[str], suspects: set[str], bids: Mapping[str, Bid], now: float, opened: float,
                 punctual_at: float | None, decided_at: float | None,
                 patience: Mapping[str, float] | None = None) -> str | None:
    """Why the bid window closes now, or None to keep waiting (see the module docstring).
    ``punctual_at``: when every expected peer but the suspects had bid; ``decided_at``:
    when the winner became known (``decided``); ``patience``: how long after the call
    each peer is waited for (``patience()`` of its usual latency; absent: a newcomer's),
    None for no such limit."""
    missing = expected - bids.keys()
    if not missing:
        return "roster_complete"
    if decided_at is not None and now >= decided_at + grace(decided_at - opened):
        return "decided"
    if missing <= suspects and punctual_at is not None and now >= punctual_at + grace(punctual_at - opened):
        return "stragglers"
    if patience is not None and bids and now >= overdue_at(missing, opened, patience):
        return "overdue"
    return None


def overdue_at(missing: Iterable[str], opened: float, patience: Mapping[str, float]) -> float:
    """When every one of ``missing`` is past its patience (the ``overdue`` rule)."""
    return opened + max((patience.get(d, PATIENCE_NEW_S) for d in missing), default=0.0)


def patience(usual_s: float | None) -> float:
    """How long after the call a peer whose bids usually take ``usual_s`` is waited for
    (None: never heard from)."""
    if usual_s is None:
        return PATIENCE_NEW_S
    return min(max(PATIENCE_FACTOR * usual_s, PATIENCE_FLOOR_S), PATIENCE_MAX_S)


def grace(punctual_took: float) -> float:
    """How long late bids from suspects are awaited once the punctual peers are in."""
    return min(max(2 * punctual_took, GRACE_MIN_S), GRACE_MAX_S)


Event = tuple[Any, ...]  # ("result", Message) | ("roster", device, online) | ("link", up, session_present)


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
        book = BidBook(rid, mail.me, mail.topics, max_bytes, clock)

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


@dataclass(frozen=True)
class AuctionResult:
    bids: dict[str, Bid]
    roster: tuple[str, ...]
    auction_ms: float
    closing: str                   # roster_complete | decided | stragglers | overdue | timeout
    missing: tuple[str, ...] = ()  # expected peers that did not bid
    invited: tuple[str, ...] | None = None  # the devices invited (agent.invite); None: everyone was called


def collect(inbox: Inbox, *, expected: Iterable[str], suspects: Iterable[str], window_s: float, need: str,
            may_have_free_npu: Callable[[str], bool], clock: Callable[[], float], steady: Callable[[], bool],
            resend: Callable[[], None], on_progress: Callable[[str], None],
            interrupted: threading.Event | None = None, latency: Mapping[str, float] | None = None) -> AuctionResult:
    """Wait for the bids (the call has been published); return when the window closes.
    ``resend`` publishes the call again (after our link came back: bids are QoS 0);
    ``interrupted`` (set by Ctrl-C) closes it at once, as ``interrupted``; ``latency``:
    how long each device's bids usually take (``BidLatency``), None for no ``overdue`` rule."""
    book = inbox.book
    opened = clock()
    roster = tuple(sorted(book.expect(expected, suspects, opened)))
    waits = None if latency is None else {d: patience(latency.get(d)) for d in roster}
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
                               punctual_at=punctual_at, decided_at=decided_at, patience=waits)
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
        wake_at = min(deadline, next_progress)
        for since in (punctual_at, decided_at):
            if since is not None:
                wake_at = min(wake_at, since + grace(since - opened))
        if waits is not None and bids:
            wake_at = min(wake_at, overdue_at(want - bids.keys(), opened, waits))
        book.wake.wait(max(0.0, wake_at - now))
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

    def update(self, expected: Iterable[str], bids: Iterable[str]) -> None:
        """After an auction: those who bid are punctual again, the rest missed one more."""
        expected, bid = set(expected), set(bids)
        before = self.load()
        after = {d: n for d, n in before.items() if d not in bid}
        for device in expected - bid:
            after[device] = before.get(device, 0) + 1
        if after != before:
            try:
                atomic_write(self.path, json.dumps(after, sort_keys=True).encode(), durable=False)
            except StateError as exc:
                log.warning("could not remember late peers: %s", exc)


class BidLatency:
    """How long after the call each device's bids usually arrive (seconds, a moving
    average), learnt by this asker and shared by its processes through
    ``state_dir/bid_latency.json`` (best effort, as ``Stragglers``).

    The averages live in memory; the file is rewritten only when one of them moved by more
    than ``REWRITE_CHANGE`` of what was last written, a device is new, or ``REWRITE_S``
    passed with anything unwritten (and always on a process's first auction, so a one-shot
    ``trigger`` leaves what it learnt). A rename per auction was a fifth of a busy asker's
    CPU; the patience it feeds (``patience``: four times the average, at least a second)
    does not notice a fifth. What another process wrote is read when the file changes."""

    REWRITE_CHANGE = 0.2
    REWRITE_S = 30.0

    def __init__(self, state_dir: Path, clock: Callable[[], float] = time.monotonic):
        self.path = Path(state_dir) / "bid_latency.json"
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: tuple[int, int, int] | None = None  # the file as last read or written (statefiles.stamp)
        self._mine: dict[str, float] = {}             # every average this process knows
        self._written: dict[str, float] = {}          # what the file holds, as far as this process knows
        self._written_at: float | None = None

    def load(self) -> dict[str, float]:
        with self._lock:
            self._refresh()
            return dict(self._mine)

    def update(self, took: Mapping[str, float]) -> None:
        """After an auction: fold each bidder's latency into its average."""
        if not took:
            return
        with self._lock:
            self._refresh()
            for device, seconds in took.items():
                old = self._mine.get(device)
                self._mine[device] = round(seconds if old is None else old + LATENCY_WEIGHT * (seconds - old), 4)
            now = self._clock()
            if not self._due(now):
                return
            try:
                atomic_write(self.path, json.dumps(self._mine, sort_keys=True).encode(), durable=False)
            except StateError as exc:
                log.warning("could not remember bid latencies: %s", exc)
                return
            self._seen, self._written, self._written_at = stamp(self.path), dict(self._mine), now

    def _due(self, now: float) -> bool:
        if self._mine == self._written:
            return False
        if self._written_at is None or now - self._written_at >= self.REWRITE_S:
            return True
        for device, value in self._mine.items():
            was = self._written.get(device)
            if was is None or abs(value - was) > self.REWRITE_CHANGE * max(was, 1e-3):
                return True
        return False

    def _refresh(self) -> None:
        now_seen = stamp(self.path)
        if now_seen is None or now_seen == self._seen:
            return
        disk = {str(d): float(s) for d, s in read_json_object(self.path).items()
                if type(s) in (int, float) and math.isfinite(s) and s >= 0}
        self._mine.update(disk)  # another process's newer view, for the devices it names
        self._written, self._seen = disk, now_seen

