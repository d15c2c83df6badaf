"""Scheduling simulator: the agent's own decision and learning code, in simulated time.

    scripts/simulate [--quick] [--jobs 2000] [--seeds 5] [--policies linucb,jsq,...]
                     [--scenarios steady,burst,drift,churn,ttft,thermal,apps,link,real]
                     [--loads 0.3,0.7,0.9] [--variants] [--alpha A] [--out DIR]
    (a markdown report, JSON, and PNG plots if matplotlib is there: pip install '.[sim]')

No MQTT, no threads, no sleeping: a discrete-event loop over a reference fleet whose
latency models are hidden from the policies. What the policies see is what they would
see over the wire: each device's bid, built by the node's own code (its service record,
its start-up record and its backlog, ``agent.servicemodel``), and each orchestrator's own
arms (``agent.linucb.Arms``), trained once per job with the context and the promise
captured at decision time, exactly as ``agent.orchestrator`` does. The decision is
``agent.selection.select``.

Hidden device model (seconds), for a job of p prompt and n generated tokens:

    start-up = load (the model is cold) or init (warm)
    work     = (prefill·p/1000 + decode·n/1000) · (1 + contention·(k−1)) · (1 + background)
               · thermal · apps · lognormal(0, noise)

k is the number of jobs running on the device when it starts. ``background`` is a slowly
varying load from other programs (mean-reverting around 0.1; it shows in cpu_percent).
A model stays warm for ``keep_warm_s`` after a job (a server keeps it loaded; a CLI such
as llama-cli loads it for every job). The executor reports ``init_ms`` as the start-up
alone (genie, a server) or as the time to the first token — start-up plus prefill —
(``ttft``: llama-cli). Prompts and answer budgets are lognormal (most short, a long tail);
an answer uses U(0.2, 1) of its budget. One device prefills through an NPU-class
accelerator, 10-50x faster than the CPUs. Load is a share of the fleet's capacity at the
mean job, with the mean of each world's slowdowns.

Worlds (what the devices cannot see about themselves, or see late):

- honest: accurate self-estimates (start-up reported apart, models kept warm);
- ttft: every executor reports load + prefill as init_ms, three devices load per job;
- thermal: two devices throttle (2.5x) as they heat up under sustained load;
- apps: two devices share their CPU with other programs that come and go (2x slower);
- link: the fastest device reaches one orchestrator over a slow link (2 s per job, plus
  20 ms per streamed token);
- real: all of the above at once.

Scenarios: steady Poisson load at 30/70/90 % of capacity; bursts (30 % / 150 %); drift
(the fastest device slows 3x half-way); churn (a fast device joins, another leaves); and
each world above at 70 % (``real`` at every load). Three orchestrators each hold their
own arms, as three devices triggering would. The oracle knows every hidden model, queue,
link and state, and when each running job will really end, and sends each job where its
completion (as its orchestrator sees it) is earliest.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import statistics
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from agent.linucb import Arm, Arms, features, residual_target  # noqa: E402
from agent.messages import Snapshot  # noqa: E402
from agent.selection import POLICIES, Offer, select  # noqa: E402
from agent.servicemodel import (  # noqa: E402
    InitCost,
    ServiceRecord,
    decay_for,
    expected_wait,
    job_seconds,
    remaining,
)

ALPHA, LAMBDA, HALF_LIFE = 0.0, 1.0, 20.0    # the shipped defaults (config.py)
CAP_S = 120.0
ORCHESTRATORS = 3
WARMUP_SHARE = 0.1                           # jobs left out of the steady-state means
FILL_LOW = 0.2                               # answers use U(FILL_LOW, 1) of their token budget
PROMPT_MEDIAN, PROMPT_SIGMA, PROMPT_RANGE = 300.0, 1.0, (16, 6000)
BUDGET_MEDIAN, BUDGET_SIGMA, BUDGET_RANGE = 128.0, 0.7, (16, 1024)
BACKGROUND_MEAN, BACKGROUND_REVERSION, BACKGROUND_STEP = 0.1, 0.01, 0.02
HEAT_TAU_S, COOL_TAU_S = 90.0, 150.0         # thermal: heating while busy, cooling while idle
APPS_ON_S, APPS_OFF_S = 90.0, 150.0          # mean length of the other programs' episodes
WORLDS = ("honest", "ttft", "thermal", "apps", "link", "real")
BIASED = ("ttft", "thermal", "apps", "link", "real")


# --------------------------------------------------------------------------- the hidden world

@dataclass
class Hidden:
    """A device's true latency model (the policies never see this)."""

    name: str
    slots: int
    load: float                 # s: loading the model when it is cold
    init: float                 # s: starting a job on a warm model
    prefill: float              # s per 1000 prompt tokens
    decode: float               # s per 1000 generated tokens
    contention: float = 0.15    # slowdown per extra concurrent job
    noise: float = 0.12         # lognormal sigma
    mem_mb: float = 8000.0
    slow: float = 1.0           # drift multiplier
    keep_warm_s: float = math.inf   # how long the model stays loaded after a job (0: a CLI)
    ttft_init: bool = False     # the executor reports init_ms = start-up + prefill (llama-cli)
    throttle: float = 1.0       # thermal: the slowdown when fully hot
    apps: float = 0.0           # other programs: the extra slowdown while they run
    link: dict[int, tuple[float, float]] = field(default_factory=dict)  # asker -> (s per job, s per token)

    def work(self, prompt: float, new: float, running: int, background: float, heat: float = 0.0,
             apps_on: bool = False) -> float:
        base = self.prefill * prompt / 1000 + self.decode * new / 1000
        return (base * (1 + self.contention * running) * (1 + background) * self.slow
                * (1 + (self.throttle - 1) * heat) * (1 + self.apps * apps_on))

    def link_s(self, asker: int, new: float) -> float:
        delay, per_token = self.link.get(asker, (0.0, 0.0))
        return delay + per_token * new


