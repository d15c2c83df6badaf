"""agent.mqtt5 against paho itself: the same packets decode to the same message or fail
with the same exception type, and the properties it builds pack to the same bytes.

The reference is the installed paho's own code, so an upgrade that changes paho's
behaviour shows up here, not in a broker test."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

paho_packet = pytest.importorskip("paho.mqtt._packet")

from paho.mqtt.enums import MQTTProtocolVersion  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties, VariableByteIntegers  # noqa: E402

import agent.bus  # noqa: E402,F401 - installs the decoder
from agent import mqtt5  # noqa: E402

V5, V311 = MQTTProtocolVersion.MQTTv5, MQTTProtocolVersion.MQTTv311
EXAMPLES = settings(max_examples=400, derandomize=True, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))
PAHO = mqtt5._paho_decode  # paho's own decoder, kept when ours was installed


def _set(props: Properties) -> dict[str, Any]:
    return {k: v for k, v in props.__dict__.items() if k not in mqtt5._TABLES}


def _outcome(decode: Any, header: int, packet: bytes | bytearray, protocol: MQTTProtocolVersion) -> Any:
    try:
        r = decode(header, packet, protocol)
    except Exception as exc:  # the comparison is of what each raises (its words only reach a log line)
        return ("raised", type(exc))
    props = None if r.properties is None else _set(r.properties)
    return (r.dup, r.qos, r.retain, r.topic, r.mid, props, bytes(r.payload))


def _packet(topic: bytes, qos: int, props: bytes, payload: bytes, mid: int = 7) -> tuple[int, bytes]:
    header = 0x30 | (qos << 1)
    return header, struct.pack("!H", len(topic)) + topic + (struct.pack("!H", mid) if qos else b"") + props + payload


def test_the_decoder_is_installed_once_the_bus_is_imported() -> None:
    assert mqtt5.REPLACEABLE, "the installed paho is the one it was made for"
    assert paho_packet.decode_publish is mqtt5.decode_publish
    assert PAHO is not mqtt5.decode_publish


def test_a_paho_it_was_not_made_for_keeps_its_own_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mqtt5, "REPLACEABLE", False)
    monkeypatch.setattr(paho_packet, "decode_publish", PAHO)
    assert mqtt5.install() is False and paho_packet.decode_publish is PAHO


def test_without_paho_s_packet_module_the_bus_still_loads_and_builds_properties() -> None:
    """paho 2.1 has no ``paho.mqtt._packet``: nothing is replaced, and the rest works."""
    import subprocess
    import sys
    code = """
import sys
import paho.mqtt
import paho.mqtt.client  # it keeps its own reference; agent.mqtt5 finds no such module
del sys.modules["paho.mqtt._packet"], paho.mqtt._packet
class NoPacket:
    def find_spec(self, name, path=None, target=None):
        if name == "paho.mqtt._packet":
            raise ImportError(name)
sys.meta_path.insert(0, NoPacket())
import agent.bus
from agent import mqtt5
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
theirs = Properties(PacketTypes.PUBLISH)
theirs.MessageExpiryInterval = 30
theirs.ResponseTopic = "a/b"
print(mqtt5.REPLACEABLE, mqtt5.install(), mqtt5.publish_properties(30, "a/b").pack() == theirs.pack())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False", "True"]


# One property as paho's Properties would write it: ours, and others paho must read.
text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
prop = st.one_of(
    st.tuples(st.just("MessageExpiryInterval"), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("ResponseTopic"), text),
    st.tuples(st.just("CorrelationData"), st.binary(max_size=12)),
    st.tuples(st.just("PayloadFormatIndicator"), st.integers(0, 1)),
    st.tuples(st.just("ContentType"), text),
    st.tuples(st.just("TopicAlias"), st.integers(1, 65535)),
    st.tuples(st.just("SubscriptionIdentifier"), st.integers(1, 300_000)),
    st.tuples(st.just("UserProperty"), st.tuples(text, text)),
)


def _encoded(items: list[tuple[str, Any]], order: list[int]) -> bytes:
    """The property list with each item written by paho, in the order given (a peer's order
    need not be paho's), repeats included."""
    parts = []
    for name, value in items:
        one = Properties(PacketTypes.PUBLISH)
        setattr(one, name, value)
        packed = one.pack()
        parts.append(packed[VariableByteIntegers.decode(packed)[1]:])  # without its own length
    body = b"".join(part for _, part in sorted(zip(order, parts, strict=True)))
    return bytes(VariableByteIntegers.encode(len(body))) + body


@EXAMPLES
@given(items=st.lists(prop, max_size=5), seed=st.randoms(use_true_random=False), qos=st.integers(0, 2),
       topic=st.binary(max_size=20), payload=st.binary(max_size=40), as_bytearray=st.booleans())
