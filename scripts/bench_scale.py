"""``scripts/bench --scale``: what an auction costs as the fleet grows, against the broker's floor.

For each N of ``--sizes`` (e.g. 8,100,300,1000), on a private broker — a Mosquitto of
its own, or with ``--broker nats`` a 3-server NATS cluster (JetStream and MQTT on each,
routed on loopback, every port free-picked, the devices spread over the three; a fresh
cluster for each size) — it starts N virtual devices (scripts/fleet.py, in worker
processes of their own) and an asker in this process, and measures, in one run:

floor      the raw broadcast floor: one publish to the N devices' floor topic, answered by
           each with a bid-sized payload at QoS 0 (as bids go) straight from its network
           callback, until all N replies are in (no agent code on either side);
auction    ``Orchestrator.run(dry_run=True)`` through a real ``Fleet`` connection, the code
           ``trigger`` runs (in-process, so that a process start is not measured): call ->
           bids -> decision; its ``auction_ms``, every one checked to have been answered;
messages   what the broker delivers per orchestration, counted at the ends: the calls the
           devices received (broadcast or invitations) plus the bids the asker received;
CPU        the asker's own CPU per orchestration (the orchestrating thread and its
           connection's threads, read per thread: every size's asker is in this
           process), the broker's per
           orchestration, and the virtual devices' per bid (their processes; counted in
           clock ticks, so only long runs say much). On a machine of few cores the three
           share them: an auction cannot take less than their sum over the cores.

On Mosquitto every size is up at once and their auctions take turns, ten blocks each
(``measure_in_turns``): measured one after the other, minutes apart, the sizes drifted
with this machine's speed. ``--one-at-a-time`` measures each size alone instead (one
broker, one fleet at a time: less memory, no idle fleets beside it), as NATS always does.

Ratios are against N = the first size, measured in the same run, with the issue's targets
(#23: auction p50 at the largest N <= 2x, messages <= 4x). ``--asker-config`` passes node
config through to the asker (e.g. ``{"auction": {"invite": {"above": 50}}}``), so the same
run measures the seed's call-everyone auction or invitations.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil
import yaml
from bench import BLOCKS, Dist, FloorRequester, log, orchestrator, shares
from fleet import FD_SPARE, raise_fd_limit

from agent.bus import new_nonce
from agent.config import load_config
from agent.errors import AgentError
from agent.fleet import Fleet
from tests.support.launch import node_doc, write_config
from tests.support.mosquitto import REPO, LocalMosquitto

TARGETS = {"auction_vs_first": 2.0, "messages_vs_first": 4.0}
FLOOR_WAIT_S = 10.0   # for all N replies of one floor round
LOST_RUNNING = 3      # floor rounds in a row with replies lost: the broker has lost the devices


class VirtualDevices:
    """scripts/fleet.py as a child process: ready once every device is online."""

    def __init__(self, n: int, brokers: list[tuple[str, int]], prefix: str, protocol: str, workers: int,
                 connect_batch: int = 50):
        argv = [sys.executable, str(REPO / "scripts" / "fleet.py"), "--count", str(n), "--prefix", prefix,
                "--mqtt", protocol, "--workers", str(workers), "--name", f"v{n}-",
                "--connect-batch", str(connect_batch)]
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

    def cpu_s(self) -> float:
        """CPU seconds the virtual devices' processes (the parent and its workers) used so far."""
        parent = psutil.Process(self.proc.pid)
        return cpu_s([parent, *parent.children(recursive=True)])

    def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def cpu_s(processes: list[psutil.Process]) -> float:
    """CPU seconds (user and system) these processes used so far."""
    return sum(t.user + t.system for t in (p.cpu_times() for p in processes))


def broker_cpu_s(broker: Any) -> float:
    """CPU seconds the broker's processes (one Mosquitto, or each server of a cluster) used so far."""
    procs = [broker.proc] if hasattr(broker, "proc") else [server.proc for server in broker.servers]
    return cpu_s([psutil.Process(p.pid) for p in procs if p is not None])


