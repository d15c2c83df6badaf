"""The bus's link alone (agent/bus.py: _Clients, _LinkState, _Connector, _Callbacks behind
the Bus facade), on fake paho clients: a scripted broker answers each attempt at once on
the connecting thread (accept, refuse, hang up, stay silent, or be unreachable), and paho's
network thread is the test calling the callbacks. No broker, no sleeps; the real broker
band is tests/test_bus_reconnect.py, test_first_hour.py and test_home.py."""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import replace
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent import bus as bus_module
from agent import connection
from agent.bus import PACKET_OVERHEAD, Bus, Message, Will, _Clients, _Handle, _LinkState, expiry_interval
from agent.config import BrokerConfig, TLSConfig
from agent.connection import Failure, Link
from agent.errors import BrokerUnavailable, ConfigError, DuplicateIdentity

WAIT_S = 10.0
SILENT_S = 0.2   # how long an attempt waits on a broker that never answers (the bus's own timeout)

ACCEPT, ACCEPT_RESUMED, OLD, REFUSE, HANG_UP, SILENT, UNREACHABLE = (
    "accept", "accept resumed", "old protocol", "refuse", "hang up", "silent", "unreachable")


def success() -> ReasonCode:
    return ReasonCode(PacketTypes.CONNACK, "Success")


class Info:
    def __init__(self, fails: bool = False) -> None:
        self.waited: list[float] = []
        self.fails = fails

    def wait_for_publish(self, timeout: float) -> None:
        self.waited.append(timeout)
        if self.fails:
            raise RuntimeError("not connected")


class FakeClient:
    """What the bus uses of a paho client; ``loop_start`` lets the scripted broker answer."""

    def __init__(self, broker: FakeBroker, protocol: str) -> None:
        self.broker, self.protocol = broker, protocol
        self.calls: list[tuple[Any, ...]] = []
        self.connect_timeout: float | None = None
        self.on_connect = self.on_disconnect = self.on_connect_fail = self.on_message = None
        self.address: tuple[str, int] | None = None
        self.infos: list[Info] = []

    def connect(self, **args: Any) -> None:
        self.calls.append(("connect", args))
        self.address = (args["host"], args["port"])
        if self.broker.behaviour(self) == UNREACHABLE:
            raise ConnectionRefusedError(111, "Connection refused")

    def connect_async(self, **args: Any) -> None:
        self.calls.append(("connect_async", args))

    def loop_start(self) -> None:
        self.calls.append(("loop_start",))
        what = self.broker.behaviour(self)
        if what in (ACCEPT, ACCEPT_RESUMED):
            self.on_connect(self, None, mqtt.ConnectFlags(what == ACCEPT_RESUMED), success(), None)
        elif what in (OLD, REFUSE):
            code = 0x84 if what == OLD else 0x87
            self.on_connect(self, None, mqtt.ConnectFlags(False), ReasonCode(PacketTypes.CONNACK, identifier=code),
                            None)
            self.disconnected()  # paho's own, after a refusal
        elif what == HANG_UP:
            self.disconnected()

    def disconnected(self, reason: ReasonCode | None = None) -> None:
        self.on_disconnect(self, None, mqtt.DisconnectFlags(False),
                           reason or ReasonCode(PacketTypes.DISCONNECT, identifier=0x80), None)

    def loop_stop(self) -> None:
        self.calls.append(("loop_stop",))

    def disconnect(self, properties: Properties | None = None) -> None:
        self.calls.append(("disconnect", properties))

    def subscribe(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append(("subscribe", args, kwargs))

    def unsubscribe(self, topic: str) -> None:
        self.calls.append(("unsubscribe", topic))

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False,
                properties: Properties | None = None) -> Info:
        self.calls.append(("publish", topic, payload, qos, retain, properties))
        if self.broker.echo:
            msg = mqtt.MQTTMessage(topic=topic.encode())
            msg.payload, msg.qos = payload, qos
            self.on_message(self, None, msg)
        info = Info(self.broker.publish_fails)
        self.infos.append(info)
        return info

    def reconnect_delay_set(self, min_delay: float, max_delay: float) -> None:
        self.calls.append(("reconnect_delay_set", min_delay, max_delay))

    def _reset_sockets(self) -> None:
        self.calls.append(("reset_sockets",))

    def named(self, name: str) -> list[tuple[Any, ...]]:
        return [c for c in self.calls if c[0] == name]


