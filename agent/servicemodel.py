"""A device's own record of how long its jobs take, and the backlog that follows from it.

Theory of operation. Service time is execution without queueing. Each node keeps, per
mode, a record of the jobs it ran itself — for every orchestrator — in three parts:

- the shape of its cost: ``seconds ≈ a + b·prompt_tokens + c·generated_tokens``, fitted
  by ridge least squares with exponential forgetting (half-life in jobs);
- its pace: a multiplier on that shape, a quick moving average (in log space) of how each
  job compared with it. A device that throttles, or shares its CPU with something else,
  gets slower by a factor; the pace follows within a few jobs while the shape, fitted on
  pace-corrected times, stays put. A job more than twice as slow (or fast) as expected is
  not noise: the pace jumps most of the way at once;
- how much of ``max_new_tokens`` its answers use (the fill), a forgetting mean.

A job's expected service time is pace × shape at the job's prompt and expected answer
length (fill × max_new_tokens). Fitting on the tokens really generated keeps the record
sharp: a one-word answer to a 512-token budget is not a fast device.

The same record prices the work already accepted: ``backlog_s`` is the expected wait
before a new job would start, from the expected remaining time of the running jobs and
the expected service of the queued ones, over the device's slots in FIFO order. Both go
into every bid, so an orchestrator compares devices in seconds, not in job counts.

Pure Python on purpose (a 3x3 solve): the node daemon does not need numpy for this.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass

TOKEN_SCALE = 1000.0       # features are in thousands of tokens
RIDGE = 1e-3               # keeps the solve defined before the data spans all three features
MIN_SECONDS = 1e-3         # a fit from few jobs can extrapolate below zero: never promise less
FILL_PRIOR = 0.8           # the share of max_new_tokens an answer is assumed to use, at first
UNKNOWN_JOB_S = 10.0       # a job's expected service time before a device has run any
SURPRISE = math.log(2.0)   # |log(seen / predicted)| beyond this is a changed device, not noise
SURPRISE_KEEP = 0.2        # ... and an arm's older record then counts for this much (linucb)
PACE_STEP = 0.2            # how far one job moves the pace (a moving average over ~5 jobs)
PACE_JUMP = 0.8            # ... and one surprising job
MAX_PACE_STEP = math.log(4.0)   # one job moves the pace by 4x at most
MAX_LOG_PACE = math.log(20.0)   # and it stays within 20x of the shape either way
# A running job is expected to need what is left of its expected time, but at least half
# as long again as it has run: a job well past its estimate says the estimate is off
# (the device slowed down), and its remaining time grows with its age.
OVERRUN_SHARE = 0.5


def decay_for(half_life_jobs: float) -> float:
    """The per-observation forgetting factor for a half-life measured in jobs."""
    return float(0.5 ** (1.0 / half_life_jobs))


def surprised(expected: float, seen: float) -> bool:
    """Whether one observation is far enough from its prediction to forget the past."""
    return expected > 0 and seen > 0 and abs(math.log(seen / expected)) > SURPRISE


@dataclass
class _Fit:
    """Discounted sums for one mode: G = Σ γ^k x xᵀ and h = Σ γ^k y x for the speed; w = Σ γ^k,
    the effective number of jobs behind it; fill = Σ γ^k (generated / max_new)."""

    G: list[list[float]]
    h: list[float]
    w: float = 0.0
    fill: float = 0.0
    theta: tuple[float, float, float] | None = None
    log_pace: float = 0.0

    @classmethod
    def empty(cls) -> _Fit:
        return cls([[0.0] * 3 for _ in range(3)], [0.0] * 3)

    def shape(self, prompt_tokens: float, generated_tokens: float) -> float:
        assert self.theta is not None
        a, b, c = self.theta
        return max(a + b * prompt_tokens / TOKEN_SCALE + c * generated_tokens / TOKEN_SCALE, MIN_SECONDS)

    def expected_fill(self) -> float:
        # The prior counts as one job, so one early one-word answer does not rule.
        return (self.fill + FILL_PRIOR) / (self.w + 1.0)


def _fit_nonneg(G: list[list[float]], h: list[float]) -> tuple[float, float, float]:
    """Least squares with every coefficient ≥ 0: minimise θᵀ(G + RIDGE·I)θ − 2hᵀθ.

    More tokens never take less time, and a fit from a few jobs that says otherwise
    predicts zero (or less) for a large prompt. With three coefficients, trying every
    set of free ones and keeping the best that is non-negative is exact and cheap; and the
    objective is strictly convex, so an unconstrained optimum that is non-negative is the
    answer (the common case: one solve, not seven)."""
    ridged = [[G[i][j] + (RIDGE if i == j else 0.0) for j in range(3)] for i in range(3)]
    full = _solve(ridged, h)
    if full is not None and min(full) >= 0:
        return full[0], full[1], full[2]
    best: tuple[float, tuple[float, float, float]] = (math.inf, (0.0, 0.0, 0.0))
    for free in ((0, 1), (0, 2), (1, 2), (0,), (1,), (2,)):
        sub = _solve([[ridged[i][j] for j in free] for i in free], [h[i] for i in free])
        if sub is None or min(sub) < 0:
            continue
        theta = [0.0, 0.0, 0.0]
        for i, v in zip(free, sub, strict=True):
            theta[i] = v
        loss = sum(theta[i] * ridged[i][j] * theta[j] for i in range(3) for j in range(3)) \
            - 2 * sum(h[i] * theta[i] for i in range(3))
        if loss < best[0]:
            best = (loss, (theta[0], theta[1], theta[2]))
    return best[1]


def _solve(m: list[list[float]], v: list[float]) -> list[float] | None:
    """Solve m·x = v (n ≤ 3) by Gaussian elimination with partial pivoting; None if singular."""
    n = len(v)
    a = [row[:] + [v[i]] for i, row in enumerate(m)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < 1e-12:
            return None
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(col + 1, n):
            f = a[r][col] / a[col][col]
            for c in range(col, n + 1):
                a[r][c] -= f * a[col][c]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (a[r][n] - sum(a[r][c] * x[c] for c in range(r + 1, n))) / a[r][r]
    return x


class ServiceRecord:
    """Thread-safe: jobs finish on slot threads while bids are answered on the network thread."""

    def __init__(self, half_life_jobs: float = 20.0):
        self._gamma = decay_for(half_life_jobs)
        self._fits: dict[str, _Fit] = {}
        self._lock = threading.Lock()

    def observe(self, mode: str, prompt_tokens: int, max_new_tokens: int, generated_tokens: int,
                seconds: float) -> None:
        """One finished job: its size, the tokens it produced, and how long it ran (not
        how long it waited)."""
        if not math.isfinite(seconds) or seconds < 0 or max_new_tokens < 1:
            return
        x = (1.0, prompt_tokens / TOKEN_SCALE, generated_tokens / TOKEN_SCALE)
        with self._lock:
            fit = self._fits.setdefault(mode, _Fit.empty())
            if fit.theta is not None and fit.w >= 3 and seconds > 0:
                predicted = math.exp(fit.log_pace) * fit.shape(prompt_tokens, generated_tokens)
                step = PACE_JUMP if surprised(predicted, seconds) else PACE_STEP
                change = max(-MAX_PACE_STEP, min(MAX_PACE_STEP, step * math.log(seconds / predicted)))
                fit.log_pace = max(-MAX_LOG_PACE, min(MAX_LOG_PACE, fit.log_pace + change))
            y = seconds / math.exp(fit.log_pace)  # the shape is fitted at the current pace
            g = self._gamma
            for i in range(3):
                fit.h[i] = g * fit.h[i] + y * x[i]
                for j in range(3):
                    fit.G[i][j] = g * fit.G[i][j] + x[i] * x[j]
            fit.w = g * fit.w + 1.0
            fit.fill = g * fit.fill + min(generated_tokens / max_new_tokens, 1.0)
            fit.theta = _fit_nonneg(fit.G, fit.h)

    def estimate(self, mode: str, prompt_tokens: int, max_new_tokens: int) -> tuple[float, float] | None:
        """(expected seconds, effective number of recent jobs behind it), or None before
        the first job."""
        with self._lock:
            fit = self._fits.get(mode)
            if fit is None or fit.theta is None:
                return None
            shape = fit.shape(prompt_tokens, fit.expected_fill() * max_new_tokens)
            return math.exp(fit.log_pace) * shape, fit.w

    def expected(self, mode: str, prompt_tokens: int, max_new_tokens: int, default: float) -> float:
        found = self.estimate(mode, prompt_tokens, max_new_tokens)
        return found[0] if found is not None else default


class InitCost:
    """What starting a job costs on a device, per mode, when its model is warm (already
    loaded) and when it is cold, as ``a + b·prompt_tokens`` fitted to the executors'
    ``init_ms`` (non-negative coefficients, forgetting). An executor that reports the
    prompt's processing apart (genie) fits ``b ≈ 0``; one that reports the time to the first
    token as start-up (a CLI such as llama-cli: load + prefill) fits the prefill as ``b``, so
    a long prompt's start-up is priced as long, not as the average. The service record fits
    the work after it; a bid adds the start-up the job would pay now."""

    def __init__(self, half_life_jobs: float = 20.0):
        self._gamma = decay_for(half_life_jobs)
        # (mode, warm) -> [Σ γ^k, Σ γ^k p, Σ γ^k p², Σ γ^k s, Σ γ^k s·p]  (p in thousands of tokens)
        self._sums: dict[tuple[str, bool], list[float]] = {}
        self._lock = threading.Lock()

    def observe(self, mode: str, warm: bool, seconds: float, prompt_tokens: int = 0) -> None:
        if not math.isfinite(seconds) or seconds < 0 or prompt_tokens < 0:
            return
        p = prompt_tokens / TOKEN_SCALE
        with self._lock:
            sums = self._sums.setdefault((mode, warm), [0.0] * 5)
            for i, v in enumerate((1.0, p, p * p, seconds, seconds * p)):
                sums[i] = self._gamma * sums[i] + v

    def expected(self, mode: str, warm: bool, prompt_tokens: int = 0) -> float:
        """Seconds of start-up a job of ``prompt_tokens`` would pay now; a cold start never
        counts as cheaper than a warm one, and nothing is assumed before the first job."""
        p = prompt_tokens / TOKEN_SCALE
        with self._lock:
            warm_s = self._predict(self._sums.get((mode, True)), p)
            cold_s = self._predict(self._sums.get((mode, False)), p)
        if warm:
            return warm_s if warm_s is not None else 0.0
        return max(cold_s if cold_s is not None else 0.0, warm_s or 0.0)

    @staticmethod
    def _predict(sums: list[float] | None, p: float) -> float | None:
        if sums is None or sums[0] <= 0:
            return None
        w, sp, spp, sy, syp = sums
        a, b = _fit_line_nonneg(w, sp, spp, sy, syp)
        return a + b * p


def _fit_line_nonneg(w: float, sp: float, spp: float, sy: float, syp: float) -> tuple[float, float]:
    """Ridge least squares of y ≈ a + b·p with a, b ≥ 0, from the weighted sums (exact:
    the unconstrained optimum if it is feasible, else the better of the two one-sided fits)."""
    g00, g01, g11 = w + RIDGE, sp, spp + RIDGE
    det = g00 * g11 - g01 * g01
    if det > 1e-12:
        a = (g11 * sy - g01 * syp) / det
        b = (g00 * syp - g01 * sy) / det
        if a >= 0 and b >= 0:
            return a, b
    candidates = [(max(sy, 0.0) / g00, 0.0), (0.0, max(syp, 0.0) / g11)]

    def loss(ab: tuple[float, float]) -> float:
        a, b = ab
        return g00 * a * a + 2 * g01 * a * b + g11 * b * b - 2 * (sy * a + syp * b)
    return min(candidates, key=loss)


def job_seconds(record: ServiceRecord, init: InitCost, mode: str, prompt_tokens: int, max_new_tokens: int, *,
                warm: bool, default: float = UNKNOWN_JOB_S) -> float:
    """A job's expected time from the moment it starts: its start-up plus its service. This
    is the basis ``remaining()`` compares with a running job's age (which includes the
    start-up), so a device's queue and its running jobs are priced alike."""
    found = record.estimate(mode, prompt_tokens, max_new_tokens)
    if found is None:
        return default + init.expected(mode, warm, prompt_tokens)
    return found[0] + init.expected(mode, warm, prompt_tokens)


def expected_wait(slots: int, running_left: Iterable[float], queued: Iterable[float]) -> float:
    """When a job arriving now would start: FIFO over ``slots``, each job taking its
    expected seconds; ``running_left`` are the expected remaining times of running jobs."""
    if slots <= 0:
        return math.inf
    free = sorted(list(running_left)[:slots])
    free += [0.0] * (slots - len(free))
    for seconds in queued:
        i = min(range(slots), key=free.__getitem__)
        free[i] += seconds
    return min(free)


def remaining(expected_s: float, elapsed_s: float) -> float:
    """What is left of a running job: never nothing, since it has not finished yet."""
    return max(expected_s - elapsed_s, OVERRUN_SHARE * elapsed_s, MIN_SECONDS)