class SizeRun:
    """One N: its virtual devices, its floor and its asker, measured a block of auctions
    at a time (``auctions``), so that sizes can take turns."""

    def __init__(self, n: int, brokers: list[tuple[str, int]], protocol: str, workdir: Path, workers: int,
                 asker_extra: dict[str, Any], connect_batch: int = 50, broker_cpu: Any = lambda: 0.0,
                 gap_s: float = 0.0):
        self.n, self.brokers, self.protocol, self.workdir = n, brokers, protocol, workdir
        self.gap_s = gap_s  # idle before each measured auction, as a real asker's prompts come apart
        self._idle = threading.Event()  # never set: what the gaps wait on
        self.asker_extra, self.broker_cpu = asker_extra, broker_cpu
        self.prefix = f"scale/{new_nonce()}/"
        log(f"N={n}: starting {n} virtual devices ({workers} worker process(es))")
        t0 = time.monotonic()
        self.devices = VirtualDevices(n, brokers, self.prefix, protocol, workers, connect_batch)
        self.started_s = time.monotonic() - t0
        self.floor_ms: list[float] = []
        self.lost = 0
        self.times: list[float] = []
        self.bids: list[int] = []
        self.errors: list[str] = []
        self.asker_cpu = self.fleet_cpu = self.broker_used = 0.0
        self.before: dict[str, Any] | None = None
        self.after: dict[str, Any] | None = None
        self.connected: Fleet | None = None
        self.orch: Any = None
        self.threads: list[threading.Thread] = []

    def floor(self, rounds: int, warmup: int) -> None:
        """The raw broadcast floor: ``rounds`` round trips to every device, after ``warmup``."""
        n = self.n
        log(f"N={n}: floor")
        req = FloorRequester(self.brokers[0][1], f"{self.prefix}floor/",
                             mqtt.MQTTv5 if self.protocol == "5" else mqtt.MQTTv311)
        try:
            for _ in range(6):  # a cluster spreads new subscriptions between its servers: until all hear
                try:
                    req.round_trip(n, 5)
                    break
                except RuntimeError as exc:
                    log(f"N={n}: not every device hears the floor yet ({exc}); again")
            running = 0
            for i in range(warmup + rounds):
                try:
                    dt = req.round_trip(n, FLOOR_WAIT_S)
                except RuntimeError as exc:  # a broker that loses or holds up replies: counted, not fatal
                    self.lost, running = self.lost + 1, running + 1
                    log(f"N={n}: {exc}")
                    if running >= LOST_RUNNING:  # it lost the devices: the size stops here
                        raise RuntimeError(f"{LOST_RUNNING} floor rounds running lost replies ({exc})") from None
                    continue
                running = 0
                if i >= warmup:
                    self.floor_ms.append(dt)
        finally:
            req.close()

    def open_asker(self, warmup: int) -> None:
        """The asker's connection and orchestrator, and ``warmup`` auctions not measured."""
        host, port = self.brokers[0]
        doc = node_doc(f"asker{self.n}", host=host, port=port, prefix=self.prefix,
                       state_dir=self.workdir / f"asker{self.n}", auction={"bid_timeout_s": 10},
                       broker={"protocol": self.protocol, "keepalive_s": 30})
        for key, value in self.asker_extra.items():
            doc[key] = {**doc[key], **value} if isinstance(value, dict) and isinstance(doc.get(key), dict) else value
        cfg = load_config(write_config(self.workdir / f"asker{self.n}.yaml", doc), env={})
        others = {t.ident for t in threading.enumerate()}
        self.connected = Fleet.open(cfg)
        self.orch = orchestrator(cfg, self.connected)
        log(f"N={self.n}: auctions")
        for _ in range(warmup):
            self._auction()
        # its connection's threads (paho's, the dispatcher): the other sizes' askers share
        # this process, and their background (metrics from their fleets) is not this size's
        self.threads = [t for t in threading.enumerate() if t.ident not in others]
        self.before = self.devices.stats()

    def _asker_clocks(self) -> dict[int | None, float]:
        """CPU seconds so far of this size's asker: the orchestrating (calling) thread and
        its connection's threads."""
        clocks: dict[int | None, float] = {None: time.thread_time()}
        for t in self.threads:
            if t.ident is not None:
                try:
                    clocks[t.ident] = time.clock_gettime(time.pthread_getcpuclockid(t.ident))
                except (OSError, ProcessLookupError):  # it ended (a reconnect replaces paho's thread)
                    pass
        return clocks

    def _auction(self) -> Any:
        out = self.orch.run("benchmark prompt", max_new_tokens=8, dry_run=True)
        if not out.ok or out.winner is None:
            self.errors.append(out.error or "no winner")
            log(f"N={self.n}: an auction was not answered: {self.errors[-1]}")
            return None
        return out

    def auctions(self, k: int) -> None:
        """``k`` measured auctions, with the CPU each side spent on them: this process (the
        asker: its network thread and the orchestrator), the devices' and the broker's."""
        fleet, broker = self.devices.cpu_s(), self.broker_cpu()
        asker = self._asker_clocks()
        for _ in range(k):
            if self.gap_s:
                self._idle.wait(self.gap_s)
            out = self._auction()
            if out is not None:
                self.times.append(out.auction_ms)
                self.bids.append(len(out.bids))
        after = self._asker_clocks()
        self.asker_cpu += sum(after[t] - asker[t] for t in after if t in asker)
        self.fleet_cpu += self.devices.cpu_s() - fleet
        self.broker_used += self.broker_cpu() - broker

    def result(self, rounds: int) -> dict[str, Any]:
        """The size's row, after one real answer from the virtual fleet."""
        assert self.before is not None
        after = self.devices.stats()
        answer = self.orch.run("an answer from the virtual fleet", max_new_tokens=8)
        n, bids, times = self.n, self.bids, self.times
        calls = (after["calls"] + after["invites"]) - (self.before["calls"] + self.before["invites"])
        floor = Dist.of(self.floor_ms) if self.floor_ms else None
        auction = Dist.of(times) if times else None
        return {"n": n, "floor": floor.json() if floor else None, "floor_lost": self.lost,
                "auction": auction.json() if auction else None, "answered": len(times), "rounds": rounds,
                "errors": self.errors[:3], "bids_per_orchestration": round(statistics.mean(bids), 1) if bids else 0.0,
                "messages_per_orchestration": round((calls + sum(bids)) / rounds, 1),
                "auction_over_floor": round(auction.p50 / floor.p50, 2) if auction and floor else None,
                # per orchestration of the measured rounds: the asker's own CPU, and the
                # virtual devices' per bid (they share this machine's cores with the asker)
                "asker_cpu_ms": round(self.asker_cpu / rounds * 1000, 3),
                "broker_cpu_ms": round(self.broker_used / rounds * 1000, 3),
                "fleet_cpu_ms_per_bid": round(self.fleet_cpu / sum(bids) * 1000, 3) if bids else None,
                "fleet_start_s": round(self.started_s, 1), "answer_from": answer.winner if answer.ok else None,
                "answer_error": None if answer.ok else answer.error}

    def close(self) -> None:
        if self.connected is not None:
            self.connected.close()
        self.devices.stop()