class FakeBroker:
    """Scripted answers per address ("host:port") and, optionally, per protocol."""

    def __init__(self, **answers: str | dict[str, str]) -> None:
        self.answers = {k.replace("_", ":"): v for k, v in answers.items()}
        self.clients: list[FakeClient] = []
        self.made: queue.Queue[FakeClient] = queue.Queue()  # each client as it is made
        self.echo = True
        self.publish_fails = False

    def behaviour(self, client: FakeClient) -> str:
        assert client.address is not None
        host, port = client.address
        answer = self.answers.get(f"{host}:{port}", UNREACHABLE)
        return answer if isinstance(answer, str) else answer[client.protocol]

    def new(self, protocol: str) -> FakeClient:
        client = FakeClient(self, protocol)
        self.clients.append(client)
        self.made.put(client)
        return client


def config(protocol: str = "auto", failover: tuple[tuple[str, int], ...] = ()) -> BrokerConfig:
    return BrokerConfig(host="a", port=1, protocol=protocol, failover=failover, keepalive_s=7,
                        session_expiry_s=99)


@pytest.fixture
def make(monkeypatch: pytest.MonkeyPatch):
    """Buses whose clients come from a FakeBroker; every one is stopped at the end."""
    made: list[Bus] = []

    def build(broker: FakeBroker, cfg: BrokerConfig | None = None, **kwargs: Any) -> Bus:
        monkeypatch.setattr(_Clients, "new", lambda self, protocol: broker.new(protocol))
        kwargs.setdefault("persistent", True)
        kwargs.setdefault("sync_topic", "sync/me")
        made.append(Bus("me", cfg or config(), name="t", **kwargs))
        return made[-1]
    yield build
    for b in made:
        b.stop()


class Heard:
    """A link listener and a connect callback that record, and signal, what they hear."""

    def __init__(self) -> None:
        self.link: queue.Queue[tuple[bool, bool]] = queue.Queue()
        self.connects: queue.Queue[tuple[bool, str]] = queue.Queue()

    def listener(self, up: bool, session_present: bool) -> None:
        self.link.put((up, session_present))

    def on_connect(self, session_present: bool) -> None:
        self.connects.put((session_present, threading.current_thread().name))


# _Clients ---------------------------------------------------------------------------
def test_connect_args_carry_the_session_and_packet_limit_with_mqtt_5_only() -> None:
    clients = _Clients("me", config(failover=(("b", 2),)), persistent=True, will=None, reconnect_max_s=5.0,
                       max_packet_bytes=1000, look_only=False)
    args = clients.connect_args(_Handle(None, "5", 1))  # type: ignore[arg-type]
    props = args.pop("properties")
    assert args == {"host": "b", "port": 2, "keepalive": 7, "clean_start": False}
    assert props.SessionExpiryInterval == 99 and props.MaximumPacketSize == 1000 + PACKET_OVERHEAD
    assert clients.connect_args(_Handle(None, "3.1.1", 0)) == {"host": "a", "port": 1,  # type: ignore[arg-type]
                                                               "keepalive": 7}
    assert clients.address(_Handle(None, "5", 1)) == "b:2"  # type: ignore[arg-type]


def test_a_clean_session_without_a_packet_limit_sends_neither() -> None:
    clients = _Clients("me", config(), persistent=False, will=None, reconnect_max_s=5.0,
                       max_packet_bytes=None, look_only=False)
    args = clients.connect_args(_Handle(None, "5", 0))  # type: ignore[arg-type]
    assert args["clean_start"] is True
    assert not hasattr(args["properties"], "SessionExpiryInterval")
    assert not hasattr(args["properties"], "MaximumPacketSize")


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
@pytest.mark.parametrize("persistent", [True, False])
def test_a_new_client_speaks_the_protocol_and_keeps_the_session_asked_for(protocol: str, persistent: bool) -> None:
    will = Will("avail/me", b"offline", qos=1, retain=True)
    clients = _Clients("me", config(), persistent=persistent, will=will, reconnect_max_s=3.0,
                       max_packet_bytes=None, look_only=protocol == "5")
    client = clients.new(protocol)
    try:
        assert client.protocol == (mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311)
        assert client._client_id == b"me"
        assert getattr(client, "_clean_session", None) is (None if protocol == "5" else not persistent)
        assert client._manual_ack is (protocol == "5")  # look_only: acknowledge nothing
        assert (client._reconnect_min_delay, client._reconnect_max_delay) == (connection.RECONNECT_FIRST_S[1], 3.0)
        assert client._max_queued_messages == 10_000
        assert client._reconnect_on_failure is True, "after a drop, paho reconnects by itself"
        assert client.on_socket_open is bus_module.set_nodelay
        assert (client._will_topic, client._will_payload, client._will_qos, client._will_retain) == (
            b"avail/me", b"offline", 1, True)
        assert client.username is None
    finally:
        client._reset_sockets()


