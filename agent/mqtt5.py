"""MQTT 5 PUBLISH properties at the cost of the three this project sends.

paho (2.2) gives every PUBLISH an MQTT 5 client reads a ``Properties`` object, and that
object's constructor, ``clear`` and attribute checks each walk all 27 property names in pure
Python. Measured here: reading a PUBLISH costs 30 µs with no property at all and 70 µs with
the three a call for bids carries (message expiry, response topic, correlation data),
against 3 µs for the rest of the packet; building and packing those three costs the sender
another 65 µs. At eight devices that is about a quarter of a node's work per call for bids,
and an asker reads every bid through it.

- ``Props`` is a ``Properties`` (paho's methods, checks and errors all still apply) that is
  cheap to make: its tables are paho's own, shared (paho only reads them); ``clear`` looks
  only at what is set; ``pack`` writes the three properties above itself when they are all
  there is, and leaves anything else to paho.
- ``install`` swaps paho's PUBLISH decoder for one that reads the packet's fixed part with
  paho's 3.1.1 code and the three properties with paho's own field readers. Any other
  property, a repeated one, or one that runs past the property list goes to paho's
  ``unpack``, so what paho accepts, rejects or makes of it stays paho's.

- ``qos0_batch`` packs many QoS 0 PUBLISH packets into one buffer and ``queue_batch`` hands
  it to paho's writer as one packet: one wake-up of paho's network thread and one write,
  where publishing each costs a byte through paho's wake-up socket pair and a hand-over of
  the interpreter between the two threads, every time (an auction's twenty invitations).

tests/test_mqtt5.py holds both to paho's results, byte for byte, and to its exception type
for whatever paho refuses (the message can differ: it only shows in a log line), on the paho
that is installed; tests/test_mqtt5_batch.py does the same for the batch, on any paho.
paho calls ``on_publish`` once for a batch (nothing here sets it) and logs no "Sending
PUBLISH" line for its messages. With a paho that lacks what this relies on (2.1 has no packet module),
``install`` does nothing and paho's own decoder runs; ``Props`` works on either.
"""

from __future__ import annotations

import inspect
import struct
from collections.abc import Iterable
from typing import Any

from paho.mqtt.client import Client, MQTTMessageInfo
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties, VariableByteIntegers, readBytes, readUTF

try:
    from paho.mqtt.exception import MalformedPacket
except ImportError:  # paho 2.1 keeps it beside the properties
    from paho.mqtt.properties import MalformedPacket  # type: ignore[attr-defined]

try:
    from paho.mqtt import _packet
except ImportError:  # paho 2.1: no separate decoder to replace; its own code stays
    _packet = None  # type: ignore[assignment]

# What the decoder below relies on, as paho 2.2 has it: the packet module with its
# decoder and error wrapper, and field readers bounded by the property list's length.
REPLACEABLE = _packet is not None and hasattr(_packet, "decode_publish") and hasattr(_packet, "convert_exception") \
    and len(inspect.signature(readBytes).parameters) == 2

# What ``queue_batch`` relies on, in 2.1 and 2.2 alike: the writer's queue (one packet's
# bytes, written in order with the others) and the message ids it numbers packets by.
BATCHABLE = all(hasattr(Client, name) for name in ("_packet_queue", "_mid_generate")) \
    and list(inspect.signature(Client._packet_queue).parameters)[:6] == ["self", "command", "packet", "mid", "qos",
                                                                        "info"]
PUBLISH = 0x30
MAX_PAYLOAD = 268_435_455   # MQTT's largest remaining length, as paho checks a payload

_TABLES = frozenset(("packetType", "types", "names", "properties"))
_tables: dict[int, dict[str, Any]] = {}

# The properties read and written here: identifier -> paho's attribute name.
EXPIRY, RESPONSE_TOPIC, CORRELATION = 2, 8, 9
_OURS = {EXPIRY: "MessageExpiryInterval", RESPONSE_TOPIC: "ResponseTopic", CORRELATION: "CorrelationData"}
_OUR_NAMES = frozenset(_OURS.values())


class Props(Properties):
    """paho's ``Properties``, made from a copy of its tables instead of building them."""

    def __init__(self, packetType: int):  # noqa: N803 - paho's name
        tables = _tables.get(packetType)
        if tables is None:
            tables = _tables[packetType] = dict(Properties(packetType).__dict__)
        self.__dict__.update(tables)

    def clear(self) -> None:
        for name in [n for n in self.__dict__ if n not in _TABLES]:
            delattr(self, name)

    def pack(self) -> bytes:
        d = self.__dict__
        if not _OUR_NAMES.issuperset(n for n in d if n not in _TABLES):
            return bytes(super().pack())
        out = bytearray()
        expiry = d.get("MessageExpiryInterval")
        if expiry is not None:
            out += struct.pack("!BL", EXPIRY, expiry)
        topic = d.get("ResponseTopic")
        if topic is not None:
            raw = topic if isinstance(topic, bytes) else topic.encode("utf-8")
            out += struct.pack("!BH", RESPONSE_TOPIC, len(raw)) + raw
        corr = d.get("CorrelationData")
        if corr is not None:
            out += struct.pack("!BH", CORRELATION, len(corr)) + corr
        return bytes(VariableByteIntegers.encode(len(out)) + out)


