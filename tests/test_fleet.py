"""The working fleet end to end, against a real broker started by a fixture."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading

from agent.messages import BidRequest, Job
from tests.support.broker import REPO, free_port
from tests.support.fleet import WAIT_S, Env, hold_npu_in_other_process, sim


def test_own_free_npu_runs_locally_without_touching_the_broker(env: Env) -> None:
    hub = env.config("hub", npu=sim(base_ms=5))
    log_mark = len(env.broker.log_lines)
    with env.spy("#") as spy:
        code, out, _, err = env.trigger(hub, "summarise the plan")
        assert code == 0, err
        assert out is not None
        assert (out["path"], out["winner"]) == ("local-npu", "hub")
        assert out["text"] == "summarise the plan"
        assert not [t for t in spy.topics_seen() if "bid/request" in t]
    # Not even a connection: the broker never saw a trigger client.
    if env.broker.kind == "mosquitto":
        assert not [line for line in env.broker.log_lines[log_mark:] if "hub-trigger-" in line]


def test_busy_own_npu_goes_to_a_peer_with_a_free_npu(env: Env) -> None:
    hub = env.config("hub", npu=sim(base_ms=5))
    peer = env.config("npu-peer", npu=sim(base_ms=5))
    holder = hold_npu_in_other_process(env.tmp / "state" / "hub")
    try:
        with env.node(peer):
            code, out, _, err = env.trigger(hub, "route me")
    finally:
        holder.communicate("")
    assert code == 0, err
    assert out is not None
    assert (out["path"], out["winner"]) == ("peer-npu", "npu-peer")
    assert out["attempts"] == [{"device": "npu-peer", "outcome": "done"}]


def test_bandit_learns_to_prefer_the_faster_cpu_peer(env: Env) -> None:
    """Asserted on clear-cut choices and on what was learnt: the two devices are 50x apart,
    far beyond the timing noise of a loaded CI machine on the fast one (a few ms a job).
    Each device's own estimate ranks it once it has run a job; the arm store learns only
    what those estimates miss, which on a loopback broker is close to nothing."""
    import numpy as np

    from agent.armstore import ArmStore
    from agent.selection import MATURE_JOBS
    # Names chosen so that alphabetical tie-breaking would favour the slow peer.
    hub = env.config("hub")
    slow = env.config("aa-slow", cpu=sim(base_ms=300, ms_per_token=50, seed=1))
    fast = env.config("zz-fast", cpu=sim(base_ms=10, ms_per_token=1, seed=2))
    winners = []
    with env.node(slow), env.node(fast):
        for i in range(14):
            code, out, _, err = env.trigger(hub, f"question {i}: how fast are you today?")
            assert code == 0, err
            assert out is not None and out["path"] == "peer-cpu"
            winners.append(out["winner"])
    assert set(winners) == {"aa-slow", "zz-fast"}, f"both devices should have been tried: {winners}"
    assert winners[-6:] == ["zz-fast"] * 6, f"once both are known, the fast one wins: {winners}"
    store = ArmStore.for_config(env.load(hub))
    arm = store.load().arms["zz-fast"]
    assert arm.n >= 5, "every answer with a promise trains the arm"
    # A promise teaches from a record of MATURE_JOBS (discounted) jobs on: from the fast
    # device's 8th job, with a half-life of 20 jobs (14 questions leave it at least 5).
    assert arm.n >= winners.count("zz-fast") - MATURE_JOBS - 1 > 0, "every answer with a grown promise trains the arm"
    residual, _ = arm.predict(np.array([1.0, 0.005, 0.0, 0.0, 0.01, 0.25]), store.lam)
    assert abs(residual) < 0.3, f"a loopback link and honest estimates leave little to learn: {residual}"


def test_auction_closes_on_the_roster_not_the_timeout(env: Env) -> None:
    hub = env.config("hub", auction={"bid_timeout_s": 20})
    peers = [env.config(f"peer-{i}", cpu=sim(base_ms=1, ms_per_token=0)) for i in range(3)]
    with env.node(peers[0]), env.node(peers[1]), env.node(peers[2]):
        code, out, _, err = env.trigger(hub, "quick one")
    assert code == 0, err
    assert out is not None
    assert out["roster"] == ["peer-0", "peer-1", "peer-2"]
    assert len(out["bids"]) == 3
    # Closed by the roster: a window closed by a rule that gives up on someone (timeout,
    # stragglers, overdue) says so in a warning. The bound is half the window, not a stopwatch.
    assert out["warnings"] == [], out["warnings"]
    assert out["auction_ms"] < 10_000, out["auction_ms"]


def test_peer_whose_will_fired_is_not_waited_for(env: Env) -> None:
    hub = env.config("hub", auction={"bid_timeout_s": 20})
    alive = env.config("alive", cpu=sim(base_ms=1))
    doomed = env.config("doomed", cpu=sim(base_ms=1))
    with env.spy(env.topics.availability("doomed")) as spy, env.node(alive):
        with env.node_process(doomed) as proc:
            proc.kill()
            spy.wait_for(lambda m: m.payload == b"offline", what="doomed's Will")
        code, out, _, err = env.trigger(hub, "who is there?")
    assert code == 0, err
    assert out is not None
    assert out["roster"] == ["alive"]
    assert out["winner"] == "alive"
    assert out["auction_ms"] < 5000


def test_a_device_that_only_asks_neither_bids_nor_is_waited_for(env: Env) -> None:
    """configs/orchestrator.yaml: a node with no NPU and no CPU runner. Its peers'
    auctions close on the other devices' bids, even while it is frozen."""
    caller = env.config("caller", auction={"bid_timeout_s": 20})
    worker = env.config("worker", cpu=sim(base_ms=1))
    with env.node(worker), env.node_process(env.config("asker")) as asker:
        code, out, _, err = env.trigger(caller, "first")
        assert code == 0 and out is not None, err
        assert [b["device"] for b in out["bids"]] == ["worker"] and out["roster"] == ["worker"]
        asker.pause()  # online by keepalive, answering nothing
        try:
            code, out, _, err = env.trigger(caller, "while it is frozen")
        finally:
            asker.resume()
    assert code == 0 and out is not None, err
    assert out["roster"] == ["worker"] and out["warnings"] == [], out["warnings"]


