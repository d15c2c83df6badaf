"""Scheduling simulator: the agent's own decision and learning code, in simulated time.

    scripts/simulate [--quick] [--jobs 2000] [--seeds 5] [--policies linucb,jsq,...]
                     [--scenarios steady,burst,drift,churn] [--loads 0.3,0.7,0.9]
                     [--out DIR]  (a markdown report, JSON, and PNG plots if matplotlib is there)

No MQTT, no threads, no sleeping: a discrete-event loop over a reference fleet whose
latency models are hidden from the policies. What the policies see is what they would
see over the wire: each device's bid, built by the node's own code (its service record
and backlog estimate, ``agent.servicemodel``), and each orchestrator's own arms
(``agent.linucb.Arms``), trained once per job with the context captured at decision
time, exactly as ``agent.orchestrator`` does. The decision is ``agent.selection.select``.

Hidden device model (seconds), per job of p prompt and n generated tokens:

    service = (init + prefill·p/1000 + decode·n/1000) · (1 + contention·(k−1))
              · (1 + background) · lognormal(0, noise)

where k is the number of jobs running on the device when it starts, and background is
a slowly varying load from other programs (mean-reverting around 0.1; it shows in the
device's cpu_percent, which is one of the features). Capacity, and so load, is computed
at the mean background. A job asks for up to m new tokens and generates n = m·U(0.2, 1.0)
(answers often stop well short of their budget). The oracle knows every hidden model,
each device's queue and when each running job will really end, and sends each job where
its completion is earliest.

Scenarios: steady Poisson load at 30/70/90 % of capacity; bursts (load alternating
between 30 % and 150 %); drift (the fastest device slows 3x half-way); churn (a fast
device joins late, and another leaves). Three orchestrators each hold their own arms,
as three devices triggering would.
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

from agent.linucb import Arms, features, training_target  # noqa: E402
from agent.messages import Snapshot  # noqa: E402
from agent.selection import POLICIES, Offer, select  # noqa: E402
from agent.servicemodel import (  # noqa: E402
    UNKNOWN_JOB_S,
    ServiceRecord,
    decay_for,
    expected_wait,
    remaining,
)

ALPHA, LAMBDA, HALF_LIFE = 1.0, 1.0, 20.0    # the shipped defaults (config.py)
CAP_S = 120.0
ORCHESTRATORS = 3
WARMUP_SHARE = 0.1                           # jobs left out of the steady-state means
FILL_LOW = 0.2                               # answers use U(FILL_LOW, 1) of their token budget
BACKGROUND_MEAN, BACKGROUND_REVERSION, BACKGROUND_STEP = 0.1, 0.01, 0.02


# --------------------------------------------------------------------------- the hidden world

@dataclass
class Hidden:
    """A device's true latency model (the policies never see this)."""

    name: str
    slots: int
    init: float                 # s
    prefill: float              # s per 1000 prompt tokens
    decode: float               # s per 1000 generated tokens
    contention: float = 0.15    # slowdown per extra concurrent job
    noise: float = 0.15         # lognormal sigma
    mem_mb: float = 8000.0
    slow: float = 1.0           # drift multiplier

    def mean_service(self, prompt: float, new: float, running: int, background: float) -> float:
        base = self.init + self.prefill * prompt / 1000 + self.decode * new / 1000
        return base * (1 + self.contention * running) * (1 + background) * self.slow


def reference_fleet() -> list[Hidden]:
    """Six CPU devices 5x apart in speed, with different prefill/decode balances."""
    return [
        Hidden("workstation", 2, init=0.3, prefill=0.4, decode=4.0),
        Hidden("laptop", 1, init=0.5, prefill=0.8, decode=6.0),
        Hidden("mini-pc", 1, init=0.6, prefill=0.6, decode=9.0),      # quick prefill, slow decode
        Hidden("phone", 1, init=0.8, prefill=2.5, decode=10.0, mem_mb=3000),
        Hidden("board", 1, init=1.0, prefill=3.0, decode=14.0, mem_mb=2000),
        Hidden("old-pi", 1, init=1.5, prefill=4.0, decode=20.0, mem_mb=1500),
    ]


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
    expected: float = 0.0        # the node's own estimate when it was queued (for backlog)
    x: tuple[float, ...] | None = None
    explore: bool = False


