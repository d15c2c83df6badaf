"""Scheduling on the wire: every auction.policy, real node daemons, a real broker.

    scripts/bench --scheduling [--jobs 300] [--load 0.7] [--policies linucb,jsq,...]
                               [--world honest|ttft|thermal|link|real]

A check that the simulator's story (scripts/simulate) holds over MQTT. Five simulated
CPU devices, 5x apart in speed, run as real node daemons; three of them also take
prompts on their trigger topics, the way Home Assistant sends them. Prompts of varied
length arrive as a Poisson stream at the given share of the fleet's capacity, and each
answer's latency is the orchestrating node's own figure (trigger received → answer in,
``last_result.total_ms``). The fleet starts from nothing for every policy: no arm store,
no service record, so each run includes its policy's cold start.

Worlds (the ``sim`` executor's knobs; the simulator's worlds of the same names):

- honest: start-up and decode per token only, models kept warm;
- ttft: every device prefills its prompt (``ms_per_prompt_token``) and reports it inside
  ``init_ms`` (``ttft_init``, as llama-cli); two load the model for every job
  (``keep_warm_s: 0``, ``cold_ms``);
- thermal: the fastest device and the middle one throttle 2.5x when hot (``throttle``,
  ``heat_s``);
- link: the fastest device reaches the broker through a loopback TCP proxy that holds
  every chunk for ``LINK_MS`` each way (a slow link: its bids and answers arrive late,
  which its own estimates cannot see);
- real: all of the above at once.
"""

from __future__ import annotations

import json
import math
import queue
import random
import socket
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
from tests.support.launch import ArrivalWatch, NodeProcess, node_doc, stop_all, write_config

# (device, base_ms, ms_per_token): the sim executor's latency is base + per-token × words.
DEVICES = [("fast", 20, 1.0), ("quick", 30, 1.5), ("middle", 45, 2.0), ("slow", 65, 3.0), ("slowest", 100, 5.0)]
ORCHESTRATORS = ("middle", "slow", "slowest")
WORDS = (8, 120)  # prompt length range, in words (the sim echoes the prompt)
WORLDS = ("honest", "ttft", "thermal", "link", "real")
PREFILL_SHARE = 0.5       # ttft: prefill per prompt token, as a share of the device's decode per token
COLD_MS = 150.0           # ttft: loading the model
RELOADS = ("quick", "middle")   # ttft: these load the model for every job
THROTTLED = ("fast", "middle")  # thermal
THROTTLE, HEAT_S = 2.5, 5.0
LINK_MS = 150.0           # link: each way, per chunk, for the fastest device


def executor(world: str, device: str, base: float, per_token: float, seed: int) -> dict[str, Any]:
    """The sim executor section of one device in one world."""
    ex: dict[str, Any] = {"kind": "sim", "base_ms": base, "ms_per_token": per_token, "seed": seed}
    if world in ("ttft", "real"):
        ex.update(ms_per_prompt_token=PREFILL_SHARE * per_token, ttft_init=True, cold_ms=COLD_MS,
                  keep_warm_s=0 if device in RELOADS else 3600)
    if world in ("thermal", "real") and device in THROTTLED:
        ex.update(throttle=THROTTLE, heat_s=HEAT_S)
    return ex


def slow_link(world: str, device: str) -> bool:
    return world in ("link", "real") and device == DEVICES[0][0]


def expected_ms(base: float, per_token: float, words: float, world: str = "honest", device: str = "") -> float:
    """A job's expected time on one device (the prompt is ~1.3 tokens a word; the answer
    echoes the prompt), at the mean heat of a throttled device."""
    ms = base + per_token * words
    if world in ("ttft", "real"):
        ms += PREFILL_SHARE * per_token * 1.3 * words + (COLD_MS if device in RELOADS else 0.0)
    if world in ("thermal", "real") and device in THROTTLED:
        ms *= 1 + (THROTTLE - 1) / 2
    return ms


def capacity_per_s(world: str = "honest") -> float:
    mean_words = sum(WORDS) / 2
    return sum(1000.0 / expected_ms(b, t, mean_words, world, d) for d, b, t in DEVICES)


