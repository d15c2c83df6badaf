"""The topic layout. Nobody else formats or parses a topic string.

    agent/<dev>/availability             online/offline, retained, the node's Will
    agent/<dev>/metrics                  metrics JSON, retained
    agent/<dev>/trigger                  a prompt for <dev> to orchestrate (Home Assistant, mosquitto_pub)
    agent/<dev>/last_result              the last answer to a trigger, retained
    agent/<dev>/answer/<id>              the answer to the trigger that carried this id
    agent/<dev>/sync/<nonce>             a client's own round trip (retained-delivery barrier)
    agent/<dev>/presence                 <dev> asks who is online: nodes announce themselves again
    bid/request/<rid>/<origin>           call for bids from <origin> (public: every device may bid)
    bid/request/<rid>                    the same, from before calls named their caller (still heard)
    bid/invite/<dev>/<rid>/<origin>      a call for bids from <origin> to <dev> alone (large fleets invite)
    bid/reply/<origin>/<rid>/<dev>       a bid: from <dev>, for <origin> only
    exec/<dev>                           a job for <dev>
    exec/<dev>/cancel/<origin>           <origin> abandons a job it sent to <dev>
    result/<origin>/<rid>/<dev>          result events of a job: from <dev>, for <origin> only
    capabilities/<dev>                   what the operator allows <dev> to claim, retained (operators write)
    <discovery>/device/<dev>/config      Home Assistant device discovery (not prefixed)
    <discovery>/status                   Home Assistant's birth/will (not prefixed)

Every topic but Home Assistant's is under ``topic_prefix``. Every topic that carries a
device's private data (bids with their claims, results, answers) or an action on its
work (a job's cancel) names the devices allowed to read or write it, so that a broker ACL
of ``%u`` patterns can enforce it (``mosquitto/edge-agent.acl``): only ``<dev>`` writes
``.../<dev>``, only ``<origin>`` reads ``bid/reply/<origin>/#`` and ``result/<origin>/#``
and writes ``bid/request/+/<origin>`` and ``bid/invite/+/+/<origin>``, only ``<dev>`` reads
``bid/invite/<dev>/#``, and ``exec/+/cancel/<origin>``. The agent checks
the same rules on what it receives. Ids are one topic level each, from a character set every tested broker
accepts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

# Device ids, request ids, answer ids and nonces: one topic level each, safe on every
# broker tested (no "." for NATS, no wildcards, no "/").
ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
ID_HINT = "use 1-64 of A-Z a-z 0-9 _ -"


def is_id(value: object) -> bool:
    """A whole string of 1-64 id characters (``fullmatch``: no trailing newline slips by)."""
    return isinstance(value, str) and ID_RE.fullmatch(value) is not None


@dataclass(frozen=True)
class ParsedTopic:
    kind: str  # availability | metrics | trigger | last_result | presence | answer | sync | bid_request |
    #            bid_invite | bid_reply | exec | cancel | result | capabilities | ha_status
    device: str | None = None   # whose topic it is (the speaker, the job's executor, the invitee)
    rid: str | None = None
    origin: str | None = None   # the orchestrator a private topic belongs to
    nonce: str | None = None    # sync nonce, answer id


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

    def answer(self, dev: str, answer_id: str) -> str:
        return f"{self.prefix}agent/{_id(dev)}/answer/{_id(answer_id)}"

    def sync(self, dev: str, nonce: str) -> str:
        return f"{self.prefix}agent/{_id(dev)}/sync/{_id(nonce)}"

    def presence(self, dev: str) -> str:
        return f"{self.prefix}agent/{_id(dev)}/presence"

    def bid_request(self, rid: str, origin: str | None = None) -> str:
        """A call for bids; with ``origin`` (what orchestrators send) the topic names its
        caller, so the ACL lets a device call only as itself and a node can bound each
        caller's share (``ledger.JobLedger.offer``). Without, the older form."""
        if origin is None:
            return f"{self.prefix}bid/request/{_id(rid)}"
        return f"{self.prefix}bid/request/{_id(rid)}/{_id(origin)}"

    def bid_invite(self, dev: str, rid: str, origin: str) -> str:
        """A call for bids addressed to ``dev`` alone: in a large fleet an orchestrator
        invites a few devices instead of calling everyone, and the broker delivers the call
        only to them. The payload is a call's."""
        return f"{self.prefix}bid/invite/{_id(dev)}/{_id(rid)}/{_id(origin)}"

    def bid_reply(self, origin: str, rid: str, dev: str) -> str:
        return f"{self.bid_reply_stem(origin, rid)}/{_id(dev)}"

    def bid_reply_stem(self, origin: str, rid: str) -> str:
        """Where the bids for ``rid`` go, without the device level (a call's response topic)."""
        return f"{self.prefix}bid/reply/{_id(origin)}/{_id(rid)}"

    def exec(self, dev: str) -> str:
        return f"{self.prefix}exec/{_id(dev)}"

    def cancel(self, dev: str, origin: str) -> str:
        return f"{self.prefix}exec/{_id(dev)}/cancel/{_id(origin)}"

    def result(self, origin: str, rid: str, dev: str) -> str:
        return f"{self.result_stem(origin, rid)}/{_id(dev)}"

    def result_stem(self, origin: str, rid: str) -> str:
        """Where the results of ``rid`` go, without the device level (a job's reply_to)."""
        return f"{self.prefix}result/{_id(origin)}/{_id(rid)}"

    def capabilities(self, dev: str) -> str:
        return f"{self.prefix}capabilities/{_id(dev)}"

    def ha_config(self, dev: str) -> str:
        return f"{self.discovery_prefix}/device/{_id(dev)}/config"

    def ha_status(self) -> str:
        return f"{self.discovery_prefix}/status"

    # subscription filters --------------------------------------------------------
    def all_availability(self) -> str:
        return f"{self.prefix}agent/+/availability"

    def all_metrics(self) -> str:
        return f"{self.prefix}agent/+/metrics"

    def all_capabilities(self) -> str:
        return f"{self.prefix}capabilities/+"

    def all_presence(self) -> str:
        return f"{self.prefix}agent/+/presence"

    def all_bid_requests(self) -> str:
        """Every call for bids, in both forms."""
        return f"{self.prefix}bid/request/#"

    def bid_invites(self, dev: str) -> str:
        """Every invitation addressed to ``dev``."""
        return f"{self.prefix}bid/invite/{_id(dev)}/+/+"

    def all_bid_replies(self, origin: str) -> str:
        """Every bid for every auction of ``origin``."""
        return f"{self.prefix}bid/reply/{_id(origin)}/+/+"

    def cancels(self, dev: str) -> str:
        return f"{self.prefix}exec/{_id(dev)}/cancel/+"

    def all_results(self, origin: str) -> str:
        """Every result of every job ``origin`` dispatched."""
        return f"{self.prefix}result/{_id(origin)}/+/+"

    # parsing ----------------------------------------------------------------------
    def parse(self, topic: str) -> ParsedTopic | None:
        """Classify a topic; None for anything outside the layout or with a bad id."""
        if topic == self.ha_status():
            return ParsedTopic("ha_status")
        if not topic.startswith(self.prefix):
            return None
        levels = topic[len(self.prefix):].split("/")
        match levels:
            case ["agent", dev, ("availability" | "metrics" | "trigger" | "last_result" | "presence") as kind]:
                return ParsedTopic(kind, device=dev) if is_id(dev) else None
            case ["agent", dev, ("sync" | "answer") as kind, nonce]:
                return ParsedTopic(kind, device=dev, nonce=nonce) if _ids(dev, nonce) else None
            case ["bid", "request", rid]:
                return ParsedTopic("bid_request", rid=rid) if is_id(rid) else None
            case ["bid", "request", rid, origin]:
                return ParsedTopic("bid_request", rid=rid, origin=origin) if _ids(rid, origin) else None
            case ["bid", "invite", dev, rid, origin]:
                return ParsedTopic("bid_invite", device=dev, rid=rid, origin=origin) if _ids(dev, rid, origin) else None
            case ["bid", "reply", origin, rid, dev]:
                return ParsedTopic("bid_reply", device=dev, rid=rid, origin=origin) if _ids(origin, rid, dev) else None
            case ["capabilities", dev]:
                return ParsedTopic("capabilities", device=dev) if is_id(dev) else None
            case ["exec", dev]:
                return ParsedTopic("exec", device=dev) if is_id(dev) else None
            case ["exec", dev, "cancel", origin]:
                return ParsedTopic("cancel", device=dev, origin=origin) if _ids(dev, origin) else None
            case ["result", origin, rid, dev]:
                return ParsedTopic("result", device=dev, rid=rid, origin=origin) if _ids(origin, rid, dev) else None
        return None