def reference_fleet(world: str = "honest") -> list[Hidden]:
    """Six devices about 5x apart in speed, with different prefill/decode balances."""
    fleet = [  # a 1B model: 25 tokens/s decode on the workstation down to 5 on the old Pi
        Hidden("workstation", 2, load=3.0, init=0.05, prefill=4.0, decode=40.0),
        Hidden("npu-phone", 1, load=2.0, init=0.05, prefill=0.3, decode=70.0, mem_mb=3000),  # NPU prefill
        Hidden("laptop", 1, load=4.0, init=0.1, prefill=8.0, decode=60.0),
        Hidden("mini-pc", 1, load=4.0, init=0.1, prefill=6.0, decode=90.0),    # quick prefill, slow decode
        Hidden("board", 1, load=6.0, init=0.2, prefill=25.0, decode=140.0, mem_mb=2000),
        Hidden("old-pi", 1, load=9.0, init=0.3, prefill=40.0, decode=200.0, mem_mb=1500),
    ]
    if world in ("ttft", "real"):
        for h in fleet:
            h.ttft_init = True
        for h in fleet[2:5]:
            h.keep_warm_s = 0.0        # llama-cli: loads the model for every job
    if world in ("thermal", "real"):
        fleet[1].throttle = fleet[4].throttle = 2.5
    if world in ("apps", "real"):
        fleet[2].apps = fleet[3].apps = 1.0
    if world in ("link", "real"):
        fleet[0].link = {0: (2.0, 0.02)}
    return fleet


def late_device(world: str) -> Hidden:
    return Hidden("new-laptop", 1, load=3.0, init=0.1, prefill=5.0, decode=45.0, ttft_init=world in ("ttft", "real"))


@dataclass
class Job:
    jid: int
    arrival: float
    prompt: int
    max_new: int
    new: int
    origin: int
    # filled in as it runs
    device: str = ""
    start: float = 0.0
    end: float = 0.0
    expected: float = 0.0        # the node's own estimate from its start, when it was queued (for backlog)
    x: tuple[float, ...] | None = None
    promise: float | None = None
    explore: bool = False
    warm: bool = True
    reported_init: float = 0.0


