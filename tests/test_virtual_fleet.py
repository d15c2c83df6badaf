"""scripts/fleet: light virtual devices that a real node cannot tell from real ones."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.messages import (
    Accepted,
    BidRequest,
    Cancel,
    Declined,
    Error,
    Job,
    cancel_check,
    decode_result,
    new_cancel_key,
)
from agent.outcome import SHOWN
from tests.support.fleet import Env

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from fleet import FleetError, Spec, VirtualFleet, main, raise_fd_limit

COUNT = 20


@pytest.fixture
def virtual(env: Env) -> Iterator[VirtualFleet]:
    spec = Spec(count=COUNT, brokers=((env.broker.host, env.broker.port),), prefix=env.prefix,
                speed=(1.0, 3.0), base_ms=1.0)
    fleet = VirtualFleet(spec)
    seen: list[int] = []
    fleet.start(lambda done, total: seen.append(done))
    assert seen[-1] == COUNT
    yield fleet
    fleet.stop()


def test_a_real_trigger_is_answered_by_a_virtual_device_and_every_one_bid(env: Env,
                                                                         virtual: VirtualFleet) -> None:
    hub = env.config("hub")  # runs nothing itself: the answer must come from the fleet
    code, out, _, err = env.trigger(hub, "hello from the virtual fleet")
    assert code == 0, err
    assert out is not None
    assert out["winner"].startswith("vdev-") and out["path"] == "peer-cpu"
    assert out["text"] == "hello from the virtual fleet"
    assert set(out["roster"]) >= {f"vdev-{i:04d}" for i in range(COUNT)}
    # Every bid counted, the best few listed (the winner's among them).
    assert out["bids_total"] == COUNT and len(out["bids"]) == SHOWN < COUNT
    assert out["winner"] in {b["device"] for b in out["bids"]}
    assert out["ranking_total"] >= COUNT and len(out["ranking"]) == SHOWN
    stats = virtual.stats()
    assert stats["bidders"] == COUNT and stats["bids"] == COUNT
    assert stats["done"] == 1 and stats["declined"] == 0


def test_a_job_without_a_claim_is_declined_and_a_cancel_stops_a_running_one(env: Env,
                                                                             virtual: VirtualFleet) -> None:
    t, dev = env.topics, "vdev-0003"
    with env.spy(f"{env.prefix}result/spy/#") as spy:
        forged = Job(rid="r1", origin="spy", mode="cpu", claim="made-up", prompt="a b", max_new_tokens=2,
                     accept_s=5, timeout_s=5, reply_to=t.result_stem("spy", "r1"))
        spy.publish(t.exec(dev), forged.to_payload())
        got = spy.wait_for(lambda m: m.topic == t.result("spy", "r1", dev), what="a decline")
        assert isinstance(decode_result(got.payload), Declined)

        # A call to this device alone (an invitation), then a long job on its claim, cancelled.
        call = BidRequest(rid="r2", origin="spy", window_s=5, prompt_tokens=1, max_new_tokens=500)
        with env.spy(f"{env.prefix}bid/reply/spy/#") as bids:
            spy.publish(t.bid_invite(dev, "r2", "spy"), call.to_payload())
            bid = bids.wait_for(lambda m: m.topic == t.bid_reply("spy", "r2", dev), what="its bid")
        from agent.messages import Bid
        claim = Bid.from_payload(bid.payload).claim
        key = new_cancel_key()
        job = Job(rid="r2", origin="spy", mode="cpu", claim=claim, prompt="word " * 500, max_new_tokens=500,
                  accept_s=5, timeout_s=60, reply_to=t.result_stem("spy", "r2"), cancel_check=cancel_check(key))
        spy.publish(t.exec(dev), job.to_payload())
        accepted = spy.wait_for(lambda m: m.topic == t.result("spy", "r2", dev), what="the accept")
        assert isinstance(decode_result(accepted.payload), Accepted)
        spy.publish(t.cancel(dev, "spy"), Cancel("r2", "spy", "wrong key").to_payload())
        spy.publish(t.cancel(dev, "spy"), Cancel("r2", "spy", key, "test").to_payload())
        stopped = spy.wait_for(lambda m: isinstance(decode_result(m.payload), Error), what="the cancel's error")
        err = decode_result(stopped.payload)
        assert isinstance(err, Error) and err.kind == "cancelled" and err.digest == job.digest
    stats = virtual.stats()
    assert stats["cancelled"] == 1 and stats["declined"] == 1 and stats["invites"] == 1


def test_bids_and_floor_replies_come_at_qos_0_as_a_nodes_bids(env: Env, virtual: VirtualFleet) -> None:
    """As agent/bids.py: a bid is sent at QoS 0 (on NATS a QoS 1 one is a JetStream write),
    so what the benchmark's floor and auctions measure is what a real fleet sends."""
    import threading

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    t, dev = env.topics, "vdev-0005"
    got: dict[str, int] = {}
    arrived, subscribed = threading.Event(), threading.Event()

    def on_message(c: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
        got[msg.topic] = msg.qos
        if len(got) == 2:
            arrived.set()

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="qos-probe", protocol=mqtt.MQTTv5)
    c.on_message = on_message
    c.on_subscribe = lambda *a: subscribed.set()
    c.connect(env.broker.host, env.broker.port)
    c.loop_start()
    try:
        c.subscribe([(f"{env.prefix}bid/reply/probe/#", 1), (f"{env.prefix}floor/rep/f1/{dev}", 1)])
        assert subscribed.wait(10)
        call = BidRequest(rid="q1", origin="probe", window_s=5, prompt_tokens=1, max_new_tokens=4)
        c.publish(t.bid_invite(dev, "q1", "probe"), call.to_payload(), qos=1)
        c.publish(f"{env.prefix}floor/req/f1", b"r", qos=1)
        assert arrived.wait(10), got
    finally:
        c.loop_stop()
        c.disconnect()
    assert got == {t.bid_reply("probe", "q1", dev): 0, f"{env.prefix}floor/rep/f1/{dev}": 0}


