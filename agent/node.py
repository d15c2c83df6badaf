"""The node daemon: presence, metrics, bids, execution, HA discovery, MQTT triggers.

Theory of operation. The bus dispatcher thread runs the handlers below; each one decodes
and validates (garbage gets one log line and is never executed), asks a pure part what to
do, and either publishes a small reply at once (a bid, a decline, a replayed result) or
hands work to a worker (the NPU thread, the CPU gate's slot threads, the trigger pool).

- Bids: the ledger issues a claim per (rid, origin); the bid goes to the origin alone,
  with a live snapshot, the backlog in seconds and this device's estimate for the job.
- Jobs: ``JobLedger.receive`` decides (exactly-once under at-least-once delivery); an
  admitted job then claims what its bid promised — the NPU ``flock``, or a place in the
  CPU gate — or is declined with the reason, and the orchestrator moves on. A job's age
  comes from ``agent.clock``: no deadline compares two devices' wall clocks.
- Execution: tokens are streamed as result events; the final event is written to the
  on-disk journal before the run is forgotten, so a redelivered copy is answered from it.
- Health: a state_dir that cannot be written makes the node unhealthy — it stops bidding
  and taking jobs, says why in its metrics, and recovers when the disk does. A mode whose
  model server cannot be reached (``Served.down``) is taken off the offer at once — no
  CPU slots or model in the metrics and bids, its jobs declined, and with no mode left
  the node's health says so and it sits auctions out — until a connect succeeds again. A node that
  finds another live node with its device_id stops (the caller exits 2).
- Draining (SIGTERM): no more bids or jobs; what runs or waits is given ``drain_s`` to
  finish; then the node goes offline.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from agent.bus import Bus, Message, Will, expiry_interval, new_nonce
from agent.config import Config
from agent.control import Channel, ControlServer
from agent.errors import (
    AgentError,
    Cancelled,
    ExecutionTimeout,
    ExecutorError,
    ExitCode,
    MessageError,
    StateError,
    UsageError,
)
from agent.executors import Params, Result, Served, estimate_tokens, usable
from agent.fleet import Fleet
from agent.gate import Gate
from agent.journal import Journal
from agent.ledger import Admit, Attach, Decline, Ignore, JobLedger, Replay, Run
from agent.locks import Claim, CpuSlots, IdentityLock, NpuLock
from agent.messages import (
    Bid,
    BidRequest,
    Cancel,
    Chat,
    Done,
    Error,
    Job,
    LastResult,
    Metrics,
    ResultEvent,
    Snapshot,
    Token,
    TriggerRequest,
    decoded,
    encode_result,
)
from agent.metrics import HostSampler, LatencyWindow, snapshot
from agent.servicemodel import InitCost, ServiceRecord, job_seconds
from agent.statefiles import check_writable
from agent.topics import Topics, is_id

log = logging.getLogger(__name__)

NPU_POLL_S = 0.5          # how quickly a claim by another process shows in metrics
DISCONNECTED_POLL_S = 1.0  # with no broker there is nothing to publish to
HEALTH_RETRY_S = 5.0       # how often an unhealthy node tries its state_dir again
ENGINE_RETRY_S = 1.0       # how often a mode whose model server is down tries to connect
# Metrics after a job changes state: soon, not per change (every peer decodes each one).
METRICS_MIN_GAP_S = 0.2


def metrics_due(now: float, *, next_at: float, urgent: bool, pending: bool, published_at: float) -> bool:
    """Whether a node publishes its metrics now: on its interval, at once for a change of
    health, presence or NPU, and for a job's change of state once METRICS_MIN_GAP_S has
    passed since the last publish (a burst of jobs costs one message, not one per job)."""
    return now >= next_at or urgent or (pending and now >= published_at + METRICS_MIN_GAP_S)


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
        self.me = cfg.device_id
        self.wall = wall
        self.topics = Topics(cfg.topic_prefix, cfg.homeassistant.discovery_prefix)
        check_writable(cfg.state_dir)
        self.npu_lock = NpuLock(cfg.state_dir)
        self.npu_exec = self._executor("npu") if cfg.npu.enabled else None
        self.cpu_exec = self._executor("cpu") if cfg.cpu.enabled else None
        self.journal = Journal(cfg.state_dir)
        self.sampler = HostSampler()
        self.latency = LatencyWindow()
        self.record = ServiceRecord(cfg.auction.linucb.half_life_jobs)
        self.init_cost = InitCost(cfg.auction.linucb.half_life_jobs)
        slots = cfg.cpu.slots if self.cpu_exec else 0
        self.cpu_slots = CpuSlots(cfg.state_dir, slots)
        self.ledger = JobLedger(self.me, recorded=self.journal.get, encode=encode_result)
        self._on_fatal = on_fatal
        self.bus = Bus(self.me, cfg.broker, persistent=True, name=f"node-{self.me}",
                       sync_topic=self.topics.sync(self.me, new_nonce()),
                       will=Will(self.topics.availability(self.me), b"offline"), on_connect=self._on_connect,
                       on_fatal=self._fatal, max_packet_bytes=RECEIVE_FACTOR * cfg.max_payload_bytes)
        self.fleet = Fleet(self.bus, self.topics, self.me, max_bytes=cfg.max_payload_bytes)
        self.gate: Gate[Run] = Gate(slots, cfg.cpu.max_queue, self._execute, expected=self._expected)
        # MQTT/Home Assistant prompts: a fixed pool of orchestrations, a bounded line behind it.
        self.triggers: Gate[tuple[TriggerRequest, str | None]] = Gate(
            cfg.triggers.workers, cfg.triggers.max_waiting, lambda item, _: self._orchestrate(*item),
            expected=lambda item: 0.0, name="trigger")
        self._npu_busy_here = False
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._last_npu_free: bool | None = None
        self._last_health = "ok"
        self._metrics_due = threading.Event()
        self.health = "ok"          # or why this node takes no work
        self._identity: Claim | None = None
        self._presence_due = threading.Event()
        self.gateway: Any = None
        self.draining = False
        # This device's own trigger/status processes come through here, not the broker.
        self.control = ControlServer(cfg.state_dir, self._on_control)
        self._control_busy = threading.Semaphore(cfg.triggers.workers + cfg.triggers.max_waiting)

    def _executor(self, mode: str) -> Served | None:
        section = self.cfg.npu if mode == "npu" else self.cfg.cpu
        executor, problem = usable(section.executor, name=self.me)
        if problem:
            log.warning("%s executor unusable, not offering %s: %s", mode, mode.upper(), problem)
        return executor

    @property
    def simulated(self) -> bool:
        return any(getattr(e, "simulated", False) for e in (self.npu_exec, self.cpu_exec) if e)

    @property
    def taking_work(self) -> bool:
        return self.health == "ok" and not self.draining

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        t = self.topics
        self.bus.subscribe(t.all_bid_requests(), self._on_bid_request, inline=True)
        self.bus.subscribe(t.bid_invites(self.me), self._on_bid_request, inline=True)  # a large fleet's call
        self.bus.subscribe(t.exec(self.me), self._on_job)
        self.bus.subscribe(t.cancels(self.me), self._on_cancel)
        self.bus.subscribe(t.trigger(self.me), self._on_trigger)
        self.bus.subscribe(t.all_presence(), self._on_presence_query, inline=True)
        if self.cfg.homeassistant.enabled:
            self.bus.subscribe(t.ha_status(), self._on_ha_status)
        self.gate.start()
        self.triggers.start()
        self._spawn(self._metrics_loop, "node-metrics")
        self.control.start()
        if self.cfg.serve.enabled:
            self._start_gateway()
        if self.cfg.broker.username is not None:
            self._spawn(self._connect_as_the_device, "node-identity")
        else:
            self.bus.start()
        log.info("node %s starting: NPU %s, CPU %s, broker %s, prefix %r", self.me,
                 _describe(self.npu_exec), _describe(self.cpu_exec, self.gate.slots),
                 ", ".join(f"{h}:{p}" for h, p in self.cfg.broker.addresses), self.cfg.topic_prefix)

    def _start_gateway(self) -> None:
        """The OpenAI-compatible endpoint (agent.serve), on this node's connection."""
        from agent.serve import Gateway, OrchestratorBackend, own_models

        def make() -> Any:
            return self._orchestrator(self.cfg)

        own = own_models(self.npu_exec, self.cpu_exec)
        self.gateway = Gateway(self.cfg, OrchestratorBackend(make, lambda: self.fleet, own, self.me))
        self.gateway.start()

    def _connect_as_the_device(self) -> None:
        """With a username the broker allows this device one connection (its client id is
        the username): wait for a trigger run without the daemon to finish with it."""
        lock = IdentityLock(self.cfg.state_dir)
        claim = lock.try_claim("node")
        if claim is None:
            log.warning("waiting for pid %s to let go of this device's broker connection (one per device)",
                        lock.holder())
            claim = lock.wait_claim("node", float("inf"), stop=self._stop.is_set)
        if claim is None:
            return  # stopped while waiting
        self._identity = claim
        self.bus.start()

    def drain(self, grace_s: float) -> bool:
        """Stop taking work and give what runs or waits ``grace_s`` to finish (SIGTERM);
        True if everything finished. Call ``stop`` afterwards."""
        self.draining = True
        self._metrics_due.set()
        log.info("draining: no new work; waiting up to %g s for %d job(s)", grace_s, self.gate.depth)
        done = self.gate.wait_idle(grace_s)
        if not done:
            log.warning("drain: %d job(s) still running after %g s; stopping them", self.gate.depth, grace_s)
        return done

    def stop(self) -> None:
        """Shutdown: cancel what still runs, publish offline, disconnect."""
        self._stop.set()
        self._metrics_due.set()
        self.control.stop()
        if self.gateway is not None:
            self.gateway.stop()
        for run in self.ledger.running():
            run.cancel.set()
        self.gate.stop()
        self.triggers.stop(timeout=1.0)
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

    # ---------------------------------------------------------------- health
    def _unhealthy(self, why: str) -> None:
        if self.health == "ok":
            log.error("not taking work until this is fixed: %s", why)
        self.health = why
        self._metrics_due.set()

    def _check_health(self) -> None:
        try:
            check_writable(self.cfg.state_dir)
            self.journal.flush()  # what the disk refused must go in first
        except StateError as exc:
            self.health = str(exc)
            return
        log.info("state_dir is writable again; taking work")
        self.health = "ok"
        self._metrics_due.set()

    # ---------------------------------------------------------------- presence + metrics
    def _on_connect(self, session_present: bool) -> None:
        # Metrics first: the broker keeps one connection's messages in order, so whoever
        # sees this device online already has what it serves and whether it takes work.
        self._publish_metrics()
        self.bus.publish(self.topics.availability(self.me), b"online", retain=True)
        if self.cfg.homeassistant.enabled:
            self._announce()

    def _announce(self) -> None:
        from agent.homeassistant import discovery_payload
        self.bus.publish(self.topics.ha_config(self.me),
                         discovery_payload(self.cfg, self.topics, simulated=self.simulated), retain=True)

    def _on_ha_status(self, msg: Message) -> None:
        if msg.payload == b"online":
            self._announce()
        elif msg.payload != b"offline":
            log.warning("ignoring Home Assistant status %r (want online/offline)", msg.payload[:40])

    def _on_presence_query(self, msg: Message) -> None:
        """Someone found no retained presence (a broker without retained messages on
        wildcards): announce ourselves again, from the metrics loop, after the query."""
        parsed = self.topics.parse(msg.topic)
        if parsed is not None and parsed.device != self.me:
            self._presence_due.set()
            self._metrics_due.set()

    def _npu_free(self) -> bool:
        return self.npu_exec is not None and self.npu_exec.down is None and not self._npu_busy_here \
            and self.npu_lock.is_free()

    def snapshot(self) -> Snapshot:
        models = {mode: info for mode, e in (("npu", self.npu_exec), ("cpu", self.cpu_exec))
                  if e is not None and e.down is None and (info := e.model_info()) is not None}
        cpu_up = self.cpu_exec is not None and self.cpu_exec.down is None
        return snapshot(self.sampler.sample(), has_npu=self.npu_exec is not None, npu_free=self._npu_free(),
                        models=models,
                        cpu_slots=self.gate.slots if cpu_up else 0, queue_depth=self.gate.depth,
                        recent=self.latency.summary(), backlog_s=self.gate.backlog_s())

    def _engines_down(self) -> str | None:
        """Why no mode can run anything now: every executor's model server is down."""
        executors = [e for e in (self.npu_exec, self.cpu_exec) if e is not None]
        if not executors or any(e.down is None for e in executors):
            return None
        return "model server down: " + "; ".join(e.down or "" for e in executors)

    def _retry_engines(self) -> bool:
        """Try the model servers that are down; True if one came back."""
        return any(e.down is not None and e.back() for e in (self.npu_exec, self.cpu_exec) if e is not None)

    def _expected(self, run: Run) -> float:
        """A queued job's expected time from its start — start-up and service, from this
        device's own records — the basis on which the gate ages a running job."""
        job = run.job
        executor = self.npu_exec if job.mode == "npu" else self.cpu_exec
        return job_seconds(self.record, self.init_cost, job.mode, estimate_tokens(job.text_prompt), job.max_new_tokens,
                           warm=executor.is_warm() if executor is not None else True)

    def _publish_metrics(self) -> None:
        snap = self.snapshot()
        self._last_npu_free = snap.npu_free
        self._last_health = self._health_word()
        msg = Metrics(device=self.me, ts=round(self.wall(), 3), snapshot=snap,
                      last_latency_ms=self.latency.last_ms, health=self._last_health)
        self.bus.publish(self.topics.metrics(self.me), msg.to_payload(), retain=True)

    def _health_word(self) -> str:
        if self.health != "ok":
            return self.health
        return "draining" if self.draining else (self._engines_down() or "ok")

    def _metrics_loop(self) -> None:
        """Publish metrics every interval, and soon after a job changes state — at most
        once per METRICS_MIN_GAP_S, since every device and dashboard decodes each one — but
        at once when the health changes or another process on this device takes or frees
        the NPU (seen by polling); retry an unwritable state_dir while unhealthy."""
        next_at = time.monotonic()
        next_health = next_at
        next_engines = next_at
        published_at = -math.inf
        pending = False  # a job changed state since the last publish
        while not self._stop.is_set():
            now = time.monotonic()
            if self._metrics_due.is_set():
                self._metrics_due.clear()
                pending = True
            if self.health != "ok" and now >= next_health:
                self._check_health()
                next_health = now + HEALTH_RETRY_S
            engines_down = any(e is not None and e.down is not None for e in (self.npu_exec, self.cpu_exec))
            if engines_down and now >= next_engines:
                if self._retry_engines():
                    pending = True
                next_engines = now + ENGINE_RETRY_S
            if self.bus.connected:
                urgent = (self._presence_due.is_set() or self._last_health != self._health_word()
                          or (self.npu_exec is not None and self._last_npu_free is not None
                              and self._last_npu_free != self._npu_free()))
                if metrics_due(now, next_at=next_at, urgent=urgent, pending=pending, published_at=published_at):
                    pending = False
                    self._publish_metrics()
                    if self._presence_due.is_set():  # metrics first, as after a connect
                        self._presence_due.clear()
                        self.bus.publish(self.topics.availability(self.me), b"online", retain=True)
                    published_at = now
                    next_at = now + self.cfg.metrics_interval_s
                timeout = next_at - now
                if pending:
                    timeout = min(timeout, published_at + METRICS_MIN_GAP_S - now)
            else:
                pending = False  # the next connect publishes fresh metrics anyway
                timeout = DISCONNECTED_POLL_S
            if self.npu_exec is not None:
                timeout = min(timeout, NPU_POLL_S)
            if self.health != "ok":
                timeout = min(timeout, HEALTH_RETRY_S)
            if engines_down:
                timeout = min(timeout, next_engines - now)
            self._metrics_due.wait(max(timeout, 0.0))

    # ---------------------------------------------------------------- bids
    def _age(self, origin: str, sent_at: float, msg: Message, lifetime_s: float) -> float:
        """How long ago ``origin`` sent it (``agent.clock``): no two clocks compared."""
        return self.fleet.roster.offsets.age(origin, sent_at, self.wall(), expiry_left=msg.expiry_left,
                                             expiry_set=float(expiry_interval(lifetime_s)), retained=msg.retain)

    def _on_bid_request(self, msg: Message) -> None:
        parsed = self.topics.parse(msg.topic)
        req = decoded(msg.topic, msg.payload, lambda p: BidRequest.from_payload(p, self.cfg.max_payload_bytes),
                      what="call for bids", logger=log,
                      matches=lambda r: parsed is not None and parsed.rid == r.rid
                      and parsed.origin in (None, r.origin) and parsed.device in (None, self.me))
        if req is None or _retained(msg, "call for bids"):
            return
        if not self.taking_work or self._engines_down():
            return  # an unhealthy or draining node stays out of auctions
        age = self._age(req.origin, req.sent_at, msg, req.window_s)
        if age > req.window_s:
            log.info("ignored call for bids %s: its window closed %.1f s ago", req.rid, age - req.window_s)
            return
        npu_ok = self.npu_exec is not None and self.npu_exec.serves(req.model) \
            and (self.npu_exec.tools or not req.tools)
        cpu_ok = self.cpu_exec is not None and self.gate.slots > 0 and self.cpu_exec.serves(req.model) \
            and (self.cpu_exec.tools or not req.tools)
        if not (npu_ok or (cpu_ok and req.need == "any")):
            return  # nothing here could take it (roster.can_take): no bid, and nobody waits for one
        claim = self.ledger.offer(req.rid, req.origin, time.monotonic())
        if claim is None:
            log.debug("dropped call for bids %s from %s: over its share of calls", req.rid, req.origin)
            return
        if not claim:
            log.warning("dropped call for bids %s from %s: that rid was called by another origin", req.rid,
                        req.origin)
            return
        # This device's own orchestrations get a bid too: their CPU jobs come back through
        # exec/<self> and the same gate as everyone else's.
        cpu = self.cpu_exec if self.cpu_exec is not None and self.cpu_exec.down is None \
            and self.cpu_exec.serves(req.model) and (self.cpu_exec.tools or not req.tools) else None
        estimate = self.record.estimate("cpu", req.prompt_tokens, req.max_new_tokens) if cpu else None
        init_s = self.init_cost.expected("cpu", cpu.is_warm(), req.prompt_tokens) if cpu else 0.0
        bid = Bid(rid=req.rid, device=self.me, origin=req.origin, claim=claim, snapshot=self.snapshot(),
                  service_s=round(estimate[0], 4) if estimate else None,
                  service_n=round(estimate[1], 2) if estimate else 0.0, init_s=round(init_s, 4))
        # No MQTT 5 properties on the reply: the rid is in the topic and the payload, and
        # packing properties in pure Python was a measurable share of the auction.
        self.bus.publish(self.topics.bid_reply(req.origin, req.rid, self.me), bid.to_payload())

    # ---------------------------------------------------------------- jobs
    def _send(self, origin: str, event: ResultEvent) -> bytes:
        payload = encode_result(event)
        self.bus.publish(self.topics.result(origin, event.rid, self.me), payload)
        return payload

    def _on_job(self, msg: Message) -> None:
        job = decoded(msg.topic, msg.payload, lambda p: Job.from_payload(p, self.cfg.max_payload_bytes),
                      what="job", logger=log)
        if job is None or _retained(msg, "job"):
            return
        verdict = self.ledger.receive(job, self._age(job.origin, job.sent_at, msg, job.timeout_s))
        if isinstance(verdict, Replay):
            log.info("job %s was seen before; sending its recorded answer again", job.rid)
            self.bus.publish(self.topics.result(job.origin, job.rid, self.me), verdict.payload)
        elif isinstance(verdict, Attach):
            log.info("job %s redelivered while it runs; attaching", job.rid)
            self._send(job.origin, verdict.accepted)
        elif isinstance(verdict, Decline):
            self._send(job.origin, verdict.event)
            log.info("declined job %s from %s: %s", job.rid, job.origin, verdict.event.reason)
        elif isinstance(verdict, Ignore):
            log.info("ignored job %s from %s: %s", job.rid, job.origin, verdict.reason)
        else:
            assert isinstance(verdict, Admit)
            self._admit(job, self._age(job.origin, job.sent_at, msg, job.timeout_s))

    def _admit(self, job: Job, age_s: float) -> None:
        """Claim what the bid promised and queue the job, or decline it with the reason."""
        received = time.monotonic()
        # Never longer than this node's own job_timeout_s, whatever the job asks for.
        deadline = received + min(job.timeout_s, self.cfg.auction.job_timeout_s) - age_s
        if not self.taking_work:
            self._decline(job, "draining" if self.draining else "unhealthy")
            return
        executor = self.npu_exec if job.mode == "npu" else self.cpu_exec
        if executor is not None and not executor.serves(job.model):
            self._decline(job, f"model_not_served: {job.model}")
            return
        if executor is not None and executor.down is not None:
            self._decline(job, "model_server_down")
            return
        if executor is not None and job.chat is not None and job.chat.tools and not executor.tools:
            self._decline(job, "no_tools: this device's executor cannot call tools")
            return
        if job.mode == "npu":
            claim = self.npu_lock.try_claim(owner=job.rid) if self.npu_exec is not None else None
            if claim is None:
                self._decline(job, "no_npu" if self.npu_exec is None else "npu_busy")
                return
            self._npu_busy_here = True
            run = self.ledger.accept(job, received, deadline, queue_position=0, resource=claim)
            self._send(job.origin, run.accepted)
            threading.Thread(target=self._execute, args=(run, None), name=f"npu-{job.rid[:8]}", daemon=True).start()
        else:
            if self.cpu_exec is None or not self.gate.has_room():
                self._decline(job, "no_cpu" if self.cpu_exec is None else "queue_full")
                return
            # Only this thread queues, so the room checked above is still there.
            run = self.ledger.accept(job, received, deadline, queue_position=self.gate.depth)
            self._send(job.origin, run.accepted)  # before a slot can start it and stream
            self.gate.offer(run)
        log.info("accepted %s job %s from %s", job.mode, job.rid, job.origin)
        self._metrics_due.set()

    def _decline(self, job: Job, reason: str) -> None:
        self._send(job.origin, self.ledger.decline(job, reason))
        log.info("declined job %s from %s: %s", job.rid, job.origin, reason)

    def _on_cancel(self, msg: Message) -> None:
        parsed = self.topics.parse(msg.topic)
        cancel = decoded(msg.topic, msg.payload, lambda p: Cancel.from_payload(p, self.cfg.max_payload_bytes),
                         what="cancel", logger=log, matches=lambda c: parsed is not None and parsed.origin == c.origin)
        if cancel is None:
            return
        run = self.ledger.cancel(cancel)
        if run is None and not self.ledger.cancelled(cancel):
            log.warning("ignored cancel of %s from %s: its key does not fit a job of theirs", cancel.rid, cancel.origin)
            return
        log.info("job %s cancelled by %s (%s)%s", cancel.rid, cancel.origin, cancel.reason or "no reason",
                 "; stopping it" if run is not None else "")

    def _execute(self, run: Run, slot: int | None) -> None:
        """Run a job: on the NPU (``slot`` None, the NPU claimed on admission), or on CPU
        slot ``slot``, whose device-wide lock it holds while the model runs."""
        job = run.job
        executor = self.npu_exec if job.mode == "npu" else self.cpu_exec
        assert executor is not None
        if slot is not None:
            run.resource = self.cpu_slots.locks[slot].claim(owner=job.rid)  # a trigger running alone may hold it
        seq = itertools.count()
        queue_ms = (time.monotonic() - run.received) * 1000
        ok = False
        try:
            remaining = run.deadline - time.monotonic()
            if remaining <= 0:
                self.ledger.expire(run)
                raise ExecutionTimeout(executor.name, 0.0)
            if not self.ledger.start(run):
                raise Cancelled(executor.name, "cancelled before it started")
            params = Params(max_new_tokens=job.max_new_tokens, temperature=job.temperature,
                            timeout_s=remaining, rid=job.rid,
                            hold_fds=(run.resource.fd,) if run.resource is not None else (), chat=job.chat)
            run.warm = executor.is_warm()

            def on_token(text: str) -> None:
                self._send(job.origin, Token(job.rid, self.me, next(seq), text, job.digest))

            final = self._done(run, executor.run(job.text_prompt, params, on_token, run.cancel), queue_ms)
            ok = True
        except ExecutorError as exc:
            final = self._failed(run, exc)
        except Exception as exc:  # an executor bug: report it, keep the node alive
            log.exception("job %s: executor crashed", job.rid)
            final = self._failed(run, ExecutorError(executor.name, f"internal error: {exc}"))
        finally:
            if run.resource is not None:
                run.resource.release()
            if job.mode == "npu":
                self._npu_busy_here = False
        try:
            self.journal.record(job.rid, job.digest, final)
        except StateError as exc:
            self._unhealthy(str(exc))
        self.ledger.finish(run, ok)
        self._metrics_due.set()

    def _done(self, run: Run, result: Result, queue_ms: float) -> bytes:
        job = run.job
        t = result.timings
        timings = replace(t, queue_ms=queue_ms, total_ms=t.total_ms + queue_ms)
        payload = self._send(job.origin, Done(job.rid, self.me, result.text, timings, result.prompt_tokens,
                                              result.generated_tokens, digest=job.digest,
                                              finish_reason=result.finish_reason,
                                              tool_calls=result.tool_calls))
        # The answer first, the bookkeeping after: nobody waits on it. The record fits the
        # work; start-up (loading a model that was not warm) apart.
        self.latency.add(job.mode, timings.total_ms, result.generated_tokens)
        self.init_cost.observe(job.mode, run.warm, t.init_ms / 1000, estimate_tokens(job.text_prompt))
        self.record.observe(job.mode, estimate_tokens(job.text_prompt), job.max_new_tokens, result.generated_tokens,
                            max(t.total_ms - t.init_ms, 0.0) / 1000)
        log.info("job %s done in %.0f ms (%d tokens)", job.rid, timings.total_ms, result.generated_tokens)
        return payload

    def _failed(self, run: Run, exc: ExecutorError) -> bytes:
        log.warning("job %s failed: %s", run.job.rid, exc)
        return self._send(run.job.origin, Error(run.job.rid, self.me, exc.reason, kind=exc.kind,
                                                exit_code=getattr(exc, "returncode", None),
                                                partial_text=exc.partial_text, digest=run.job.digest))

    # ---------------------------------------------------------------- triggers (HA, mosquitto_pub)
    def _on_trigger(self, msg: Message) -> None:
        try:
            req = TriggerRequest.from_payload(msg.payload, self.cfg.max_payload_bytes)
        except MessageError as exc:
            log.warning("dropped trigger on %s: %s", msg.topic, exc)
            # Whoever gave an id (or a response topic) is waiting: tell them why. (Not on
            # last_result: garbage from anyone must not replace a dashboard's answer.)
            reply_id = TriggerRequest.reply_id(msg.payload, msg.correlation_data)
            if reply_id is not None or msg.response_topic:
                self._answer(TriggerRequest("-", id=reply_id), msg.response_topic, LastResult(
                    rid="-", device=self.me, winner=None, path=None, ok=False, text="", total_ms=0.0, id=reply_id,
                    error=f"bad trigger: {exc}"), dashboard=False)
            return
        if req.id is None:
            req = replace(req, id=TriggerRequest.reply_id(b"", msg.correlation_data))
        if self.triggers.offer((req, msg.response_topic)) is None:
            log.warning("trigger refused: %d already running or waiting", self.triggers.depth)
            self._answer(req, msg.response_topic, LastResult(
                rid="-", device=self.me, winner=None, path=None, ok=False, text="", total_ms=0.0, id=req.id,
                error=f"busy: {self.triggers.depth} prompts are already running or waiting on this device; "
                      "try again later"))

    def _orchestrate(self, req: TriggerRequest, response_topic: str | None) -> None:
        orch = self._orchestrator(self.cfg)
        try:
            out = orch.run(req.prompt, max_new_tokens=req.max_new_tokens or 256, model=req.model)
        except AgentError as exc:
            log.warning("trigger refused: %s", exc)
            last = LastResult(rid="-", device=self.me, winner=None, path=None, ok=False, text="", error=str(exc),
                              total_ms=0.0, id=req.id)
        else:
            log.info("trigger %s: %s via %s in %.0f ms", out.rid, "answered" if out.ok else "failed",
                     out.path, out.total_ms)
            last = LastResult(rid=out.rid, device=self.me, winner=out.winner, path=out.path, ok=out.ok,
                              text=out.text, error=out.error, total_ms=round(out.total_ms, 1), id=req.id)
        self._answer(req, response_topic, last)

    def _answer(self, req: TriggerRequest, response_topic: str | None, last: LastResult, *,
                dashboard: bool = True) -> None:
        """On last_result (retained, for dashboards), on the trigger's own answer topic if
        it had an id, and on its MQTT 5 response topic if it named one."""
        payload = last.to_payload()
        if dashboard:
            self.bus.publish(self.topics.last_result(self.me), payload, retain=True)
        if req.id is not None:
            self.bus.publish(self.topics.answer(self.me, req.id), payload)
        if response_topic:
            self.bus.publish(response_topic, payload)

    # ---------------------------------------------------------------- the local control socket
    def _on_control(self, request: dict[str, Any], channel: Channel) -> None:
        """A trigger or status request from a process of this device (agent/control.py)."""
        op = request.get("op")
        if op == "status":
            from agent.status import rows
            channel.send({"type": "status", "devices": rows(self.fleet.roster, self.wall())})
            return
        if op == "forget":
            from agent.status import forget
            device = request.get("device")
            if not isinstance(device, str) or not is_id(device) or device == self.me:
                channel.send({"type": "error", "error": "forget: a device id other than this node's",
                              "exit_code": ExitCode.USAGE})
                return
            channel.send(forget(self.fleet, device, force=request.get("force") is True))
            return
        if op != "trigger":
            channel.send({"type": "error", "error": f"unknown request {op!r}", "exit_code": ExitCode.USAGE})
            return
        try:
            ask = _trigger_request(request)
        except UsageError as exc:
            channel.send({"type": "error", "error": str(exc), "exit_code": exc.exit_code})
            return
        if not self._control_busy.acquire(blocking=False):
            channel.send({"type": "error", "error": "busy: too many prompts are running or waiting on this device; "
                                                    "try again later", "exit_code": ExitCode.FAILED})
            return
        try:
            cfg = self.cfg
            if ask.bid_timeout_s is not None:
                cfg = replace(cfg, auction=replace(cfg.auction, bid_timeout_s=ask.bid_timeout_s))
            orch = self._orchestrator(cfg, on_token=lambda text: channel.send({"type": "token", "text": text}),
                                      on_decision=lambda d: channel.send({"type": "decision", "winner": d.winner,
                                                                          "path": d.path, "score": d.score}),
                                      on_progress=lambda text: channel.send({"type": "progress", "text": text}))
            channel.watch(orch.interrupt)  # the client hung up (Ctrl-C): cancel its job
            out = orch.run(ask.prompt, max_new_tokens=ask.max_new_tokens, need=ask.need, dry_run=ask.dry_run,
                           model=ask.model, temperature=ask.temperature, chat=ask.chat)
        except AgentError as exc:
            channel.send({"type": "error", "error": str(exc), "exit_code": exc.exit_code})
        else:
            channel.send({"type": "outcome", "outcome": out.to_json()})
        finally:
            self._control_busy.release()

    def _orchestrator(self, cfg: Config, **kwargs: Any) -> Any:
        from agent.linucb import ArmStore
        from agent.orchestrator import Orchestrator
        return Orchestrator(cfg, connect=lambda: self.fleet, npu_exec=self.npu_exec, cpu_exec=self.cpu_exec,
                            arms=lambda: ArmStore.for_config(cfg), local_snapshot=self._local_offer_snapshot,
                            **kwargs)

    def _local_offer_snapshot(self) -> Snapshot:
        return replace(self.snapshot(), npu_free=False)  # the NPU was tried first, before any auction