def test_well_formed_packets_decode_as_paho_decodes_them(items: list[tuple[str, Any]], seed: Any, qos: int,
                                                          topic: bytes, payload: bytes, as_bytearray: bool) -> None:
    order = list(range(len(items)))
    seed.shuffle(order)
    header, packet = _packet(topic, qos, _encoded(items, order), payload)
    data = bytearray(packet) if as_bytearray else packet
    assert _outcome(mqtt5.decode_publish, header, data, V5) == _outcome(PAHO, header, data, V5)
    assert _outcome(mqtt5.decode_publish, header, data, V311) == _outcome(PAHO, header, data, V311)


@EXAMPLES
@given(header=st.integers(0x30, 0x3F), packet=st.binary(max_size=60))
def test_any_bytes_decode_or_fail_as_with_paho(header: int, packet: bytes) -> None:
    assert _outcome(mqtt5.decode_publish, header, packet, V5) == _outcome(PAHO, header, packet, V5)


@EXAMPLES
@given(items=st.lists(prop, min_size=1, max_size=4), cut=st.integers(1, 30), flip=st.integers(0, 255),
       at=st.integers(0, 40))
def test_damaged_property_lists_fail_or_decode_as_with_paho(items: list[tuple[str, Any]], cut: int, flip: int,
                                                            at: int) -> None:
    """Truncated lists, a length that says more or less than is there, a flipped byte."""
    props = _encoded(items, list(range(len(items))))
    for damaged in (props[:-cut], bytes([props[0] + 1]) + props[1:], props[:at] + bytes([flip]) + props[at + 1:]):
        header, packet = _packet(b"a/b", 1, damaged, b"payload")
        assert _outcome(mqtt5.decode_publish, header, packet, V5) == _outcome(PAHO, header, packet, V5)


@pytest.mark.parametrize("props", [
    b"\x00",                                        # none: the common case
    b"\x05\x02\x00\x00\x00\x0a",                    # expiry 10
    b"\x0a\x02\x00\x00\x00\x0a\x02\x00\x00\x00\x0b",  # expiry twice: paho refuses it
    b"\x03\x02\x00\x00",                             # expiry cut short
    b"\x04\x02\x00\x00\x00",                         # expiry one byte short
    b"\x04\x08\x00\x02\xed\xa0",                     # a response topic that is not UTF-8
    b"\x04\x08\x00\x02a\x00",                        # a response topic with a NUL
    b"\x03\x09\x00\x05",                             # correlation data longer than the list
    b"\x02\x80\x01",                                 # an identifier of two bytes
    b"\xff\xff\xff\xff\x7f",                         # a length of five bytes
    b"",                                             # no property length at all
])
def test_edge_cases_match_paho(props: bytes) -> None:
    for payload in (b"{}", b""):  # and with the list at the very end of the packet
        header, packet = _packet(b"x/y", 1, props, payload)
        assert _outcome(mqtt5.decode_publish, header, packet, V5) == _outcome(PAHO, header, packet, V5)


def test_an_empty_topic_is_paho_s_to_judge_in_mqtt5() -> None:
    header, packet = _packet(b"", 0, b"\x03\x23\x00\x05", b"hello")  # a topic alias, no topic
    ours = _outcome(mqtt5.decode_publish, header, packet, V5)
    assert ours == _outcome(PAHO, header, packet, V5)
    assert ours[0] is not "raised" and ours[5] == {"TopicAlias": 5}  # noqa: F632 - a tuple's tag


@EXAMPLES
@given(expiry=st.one_of(st.none(), st.integers(0, 2**32 - 1)), topic=st.one_of(st.none(), text),
       corr=st.one_of(st.none(), st.binary(max_size=20)), other=st.one_of(st.none(), prop))
def test_built_properties_pack_as_paho_packs_them(expiry: int | None, topic: str | None, corr: bytes | None,
                                                  other: tuple[str, Any] | None) -> None:
    ours = mqtt5.publish_properties(expiry, topic, corr)
    theirs = Properties(PacketTypes.PUBLISH)
    for name, value in (("MessageExpiryInterval", expiry), ("ResponseTopic", topic), ("CorrelationData", corr)):
        if value is not None:
            setattr(theirs, name, value)
    if other is not None and not hasattr(theirs, other[0]):
        setattr(ours, *other)
        setattr(theirs, *other)
    assert isinstance(ours, Properties)
    assert _set(ours) == _set(theirs)
    assert ours.pack() == theirs.pack() == Properties.pack(ours)
    assert str(ours) == str(theirs)


def test_clearing_forgets_what_was_set_and_keeps_paho_s_tables() -> None:
    props = mqtt5.publish_properties(5, "a/b", b"c")
    props.UserProperty = ("k", "v")
    props.clear()
    assert _set(props) == {} and props.isEmpty() and props.pack() == b"\x00"
    fresh = mqtt5.Props(PacketTypes.PUBLISH)
    assert fresh.names == Properties(PacketTypes.PUBLISH).names and _set(fresh) == {}
    with pytest.raises(Exception, match="does not apply"):  # paho's checks still apply
        fresh.SessionExpiryInterval = 5

