"""Who runs the job: a pure function over offers and arms (no MQTT, no clock, no files).

A job that names a model is offered only the modes that run it. Pass 1: offers with a
free NPU, lowest recent NPU latency first, then device id, so the choice is
deterministic. Pass 2: every offer that runs CPU jobs (this device included), ranked by
the policy (``auction.policy``):

- ``linucb`` (default): expected completion = the device's own backlog in seconds (from
  its bid) + the start-up it would pay (a model that is not warm, from its bid) + a lower
  confidence bound on its service time for this job (its arm, which learns the work). An arm
  with no observations is priced optimistically — at the device's advertised estimate
  for this job, or the best prediction any trained arm makes — and only one exploratory
  job per untrained arm is in flight at a time; while one is, that arm goes to the back.
- ``least_backlog``: the smallest advertised backlog in seconds.
- ``jsq``: join the shortest queue, by jobs per slot (the classic baseline).
- ``round_robin``: the next device in turn (the cursor is kept by the caller).
- ``random``: uniformly at random.

Ties go to the device with more headroom (less backlog, fewer jobs per slot), then to
the device id. The result is a full ranking, not just a winner: the orchestrator walks it
when a winner declines or goes silent.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from agent.config import POLICIES
from agent.linucb import Arm, D, features_matrix, noise, solve_many
from agent.messages import Snapshot, serves

__all__ = ["POLICIES", "Choice", "Decision", "Offer", "select"]
# How many of its own observations one of the device's recent jobs is worth to an arm,
# and how many jobs a device's record needs before it is trusted at all (its fit has
# three coefficients: from fewer jobs it extrapolates blindly to other job sizes).
NODE_TRUST = 1.0
NODE_MIN_JOBS = 2.0


_ZERO_G = np.zeros((D, D))
_ZERO_B = np.zeros(D)


def node_weight(service_n: float) -> float:
    """Pseudo-observations for a device estimate resting on ``service_n`` recent jobs."""
    return NODE_TRUST * max(service_n - NODE_MIN_JOBS, 0.0)


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
    mean: float | None = None       # service-time estimate (s)
    width: float | None = None
    x: tuple[float, ...] | None = None  # context at decision time, for training
    explore: bool = False           # untrained arm: this job is its exploration


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
                 key=lambda o: (_npu_latency(o.snapshot), o.device))
    ranking = [Choice(o.device, "npu", o.is_self) for o in npu]
    if need == "npu":
        return Decision(tuple(ranking), cursor)

    cpu = sorted((o for o in offers if o.snapshot.cpu_slots > 0 and serves(o.snapshot, "cpu", model, tools)),
                 key=lambda o: o.device)
    if not cpu:
        return Decision(tuple(ranking), cursor)
    X = features_matrix([o.snapshot for o in cpu], prompt_tokens, max_new_tokens)
    rng = rng or np.random.default_rng()
    if policy == "linucb":
        scored = _linucb(cpu, X, arms, alpha=alpha, lam=lam, floor=floor, exploring=exploring)
    else:
        scored = _baseline(policy, cpu, X, rng, cursor)
        if policy == "round_robin":
            cursor = (cursor + 1) % max(len(cpu), 1)
    ranking.extend(scored)
    return Decision(tuple(ranking), cursor)


def _linucb(cpu: Sequence[Offer], X: np.ndarray, arms: Mapping[str, Arm], *, alpha: float, lam: float,
            floor: float, exploring: Collection[str]) -> list[Choice]:
    own = [arms.get(o.device) for o in cpu]
    trained = np.array([a is not None and a.n > 0 for a in own])
    G = np.stack([a.G if a is not None else _ZERO_G for a in own])
    b = np.stack([a.b if a is not None else _ZERO_B for a in own])
    # The device's own estimate for this job enters its arm as pseudo-observations at this
    # context, as many as the recent jobs it rests on: a device re-learns its speed from
    # every job it runs, for every orchestrator, so a slowdown shows at once everywhere.
    advertised = np.array([o.service_s if o.service_s is not None else 0.0 for o in cpu])
    weight = np.array([node_weight(o.service_n) if o.service_s is not None else 0.0 for o in cpu])
    G += weight[:, None, None] * (X[:, :, None] * X[:, None, :])
    b += (weight * advertised)[:, None] * X
    means, widths = solve_many(G, b, X, lam)  # every arm's prediction, once, in one batched solve
    informed = trained | (weight > 0)
    # Nothing known about a device: price it as fast as the best known one, so it is tried.
    means[~informed] = means[informed].min() if informed.any() else 0.0
    sse = np.array([a.sse if a is not None else 0.0 for a in own])
    w = np.array([a.w if a is not None else 0.0 for a in own])
    service = np.maximum(means - alpha * noise(sse, w, means) * widths, floor)
    # Expected completion: the wait, the start-up (a model that is not warm), the work.
    scores = np.array([o.snapshot.backlog_s + o.init_s for o in cpu]) + service
    rows = X.tolist()
    keyed = []
    for i, o in enumerate(cpu):
        untrained = not trained[i]
        choice = Choice(o.device, "cpu", o.is_self, score=float(scores[i]), mean=float(means[i]),
                        width=float(widths[i]), x=tuple(rows[i]), explore=untrained)
        keyed.append(((untrained and o.device in exploring, float(scores[i]), *_headroom(o)), choice))
    keyed.sort(key=lambda kv: kv[0])
    return [c for _, c in keyed]


def _baseline(policy: str, cpu: Sequence[Offer], X: np.ndarray, rng: np.random.Generator,
              cursor: int) -> list[Choice]:
    n = len(cpu)
    jitter = rng.random(n)  # random tie-break, so equal devices share the work
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
    rows = X.tolist()
    return [Choice(cpu[i].device, "cpu", cpu[i].is_self, score=float(keys[i][0]), x=tuple(rows[i]))
            for i in order]


def _headroom(o: Offer) -> tuple[float, float, str]:
    return o.snapshot.backlog_s, _per_slot(o.snapshot), o.device


def _per_slot(s: Snapshot) -> float:
    return s.queue_depth / max(s.cpu_slots, 1)


def _npu_latency(s: Snapshot) -> float:
    summary = s.recent.get("npu")
    return summary.p50_ms if summary and summary.n else float("inf")
