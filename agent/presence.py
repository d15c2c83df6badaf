"""Presence: metrics, availability, health retries and Home Assistant discovery.

Theory of operation. One thread (``node-metrics``) publishes this device's metrics —
retained, so a newcomer sees the fleet at once — on its interval, soon after a job
changes state or a model goes cold (at most once per METRICS_MIN_GAP_S: every peer
decodes each one; in a fleet past ``auction.invite.above``, a job's change waits for the
interval: see ``Presence.loop``), and at
once when the health changes, someone asks who is there, or another process of this
device takes or frees the NPU (seen by polling). The same loop retries an unwritable
state_dir and model servers that are down. On every connect the metrics go out before
"online", so whoever sees the device online already knows what it serves; Home
Assistant's discovery config follows, and again whenever HA says it came back.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol

from agent.bus import Message
from agent.capacity import Capacity
from agent.config import Config
from agent.executors import Served
from agent.jobs import Jobs
from agent.messages import Metrics, Snapshot
from agent.metrics import HostSample, HostSampler, snapshot
from agent.topics import Topics

log = logging.getLogger("agent.node")  # the daemon's parts log under its name

NPU_POLL_S = 0.5          # how quickly a claim by another process shows in metrics
DISCONNECTED_POLL_S = 1.0  # with no broker there is nothing to publish to
HEALTH_RETRY_S = 5.0       # how often an unhealthy node tries its state_dir again
ENGINE_RETRY_S = 1.0       # how often a mode whose model server is down tries to connect
# Metrics after a job changes state: soon, not per change (every peer decodes each one).
METRICS_MIN_GAP_S = 0.2
COOLED_MARGIN_S = 0.05    # a model is looked at this long after it should have gone cold


def metrics_due(now: float, *, next_at: float, urgent: bool, pending: bool, published_at: float) -> bool:
    """Whether a node publishes its metrics now: on its interval, at once for a change of
    health, presence or NPU, and for a job's change of state once METRICS_MIN_GAP_S has
    passed since the last publish (a burst of jobs costs one message, not one per job)."""
    return now >= next_at or urgent or (pending and now >= published_at + METRICS_MIN_GAP_S)


class Link(Protocol):
    """What presence needs of the bus."""

    @property
    def connected(self) -> bool: ...

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> object: ...


class Presence:
    def __init__(self, cfg: Config, capacity: Capacity, jobs: Jobs, topics: Topics, link: Link, *,
                 changed: threading.Event, stop: threading.Event, wall: Callable[[], float] = time.time,
                 sample: Callable[[], HostSample] | None = None, clock: Callable[[], float] = time.monotonic,
                 large: Callable[[], bool] = lambda: False):
        """``changed`` is set by whoever changes what the metrics say; ``stop`` ends the loop;
        ``large``: whether the fleet is past ``auction.invite.above`` (its auctions invite)."""
        self.cfg = cfg
        self.me = cfg.device_id
        self.capacity = capacity
        self.jobs = jobs
        self.topics = topics
        self.link = link
        self.changed = changed
        self._stop = stop
        self.wall = wall
        self._sample = sample or HostSampler().sample
        self._last_npu_free: bool | None = None
        self._last_served: tuple[Any, ...] | None = None  # each mode's (up, warm) in the last metrics
        self._last_health = "ok"
        self._presence_due = threading.Event()
        self._clock = clock
        self._large = large
        self._last_snapshot: tuple[tuple[Any, ...], Snapshot] | None = None

    def snapshot(self) -> Snapshot:
        """This device's state now. The same object as last time while nothing in it
        changed (every bid carries one; ``Bids`` keeps its encoding for that long)."""
        cap, gate = self.capacity, self.jobs.gate
        cpu_up = cap.cpu is not None and cap.cpu.down is None
        depth = gate.depth
        made_of = (self._sample(), cap.npu_free(), self._served_now(), gate.slots if cpu_up else 0,
                   depth, self.jobs.latency.summary(), gate.backlog_s() if depth else 0.0)  # idle: no backlog
        last = self._last_snapshot
        if last is not None and last[0] == made_of:
            return last[1]
        host, npu_free, _, slots, _, recent, backlog_s = made_of
        models = {mode: info for mode, e in (("npu", cap.npu), ("cpu", cap.cpu))
                  if e is not None and e.down is None and (info := e.model_info()) is not None}
        snap = snapshot(host, has_npu=cap.npu is not None, npu_free=npu_free, models=models, cpu_slots=slots,
                        queue_depth=depth, recent=recent, backlog_s=backlog_s)
        self._last_snapshot = (made_of, snap)
        return snap

    def offer_snapshot(self) -> Snapshot:
        """This device as its own orchestrations' candidate: the NPU was tried first."""
        return replace(self.snapshot(), npu_free=False)

    # ---------------------------------------------------------------- bus events
    def on_connect(self, session_present: bool) -> None:
        # Metrics first: the broker keeps one connection's messages in order, so whoever
        # sees this device online already has what it serves and whether it takes work.
        self.publish_metrics()
        self.link.publish(self.topics.availability(self.me), b"online", retain=True)
        if self.cfg.homeassistant.enabled:
            self.announce()

    def announce(self) -> None:
        from agent.homeassistant import discovery_payload
        self.link.publish(self.topics.ha_config(self.me),
                          discovery_payload(self.cfg, self.topics, simulated=self.capacity.simulated), retain=True)

    def on_ha_status(self, msg: Message) -> None:
        if msg.payload == b"online":
            self.announce()
        elif msg.payload != b"offline":
            log.warning("ignoring Home Assistant status %r (want online/offline)", msg.payload[:40])

    def on_presence_query(self, msg: Message) -> None:
        """Someone found no retained presence (a broker without retained messages on
        wildcards): announce ourselves again, from the metrics loop, after the query."""
        parsed = self.topics.parse(msg.topic)
        if parsed is not None and parsed.device != self.me:
            self._presence_due.set()
            self.changed.set()

    def _served_now(self) -> tuple[Any, ...]:
        """Each mode's (up, warm): what the metrics say of its executor that can change."""
        return _served(self.capacity.npu), _served(self.capacity.cpu)

    def publish_metrics(self) -> None:
        self._last_served = self._served_now()
        snap = self.snapshot()
        self._last_npu_free = snap.npu_free
        self._last_health = self.capacity.health_word()
        msg = Metrics(device=self.me, ts=round(self.wall(), 3), snapshot=snap,
                      last_latency_ms=self.jobs.latency.last_ms, health=self._last_health)
        self.link.publish(self.topics.metrics(self.me), msg.to_payload(), retain=True)

    # ---------------------------------------------------------------- the loop
    def loop(self) -> None:
        """Publish metrics every interval, and soon after a job changes state — at most
        once per METRICS_MIN_GAP_S, since every device and dashboard decodes each one — but
        at once when the health changes or another process on this device takes or frees
        the NPU (seen by polling); retry an unwritable state_dir while unhealthy.

        In a fleet past ``auction.invite.above`` a job's change waits for the interval: a
        thousand devices' changes were most of what every node read (206 a second at 70 %
        load, 100 of them refreshes), and their askers go by their memory of the bids they
        heard first (scripts/simulate_invite: 1.027x calling everyone at 70 and 90 % load
        without the changes, 1.025x and 1.021x with them). A model going cold, down or back
        still goes out soon."""
        cap = self.capacity
        next_at = self._clock()
        next_health = next_at
        next_engines = next_at
        published_at = -math.inf
        jobs_changed = False    # a job changed state since the last publish
        served_changed = False  # a model went cold, down or back since the last publish
        while not self._stop.is_set():
            now = self._clock()
            if self.changed.is_set():
                self.changed.clear()
                jobs_changed = True
            if self._last_served is not None and self._served_now() != self._last_served:
                served_changed = True  # invitations charge a cold model a start-up, and skip a down one
            if cap.health != "ok" and now >= next_health:
                cap.check_health(self.jobs.journal.flush)  # what the disk refused goes in first
                next_health = now + HEALTH_RETRY_S
            engines_down = cap.any_engine_down()
            if engines_down and now >= next_engines:
                if cap.retry_engines():
                    served_changed = True
                next_engines = now + ENGINE_RETRY_S
            pending = served_changed or (jobs_changed and not self._large())
            if self.link.connected:
                urgent = (self._presence_due.is_set() or self._last_health != cap.health_word()
                          or (cap.npu is not None and self._last_npu_free is not None
                              and self._last_npu_free != cap.npu_free()))
                if metrics_due(now, next_at=next_at, urgent=urgent, pending=pending, published_at=published_at):
                    pending = jobs_changed = served_changed = False
                    self.publish_metrics()
                    if self._presence_due.is_set():  # metrics first, as after a connect
                        self._presence_due.clear()
                        self.link.publish(self.topics.availability(self.me), b"online", retain=True)
                    published_at = now
                    next_at = now + self.cfg.metrics_interval_s
                timeout = next_at - now
                if pending:
                    timeout = min(timeout, published_at + METRICS_MIN_GAP_S - now)
            else:
                jobs_changed = served_changed = False  # the next connect publishes fresh metrics anyway
                timeout = DISCONNECTED_POLL_S
            if cap.npu is not None:
                timeout = min(timeout, NPU_POLL_S)
            for served in (cap.npu, cap.cpu):
                cools_in = served.cools_in() if served is not None else None
                if cools_in is not None:
                    timeout = min(timeout, cools_in + COOLED_MARGIN_S)
            if cap.health != "ok":
                timeout = min(timeout, HEALTH_RETRY_S)
            if engines_down:
                timeout = min(timeout, next_engines - now)
            self.changed.wait(max(timeout, 0.0))


def _served(executor: Served | None) -> tuple[bool, bool] | None:
    """What a snapshot says of an executor that can change: up, and warm."""
    return None if executor is None else (executor.down is None, executor.is_warm())