class Device:
    """One simulated node: the hidden model, its FIFO queue, and the node's own code."""

    def __init__(self, hidden: Hidden, rng: np.random.Generator):
        self.h = hidden
        self.rng = rng
        self.record = ServiceRecord(HALF_LIFE)
        self.init_cost = InitCost(HALF_LIFE)
        self.queue: deque[Job] = deque()
        self.running: list[Job] = []
        self.background = BACKGROUND_MEAN
        self.online = True
        self.warm_until = -math.inf          # every model starts cold
        self.heat, self.heat_at = 0.0, 0.0
        self.apps_on, self.apps_switch = False, float(rng.exponential(APPS_OFF_S))

    # hidden state, advanced lazily to ``now`` ----------------------------------------------
    def advance(self, now: float) -> None:
        dt = now - self.heat_at
        if dt > 0:
            if self.running:
                self.heat += (1 - self.heat) * (1 - math.exp(-dt / HEAT_TAU_S))
            else:
                self.heat *= math.exp(-dt / COOL_TAU_S)
            self.heat_at = now
        while self.h.apps and now >= self.apps_switch:
            self.apps_on = not self.apps_on
            self.apps_switch += float(self.rng.exponential(APPS_ON_S if self.apps_on else APPS_OFF_S))

    def warm(self, now: float) -> bool:
        return now < self.warm_until

    # what the node advertises ------------------------------------------------------------
    def expected(self, job: Job, now: float) -> float:
        return job_seconds(self.record, self.init_cost, "cpu", job.prompt, job.max_new, warm=self.warm(now))

    def backlog(self, now: float) -> float:
        running_left = [remaining(j.expected, now - j.start) for j in self.running]
        return expected_wait(self.h.slots, running_left, (j.expected for j in self.queue))

    def snapshot(self, now: float) -> Snapshot:
        busy = len(self.running)
        cpu = min(100.0, 100.0 * (busy / self.h.slots) * 0.8 + 100.0 * self.background
                  + (50.0 if self.apps_on else 0.0))
        mem = self.h.mem_mb * (1 - 0.3 * busy / self.h.slots)
        temp = 40.0 + 50.0 * self.heat
        return Snapshot(has_npu=False, npu_free=False, cpu_slots=self.h.slots, cpu_percent=cpu,
                        mem_available_mb=mem, load1=float(busy), queue_depth=busy + len(self.queue),
                        temperature_c=temp, backlog_s=self.backlog(now))

    def offer(self, job: Job, now: float) -> Offer:
        estimate = self.record.estimate("cpu", job.prompt, job.max_new)
        return Offer(self.h.name, self.snapshot(now), service_s=estimate[0] if estimate else None,
                     service_n=estimate[1] if estimate else 0,
                     init_s=self.init_cost.expected("cpu", self.warm(now), job.prompt))

    # what really happens -----------------------------------------------------------------
    def true_completion(self, job: Job, now: float) -> float:
        """For the oracle: when ``job``'s answer would be in its orchestrator's hands if
        sent here now. The oracle sees the true state (when each running job will really
        end, warm or cold, heat, other programs) and the hidden model (the expected time of
        everything not yet started)."""
        free = [j.end - now for j in self.running] + [0.0] * (self.h.slots - len(self.running))
        busy = len(self.running)
        # A job behind another finds the model warm if the device keeps it loaded.
        after = self.h.keep_warm_s > 0 and (self.warm(now) or bool(self.running))
        for q in self.queue:
            i = min(range(self.h.slots), key=free.__getitem__)
            free[i] += self._expected_true(q, min(busy, self.h.slots - 1), after)
            after = self.h.keep_warm_s > 0
        wait = min(free)
        warm = after if wait > 0 else self.warm(now)
        return (wait + self._expected_true(job, min(busy + len(self.queue), self.h.slots - 1), warm)
                + self.h.link_s(job.origin, (1 + FILL_LOW) / 2 * job.max_new))

    def _expected_true(self, job: Job, others: int, warm: bool) -> float:
        start = self.h.init if warm else self.h.load
        return start + self.h.work(job.prompt, (1 + FILL_LOW) / 2 * job.max_new, max(others, 0), self.background,
                                   self.heat, self.apps_on)

    def drift_background(self, rng: np.random.Generator) -> None:
        """Other programs come and go: a mean-reverting walk, one step per arrival."""
        step = BACKGROUND_REVERSION * (BACKGROUND_MEAN - self.background) + rng.normal(0, BACKGROUND_STEP)
        self.background = float(np.clip(self.background + step, 0.0, 0.6))

    def admit(self, job: Job, now: float) -> None:
        job.expected = self.expected(job, now)
        self.queue.append(job)

    def start_ready(self, now: float) -> list[Job]:
        """Start queued jobs on free slots; returns them with their end times set."""
        started = []
        while self.queue and len(self.running) < self.h.slots:
            job = self.queue.popleft()
            job.warm = self.warm(now)   # as the executors say: loaded by an earlier job, kept warm
            startup = self.h.init if job.warm else self.h.load
            noise = float(self.rng.lognormal(0.0, self.h.noise))
            prefill = self.h.work(job.prompt, 0, len(self.running), self.background, self.heat, self.apps_on) * noise
            work = self.h.work(job.prompt, job.new, len(self.running), self.background, self.heat,
                               self.apps_on) * noise
            job.start = now
            job.end = now + startup + work
            job.reported_init = startup + (prefill if self.h.ttft_init else 0.0)
            self.running.append(job)
            started.append(job)
        return started

    def finish(self, job: Job, now: float) -> None:
        self.running.remove(job)
        self.warm_until = now + self.h.keep_warm_s
        # What the node records (agent.node): start-up from init_ms, the rest as service.
        self.init_cost.observe("cpu", job.warm, job.reported_init, job.prompt)
        self.record.observe("cpu", job.prompt, job.max_new, job.new, job.end - job.start - job.reported_init)