def measure_size(n: int, brokers: list[tuple[str, int]], protocol: str, workdir: Path, rounds: int, warmup: int,
                 workers: int, asker_extra: dict[str, Any], connect_batch: int = 50,
                 broker_cpu: Any = lambda: 0.0, gap_s: float = 0.0) -> dict[str, Any]:
    """One size alone: its floor, then its auctions."""
    run = SizeRun(n, brokers, protocol, workdir, workers, asker_extra, connect_batch, broker_cpu, gap_s)
    try:
        run.floor(rounds, warmup)
        run.open_asker(warmup)
        run.auctions(rounds)
        return run.result(rounds)
    finally:
        run.close()


def measure_in_turns(sizes: list[int], workdir: Path, rounds: int, warmup: int, workers: int | None,
                     asker_extra: dict[str, Any], gap_s: float = 0.0) -> dict[int, dict[str, Any]]:
    """Every size at once, each on a Mosquitto of its own, their auctions taking turns in
    ``BLOCKS`` blocks (the order rotating from block to block): this machine's speed drifts by tens of
    percent within minutes, and sizes measured one after the other drifted apart (the same
    code read N=1000/N=8 1.91 to 3.07). The floors are measured one size after the other,
    once every fleet is up."""
    runs: list[SizeRun] = []
    brokers: list[Any] = []
    try:
        for n in sizes:
            with stopping(n):
                broker, addresses, protocol = start_broker("mosquitto", workdir / f"n{n}")
                brokers.append(broker)
                runs.append(SizeRun(n, addresses, protocol, workdir, worker_count(n, workers), asker_extra,
                                    broker_cpu=lambda b=broker: broker_cpu_s(b), gap_s=gap_s))
        for run in runs:
            with stopping(run.n):
                run.floor(rounds, warmup)
        for run in runs:
            with stopping(run.n):
                run.open_asker(warmup)
        for b, share in enumerate(shares(rounds)):
            for run in runs[b % len(runs):] + runs[:b % len(runs)]:  # the order rotates
                with stopping(run.n):
                    run.auctions(share)
            log(f"block {b + 1}/{BLOCKS} done")
        results = {}
        for run in runs:
            with stopping(run.n):
                results[run.n] = run.result(rounds)
        return results
    finally:
        for part in [*runs, *brokers]:  # every one, whatever the others do
            try:
                part.close() if isinstance(part, SizeRun) else part.stop()
            except Exception as exc:  # noqa: BLE001 - reported, and the rest still stopped
                log(f"could not stop {part}: {exc}")


