"""Who runs the job: a pure function over offers and arms (no MQTT, no clock, no files).

A job that names a model is offered only the modes that run it. Pass 1: offers with a
free NPU, lowest recent NPU latency first, then device id, so the choice is
deterministic. Pass 2: every offer that runs CPU jobs (this device included), ranked by
the policy (``auction.policy``):

- ``linucb`` (default): expected completion = the device's own promise — its backlog in
  seconds, the start-up it would pay (a model that is not warm, a long prompt's
  prefill) and its estimate of the job's service time, all from its bid — plus what this
  orchestrator has learnt the device's promises miss (its arm: the residual between the
  latency seen here and the promise; ``agent.linucb``), counted only beyond twice its
  own noise band; a promise from a record of under ``MATURE_JOBS`` jobs teaches
  nothing. With nothing learnt the ranking is the devices' own estimates. A device with
  no record at all (no estimate in its bid) is priced as fast as the fastest estimate, so it
  is tried; while this orchestrator has such a job in flight there, it is priced as the
  slowest estimate instead (the job also shows in its backlog), so it is not flooded.
- ``least_backlog``: the smallest advertised backlog plus start-up, in seconds.
- ``jsq``: join the shortest queue, by jobs per slot (the classic baseline).
- ``round_robin``: the next device in turn (the cursor is kept by the caller).
- ``random``: uniformly at random.

Ties go to the device with more headroom (less backlog, fewer jobs per slot), then to the
one whose own estimate is lower, then to one not tried yet, then at random — never by name, which would send a
cold fleet's first jobs to whichever device sorts first. The result is a full ranking,
not just a winner: the orchestrator walks it when a winner declines or goes silent.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from agent.config import POLICIES
from agent.linucb import Arm, context, noise, solve_arms
from agent.messages import Snapshot, serves

__all__ = ["POLICIES", "Choice", "Decision", "Offer", "select"]
# A learnt residual counts only by what exceeds this many widths of its own noise band:
# at one width, a third of pure noise got through and cost honest fleets 1-2 %.
SHRINK = 2.0
# A promise resting on fewer of the device's own jobs than this teaches the arm nothing:
# what it misses is the record's youth, which the device's next jobs mend by themselves.
MATURE_JOBS = 6.0


@dataclass(frozen=True)
class Offer:
    """One candidate device and what it advertised (its bid, or our own state)."""

    device: str
    snapshot: Snapshot
    is_self: bool = False
    service_s: float | None = None   # the device's own estimate of this job's service time
    service_n: float = 0.0           # the effective number of recent jobs it rests on
    init_s: float = 0.0              # start-up it would pay first: its model is not warm


@dataclass(frozen=True)
class Choice:
    device: str
    mode: str                       # npu | cpu
    is_self: bool
    score: float | None = None      # expected completion (s) under the policy; None on the NPU pass
    mean: float | None = None       # expected start-up + service (s): the device's estimate + learnt residual
    width: float | None = None
    x: tuple[float, ...] | None = None  # context at decision time, for training
    explore: bool = False           # a device with no record: this job is its exploration
    promise: float | None = None    # the device's own start-up + service estimate (s): what the arm corrects


@dataclass(frozen=True)
class Decision:
    ranking: tuple[Choice, ...]
    cursor: int = 0                 # round robin: where the next decision starts

    @property
    def winner(self) -> Choice | None:
        return self.ranking[0] if self.ranking else None


def select(offers: Sequence[Offer], arms: Mapping[str, Arm], *, prompt_tokens: int,
           max_new_tokens: int, alpha: float, lam: float, policy: str = "linucb", floor: float = 0.0,
           exploring: Collection[str] = (), need: str = "any", rng: np.random.Generator | None = None,
           cursor: int = 0, model: str | None = None, tools: bool = False) -> Decision:
    """Rank every way the job could run, best first; with ``model``, only ways that run it;
    with ``tools``, only ways whose executor can call tools."""
    npu = sorted((o for o in offers
                  if o.snapshot.has_npu and o.snapshot.npu_free and serves(o.snapshot, "npu", model, tools)),
                 key=lambda o: (o.snapshot.p50_ms("npu"), o.device))
    ranking = [Choice(o.device, "npu", o.is_self) for o in npu]
    if need == "npu":
        return Decision(tuple(ranking), cursor)

    # Sorted only so that a seeded rng gives the same ranking whatever order the bids came in.
    cpu = sorted((o for o in offers if o.snapshot.cpu_slots > 0 and serves(o.snapshot, "cpu", model, tools)),
                 key=lambda o: o.device)
    if not cpu:
        return Decision(tuple(ranking), cursor)
    rng = rng or np.random.default_rng()
    jitter = rng.random(len(cpu)).tolist()  # the last tie-break: equal devices share the work
    if policy == "linucb":
        scored = _linucb(cpu, arms, prompt_tokens=prompt_tokens, max_new_tokens=max_new_tokens, alpha=alpha,
                         lam=lam, floor=floor, exploring=exploring, jitter=jitter)
    else:
        rows = [context(o.snapshot, prompt_tokens, max_new_tokens, 0.0) for o in cpu]
        scored = _baseline(policy, cpu, rows, jitter, cursor)
        if policy == "round_robin":
            cursor = (cursor + 1) % max(len(cpu), 1)
    ranking.extend(scored)
    return Decision(tuple(ranking), cursor)


def _linucb(cpu: Sequence[Offer], arms: Mapping[str, Arm], *, prompt_tokens: int, max_new_tokens: int,
            alpha: float, lam: float, floor: float, exploring: Collection[str],
            jitter: Sequence[float]) -> list[Choice]:
    estimates = [o.service_s for o in cpu if o.service_s is not None]
    optimistic = min(estimates) if estimates else 0.0   # an unknown device: as fast as the fastest
    cautious = max(estimates) if estimates else 0.0     # ... with a job of ours already exploring it
    n = len(cpu)
    services, work, rows = [0.0] * n, [0.0] * n, []
    for i, o in enumerate(cpu):
        if o.service_s is not None:
            services[i] = o.service_s
        else:
            services[i] = cautious if o.device in exploring else optimistic
        work[i] = o.init_s + services[i]
        rows.append(context(o.snapshot, prompt_tokens, max_new_tokens, work[i]))
    X = np.array(rows)
    # The residual each arm has learnt, with its width; an arm with no data predicts 0 with
    # the prior width sqrt(xᵀx/λ). Each arm is solved once (linucb.solve_arms).
    means = np.zeros(n)
    widths = np.sqrt(np.einsum("kd,kd->k", X, X) / lam)
    sse, w = np.zeros(n), np.zeros(n)
    learnt = [i for i, o in enumerate(cpu) if (a := arms.get(o.device)) is not None and a.n > 0]
    if learnt:
        own = [arms[cpu[i].device] for i in learnt]
        theta, inv = solve_arms(own, lam)
        Xl = X[learnt]
        means[learnt] = np.einsum("kd,kd->k", Xl, theta)
        widths[learnt] = np.sqrt(np.maximum(np.einsum("kd,kde,ke->k", Xl, inv, Xl), 0.0))
        sse[learnt] = [a.sse for a in own]
        w[learnt] = [a.w for a in own]
    # The arm's noise is shrunk towards a share of the job's own time (start-up and work).
    # A learnt residual counts only by what exceeds twice its own band (soft
    # thresholding): with honest estimates the correction stays at zero and the ranking is the devices' own;
    # a bias larger than the noise shows within tens of jobs.
    band = noise(sse, w, np.array(work)) * widths
    corrected = np.sign(means) * np.maximum(np.abs(means) - SHRINK * band, 0.0)
    backlog = np.array([o.snapshot.backlog_s for o in cpu])
    scores = (backlog + np.maximum(np.array(work) + corrected - alpha * band, floor)).tolist()
    corr, wd = corrected.tolist(), widths.tolist()
    keyed = []
    for i, o in enumerate(cpu):
        score = scores[i]
        unknown = o.service_s is None
        choice = Choice(o.device, "cpu", o.is_self, score=score, mean=work[i] + corr[i],
                        width=wd[i], x=tuple(rows[i]), explore=unknown,
                        promise=None if unknown or o.service_n < MATURE_JOBS else work[i])
        keyed.append(((score, *_headroom(o), services[i], not unknown, jitter[i]), choice))
    keyed.sort(key=lambda kv: kv[0])
    return [c for _, c in keyed]


def _baseline(policy: str, cpu: Sequence[Offer], rows: Sequence[list[float]], jitter: Sequence[float],
              cursor: int) -> list[Choice]:
    n = len(cpu)
    if policy == "least_backlog":
        keys = [(o.snapshot.backlog_s + o.init_s, jitter[i]) for i, o in enumerate(cpu)]
    elif policy == "jsq":
        keys = [(_per_slot(o.snapshot), jitter[i]) for i, o in enumerate(cpu)]
    elif policy == "round_robin":
        keys = [((i - cursor) % n, 0.0) for i in range(n)]
    elif policy == "random":
        keys = [(jitter[i], 0.0) for i in range(n)]
    else:
        raise ValueError(f"unknown policy {policy!r} (one of {', '.join(POLICIES)})")
    order = sorted(range(n), key=lambda i: keys[i])
    return [Choice(cpu[i].device, "cpu", cpu[i].is_self, score=float(keys[i][0]), x=tuple(rows[i]))
            for i in order]


def _headroom(o: Offer) -> tuple[float, float]:
    return o.snapshot.backlog_s, _per_slot(o.snapshot)


def _per_slot(s: Snapshot) -> float:
    return s.queue_depth / max(s.cpu_slots, 1)
