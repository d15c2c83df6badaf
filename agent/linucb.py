"""Disjoint LinUCB (Li et al. 2010) on what a device cannot see about itself, with
forgetting.

Theory of operation. Every bid carries the device's own promise for the job: its backlog
in seconds, the start-up it would pay, and its estimate of the job's service time, all
from its record of every job it ran for anyone (``agent.servicemodel``). One arm per
device (CPU mode), per orchestrator, learns the *residual*: the latency this orchestrator
observes (from dispatch to the answer in hand) minus that promise, as a linear function of
the context ``x`` (the promise itself, job size and the device's state, every entry
bounded). The residual is what the device cannot see: its link to this orchestrator and
the result streaming over it, and the bias of its own estimates (a phone that throttles
when hot, a laptop whose other programs take the CPU, start-up that includes prefill).
With honest estimates it stays near zero, and the ranking is the devices' own; a biased
device is corrected within tens of jobs. A device with no record yet has no promise to
correct: its job explores, and teaches the device's own record.

Per arm: ``G = Σ γ^k x xᵀ`` and ``b = Σ γ^k y x`` over its observations (newest k = 0),
so an old observation weighs half after ``half_life_jobs`` newer ones; the ridge ``λI``
is added at solve time and never decays, so the solve stays well-posed when an arm has
not been used for a while. ``θ = (λI + G)⁻¹ b``; mean ``xᵀθ``; width
``sqrt(xᵀ (λI + G)⁻¹ x)``. The exploration bonus is ``α · σ · width`` where ``σ`` is the
arm's own residual noise in seconds (discounted, shrunk towards a prior), so ``α`` is in
units of noise whatever the device's speed. Solves go through ``numpy.linalg.solve`` on
the stored sums in float64, for all arms of a decision in one batched call; no inverse is
stored, so nothing drifts.

Pure: no file, lock or clock here. ``Arms.to_obj`` / ``Arms.from_obj`` are the store's
format; ``agent.armstore`` keeps it in a file shared by the device's processes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.messages import Snapshot
from agent.servicemodel import SURPRISE_KEEP, surprised

STORE_VERSION = 3           # 3: arms learn the residual over the device's promise (2: service time)
# Context: [1, w, w·cpu/100, w·temperature, prompt_tokens/T, max_new_tokens/T], w = promise/P.
D = 6
TOKEN_SCALE = 1024          # T: prompts and answers are measured in units of 1k tokens
PROMISE_SCALE = 10.0        # P: a promise is measured in units of 10 s (capped at 4, i.e. 40 s)
TEMP_COOL_C, TEMP_HOT_C = 40.0, 90.0
TRAINED_RIDS_KEPT = 256     # train-once memory: a rid is trained by the run that made it, at its end
NOISE_PRIOR_WEIGHT = 2.0    # pseudo-observations of the prior noise in an arm's σ
NOISE_PRIOR_SHARE = 0.3     # prior σ as a share of the promise


def features(snapshot: Snapshot, prompt_tokens: int, max_new_tokens: int, promise_s: float = 0.0) -> np.ndarray:
    """The bounded, normalised context vector for one device, one prompt and its promise."""
    return np.array(context(snapshot, prompt_tokens, max_new_tokens, promise_s), dtype=np.float64)


def context(snapshot: Snapshot, prompt_tokens: int, max_new_tokens: int, promise_s: float) -> list[float]:
    """The context as a plain list (a decision builds one per offer)."""
    temp = snapshot.temperature_c
    temp_f = 0.0 if temp is None else (temp - TEMP_COOL_C) / (TEMP_HOT_C - TEMP_COOL_C)
    # The device's state scales the work it promised: a CPU shared with other programs, a
    # hot device that throttles, make the same job proportionally slower.
    work = min(max(promise_s, 0.0) / PROMISE_SCALE, 4.0)
    return [1.0, work, work * min(snapshot.cpu_percent / 100.0, 1.0), work * min(max(temp_f, 0.0), 1.0),
            min(prompt_tokens / TOKEN_SCALE, 4.0), min(max_new_tokens / TOKEN_SCALE, 4.0)]


def training_target(ok: bool, seconds: float, cap: float) -> float:
    """The latency one job counts as: what was seen, capped; a failure counts as the cap
    (a device that fails must look slow, never fast)."""
    return min(seconds, cap) if ok else cap


def residual_target(ok: bool, seconds: float, cap: float, promise: float) -> float:
    """What one job teaches its arm: the latency seen (``training_target``) minus what the
    device promised for it when it bid."""
    return training_target(ok, seconds, cap) - promise


@dataclass(frozen=True)
class Arm:
    """Discounted ridge regression of one device's residual (seen − promised) on the context."""

    G: np.ndarray           # Σ γ^k x xᵀ (the data; λI is added at solve time)
    b: np.ndarray           # Σ γ^k y x
    n: int = 0              # observations ever
    w: float = 0.0          # Σ γ^k: the effective number of observations
    sse: float = 0.0        # Σ γ^k (y − prediction made before seeing y)²
    # (λ, θ, (λI + G)⁻¹): solved from G and b on first use at a λ. An arm never changes
    # (training makes a new one), so this is the solve of its own sums, not a stored
    # inverse updated in place that could drift.
    _solved: tuple[float, np.ndarray, np.ndarray] | None = field(default=None, init=False, repr=False,
                                                                 compare=False)

    @classmethod
    def fresh(cls) -> Arm:
        return cls(G=np.zeros((D, D)), b=np.zeros(D))

    def solved(self, lam: float) -> tuple[np.ndarray, np.ndarray]:
        """(θ, (λI + G)⁻¹) of this arm, computed once per λ."""
        if self._solved is None or self._solved[0] != lam:
            A = self.G + lam * np.eye(D)
            inv = np.linalg.solve(A, np.eye(D))
            object.__setattr__(self, "_solved", (lam, inv @ self.b, inv))
        assert self._solved is not None
        return self._solved[1], self._solved[2]

    def predict(self, x: np.ndarray, lam: float) -> tuple[float, float]:
        """(mean, width) of the residual estimate at context x."""
        mean, width = predict_many([self], x[None, :], lam)
        return float(mean[0]), float(width[0])

    def noise(self, scale: float) -> float:
        """The arm's noise in seconds, shrunk towards a share of ``scale`` (the promise)."""
        return float(noise(np.array([self.sse]), np.array([self.w]), np.array([scale]))[0])

    def updated(self, x: np.ndarray, y: float, *, lam: float, gamma: float, base: float = 0.0) -> Arm:
        """With observation y at x; ``base`` (the promise) judges whether it is a surprise."""
        before = self.predict(x, lam)[0] if self.n else y
        if self.w >= 3 and surprised(base + before, base + y):
            gamma *= SURPRISE_KEEP  # the device changed: let the new observations lead
        return Arm(G=gamma * self.G + np.outer(x, x), b=gamma * self.b + y * x, n=self.n + 1,
                   w=gamma * self.w + 1.0, sse=gamma * self.sse + (y - before) ** 2)