def worker_count(n: int, asked: int | None) -> int:
    """The virtual devices' processes: as asked, else one up to N=100 and two past it."""
    return asked if asked is not None else (1 if n <= 100 else 2)


class SizeStopped(Exception):
    def __init__(self, n: int, error: str):
        super().__init__(f"N={n}: {error}")
        self.n, self.error = n, error


@contextlib.contextmanager
def stopping(n: int) -> Iterator[None]:
    """What stops size ``n`` (its devices, floor or asker) stops the run, named."""
    try:
        yield
    except (RuntimeError, AgentError) as exc:
        raise SizeStopped(n, str(exc)) from exc


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


def one_after_another(sizes: list[int], broker_kind: str, workdir: Path, rounds: int, warmup: int,
                      workers: int | None, asker_extra: dict[str, Any], results: dict[str, Any],
                      gap_s: float = 0.0) -> None:
    """Each size alone, one after the other, on one broker (a fresh NATS cluster for each)."""
    broker, brokers, protocol = start_broker(broker_kind, workdir)
    try:
        for i, n in enumerate(sizes):
            w = worker_count(n, workers)
            if broker_kind == "nats" and i > 0:
                # A fresh cluster for each size: the last size's devices leave with clean
                # sessions, and the cluster deletes their JetStream consumers (one per QoS 1
                # subscription) for minutes, answering no CONNECT meanwhile. Measured alone,
                # each N is what a fleet of that size costs.
                broker.stop()
                broker, brokers, protocol = start_broker(broker_kind, workdir / f"n{n}")
            # NATS creates JetStream consumers for every QoS 1 subscription: connect a few at a time.
            batch = 10 if broker_kind == "nats" else 50
            try:
                results["sizes"][n] = measure_size(n, brokers, protocol, workdir, rounds, warmup, w, asker_extra,
                                                   batch, broker_cpu=lambda b=broker: broker_cpu_s(b), gap_s=gap_s)
            except (RuntimeError, AgentError) as exc:  # as far as it goes: the sizes before it stand
                log(f"N={n}: stopped: {exc}")
                results["stopped"] = {"n": n, "error": str(exc)}
                break
    finally:
        broker.stop()


def scale(sizes: list[int], *, broker_kind: str, rounds: int, warmup: int, out: str, workers: int | None,
          asker_config: str | None, one_at_a_time: bool = False, gap_s: float = 0.0) -> int:
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
                               "broker": broker_kind, "asker_config": asker_extra, "gap_s": gap_s, "sizes": {}}
    results["in_turns"] = in_turns = broker_kind == "mosquitto" and not one_at_a_time and len(sizes) > 1
    try:
        if in_turns:
            try:
                results["sizes"] = measure_in_turns(sizes, workdir, rounds, warmup, workers, asker_extra, gap_s)
            except SizeStopped as exc:
                log(f"N={exc.n}: stopped: {exc.error}")
                results["stopped"] = {"n": exc.n, "error": exc.error}
        else:
            one_after_another(sizes, broker_kind, workdir, rounds, warmup, workers, asker_extra, results, gap_s)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results["load_average"] = {"before": [round(x, 2) for x in load_before],
                               "after": [round(x, 2) for x in os.getloadavg()]}
    done = list(results["sizes"])
    first = results["sizes"][done[0]] if done else None
    for r in results["sizes"].values():
        assert first is not None
        a, a0 = r["auction"], first["auction"]
        r["auction_vs_first"] = round(a["p50"] / a0["p50"], 2) if a and a0 else None
        m0 = first["messages_per_orchestration"]
        r["messages_vs_first"] = round(r["messages_per_orchestration"] / m0, 2) if m0 else None
    Path(out).write_text(json.dumps(results, indent=2))
    print_scale(results, done)
    print(f"\nJSON: {out}")
    complete = "stopped" not in results and all(r["answered"] == r["rounds"] and not r["floor_lost"]
                                                and r["answer_from"] for r in results["sizes"].values())
    return 0 if complete else 1