# --------------------------------------------------------------------------- one run

@dataclass
class Scenario:
    name: str
    load: float
    jobs: int
    world: str = "honest"
    drift_at: int | None = None           # job index at which the fastest device slows 3x
    join_at: int | None = None            # a fast device joins
    leave_at: int | None = None           # a device leaves
    burst: bool = False


@dataclass
class Run:
    latencies: list[float] = field(default_factory=list)
    regret: list[float] = field(default_factory=list)      # decision regret per job (s)
    best: list[float] = field(default_factory=list)        # oracle-best expected completion per job (s)
    chosen: list[str] = field(default_factory=list)
    decide_us: list[float] = field(default_factory=list)


def _mean_job() -> tuple[float, float]:
    rng = np.random.default_rng(12345)
    prompts = np.clip(np.exp(rng.normal(math.log(PROMPT_MEDIAN), PROMPT_SIGMA, 20000)), *PROMPT_RANGE)
    budgets = np.clip(np.exp(rng.normal(math.log(BUDGET_MEDIAN), BUDGET_SIGMA, 20000)), *BUDGET_RANGE)
    return float(prompts.mean()), float(budgets.mean()) * (1 + FILL_LOW) / 2


MEAN_PROMPT, MEAN_NEW = _mean_job()


def capacity(fleet: Sequence[Hidden]) -> float:
    """Jobs per second the fleet can serve at the mean job, without contention, at the mean
    of each slowdown (background, heat, other programs)."""
    apps_share = APPS_ON_S / (APPS_ON_S + APPS_OFF_S)
    total = 0.0
    for h in fleet:
        start = h.init if h.keep_warm_s > 0 else h.load
        work = h.work(MEAN_PROMPT, MEAN_NEW, 0, BACKGROUND_MEAN, heat=0.6 if h.throttle > 1 else 0.0)
        work *= 1 + h.apps * apps_share
        total += h.slots / (start + work)
    return total