@dataclass(frozen=True)
class ControlTrigger:
    """A trigger handed over the control socket (by ``trigger`` or ``serve`` of this device)."""

    prompt: str
    max_new_tokens: int = 256
    need: str = "any"
    dry_run: bool = False
    bid_timeout_s: float | None = None
    model: str | None = None
    temperature: float | None = None
    chat: Chat | None = None


def _trigger_request(req: dict[str, Any]) -> ControlTrigger:
    """The fields of a control-socket trigger, checked; UsageError if one is wrong."""
    prompt, max_new, need = req.get("prompt"), req.get("max_new_tokens", 256), req.get("need", "any")
    dry_run, bid_timeout, model = req.get("dry_run", False), req.get("bid_timeout_s"), req.get("model")
    if not isinstance(prompt, str) or not prompt.strip():
        raise UsageError("the prompt is empty")
    if type(max_new) is not int or max_new < 1:
        raise UsageError("max_new_tokens must be a positive integer")
    if need not in ("any", "npu") or type(dry_run) is not bool:
        raise UsageError("need must be any or npu, dry_run true or false")
    if bid_timeout is not None and (not isinstance(bid_timeout, (int, float)) or not 0 < bid_timeout < 86400):
        raise UsageError("bid_timeout_s must be a number of seconds > 0")
    if model is not None and not (isinstance(model, str) and 0 < len(model) <= 128):
        raise UsageError("model must be a model name")
    temperature = req.get("temperature")
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                    or not 0 <= temperature <= 10):
        raise UsageError("temperature must be a number from 0 to 10")
    chat = None
    if req.get("chat") is not None:
        try:
            chat = Chat.from_obj(req["chat"], "trigger", 256 * 1024 * 1024)
        except MessageError as exc:
            raise UsageError(str(exc)) from None
    return ControlTrigger(prompt, max_new, need, dry_run, None if bid_timeout is None else float(bid_timeout), model,
                          None if temperature is None else float(temperature), chat)


def _retained(msg: Message, what: str) -> bool:
    """A retained call for bids or job is never genuine (orchestrators never retain them):
    one a device left on the broker would be acted on by every node that connects later."""
    if msg.retain:
        log.debug("dropped a retained %s on %s", what, msg.topic)
    return msg.retain


def _describe(executor: Served | None, slots: int | None = None) -> str:
    if executor is None:
        return "off"
    return executor.name + (f" x{slots}" if slots else "")