class Device:
    """One simulated node: the hidden model, its FIFO queue, and the node's own code."""

    def __init__(self, hidden: Hidden, rng: np.random.Generator):
        self.h = hidden
        self.rng = rng
        self.record = ServiceRecord(HALF_LIFE)
        self.queue: deque[Job] = deque()
        self.running: list[Job] = []
        self.background = BACKGROUND_MEAN
        self.online = True

    # what the node advertises ------------------------------------------------------------
    def expected(self, job: Job) -> float:
        return self.record.expected("cpu", job.prompt, job.max_new, UNKNOWN_JOB_S)

    def backlog(self, now: float) -> float:
        running_left = [remaining(j.expected, now - j.start) for j in self.running]
        return expected_wait(self.h.slots, running_left, (j.expected for j in self.queue))

    def snapshot(self, now: float) -> Snapshot:
        busy = len(self.running)
        cpu = min(100.0, 100.0 * (busy / self.h.slots) * 0.8 + 100.0 * self.background)
        mem = self.h.mem_mb * (1 - 0.3 * busy / self.h.slots)
        temp = 45.0 + 35.0 * busy / self.h.slots
        return Snapshot(has_npu=False, npu_free=False, cpu_slots=self.h.slots, cpu_percent=cpu,
                        mem_available_mb=mem, load1=float(busy), queue_depth=busy + len(self.queue),
                        temperature_c=temp, backlog_s=self.backlog(now))

    def offer(self, job: Job, now: float) -> Offer:
        estimate = self.record.estimate("cpu", job.prompt, job.max_new)
        return Offer(self.h.name, self.snapshot(now), service_s=estimate[0] if estimate else None,
                     service_n=estimate[1] if estimate else 0)

    # what really happens -----------------------------------------------------------------
    def true_wait_and_service(self, job: Job, now: float) -> float:
        """For the oracle: when ``job`` would finish if sent here now. The oracle sees the
        true state (when each running job will really end) and the hidden model (the
        expected time of everything not yet started)."""
        free = [j.end - now for j in self.running] + [0.0] * (self.h.slots - len(self.running))
        busy = len(self.running)
        for q in self.queue:
            i = min(range(self.h.slots), key=free.__getitem__)
            free[i] += self._expected_true(q, min(busy, self.h.slots - 1))
        wait = min(free)
        return wait + self._expected_true(job, min(busy + len(self.queue), self.h.slots - 1))

    def _expected_true(self, job: Job, others: int) -> float:
        return self.h.mean_service(job.prompt, (1 + FILL_LOW) / 2 * job.max_new, max(others, 0), self.background)

    def drift_background(self, rng: np.random.Generator) -> None:
        """Other programs come and go: a mean-reverting walk, one step per arrival."""
        step = BACKGROUND_REVERSION * (BACKGROUND_MEAN - self.background) + rng.normal(0, BACKGROUND_STEP)
        self.background = float(np.clip(self.background + step, 0.0, 0.6))

    def admit(self, job: Job) -> None:
        job.expected = self.expected(job)
        self.queue.append(job)

    def start_ready(self, now: float) -> list[Job]:
        """Start queued jobs on free slots; returns them with their end times set."""
        started = []
        while self.queue and len(self.running) < self.h.slots:
            job = self.queue.popleft()
            mean = self.h.mean_service(job.prompt, job.new, len(self.running), self.background)
            job.start = now
            job.end = now + mean * float(self.rng.lognormal(0.0, self.h.noise))
            self.running.append(job)
            started.append(job)
        return started

    def finish(self, job: Job) -> None:
        self.running.remove(job)
        self.record.observe("cpu", job.prompt, job.max_new, job.new, job.end - job.start)


# --------------------------------------------------------------------------- one run

@dataclass
class Scenario:
    name: str
    load: float
    jobs: int
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


def capacity(fleet: Sequence[Hidden]) -> float:
    """Jobs per second the fleet can serve at the mean job size, without contention."""
    mean_prompt, mean_new = 600.0, (1 + FILL_LOW) / 2 * 160.0
    return sum(h.slots / h.mean_service(mean_prompt, mean_new, 0, BACKGROUND_MEAN) for h in fleet)


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
        prompt = int(math.exp(rng.uniform(math.log(50), math.log(2000))))
        max_new = int(math.exp(rng.uniform(math.log(16), math.log(512))))
        jobs.append(Job(i, t, prompt, max_new, max(1, int(max_new * rng.uniform(FILL_LOW, 1.0))),
                        origin=int(rng.integers(ORCHESTRATORS))))
    return jobs