def test_a_client_logs_in_with_the_password_file(tmp_path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    client = _Clients("me", replace(config(), username="dev", password_file=str(secret)), persistent=True,
                      will=None, reconnect_max_s=5.0, max_packet_bytes=None, look_only=False).new("5")
    try:
        assert (client.username, client.password) == ("dev", "s3cret")
        assert client._will is False
    finally:
        client._reset_sockets()


def test_tls_files_that_cannot_be_loaded_are_a_config_error(tmp_path) -> None:
    cfg = replace(config(), tls=TLSConfig(ca_file=str(tmp_path / "missing.pem")))
    with pytest.raises(ConfigError, match="broker.tls: cannot load the TLS files"):
        _Clients("me", cfg, persistent=True, will=None, reconnect_max_s=5.0, max_packet_bytes=None,
                 look_only=False).new("5")


# _LinkState -------------------------------------------------------------------------
def test_the_link_state_swaps_handles_whole_and_keeps_the_first_fatal_error() -> None:
    first = _Handle("c1", "5", 0)  # type: ignore[arg-type]
    state = _LinkState("t", first, Link.initial(2, "auto"))
    second = _Handle("c2", "3.1.1", 1)  # type: ignore[arg-type]
    assert state.swap(second) is first and state.current() is second
    assert state.retarget(0) == _Handle("c2", "3.1.1", 0) == state.current()  # type: ignore[arg-type]
    assert state.set_started(True) is False and state.is_started() is True
    assert state.set_started(False) is True and state.is_started() is False
    state.record(bus_module._Outcome(Failure.DROPPED, "x"))
    assert state.last_outcome() == bus_module._Outcome(Failure.DROPPED, "x")
    assert state.begin_attempt() == state.current() and state.last_outcome() is None
    one, two = DuplicateIdentity("me", "one"), DuplicateIdentity("me", "two")
    assert state.fatal is None
    assert state.set_fatal(one) is True and state.set_fatal(two) is False and state.fatal is one


def test_an_illegal_event_is_logged_and_changes_nothing(caplog) -> None:
    caplog.set_level(logging.ERROR, logger="agent.bus")
    state = _LinkState("t", _Handle("c", "5", 0), Link.initial(1, "5"))  # type: ignore[arg-type]
    link, action = state.step(connection.Connected())
    assert link.phase is connection.Phase.UP
    link, action = state.step(connection.Begin())  # a round while up: impossible
    assert link.phase is connection.Phase.UP and action == connection.Nothing()
    assert [r.getMessage().startswith("t: ") and r.getMessage().endswith("(ignored)") for r in caplog.records] == [True]


# _Connector: one round -----------------------------------------------------------------
def test_a_connect_subscribes_everything_once_and_tells_the_listeners_and_the_callback(make) -> None:
    heard = Heard()
    broker = FakeBroker(a_1=ACCEPT_RESUMED)
    b = make(broker, on_connect=heard.on_connect)
    b.subscribe("x/+", lambda m: None, qos=0)
    b.on_link(heard.listener)
    assert not b.connected and b.epoch == 0
    b.connect(WAIT_S)
    assert b.connected and b.epoch == 1 and b.protocol == "5" and b.address == "a:1"
    (client,) = broker.clients
    assert client.named("subscribe") == [("subscribe", ([("sync/me", 1), ("x/+", 0)],), {})]
    assert client.connect_timeout == pytest.approx(WAIT_S, abs=1.0)
    assert heard.link.get(timeout=WAIT_S) == (True, True)
    assert heard.connects.get(timeout=WAIT_S) == (True, "t-dispatch")
    assert b.fatal is None


def test_a_look_only_bus_subscribes_to_nothing(make) -> None:
    broker = FakeBroker(a_1=ACCEPT)
    make(broker, look_only=True).connect(WAIT_S)
    assert broker.clients[0].named("subscribe") == []


def test_auto_falls_back_to_3_1_1_on_a_fresh_client_and_says_so(make, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="agent.bus")
    broker = FakeBroker(a_1={"5": OLD, "3.1.1": ACCEPT})
    b = make(broker)
    b.connect(WAIT_S)
    assert b.protocol == "3.1.1" and b.connected
    first, second = broker.clients
    assert (first.protocol, second.protocol) == ("5", "3.1.1")
    # closed after its attempt, and once more when the next attempt replaced it
    assert [c[0] for c in first.calls[-4:]] == ["disconnect", "loop_stop", "reset_sockets", "reset_sockets"]
    assert second.named("reset_sockets") == []
    assert [r.getMessage() for r in caplog.records] == [
        "t: the broker at a:1 does not take MQTT 5 (refused the connection: unsupported protocol version "
        "(Unsupported protocol version)); using MQTT 3.1.1"]


def test_every_attempt_after_the_first_gets_a_fresh_client(make) -> None:
    broker = FakeBroker(a_1=SILENT)
    b = make(broker, cfg=config("5"))
    with pytest.raises(BrokerUnavailable):
        b.connect(SILENT_S)
    with pytest.raises(BrokerUnavailable):
        b.connect(SILENT_S)
    assert len(broker.clients) == 2, "the first attempt used the client made at start; the second a new one"


def test_a_broker_that_hangs_up_on_mqtt_5_is_reported_with_the_fix(make) -> None:
    b = make(FakeBroker(a_1=HANG_UP), cfg=config("5"))
    with pytest.raises(BrokerUnavailable) as err:
        b.connect(WAIT_S)
    assert (err.value.host, err.value.port, err.value.refused) == ("a", 1, True)
    assert err.value.reason == ("the broker hung up before answering the MQTT 5 CONNECT (set broker.protocol: "
                                "3.1.1 if it only speaks that)")
    assert not b.connected


def test_a_hang_up_on_3_1_1_has_no_protocol_advice(make) -> None:
    b = make(FakeBroker(a_1=HANG_UP), cfg=config("3.1.1"))
    with pytest.raises(BrokerUnavailable) as err:
        b.connect(WAIT_S)
    assert err.value.reason == "the broker hung up before answering the MQTT 3.1.1 CONNECT"


def test_auto_that_hangs_up_on_both_protocols_gets_advice_for_neither(make) -> None:
    b = make(FakeBroker(a_1=HANG_UP))
    with pytest.raises(BrokerUnavailable) as err:
        b.connect(WAIT_S)
    assert err.value.reason == ("the broker hung up before answering the MQTT 5 CONNECT; "
                                "the broker hung up before answering the MQTT 3.1.1 CONNECT")


def test_a_refusal_keeps_the_brokers_reason_not_pahos_disconnect(make) -> None:
    b = make(FakeBroker(a_1=REFUSE), cfg=config("5"))
    with pytest.raises(BrokerUnavailable) as err:
        b.connect(WAIT_S)
    assert err.value.refused and err.value.reason == "refused the connection: Not authorized"


def test_failover_moves_on_and_names_each_address_that_failed(make, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="agent.bus")
    b = make(FakeBroker(c_3=ACCEPT), cfg=config("5", failover=(("b", 2), ("c", 3))))
    b.connect(WAIT_S)
    assert b.address == "c:3" and b.connected
    assert caplog.records == [], "moving on to another address is no fallback to 3.1.1"
    b2 = make(FakeBroker(b_2=SILENT), cfg=config("5", failover=(("b", 2),)))
    with pytest.raises(BrokerUnavailable) as err:
        b2.connect(1.0)
    assert (err.value.host, err.value.port, err.value.refused) == ("a", 1, False)
    assert err.value.reason.startswith("a:1: connection refused (is the broker running?); b:2: no answer within ")


def test_a_round_with_one_address_names_no_address(make) -> None:
    b = make(FakeBroker(), cfg=config("5"))
    with pytest.raises(BrokerUnavailable) as err:
        b.connect(WAIT_S)
    assert err.value.reason == "connection refused (is the broker running?)" and not err.value.refused


def test_a_broker_that_never_answers_is_no_answer_and_the_dispatcher_stops(make) -> None:
    b = make(FakeBroker(a_1=SILENT), cfg=config("5"))
    with pytest.raises(BrokerUnavailable) as err:
        b.connect(SILENT_S)
    assert err.value.reason == "no answer within 0.2 s" and not err.value.refused  # what was left of it, rounded
    assert "t-dispatch" not in [t.name for t in threading.enumerate()]


def test_a_connection_dropped_before_the_attempt_ends_is_reported_as_dropped(make, monkeypatch) -> None:
    broker = FakeBroker(a_1=ACCEPT)
    b = make(broker, cfg=config("5"))
    real = FakeClient.loop_start

    def accept_then_drop(client: FakeClient) -> None:
        real(client)
        client.disconnected()
    monkeypatch.setattr(FakeClient, "loop_start", accept_then_drop)
    with pytest.raises(BrokerUnavailable) as err:
        b.connect(WAIT_S)
    assert err.value.reason == "disconnected: Unspecified error" and not err.value.refused


def test_an_unresolvable_or_silent_address_is_described(make) -> None:
    import socket
    assert bus_module._describe(socket.gaierror(-2, "Name or service not known")) == \
        "cannot resolve host (Name or service not known)"
    assert bus_module._describe(TimeoutError()) == "connection timed out"
    assert bus_module._describe(OSError("boom")) == "boom"
    assert bus_module._describe(OSError()) == "OSError"


# _Connector: in the background ------------------------------------------------------------
def test_start_connects_in_the_background(make) -> None:
    heard = Heard()
    b = make(FakeBroker(a_1=ACCEPT))
    b.on_link(heard.listener)
    b.start()
    assert heard.link.get(timeout=WAIT_S) == (True, False)
    assert b.connected


def test_the_background_connector_says_each_new_reason_once_and_stops_when_asked(make, caplog, monkeypatch) -> None:
    caplog.set_level(logging.WARNING, logger="agent.bus")
    broker = FakeBroker()
    b = make(broker, cfg=config("5"))
    b.start()
    for _ in range(4):  # the client made at start, then one per attempt: three rounds
        broker.made.get(timeout=WAIT_S)
    b.stop()
    said = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert said == ["t: connection refused (is the broker running?); retrying"]
    made = len(broker.clients)
    assert "t-connect" not in [t.name for t in threading.enumerate()]
    assert len(broker.clients) == made


def test_an_unexpected_error_in_a_round_is_logged_and_the_connector_carries_on(make, caplog, monkeypatch) -> None:
    caplog.set_level(logging.WARNING, logger="agent.bus")
    heard = Heard()
    broker = FakeBroker(a_1=ACCEPT)
    b = make(broker, cfg=config("5"))
    b.on_link(heard.listener)
    real = bus_module._Connector.connect_once
    calls = []

    def once(self, timeout):
        calls.append(timeout)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        return real(self, timeout)
    monkeypatch.setattr(bus_module._Connector, "connect_once", once)
    monkeypatch.setattr(bus_module, "FIRST_CONNECT_MAX_S", 0.01)
    b.start()
    assert heard.link.get(timeout=WAIT_S) == (True, False)
    assert calls == [bus_module.CONNECT_ATTEMPT_S] * 2
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs[:2] == ["t: connect attempt failed unexpectedly; retrying", "t: a bug; retrying"]


# _Callbacks ---------------------------------------------------------------------------
def connected(make, cfg: BrokerConfig | None = None, **kwargs: Any) -> tuple[Bus, FakeBroker, Heard]:
    heard = Heard()
    broker = FakeBroker(a_1=ACCEPT, b_2=ACCEPT)
    b = make(broker, cfg=cfg or config("5"), **kwargs)
    b.on_link(heard.listener)
    b.connect(WAIT_S)
    assert heard.link.get(timeout=WAIT_S) == (True, False)
    return b, broker, heard


def test_a_lost_broker_tells_the_listeners_and_paho_retries_soon(make, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="agent.bus")
    b, broker, heard = connected(make, reconnect_max_s=4.0)
    client = broker.clients[0]
    client.disconnected()
    assert not b.connected and heard.link.get_nowait() == (False, False)
    ((_, first, cap),) = client.named("reconnect_delay_set")
    assert connection.RECONNECT_FIRST_S[0] <= first <= connection.RECONNECT_FIRST_S[1] and cap == 4.0
    assert [r.getMessage() for r in caplog.records] == ["t: lost the broker at a:1 (Unspecified error); reconnecting"]
    assert b.fatal is None
    client.on_connect(client, None, mqtt.ConnectFlags(True), success(), None)  # paho's reconnect
    assert b.connected and b.epoch == 2 and heard.link.get_nowait() == (True, True)


def test_a_session_taken_over_by_a_newcomer_is_fatal_once(make, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="agent.bus")
    fatal: queue.Queue[tuple[Exception, str]] = queue.Queue()
    b, broker, heard = connected(make, on_fatal=lambda e: fatal.put((e, threading.current_thread())))
    client = broker.clients[0]
    client.disconnected(ReasonCode(PacketTypes.DISCONNECT, identifier=142))
    error, thread = fatal.get(timeout=WAIT_S)
    assert isinstance(error, DuplicateIdentity) and thread.name == "t-fatal" and thread.daemon and b.fatal is error
    assert "gave our session to a new connection" in str(error)
    assert client.named("reconnect_delay_set") == []
    client.on_connect(client, None, mqtt.ConnectFlags(False), success(), None)
    client.disconnected(ReasonCode(PacketTypes.DISCONNECT, identifier=142))
    assert b.fatal is error and fatal.empty()
    assert [r.levelno for r in caplog.records].count(logging.ERROR) == 1


def test_an_established_node_takes_its_identity_back(make, caplog, monkeypatch) -> None:
    caplog.set_level(logging.WARNING, logger="agent.bus")
    b, broker, heard = connected(make)
    clock = [1000.0]
    monkeypatch.setattr(bus_module.time, "monotonic", lambda: clock[0])
    client = broker.clients[0]
    client.on_connect(client, None, mqtt.ConnectFlags(True), success(), None)  # connected at 1000
    clock[0] += connection.FLAP_WINDOW_S + 1
    client.disconnected(ReasonCode(PacketTypes.DISCONNECT, identifier=142))
    assert b.fatal is None
    assert caplog.records[-1].getMessage().startswith("t: another client connected as me;")
    assert len(client.named("reconnect_delay_set")) == 1


def test_quick_drops_in_a_row_are_fatal(make) -> None:
    b, broker, heard = connected(make)
    client = broker.clients[0]
    for _ in range(connection.FLAP_LIMIT - 1):
        client.disconnected()
        assert b.fatal is None
        client.on_connect(client, None, mqtt.ConnectFlags(False), success(), None)
    client.disconnected()
    assert isinstance(b.fatal, DuplicateIdentity)
    assert f"dropped us {connection.FLAP_LIMIT} times" in str(b.fatal)


def test_failed_reconnects_move_to_the_next_address(make, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="agent.bus")
    b, broker, heard = connected(make, cfg=config("5", failover=(("b", 2),)))
    client = broker.clients[0]
    client.disconnected()
    caplog.clear()
    client.on_connect_fail(client, None)
    assert client.named("connect_async") == [] and b.address == "a:1"
    client.on_connect_fail(client, None)
    ((_, args),) = client.named("connect_async")
    assert (args["host"], args["port"]) == ("b", 2) and b.address == "b:2"
    client.on_connect_fail(client, None)
    assert [r.getMessage() for r in caplog.records] == ["t: cannot reach the broker at a:1; retrying",
                                                        "t: trying the next broker address, b:2",
                                                        "t: cannot reach the broker at b:2; retrying"]


def test_failed_reconnects_at_the_only_address_are_said_once(make, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="agent.bus")
    b, broker, heard = connected(make)
    client = broker.clients[0]
    client.disconnected()
    caplog.clear()
    for _ in range(3):
        client.on_connect_fail(client, None)
    assert [r.getMessage() for r in caplog.records] == ["t: cannot reach the broker at a:1; retrying"]
    assert client.named("connect_async") == []


def test_an_address_that_turns_a_reconnect_away_counts_as_a_failed_reconnect(make) -> None:
    b, broker, heard = connected(make, cfg=config("5", failover=(("b", 2),)))
    client = broker.clients[0]
    client.disconnected()
    client.disconnected()  # reached, hung up before a CONNACK
    client.disconnected()
    assert [(a["host"], a["port"]) for _, a in client.named("connect_async")] == [("b", 2)]
    assert heard.link.get_nowait() == (False, False) and heard.link.empty(), "one drop, told once"


def test_a_failed_reconnect_in_the_middle_of_a_round_changes_nothing(make) -> None:
    broker = FakeBroker(a_1=SILENT)
    b = make(broker, cfg=config("5", failover=(("b", 2),)))
    with pytest.raises(BrokerUnavailable):
        b.connect(SILENT_S)
    client = broker.clients[-1]
    client.on_connect_fail(client, None)  # a round is no reconnect: the connector owns the address
    assert client.named("connect_async") == []


def test_callbacks_of_a_replaced_client_are_ignored(make) -> None:
    heard = Heard()
    broker = FakeBroker(a_1={"5": OLD, "3.1.1": ACCEPT})
    b = make(broker)
    b.on_link(heard.listener)
    b.connect(WAIT_S)
    assert heard.link.get(timeout=WAIT_S) == (True, False)
    old = broker.clients[0]
    old.disconnected()
    old.on_connect_fail(old, None)
    old.on_connect(old, None, mqtt.ConnectFlags(False), success(), None)
    assert b.connected and b.epoch == 1 and heard.link.empty()
    assert old.named("reconnect_delay_set") == [] and old.named("subscribe") == []


def test_a_stopped_bus_takes_its_own_disconnect_calmly(make, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="agent.bus")
    b, broker, heard = connected(make)
    b.stop()
    broker.clients[0].disconnected()
    assert heard.link.empty() and b.fatal is None and not b.connected
    assert caplog.records == [], "no lost broker, no failed reconnect: the policy hears nothing"


def test_a_bus_whose_connect_failed_has_nothing_left_to_disconnect(make) -> None:
    broker = FakeBroker(a_1=REFUSE)
    b = make(broker, cfg=config("5"))
    with pytest.raises(BrokerUnavailable):
        b.connect(WAIT_S)
    assert len(broker.clients[0].named("disconnect")) == 1, "the failed attempt's own"
    b.stop()
    assert len(broker.clients[0].named("disconnect")) == 1


def test_stop_waits_for_the_connector_to_end_its_attempt(make, monkeypatch) -> None:
    broker = FakeBroker(a_1=SILENT)
    b = make(broker, cfg=config("5"))
    in_attempt, release = threading.Event(), threading.Event()

    def hang_up_when_released(client: FakeClient) -> None:
        in_attempt.set()
        release.wait(WAIT_S)
        client.disconnected()  # no CONNACK: the attempt ends at once
    monkeypatch.setattr(FakeClient, "loop_start", hang_up_when_released)
    b.start()
    assert in_attempt.wait(WAIT_S)
    (connector,) = [t for t in threading.enumerate() if t.name == "t-connect"]
    assert connector.daemon
    stopped = threading.Event()
    stopper = threading.Thread(target=lambda: (b.stop(), stopped.set()))
    stopper.start()
    returned_early = stopped.wait(0.5)  # a floor, not a ceiling: stop cannot return before the release
    release.set()
    assert stopped.wait(WAIT_S)
    assert not returned_early, "stop returned while the connector was still in an attempt"
    assert not connector.is_alive()


def test_messages_become_ours_with_their_mqtt_5_properties(make) -> None:
    b, broker, heard = connected(make)
    got: queue.Queue[tuple[Message, str]] = queue.Queue()
    b.subscribe("in/+", lambda m: got.put((m, threading.current_thread().name)))
    b.subscribe("in/#", lambda m: got.put((m, threading.current_thread().name)), inline=True)
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic, props.CorrelationData, props.MessageExpiryInterval = "re/1", b"id", 30
    msg = mqtt.MQTTMessage(mid=1, topic=b"in/x")
    msg.payload, msg.qos, msg.retain, msg.dup, msg.properties = b"hi", 1, True, True, props
    client = broker.clients[0]
    client.on_message(client, None, msg)
    inline = got.get_nowait()
    assert inline == (Message("in/x", b"hi", 1, True, True, "re/1", b"id", 30), threading.current_thread().name)
    assert got.get(timeout=WAIT_S) == (inline[0], "t-dispatch")
    plain = mqtt.MQTTMessage(mid=2, topic=b"in/y")
    plain.payload = b"3"
    client.on_message(client, None, plain)
    assert got.get_nowait()[0] == Message("in/y", b"3", 0, False, False, None, None, None)


# the facade ------------------------------------------------------------------------
def test_subscriptions_reach_the_broker_once_per_filter_while_connected(make) -> None:
    b, broker, heard = connected(make)
    client = broker.clients[0]
    one = b.subscribe("s/1", lambda m: None, qos=0)
    two = b.subscribe("s/1", lambda m: None)
    assert client.named("subscribe")[1:] == [("subscribe", ("s/1",), {"qos": 0})]
    b.unsubscribe(one)
    assert client.named("unsubscribe") == []
    b.unsubscribe(two)
    assert client.named("unsubscribe") == [("unsubscribe", "s/1")]


def test_subscriptions_made_while_down_wait_for_the_connect(make) -> None:
    broker = FakeBroker(a_1=ACCEPT)
    b = make(broker, cfg=config("5"))
    sub = b.subscribe("s/1", lambda m: None)
    b.unsubscribe(sub)
    b.subscribe("s/2", lambda m: None)
    assert broker.clients[0].named("subscribe") == []
    b.connect(WAIT_S)
    assert broker.clients[0].named("subscribe") == [("subscribe", ([("sync/me", 1), ("s/2", 1)],), {})]
    assert broker.clients[0].named("unsubscribe") == []


def test_publish_adds_mqtt_5_properties_only_on_mqtt_5(make) -> None:
    b, broker, heard = connected(make)
    broker.echo = False
    b.publish("t", b"p", qos=0, retain=True, expiry_s=1.2, response_topic="r", correlation_data=b"c")
    b.publish("t", b"p")
    b.publish("t", b"p", expiry_s=0)
    (_, topic, payload, qos, retain, props), plain, zero = broker.clients[0].named("publish")
    assert (topic, payload, qos, retain) == ("t", b"p", 0, True)
    assert (props.MessageExpiryInterval, props.ResponseTopic, props.CorrelationData) == (2, "r", b"c")
    assert plain[1:] == ("t", b"p", 1, False, None)
    assert zero[5].MessageExpiryInterval == 1 and not hasattr(zero[5], "ResponseTopic")
    b311, broker311, _ = connected(make, cfg=config("3.1.1"))
    broker311.echo = False
    b311.publish("t", b"p", expiry_s=5, response_topic="r", correlation_data=b"c")
    assert broker311.clients[0].named("publish")[0][5] is None


def test_publish_properties_are_set_one_by_one(make) -> None:
    b, broker, heard = connected(make)
    broker.echo = False
    b.publish("t", b"", response_topic="r")
    b.publish("t", b"", correlation_data=b"c")
    only_response, only_correlation = (c[5] for c in broker.clients[0].named("publish"))
    assert only_response.ResponseTopic == "r" and not hasattr(only_response, "CorrelationData")
    assert not hasattr(only_response, "MessageExpiryInterval")
    assert only_correlation.CorrelationData == b"c" and not hasattr(only_correlation, "ResponseTopic")


@pytest.mark.parametrize(("seconds", "interval"), [(0, 1), (0.2, 1), (1.0, 1), (1.001, 2), (59.5, 60)])
def test_the_message_expiry_is_whole_seconds_rounded_up_and_at_least_one(seconds: float, interval: int) -> None:
    assert expiry_interval(seconds) == interval


def test_a_barrier_is_a_round_trip_on_the_sync_topic(make) -> None:
    b, broker, heard = connected(make)
    assert b.barrier(WAIT_S) is True
    (_, topic, token, qos, retain, _) = broker.clients[0].named("publish")[0]
    assert (topic, qos, retain, len(token)) == ("sync/me", 1, False, 8)
    broker.echo = False
    assert b.barrier(SILENT_S) is False


def test_stop_sends_the_final_messages_then_ends_the_session_if_asked(make) -> None:
    b, broker, heard = connected(make)
    broker.echo = False
    client = broker.clients[0]
    b.stop([("avail/me", b"offline", True), ("x", b"y", False)], timeout=3.0, end_session=True)
    assert [c[1:5] for c in client.named("publish")] == [("avail/me", b"offline", 1, True), ("x", b"y", 1, False)]
    assert all(0 < info.waited[0] <= 3.0 for info in client.infos)
    ((_, props),) = client.named("disconnect")
    assert props.SessionExpiryInterval == 0
    assert [c[0] for c in client.calls[-2:]] == ["loop_stop", "reset_sockets"]
    assert not b.connected and "t-dispatch" not in [t.name for t in threading.enumerate()]


@pytest.mark.parametrize(("cfg", "persistent"), [(config("5"), False), (config("3.1.1"), True)])
def test_the_session_is_ended_only_for_a_persistent_mqtt_5_client(make, cfg: BrokerConfig, persistent: bool) -> None:
    b, broker, heard = connected(make, cfg=cfg, persistent=persistent)
    b.stop(end_session=True)
    assert broker.clients[0].named("disconnect") == [("disconnect", None)]


def test_stop_without_end_session_keeps_the_session(make) -> None:
    b, broker, heard = connected(make)
    b.stop()
    assert broker.clients[0].named("disconnect") == [("disconnect", None)]


def test_a_final_message_that_cannot_be_sent_does_not_stop_the_stop(make) -> None:
    b, broker, heard = connected(make)
    broker.echo, broker.publish_fails = False, True
    b.stop([("a", b"1", True), ("b", b"2", True)])
    assert len(broker.clients[0].infos) == 2 and all(i.waited for i in broker.clients[0].infos)
    assert len(broker.clients[0].named("disconnect")) == 1


def test_a_bus_that_is_down_sends_no_final_messages(make) -> None:
    b, broker, heard = connected(make)
    client = broker.clients[0]
    client.disconnected()
    b.stop([("avail/me", b"offline", True)])
    assert client.named("publish") == [] and len(client.named("disconnect")) == 1


def test_a_bus_never_started_stops_without_disconnecting(make) -> None:
    broker = FakeBroker()
    b = make(broker)
    b.stop([("avail/me", b"offline", True)])
    assert broker.clients[0].named("disconnect") == [] and broker.clients[0].named("reset_sockets") != []


# the small pieces ---------------------------------------------------------------------
def test_only_pahos_shutdown_race_is_kept_out_of_the_log() -> None:
    keep = bus_module._DropShutdownRace().filter
    record = logging.LogRecord("agent.bus.paho", logging.ERROR, "", 0, "Client is not connected", None, None)
    assert keep(record) is False
    record.msg = "Connection lost"
    assert keep(record) is True


def test_a_will_is_retained_at_qos_1_and_handles_are_frozen() -> None:
    will = Will("t", b"p")
    assert (will.qos, will.retain) == (1, True)
    for frozen in (will, _Handle(None, "5", 0), bus_module._Outcome(Failure.DROPPED, "x")):  # type: ignore[arg-type]
        with pytest.raises(AttributeError):
            frozen.qos = 0  # type: ignore[union-attr]


def test_nagle_is_turned_off_on_tcp_sockets_and_other_sockets_are_left_alone() -> None:
    import socket
    with socket.socket() as tcp:
        bus_module.set_nodelay(None, None, tcp)  # type: ignore[arg-type]
        assert tcp.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    with socket.socket(socket.AF_UNIX) as unix:
        bus_module.set_nodelay(None, None, unix)  # type: ignore[arg-type]
    bus_module.set_nodelay(None, None, object())  # type: ignore[arg-type]  # no socket at all


def test_a_nonce_is_twelve_hex_digits_and_new_each_time() -> None:
    one, two = bus_module.new_nonce(), bus_module.new_nonce()
    assert len(one) == 12 and int(one, 16) >= 0 and one != two


def test_the_packet_limit_leaves_4_kib_for_topic_properties_and_headers() -> None:
    assert PACKET_OVERHEAD == 4096


def test_a_client_without_pahos_socket_cleanup_is_closed_quietly() -> None:
    bus_module._close_sockets(object())  # type: ignore[arg-type]
