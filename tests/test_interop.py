"""The same fleet on every tested broker: Mosquitto (MQTT 5 and 3.1.1), NATS and RabbitMQ.

Each broker is started privately on free ports by a fixture; a missing binary skips with
the reason. The subset covers presence (including RabbitMQ's missing retained-on-wildcard
delivery), the auction, dispatch, streaming, failover, the MQTT trigger and Home
Assistant discovery. A 3-server NATS cluster carries a fleet spread over its members, one
of which is killed mid-job.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.broker import Broker
from tests.support.brokers import BrokerMissing, LocalNats, LocalRabbit
from tests.support.fleet import Env, Gate, executions, job, sim
from tests.support.mosquitto import LocalMosquitto
from tests.test_reliability import Background, kill_the_winner, result_of

KINDS = ["mosquitto-5", "mosquitto-3.1.1", "nats", "rabbitmq"]


@pytest.fixture(scope="module", params=KINDS)
def interop_broker(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[tuple[Broker, str]]:
    """(the broker, the protocol the devices are configured with)."""
    kind: str = request.param
    work = tmp_path_factory.mktemp(kind)
    server: Any
    try:
        if kind.startswith("mosquitto"):
            server = LocalMosquitto(work)
        elif kind == "nats":
            server = LocalNats(work)
        else:
            server = LocalRabbit(work)
        server.start()
    except (BrokerMissing, Exception) as exc:
        pytest.skip(f"{kind}: {exc}")
    protocol = "3.1.1" if kind == "mosquitto-3.1.1" else "auto"
    yield Broker(host=server.host, port=server.port, kind=kind), protocol
    server.stop()


@pytest.fixture
def world(interop_broker: tuple[Broker, str], tmp_path: Path) -> Iterator[Env]:
    broker, protocol = interop_broker
    env = ProtocolEnv(broker=broker, prefix=f"io/{uuid.uuid4().hex[:8]}/", tmp=tmp_path)
    env.protocol = protocol
    yield env
    env.close()


class ProtocolEnv(Env):
    protocol = "auto"

    def config(self, device_id: str, **kw: Any) -> Path:  # type: ignore[override]
        broker = {"protocol": self.protocol, **kw.pop("broker", {})}
        return super().config(device_id, broker=broker, **kw)


def test_presence_auction_dispatch_and_streaming(world: Env) -> None:
    hub = world.config("hub", auction={"bid_timeout_s": 10})
    with world.node_process(world.config("w1", cpu=sim(base_ms=5, ms_per_token=5))), \
            world.node_process(world.config("w2", cpu=sim(base_ms=5, ms_per_token=5))):
        code, out, _, err = world.trigger(hub, "one two three four")
        status_code, status, _, _ = world.status(hub)
    assert code == 0, err
    assert out is not None and out["winner"] in ("w1", "w2") and out["text"].split() == ["one", "two", "three", "four"]
    assert sorted(b["device"] for b in out["bids"]) == ["w1", "w2"], "both were expected and bid"
    assert out["auction_ms"] < 5000, "the roster was known: the window closed when both were in"
    assert status_code == 0 and {d["device"] for d in status["devices"] if d["online"]} == {"w1", "w2"}


def test_a_winner_that_dies_before_answering_fails_over(world: Env) -> None:
    code, out, _ = kill_the_winner(world, "hold", kill_when="accepted")
    assert code == 0, out
    assert out["winner"] == "zz-second" and out["text"].strip() == "the prompt"


def test_an_mqtt_trigger_and_home_assistant_discovery(world: Env) -> None:
    node = world.config("dev", cpu=sim(base_ms=1), homeassistant={"enabled": True, "discovery_prefix": world.prefix
                                                                  + "homeassistant"})
    topics = world.topics
    with world.node_process(node), world.spy(f"{world.prefix}agent/dev/answer/+") as answers:
        answers.publish(topics.trigger("dev"), json.dumps({"prompt": "plain mqtt", "id": "q1"}).encode())
        answer = json.loads(answers.wait_for(lambda m: True, what="the answer").payload)
        with world.spy(f"{world.prefix}homeassistant/device/dev/config") as discovery:
            announced = json.loads(discovery.wait_for(lambda m: True, what="the retained discovery").payload)
    assert answer["ok"] and answer["text"].split() == ["plain", "mqtt"]
    assert announced["dev"]["ids"] and announced["cmps"]


# --------------------------------------------------------------------------- a NATS cluster

@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalNats]:
    try:
        nats = LocalNats(tmp_path / "nats", size=3)
        nats.start()
    except BrokerMissing as exc:
        pytest.skip(str(exc))
    yield nats
    nats.stop()


def test_a_fleet_spread_over_a_nats_cluster_survives_losing_a_member(cluster: LocalNats, tmp_path: Path) -> None:
    """Worker on member 0 (member 1 as its failover), the asker on member 2: the whole
    path crosses the cluster. Member 0 is killed while the job holds; the worker
    reconnects to member 1 and the answer arrives."""
    env = Env(broker=Broker(host="127.0.0.1", port=cluster.ports[2], kind="nats"), prefix="cl/", tmp=tmp_path)
    runs, gate = tmp_path / "runs.log", Gate(tmp_path / "gate")
    member = [{"host": "127.0.0.1", "port": p} for p in cluster.ports]
    worker = env.config("worker", cpu=job(runs, "hold", gate),
                        broker={**member[0], "failover": [f"127.0.0.1:{cluster.ports[1]}"], "keepalive_s": 2})
    hub = env.config("hub", broker={**member[2], "keepalive_s": 2}, auction={"bid_timeout_s": 10})
    try:
        with env.node_process(worker), env.spy(f"{env.prefix}result/#") as spy:
            asked = Background(env, hub, "across the cluster")
            spy.wait_for(result_of("accepted", "worker"), what="accepted", timeout=30)
            cluster.kill(0)
            gate.release(runs=1)
            code, out, err = asked.result(timeout=90)
    finally:
        env.close()
    assert code == 0, err
    assert out is not None and out["text"].split() == ["across", "the", "cluster"]
    assert list(executions(runs).values()) == [{"start": 1, "done": 1}], "once, to the end"


def test_a_broker_that_refuses_mqtt_5_is_named_as_refusing_not_unreachable(world: Env) -> None:
    """With protocol 5 forced: a broker that does not take it says so, in one line."""
    if world.broker.kind.startswith("mosquitto"):
        pytest.skip("Mosquitto takes MQTT 5")
    cfg = world.config("asker", broker={"protocol": "5"})
    code, _, _, err = world.run("status", "--config", str(cfg))
    assert code == 5, err
    assert "refused" in err and "not reachable" not in err, err
    assert "unsupported protocol" in err or "protocol: 3.1.1" in err, err