def workload(rng: np.random.Generator, scenario: Scenario, fleet: Sequence[Hidden]) -> list[Job]:
    jobs, t = [], 0.0
    rate = capacity(fleet) * scenario.load
    # After the drift the fleet has less capacity; arrivals slow down with it, so the load
    # stays at the same share of capacity and the gap before and after is comparable.
    slowed = [replace(h, slow=3.0) if h.name == fastest(fleet) else h for h in fleet]
    after_drift = capacity(slowed) / capacity(fleet)
    for i in range(scenario.jobs):
        load = scenario.load
        if scenario.burst:
            load = 1.5 if (i // 100) % 2 else 0.3
        if scenario.drift_at is not None and i >= scenario.drift_at:
            load *= after_drift
        t += float(rng.exponential(1.0 / (rate * load / scenario.load)))
        prompt = int(np.clip(math.exp(rng.normal(math.log(PROMPT_MEDIAN), PROMPT_SIGMA)), *PROMPT_RANGE))
        max_new = int(np.clip(math.exp(rng.normal(math.log(BUDGET_MEDIAN), BUDGET_SIGMA)), *BUDGET_RANGE))
        jobs.append(Job(i, t, prompt, max_new, max(1, int(max_new * rng.uniform(FILL_LOW, 1.0))),
                        origin=int(rng.integers(ORCHESTRATORS))))
    return jobs


def _setup(scenario: Scenario, seed: int) -> tuple[np.random.Generator, dict[str, Device], list[Job], str, str]:
    world = np.random.default_rng(seed)
    fleet = reference_fleet(scenario.world)
    late = late_device(scenario.world)
    devices = {h.name: Device(h, np.random.default_rng([seed, i])) for i, h in enumerate(fleet + [late])}
    devices[late.name].online = scenario.join_at is None
    return world, devices, workload(world, scenario, fleet), fastest(fleet), late.name


def simulate(policy: str, scenario: Scenario, seed: int, *, learn: bool = True, alpha: float = ALPHA,
             trust_node: bool = True) -> Run:
    """One policy on one scenario and seed. ``learn``: the orchestrators train their arms
    (else the ranking is the devices' own promises alone); ``trust_node``: bids carry the
    node's own service estimate (else None, as a node that never reports)."""
    world, devices, jobs, quickest, late = _setup(scenario, seed)
    arms = [Arms() for _ in range(ORCHESTRATORS)]
    gamma = decay_for(HALF_LIFE)
    decide_rng = np.random.default_rng(seed + 1000)
    run = Run(latencies=[math.nan] * len(jobs))
    events: list[tuple[float, int, int, Job]] = [(j.arrival, 1, j.jid, j) for j in jobs]
    heapq.heapify(events)
    seq = len(jobs)
    while events:
        now, kind, _, job = heapq.heappop(events)
        if kind == 0:
            dev = devices[job.device]
            dev.advance(now)
            dev.finish(job, now)
            seen = job.end - job.arrival + dev.h.link_s(job.origin, job.new)
            run.latencies[job.jid] = seen
            if learn and policy == "linucb":
                assert job.x is not None
                # What the node reports as its queue time is the wait; the rest is the job.
                y = None if job.promise is None else residual_target(True, seen - (job.start - job.arrival), CAP_S,
                                                                     job.promise)
                arms[job.origin].train(job.device, np.array(job.x), y, str(job.jid), now, lam=LAMBDA,
                                       gamma=gamma, base=job.promise or 0.0)
            for started in dev.start_ready(now):
                heapq.heappush(events, (started.end, 0, seq, started))
                seq += 1
            continue
        # an arrival: world changes first, then the auction
        _world_changes(scenario, job.jid, devices, quickest, late)
        online = [d for d in devices.values() if d.online]
        for d in online:
            d.drift_background(world)
            d.advance(now)
        offers = [d.offer(job, now) for d in online]
        if not trust_node:
            offers = [Offer(o.device, o.snapshot, init_s=o.init_s) for o in offers]
        mine = arms[job.origin]
        t0 = time.perf_counter()
        decision = select(offers, mine.arms, prompt_tokens=job.prompt, max_new_tokens=job.max_new,
                          alpha=alpha, lam=LAMBDA, policy=policy, exploring=mine.exploring_now(now),
                          rng=decide_rng, cursor=mine.cursor)
        run.decide_us.append((time.perf_counter() - t0) * 1e6)
        mine.cursor = decision.cursor
        choice = decision.winner
        assert choice is not None
        expected = {d.h.name: d.true_completion(job, now) for d in online}
        best = min(expected.values())
        run.regret.append(expected[choice.device] - best)
        run.best.append(best)
        run.chosen.append(choice.device)
        job.device, job.x, job.explore, job.promise = choice.device, choice.x, choice.explore, choice.promise
        if choice.explore and learn:
            mine.exploring[choice.device] = (str(job.jid), math.inf)
        dev = devices[choice.device]
        dev.admit(job, now)
        for started in dev.start_ready(now):
            heapq.heappush(events, (started.end, 0, seq, started))
            seq += 1
    return run


def simulate_oracle(scenario: Scenario, seed: int) -> Run:
    """The same workload, each job sent where its true expected completion is earliest."""
    world, devices, jobs, quickest, late = _setup(scenario, seed)
    run = Run(latencies=[math.nan] * len(jobs))
    events: list[tuple[float, int, int, Job]] = [(j.arrival, 1, j.jid, j) for j in jobs]
    heapq.heapify(events)
    seq = len(jobs)
    while events:
        now, kind, _, job = heapq.heappop(events)
        if kind == 0:
            dev = devices[job.device]
            dev.advance(now)
            dev.finish(job, now)
            run.latencies[job.jid] = job.end - job.arrival + dev.h.link_s(job.origin, job.new)
            for started in dev.start_ready(now):
                heapq.heappush(events, (started.end, 0, seq, started))
                seq += 1
            continue
        _world_changes(scenario, job.jid, devices, quickest, late)
        online = [d for d in devices.values() if d.online]
        for d in online:
            d.drift_background(world)
            d.advance(now)
        expected = {d.h.name: d.true_completion(job, now) for d in online}
        target = min(expected, key=expected.__getitem__)
        run.best.append(expected[target])
        run.regret.append(0.0)
        run.chosen.append(target)
        job.device = target
        dev = devices[target]
        dev.admit(job, now)
        for started in dev.start_ready(now):
            heapq.heappush(events, (started.end, 0, seq, started))
            seq += 1
    return run


def fastest(fleet: Sequence[Hidden]) -> str:
    return min(fleet, key=lambda h: (h.init + h.work(MEAN_PROMPT, MEAN_NEW, 0, 0.0)) / h.slots).name


def _world_changes(scenario: Scenario, index: int, devices: dict[str, Device], quickest: str, late: str) -> None:
    if scenario.drift_at is not None and index == scenario.drift_at:
        devices[quickest].h.slow = 3.0
    if scenario.join_at is not None and index == scenario.join_at:
        devices[late].online = True
    if scenario.leave_at is not None and index == scenario.leave_at:
        devices["mini-pc"].online = False


# --------------------------------------------------------------------------- metrics

def _pct(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(xs, q)) if len(xs) else math.nan


def summarise(run: Run) -> dict[str, float]:
    lat = [x for x in run.latencies[int(len(run.latencies) * WARMUP_SHARE):] if not math.isnan(x)]
    return {"mean": statistics.fmean(lat), "p95": _pct(lat, 95), "p99": _pct(lat, 99),
            "decision_regret_share": sum(run.regret) / max(sum(run.best), 1e-9)}


def recovery(run: Run, at: int, window: int = 25) -> int | None:
    """Jobs after ``at`` until the decision regret — what the chosen device's completion
    costs over the best device's, as a share of the best, over a sliding window — is back
    within 10 % of the pre-drift gap (10 percentage points at least, since a gap near
    zero has no 10 % to speak of)."""
    def share(lo: int, hi: int) -> float:
        return sum(run.regret[lo:hi]) / max(sum(run.best[lo:hi]), 1e-9)

    before = share(int(at * 0.3), at)
    for k in range(at, len(run.regret) - window):
        if share(k, k + window) <= before + max(0.10 * before, 0.10):
            return k - at
    return None


def share_recovery(run: Run, oracle: Run, at: int, device: str, window: int = 20) -> int | None:
    """Jobs after ``at`` (the slowdown) until the share of jobs sent to ``device`` over the
    next ``window`` is no more than the oracle's own share after the slowdown plus 10
    percentage points: how long a policy keeps feeding a device that got slower."""
    def share(chosen: Sequence[str]) -> float:
        return sum(c == device for c in chosen) / max(len(chosen), 1)

    target = share(oracle.chosen[at:]) + 0.10
    for k in range(at, len(run.chosen) - window):
        if share(run.chosen[k:k + window]) <= target:
            return k - at
    return None


def left_idle(run: Run, oracle: Run) -> list[str]:
    """Devices the oracle gives at least 2 % of the jobs that this run gave under 0.5 %."""
    def shares(r: Run) -> dict[str, float]:
        return {d: r.chosen.count(d) / len(r.chosen) for d in set(r.chosen) | set(oracle.chosen)}
    mine, best = shares(run), shares(oracle)
    return sorted(d for d, share in best.items() if share >= 0.02 and mine.get(d, 0.0) < 0.005)


def cold_start_cost(run: Run, oracle: Run, first: int = 100) -> float:
    """Extra mean latency over the first jobs of a cold fleet, as a share of the oracle's."""
    mine = [x for x in run.latencies[:first] if not math.isnan(x)]
    best = [x for x in oracle.latencies[:first] if not math.isnan(x)]
    return statistics.fmean(mine) / statistics.fmean(best) - 1.0


def decision_time_us(policy: str, n_offers: int = 32, repeats: int = 300, *, unsolved: bool = False) -> float:
    """One select() with ``n_offers`` trained arms, median µs; ``unsolved``: every arm
    solved in the decision (as after another process wrote the store), else as a
    long-running node decides, with the arms it trained solved already."""
    rng = np.random.default_rng(0)
    arms = Arms()
    offers = []
    gamma = decay_for(HALF_LIFE)
    for i in range(n_offers):
        snap = Snapshot(False, False, 1, float(rng.uniform(0, 100)), 4000.0, 0.5, int(rng.integers(4)),
                        55.0, backlog_s=float(rng.uniform(0, 5)))
        offers.append(Offer(f"dev-{i:02d}", snap, service_s=1.0, service_n=5))
        for j in range(5):
            arms.train(f"dev-{i:02d}", features(snap, 500, 128), 1.0 + j, f"r{i}-{j}", 0.0, lam=LAMBDA,
                       gamma=gamma)
    samples = []
    for _ in range(repeats):
        current = ({d: Arm(a.G, a.b, a.n, a.w, a.sse) for d, a in arms.arms.items()} if unsolved else arms.arms)
        t0 = time.perf_counter()
        select(offers, current, prompt_tokens=500, max_new_tokens=128, alpha=ALPHA, lam=LAMBDA,
               policy=policy, rng=rng)
        samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples)


