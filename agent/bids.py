"""Bidding: answer a call for bids with this device's offer, or stay out of the auction.

Theory of operation. ``on_bid_request`` runs inline on paho's network thread (a bid is
late if it waits behind a job's bookkeeping), so it takes no lock across I/O: it decodes
the call, drops a retained or stale one, stays out while the node takes no work or
nothing here could run the job, asks the ledger for a claim per (rid, origin) and sends
the bid to the origin alone — a live snapshot, the backlog, and this device's own
estimate of the job from its service record.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from agent.bus import Message, Publish
from agent.capacity import Capacity
from agent.jobs import Age, Jobs, retained
from agent.messages import Bid, BidRequest, Snapshot, decoded, snapshot_members
from agent.topics import Topics

log = logging.getLogger("agent.node")  # the daemon's parts log under its name


class Bids:
    def __init__(self, me: str, capacity: Capacity, jobs: Jobs, topics: Topics, *, publish: Publish, age: Age,
                 snapshot: Callable[[], Snapshot], max_payload_bytes: int,
                 clock: Callable[[], float] = time.monotonic):
        self.me = me
        self.capacity = capacity
        self.jobs = jobs
        self.topics = topics
        self._publish = publish
        self._age = age
        self._snapshot = snapshot
        self._max_bytes = max_payload_bytes
        self._clock = clock
        self._members: tuple[Snapshot, bytes] | None = None  # the last snapshot, encoded

    def on_bid_request(self, msg: Message) -> None:
        parsed = self.topics.parse(msg.topic)
        req = decoded(msg.topic, msg.payload, lambda p: BidRequest.from_payload(p, self._max_bytes),
                      what="call for bids", logger=log,
                      matches=lambda r: parsed is not None and parsed.rid == r.rid
                      and parsed.origin in (None, r.origin) and parsed.device in (None, self.me))
        if req is None or retained(msg, "call for bids"):
            return
        self.answer(req, msg)

    def answer(self, req: BidRequest, msg: Message) -> None:
        """Bid on a decoded call for bids, or stay out (logged when it matters)."""
        cap = self.capacity
        if not cap.taking_work or cap.engines_down():
            return  # an unhealthy or draining node stays out of auctions
        age = self._age(req.origin, req.sent_at, msg, req.window_s)
        if age > req.window_s:
            log.info("ignored call for bids %s: its window closed %.1f s ago", req.rid, age - req.window_s)
            return
        npu_ok = cap.npu is not None and cap.npu.serves(req.model) and (cap.npu.tools or not req.tools)
        cpu_ok = cap.cpu is not None and cap.slots > 0 and cap.cpu.serves(req.model) \
            and (cap.cpu.tools or not req.tools)
        if not (npu_ok or (cpu_ok and req.need == "any")):
            return  # nothing here could take it (messages.can_take): no bid, and nobody waits for one
        claim = self.jobs.ledger.offer(req.rid, req.origin, self._clock())
        if claim is None:
            log.debug("dropped call for bids %s from %s: over its share of calls", req.rid, req.origin)
            return
        if not claim:
            log.warning("dropped call for bids %s from %s: that rid was called by another origin", req.rid,
                        req.origin)
            return
        # This device's own orchestrations get a bid too: their CPU jobs come back through
        # exec/<self> and the same gate as everyone else's.
        cpu = cap.cpu if cap.cpu is not None and cap.cpu.down is None \
            and cap.cpu.serves(req.model) and (cap.cpu.tools or not req.tools) else None
        estimate = self.jobs.record.estimate("cpu", req.prompt_tokens, req.max_new_tokens) if cpu else None
        init_s = self.jobs.init_cost.expected("cpu", cpu.is_warm(), req.prompt_tokens) if cpu else 0.0
        snap = self._snapshot()
        members = self._members
        if members is None or members[0] is not snap:  # it changed since the last bid
            members = self._members = (snap, snapshot_members(snap))
        bid = Bid(rid=req.rid, device=self.me, origin=req.origin, claim=claim, snapshot=snap,
                  service_s=round(estimate[0], 4) if estimate else None,
                  service_n=round(estimate[1], 2) if estimate else 0.0, init_s=round(init_s, 4))
        # No MQTT 5 properties on the reply: the rid is in the topic and the payload, and
        # packing properties in pure Python was a measurable share of the auction. QoS 0:
        # a late bid is useless, so an acknowledgement buys nothing and costs the asker one
        # write per bid (a fifth less CPU per auction of 8, with BidLatency's fewer writes).
        self._publish(self.topics.bid_reply(req.origin, req.rid, self.me), bid.to_payload(members[1]), qos=0)