def publish_properties(expiry_interval: int | None = None, response_topic: str | None = None,
                       correlation_data: bytes | None = None) -> Props:
    """A PUBLISH's properties, set as paho's attribute assignment sets these three (it checks
    no range for them)."""
    props = Props(PacketTypes.PUBLISH)
    d = props.__dict__
    if expiry_interval is not None:
        d["MessageExpiryInterval"] = expiry_interval
    if response_topic is not None:
        d["ResponseTopic"] = response_topic
    if correlation_data is not None:
        d["CorrelationData"] = correlation_data
    return props


def read_properties(props: Props, buf: bytes | bytearray) -> int:
    """Read the property list at the start of ``buf`` into ``props`` (empty); its length in
    bytes, as ``Properties.unpack`` returns it."""
    length, used = VariableByteIntegers.decode(buf)
    pos: int = used
    end: int = used + length
    d = props.__dict__
    while pos < end:
        name = _OURS.get(buf[pos])  # an identifier below 128 is one byte
        left = end - pos - 1
        if name is None or name in d:
            break
        if buf[pos] == EXPIRY:
            if left < 4:
                break
            d[name] = struct.unpack_from("!L", buf, pos + 1)[0]
            pos += 5
        elif buf[pos] == RESPONSE_TOPIC:
            d[name], n = readUTF(buf[pos + 1:], left)
            pos += 1 + n
        else:
            d[name], n = readBytes(buf[pos + 1:], left)
            pos += 1 + n
    if pos == end:
        return end
    props.clear()  # not one of ours, repeated, or past the end: paho reads it all again
    return int(props.unpack(buf)[1])


def _decode_publish(header: int, packet: bytes | bytearray, protocol: MQTTProtocolVersion) -> Any:
    if protocol != MQTTProtocolVersion.MQTTv5:
        return _paho_decode(header, packet, protocol)
    try:
        head = _paho_decode(header, packet, MQTTProtocolVersion.MQTTv311)
    except MalformedPacket:  # an empty topic (a topic alias) is fine in MQTT 5: paho decides
        return _paho_decode(header, packet, protocol)
    rest = head.payload
    props = Props(PacketTypes.PUBLISH)
    n = 1 if rest[:1] == b"\x00" else read_properties(props, rest)
    return head._replace(properties=props, payload=rest[n:])


if REPLACEABLE:
    _paho_decode = _packet.decode_publish
    decode_publish = _packet.convert_exception(_decode_publish)


def qos0_batch(messages: Iterable[tuple[str, bytes]], v5: bool) -> bytes:
    """PUBLISH packets at QoS 0, not retained and with no properties, one after another:
    the bytes paho writes for each such ``publish``. A topic paho would refuse (a wildcard,
    over 65,535 bytes, empty on 3.1.1) or a payload over MQTT's limit is refused the same
    way (ValueError), and nothing is packed; a payload must be bytes."""
    out = bytearray()
    empty = b"\x00" if v5 else b""   # an MQTT 5 PUBLISH carries its property list's length
    for topic, payload in messages:
        name = topic.encode("utf-8")
        if (not name and not v5) or b"+" in name or b"#" in name or len(name) > 65535:
            raise ValueError(f"cannot publish to topic {topic[:80]!r}")
        if len(payload) > MAX_PAYLOAD:
            raise ValueError("payload too large")
        out.append(PUBLISH)
        out += VariableByteIntegers.encode(2 + len(name) + len(empty) + len(payload))
        out += struct.pack("!H", len(name)) + name + empty + payload
    return bytes(out)


def queue_batch(client: Client, packets: bytes) -> bool:
    """Hand ``qos0_batch``'s bytes to ``client``'s writer as one packet. False where paho
    would drop a QoS 0 publish (no connection) or is not the paho this was made for."""
    if not BATCHABLE or client._sock is None:
        return False
    mid = client._mid_generate()
    client._packet_queue(PUBLISH, packets, mid, 0, MQTTMessageInfo(mid))
    return True


def install() -> bool:
    """Read PUBLISH packets with ``decode_publish`` from now on (every paho client in this
    process); False, and paho's own decoder, if this paho is not the one it was made for."""
    if not REPLACEABLE:
        return False
    _packet.decode_publish = decode_publish
    return True
