"""What a node does with each job it is sent: the exactly-once rules, without any I/O.

Theory of operation. Delivery is at-least-once (QoS 1, persistent sessions, and jobs
re-sent after a lost session), so the same job can arrive several times, before, during
or after its run, and after a restart. ``JobLedger.receive(job, age_s)`` answers each
arrival with one verdict:

- ``Replay``: it already finished (its final event, from the moment it is sent until the
  run is over, then from the on-disk journal, if that could record it), or was declined
  before in the same mode: send that final event again;
- ``Attach``: it is queued or running: send ``accepted`` again, the stream continues;
- ``Decline``: its orchestrator cancelled it before it arrived; or its claim is not the
  one this process issued for that rid *and origin* (a restarted node declines stale
  work; a job under someone else's rid is refused); or a job with that rid but other
  content already ran or runs (``rid_conflict``: a job cannot be replaced under a
  running rid, and nobody gets someone else's recorded answer). Refusals are not
  remembered, and every decline carries the digest of the job it declines, so a forged
  job neither poisons the genuine one nor reads to its origin as a decline of its own;
- ``Ignore``: too late to start (older than its ``accept_s``);
- ``Admit``: run it, if the node can claim what its bid promised (``accept``/``decline``).

A ``cancel`` must carry the key whose ``cancel_check`` the job carried (only its origin
knows it; ``messages.Cancel``). It marks a queued run so it never starts and a running
one so it stops. One that arrives before its job is kept, if this node offered that rid
to that origin, and declines the job when it comes, if the key fits it; a forged one for
the same rid is kept beside it, never instead of it. Every memory is bounded, oldest first, so
a flood of ids cannot grow it. The ledger is thread-safe and never blocks.
"""

from __future__ import annotations

import itertools
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from agent.fsm import JOB, Machine
from agent.journal import Recorded
from agent.messages import STALE_CLAIM, Accepted, Cancel, Declined, Job, cancel_check

K = TypeVar("K")
V = TypeVar("V")

KEPT = 4096  # declines and cancels remembered
# Each calling device has its own share of claims and of call rate: a flood of calls
# from one device forgets that device's own older claims, never another's auction, and
# costs each node at most CALL_RATE bids a second for it after a burst of CALL_BURST.
# (The call's topic names its caller, which the ACL enforces; on a broker without it a
# device can call in another's name, and use up that share.)
CLAIMS_PER_CALLER = 256
CALL_BURST, CALL_RATE = 1000.0, 500.0  # far above any real asker (a benchmark runs ~300 auctions back to back)
CALLERS = 256  # the callers remembered, least recently heard forgotten first
# Cancels kept per rid before its job arrives (newest first): the origin sends one per
# job, so more than one is a forgery at work (a broker without the ACL); a flood of them
# can push the genuine one out, never grow the memory.
CANCELS_PER_RID = 4


@dataclass
class _Caller:
    """One calling device's share: its outstanding claims and its call-rate bucket."""

    claims: OrderedDict[str, str]   # rid -> claim, oldest first
    tokens: float
    at: float