# --------------------------------------------------------------------------- report

def scenarios(jobs: int, loads: Sequence[float], names: Sequence[str]) -> list[Scenario]:
    out = []
    if "steady" in names:
        out += [Scenario(f"steady {int(load * 100)}%", load, jobs) for load in loads]
    if "burst" in names:
        out.append(Scenario("bursts 30/150%", 0.7, jobs, burst=True))
    if "drift" in names:
        out.append(Scenario("drift 70% (fastest slows 3x)", 0.7, jobs, drift_at=jobs // 2))
    if "churn" in names:
        out.append(Scenario("churn 70% (join + leave)", 0.7, jobs, join_at=jobs // 3, leave_at=2 * jobs // 3))
    for world in WORLDS[1:-1]:
        if world in names:
            out.append(Scenario(f"{world} 70%", 0.7, jobs, world=world))
    if "real" in names:
        out += [Scenario(f"real {int(load * 100)}%", load, jobs, world="real") for load in loads]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 seed, 300 jobs, 70%% load only: a smoke run")
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--loads", default="0.3,0.7,0.9")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--scenarios", default="steady,burst,drift,churn," + ",".join(WORLDS[1:]))
    ap.add_argument("--alpha", type=float, default=ALPHA, help="linucb's alpha (default: the shipped one)")
    ap.add_argument("--variants", action="store_true",
                    help="also run linucb without learning (the devices' own promises alone) and "
                         "without node estimates")
    ap.add_argument("--out", default=None, help="directory for report.md, results.json and PNG plots")
    args = ap.parse_args(argv)
    if args.quick:
        args.jobs, args.seeds, args.loads, args.scenarios = 300, 1, "0.7", "steady"
    policies = [p for p in args.policies.split(",") if p]
    variants: list[tuple[str, str, dict[str, Any]]] = [(p, p, {"alpha": args.alpha} if p == "linucb" else {})
                                                       for p in policies]
    if args.variants:
        variants += [("device estimates only", "linucb", {"learn": False, "alpha": 0.0}),
                     ("linucb, no node estimates", "linucb", {"trust_node": False, "alpha": args.alpha})]
    results: dict[str, Any] = {"defaults": {"alpha": args.alpha, "lambda": LAMBDA, "half_life_jobs": HALF_LIFE},
                               "seeds": args.seeds, "jobs": args.jobs, "scenarios": {}}
    runs_for_plots: dict[str, dict[str, list[Run]]] = {}
    started = time.perf_counter()
    for sc in scenarios(args.jobs, [float(x) for x in args.loads.split(",")], args.scenarios.split(",")):
        oracle = [simulate_oracle(sc, seed) for seed in range(args.seeds)]
        o_mean = statistics.fmean(summarise(r)["mean"] for r in oracle)
        rows: dict[str, Any] = {"oracle": {"mean": o_mean, "ratio": 1.0,
                                           "p95": statistics.fmean(summarise(r)["p95"] for r in oracle),
                                           "p99": statistics.fmean(summarise(r)["p99"] for r in oracle)}}
        runs_for_plots[sc.name] = {"oracle": oracle}
        for label, policy, kw in variants:
            runs = [simulate(policy, sc, seed, **kw) for seed in range(args.seeds)]
            sums = [summarise(r) for r in runs]
            row: dict[str, Any] = {k: statistics.fmean(s[k] for s in sums) for k in sums[0]}
            row["ratio"] = row["mean"] / o_mean
            row["cold_start_cost"] = statistics.fmean(cold_start_cost(r, o) for r, o in zip(runs, oracle,
                                                                                              strict=True))
            row["left_idle"] = sorted({d for r, o in zip(runs, oracle, strict=True) for d in left_idle(r, o)})
            if sc.drift_at is not None:
                rec = [recovery(r, sc.drift_at) for r in runs]
                row["drift_recovery_jobs"] = (statistics.median(x for x in rec if x is not None)
                                              if any(x is not None for x in rec) else None)
                row["drift_unrecovered_seeds"] = sum(x is None for x in rec)
                slowed = fastest(reference_fleet(sc.world))
                rec = [share_recovery(r, o, sc.drift_at, slowed) for r, o in zip(runs, oracle, strict=True)]
                row["drift_share_recovery_jobs"] = (max(x for x in rec if x is not None)
                                                    if any(x is not None for x in rec) else None)
                row["drift_share_unrecovered_seeds"] = sum(x is None for x in rec)
            row["decide_us_p50"] = statistics.median(x for r in runs for x in r.decide_us)
            rows[label] = row
            runs_for_plots[sc.name][label] = runs
            print(f"  … {sc.name:<30} {label:<30} mean {row['mean']:7.2f} s  x oracle {row['ratio']:.2f}",
                  file=sys.stderr, flush=True)
        results["scenarios"][sc.name] = rows
    results["decision_time_us_32_offers"] = {p: round(decision_time_us(p), 1) for p in policies}
    if "linucb" in policies:
        results["decision_time_us_32_offers"]["linucb, every arm solved"] = round(
            decision_time_us("linucb", unsolved=True), 1)
    results["wall_s"] = round(time.perf_counter() - started, 1)
    report = render(results)
    print(report)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(report)
        (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
        plotted = plot(runs_for_plots, out)
        print(f"\nwrote {out / 'report.md'}, {out / 'results.json'}" + (f" and {plotted} plot(s)" if plotted else
              " (no plots: pip install matplotlib, or '.[sim]')"))
    return 0


def render(results: dict[str, Any]) -> str:
    d = results["defaults"]
    lines = [f"Seeds: {results['seeds']}, jobs per run: {results['jobs']}; linucb alpha={d['alpha']}, "
             f"lambda={d['lambda']}, half_life_jobs={d['half_life_jobs']}. Means exclude the first "
             f"{int(WARMUP_SHARE * 100)} % of jobs; latency in seconds, as each job's orchestrator sees it. "
             "vs X: how much lower the mean latency is than policy X's, on the same workload. Cold start: "
             "extra mean latency over the first 100 jobs of a fleet nobody has learnt yet, against the "
             "oracle. Drift recovery: jobs after the slowdown until decisions are back within 10 % of the "
             "pre-drift regret (median over seeds) / until the share of jobs still sent to the slowed "
             "device over 20 jobs is within 10 points of the oracle's (worst seed). Left idle: devices the "
             "oracle uses that the policy (almost) never does.", ""]
    for name, rows in results["scenarios"].items():
        lines += [f"### {name}", "",
                  "| policy | mean | p95 | p99 | x oracle | vs least_backlog | vs jsq | cold start "
                  "| drift recovery (regret / share) | left idle |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        lb = rows.get("least_backlog", {}).get("mean")
        jsq = rows.get("jsq", {}).get("mean")
        for label, r in rows.items():
            def vs(base: float | None, r: dict[str, Any] = r, label: str = label) -> str:
                return "" if base is None or label == "oracle" else f"{(1 - r['mean'] / base) * 100:+.0f} %"

            def jobs(key: str, r: dict[str, Any] = r) -> str:
                return "not recovered" if r.get(key) is None else f"{r[key]:.0f}"
            drift_s = "" if "drift_recovery_jobs" not in r else (
                f"{jobs('drift_recovery_jobs')} / {jobs('drift_share_recovery_jobs')} jobs")
            cold = "" if "cold_start_cost" not in r else f"{r['cold_start_cost'] * 100:+.0f} %"
            idle = "" if label == "oracle" else (", ".join(r["left_idle"]) or "none")
            lines.append(f"| {label} | {r['mean']:.2f} | {r['p95']:.2f} | {r['p99']:.2f} | {r['ratio']:.2f} | "
                         f"{vs(lb)} | {vs(jsq)} | {cold} | {drift_s} | {idle} |")
        lines.append("")
    lines.append("Decision time, one select() over 32 offers (median µs): " +
                 ", ".join(f"{p} {us:.0f}" for p, us in results["decision_time_us_32_offers"].items()))
    lines.append(f"\n(simulated in {results['wall_s']} s of wall time)")
    return "\n".join(lines)


def plot(runs: dict[str, dict[str, list[Run]]], out: Path) -> int:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return 0
    made = 0
    for name, by_policy in runs.items():
        slug = "".join(c if c.isalnum() else "-" for c in name).strip("-")
        fig, (cdf, regret) = plt.subplots(1, 2, figsize=(12, 4.5))
        for label, rs in by_policy.items():
            lat = np.sort([x for r in rs for x in r.latencies if not math.isnan(x)])
            cdf.plot(lat, np.linspace(0, 1, len(lat)), label=label)
            if label != "oracle":
                cum = np.mean([np.cumsum(r.regret) for r in rs], axis=0)
                regret.plot(cum, label=label)
        cdf.set(xscale="log", xlabel="latency (s)", ylabel="share of jobs", title=f"{name}: latency CDF")
        regret.set(xlabel="job", ylabel="cumulative decision regret (s)", title=f"{name}: regret")
        cdf.legend(fontsize=7)
        regret.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"{slug}.png", dpi=110)
        plt.close(fig)
        made += 1
    return made


if __name__ == "__main__":
    raise SystemExit(main())
