"""The topic layout. Nobody else formats or parses a topic string.

    agent/<dev>/availability        online/offline, retained, the node's Will
    agent/<dev>/metrics             metrics JSON, retained
    agent/<dev>/trigger             a prompt from anyone (Home Assistant, mosquitto_pub)
    agent/<dev>/last_result         last answer, retained
    agent/<dev>/sync/<nonce>        a client's own round trip (retained-delivery barrier)
    bid/request/<rid>               call for bids
    bid/reply/<rid>/<dev>           a bid
    exec/<dev>                      a job for <dev>
    exec/result/<rid>/<dev>         result events of a job
    <discovery>/device/<dev>/config Home Assistant device discovery (not prefixed)
    <discovery>/status              Home Assistant's birth/will (not prefixed)

Every topic but Home Assistant's is under ``topic_prefix``. Anything that ends in the
speaker's device id does so on purpose: a broker ACL ``pattern write .../%u`` can then
stop one device from speaking for another.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Device ids, request ids and nonces: one topic level each, safe on every broker tested.
ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
ID_HINT = "use 1-64 of A-Z a-z 0-9 _ -"


def is_id(value: object) -> bool:
    """A whole string of 1-64 id characters (``fullmatch``: no trailing newline slips by)."""
    return isinstance(value, str) and ID_RE.fullmatch(value) is not None


@dataclass(frozen=True)
class ParsedTopic:
    kind: str  # availability | metrics | trigger | last_result | sync | bid_request |
    #            bid_reply | exec | exec_result | ha_status
    device: str | None = None
    rid: str | None = None


class Topics:
    """Builds and parses every topic for one ``topic_prefix``."""

    def __init__(self, prefix: str = "", discovery_prefix: str = "homeassistant"):
        self.prefix = prefix
        self.discovery_prefix = discovery_prefix

    # builders -------------------------------------------------------------------
    def availability(self, dev: str) -> str:
        return f"{self.prefix}agent/{_id(dev)}/availability"

    def metrics(self, dev: str) -> str:
        return f"{self.prefix}agent/{_id(dev)}/metrics"

    def trigger(self, dev: str) -> str:
        return f"{self.prefix}agent/{_id(dev)}/trigger"

    def last_result(self, dev: str) -> str:
        return f"{self.prefix}agent/{_id(dev)}/last_result"

    def sync(self, dev: str, nonce: str) -> str:
        return f"{self.prefix}agent/{_id(dev)}/sync/{_id(nonce)}"

    def bid_request(self, rid: str) -> str:
        return f"{self.prefix}bid/request/{_id(rid)}"

    def bid_reply(self, rid: str, dev: str) -> str:
        return f"{self.bid_reply_stem(rid)}/{_id(dev)}"

    def exec(self, dev: str) -> str:
        return f"{self.prefix}exec/{_id(dev)}"

    def exec_result(self, rid: str, dev: str) -> str:
        return f"{self.exec_result_stem(rid)}/{_id(dev)}"

    def exec_result_stem(self, rid: str) -> str:
        """Where the results of ``rid`` live, without the device level (a job's reply_to)."""
        return f"{self.prefix}exec/result/{_id(rid)}"

    def bid_reply_stem(self, rid: str) -> str:
        """Where the bids for ``rid`` live, without the device level (a call's response topic)."""
        return f"{self.prefix}bid/reply/{_id(rid)}"

    def ha_config(self, dev: str) -> str:
        return f"{self.discovery_prefix}/device/{_id(dev)}/config"

    def ha_status(self) -> str:
        return f"{self.discovery_prefix}/status"

    # subscription filters --------------------------------------------------------
    def all_availability(self) -> str:
        return f"{self.prefix}agent/+/availability"

    def all_metrics(self) -> str:
        return f"{self.prefix}agent/+/metrics"

    def all_bid_requests(self) -> str:
        return f"{self.prefix}bid/request/+"

    def bid_replies(self, rid: str) -> str:
        return f"{self.bid_reply_stem(rid)}/+"

    def exec_results(self, rid: str) -> str:
        return f"{self.exec_result_stem(rid)}/+"

    # parsing ----------------------------------------------------------------------
    def parse(self, topic: str) -> ParsedTopic | None:
        """Classify a topic; None for anything outside the layout or with a bad id."""
        if topic == self.ha_status():
            return ParsedTopic("ha_status")
        if not topic.startswith(self.prefix):
            return None
        levels = topic[len(self.prefix):].split("/")
        match levels:
            case ["agent", dev, ("availability" | "metrics" | "trigger" | "last_result") as kind]:
                return ParsedTopic(kind, device=dev) if is_id(dev) else None
            case ["agent", dev, "sync", nonce]:
                return ParsedTopic("sync", device=dev) if _ids(dev, nonce) else None
            case ["bid", "request", rid]:
                return ParsedTopic("bid_request", rid=rid) if is_id(rid) else None
            case ["bid", "reply", rid, dev]:
                return ParsedTopic("bid_reply", device=dev, rid=rid) if _ids(rid, dev) else None
            case ["exec", "result", rid, dev]:
                return ParsedTopic("exec_result", device=dev, rid=rid) if _ids(rid, dev) else None
            case ["exec", dev]:
                return ParsedTopic("exec", device=dev) if is_id(dev) else None
        return None


def _id(value: str) -> str:
    if not is_id(value):
        raise ValueError(f"not a valid topic id: {value!r}")
    return value


def _ids(*values: str) -> bool:
    return all(is_id(v) for v in values)