class DelayProxy:
    """A loopback TCP proxy to ``port`` that holds every chunk for ``delay_s`` each way:
    a slow link, without netem. Throughput is kept (chunks are queued with their due
    time, not sent one delay after another)."""

    def __init__(self, port: int, delay_s: float):
        self._target, self._delay = port, delay_s
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._socks: list[socket.socket] = []
        self._closed = threading.Event()
        threading.Thread(target=self._accept, name="delay-proxy", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
                upstream = socket.create_connection(("127.0.0.1", self._target))
            except OSError:
                return
            self._socks += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                held: queue.Queue[tuple[float, bytes]] = queue.Queue()
                threading.Thread(target=self._read, args=(src, held), daemon=True).start()
                threading.Thread(target=self._write, args=(dst, held), daemon=True).start()

    def _read(self, src: socket.socket, held: queue.Queue[tuple[float, bytes]]) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            held.put((time.monotonic() + self._delay, data))
            if not data:
                return

    def _write(self, dst: socket.socket, held: queue.Queue[tuple[float, bytes]]) -> None:
        while True:
            due, data = held.get()
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)  # the link's delay itself
            try:
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self._closed.set()
        for sock in [self._server, *self._socks]:
            try:
                sock.close()
            except OSError:
                pass


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


def run_policy(policy: str, port: int, workdir: Path, jobs: int, load: float, seed: int,
               world: str = "honest") -> dict[str, Any]:
    prefix = f"sched/{policy}-{new_nonce()}/"
    topics = Topics(prefix)
    arrivals = ArrivalWatch("127.0.0.1", port, prefix)
    nodes = []
    proxies: list[DelayProxy] = []
    try:
        for dev, base, per_token in DEVICES:
            node_port = port
            if slow_link(world, dev):
                proxies.append(DelayProxy(port, LINK_MS / 1000))
                node_port = proxies[-1].port
            doc = node_doc(dev, port=node_port, prefix=prefix, state_dir=workdir / policy / dev,
                           cpu=executor(world, dev, base, per_token, seed),
                           auction={"policy": policy, "bid_timeout_s": 5},
                           triggers={"workers": 64, "max_waiting": 1024}, metrics_interval_s=5)
            node = NodeProcess(write_config(workdir / f"{policy}-{dev}.yaml", doc), dev, arrivals=arrivals,
                               log=workdir / f"{policy}-{dev}.log")
            arrivals.expect(dev)
            node.launch()  # all at once: the fleet comes up in the time of its slowest node
            nodes.append(node)
        for node in nodes:
            if not arrivals.wait(node.device, 60):
                raise RuntimeError(f"node {node.device} did not come online within 60 s:\n"
                                   + node.log_text()[-2000:])
        answers = Answers(port, topics)
        rng = random.Random(seed)
        rate = capacity_per_s(world) * load
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
        stop_all(nodes)
        for proxy in proxies:
            proxy.close()
        arrivals.close()
    done = [a for a in answers.items if a.get("ok")]
    latencies = sorted(a["total_ms"] for a in done)
    winners = Counter(a["winner"] for a in done)
    return {"policy": policy, "world": world, "answered": len(done), "failed": len(answers.items) - len(done),
            "jobs": jobs,
            "mean_ms": statistics.fmean(latencies) if latencies else math.nan,
            "p95_ms": latencies[int(0.95 * (len(latencies) - 1))] if latencies else math.nan,
            "share": {d: round(winners[d] / max(len(done), 1), 3) for d, _, _ in DEVICES},
            "wall_s": round(wall, 1)}


def measure_scheduling(port: int, workdir: Path, *, jobs: int, load: float, policies: Sequence[str],
                       seed: int = 1, world: str = "honest") -> list[dict[str, Any]]:
    if world not in WORLDS:
        raise ValueError(f"unknown world {world!r} (one of {', '.join(WORLDS)})")
    results = []
    for policy in policies:
        print(f"  … scheduling: {policy}, {jobs} prompts at {load:.0%} load, world {world}", file=sys.stderr,
              flush=True)
        results.append(run_policy(policy, port, workdir, jobs, load, seed, world))
    return results


def print_scheduling(results: Sequence[dict[str, Any]], load: float, world: str = "honest") -> None:
    print(f"\nscheduling over MQTT: {len(DEVICES)} sim devices 5x apart, world {world}, Poisson prompts at "
          f"{load:.0%} of capacity, each policy from a cold start\n")
    print(f"{'policy':<14} {'answered':>9} {'mean ms':>9} {'p95 ms':>9}   share of jobs " +
          " ".join(f"{d:>7}" for d, _, _ in DEVICES))
    bases = {p: next((r["mean_ms"] for r in results if r["policy"] == p), None) for p in ("least_backlog", "jsq")}
    for r in results:
        # How much lower the mean latency is than each baseline's, in the same run.
        vs = "".join(f" ({(1 - r['mean_ms'] / base) * 100:+.0f} % vs {p})" for p, base in bases.items()
                     if base and r["policy"] != p)
        print(f"{r['policy']:<14} {r['answered']:>5}/{r['jobs']:<3} {r['mean_ms']:>9.0f} {r['p95_ms']:>9.0f}   "
              + " " * 14 + " ".join(f"{r['share'][d]:>7.2f}" for d, _, _ in DEVICES) + vs)
