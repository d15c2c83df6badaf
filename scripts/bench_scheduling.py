"""Scheduling on the wire: every auction.policy, real node daemons, a real broker.

    scripts/bench --scheduling [--jobs 300] [--load 0.7] [--policies linucb,jsq,...]

A check that the simulator's story (scripts/simulate) holds over MQTT. Five simulated
CPU devices, 5x apart in speed, run as real node daemons; three of them also take
prompts on their trigger topics, the way Home Assistant sends them. Prompts of varied
length arrive as a Poisson stream at the given share of the fleet's capacity, and each
answer's latency is the orchestrating node's own figure (trigger received → answer in,
``last_result.total_ms``). The fleet starts from nothing for every policy: no arm store,
no service record, so each run includes its policy's cold start.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.bus import Bus, Message, new_nonce
from agent.config import BrokerConfig
from agent.topics import Topics
from tests.support.launch import ArrivalWatch, NodeProcess, node_doc, write_config

# (device, base_ms, ms_per_token): the sim executor's latency is base + per-token × words.
DEVICES = [("fast", 20, 1.0), ("quick", 30, 1.5), ("middle", 45, 2.0), ("slow", 65, 3.0), ("slowest", 100, 5.0)]
ORCHESTRATORS = ("middle", "slow", "slowest")
WORDS = (8, 120)  # prompt length range, in words (the sim echoes the prompt)


def expected_ms(base: float, per_token: float, words: float) -> float:
    return base + per_token * words


def capacity_per_s() -> float:
    mean_words = sum(WORDS) / 2
    return sum(1000.0 / expected_ms(b, t, mean_words) for _, b, t in DEVICES)


class Answers:
    """Every live answer on the orchestrators' last_result topics."""

    def __init__(self, port: int, topics: Topics):
        self._lock = threading.Lock()
        self.items: list[dict[str, Any]] = []
        self.count = threading.Semaphore(0)
        nonce = new_nonce()
        self.bus = Bus(f"bench-answers-{nonce}", BrokerConfig(port=port), persistent=False, name="answers",
                       sync_topic=topics.sync("bench", nonce))
        for dev in ORCHESTRATORS:
            self.bus.subscribe(topics.last_result(dev), self._record)
        self.bus.connect(10)

    def _record(self, msg: Message) -> None:
        if msg.retain:
            return
        with self._lock:
            self.items.append(json.loads(msg.payload))
        self.count.release()

    def close(self) -> None:
        self.bus.stop()


def run_policy(policy: str, port: int, workdir: Path, jobs: int, load: float, seed: int) -> dict[str, Any]:
    prefix = f"sched/{policy}-{new_nonce()}/"
    topics = Topics(prefix)
    arrivals = ArrivalWatch("127.0.0.1", port, prefix)
    nodes = []
    try:
        for dev, base, per_token in DEVICES:
            doc = node_doc(dev, port=port, prefix=prefix, state_dir=workdir / policy / dev,
                           cpu={"kind": "sim", "base_ms": base, "ms_per_token": per_token, "seed": seed},
                           auction={"policy": policy, "bid_timeout_s": 5},
                           triggers={"workers": 64, "max_waiting": 1024}, metrics_interval_s=5)
            node = NodeProcess(write_config(workdir / f"{policy}-{dev}.yaml", doc), dev, arrivals=arrivals,
                               log=workdir / f"{policy}-{dev}.log")
            node.start(timeout=60)
            nodes.append(node)
        answers = Answers(port, topics)
        rng = random.Random(seed)
        rate = capacity_per_s() * load
        sender = Bus(f"bench-sender-{new_nonce()}", BrokerConfig(port=port), persistent=False, name="sender",
                     sync_topic=topics.sync("bench-sender", new_nonce()))
        sender.connect(10)
        start = time.monotonic()
        due = start
        for i in range(jobs):
            due += rng.expovariate(rate)
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)  # the arrival process itself: a benchmark's clock, not a test's
            words = rng.randint(*WORDS)
            prompt = " ".join(f"w{i}-{k}" for k in range(words))
            sender.publish(topics.trigger(rng.choice(ORCHESTRATORS)),
                           json.dumps({"prompt": prompt, "max_new_tokens": words}).encode())
        for _ in range(jobs):
            if not answers.count.acquire(timeout=120):
                break
        wall = time.monotonic() - start
        sender.stop()
        answers.close()
    finally:
        for node in nodes:
            node.stop()
        arrivals.close()
    done = [a for a in answers.items if a.get("ok")]
    latencies = sorted(a["total_ms"] for a in done)
    winners = Counter(a["winner"] for a in done)
    return {"policy": policy, "answered": len(done), "failed": len(answers.items) - len(done), "jobs": jobs,
            "mean_ms": statistics.fmean(latencies) if latencies else math.nan,
            "p95_ms": latencies[int(0.95 * (len(latencies) - 1))] if latencies else math.nan,
            "share": {d: round(winners[d] / max(len(done), 1), 3) for d, _, _ in DEVICES},
            "wall_s": round(wall, 1)}


def measure_scheduling(port: int, workdir: Path, *, jobs: int, load: float, policies: Sequence[str],
                       seed: int = 1) -> list[dict[str, Any]]:
    results = []
    for policy in policies:
        print(f"  … scheduling: {policy}, {jobs} prompts at {load:.0%} load", file=sys.stderr, flush=True)
        results.append(run_policy(policy, port, workdir, jobs, load, seed))
    return results


def print_scheduling(results: Sequence[dict[str, Any]], load: float) -> None:
    print(f"\nscheduling over MQTT: {len(DEVICES)} sim devices 5x apart, Poisson prompts at {load:.0%} of capacity, "
          f"each policy from a cold start\n")
    print(f"{'policy':<14} {'answered':>9} {'mean ms':>9} {'p95 ms':>9}   share of jobs " +
          " ".join(f"{d:>7}" for d, _, _ in DEVICES))
    bases = {p: next((r["mean_ms"] for r in results if r["policy"] == p), None) for p in ("least_backlog", "jsq")}
    for r in results:
        # How much lower the mean latency is than each baseline's, in the same run.
        vs = "".join(f" ({(1 - r['mean_ms'] / base) * 100:+.0f} % vs {p})" for p, base in bases.items()
                     if base and r["policy"] != p)
        print(f"{r['policy']:<14} {r['answered']:>5}/{r['jobs']:<3} {r['mean_ms']:>9.0f} {r['p95_ms']:>9.0f}   "
              + " " * 14 + " ".join(f"{r['share'][d]:>7.2f}" for d, _, _ in DEVICES) + vs)
