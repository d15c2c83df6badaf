"""Hostile traffic and a short soak: service goes on, memory stays bounded, nothing runs twice."""

from __future__ import annotations

import json
import random
import sys
import threading
from pathlib import Path

import psutil

from agent.messages import BidRequest, Job
from tests.support.fleet import Env, executions, job

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def garbage(rng: random.Random, topic_kind: str) -> bytes:
    """One malformed message of a random kind (never valid for the topic)."""
    kind = rng.choice(["bytes", "truncated", "huge", "types", "version"])
    if kind == "bytes":
        return b"\xff" + rng.randbytes(rng.randint(0, 200))
    if kind == "huge":
        return b"{" + b" " * (300 * 1024) + b"}"
    valid = (BidRequest("r1", "hub", 30.0, 3, 8).to_payload() if topic_kind == "bid"
             else Job("r1", "hub", "cpu", "c", "p", 8, 5.0, 30.0, "x").to_payload())
    if kind == "truncated":
        return valid[: rng.randint(1, len(valid) - 2)]
    if kind == "types":
        obj = json.loads(valid)
        obj[rng.choice(sorted(k for k in obj if k != "v"))] = rng.choice([[], {}, True, -1])  # wrong for every field
        return json.dumps(obj).encode()
    return valid.replace(b'"v":3', b'"v":7')


def test_a_flood_of_malformed_messages_does_not_stop_service(env: Env) -> None:
    rng = random.Random(7)
    log = env.tmp / "runs.log"
    hub = env.config("hub")
    node = env.config("victim", cpu=job(log, "quick"), homeassistant={"enabled": True})
    t = env.topics
    targets = [(t.bid_request("g1"), "bid"), (t.exec("victim"), "job"), (t.trigger("victim"), "job"),
               (t.availability("stranger"), "job"), ("homeassistant/status", "job")]
    with env.node_process(node) as proc, env.spy("nothing/at/all") as flooder:
        rss_before = psutil.Process(proc.pid).memory_info().rss
        results: list[int] = []

        def real_work() -> None:
            for i in range(6):
                code, out, _, _ = env.trigger(hub, f"real job {i}")
                results.append(code)

        worker = threading.Thread(target=real_work, name="real-work")
        worker.start()
        sent = huge = 0
        for _ in range(60):
            for topic, kind in targets:
                # Every kind starts with "{" or an invalid UTF-8 byte, so none is a valid
                # plain-text prompt on the trigger topic either.
                payload = garbage(rng, kind)
                flooder.bus.publish(topic, payload)
                sent += 1
                huge += len(payload) > 256 * 1024
        assert flooder.bus.barrier(30)
        worker.join(120)
        code, out, _, err = env.trigger(hub, "after the flood")  # processed after every bad message
        rss_after = psutil.Process(proc.pid).memory_info().rss
        text = proc.log_text()
    assert results == [0] * 6 and code == 0, err
    assert len(executions(log)) == 7, "every real job ran, once"
    bad_lines = [line for line in text.splitlines() if " dropped " in line or " ignoring " in line]
    # Somewhat oversized ones reach the node and are refused (a trigger's sender is told);
    # the broker drops anything past RECEIVE_FACTOR times the limit (Maximum Packet Size).
    assert huge > 10 and len(bad_lines) == sent, f"{len(bad_lines)} log lines for {sent} bad messages"
    assert rss_after - rss_before < 40 * 2**20, f"RSS grew by {(rss_after - rss_before) / 2**20:.1f} MB"
    with env.spy("nothing") as s:  # leave no retained discovery behind on the shared broker
        s.publish(t.ha_config("victim"), b"", retain=True)


def test_short_soak_with_random_node_kills(env: Env) -> None:
    from soak import run_soak

    r = run_soak(12, nodes=3, seed=3, port=env.broker.port, workdir=env.tmp, min_triggers=20, min_kills=3,
                 max_seconds=60)  # the test's own timeout is 120 s
    assert r["triggers"] >= 20 and r["node_kills"] >= 3, r
    assert r["duplicates"] == [], "a request ran to completion twice"
    assert r["untyped_failures"] == 0
    assert r["answered"] >= 0.8 * r["triggers"], r
    assert r["max_node_rss_mb"] < 80
