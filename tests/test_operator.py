"""The operator's view: status --watch, forget, the learnt estimates; and the broker's
protocol remembered between short-lived runs."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import psutil

from agent.armstore import ArmStore, learnt
from agent.bus import Bus, Message
from agent.config import BrokerConfig, parse_config
from agent.fleet import ProtocolMemory
from agent.linucb import features
from agent.messages import Metrics, Snapshot
from agent.roster import Roster
from agent.status import estimates, table
from agent.topics import Topics
from tests.support.fleet import WAIT_S, Env, sim
from tests.support.mosquitto import REPO


def test_status_watch_marks_a_killed_node_offline_within_its_keepalive(env: Env) -> None:
    """A killed node says nothing: the broker publishes its Will once the keepalive (1 s here)
    runs out, and `status --watch` follows the Will. Proven by events, not by a stopwatch: the
    Will is what marks it offline (a watch that waited for stale metrics would not follow it)."""
    hub = env.config("hub")
    doomed = env.node_process(env.config("doomed", cpu=sim(base_ms=1), broker={"keepalive_s": 1}))
    doomed.start()
    proc = subprocess.Popen([sys.executable, "-m", "agent", "status", "--config", str(hub), "--watch",
                             "--interval", "0.2", "--json"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        frames = iter(proc.stdout)  # one JSON object per refresh
        first = json.loads(next(frames))
        assert [d["online"] for d in first["devices"] if d["device"] == "doomed"] == [True]
        with env.spy(env.topics.availability("doomed")) as will:
            doomed.kill()
            will.wait_for(lambda m: m.payload == b"offline", what="the killed node's Will")
        shown = False
        # The watch has the Will by now (it heard it as the spy did): a frame or two later it
        # shows it. Counted in the watch's own refreshes (50 of 0.2 s), so a watch that never
        # follows the Will fails here instead of reading frames for ever.
        for line in itertools.islice(frames, 50):
            frame = json.loads(line)
            if [d["online"] for d in frame["devices"] if d["device"] == "doomed"] == [False]:
                shown = True
                break
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    assert shown, "status --watch never showed the killed node offline"


def test_forget_clears_a_retired_device_and_refuses_an_online_one(env: Env) -> None:
    hub = env.config("hub")
    dev = f"old-{env.prefix.split('/')[1][-8:]}"
    node = env.config(dev, cpu=sim(base_ms=1), homeassistant={"enabled": True})
    with env.node_process(node):
        code, out, _, err = env.run("forget", "--config", str(hub), dev)
        assert code == 2 and "is online" in err
    retained = [env.topics.availability(dev), env.topics.metrics(dev), env.topics.ha_config(dev)]
    with env.spy(env.topics.availability(dev)) as before:
        assert before.wait_for(lambda m: m.retain, what="its retained Will").payload == b"offline"
    code, out, _, err = env.run("forget", "--config", str(hub), dev)
    assert code == 0, err
    with env.spy(f"{env.prefix}agent/{dev}/#") as after, env.spy(env.topics.ha_config(dev)) as ha:
        assert after.bus.barrier(WAIT_S) and ha.bus.barrier(WAIT_S)
        left = [m.topic for m in after.seen + ha.seen if m.retain]
    assert left == [], f"still retained: {left}"
    assert all(t in out for t in retained)


def snapshot(cpu: float = 10.0) -> Snapshot:
    return Snapshot(has_npu=False, npu_free=False, cpu_slots=1, cpu_percent=cpu, mem_available_mb=4000.0, load1=0.1,
                    queue_depth=0)


def test_status_shows_what_the_arm_store_expects_of_each_device(tmp_path: Path) -> None:
    cfg = parse_config({"device_id": "hub", "state_dir": str(tmp_path)})
    store = ArmStore.for_config(cfg)
    for i in range(6):
        store.train("laptop", features(snapshot(), 64, 256), 2.0, f"r{i}")
    row = {"device": "laptop", "online": True, "npu": None, "cpu_slots": 1, "cpu_percent": 10.0,
           "mem_available_mb": 4000.0, "queue_depth": 0, "backlog_s": 0.0, "last_latency_ms": 2000.0,
           "health": "ok", "metrics_age_s": 1.0}
    row["models"] = {"cpu": {"name": "llama3.2-1b", "aliases": [], "warm": True}}
    rows = estimates([row, {**row, "device": "phone", "online": False, "models": {}}], learnt(cfg),
                     cfg.auction.linucb.lambda_)
    assert rows[0]["learnt_jobs"] == 6 and abs(rows[0]["estimate_s"] - 2.0) < 0.3
    assert rows[1]["estimate_s"] is None and rows[1]["learnt_jobs"] == 0
    lines = table(rows)
    assert "EST S" in lines[0] and lines[2].startswith("!phone"), "offline devices are marked"
    assert lines[1].endswith("cpu:llama3.2-1b*") and lines[2].endswith("-"), "models, * when warm"


def test_a_broker_that_took_mqtt_311_is_asked_in_311_next_time(tmp_path: Path) -> None:
    memory = ProtocolMemory(tmp_path)
    auto = BrokerConfig(host="nats.local", port=1883)
    assert memory.apply(auto).protocol == "auto", "nothing remembered yet"
    memory.record(auto, "3.1.1")
    assert memory.apply(auto).protocol == "3.1.1"
    assert memory.apply(BrokerConfig(host="other", port=1883)).protocol == "auto", "per broker"
    assert memory.apply(BrokerConfig(host="nats.local", port=1883, protocol="5")).protocol == "5", "config wins"
    memory.record(auto, "5")
    assert memory.apply(auto).protocol == "auto", "it takes MQTT 5 now: forgotten"
    (tmp_path / "broker-protocol.json").write_text("[not, a, mapping")
    assert memory.apply(auto).protocol == "auto", "a broken file is ignored"


def test_the_roster_waits_for_presence_answers_until_they_stop() -> None:
    topics = Topics("p/")
    roster = Roster(topics, "hub")
    asked = time.monotonic()
    for dev in ("a", "b"):
        roster.handle(Message(topics.availability(dev), b"online", retain=False))
    roster.handle(Message(topics.availability("old"), b"online", retain=True))  # stored, not an answer
    start = time.monotonic()
    heard = roster.wait_quiet(asked, quiet_s=0.05, timeout_s=60.0)
    assert heard == {"a", "b"}
    # Not a stopwatch: 0.05 s of quiet against a 60 s timeout; only waiting for the timeout fails.
    assert time.monotonic() - start < 30.0, "it ends when answers stop, not at the timeout"
    metrics = Metrics(device="c", ts=1.0, snapshot=snapshot())
    roster.handle_metrics(Message(topics.metrics("c"), metrics.to_payload(), retain=False))
    assert roster.wait_quiet(asked, quiet_s=0.05, timeout_s=5.0) == {"a", "b", "c"}, "metrics count as an answer"


def test_a_stopped_connection_leaves_no_socket_open(env: Env) -> None:
    """A command, a trigger or a restarted bus must give back every descriptor it took
    (paho's wake-up socket pair included), not leave them to the garbage collector."""
    me = psutil.Process()
    before = me.num_fds()
    buses = []
    for i in range(5):
        bus = Bus(f"fd-check-{i}", BrokerConfig(host=env.broker.host, port=env.broker.port), persistent=False,
                  sync_topic=env.topics.sync("fd-check", str(i)))
        bus.connect(WAIT_S)
        bus.stop()
        buses.append(bus)  # still referenced: nothing is collected
    assert me.num_fds() == before