def _id(value: str) -> str:
    if not is_id(value):
        raise ValueError(f"not a valid topic id: {value!r}")
    return value


def _ids(*values: str) -> bool:
    return all(is_id(v) for v in values)


# --------------------------------------------------------------------------- the ACL

def broker_acl(topics: Topics, devices: Sequence[str], operators: Sequence[str] = ()) -> str:
    """A Mosquitto ``acl_file`` for this layout: every device may speak only as itself and
    read only what is addressed to it; operators (Home Assistant, dashboards) read every
    device's topics and send prompts. ``%u`` rules are patterns; the topics every device
    shares (calls for bids, the roster, the job queues it sends to) are listed per user,
    since Mosquitto warns about a pattern without ``%u`` (scripts/provision writes it)."""
    p, ha = topics.prefix, topics.discovery_prefix
    own = [("readwrite", f"{p}agent/%u/#"),                    # presence, metrics, trigger, answers, sync
           ("write", f"{p}bid/request/+/%u"),                   # calls for bids: as yourself
           ("write", f"{p}bid/invite/+/+/%u"), ("read", f"{p}bid/invite/%u/#"),  # invitations: as yourself, to you
           ("write", f"{p}bid/reply/+/+/%u"), ("read", f"{p}bid/reply/%u/#"),   # bids: as yourself, for you
           ("read", f"{p}exec/%u"),                              # your job queue
           ("write", f"{p}exec/+/cancel/%u"), ("read", f"{p}exec/%u/cancel/+"),  # cancels: only the origin
           ("write", f"{p}result/+/+/%u"), ("read", f"{p}result/%u/#"),          # results: only the origin reads
           ("write", f"{ha}/device/%u/config")]                 # your Home Assistant discovery
    shared = [("read", f"{p}bid/request/#"), ("read", f"{p}agent/+/availability"),
              ("read", f"{p}agent/+/metrics"), ("read", f"{p}agent/+/presence"), ("write", f"{p}exec/+"),
              ("read", f"{p}capabilities/+"), ("read", f"{ha}/status")]
    operator = [("read", f"{p}agent/#"), ("write", f"{p}agent/+/trigger"), ("readwrite", f"{ha}/#"),
                # `forget` clears a retired device's retained topics
                ("write", f"{p}agent/+/availability"), ("write", f"{p}agent/+/metrics"),
                ("write", f"{p}agent/+/last_result"),
                # what each device may claim (scripts/provision publish): operators alone write it
                ("readwrite", f"{p}capabilities/+")]
    lines = ["# edge-agent broker ACL, generated (scripts/provision; agent.topics.broker_acl).",
             f"# topic_prefix {p!r}; %u is the authenticated username, which for a device is its device_id.",
             "", "# --- every device, about itself"]
    lines += [f"pattern {access} {topic}" for access, topic in own]
    for name in sorted(set(devices) - set(operators)):
        lines += ["", f"user {_id(name)}"] + [f"topic {access} {topic}" for access, topic in shared]
    for name in sorted(set(operators)):
        lines += ["", "# operator: reads every device's state and answers, sends prompts, forgets devices, grants",
                  f"user {_id(name)}"]
        lines += [f"topic {access} {topic}" for access, topic in operator]
    return "\n".join(lines) + "\n"
