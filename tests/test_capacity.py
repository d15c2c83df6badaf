"""One capacity truth per device: every job that runs on it passes the same slot limit.

Executions are counted by the stand-in model (tests/support/job.py), which logs the
start and end of every run with its request id: overlapping runs would show there.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from agent.messages import Metrics
from tests.support.fleet import WAIT_S, Env, job
from tests.support.mosquitto import free_port


def runs(log: Path) -> list[tuple[float, float, str]]:
    """(start, end, rid) of every finished run in a job.py log."""
    starts: dict[str, float] = {}
    out = []
    for line in log.read_text().splitlines():
        what, rid, _pid, t = line.split()
        if what == "start":
            starts[rid] = float(t)
        else:
            out.append((starts[rid], float(t), rid))
    return sorted(out)


def overlaps(intervals: list[tuple[float, float, str]]) -> list[tuple[str, str]]:
    return [(a[2], b[2]) for a, b in zip(intervals, intervals[1:], strict=False) if b[0] < a[1]]


def test_a_peer_job_the_own_trigger_and_20_mqtt_triggers_never_run_at_once(env: Env) -> None:
    log = env.tmp / "runs.log"
    dev = env.config("dev", cpu=job(log, "work"), slots=1, triggers={"workers": 4, "max_waiting": 32})
    hub = env.config("hub")
    t = env.topics
    with env.node(dev) as node, env.spy(t.last_result("dev")) as answers, env.spy(t.metrics("dev")) as metrics:
        results: dict[str, tuple[int, dict | None]] = {}

        def trigger(name: str, config: Path) -> None:
            code, out, _, _ = env.trigger(config, f"prompt from {name}")
            results[name] = (code, out)

        threads = [threading.Thread(target=trigger, args=(n, c)) for n, c in (("peer", hub), ("own", dev))]
        for thread in threads:
            thread.start()
        for i in range(20):
            answers.bus.publish(t.trigger("dev"), f"mqtt prompt {i}".encode())
        for thread in threads:
            thread.join(60)
        answers.wait_for(lambda m: len([x for x in answers.seen if not x.retain]) >= 20, timeout=60,
                         what="20 answers on last_result")
        live = [json.loads(m.payload) for m in answers.seen if not m.retain]
        assert all(a["ok"] and a["winner"] == "dev" for a in live), live
        assert results["peer"][0] == 0 and results["peer"][1]["winner"] == "dev"  # type: ignore[index]
        own = results["own"][1]
        assert results["own"][0] == 0 and own is not None
        assert (own["winner"], own["path"]) == ("dev", "local-cpu")
        assert node.jobs.journal.get(own["rid"]) is not None, "its own daemon ran it, through its gate"
        # The device's metrics count its own jobs too: a latency, and a queue while busy.
        seen = [Metrics.from_payload(m.payload) for m in metrics.seen]
        assert any(m.last_latency_ms is not None for m in seen)
        assert max(m.snapshot.queue_depth for m in seen) >= 2
    done = runs(log)
    assert len(done) == 22, "every job ran, once"
    assert overlaps(done) == [], "cpu.slots: 1 means one model at a time"


def test_triggers_past_the_waiting_line_are_told_busy(env: Env) -> None:
    log, gate = env.tmp / "runs.log", env.tmp / "gate"
    from tests.support.fleet import Gate
    hold = Gate(gate)
    dev = env.config("dev", cpu=job(log, "hold", hold), slots=1, triggers={"workers": 1, "max_waiting": 1})
    t = env.topics
    with env.node(dev), env.spy(t.last_result("dev")) as answers:
        for i in range(4):  # one runs (held), one waits, two are refused
            answers.bus.publish(t.trigger("dev"), f"prompt {i}".encode())
        busy = answers.wait_for(lambda m: len([x for x in answers.seen if b"busy" in x.payload]) == 2,
                                what="two busy answers")
        assert "try again later" in json.loads(busy.payload)["error"]
        hold.release(runs=2)
        answers.wait_for(lambda m: len([x for x in answers.seen if json.loads(x.payload)["ok"]]) == 2,
                         timeout=WAIT_S, what="the two admitted prompts answered")
    hold.close()


def test_triggers_without_a_daemon_share_the_slot_locks(env: Env) -> None:
    """No daemon and no broker: each trigger runs the job itself, but one at a time."""
    log = env.tmp / "runs.log"
    solo = env.config("solo", cpu=job(log, "work"), slots=1, broker={"port": free_port()})
    codes: list[int] = []
    threads = [threading.Thread(target=lambda i=i: codes.append(env.trigger(solo, f"local {i}")[0]))
               for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert codes == [0, 0, 0]
    done = runs(log)
    assert len(done) == 3 and overlaps(done) == []
