"""``scripts/bench --scale``: what an auction costs as the fleet grows, against the broker's floor.

For each N of ``--sizes`` (e.g. 8,100,300,1000), on a private broker — one Mosquitto, or
with ``--broker nats`` a 3-server NATS cluster (JetStream and MQTT on each, routed on
loopback, every port free-picked, the devices spread over the three) — it starts N
virtual devices (scripts/fleet.py, in worker processes of their own) and an asker in this
process, and measures, in one run:

floor      the raw broadcast floor: one publish to the N devices' floor topic, answered by
           each with a bid-sized payload straight from its network callback, until all N
           replies are in (no agent code on either side);
auction    ``Orchestrator.run(dry_run=True)`` through a real ``Fleet`` connection, the code
           ``trigger`` runs (in-process, so that a process start is not measured): call ->
           bids -> decision; its ``auction_ms``, every one checked to have been answered;
messages   what the broker delivers per orchestration, counted at the ends: the calls the
           devices received (broadcast or invitations) plus the bids the asker received.

Ratios are against N = the first size, measured in the same run, with the issue's targets
(#23: auction p50 at the largest N <= 2x, messages <= 4x). ``--asker-config`` passes node
config through to the asker (e.g. ``{"auction": {"invite": {"above": 50}}}``), so the same
run measures the seed's call-everyone auction or invitations.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import yaml
from bench import Dist, FloorRequester, log, orchestrator
from fleet import FD_SPARE, raise_fd_limit

from agent.bus import new_nonce
from agent.config import load_config
from agent.fleet import Fleet
from tests.support.launch import node_doc, write_config
from tests.support.mosquitto import REPO, LocalMosquitto

TARGETS = {"auction_vs_first": 2.0, "messages_vs_first": 4.0}


class VirtualDevices:
    """scripts/fleet.py as a child process: ready once every device is online."""

    def __init__(self, n: int, brokers: list[tuple[str, int]], prefix: str, protocol: str, workers: int):
        argv = [sys.executable, str(REPO / "scripts" / "fleet.py"), "--count", str(n), "--prefix", prefix,
                "--mqtt", protocol, "--workers", str(workers), "--name", f"v{n}-"]
        for host, port in brokers:
            argv += ["--broker", f"{host}:{port}"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # progress goes to our stderr meanwhile
        if not line.startswith("ready"):
            self.proc.wait(30)
            raise RuntimeError(f"the virtual fleet of {n} did not come up (exit {self.proc.returncode})")

    def stats(self) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        stats: dict[str, Any] = json.loads(self.proc.stdout.readline())
        return stats

    def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def measure_size(n: int, brokers: list[tuple[str, int]], protocol: str, workdir: Path, rounds: int, warmup: int,
                 workers: int, asker_extra: dict[str, Any]) -> dict[str, Any]:
    prefix = f"scale/{new_nonce()}/"
    host, port = brokers[0]
    log(f"N={n}: starting {n} virtual devices ({workers} worker process(es))")
    t0 = time.monotonic()
    devices = VirtualDevices(n, brokers, prefix, protocol, workers)
    started_s = time.monotonic() - t0
    try:
        log(f"N={n}: floor")
        req = FloorRequester(port, f"{prefix}floor/", mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311)
        try:
            for _ in range(6):  # a cluster spreads new subscriptions between its servers: until all hear
                try:
                    req.round_trip(n, 5)
                    break
                except RuntimeError as exc:
                    log(f"N={n}: not every device hears the floor yet ({exc}); again")
            for _ in range(warmup):
                req.round_trip(n, 30)
            floor = Dist.of([req.round_trip(n, 30) for _ in range(rounds)])
        finally:
            req.close()
        log(f"N={n}: auctions")
        doc = node_doc(f"asker{n}", host=host, port=port, prefix=prefix, state_dir=workdir / f"asker{n}",
                       auction={"bid_timeout_s": 10}, broker={"protocol": protocol, "keepalive_s": 30})
        for key, value in asker_extra.items():
            doc[key] = {**doc[key], **value} if isinstance(value, dict) and isinstance(doc.get(key), dict) else value
        cfg = load_config(write_config(workdir / f"asker{n}.yaml", doc), env={})
        connected = Fleet.open(cfg)
        try:
            orch = orchestrator(cfg, connected)
            times, bids, errors = [], [], []
            before: dict[str, Any] = {}
            for i in range(warmup + rounds):
                if i == warmup:
                    before = devices.stats()
                out = orch.run("benchmark prompt", max_new_tokens=8, dry_run=True)
                if not out.ok or out.winner is None:
                    errors.append(out.error or "no winner")
                    continue
                if i >= warmup:
                    times.append(out.auction_ms)
                    bids.append(len(out.bids))
            after = devices.stats()
            answer = orch.run("an answer from the virtual fleet", max_new_tokens=8)
        finally:
            connected.close()
        if errors:
            raise RuntimeError(f"N={n}: {len(errors)} auction(s) not answered: {errors[0]}")
        calls = (after["calls"] + after["invites"]) - (before["calls"] + before["invites"])
        if not answer.ok:
            raise RuntimeError(f"N={n}: the answer did not come: {answer.error}")
        auction = Dist.of(times)
        return {"n": n, "floor": floor.json(), "auction": auction.json(), "answered": len(times),
                "rounds": rounds, "bids_per_orchestration": round(statistics.mean(bids), 1),
                "messages_per_orchestration": round((calls + sum(bids)) / rounds, 1),
                "auction_over_floor": round(auction.p50 / floor.p50, 2), "fleet_start_s": round(started_s, 1),
                "answer_from": answer.winner}
    finally:
        devices.stop()


def start_broker(kind: str, workdir: Path) -> tuple[Any, list[tuple[str, int]], str]:
    """(the broker, the addresses the devices spread over, the MQTT version)."""
    if kind == "nats":
        from tests.support.brokers import LocalNats
        nats = LocalNats(workdir / "nats", size=3)
        nats.start()
        return nats, [("127.0.0.1", p) for p in nats.ports], "3.1.1"   # NATS speaks MQTT 3.1.1
    # Debian's mosquitto caps connections unless told; its open-file limit is ours (raised).
    broker = LocalMosquitto(workdir / "mosquitto", extra_conf="max_connections -1\n")
    broker.start()
    return broker, [("127.0.0.1", broker.port)], "5"


def scale(sizes: list[int], *, broker_kind: str, rounds: int, warmup: int, out: str, workers: int | None,
          asker_config: str | None) -> int:
    asker_extra = yaml.safe_load(asker_config) if asker_config else {}
    if not isinstance(asker_extra, dict):
        print("--asker-config: want a YAML/JSON mapping of node config", file=sys.stderr)
        return 2
    # The broker inherits our limit: every device's connection plus the asker's, twice over for NATS' routes.
    note = raise_fd_limit(2 * max(sizes) + FD_SPARE * 4)
    log(note)
    load_before = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="edge-agent-bench-scale-"))
    results: dict[str, Any] = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                           "platform": platform.platform()},
                               "broker": broker_kind, "asker_config": asker_extra, "sizes": {}}
    broker, brokers, protocol = start_broker(broker_kind, workdir)
    try:
        for n in sizes:
            w = workers if workers is not None else (1 if n <= 100 else 2)
            results["sizes"][n] = measure_size(n, brokers, protocol, workdir, rounds, warmup, w, asker_extra)
    finally:
        broker.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    results["load_average"] = {"before": [round(x, 2) for x in load_before],
                               "after": [round(x, 2) for x in os.getloadavg()]}
    first = results["sizes"][sizes[0]]
    for r in results["sizes"].values():
        r["auction_vs_first"] = round(r["auction"]["p50"] / first["auction"]["p50"], 2)
        r["messages_vs_first"] = round(r["messages_per_orchestration"] / first["messages_per_orchestration"], 2)
    Path(out).write_text(json.dumps(results, indent=2))
    print_scale(results, sizes)
    print(f"\nJSON: {out}")
    return 0


def print_scale(r: dict[str, Any], sizes: list[int]) -> None:
    def mark(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    where = "one Mosquitto" if r["broker"] == "mosquitto" else "a 3-server NATS cluster"
    lb, la = r["load_average"]["before"], r["load_average"]["after"]
    print(f"\nedge-agent at scale, {where} (python {r['machine']['python']}, {r['machine']['cpus']} cpus; "
          f"load average {lb[0]:.2f} before, {la[0]:.2f} after)")
    if r["asker_config"]:
        print(f"asker config: {json.dumps(r['asker_config'])}")
    vs_a, vs_m = f"auction vs N={sizes[0]}", f"msgs vs N={sizes[0]}"
    print(f"\n{'devices':>7} | {'floor p50 ms':>12} | {'auction p50/p95 ms':>19} | {'/floor':>6} | "
          f"{'bids':>6} | {'msgs/orch':>9} | {vs_a:>16} | {vs_m:>13}")
    for n in sizes:
        x = r["sizes"][n]
        print(f"{n:>7} | {x['floor']['p50']:>12.1f} | {x['auction']['p50']:>9.1f}/{x['auction']['p95']:<9.1f} | "
              f"{x['auction_over_floor']:>6.2f} | {x['bids_per_orchestration']:>6.1f} | "
              f"{x['messages_per_orchestration']:>9.1f} | {x['auction_vs_first']:>15.2f}x | "
              f"{x['messages_vs_first']:>12.2f}x")
    last = r["sizes"][sizes[-1]]
    answered = sum(x["answered"] for x in r["sizes"].values())
    total = sum(x["rounds"] for x in r["sizes"].values())
    print(f"\nauctions answered: {answered}/{total}")
    if len(sizes) > 1:
        a, m = last["auction_vs_first"], last["messages_vs_first"]
        print(f"auction p50 at N={sizes[-1]}: {a:.2f}x N={sizes[0]} (target <= {TARGETS['auction_vs_first']:g}x: "
              f"{mark(a <= TARGETS['auction_vs_first'])}); messages per orchestration {m:.2f}x "
              f"(target <= {TARGETS['messages_vs_first']:g}x: {mark(m <= TARGETS['messages_vs_first'])})")
