"""The live roster: who is online, and what each device last said about itself.

Availability comes from the retained ``agent/<dev>/availability`` topics: a node's Will
sets it to ``offline`` the moment the broker loses it, so the roster shrinks during an
auction and the auction can close early. A broker that does not deliver retained
messages on wildcard subscriptions (RabbitMQ 3.10) leaves it empty at first: then
``Fleet.sync`` asks on ``agent/<me>/presence`` and every node announces itself again.
Metrics come from ``agent/<dev>/metrics``: the roster keeps each device's last snapshot
(does it have an NPU?) and, from the live ones, how far its clock is from ours
(``agent.clock``). In a large fleet every node hears every device's metrics (a thousand
devices: a hundred a second) and most of it is never looked at, so a message is only
stored as it came and decoded when someone first needs that device's metrics (an
auction's ``bidders``, ``status``, a model list); a newer one replaces an undecoded older
one, which is then never decoded at all. The clock sample of a live one is read at once
from its head, so offsets and skew warnings are as before, and so is when each device's
metrics were sent (``rows``: what an invitation ages their backlog by). Who would bid
(``bidders``) is kept per job kind and worked out again only for the devices whose
availability or metrics changed since it was last asked, and an invitation's view of
the fleet (``agent.invite.Rows``) is told which devices changed (``feed``) and reads only
those again (``rows``). The operator's capabilities
records (``capabilities/<dev>``) say what each device may claim; ``vouched`` holds bids
to them. Listeners hear every change of availability; they are called on the bus
dispatcher thread and must only queue.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, replace

from agent.bus import Message
from agent.clock import ClockOffsets
from agent.feeds import Changes, Feeds
from agent.messages import (
    SCHEMA_VERSION,
    Bid,
    Capabilities,
    Metrics,
    Snapshot,
    can_take,
    decoded,
)
from agent.router import Listeners
from agent.topics import Topics

log = logging.getLogger(__name__)

# The head of a metrics payload as messages.Metrics.to_payload writes it: the device and
# its clock, read from every live message without decoding the rest (a payload laid out
# otherwise is decoded whole at once, as before).
_HEAD = re.compile(rb'\{"v":%d,"device":"([A-Za-z0-9_-]{1,64})","ts":([0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?)[,}]'
                   % SCHEMA_VERSION)

Listener = Callable[[str, bool], None]
BIDDER_KINDS = 16  # job kinds (model, need, tools) whose bidders are kept worked out



@dataclass
class _Bidders:
    """One job kind's bidders, kept between auctions, and the set last handed out: the same
    object while nobody joined or left, so that a caller comparing it with what it had (as
    ``invite.Rows`` does) finds them identical at once."""

    members: set[str]
    changes: Changes
    _frozen: frozenset[str] | None = None

    def mark(self, device: str, bids: bool) -> None:
        if bids == (device in self.members):
            return
        if bids:
            self.members.add(device)
        else:
            self.members.discard(device)
        self._frozen = None

    def frozen(self) -> frozenset[str]:
        if self._frozen is None:
            self._frozen = frozenset(self.members)
        return self._frozen

class Roster:
    def __init__(self, topics: Topics, self_device: str, *, max_bytes: int = 256 * 1024,
                 wall: Callable[[], float] = time.time):
        self.topics = topics
        self.self_device = self_device
        self.offsets = ClockOffsets()
        self._max_bytes = max_bytes
        self._wall = wall
        self._lock = threading.Lock()
        self._state: dict[str, bool] = {}
        self._metrics: dict[str, Metrics] = {}   # decoded, the last good one of each device
        self._pending: dict[str, tuple[str, bytes]] = {}  # device -> (topic, its latest metrics, undecoded)
        # who changed since each consumer last looked: each job kind's bidders below, and the
        # invitation views (invite.Rows.sync)
        self._feeds = Feeds(self._lock)
        # per job kind (model, need, tools): who would bid, and the devices changed since it was last worked out
        self._bidders: dict[tuple[str | None, str, bool], _Bidders] = {}
        self._online: set[str] = set()
        self._sent: dict[str, float] = {}    # device -> when its last metrics were sent, on our wall clock
        self._listeners: Listeners[Listener] = Listeners()
        self._live = threading.Condition(self._lock)
        self._heard: dict[str, float] = {}   # device -> when it last spoke live (monotonic)
        self._granted: dict[str, Capabilities] = {}  # device -> what the operator allows it to claim

    def handle(self, msg: Message) -> None:
        """Bus handler for ``agent/+/availability``."""
        parsed = self.topics.parse(msg.topic)
        if parsed is None or parsed.kind != "availability" or parsed.device is None:
            return
        if msg.payload in (b"online", b"offline"):
            online = msg.payload == b"online"
        elif msg.payload == b"":
            self.drop(parsed.device)  # retained availability cleared: the device was retired
            return
        else:
            log.warning("ignoring availability %r for %s (want online/offline)", msg.payload[:40], parsed.device)
            return
        self.set(parsed.device, online)
        if online and not msg.retain:
            self._heard_live(parsed.device)

    def set(self, device: str, online: bool) -> None:
        """Record a device's availability (from its topic, or a presence answer)."""
        with self._lock:
            changed = self._state.get(device) != online
            self._state[device] = online
            if changed:
                (self._online.add if online else self._online.discard)(device)
                self._changed(device)
        if changed:
            log.debug("roster: %s is %s", device, "online" if online else "offline")
            for listener in self._listeners.now():
                listener(device, online)

    def drop(self, device: str) -> None:
        """Forget a retired device altogether (``forget`` cleared its retained topics)."""
        with self._lock:
            was_online = self._state.pop(device, False)
            self._online.discard(device)
            self._metrics.pop(device, None)
            self._pending.pop(device, None)
            self._sent.pop(device, None)
            self._changed(device)
            self._heard.pop(device, None)
        if was_online:
            for listener in self._listeners.now():
                listener(device, False)

    def handle_metrics(self, msg: Message) -> None:
        """Bus handler for ``agent/+/metrics``: kept as it came, decoded on first use; its
        timestamp is read at once (the head our own encoder writes): a live one's is a clock
        sample, and each says when its metrics were sent (``rows``)."""
        parsed = self.topics.parse(msg.topic)
        if parsed is None or parsed.device is None:
            return
        device, payload = parsed.device, msg.payload
        with self._lock:
            if payload == b"":  # a retired device's metrics, cleared
                self._metrics.pop(device, None)
                self._pending.pop(device, None)
                self._sent.pop(device, None)
                self._changed(device)
                return
            self._pending[device] = (msg.topic, payload)
            self._changed(device)
            head = _HEAD.match(payload)
            if head is not None and head.group(1) == device.encode():
                ts: float | None = float(head.group(2))
            elif msg.retain:
                ts = None
            else:  # another encoder's layout: decoded now, as it always was
                metrics = self._decoded(device)
                ts = None if metrics is None else metrics.ts
            if ts is not None and not msg.retain:  # a retained one may be old: only live ones say how far its clock is
                self._clock(device, ts)
            offset = self.offsets.offset(device)
            if ts and offset is not None:
                self._sent[device] = ts + offset
            else:
                self._sent.pop(device, None)  # how old it is cannot be told: taken as fresh
        if ts is not None and not msg.retain:
            self._heard_live(device)

    def _clock(self, device: str, ts: float) -> None:
        skew = self.offsets.observe(device, ts, self._wall())
        if skew is not None:
            log.warning("the clock of %s is %+.1f s from ours (measured from its metrics); deadlines travel as "
                        "durations so nothing breaks, but check its time sync", device, -skew)

    def _decoded(self, device: str) -> Metrics | None:
        """``device``'s last good metrics, decoding what came since (the lock held)."""
        pending = self._pending.pop(device, None)
        if pending is not None:
            topic, payload = pending
            metrics = decoded(topic, payload, lambda p: Metrics.from_payload(p, self._max_bytes), what="metrics",
                              logger=log, matches=lambda m: m.device == device)
            if metrics is not None:
                self._metrics[device] = metrics
        return self._metrics.get(device)

    def handle_capabilities(self, msg: Message) -> None:
        """Bus handler for ``capabilities/+`` (the operator's records, retained)."""
        parsed = self.topics.parse(msg.topic)
        if parsed is None or parsed.kind != "capabilities" or parsed.device is None:
            return
        if msg.payload == b"":
            with self._lock:
                self._granted.pop(parsed.device, None)  # a retired device's record, cleared
            return
        record = decoded(msg.topic, msg.payload, lambda p: Capabilities.from_payload(p, self._max_bytes),
                         what="capabilities", logger=log, matches=lambda c: c.device == parsed.device)
        if record is not None:
            with self._lock:
                self._granted[record.device] = record

    def vouched(self, bids: Mapping[str, Bid]) -> dict[str, Bid]:
        """The bids with every claim beyond what the operator granted each device taken out
        (``within``); all of them as they are in a fleet with no capabilities records."""
        with self._lock:
            granted = dict(self._granted)
        if not granted:
            return dict(bids)
        out: dict[str, Bid] = {}
        for device, bid in bids.items():
            snap = within(bid.snapshot, granted.get(device))
            if snap != bid.snapshot:
                log.info("%s claims more than it was granted (%s); ignoring the rest", device,
                         "an NPU" if bid.snapshot.has_npu and not snap.has_npu else "models")
            out[device] = bid if snap == bid.snapshot else replace(bid, snapshot=snap)
        return out

    def _heard_live(self, device: str) -> None:
        with self._live:
            self._heard[device] = time.monotonic()
            self._live.notify_all()

    def wait_quiet(self, since: float, *, quiet_s: float, timeout_s: float) -> frozenset[str]:
        """The devices heard live since ``since`` (monotonic), once none has been new for
        ``quiet_s`` after the first, or ``timeout_s`` after ``since``."""
        deadline = since + timeout_s
        with self._live:
            last_new, count = None, 0
            while True:
                heard = frozenset(d for d, t in self._heard.items() if t >= since)
                now = time.monotonic()
                if len(heard) != count:
                    count, last_new = len(heard), now
                end = deadline if last_new is None else min(deadline, last_new + quiet_s)
                if now >= end:
                    return heard
                self._live.wait(end - now)

    def peers_online(self) -> frozenset[str]:
        """Online devices other than this one."""
        with self._lock:
            return frozenset(d for d, up in self._state.items() if up and d != self.self_device)

    def online_count(self) -> int:
        with self._lock:
            return len(self._online)

    def online(self) -> frozenset[str]:
        """Every online device, this one included (its node daemon, if it runs)."""
        with self._lock:
            return frozenset(self._online)

    def bidders(self, model: str | None = None, need: str = "any", tools: bool = False) -> frozenset[str]:
        """Online devices that would bid, as far as their last metrics tell: a draining or
        unhealthy node says so and sits auctions out, and a node bids only on jobs it could
        take (``can_take``), so nobody waits for a bid that will not come."""
        key = (model, need, tools)

        def expected(d: str) -> bool:
            m = self._decoded(d)
            return m is None or (m.health == "ok" and can_take(m.snapshot, need, model, tools))
        with self._lock:
            cached = self._bidders.pop(key, None)
            if cached is None:  # worked out whole once per job kind, then only where something changed
                cached = _Bidders({d for d in self._online if expected(d)}, self._feeds.opened())
                while len(self._bidders) >= BIDDER_KINDS:  # a model name is the caller's: bounded
                    del self._bidders[next(iter(self._bidders))]
            self._bidders[key] = cached  # the most recently asked last
            try:
                for d in cached.changes.drain():
                    cached.mark(d, d in self._online and expected(d))
            except BaseException:
                del self._bidders[key]  # half worked out: whole again next time
                raise
            return cached.frozen()

    def _changed(self, device: str) -> None:
        """``device``'s availability or metrics changed (the lock held): each job kind's
        bidders work it out again next time they are asked, and the views read it again."""
        self._feeds.touch(device)

    def feed(self) -> Changes:
        """A new consumer's ``Changes``: every device whose availability or metrics change
        from now on (``agent.invite.Rows.sync`` reads only those again)."""
        return self._feeds.open()

    def rows(self, devices: Collection[str]) -> list[tuple[Snapshot | None, float | None]]:
        """Each device's last metrics snapshot (None: none) and when they were sent on our
        wall clock (None: cannot be told), decoding what came since."""
        with self._lock:
            return [((m.snapshot if (m := self._decoded(d)) is not None else None), self._sent.get(d))
                    for d in devices]

    def known(self) -> dict[str, bool]:
        """Every device heard of: online (True) or offline (False)."""
        with self._lock:
            return dict(self._state)

    def metrics(self) -> dict[str, Metrics]:
        with self._lock:
            for device in list(self._pending):
                self._decoded(device)
            return dict(self._metrics)

    def may_have_free_npu(self, device: str) -> bool:
        """Whether ``device`` could offer a free NPU, as far as its last metrics tell (a
        device we know nothing about could)."""
        with self._lock:
            m = self._decoded(device)
            if self._granted and not (device in self._granted and self._granted[device].npu):
                return False  # the operator did not grant it one
        return m is None or m.snapshot.has_npu

    def listen(self, listener: Listener) -> Callable[[], None]:
        """Called with (device, online) on each change of a device's availability."""
        return self._listeners.add(listener)


def within(snapshot: Snapshot, granted: Capabilities | None) -> Snapshot:
    """A device's claims cut down to what the operator granted it: no NPU unless granted
    (no record at all: none), and only the models named (a record without a list: any)."""
    npu = granted is not None and granted.npu
    allowed = None if granted is None else granted.models
    models = {mode: info for mode, info in snapshot.models.items()
              if (npu or mode != "npu") and (allowed is None or info.name in allowed)}
    has_npu, npu_free = snapshot.has_npu and npu, snapshot.npu_free and npu
    if (has_npu, npu_free, models) == (snapshot.has_npu, snapshot.npu_free, dict(snapshot.models)):
        return snapshot
    return replace(snapshot, has_npu=has_npu, npu_free=npu_free, models=models)
