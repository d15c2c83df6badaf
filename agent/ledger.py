"""What a node does with each job it is sent: the exactly-once rules, without any I/O.

Theory of operation. Delivery is at-least-once (QoS 1, persistent sessions), so the same
job can arrive several times, before, during or after its run, and after a restart.
``JobLedger.receive(job, now)`` answers each arrival with one verdict:

- ``Replay``: it already finished (in memory or the on-disk journal), or was declined
  before in the same mode: send the recorded final event again;
- ``Attach``: it is queued or running: send ``accepted`` again, the stream continues;
- ``Decline``: its orchestrator cancelled it before it arrived, or its claim is not one
  this process issued for that rid (a restarted node declines stale work);
- ``Ignore``: too late to start (past ``accept_by`` or its deadline);
- ``Admit``: run it, if the node can claim what its bid promised (``accept``/``decline``).

A ``cancel`` marks a queued run so it never starts and a running one so it is stopped;
a copy arriving after its cancel is declined. Every memory is bounded, oldest first, so
a flood of ids cannot grow it. The ledger is thread-safe; it never blocks.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from agent.fsm import JOB, Machine
from agent.messages import Accepted, Cancel, Declined, Job

K = TypeVar("K")
V = TypeVar("V")

KEPT = 4096  # claims, declines and cancels remembered


@dataclass
class Run:
    """A job this node accepted. ``resource`` is what it claimed for it (the NPU lock)."""

    job: Job
    fsm: Machine
    received: float
    accepted: Accepted
    resource: Any = None
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class Admit:
    pass


@dataclass(frozen=True)
class Attach:
    accepted: Accepted


@dataclass(frozen=True)
class Replay:
    payload: bytes            # the recorded final event, as it was sent


@dataclass(frozen=True)
class Decline:
    event: Declined


@dataclass(frozen=True)
class Ignore:
    reason: str


Verdict = Admit | Attach | Replay | Decline | Ignore


class JobLedger:
    """Offers, runs, declines and cancels of one node process."""

    def __init__(self, me: str, epoch: str, *, recorded: Callable[[str], bytes | None],
                 encode: Callable[[Declined], bytes], keep: int = KEPT):
        self.me = me
        self._epoch = epoch              # claims are unique to this process
        self._recorded = recorded        # the journal: rid -> final event payload
        self._encode = encode
        self._keep = keep
        self._lock = threading.Lock()
        self._claim_seq = itertools.count(1)
        self._offers: OrderedDict[str, str] = OrderedDict()
        self._declines: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._cancelled: OrderedDict[str, float] = OrderedDict()
        self._runs: dict[str, Run] = {}

    # ------------------------------------------------------------------ bids
    def offer(self, rid: str) -> str:
        """The claim to put in a bid for ``rid`` (the same one if asked again)."""
        with self._lock:
            claim = self._offers.get(rid)
            if claim is None:
                claim = f"{self._epoch}.{next(self._claim_seq)}"
                _remember(self._offers, rid, claim, self._keep)
            return claim

    # ------------------------------------------------------------------ jobs
    def receive(self, job: Job, now: float) -> Verdict:
        """What to do with an arriving copy of ``job`` (``now``: this device's wall clock)."""
        with self._lock:
            recorded = self._recorded(job.rid)
            if recorded is not None:
                return Replay(recorded)
            run = self._runs.get(job.rid)
            if run is not None:
                return Attach(run.accepted)
            declined = self._declines.get((job.rid, job.mode))
            if declined is not None:
                return Replay(declined)
            if job.rid in self._cancelled:
                return self._decline(job, "cancelled")
            if job.deadline < now or job.accept_by < now:
                return Ignore("too late to start (accept_by passed)")
            if self._offers.get(job.rid) != job.claim:
                return self._decline(job, "stale_claim")
            return Admit()

    def decline(self, job: Job, reason: str) -> Declined:
        """An admitted job cannot get what its bid promised (npu_busy, queue_full, …)."""
        with self._lock:
            return self._decline(job, reason).event

    def accept(self, job: Job, now: float, *, queue_position: int, resource: Any = None) -> Run:
        """Record an admitted job as queued; its claim is spent."""
        run = Run(job, Machine(f"job {job.rid}", JOB, "new"), now,
                          Accepted(job.rid, self.me, job.mode, queue_position=queue_position), resource)
        run.fsm.fire("accept")
        with self._lock:
            self._offers.pop(job.rid, None)  # a claim is honoured once
            self._runs[job.rid] = run
        return run

    def _decline(self, job: Job, reason: str) -> Decline:
        """Called under the lock. Keyed by mode too: a device that declined the NPU may
        still be asked to run the same job on its CPU."""
        event = Declined(job.rid, self.me, reason)
        _remember(self._declines, (job.rid, job.mode), self._encode(event), self._keep)
        return Decline(event)

    # ------------------------------------------------------------------ cancels
    def cancel(self, cancel: Cancel, now: float) -> Run | None:
        """Remember the cancel; the run it stops, if one is queued or running."""
        with self._lock:
            _remember(self._cancelled, cancel.rid, now, self._keep)
            run = self._runs.get(cancel.rid)
        if run is not None:
            run.cancel.set()
        return run

    # ------------------------------------------------------------------ lifecycle
    def start(self, run: Run) -> bool:
        """A worker is about to run it: False if it was cancelled while it waited."""
        with self._lock:
            if run.cancel.is_set():
                run.fsm.fire("expire")
                return False
            run.fsm.fire("start")
            return True

    def expire(self, run: Run) -> None:
        """It waited past its deadline."""
        with self._lock:
            run.fsm.fire("expire")

    def finish(self, run: Run, ok: bool) -> None:
        """It ran; the journal now answers for it."""
        with self._lock:
            if run.fsm.can("finish" if ok else "fail"):
                run.fsm.fire("finish" if ok else "fail")
            self._runs.pop(run.job.rid, None)

    def running(self) -> list[Run]:
        with self._lock:
            return list(self._runs.values())


def _remember(table: OrderedDict[K, V], key: K, value: V, keep: int) -> None:
    """Insert into a bounded memory (oldest forgotten first): floods cannot grow it."""
    table[key] = value
    table.move_to_end(key)
    while len(table) > keep:
        table.popitem(last=False)