def test_peer_dying_mid_auction_shrinks_the_roster(env: Env) -> None:
    hub = env.config("hub", auction={"bid_timeout_s": 20})
    alive = env.config("alive", cpu=sim(base_ms=1))
    mute = subprocess.Popen([sys.executable, "-m", "tests.support.mute_peer", env.broker.host,
                             str(env.broker.port), env.prefix, "mute"],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert mute.stdout is not None and mute.stdout.readline().strip() == "ready"
        with env.node(alive):
            code, out, _, err = env.trigger(hub, "anyone?")
    finally:
        mute.kill()
        mute.communicate()
    assert code == 0, err
    assert out is not None
    assert out["roster"] == ["alive", "mute"], "the mute peer was online when the auction opened"
    assert [b["device"] for b in out["bids"]] == ["alive"]
    assert out["auction_ms"] < 10_000, "closed by the Will, not by the 20 s bid timeout"


def test_unreachable_broker_still_answers_locally(env: Env) -> None:
    hub = env.config("hub", cpu=sim(base_ms=1), broker={"port": free_port()})
    code, out, _, err = env.trigger(hub, "offline question")
    assert code == 0, err
    assert out is not None
    assert (out["path"], out["winner"]) == ("local-cpu", "hub")
    assert out["text"] == "offline question"
    assert any("not reachable" in w for w in out["warnings"])
    assert "not reachable" in err


def test_unreachable_broker_and_nothing_local_exits_3(env: Env) -> None:
    hub = env.config("hub", broker={"port": free_port()})
    code, out, _, err = env.trigger(hub, "nobody can run this")
    assert code == 3
    assert out is not None and out["path"] is None
    assert "not reachable" in err and "no usable executor" in err
    assert "running locally" not in err + "".join(out["warnings"]), "nothing here can run it"


def test_garbage_is_logged_and_dropped_and_service_continues(env: Env, caplog) -> None:
    import time

    from agent.messages import Metrics, Snapshot

    caplog.set_level("INFO", logger="agent.node")
    said = threading.Condition()

    class Notify(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            with said:
                said.notify_all()

    notify = Notify()
    logging.getLogger("agent.node").addHandler(notify)
    hub = env.config("hub")
    worker = env.config("worker", cpu=sim(base_ms=1))
    t = env.topics
    now = time.time()
    valid_request = BidRequest("r1", "hub", 30.0, 3, 8).to_payload()
    # Sent 100 s ago by hub, whose clock the worker knows from hub's live metrics.
    stale_request = BidRequest("r2", "hub", 30.0, 3, 8, sent_at=now - 100).to_payload()
    stale_job = Job("r3", "hub", "cpu", "claim", "x", 8, 3.0, 600.0, "result/hub/r3", sent_at=now - 100).to_payload()
    garbage = [
        (t.bid_request("g1"), b"\xff\xfe not utf-8"),
        (t.bid_request("g2"), b"{not json"),
        (t.bid_request("g3"), json.dumps({"v": 3, "rid": "g3", "origin": 5}).encode()),
        (t.bid_request("g5"), valid_request.replace(b'"v":3', b'"v":99')),
        (t.bid_request("g6"), b"[" * 10_000),                      # nested too deeply
        (t.bid_request("r2"), stale_request),
        (t.exec("worker"), b"\x00\x01\x02"),
        (t.exec("worker"), json.dumps({"v": 3, "rid": "j1", "mode": "gpu"}).encode()),
        (t.exec("worker"), stale_job),
        (t.cancel("worker", "hub"), b"{}"),
    ]
    hub_clock = Metrics("hub", now, Snapshot(False, False, 0, 0.0, 1000.0, 0.0, 0)).to_payload()
    with env.node(worker), env.spy(f"{env.prefix}result/#") as results:
        results.publish(t.metrics("hub"), hub_clock)  # live: the worker learns hub's clock
        for topic, payload in garbage:
            results.publish(topic, payload)
        code, out, _, err = env.trigger(hub, "still there?")
        assert code == 0, err
        assert out is not None and out["winner"] == "worker" and out["text"] == "still there?"
        assert not [m for m in results.seen if b'"j1"' in m.payload or b'"r3"' in m.payload]
        results.publish(t.metrics("hub"), b"", retain=True)
        # Each message is handled on a thread of its own kind (bids on paho's, jobs on the
        # dispatcher): wait for every line, not for the order they come in.
        def dropped() -> list[logging.LogRecord]:
            return [r for r in caplog.records if r.name == "agent.node" and
                    str(r.msg).startswith(("dropped", "ignored"))]
        with said:
            said.wait_for(lambda: len(dropped()) >= len(garbage), WAIT_S)
    logging.getLogger("agent.node").removeHandler(notify)
    assert len(dropped()) == len(garbage), "\n".join(r.getMessage() for r in dropped())


def test_an_oversized_message_never_reaches_the_node(env: Env, caplog) -> None:
    """The node tells the broker its largest packet (MQTT 5 Maximum Packet Size), so a
    huge message is dropped there instead of being read into the node's memory."""
    from agent.node import RECEIVE_FACTOR
    caplog.set_level("INFO", logger="agent.node")
    worker = env.config("worker", cpu=sim(base_ms=1), max_payload_bytes=8192)
    with env.node(worker), env.spy("nothing") as spy:
        spy.publish(env.topics.bid_request("big"), b"{" + b" " * (RECEIVE_FACTOR * 8192 + 10_000) + b"}")
        spy.publish(env.topics.bid_request("small"), b"{not json")
        spy.bus.barrier(5)
        assert env.trigger(env.config("hub"), "after")[0] == 0  # processed in order after both
    lines = [r.getMessage() for r in caplog.records if r.name == "agent.node" and "dropped" in r.getMessage()]
    assert any("/small" in line for line in lines) and not any("/big" in line for line in lines), lines


def test_broken_config_exits_2_listing_every_problem(env: Env, capsys) -> None:
    from agent.cli import main
    bad = env.tmp / "bad.yaml"
    bad.write_text(
        "device_id: 'not ok!'\n"
        "broker: {port: 'eighteen', colour: blue}\n"
        "cpu: {slots: 0, executor: {kind: quantum}}\n"
        "auction: {bid_timeout_s: -1}\n"
        "surprise: true\n")
    code = main(["trigger", "--config", str(bad), "hello"])
    err = capsys.readouterr().err
    assert code == 2
    for needle in ("device_id:", "broker.port:", "broker.colour: unknown key", "cpu.slots:",
                   "cpu.executor.kind:", "auction.bid_timeout_s:", "surprise: unknown key"):
        assert needle in err, f"{needle!r} missing from:\n{err}"