def simulate(policy: str, scenario: Scenario, seed: int, *, shared_learning: bool = False,
             trust_node: bool = True) -> Run:
    """One policy on one scenario and seed. ``shared_learning``: every orchestrator trains
    on every finished job (nodes publishing observations); ``trust_node``: bids carry
    the node's own service estimate (else None, as a node that never reports)."""
    world = np.random.default_rng(seed)
    fleet = reference_fleet()
    late = Hidden("new-laptop", 1, init=0.3, prefill=0.5, decode=4.5)
    devices = {h.name: Device(h, np.random.default_rng([seed, i])) for i, h in enumerate(fleet + [late])}
    devices[late.name].online = scenario.join_at is None
    jobs = workload(world, scenario, fleet)
    arms = [Arms() for _ in range(ORCHESTRATORS)]
    gamma = decay_for(HALF_LIFE)
    decide_rng = np.random.default_rng(seed + 1000)
    run = Run()
    events: list[tuple[float, int, int, Job]] = []   # (time, kind 0=finish/1=arrive, seq, job)
    seq = 0
    for job in jobs:
        heapq.heappush(events, (job.arrival, 1, seq, job))
        seq += 1
    done = 0
    quickest = fastest(fleet)
    while events:
        now, kind, _, job = heapq.heappop(events)
        if kind == 0:
            dev = devices[job.device]
            dev.finish(job)
            run.latencies[job.jid] = job.end - job.arrival
            service = job.end - job.start
            learners = arms if shared_learning else [arms[job.origin]]
            for learner in learners:
                assert job.x is not None
                learner.train(job.device, np.array(job.x), training_target(True, service, CAP_S), str(job.jid),
                              now, lam=LAMBDA, gamma=gamma)
            done += 1
            for started in dev.start_ready(now):
                heapq.heappush(events, (started.end, 0, seq, started))
                seq += 1
            continue
        # an arrival: world changes first, then the auction
        _world_changes(scenario, job.jid, devices, quickest, late.name)
        online = [d for d in devices.values() if d.online]
        for d in online:
            d.drift_background(world)
        offers = [d.offer(job, now) for d in online]
        if not trust_node:
            offers = [Offer(o.device, o.snapshot) for o in offers]
        mine = arms[job.origin]
        t0 = time.perf_counter()
        decision = select(offers, mine.arms, prompt_tokens=job.prompt, max_new_tokens=job.max_new,
                          alpha=ALPHA, lam=LAMBDA, policy=policy, exploring=mine.exploring_now(now),
                          rng=decide_rng, cursor=mine.cursor)
        run.decide_us.append((time.perf_counter() - t0) * 1e6)
        mine.cursor = decision.cursor
        choice = decision.winner
        assert choice is not None
        if policy == "oracle":
            raise AssertionError("the oracle is not a select() policy")
        expected = {d.h.name: d.true_wait_and_service(job, now) for d in online}
        best = min(expected.values())
        run.regret.append(expected[choice.device] - best)
        run.best.append(best)
        run.chosen.append(choice.device)
        run.latencies.append(math.nan)
        job.device, job.x, job.explore = choice.device, choice.x, choice.explore
        if choice.explore:
            mine.exploring[choice.device] = (str(job.jid), math.inf)
        dev = devices[choice.device]
        dev.admit(job)
        for started in dev.start_ready(now):
            heapq.heappush(events, (started.end, 0, seq, started))
            seq += 1
    return run


def simulate_oracle(scenario: Scenario, seed: int) -> Run:
    """The same workload, each job sent where its true expected completion is earliest."""
    world = np.random.default_rng(seed)
    fleet = reference_fleet()
    late = Hidden("new-laptop", 1, init=0.3, prefill=0.5, decode=4.5)
    devices = {h.name: Device(h, np.random.default_rng([seed, i])) for i, h in enumerate(fleet + [late])}
    devices[late.name].online = scenario.join_at is None
    jobs = workload(world, scenario, fleet)
    run = Run(latencies=[math.nan] * len(jobs))
    events: list[tuple[float, int, int, Job]] = [(j.arrival, 1, j.jid, j) for j in jobs]
    heapq.heapify(events)
    seq = len(jobs)
    quickest = fastest(fleet)
    while events:
        now, kind, _, job = heapq.heappop(events)
        if kind == 0:
            dev = devices[job.device]
            dev.finish(job)
            run.latencies[job.jid] = job.end - job.arrival
            for started in dev.start_ready(now):
                heapq.heappush(events, (started.end, 0, seq, started))
                seq += 1
            continue
        _world_changes(scenario, job.jid, devices, quickest, late.name)
        online = [d for d in devices.values() if d.online]
        for d in online:
            d.drift_background(world)
        expected = {d.h.name: d.true_wait_and_service(job, now) for d in online}
        target = min(expected, key=expected.__getitem__)
        run.best.append(expected[target])
        run.regret.append(0.0)
        run.chosen.append(target)
        job.device = target
        dev = devices[target]
        dev.admit(job)
        for started in dev.start_ready(now):
            heapq.heappush(events, (started.end, 0, seq, started))
            seq += 1
    return run


