"""Invited auctions at scale: is the decision as good as calling everyone?

    scripts/simulate_invite [--quick] [--devices 1000] [--jobs N] [--seeds 2]
                            [--loads 0.3,0.7,0.9] [--invite 12,6] [--also 0,10]
                            [--metrics-s 10] [--spread 2] [--warm] [--metrics-only] [--unshaped]
                            [--json FILE]

No MQTT, no threads, no sleeping: the discrete-event world of ``scripts/simulate`` (its
hidden device models, the node's own service and start-up records, the orchestrators'
own LinUCB arms, ``agent.selection.select``) on a large fleet drawn from its six device
kinds (the honest world: a workstation down to an old Pi, about 5x apart). The same
workload (same seed) runs under two policies:

- everyone: every job's auction hears a bid from every device (the seed's call to all);
- invite k,d: ``agent.invite.choose`` picks whom to call, exactly as the orchestrator
  does past ``auction.invite.above``: from the retained metrics each device publishes as
  a node does — every ``--metrics-s`` seconds, and in a fleet at or below
  ``auction.invite.above`` (100) also when a job of its own starts or ends (at most every
  0.2 s; the refresh then comes ``--metrics-s`` after the last; ``--on-change`` and
  ``--periodic-only`` force either way whatever the fleet's size) —
  with its backlog in seconds (aged by the metrics' age, as the node does), its median
  recent latency and each model's ``warm`` flag (a cold one is charged its start-up);
  and from each asker's own memory of the bids it
  received and the jobs it sent since (``agent.invite.AskerMemory``, which prices each
  device for the job's size by the shape of its bids), the k best and d at random; only
  they bid, with their live state, and ``select`` ranks their bids. ``--unshaped`` adds
  the policy whose memory priced a device by its last bid's figure whatever the job's
  size; ``--metrics-only`` the policy as first shipped: the metrics alone, not aged.

A thousand devices and three jobs each is a fleet of cold models (every first job loads
its model: seconds); ``--warm`` starts every device with its model loaded, for both
policies alike, as after each device's first job.

Three orchestrators each keep their own arms, as in ``scripts/simulate``. Other programs'
background load moves once a simulated second (not once per arrival: at a thousand
devices that would be most of the run). Means leave out the first 10 % of jobs (cold
start). The report prints, per load, each policy's mean and p95 latency, its mean as a
share of calling everyone's, and the calls for bids per job (everyone: one per device).
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
sys.path.insert(0, str(REPO / "scripts"))

import numpy as np  # noqa: E402
from simulate import (  # noqa: E402
    ALPHA,
    BACKGROUND_MEAN,
    BACKGROUND_REVERSION,
    BACKGROUND_STEP,
    CAP_S,
    HALF_LIFE,
    LAMBDA,
    ORCHESTRATORS,
    WARMUP_SHARE,
    Device,
    Hidden,
    Job,
    Scenario,
    reference_fleet,
    workload,
)

from agent.config import DEFAULT_METRICS_INTERVAL_S, InviteConfig  # noqa: E402
from agent.invite import SPREAD, AskerMemory, Rows, choose  # noqa: E402
from agent.linucb import Arms, residual_target  # noqa: E402
from agent.messages import LatencySummary, ModelInfo, Snapshot  # noqa: E402
from agent.presence import METRICS_MIN_GAP_S  # noqa: E402
from agent.selection import select  # noqa: E402
from agent.servicemodel import decay_for  # noqa: E402

PAST_JOBS = 3        # --warm: jobs each device has run on its own before the run (its own records)
RECENT = 20          # jobs in a node's recent-latency window (what its metrics summarise)
ARRIVAL, DONE, METRICS, BACKGROUND, CHANGED = 1, 0, 2, 3, 4


def big_fleet(n: int) -> list[Hidden]:
    """``n`` devices, the reference kinds in turn (about one in six of each)."""
    kinds = reference_fleet("honest")
    return [replace(kinds[i % len(kinds)], name=f"{kinds[i % len(kinds)].name}-{i:04d}", link={})
            for i in range(n)]


@dataclass
class Policy:
    label: str
    invite: tuple[int, int] | None   # (k, d); None: everyone
    memory: bool = True              # each asker remembers the bids it got and the jobs it sent (AskerMemory)
    spread: int = SPREAD
    aged: bool = True                # the metrics' backlog less their age
    shaped: bool = True              # the memory prices each device for the job's size (its bids' shape)


@dataclass
class Result:
    latencies: list[float] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)    # calls for bids per job
    sent: list[tuple[float, str, bool]] = field(default_factory=list)  # (when, device, for a change): metrics
    changed: list[tuple[float, str]] = field(default_factory=list)     # (when, device): a job started or ended
    seconds: float = 0.0     # simulated, to the last arrival

    @property
    def changes(self) -> int:
        """Metrics sent for a job's change of state."""
        return sum(change for _, _, change in self.sent)

    @property
    def refreshes(self) -> int:
        """Metrics sent on the interval."""
        return len(self.sent) - self.changes


