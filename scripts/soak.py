"""Soak: continuous triggers against a fleet whose nodes are killed and restarted at random.

    scripts/soak [--seconds 180] [--nodes 3] [--seed 1]

Every trigger must end in an answer or a clear, typed failure (exit code 1, 3 or 4); no
request may have its result delivered twice; node memory must not grow without bound.
A node killed after its model finished but before its answer left the process is, by
design, failed over (nothing reached the orchestrator); such re-runs are counted apart.
The stand-in model (tests/support/job.py) logs every start and finish with its request
id, so executions are counted, not inferred. Prints the counts and exits non-zero if a
duplicate execution or an untyped failure was seen.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import psutil  # noqa: E402
import yaml  # noqa: E402

from agent.bus import Bus, new_nonce  # noqa: E402
from agent.cli import main as cli  # noqa: E402
from agent.config import BrokerConfig  # noqa: E402
from agent.devbroker import LocalMosquitto  # noqa: E402
from agent.roster import ArrivalWatch  # noqa: E402
from agent.topics import Topics  # noqa: E402

JOB = REPO / "tests" / "support" / "job.py"
TYPED_FAILURES = {1: "execution failed", 3: "no device", 4: "timed out"}
DELIVERED_RE = re.compile(r"job ([0-9a-f]{32}) done in ")


class Node:
    def __init__(self, name: str, config: Path, out: Path):
        self.name, self.config, self.out = name, config, out
        self.proc: subprocess.Popen[bytes] | None = None
        self.max_rss_mb = 0.0

    def start(self, arrivals: ArrivalWatch) -> None:
        arrivals.expect(self.name)
        with open(self.out, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "agent", "--role", "node", "--config",
                                          str(self.config)], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        if not arrivals.wait(self.name, 30):
            raise RuntimeError(f"{self.name} did not come online")

    def sample_rss(self) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                self.max_rss_mb = max(self.max_rss_mb, psutil.Process(self.proc.pid).memory_info().rss / 2**20)
            except psutil.Error:
                pass

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=15)


def run_soak(seconds: float, *, nodes: int = 3, seed: int = 1, port: int, workdir: Path,
             kill_every_s: float = 1.5) -> dict[str, Any]:
    rng = random.Random(seed)
    prefix = f"soak/{new_nonce()}/"
    topics = Topics(prefix)
    log = workdir / "executions.log"

    def config(name: str, **extra: Any) -> Path:
        doc = {"device_id": name, "broker": {"port": port, "keepalive_s": 2}, "topic_prefix": prefix,
               "state_dir": str(workdir / "state" / name), "homeassistant": {"enabled": False},
               "npu": {"enabled": False}, "metrics_interval_s": 30,
               "cpu": {"enabled": True, "slots": 2, "executor": {
                   "kind": "command", "argv": [sys.executable, str(JOB), str(log), "quick", "{prompt}"]}}}
        doc.update(extra)
        path = workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(doc))
        return path

    watcher = Bus(f"soak-watch-{new_nonce()}", BrokerConfig(port=port), persistent=False)
    arrivals = ArrivalWatch(watcher, topics)
    watcher.connect(5)
    fleet = [Node(f"node-{i}", config(f"node-{i}"), workdir / f"node-{i}.out") for i in range(nodes)]
    for n in fleet:
        n.start(arrivals)
    hub = config("hub", cpu={"enabled": False},
                 auction={"bid_timeout_s": 5, "accept_timeout_s": 1, "job_timeout_s": 20})

    stop = threading.Event()
    kills = [0]

    def chaos() -> None:
        while not stop.wait(rng.uniform(0.5, kill_every_s * 1.5)):
            victim = rng.choice(fleet)
            victim.sample_rss()
            victim.kill()
            kills[0] += 1
            if stop.wait(rng.uniform(0.1, 1.0)):
                break
            victim.start(arrivals)

    codes: Counter[int] = Counter()
    reasons: Counter[str] = Counter()
    rids: list[str] = []
    chaos_thread = threading.Thread(target=chaos, name="chaos", daemon=True)
    chaos_thread.start()
    end = time.monotonic() + seconds
    i = 0
    try:
        while time.monotonic() < end:
            out, err = io.StringIO(), io.StringIO()
            code = cli(["trigger", "--config", str(hub), "--json", "-q", f"soak prompt number {i}"],
                       stdout=out, stderr=err)
            codes[code] += 1
            result = json.loads(out.getvalue()) if out.getvalue().strip() else {}
            rids.append(result.get("rid", ""))
            if code:
                reasons[TYPED_FAILURES.get(code, f"UNTYPED exit {code}") + ": " +
                        str(result.get("error") or err.getvalue().strip())[:80]] += 1
            for n in fleet:
                n.sample_rss()
            i += 1
    finally:
        stop.set()
        chaos_thread.join(timeout=30)
        for n in fleet:
            n.sample_rss()
            n.stop()
        watcher.stop()

    done: Counter[str] = Counter()
    starts: Counter[str] = Counter()
    if log.exists():
        for line in log.read_text().splitlines():
            what, rid, *_ = line.split()
            (done if what == "done" else starts)[rid] += 1
    # A result counts as delivered when its node logged publishing it ("job <rid> done in").
    # Two delivered results for one rid is a duplicate. A model that finished on a node
    # killed before its answer left the process, then ran again on the runner-up, is the
    # documented failover (no token had reached the orchestrator): reported, not hidden.
    delivered: Counter[str] = Counter()
    for n in fleet:
        if n.out.exists():
            delivered.update(DELIVERED_RE.findall(n.out.read_text(errors="replace")))
    return {
        "seconds": seconds, "triggers": sum(codes.values()), "answered": codes[0],
        "failed": {TYPED_FAILURES.get(c, f"untyped {c}"): n for c, n in codes.items() if c},
        "failure_reasons": dict(reasons.most_common(8)), "node_kills": kills[0],
        "executions_completed": sum(done.values()),
        "duplicates": sorted(r for r, n in delivered.items() if n > 1),
        "rerun_after_silent_death": sorted(r for r, n in done.items() if n > 1 and delivered[r] <= 1),
        "restarted_before_any_token": sum(1 for r, n in starts.items() if n > 1),
        "untyped_failures": sum(n for c, n in codes.items() if c not in (0, *TYPED_FAILURES)),
        "max_node_rss_mb": round(max(n.max_rss_mb for n in fleet), 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=180)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="edge-agent-soak-"))
    broker = LocalMosquitto(workdir / "mosquitto")
    broker.start()
    try:
        r = run_soak(args.seconds, nodes=args.nodes, seed=args.seed, port=broker.port, workdir=workdir)
    finally:
        broker.stop()
    print(json.dumps(r, indent=2))
    bad = r["duplicates"] or r["untyped_failures"]
    print(f"\n{r['triggers']} triggers in {r['seconds']:g} s with {r['node_kills']} node kills: "
          f"{r['answered']} answered, failed {r['failed'] or 'none'}; duplicates {len(r['duplicates'])}; "
          f"re-run after a silent death {len(r['rerun_after_silent_death'])}; "
          f"max node RSS {r['max_node_rss_mb']} MB" + ("  <-- FAILED" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