def solve_arms(arms: Sequence[Arm], lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Stacked (θ, (λI + G)⁻¹) of these arms; those not yet solved at λ in one batched call."""
    todo = [a for a in arms if a._solved is None or a._solved[0] != lam]
    if todo:
        inv = np.linalg.inv(np.stack([a.G for a in todo]) + lam * np.eye(D))
        theta = np.einsum("kde,ke->kd", inv, np.stack([a.b for a in todo]))
        for a, t, v in zip(todo, theta, inv, strict=True):
            object.__setattr__(a, "_solved", (lam, t, v))
    return (np.stack([a._solved[1] for a in arms]),  # type: ignore[index]
            np.stack([a._solved[2] for a in arms]))  # type: ignore[index]


def noise(sse: np.ndarray, w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Noise (s) of arms with these sums, shrunk towards a share of ``scale`` (each
    device's promise): an arm with few observations is assumed as noisy as a typical device."""
    prior = NOISE_PRIOR_SHARE * np.maximum(scale, 0.0)
    result: np.ndarray = np.sqrt((sse + NOISE_PRIOR_WEIGHT * prior * prior) / (w + NOISE_PRIOR_WEIGHT))
    return result


def predict_many(arms: Sequence[Arm], X: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Means and widths for arm i at context X[i], with one batched solve."""
    if not arms:
        return np.zeros(0), np.zeros(0)
    return solve_many(np.stack([a.G for a in arms]), np.stack([a.b for a in arms]), X, lam)


def solve_many(G: np.ndarray, b: np.ndarray, X: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """For k arms given as stacked sums G (k×D×D) and b (k×D): the mean and width at X[i]."""
    A = G + lam * np.eye(D)
    sol = np.linalg.solve(A, np.stack([b, X], axis=2))
    means = np.einsum("kd,kd->k", X, sol[:, :, 0])
    widths = np.sqrt(np.maximum(np.einsum("kd,kd->k", X, sol[:, :, 1]), 0.0))
    return means, widths


@dataclass
class Arms:
    """What one device's orchestrations have learnt: the arms, the rids already trained
    (train once per rid), the untrained arms with an exploratory job in flight, and the
    round-robin cursor. Pure: ``agent.armstore.ArmStore`` persists it."""

    arms: dict[str, Arm] = field(default_factory=dict)
    trained: dict[str, float] = field(default_factory=dict)             # rid -> when
    exploring: dict[str, tuple[str, float]] = field(default_factory=dict)  # device -> (rid, until)
    cursor: int = 0

    def train(self, device: str, x: np.ndarray, y: float | None, rid: str, now: float, *, lam: float,
              gamma: float, base: float = 0.0) -> bool:
        """Add one observation (``y`` None: the job ended, with nothing to learn — it
        explored a device with no promise); False (and no change) if this rid was already
        trained."""
        if rid in self.trained:
            return False
        if y is not None:
            arm = self.arms.get(device) or Arm.fresh()
            self.arms[device] = arm.updated(np.asarray(x, dtype=np.float64), float(y), lam=lam, gamma=gamma,
                                            base=base)
        self.trained[rid] = now
        while len(self.trained) > TRAINED_RIDS_KEPT:  # the oldest first: kept in the order trained
            del self.trained[next(iter(self.trained))]
        if self.exploring.get(device, ("", 0.0))[0] == rid:
            del self.exploring[device]
        return True

    def exploring_now(self, now: float) -> set[str]:
        return {d for d, (_, until) in self.exploring.items() if until > now}

    def to_obj(self) -> dict[str, Any]:
        return {"v": STORE_VERSION, "d": D,
                "arms": {dev: {"G": a.G.tolist(), "b": a.b.tolist(), "n": a.n, "w": a.w, "sse": a.sse}
                         for dev, a in sorted(self.arms.items())},
                "trained": self.trained, "exploring": {d: list(v) for d, v in self.exploring.items()},
                "cursor": self.cursor}

    @classmethod
    def from_obj(cls, obj: Any) -> Arms:
        """Decode, validating shape and values; ValueError says what is wrong."""
        if not isinstance(obj, dict) or obj.get("v") != STORE_VERSION or obj.get("d") != D:
            raise ValueError(f"version/dimension mismatch (want v={STORE_VERSION}, d={D})")
        arms_obj, trained_obj, exploring_obj = obj.get("arms"), obj.get("trained", {}), obj.get("exploring", {})
        if not (isinstance(arms_obj, dict) and isinstance(trained_obj, dict) and isinstance(exploring_obj, dict)):
            raise ValueError("arms, trained and exploring must be objects")
        arms = {}
        for device, a in arms_obj.items():
            if not isinstance(a, dict):
                raise ValueError(f"arm {device!r} is not an object")
            G = np.array(a.get("G"), dtype=np.float64)
            b = np.array(a.get("b"), dtype=np.float64)
            n, w, sse = a.get("n"), a.get("w"), a.get("sse")
            if G.shape != (D, D) or b.shape != (D,) or not (np.isfinite(G).all() and np.isfinite(b).all()):
                raise ValueError(f"arm {device!r} has a bad shape or non-finite values")
            if type(n) is not int or n < 0 or not _finite_nonneg(w) or not _finite_nonneg(sse):
                raise ValueError(f"arm {device!r} has bad counts")
            np.linalg.cholesky(G + np.eye(D))  # symmetric positive semi-definite data
            arms[str(device)] = Arm(G=G, b=b, n=n, w=float(w or 0.0), sse=float(sse or 0.0))
        trained = {str(r): float(t) for r, t in trained_obj.items()}
        exploring = {str(d): (str(v[0]), float(v[1])) for d, v in exploring_obj.items()}
        cursor = obj.get("cursor", 0)
        if type(cursor) is not int:
            raise ValueError("cursor must be an integer")
        return cls(arms, trained, exploring, cursor)


def _finite_nonneg(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
