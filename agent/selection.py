"""Who runs the job: a pure function over bids and arms (no MQTT, no clock, no files).

Pass 1: offers with a free NPU, lowest recent NPU latency first, then device id, so the
choice is deterministic. Pass 2: every offer that runs CPU jobs (this device included),
ranked by LinUCB score, lowest first. The result is a full ranking, not just a winner:
the orchestrator walks it when a winner declines or goes silent.

An arm with no observations is not a blind guess: its mean is the device's advertised
recent CPU latency if it has one, else the mean the trained arms predict for the same
context, else zero (explore it). Only one exploratory job per untrained arm may be in
flight; while one is, that arm goes to the back of the ranking instead of being flooded.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from agent.linucb import Arm, features
from agent.messages import Snapshot


@dataclass(frozen=True)
class Offer:
    """One candidate device and what it advertised (its bid, or our own metrics)."""

    device: str
    snapshot: Snapshot
    is_self: bool = False


@dataclass(frozen=True)
class Choice:
    device: str
    mode: str                       # npu | cpu
    is_self: bool
    score: float | None = None      # LinUCB score (s); None on the NPU pass
    mean: float | None = None
    width: float | None = None
    x: tuple[float, ...] | None = None  # context at decision time, for training
    explore: bool = False           # untrained arm: this job is its exploration


@dataclass(frozen=True)
class Decision:
    ranking: tuple[Choice, ...]

    @property
    def winner(self) -> Choice | None:
        return self.ranking[0] if self.ranking else None


def select(offers: Sequence[Offer], arms: Mapping[str, Arm], *, prompt_tokens: int,
           max_new_tokens: int, alpha: float, lam: float, floor: float = 0.0,
           exploring: Collection[str] = (), need: str = "any") -> Decision:
    """Rank every way the job could run, best first."""
    npu = sorted((o for o in offers if o.snapshot.has_npu and o.snapshot.npu_free),
                 key=lambda o: (_npu_latency(o.snapshot), o.device))
    ranking = [Choice(o.device, "npu", o.is_self) for o in npu]
    if need == "npu":
        return Decision(tuple(ranking))

    cpu_offers = [o for o in offers if o.snapshot.cpu_slots > 0]
    contexts = {o.device: features(o.snapshot, prompt_tokens, max_new_tokens) for o in cpu_offers}
    trained_means = [arms[o.device].predict(contexts[o.device])[0]
                     for o in cpu_offers if o.device in arms and arms[o.device].n > 0]
    fallback_mean = float(np.mean(trained_means)) if trained_means else 0.0

    scored = []
    for o in cpu_offers:
        x = contexts[o.device]
        arm = arms.get(o.device)
        if arm is not None and arm.n > 0:
            mean, width = arm.predict(x)
            untrained = False
        else:
            mean = _advertised_s(o.snapshot, fallback_mean)
            width = float(np.sqrt(x @ x / lam))
            untrained = True
        bound = mean - alpha * width
        score = max(bound, floor)
        held_back = untrained and o.device in exploring
        scored.append((held_back, score, bound, o.device, Choice(
            o.device, "cpu", o.is_self, score=score, mean=mean, width=width,
            x=tuple(float(v) for v in x), explore=untrained)))
    # Scores tied at the floor are told apart by the raw lower bound: the more uncertain
    # arm goes first, so an untrained device is not starved by an alphabetical accident.
    scored.sort(key=lambda t: (t[0], t[1], t[2], t[3]))
    ranking.extend(c for *_, c in scored)
    return Decision(tuple(ranking))


def _npu_latency(s: Snapshot) -> float:
    summary = s.recent.get("npu")
    return summary.p50_ms if summary and summary.n else float("inf")


def _advertised_s(s: Snapshot, fallback: float) -> float:
    summary = s.recent.get("cpu")
    return summary.p50_ms / 1000.0 if summary and summary.n else fallback