def print_scale(r: dict[str, Any], sizes: list[int]) -> None:
    def mark(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    where = "Mosquitto" if r["broker"] == "mosquitto" else "a 3-server NATS cluster"
    lb, la = r["load_average"]["before"], r["load_average"]["after"]
    how = "every size up at once, their auctions taking turns" if r.get("in_turns") else "one size at a time"
    print(f"\nedge-agent at scale, {where}, {how} (python {r['machine']['python']}, {r['machine']['cpus']} cpus; "
          f"load average {lb[0]:.2f} before, {la[0]:.2f} after)")
    if r["asker_config"]:
        print(f"asker config: {json.dumps(r['asker_config'])}")
    if r.get("gap_s"):
        print(f"each measured auction after {r['gap_s']:g} s idle (the CPU columns include it)")
    vs_a, vs_m = f"auction vs N={sizes[0]}", f"msgs vs N={sizes[0]}"
    print(f"\n{'devices':>7} | {'floor p50 ms':>12} | {'auction p50/p95 ms':>19} | {'/floor':>6} | "
          f"{'bids':>6} | {'msgs/orch':>9} | {vs_a:>16} | {vs_m:>13} | {'asker CPU ms':>12} | "
          f"{'broker CPU ms':>13} | {'device CPU ms/bid':>17}")
    def num(x: float | None, fmt: str) -> str:
        return "—" if x is None else format(x, fmt)

    for n in sizes:
        x = r["sizes"][n]
        f, a = x["floor"], x["auction"]
        lost = f" ({x['floor_lost']} lost)" if x["floor_lost"] else ""
        auction = "—" if a is None else f"{a['p50']:.1f}/{a['p95']:.1f}"
        print(f"{n:>7} | {num(f and f['p50'], '.1f'):>12}{lost} | {auction:>19} | "
              f"{num(x['auction_over_floor'], '.2f'):>6} | {x['bids_per_orchestration']:>6.1f} | "
              f"{x['messages_per_orchestration']:>9.1f} | {num(x['auction_vs_first'], '.2f'):>15}x | "
              f"{num(x['messages_vs_first'], '.2f'):>12}x | {num(x.get('asker_cpu_ms'), '.2f'):>12} | "
              f"{num(x.get('broker_cpu_ms'), '.2f'):>13} | {num(x.get('fleet_cpu_ms_per_bid'), '.3f'):>17}")
    answered = sum(x["answered"] for x in r["sizes"].values())
    total = sum(x["rounds"] for x in r["sizes"].values())
    print(f"\nauctions answered: {answered}/{total}")
    for n in sizes:
        x = r["sizes"][n]
        if x["errors"] or x["answer_error"]:
            print(f"N={n}: {x['rounds'] - x['answered']} auction(s) not answered ({'; '.join(x['errors'])}); "
                  f"the answer: {x['answer_error'] or 'ok'}")
    if "stopped" in r:
        print(f"stopped at N={r['stopped']['n']}: {r['stopped']['error']}")
    if len(sizes) > 1:
        last = r["sizes"][sizes[-1]]
        a, m = last["auction_vs_first"], last["messages_vs_first"]
        target_a, target_m = TARGETS["auction_vs_first"], TARGETS["messages_vs_first"]
        print(f"auction p50 at N={sizes[-1]}: {num(a, '.2f')}x N={sizes[0]} (target <= {target_a:g}x: "
              f"{mark(a is not None and a <= target_a)}); messages per orchestration {num(m, '.2f')}x "
              f"(target <= {target_m:g}x: {mark(m is not None and m <= target_m)})")