@dataclass
class Run:
    """A job this node accepted. ``resource`` is what it claimed for it (a lock)."""

    job: Job
    fsm: Machine
    received: float            # monotonic
    deadline: float            # monotonic: when the answer stops being wanted
    accepted: Accepted
    resource: Any = None
    cancel: threading.Event = field(default_factory=threading.Event)
    warm: bool = False       # its model was loaded when it started (how its start-up is learnt)
    answer: bytes | None = None  # its final event, from the moment it is sent until the journal has it


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

    def __init__(self, me: str, *, recorded: Callable[[str], Recorded | None],
                 encode: Callable[[Declined], bytes], keep: int = KEPT, claims_per_caller: int = CLAIMS_PER_CALLER,
                 callers: int = CALLERS, call_burst: float = CALL_BURST, call_rate: float = CALL_RATE):
        self.me = me
        self._recorded = recorded        # the journal: rid -> (digest, final event)
        self._encode = encode
        self._keep = keep
        self._per_caller = claims_per_caller
        self._max_callers = callers
        self._burst, self._rate = call_burst, call_rate
        self._lock = threading.Lock()
        # Claims are unguessable and unique to this process: a restarted node issues new
        # ones, and nobody who did not see the bid can produce one.
        self._secret = secrets.token_hex(8)
        self._claim_seq = itertools.count(1)
        self._callers: OrderedDict[str, _Caller] = OrderedDict()             # origin -> its share
        self._owner: dict[str, str] = {}                                     # rid -> origin (its claim)
        self._declines: OrderedDict[tuple[str, str], bytes] = OrderedDict()  # (rid, mode) -> payload
        self._cancelled: OrderedDict[str, tuple[str, ...]] = OrderedDict()   # rid -> cancel_checks
        self._runs: dict[str, Run] = {}

    # ------------------------------------------------------------------ bids
    def offer(self, rid: str, origin: str, now: float = 0.0) -> str | None:
        """The claim to put in a bid for ``rid`` to ``origin`` (the same one if asked again);
        "" if another origin called that rid first; None if ``origin`` is over its call
        rate (``now``: a monotonic clock). Claims are bounded per caller, oldest first."""
        with self._lock:
            owner = self._owner.get(rid)
            if owner is not None:
                return self._callers[owner].claims[rid] if owner == origin else ""
            caller = self._callers.get(origin)
            if caller is None:
                caller = self._callers[origin] = _Caller(OrderedDict(), self._burst, now)
            self._callers.move_to_end(origin)
            caller.tokens = min(self._burst, caller.tokens + max(now - caller.at, 0.0) * self._rate)
            caller.at = now
            if caller.tokens < 1.0:
                return None
            caller.tokens -= 1.0
            claim = f"{self._secret}{next(self._claim_seq):x}"
            caller.claims[rid] = claim
            self._owner[rid] = origin
            while len(caller.claims) > self._per_caller:
                self._owner.pop(caller.claims.popitem(last=False)[0], None)
            while len(self._callers) > self._max_callers:
                for forgotten in self._callers.popitem(last=False)[1].claims:
                    self._owner.pop(forgotten, None)
            return claim

    def _claim(self, rid: str, origin: str) -> str | None:
        """The claim issued to ``origin`` for ``rid``, if it is still held (under the lock)."""
        caller = self._callers.get(origin) if self._owner.get(rid) == origin else None
        return None if caller is None else caller.claims.get(rid)

    # ------------------------------------------------------------------ jobs
    def receive(self, job: Job, age_s: float) -> Verdict:
        """What to do with an arriving copy of ``job``, sent ``age_s`` seconds ago."""
        with self._lock:
            recorded = self._recorded(job.rid)
            if recorded is not None:
                if recorded.digest != job.digest:
                    return self._refuse(job, "rid_conflict")
                return Replay(recorded.payload)
            run = self._runs.get(job.rid)
            if run is not None:
                if run.job.digest != job.digest:
                    return self._refuse(job, "rid_conflict")
                return Attach(run.accepted) if run.answer is None else Replay(run.answer)
            declined = self._declines.get((job.rid, job.mode))
            if declined is not None:
                return Replay(declined)
            if job.cancel_check and job.cancel_check in self._cancelled.get(job.rid, ()):
                return self._decline(job, "cancelled")
            if age_s > job.accept_s or age_s > job.timeout_s:
                return Ignore(f"too late to start (sent {age_s:.1f} s ago, accept within {job.accept_s:g} s)")
            if not job.claim or self._claim(job.rid, job.origin) != job.claim:
                # Not remembered: a forged job under a rid someone called for must not
                # decline the genuine one that comes after it.
                return self._refuse(job, STALE_CLAIM)
            return Admit()

    def decline(self, job: Job, reason: str) -> Declined:
        """An admitted job cannot get what its bid promised (npu_busy, queue_full, …)."""
        with self._lock:
            return self._decline(job, reason).event

    def accept(self, job: Job, received: float, deadline: float, *, queue_position: int,
               resource: Any = None) -> Run:
        """Record an admitted job as queued; its claim is spent."""
        run = Run(job, Machine(f"job {job.rid}", JOB, "new"), received, deadline,
                  Accepted(job.rid, self.me, job.mode, queue_position=queue_position, digest=job.digest), resource)
        run.fsm.fire("accept")
        with self._lock:
            origin = self._owner.pop(job.rid, None)  # a claim is honoured once
            if origin is not None:
                self._callers[origin].claims.pop(job.rid, None)
            self._runs[job.rid] = run
        return run

    def _decline(self, job: Job, reason: str) -> Decline:
        """Called under the lock. Keyed by mode too: a device that declined the NPU may
        still be asked to run the same job on its CPU."""
        event = Declined(job.rid, self.me, reason, job.digest)
        _remember(self._declines, (job.rid, job.mode), self._encode(event), self._keep)
        return Decline(event)

    def _refuse(self, job: Job, reason: str) -> Decline:
        """A decline that is not remembered: it answers an impostor, not the job's origin."""
        return Decline(Declined(job.rid, self.me, reason, job.digest))

    # ------------------------------------------------------------------ cancels
    def cancel(self, cancel: Cancel) -> Run | None:
        """Apply a cancel; None if there is no run to stop, or the key does not fit (then
        nothing changes)."""
        check = cancel_check(cancel.key)
        with self._lock:
            run = self._runs.get(cancel.rid)
            if run is not None:
                if run.job.origin != cancel.origin or not run.job.cancel_check or run.job.cancel_check != check:
                    return None
            elif self._owner.get(cancel.rid) != cancel.origin:
                return None  # not a bid we made to this origin: nothing of theirs to cancel
            # Before its job, which key fits cannot be told yet: keep every one (a few per
            # rid), so a forged cancel never overwrites the genuine one that came first.
            checks = self._cancelled.get(cancel.rid, ())
            if check not in checks:
                _remember(self._cancelled, cancel.rid, (check, *checks)[:CANCELS_PER_RID], self._keep)
        if run is not None:
            run.cancel.set()
        return run

    def cancelled(self, cancel: Cancel) -> bool:
        """Whether ``cancel`` was taken (for logging)."""
        with self._lock:
            return cancel_check(cancel.key) in self._cancelled.get(cancel.rid, ())

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

    def answered(self, run: Run, payload: bytes) -> None:
        """Its final event is about to be sent: a copy that arrives from now on gets it
        again, not an ``accepted`` for a run that has nothing more to send."""
        with self._lock:
            run.answer = payload

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
