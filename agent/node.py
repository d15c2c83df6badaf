"""The node daemon: it wires the parts that do the work and runs their lifecycle.

Theory of operation. The daemon owns no decision itself; each part has one job and is
tested alone (docs/architecture.md draws them with their threads):

- ``Capacity`` (agent/capacity.py): what this device can offer now — executors, the NPU,
  health (a state_dir that cannot be written), draining.
- ``Jobs`` (agent/jobs.py): admission and running of jobs — ledger, CPU gate, journal,
  service record; results and cancels.
- ``Bids`` (agent/bids.py): the answer to a call for bids, inline on paho's thread.
- ``Presence`` (agent/presence.py): metrics, availability, health retries, Home Assistant.
- ``Fronts`` (agent/fronts.py): this device's own prompts — MQTT triggers and the control
  socket — through the one orchestrator factory.

The handlers run inline on paho's network thread where they never wait (calls for bids,
jobs, cancels, presence queries: each a hand-off sooner), the rest on the bus dispatcher
thread; each decodes and validates (garbage gets one log line and is never executed),
asks a pure part what to do, and either publishes a small reply at once or hands work to
a worker. A node that finds another live node with
its device_id stops (the caller exits 2). Draining (SIGTERM): no more bids or jobs; what
runs or waits is given ``drain_s`` to finish; then the node goes offline.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from agent.bids import Bids
from agent.bus import Bus, Message, Will, expiry_interval, new_nonce
from agent.capacity import Capacity
from agent.config import Config
from agent.errors import AgentError
from agent.executors import Served, usable
from agent.fleet import Fleet
from agent.fronts import Fronts, orchestrator
from agent.jobs import Jobs
from agent.locks import HeldLock, IdentityLock
from agent.presence import Presence
from agent.statefiles import check_writable
from agent.topics import Topics

log = logging.getLogger(__name__)

# The node takes packets up to this many times max_payload_bytes: a trigger somewhat over
# the limit reaches it and is refused with an answer saying so (a client waiting on its
# answer topic hears why). Past that the broker drops the packet (MQTT 5 Maximum Packet
# Size), so nothing huge is ever read into a small device's memory.
RECEIVE_FACTOR = 16


class Node:
    def __init__(self, cfg: Config, *, wall: Callable[[], float] = time.time,
                 on_fatal: Callable[[AgentError], None] | None = None):
        """StateError if ``state_dir`` cannot be used (raised here, before going online)."""
        self.cfg = cfg
        self.me = me = cfg.device_id
        self.wall = wall
        self.topics = t = Topics(cfg.topic_prefix, cfg.homeassistant.discovery_prefix)
        check_writable(cfg.state_dir)
        self._on_fatal = on_fatal
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._identity: HeldLock | None = None
        self.gateway: Any = None
        changed = threading.Event()  # what the metrics say changed: publish soon
        self.capacity = Capacity(cfg.state_dir, _executor(cfg, "npu"), _executor(cfg, "cpu"), cfg.cpu.slots,
                                 on_change=changed.set)
        self.bus = Bus(me, cfg.broker, persistent=True, name=f"node-{me}", sync_topic=t.sync(me, new_nonce()),
                       will=Will(t.availability(me), b"offline"), on_connect=self._on_connect,
                       on_fatal=self._fatal, max_packet_bytes=RECEIVE_FACTOR * cfg.max_payload_bytes)
        self.fleet = Fleet(self.bus, t, me, max_bytes=cfg.max_payload_bytes)
        lin = cfg.auction.linucb
        self.jobs = Jobs(me, cfg.state_dir, self.capacity, t, publish=self.bus.publish, age=self._age,
                         max_queue=cfg.cpu.max_queue, job_timeout_s=cfg.auction.job_timeout_s,
                         half_life_jobs=lin.half_life_jobs, max_payload_bytes=cfg.max_payload_bytes,
                         on_change=changed.set)
        self.presence = Presence(cfg, self.capacity, self.jobs, t, self.bus, changed=changed, stop=self._stop,
                                 wall=wall, large=lambda: cfg.auction.invite.past(self.fleet.roster.online_count()))
        self.bids = Bids(me, self.capacity, self.jobs, t, publish=self.bus.publish, age=self._age,
                         snapshot=self.presence.snapshot, max_payload_bytes=cfg.max_payload_bytes)
        self.fronts = Fronts(cfg, t, publish=self.bus.publish, make=self._orchestrator, fleet=lambda: self.fleet,
                             wall=wall)

    def _orchestrator(self, cfg: Config, **hooks: Any) -> Any:
        return orchestrator(cfg, connect=lambda: self.fleet, npu_exec=self.capacity.npu, cpu_exec=self.capacity.cpu,
                            local_snapshot=self.presence.offer_snapshot, **hooks)

    def _age(self, origin: str, sent_at: float, msg: Message, lifetime_s: float) -> float:
        """How long ago ``origin`` sent it (``agent.clock``): no two clocks compared."""
        return self.fleet.roster.offsets.age(origin, sent_at, self.wall(), expiry_left=msg.expiry_left,
                                             expiry_set=float(expiry_interval(lifetime_s)), retained=msg.retain)

    def _on_connect(self, session_present: bool) -> None:
        self.presence.on_connect(session_present)

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        t, me = self.topics, self.me
        if self.capacity.executors:
            # A node with no executor never bids, so it does not hear the calls: a gateway's
            # network thread is free for the bids of its own auctions as they come in.
            self.bus.subscribe(t.all_bid_requests(), self.bids.on_bid_request, inline=True)
            self.bus.subscribe(t.bid_invites(me), self.bids.on_bid_request, qos=0, inline=True)  # sent at QoS 0
        self.bus.subscribe(t.exec(me), self.jobs.on_job, inline=True)
        self.bus.subscribe(t.cancels(me), self.jobs.on_cancel, inline=True)  # in order with the jobs
        self.bus.subscribe(t.trigger(me), self.fronts.on_trigger)
        self.bus.subscribe(t.all_presence(), self.presence.on_presence_query, qos=0, inline=True)  # live only
        if self.cfg.homeassistant.enabled:
            self.bus.subscribe(t.ha_status(), self.presence.on_ha_status)
        self.jobs.start()
        self._spawn(self.presence.loop, "node-metrics")
        self.fronts.start()
        if self.cfg.serve.enabled:
            self._start_gateway()
        if self.cfg.broker.username is not None:
            self._spawn(self._connect_as_the_device, "node-identity")
        else:
            self.bus.start()
        cap = self.capacity
        log.info("node %s starting: NPU %s, CPU %s, broker %s, prefix %r", me, _describe(cap.npu),
                 _describe(cap.cpu, cap.slots), ", ".join(f"{h}:{p}" for h, p in self.cfg.broker.addresses),
                 self.cfg.topic_prefix)

    def _start_gateway(self) -> None:
        """The OpenAI-compatible endpoint (agent.serve), on this node's connection."""
        from agent.serve import Gateway, OrchestratorBackend, own_models

        own = own_models(self.capacity.npu, self.capacity.cpu)
        self.gateway = Gateway(self.cfg, OrchestratorBackend(lambda: self._orchestrator(self.cfg),
                                                             lambda: self.fleet, own, self.me))
        self.gateway.start()

    def _connect_as_the_device(self) -> None:
        """With a username the broker allows this device one connection (its client id is
        the username): wait for a trigger run without the daemon to finish with it."""
        lock = IdentityLock(self.cfg.state_dir)
        held = lock.try_acquire("node")
        if held is None:
            log.warning("waiting for pid %s to let go of this device's broker connection (one per device)",
                        lock.holder())
            held = lock.wait_acquire("node", float("inf"), stop=self._stop.is_set)
        if held is None:
            return  # stopped while waiting
        self._identity = held
        self.bus.start()

    def drain(self, grace_s: float) -> bool:
        """Stop taking work and give what runs or waits ``grace_s`` to finish (SIGTERM);
        True if everything finished. Call ``stop`` afterwards."""
        self.capacity.drain()
        gate = self.jobs.gate
        log.info("draining: no new work; waiting up to %g s for %d job(s)", grace_s, gate.depth)
        done = gate.wait_idle(grace_s)
        if not done:
            log.warning("drain: %d job(s) still running after %g s; stopping them", gate.depth, grace_s)
        return done

    def stop(self) -> None:
        """Shutdown: cancel what still runs, publish offline, disconnect."""
        self._stop.set()
        self.presence.changed.set()
        self.fronts.control.stop()
        if self.gateway is not None:
            self.gateway.stop()
        self.jobs.stop()
        self.fronts.triggers.stop(timeout=1.0)
        self.bus.stop(final=[(self.topics.availability(self.me), b"offline", True)])
        if self._identity is not None:
            self._identity.release()
        for thread in self._threads:
            thread.join(timeout=5)
        log.info("node %s stopped", self.me)

    def wait(self, timeout: float | None = None) -> bool:
        return self._stop.wait(timeout)

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _fatal(self, error: AgentError) -> None:
        """Another node has our identity: never fight over it (that flaps forever)."""
        self._stop.set()
        if self._on_fatal is not None:
            self._on_fatal(error)


def _executor(cfg: Config, mode: str) -> Served | None:
    section = cfg.npu if mode == "npu" else cfg.cpu
    if not section.enabled:
        return None
    executor, problem = usable(section.executor, name=cfg.device_id)
    if problem:
        log.warning("%s executor unusable, not offering %s: %s", mode, mode.upper(), problem)
    return executor


def _describe(executor: Served | None, slots: int | None = None) -> str:
    if executor is None:
        return "off"
    return executor.name + (f" x{slots}" if slots else "")
