"""agent.mqtt5's batch of QoS 0 messages (``Bus.publish_many``, an auction's invitations)
against paho itself, on whichever paho is installed: the bytes are what paho's own
``publish(qos=0)`` queues for each message, what paho refuses is refused, and the batch
reaches paho's writer as one packet with one wake-up of its network thread."""

from __future__ import annotations

from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import mqtt5
from agent.bus import Bus
from agent.config import BrokerConfig

EXAMPLES = settings(max_examples=400, derandomize=True, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


class _Socket:
    """Enough of a socket for paho to believe it is connected (and to close it)."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        return len(data)

    def close(self) -> None:
        pass


def _client(v5: bool) -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311)
    client._sock = _Socket()  # type: ignore[assignment]  # "connected": paho queues instead of dropping
    return client


def _by_paho(messages: list[tuple[str, bytes]], v5: bool) -> Any:
    """What paho's own ``publish(qos=0)`` queues for each message, in order, or the type of
    what it raises."""
    client = _client(v5)
    queued: list[bytes] = []
    client._packet_queue = lambda command, packet, mid, qos, info=None: queued.append(bytes(packet))  # type: ignore[method-assign]
    try:
        for topic, payload in messages:
            client.publish(topic, payload, qos=0)
    except Exception as exc:  # noqa: BLE001 - what paho refuses, compared by type
        return ("raised", type(exc))
    return b"".join(queued)


def _by_batch(messages: list[tuple[str, bytes]], v5: bool) -> Any:
    try:
        return mqtt5.qos0_batch(messages, v5)
    except Exception as exc:  # noqa: BLE001
        return ("raised", type(exc))


# topics of every kind paho meets: ordinary ones, non-ASCII, empty, with wildcards
topics = st.one_of(st.text(min_size=1, max_size=70).filter(lambda t: "+" not in t and "#" not in t),
                   st.text(alphabet="ab/+#é", max_size=12))


@EXAMPLES
@given(messages=st.lists(st.tuples(topics, st.binary(max_size=300)), min_size=1, max_size=6), v5=st.booleans())
def test_a_batch_is_the_bytes_paho_writes_for_each_message_or_refused_as_paho_refuses(
        messages: list[tuple[str, bytes]], v5: bool) -> None:
    assert _by_batch(messages, v5) == _by_paho(messages, v5)


@pytest.mark.parametrize("size", [0, 1, 120, 121, 122, 16_375, 16_376, 16_377, 2_097_140, 2_097_160])
def test_a_batch_encodes_every_length_as_paho(size: int) -> None:
    """The remaining length takes one byte below 128, two below 16,384, three below 2 MiB:
    payloads straddling each step (the topic and its length prefix add 7 bytes)."""
    messages = [("a/b/c", b"x" * size), ("t", b"")]
    for v5 in (True, False):
        assert mqtt5.qos0_batch(messages, v5) == _by_paho(messages, v5)


@pytest.mark.parametrize("topic", ["x" * 65_536, "é" * 32_768, ""])
def test_a_topic_paho_refuses_is_refused_and_nothing_packed(topic: str) -> None:
    for v5 in (True, False):
        messages = [("fine", b"1"), (topic, b"2")]
        ours = _by_batch(messages, v5)
        assert ours == _by_paho(messages, v5), (topic[:3], v5)
        assert isinstance(ours, bytes) == (topic == "" and v5), "only MQTT 5 takes an empty topic (an alias)"


def test_a_batch_is_queued_as_one_packet_with_one_wake_up() -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    batch = mqtt5.qos0_batch([("a", b"1"), ("b", b"2"), ("c", b"3")], v5=True)
    assert mqtt5.queue_batch(client, batch) is False, "not connected: dropped, as paho drops a QoS 0 publish"
    assert not client._out_packet
    pair = _Socket()
    client._sock, client._sockpairW = _Socket(), pair  # type: ignore[assignment]
    client._thread = object()  # type: ignore[assignment]  # a network thread writes it, not this call
    assert mqtt5.queue_batch(client, batch) is True
    assert [(bytes(p["packet"]), p["qos"], p["command"]) for p in client._out_packet] == [(batch, 0, mqtt5.PUBLISH)]
    assert len(pair.sent) == 1, "paho's thread woken once"
    assert _by_paho([("a", b"1"), ("b", b"2"), ("c", b"3")], True) == batch


def test_a_paho_it_was_not_made_for_is_not_handed_a_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mqtt5, "BATCHABLE", False)
    client = _client(True)
    assert mqtt5.queue_batch(client, mqtt5.qos0_batch([("a", b"1")], v5=True)) is False
    assert not client._out_packet


@pytest.mark.parametrize("batchable", [True, False], ids=["batch", "one-at-a-time"])
def test_the_bus_hands_paho_one_packet_for_many_messages(monkeypatch: pytest.MonkeyPatch, batchable: bool) -> None:
    """``Bus.publish_many`` on a connected client: one packet for the lot where paho takes
    a batch; else one QoS 0 publish each. Either way the bytes are paho's."""
    monkeypatch.setattr(mqtt5, "BATCHABLE", batchable and mqtt5.BATCHABLE)
    bus = Bus("batcher", BrokerConfig(host="127.0.0.1", port=1, protocol="5"), persistent=False,
              sync_topic="b/sync", name="batcher")
    client = bus._state.current().client
    client._sock = _Socket()  # type: ignore[assignment]
    queued: list[tuple[bytes, int]] = []
    monkeypatch.setattr(client, "_packet_queue",
                        lambda command, packet, mid, qos, info=None: queued.append((bytes(packet), qos)))
    messages = [("inv/a", b"call"), ("inv/b", b"call"), ("inv/c", b"call")]
    bus.publish_many(messages)
    expected = mqtt5.qos0_batch(messages, v5=True)
    if batchable:
        assert queued == [(expected, 0)]
    else:
        assert [q for _, q in queued] == [0, 0, 0] and b"".join(p for p, _ in queued) == expected
    client._sock = None
    bus.stop()