def fastest(fleet: Sequence[Hidden]) -> str:
    return min(fleet, key=lambda h: h.mean_service(600, 128, 0, 0.0) / h.slots).name


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


def decision_time_us(policy: str, n_offers: int = 32, repeats: int = 300) -> float:
    """One select() with ``n_offers`` trained arms, median µs."""
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
        t0 = time.perf_counter()
        select(offers, arms.arms, prompt_tokens=500, max_new_tokens=128, alpha=ALPHA, lam=LAMBDA,
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
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 seed, 300 jobs, 70%% load only: a smoke run")
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--loads", default="0.3,0.7,0.9")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--scenarios", default="steady,burst,drift,churn")
    ap.add_argument("--variants", action="store_true",
                    help="also run linucb without node estimates and with fleet-wide learning")
    ap.add_argument("--out", default=None, help="directory for report.md, results.json and PNG plots")
    args = ap.parse_args(argv)
    if args.quick:
        args.jobs, args.seeds, args.loads, args.scenarios = 300, 1, "0.7", "steady"
    policies = [p for p in args.policies.split(",") if p]
    variants: list[tuple[str, str, dict[str, bool]]] = [(p, p, {}) for p in policies]
    if args.variants:
        variants += [("linucb, no node estimates", "linucb", {"trust_node": False}),
                     ("linucb, fleet-wide learning", "linucb", {"shared_learning": True})]
    results: dict[str, Any] = {"defaults": {"alpha": ALPHA, "lambda": LAMBDA, "half_life_jobs": HALF_LIFE},
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
            row["decide_us_p50"] = statistics.median(x for r in runs for x in r.decide_us)
            rows[label] = row
            runs_for_plots[sc.name][label] = runs
            print(f"  … {sc.name:<30} {label:<30} mean {row['mean']:7.2f} s  x oracle {row['ratio']:.2f}",
                  file=sys.stderr, flush=True)
        results["scenarios"][sc.name] = rows
    results["decision_time_us_32_offers"] = {p: round(decision_time_us(p), 1) for p in policies}
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
    lines = [f"Seeds: {results['seeds']}, jobs per run: {results['jobs']}; defaults "
             f"alpha={ALPHA}, lambda={LAMBDA}, half_life_jobs={HALF_LIFE}. Means exclude the first "
             f"{int(WARMUP_SHARE * 100)} % of jobs; latency in seconds. Cold start: extra mean latency "
             "over the first 100 jobs of a fleet nobody has learnt yet, against the oracle. Drift "
             "recovery: median jobs after the slowdown until decisions are back within 10 % of the "
             "pre-drift gap. Left idle: devices the oracle uses that the policy (almost) never does.", ""]
    for name, rows in results["scenarios"].items():
        lines += [f"### {name}", "",
                  "| policy | mean | p95 | p99 | x oracle | vs jsq | vs round_robin | cold start | drift recovery "
                  "| left idle |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        jsq = rows.get("jsq", {}).get("mean")
        rr = rows.get("round_robin", {}).get("mean")
        for label, r in rows.items():
            def vs(base: float | None, r: dict[str, Any] = r, label: str = label) -> str:
                return "" if base is None or label == "oracle" else f"{(1 - r['mean'] / base) * 100:+.0f} %"
            drift = r.get("drift_recovery_jobs")
            drift_s = "" if "drift_recovery_jobs" not in r else (
                f"{drift:.0f} jobs" if drift is not None else "not recovered")
            cold = "" if "cold_start_cost" not in r else f"{r['cold_start_cost'] * 100:+.0f} %"
            idle = "" if label == "oracle" else (", ".join(r["left_idle"]) or "none")
            lines.append(f"| {label} | {r['mean']:.2f} | {r['p95']:.2f} | {r['p99']:.2f} | {r['ratio']:.2f} | "
                         f"{vs(jsq)} | {vs(rr)} | {cold} | {drift_s} | {idle} |")
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
