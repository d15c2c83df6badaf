"""The node daemon: presence, metrics, bids, execution, HA discovery, MQTT triggers.

Theory of operation. The bus dispatcher thread runs the handlers below; each one decodes
and validates, decides, and either publishes a small reply at once (a bid, a decline) or
hands work to a worker thread (the NPU worker, one thread per CPU slot, an orchestration
thread per trigger). Garbage never crashes the node and is never executed: one log line.

Exactly-once execution under at-least-once delivery. Every job is keyed by its ``rid``.
A redelivered job for a rid that is queued or running gets ``accepted`` again (the stream
continues); one that finished gets its recorded ``done``/``error`` again, from memory or
from the on-disk journal after a restart; one that was declined gets the same decline.

Confirm on accept. A bid is an offer with a claim token. A job must present the claim
this process issued for that rid (so a restarted node declines stale work) and arrive
before its ``accept_by``; an NPU job also needs the NPU ``flock`` now, or it is declined
with ``npu_busy`` and the orchestrator moves to the runner-up.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from agent.bus import Bus, Message, Will, new_nonce
from agent.config import Config
from agent.errors import AgentError, ExecutionTimeout, ExecutorError, MessageError
from agent.executors import Executor, Params, Result, usable
from agent.fsm import JOB, Machine
from agent.journal import Journal
from agent.messages import (Accepted, Bid, BidRequest, Cancel, Declined, Done, Error, Job, LastResult,
                            Metrics, ResultEvent, Snapshot, Token, TriggerRequest, decode_exec,
                            encode_result)
from agent.metrics import HostSampler, LatencyWindow, snapshot
from agent.npulock import NpuClaim, NpuLock
from agent.orchestrator import Fleet
from agent.roster import Roster
from agent.topics import Topics

log = logging.getLogger(__name__)
K = TypeVar("K")
V = TypeVar("V")

NPU_POLL_S = 0.5          # how quickly a claim by another process shows in metrics
DISCONNECTED_POLL_S = 1.0  # with no broker there is nothing to publish to
OFFERS_KEPT = 4096        # outstanding claims remembered (bounded against floods)
DECLINES_KEPT = 4096


@dataclass
class JobRun:
    job: Job
    fsm: Machine
    received: float
    claim: NpuClaim | None = None
    accepted: bytes = b""
    cancel: threading.Event = field(default_factory=threading.Event)


class Node:
    def __init__(self, cfg: Config, *, wall: Callable[[], float] = time.time):
        self.cfg = cfg
        self.me = cfg.device_id
        self.wall = wall
        self.topics = Topics(cfg.topic_prefix, cfg.homeassistant.discovery_prefix)
        self.npu_lock = NpuLock(cfg.state_dir)
        self.npu_exec = self._executor("npu") if cfg.npu.enabled else None
        self.cpu_exec = self._executor("cpu") if cfg.cpu.enabled else None
        self.journal = Journal(cfg.state_dir)
        self.sampler = HostSampler()
        self.latency = LatencyWindow()
        self.roster = Roster(self.topics, self.me)
        self.bus = Bus(self.me, cfg.broker, persistent=True, name=f"node-{self.me}",
                       will=Will(self.topics.availability(self.me), b"offline"),
                       on_connect=self._on_connect)
        self._lock = threading.Lock()
        self._epoch = f"{int(wall())}-{os.getpid()}-{new_nonce()}"
        self._claim_seq = itertools.count(1)
        self._offers: OrderedDict[str, str] = OrderedDict()
        self._declines: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._cancelled: OrderedDict[str, float] = OrderedDict()
        self._runs: dict[str, JobRun] = {}
        self._cpu_queue: queue.Queue[JobRun | None] = queue.Queue()
        self._cpu_busy = 0
        self._npu_busy_here = False
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._last_npu_free: bool | None = None
        self._metrics_due = threading.Event()
        self._fleet = Fleet(self.bus, self.roster)  # shared by HA/MQTT triggers; synced once

    def _executor(self, mode: str) -> Executor | None:
        section = self.cfg.npu if mode == "npu" else self.cfg.cpu
        executor, problem = usable(section.executor, name=self.me)
        if problem:
            log.warning("%s executor unusable, not offering %s: %s", mode, mode.upper(), problem)
        return executor

    @property
    def simulated(self) -> bool:
        return any(getattr(e, "simulated", False) for e in (self.npu_exec, self.cpu_exec) if e)

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        t = self.topics
        self.bus.subscribe(t.all_availability(), self.roster.handle)
        self.bus.subscribe(t.all_bid_requests(), self._on_bid_request, inline=True)
        self.bus.subscribe(t.exec(self.me), self._on_job)
        self.bus.subscribe(t.trigger(self.me), self._on_trigger)
        self.bus.set_sync_topic(t.sync(self.me, new_nonce()))
        if self.cfg.homeassistant.enabled:
            self.bus.subscribe(t.ha_status(), self._on_ha_status)
        slots = self.cfg.cpu.slots if self.cpu_exec else 0
        for i in range(slots):
            self._spawn(self._cpu_worker, f"cpu-slot-{i}")
        self._spawn(self._metrics_loop, "node-metrics")
        self.bus.start()
        log.info("node %s starting: NPU %s, CPU %s, broker %s:%d, prefix %r", self.me,
                 _describe(self.npu_exec), _describe(self.cpu_exec, slots),
                 self.cfg.broker.host, self.cfg.broker.port, self.cfg.topic_prefix)

    def stop(self) -> None:
        """Clean shutdown: cancel running work, publish offline, disconnect."""
        self._stop.set()
        self._metrics_due.set()
        with self._lock:
            for run in self._runs.values():
                run.cancel.set()
        for _ in self._threads:
            self._cpu_queue.put(None)
        self.bus.stop(final=[(self.topics.availability(self.me), b"offline", True)])
        for thread in self._threads:
            thread.join(timeout=5)
        log.info("node %s stopped", self.me)

    def wait(self, timeout: float | None = None) -> bool:
        return self._stop.wait(timeout)

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    # ---------------------------------------------------------------- presence + metrics
    def _on_connect(self, session_present: bool) -> None:
        self.bus.publish(self.topics.availability(self.me), b"online", retain=True)
        self._publish_metrics()
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

    def snapshot(self) -> Snapshot:
        npu_free = self.npu_exec is not None and not self._npu_busy_here and self.npu_lock.is_free()
        with self._lock:
            depth = self._cpu_queue.qsize() + self._cpu_busy
        return snapshot(self.sampler.sample(), has_npu=self.npu_exec is not None, npu_free=npu_free,
                        cpu_slots=self.cfg.cpu.slots if self.cpu_exec else 0, queue_depth=depth,
                        recent=self.latency.summary())

    def _publish_metrics(self) -> None:
        snap = self.snapshot()
        self._last_npu_free = snap.npu_free
        msg = Metrics(device=self.me, ts=round(self.wall(), 3), snapshot=snap,
                      last_latency_ms=self.latency.last_ms)
        self.bus.publish(self.topics.metrics(self.me), msg.to_payload(), retain=True)

    def _metrics_loop(self) -> None:
        """Publish metrics every interval, at once after a job changes state, and when
        another process on this device takes or frees the NPU (seen by polling)."""
        next_at = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if self.bus.connected:
                npu_changed = (self.npu_exec is not None and self._last_npu_free is not None
                               and self._last_npu_free != (not self._npu_busy_here and self.npu_lock.is_free()))
                if now >= next_at or npu_changed or self._metrics_due.is_set():
                    self._metrics_due.clear()
                    self._publish_metrics()
                    next_at = now + self.cfg.metrics_interval_s
                timeout = next_at - now
            else:
                self._metrics_due.clear()  # the next connect publishes fresh metrics anyway
                timeout = DISCONNECTED_POLL_S
            if self.npu_exec is not None:
                timeout = min(timeout, NPU_POLL_S)
            self._metrics_due.wait(max(timeout, 0.0))

    # ---------------------------------------------------------------- bids
    def _on_bid_request(self, msg: Message) -> None:
        try:
            req = BidRequest.from_payload(msg.payload, self.cfg.max_payload_bytes)
        except MessageError as exc:
            log.warning("dropped call for bids on %s: %s", msg.topic, exc)
            return
        parsed = self.topics.parse(msg.topic)
        if parsed is None or parsed.rid != req.rid:
            log.warning("dropped call for bids on %s: rid in payload does not match the topic", msg.topic)
            return
        if req.origin == self.me:
            return  # our own orchestration counts this device itself, without the network
        if req.deadline < self.wall():
            log.info("ignored call for bids %s: its deadline has passed", req.rid)
            return
        with self._lock:
            claim = self._offers.get(req.rid)
            if claim is None:
                claim = f"{self._epoch}.{next(self._claim_seq)}"
                _remember(self._offers, req.rid, claim, OFFERS_KEPT)
        bid = Bid(rid=req.rid, device=self.me, claim=claim, snapshot=self.snapshot())
        # No MQTT 5 properties on the reply: the rid is in the topic and the payload, and
        # packing properties in pure Python was a measurable share of the auction.
        self.bus.publish(self.topics.bid_reply(req.rid, self.me), bid.to_payload())

    # ---------------------------------------------------------------- jobs
    def _send(self, event: ResultEvent) -> bytes:
        payload = encode_result(event)
        self.bus.publish(self.topics.exec_result(event.rid, self.me), payload)
        return payload

    def _on_job(self, msg: Message) -> None:
        try:
            job = decode_exec(msg.payload, self.cfg.max_payload_bytes)
        except MessageError as exc:
            log.warning("dropped job on %s: %s", msg.topic, exc)
            return
        if isinstance(job, Cancel):
            self._on_cancel(job)
            return
        now = self.wall()
        with self._lock:
            recorded = self.journal.get(job.rid)
            if recorded is not None:
                log.info("job %s was already run; sending its result again", job.rid)
                self.bus.publish(self.topics.exec_result(job.rid, self.me), recorded)
                return
            run = self._runs.get(job.rid)
            if run is not None:
                log.info("job %s redelivered while %s; attaching", job.rid, run.fsm.state)
                if run.accepted:
                    self.bus.publish(self.topics.exec_result(job.rid, self.me), run.accepted)
                return
            if (job.rid, job.mode) in self._declines:
                self.bus.publish(self.topics.exec_result(job.rid, self.me), self._declines[(job.rid, job.mode)])
                return
            if job.rid in self._cancelled:
                self._remember_decline(job, self._send(Declined(job.rid, self.me, "cancelled")))
                log.info("declined job %s: its orchestrator cancelled it before it arrived", job.rid)
                return
            if job.deadline < now or job.accept_by < now:
                log.info("ignored job %s from %s: too late to start (accept_by passed)", job.rid, job.origin)
                return
            run = JobRun(job=job, fsm=Machine(f"job {job.rid}", JOB, "new"), received=time.monotonic())
            reason = self._admit(run)
            if reason is not None:
                run.fsm.fire("decline")
                self._remember_decline(job, self._send(Declined(job.rid, self.me, reason)))
                log.info("declined job %s from %s: %s", job.rid, job.origin, reason)
                return
            run.fsm.fire("accept")
            self._offers.pop(job.rid, None)  # a claim is honoured once
            self._runs[job.rid] = run
            position = self._cpu_queue.qsize() + self._cpu_busy if job.mode == "cpu" else 0
            run.accepted = self._send(Accepted(job.rid, self.me, job.mode, queue_position=position))
        log.info("accepted %s job %s from %s", job.mode, job.rid, job.origin)
        if job.mode == "npu":
            threading.Thread(target=self._execute, args=(run,), name=f"npu-{job.rid[:8]}", daemon=True).start()
        else:
            self._cpu_queue.put(run)
        self._metrics_due.set()

    def _remember_decline(self, job: Job, payload: bytes) -> None:
        """Called under the lock: a redelivered copy gets the same answer. Keyed by mode too:
        a device that declined the NPU may still be asked to run the same job on its CPU."""
        _remember(self._declines, (job.rid, job.mode), payload)

    def _on_cancel(self, cancel: Cancel) -> None:
        with self._lock:
            _remember(self._cancelled, cancel.rid, self.wall())
            run = self._runs.get(cancel.rid)
            if run is not None:
                run.cancel.set()  # a queued copy never starts; a running one is stopped
        log.info("job %s cancelled by %s (%s)%s", cancel.rid, cancel.origin, cancel.reason or "no reason",
                 "; stopping it" if run is not None else "")

    def _admit(self, run: JobRun) -> str | None:
        """Claim what the bid promised, or say why not (called under the lock)."""
        job = run.job
        if self._offers.get(job.rid) != job.claim:
            return "stale_claim"
        if job.mode == "npu":
            if self.npu_exec is None:
                return "no_npu"
            claim = self.npu_lock.try_claim(owner=job.rid)
            if claim is None:
                return "npu_busy"
            run.claim = claim
            self._npu_busy_here = True
            return None
        if self.cpu_exec is None:
            return "no_cpu"
        if self._cpu_queue.qsize() + self._cpu_busy >= self.cfg.cpu.slots + self.cfg.cpu.max_queue:
            return "queue_full"
        return None

    def _cpu_worker(self) -> None:
        while True:
            run = self._cpu_queue.get()
            if run is None:
                return
            with self._lock:
                self._cpu_busy += 1
            try:
                self._execute(run)
            finally:
                with self._lock:
                    self._cpu_busy -= 1

    def _execute(self, run: JobRun) -> None:
        job = run.job
        executor = self.npu_exec if job.mode == "npu" else self.cpu_exec
        assert executor is not None
        seq = itertools.count()
        started = time.monotonic()
        queue_ms = (started - run.received) * 1000
        try:
            remaining = job.deadline - self.wall()
            if remaining <= 0 or run.cancel.is_set():
                with self._lock:
                    run.fsm.fire("expire")
                if run.cancel.is_set():
                    raise ExecutorError(executor.name, "cancelled before it started")
                raise ExecutionTimeout(executor.name, 0.0)
            with self._lock:
                run.fsm.fire("start")
            params = Params(max_new_tokens=job.max_new_tokens, temperature=job.temperature,
                            timeout_s=remaining, rid=job.rid,
                            hold_fds=(run.claim.fd,) if run.claim is not None else ())
            result = executor.run(job.prompt, params,
                                  lambda text: self._send(Token(job.rid, self.me, next(seq), text)),
                                  run.cancel)
            final = self._done(run, result, queue_ms)
        except ExecutorError as exc:
            final = self._failed(run, exc)
        except Exception as exc:  # an executor bug: report it, keep the node alive
            log.exception("job %s: executor crashed", job.rid)
            final = self._failed(run, ExecutorError(executor.name, f"internal error: {exc}"))
        finally:
            if run.claim is not None:
                run.claim.release()
                self._npu_busy_here = False
        with self._lock:
            self._runs.pop(job.rid, None)
        self.journal.record(job.rid, final)
        self._metrics_due.set()

    def _done(self, run: JobRun, result: Result, queue_ms: float) -> bytes:
        job = run.job
        with self._lock:
            run.fsm.fire("finish")
        t = result.timings
        timings = type(t)(queue_ms=queue_ms, init_ms=t.init_ms, prefill_ms=t.prefill_ms,
                          decode_ms=t.decode_ms, total_ms=t.total_ms + queue_ms)
        self.latency.add(job.mode, timings.total_ms, result.generated_tokens)
        log.info("job %s done in %.0f ms (%d tokens)", job.rid, timings.total_ms, result.generated_tokens)
        return self._send(Done(job.rid, self.me, result.text, timings, result.prompt_tokens,
                               result.generated_tokens))

    def _failed(self, run: JobRun, exc: ExecutorError) -> bytes:
        with self._lock:
            if run.fsm.can("fail"):
                run.fsm.fire("fail")
        log.warning("job %s failed: %s", run.job.rid, exc)
        return self._send(Error(run.job.rid, self.me, exc.reason,
                                exit_code=getattr(exc, "returncode", None), partial_text=exc.partial_text))

    # ---------------------------------------------------------------- triggers (HA, mosquitto_pub)
    def _on_trigger(self, msg: Message) -> None:
        try:
            req = TriggerRequest.from_payload(msg.payload, self.cfg.max_payload_bytes)
        except MessageError as exc:
            log.warning("dropped trigger on %s: %s", msg.topic, exc)
            return
        threading.Thread(target=self._orchestrate, args=(req,), name="orchestrate", daemon=True).start()

    def _orchestrate(self, req: TriggerRequest) -> None:
        from agent.linucb import ArmStore
        from agent.orchestrator import Orchestrator

        orch = Orchestrator(self.cfg, connect=lambda: self._fleet,
                            npu_exec=self.npu_exec, cpu_exec=self.cpu_exec,
                            arms=lambda: ArmStore.for_config(self.cfg),
                            local_snapshot=self._local_offer_snapshot)
        try:
            out = orch.run(req.prompt, max_new_tokens=req.max_new_tokens or 256)
        except AgentError as exc:
            log.warning("trigger refused: %s", exc)
            self.bus.publish(self.topics.last_result(self.me), LastResult(
                rid="-", device=self.me, winner=None, path=None, ok=False, text="", error=str(exc),
                total_ms=0.0).to_payload(), retain=True)
            return
        log.info("trigger %s: %s via %s in %.0f ms", out.rid, "answered" if out.ok else "failed",
                 out.path, out.total_ms)
        self.bus.publish(self.topics.last_result(self.me), LastResult(
            rid=out.rid, device=self.me, winner=out.winner, path=out.path, ok=out.ok, text=out.text,
            error=out.error, total_ms=round(out.total_ms, 1)).to_payload(), retain=True)

    def _local_offer_snapshot(self) -> Snapshot:
        snap = self.snapshot()
        from dataclasses import replace
        return replace(snap, npu_free=False)  # the NPU was tried first, before any auction


def _remember(table: OrderedDict[K, V], key: K, value: V, keep: int = DECLINES_KEPT) -> None:
    """Insert into a bounded memory (oldest forgotten first): floods cannot grow it."""
    table[key] = value
    while len(table) > keep:
        table.popitem(last=False)


def _describe(executor: Executor | None, slots: int | None = None) -> str:
    if executor is None:
        return "off"
    return executor.name + (f" x{slots}" if slots else "")
