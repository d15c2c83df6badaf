"""Running jobs: admission, execution, results, cancels, the journal and the service record.

Theory of operation. ``on_job`` and ``on_cancel`` run inline on paho's network thread
(a job starts one thread hand-off sooner) and never wait there: ``on_job`` decodes the
job, asks ``JobLedger.receive`` (exactly-once under at-least-once delivery) and replays,
attaches, declines, ignores or admits. An admitted job claims what its bid promised —
the NPU ``flock`` (non-blocking; one that meets another process's probe retries for at
most 2 ms) or a place in the CPU gate — and is queued for the threads that run it (the
gate's slots; the NPU's one thread, whose line the ``flock`` keeps to the job that holds
it and, for a moment, the last one's bookkeeping), or is declined with the reason. All
of it on that one thread, so no two copies of a job are admitted side by side. A job's
age comes from the caller's ``age`` (``agent.clock``): no deadline compares two devices'
wall clocks.

``execute`` streams tokens as result events; the final event is written to the journal
before the run is forgotten, so a redelivered copy is answered from it, and the service
record learns how long the work took (what bids and the gate's backlog are based on).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from agent.bus import Message, Publish
from agent.capacity import Capacity
from agent.errors import Cancelled, ExecutionTimeout, ExecutorError, StateError
from agent.executors import Params, Result, estimate_tokens
from agent.gate import Gate
from agent.journal import Journal
from agent.ledger import Admit, Attach, Decline, Ignore, JobLedger, Replay, Run
from agent.messages import (
    Cancel,
    Done,
    Error,
    Job,
    ResultEvent,
    Token,
    decoded,
    encode_result,
)
from agent.metrics import LatencyWindow
from agent.servicemodel import InitCost, ServiceRecord, job_seconds
from agent.topics import Topics

log = logging.getLogger("agent.node")  # the daemon's parts log under its name

Age = Callable[[str, float, Message, float], float]  # (origin, sent_at, msg, lifetime_s) -> s


class Jobs:
    def __init__(self, me: str, state_dir: Path, capacity: Capacity, topics: Topics, *, publish: Publish,
                 age: Age, max_queue: int, job_timeout_s: float, half_life_jobs: float, max_payload_bytes: int,
                 on_change: Callable[[], None] = lambda: None, clock: Callable[[], float] = time.monotonic):
        self.me = me
        self.capacity = capacity
        self.topics = topics
        self._publish = publish
        self._age = age
        self._job_timeout_s = job_timeout_s
        self._max_bytes = max_payload_bytes
        self._on_change = on_change
        self._clock = clock
        self.journal = Journal(state_dir)
        self.latency = LatencyWindow()
        self.record = ServiceRecord(half_life_jobs)
        self.init_cost = InitCost(half_life_jobs)
        self.ledger = JobLedger(me, recorded=self.journal.get, encode=encode_result)
        self.gate: Gate[Run] = Gate(capacity.slots, max_queue, self.execute, expected=self.expected)
        self.npu_gate: Gate[Run] = Gate(1 if capacity.npu is not None else 0, 1, lambda run, _: self.execute(run, None),
                                        expected=self.expected, name="npu")

    def send(self, origin: str, event: ResultEvent, run: Run | None = None) -> bytes:
        """Publish a result event; with ``run``, it is that run's final one, and the ledger
        has it first: a copy of the job that arrives between this publish and the journal's
        record is answered with it."""
        payload = encode_result(event)
        if run is not None:
            self.ledger.answered(run, payload)
        self._publish(self.topics.result(origin, event.rid, self.me), payload)
        return payload

    def expected(self, run: Run) -> float:
        """A queued job's expected time from its start — start-up and service, from this
        device's own records — the basis on which the gate ages a running job."""
        job = run.job
        executor = self.capacity.executor(job.mode)
        return job_seconds(self.record, self.init_cost, job.mode, estimate_tokens(job.text_prompt), job.max_new_tokens,
                           warm=executor.is_warm() if executor is not None else True)

    def start(self) -> None:
        """Start the threads that run jobs: the CPU gate's slots and the NPU's."""
        self.gate.start()
        self.npu_gate.start()

    def stop(self) -> None:
        """Cancel what still runs and stop the threads that run jobs."""
        for run in self.ledger.running():
            run.cancel.set()
        self.gate.stop()
        self.npu_gate.stop()

    # ---------------------------------------------------------------- arrivals
    def on_job(self, msg: Message) -> None:
        job = decoded(msg.topic, msg.payload, lambda p: Job.from_payload(p, self._max_bytes), what="job", logger=log)
        if job is None or retained(msg, "job"):
            return
        verdict = self.ledger.receive(job, self._age(job.origin, job.sent_at, msg, job.timeout_s))
        if isinstance(verdict, Replay):
            log.info("job %s was seen before; sending its recorded answer again", job.rid)
            self._publish(self.topics.result(job.origin, job.rid, self.me), verdict.payload)
        elif isinstance(verdict, Attach):
            log.info("job %s redelivered while it runs; attaching", job.rid)
            self.send(job.origin, verdict.accepted)
        elif isinstance(verdict, Decline):
            self.send(job.origin, verdict.event)
            log.info("declined job %s from %s: %s", job.rid, job.origin, verdict.event.reason)
        elif isinstance(verdict, Ignore):
            log.info("ignored job %s from %s: %s", job.rid, job.origin, verdict.reason)
        else:
            assert isinstance(verdict, Admit)
            self.admit(job, self._age(job.origin, job.sent_at, msg, job.timeout_s))

    def admit(self, job: Job, age_s: float) -> None:
        """Take the resource the bid promised and queue the job, or decline it with the reason."""
        cap = self.capacity
        received = self._clock()
        # Never longer than this node's own job_timeout_s, whatever the job asks for.
        deadline = received + min(job.timeout_s, self._job_timeout_s) - age_s
        if not cap.taking_work:
            self.decline(job, "draining" if cap.draining else "unhealthy")
            return
        executor = cap.executor(job.mode)
        if executor is not None and not executor.serves(job.model):
            self.decline(job, f"model_not_served: {job.model}")
            return
        if executor is not None and executor.down is not None:
            self.decline(job, "model_server_down")
            return
        if executor is not None and job.chat is not None and job.chat.tools and not executor.tools:
            self.decline(job, "no_tools: this device's executor cannot call tools")
            return
        if job.mode == "npu":
            held = cap.npu_lock.try_acquire(owner=job.rid) if cap.npu is not None else None
            if held is None:
                self.decline(job, "no_npu" if cap.npu is None else "npu_busy")
                return
            cap.npu_busy_here = True
            run = self.ledger.accept(job, received, deadline, queue_position=0, resource=held)
            self.send(job.origin, run.accepted)
            self.npu_gate.offer(run)  # room: the lock lets in one job, the last one may still be journalling
        else:
            if cap.cpu is None or not self.gate.has_room():
                self.decline(job, "no_cpu" if cap.cpu is None else "queue_full")
                return
            # Only this thread queues, so the room checked above is still there.
            run = self.ledger.accept(job, received, deadline, queue_position=self.gate.depth)
            self.send(job.origin, run.accepted)  # before a slot can start it and stream
            self.gate.offer(run)
        log.info("accepted %s job %s from %s", job.mode, job.rid, job.origin)
        self._on_change()

    def decline(self, job: Job, reason: str) -> None:
        self.send(job.origin, self.ledger.decline(job, reason))
        log.info("declined job %s from %s: %s", job.rid, job.origin, reason)

    def on_cancel(self, msg: Message) -> None:
        parsed = self.topics.parse(msg.topic)
        cancel = decoded(msg.topic, msg.payload, lambda p: Cancel.from_payload(p, self._max_bytes),
                         what="cancel", logger=log, matches=lambda c: parsed is not None and parsed.origin == c.origin)
        if cancel is None:
            return
        run = self.ledger.cancel(cancel)
        if run is None and not self.ledger.cancelled(cancel):
            log.warning("ignored cancel of %s from %s: its key does not fit a job of theirs", cancel.rid, cancel.origin)
            return
        log.info("job %s cancelled by %s (%s)%s", cancel.rid, cancel.origin, cancel.reason or "no reason",
                 "; stopping it" if run is not None else "")

    # ---------------------------------------------------------------- execution
    def execute(self, run: Run, slot: int | None) -> None:
        """Run a job: on the NPU (``slot`` None, the NPU claimed on admission), or on CPU
        slot ``slot``, whose device-wide lock it holds while the model runs."""
        job = run.job
        executor = self.capacity.executor(job.mode)
        assert executor is not None
        if slot is not None:
            run.resource = self.capacity.cpu_slots.locks[slot].acquire(owner=job.rid)  # a trigger alone may hold it
        seq = itertools.count()
        queue_ms = (self._clock() - run.received) * 1000
        ok = False
        try:
            remaining = run.deadline - self._clock()
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
                self.send(job.origin, Token(job.rid, self.me, next(seq), text, job.digest))

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
                self.capacity.npu_busy_here = False
        try:
            self.journal.record(job.rid, job.digest, final)
        except StateError as exc:
            self.capacity.unhealthy(str(exc))
        self.ledger.finish(run, ok)
        self._on_change()

    def _done(self, run: Run, result: Result, queue_ms: float) -> bytes:
        job = run.job
        t = result.timings
        timings = replace(t, queue_ms=queue_ms, total_ms=t.total_ms + queue_ms)
        done = Done(job.rid, self.me, result.text, timings, result.prompt_tokens, result.generated_tokens,
                    digest=job.digest, finish_reason=result.finish_reason, tool_calls=result.tool_calls)
        payload = self.send(job.origin, done, run)
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
        error = Error(run.job.rid, self.me, exc.reason, kind=exc.kind, exit_code=getattr(exc, "returncode", None),
                      partial_text=exc.partial_text, digest=run.job.digest)
        return self.send(run.job.origin, error, run)


def retained(msg: Message, what: str) -> bool:
    """A retained call for bids or job is never genuine (orchestrators never retain them):
    one a device left on the broker would be acted on by every node that connects later."""
    if msg.retain:
        log.debug("dropped a retained %s on %s", what, msg.topic)
    return msg.retain