def test_a_refused_connection_is_a_clear_error(capsys) -> None:
    from tests.support.mosquitto import free_port
    port = free_port()  # nothing listens there
    assert main(["--count", "3", "--broker", f"127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err
    assert "could not connect vdev-0000" in err and str(port) in err
    with pytest.raises(FleetError, match="hard limit"):
        raise_fd_limit(10**12)


def test_help_names_the_options(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in ("--count", "--broker", "--mqtt", "--prefix", "--speed", "--seed", "--workers"):
        assert option in text


def test_a_bid_reuses_its_snapshot_s_json_until_a_job_starts_or_ends() -> None:
    """As a node: the JSON of an unchanged snapshot is kept, and a bid made while a job
    runs says so (a stale snapshot would keep inviting a busy device)."""
    import random

    from fleet import Device, Running

    from agent.messages import Snapshot, snapshot_members

    dev = Device(Spec(count=1, brokers=(("127.0.0.1", 1),), prefix="p/"), 0, random.Random(1))
    idle, members = dev.bid_snapshot()
    assert dev.bid_snapshot()[1] is members, "kept while nothing changed"
    assert members == snapshot_members(idle) and idle.queue_depth == 0
    dev.running["job"] = Running.__new__(Running)
    busy, busy_members = dev.bid_snapshot()
    assert busy.queue_depth == 1 and busy_members == snapshot_members(busy) != members
    del dev.running["job"]
    assert dev.bid_snapshot()[0] == idle and isinstance(idle, Snapshot)


def test_virtual_devices_read_publish_packets_with_the_node_s_decoder() -> None:
    """As a node's process (agent.bus installs it): the fleet installs agent.mqtt5's decoder
    itself, without importing the bus."""
    import subprocess

    from agent import mqtt5

    if not mqtt5.REPLACEABLE:
        pytest.skip("this paho keeps its own decoder")
    check = ("import sys; sys.path.insert(0, 'scripts'); import fleet; from agent import mqtt5; "
             "from paho.mqtt import _packet; "
             "assert 'agent.bus' not in sys.modules, 'the bus came along'; "
             "assert _packet.decode_publish is mqtt5.decode_publish, 'paho decodes as before'")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", check], cwd=root, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