def run(policy: Policy, devices_n: int, jobs_n: int, load: float, seed: int, metrics_s: float,
        warm: bool = False, on_change: bool = True) -> Result:
    fleet = big_fleet(devices_n)
    world = np.random.default_rng(seed)
    devices = {h.name: Device(h, np.random.default_rng([seed, i])) for i, h in enumerate(fleet)}
    jobs = workload(world, Scenario(f"{load}", load, jobs_n), fleet)
    if warm:  # as after a few jobs of each device's own: its model loaded, its own records kept
        past = np.random.default_rng(seed + 4000)
        for dev in devices.values():
            for _ in range(PAST_JOBS):
                old = jobs[int(past.integers(len(jobs)))] if jobs else None
                if old is None:
                    break
                noise = float(past.lognormal(0.0, dev.h.noise))
                work = dev.h.work(old.prompt, old.new, 0, BACKGROUND_MEAN) * noise
                dev.init_cost.observe("cpu", False, dev.h.load, old.prompt)
                dev.init_cost.observe("cpu", True, dev.h.init, old.prompt)
                dev.record.observe("cpu", old.prompt, old.max_new, old.new, work)
            dev.warm_until = dev.h.keep_warm_s
    arms = [Arms() for _ in range(ORCHESTRATORS)]
    gamma = decay_for(HALF_LIFE)
    decide_rng = np.random.default_rng(seed + 1000)
    invite_rng = np.random.default_rng(seed + 2000)
    recent: dict[str, deque[float]] = {name: deque(maxlen=RECENT) for name in devices}
    view: dict[str, Snapshot | None] = dict.fromkeys(devices)   # the retained metrics every asker sees
    sent_at: dict[str, float] = {}                                  # when each was published
    memory = [AskerMemory() for _ in range(ORCHESTRATORS)]
    rows = [Rows() for _ in range(ORCHESTRATORS)]                   # each asker's view, kept between choices
    out = Result(latencies=[math.nan] * len(jobs))
    events: list[tuple[float, int, int, Any]] = [(j.arrival, ARRIVAL, j.jid, j) for j in jobs]
    seq = len(jobs)
    phase = np.random.default_rng(seed + 3000).uniform(0, metrics_s, len(fleet))
    for i, h in enumerate(fleet):
        events.append((float(phase[i]), METRICS, seq, (h.name, 0)))
        seq += 1
    events.append((1.0, BACKGROUND, seq, None))
    seq += 1
    heapq.heapify(events)
    end = jobs[-1].arrival if jobs else 0.0
    out.seconds = end

    # Each device's metrics sent so far: an event scheduled before the last one is stale
    # (the node's loop waits a whole interval after any publish, and a change it had
    # pending went out with it).
    published = dict.fromkeys(devices, 0)

    def publish(name: str, now: float, change: bool) -> None:
        nonlocal seq
        dev = devices[name]
        window = sorted(recent[name])
        summary = {"cpu": LatencySummary(len(window), window[len(window) // 2] * 1000)} if window else {}
        view[name] = replace(dev.snapshot(now), recent=summary, models={"cpu": ModelInfo("sim", warm=dev.warm(now))})
        sent_at[name] = now
        published[name] += 1
        if now <= end:
            out.sent.append((now, name, change))
            heapq.heappush(events, (now + metrics_s, METRICS, seq, (name, published[name])))
            seq += 1

    def changed(name: str, now: float) -> None:
        """As a node: a job's change of state goes out at once, at most once per
        METRICS_MIN_GAP_S (a burst of changes is one message)."""
        nonlocal seq
        if on_change:
            if now <= end:
                out.changed.append((now, name))
            at = max(now, sent_at.get(name, -math.inf) + METRICS_MIN_GAP_S)
            heapq.heappush(events, (at, CHANGED, seq, (name, published[name])))
            seq += 1

    def start(dev: Device, now: float) -> None:
        nonlocal seq
        for started in dev.start_ready(now):
            heapq.heappush(events, (started.end, DONE, seq, started))
            seq += 1

    while events:
        now, kind, _, item = heapq.heappop(events)
        if kind in (CHANGED, METRICS):
            name, after = item
            if after != published[name]:
                continue  # stale: metrics went out since
            publish(name, now, kind == CHANGED)
            continue
        if kind == BACKGROUND:
            steps = world.normal(0, BACKGROUND_STEP, len(devices))
            for dev, step in zip(devices.values(), steps.tolist(), strict=True):
                dev.background = float(np.clip(dev.background + BACKGROUND_REVERSION * (BACKGROUND_MEAN
                                                                                       - dev.background) + step,
                                                0.0, 0.6))
            if now < end:
                heapq.heappush(events, (now + 1.0, BACKGROUND, seq, None))
                seq += 1
            continue
        job: Job = item
        if kind == DONE:
            dev = devices[job.device]
            dev.finish(job, now)
            recent[job.device].append(job.end - job.start)
            seen = job.end - job.arrival
            out.latencies[job.jid] = seen
            assert job.x is not None
            y = None if job.promise is None else residual_target(True, seen - (job.start - job.arrival), CAP_S,
                                                                 job.promise)
            arms[job.origin].train(job.device, np.array(job.x), y, str(job.jid), now, lam=LAMBDA, gamma=gamma,
                                   base=job.promise or 0.0)
            start(dev, now)
            changed(job.device, now)
            continue
        # an arrival: whom to ask, their bids, the decision
        if policy.invite is None:
            asked = list(devices)
        else:
            k, d = policy.invite
            mem = memory[job.origin]
            asked = list(choose(view, me=f"asker-{job.origin}", best=k, explore=d, rng=invite_rng,
                                known_s=(mem.known_s(now, job.prompt if policy.shaped else None, job.max_new)
                                         if policy.memory else None),
                                startup_s=mem.startup_s() if policy.memory else None,
                                sent_s=sent_at if policy.aged else None, now=now, rows=rows[job.origin],
                                spread=policy.spread).devices)
        out.calls.append(len(asked))
        offers = [devices[name].offer(job, now) for name in asked]
        if policy.invite is not None:
            for o in offers:
                memory[job.origin].heard(o.device, now, backlog_s=o.snapshot.backlog_s, service_s=o.service_s,
                                         init_s=o.init_s, slots=o.snapshot.cpu_slots, prompt_tokens=job.prompt,
                                         max_new_tokens=job.max_new)
        mine = arms[job.origin]
        decision = select(offers, mine.arms, prompt_tokens=job.prompt, max_new_tokens=job.max_new, alpha=ALPHA,
                          lam=LAMBDA, exploring=mine.exploring_now(now), rng=decide_rng)
        choice = decision.winner
        assert choice is not None
        job.device, job.x, job.explore, job.promise = choice.device, choice.x, choice.explore, choice.promise
        if choice.explore:
            mine.exploring[choice.device] = (str(job.jid), math.inf)
        dev = devices[choice.device]
        if choice.promise is not None:
            memory[job.origin].sent(choice.device, now, choice.promise)
        dev.admit(job, now)
        start(dev, now)
        changed(choice.device, now)
    return out


def summarise(result: Result) -> dict[str, float]:
    lat = [x for x in result.latencies[int(len(result.latencies) * WARMUP_SHARE):] if not math.isnan(x)]
    return {"mean": statistics.fmean(lat), "p95": float(np.percentile(lat, 95)),
            "calls_per_job": statistics.fmean(result.calls),
            "metrics_per_s": len(result.sent) / result.seconds if result.seconds else 0.0,
            "answered": sum(not math.isnan(x) for x in result.latencies),
            "jobs": len(result.latencies)}


def pair(text: str) -> tuple[int, int]:
    k, _, d = text.partition(",")
    try:
        out = int(k), int(d)
    except ValueError:
        raise argparse.ArgumentTypeError(f"want k,d (two integers), got {text!r}") from None
    if min(out) < 0 or sum(out) == 0:
        raise argparse.ArgumentTypeError(f"k and d must be >= 0 and not both 0, got {text!r}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="60 devices, 600 jobs, 1 seed, 70%% load: a smoke run")
    ap.add_argument("--devices", type=int, default=1000, help="fleet size (default 1000)")
    ap.add_argument("--jobs", type=int, default=None, help="jobs per run (default 10 per device)")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--loads", default="0.3,0.7,0.9", help="shares of the fleet's capacity")
    ap.add_argument("--invite", type=pair, default=(12, 6), help="k,d of the invited policy (default 12,6)")
    ap.add_argument("--also", type=pair, action="append", default=[],
                    help="another k,d to compare (repeatable; 0,10: ten at random)")
    ap.add_argument("--metrics-only", action="store_true",
                    help="also run each invited policy from the retained metrics alone, as first shipped: no "
                         "asker memory (agent.invite.AskerMemory), metrics not aged")
    ap.add_argument("--unshaped", action="store_true",
                    help="also run each invited policy with the asker's memory pricing every device by its last "
                         "bid's service figure, whatever the job's size, as before the bids' shape was fitted")
    ap.add_argument("--spread", type=int, default=SPREAD,
                    help=f"draw the k best among spread*k (default {SPREAD}, as agent.invite)")
    ap.add_argument("--warm", action="store_true",
                    help="start every device as after a few jobs of its own (both policies alike): its model "
                         "loaded, its own service and start-up records kept; a short run at a thousand devices "
                         "otherwise never gets past each device's first, cold, unknown job")
    ap.add_argument("--metrics-s", type=float, default=DEFAULT_METRICS_INTERVAL_S,
                    help="how often each device sends its metrics again, nothing having changed (default "
                         "%(default)g, the shipped metrics_interval_s)")
    changes = ap.add_mutually_exclusive_group()
    changes.add_argument("--periodic-only", action="store_true",
                         help="metrics only every --metrics-s, whatever the fleet's size (a node does so past "
                              "auction.invite.above online devices; the default: as a node does)")
    changes.add_argument("--on-change", action="store_true",
                         help="metrics also at once when a job starts or ends, whatever the fleet's size (a node "
                              "does so at or below auction.invite.above online devices)")
    ap.add_argument("--json", default=None, help="write the results here too")
    args = ap.parse_args(argv)
    if args.quick:
        args.devices, args.jobs, args.seeds, args.loads = 60, 600, 1, "0.7"
    if args.devices < 1 or args.seeds < 1 or args.metrics_s <= 0:
        ap.error("--devices and --seeds must be >= 1, --metrics-s > 0")
    jobs = args.jobs or 10 * args.devices
    # as a node does: a job's change goes out at once only in a fleet at or below the threshold
    on_change = args.on_change or (not args.periodic_only and not InviteConfig().past(args.devices))
    pairs = [args.invite, *args.also]
    policies = [Policy("everyone", None)] + [Policy(f"invite k={k} d={d}", (k, d), spread=args.spread)
                                             for k, d in pairs]
    if args.unshaped:
        policies += [Policy(f"invite k={k} d={d}, unshaped", (k, d), shaped=False, spread=args.spread)
                     for k, d in pairs]
    if args.metrics_only:
        policies += [Policy(f"invite k={k} d={d}, metrics only", (k, d), memory=False, aged=False,
                            spread=args.spread) for k, d in pairs]
    loads = [float(x) for x in args.loads.split(",")]
    results: dict[str, Any] = {"devices": args.devices, "jobs": jobs, "seeds": args.seeds,
                               "metrics_s": args.metrics_s, "on_change": on_change, "warm": args.warm,
                               "spread": args.spread, "loads": {}}
    began = time.perf_counter()
    for load in loads:
        rows: dict[str, dict[str, float]] = {}
        for policy in policies:
            sums = [summarise(run(policy, args.devices, jobs, load, seed, args.metrics_s, args.warm, on_change))
                    for seed in range(args.seeds)]
            rows[policy.label] = {key: statistics.fmean(s[key] for s in sums) for key in sums[0]}
            rows[policy.label]["answered"] = sum(s["answered"] for s in sums)
            rows[policy.label]["jobs"] = sum(s["jobs"] for s in sums)
            print(f"  … {int(load * 100)}% {policy.label:<20} mean {rows[policy.label]['mean']:.3f} s",
                  file=sys.stderr, flush=True)
        base = rows["everyone"]["mean"]
        for row in rows.values():
            row["vs_everyone"] = row["mean"] / base
        results["loads"][f"{int(round(load * 100))}%"] = rows
    results["wall_s"] = round(time.perf_counter() - began, 1)
    print(render(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def render(results: dict[str, Any]) -> str:
    lines = [f"{results['devices']} devices, {results['jobs']} jobs per run, {results['seeds']} seed(s), metrics "
             f"every {results['metrics_s']:g} s{' and on each change' if results.get('on_change') else ''}, "
             f"{'warm' if results.get('warm') else 'cold'} start, "
             f"spread {results.get('spread', SPREAD)}; latency in seconds (first {int(WARMUP_SHARE * 100)} % of jobs "
             "left out); x everyone: the mean as a share of calling everyone's.", "",
             "| load | policy | mean | p95 | x everyone | calls per job | metrics per s | answered |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for load, rows in results["loads"].items():
        for label, r in rows.items():
            lines.append(f"| {load} | {label} | {r['mean']:.3f} | {r['p95']:.3f} | {r['vs_everyone']:.3f} | "
                         f"{r['calls_per_job']:.1f} | {r.get('metrics_per_s', math.nan):.1f} | "
                         f"{int(r['answered'])}/{int(r['jobs'])} |")
    lines.append(f"\n(simulated in {results['wall_s']} s of wall time)")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
