"""The auctioneer: one call for bids, the bids it collects, and what the asker remembers.

Below ``auction.invite.above`` online devices it calls everyone (QoS 1, the seed); past it,
``agent.invite.choose`` picks the few to invite (QoS 0 each) from this device's memory of
earlier bids (``invite.AskerMemory``) and the retained metrics, and only they are waited
for. ``auction.collect`` decides when the window closes; the bids are then cut down to what
the operator granted each device (``Roster.vouched``). When the run's inbox closes, the
peers that missed the call (``Stragglers``) and each peer's bid latency (``BidLatency``)
are recorded for the next auction.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from agent.auction import AuctionResult
from agent.bidtimes import BidLatency, Stragglers
from agent.config import Config
from agent.executors import estimate_tokens
from agent.fsm import Machine
from agent.mailroom import Inbox, collect
from agent.orchestration import Hooks, Request, Wire
from agent.topics import Topics

if TYPE_CHECKING:
    from agent.roster import Roster

log = logging.getLogger("agent.orchestrator")  # the orchestrator's parts log under its name


class Auctioneer:
    """Calls for bids (everyone, or the invited few), collects them, remembers what it heard."""

    def __init__(self, cfg: Config, topics: Topics, hooks: Hooks, *, clock: Callable[[], float],
                 wall: Callable[[], float], rng: Callable[[], Any], interrupted: threading.Event):
        self.cfg = cfg
        self.me = cfg.device_id
        self.topics = topics
        self.hooks = hooks
        self.clock = clock
        self.wall = wall
        self._rng = rng  # the orchestrator's, made on first use
        self.interrupted = interrupted
        self.stragglers = Stragglers(cfg.state_dir)
        self.latency = BidLatency(cfg.state_dir)
        self._asked: Any = None  # agent.invite.AskerMemory, once this orchestrator first invites
        self._kept: Any = None  # agent.viewkeeper.ViewKeeper of the last auction that invited

    def hold(self, req: Request, wire: Wire, fsm: Machine) -> AuctionResult:
        """Call for bids and collect them. Claims beyond what the operator granted a device
        (an NPU, models) are ignored."""
        auction = self._auction(req, wire, fsm)
        return replace(auction, bids=wire.fleet.roster.vouched(auction.bids))

    def closed(self, inbox: Inbox) -> None:
        """The run's inbox is closed: who missed the call, and how long each bid took."""
        self.stragglers.update(auction_expected(inbox), inbox.book.all_bidders())
        self.latency.update(inbox.book.latencies())
        if self._asked is not None:
            self._asked.settle()  # the shapes its bids moved, fitted now rather than in the next auction
        if self._kept is not None:
            self._kept.nudge()  # what its bids and the metrics since changed, read on the keeper's thread

    def sent(self, device: str, at: float, promise: float) -> None:
        """A CPU job went to ``device`` at ``at``: the memory invitations are chosen from
        counts it as queued there (only once this orchestrator has invited)."""
        if self._asked is not None:
            self._asked.sent(device, at, promise)

    def _auction(self, req: Request, wire: Wire, fsm: Machine) -> AuctionResult:
        fsm.fire("open")
        started = self.clock()  # auction_ms counts choosing whom to call and calling them too
        window = self.cfg.auction.bid_timeout_s
        bus = wire.fleet.bus

        roster = wire.fleet.roster
        # This device's own daemon bids too, if it runs: its CPU jobs go through its gate.
        expected = roster.bidders(req.model, req.need, req.tools)
        invited = self._invitation(req, roster, expected)
        if invited is not None:
            expected = frozenset(invited)  # only the invited bid, and only they are waited for

        def call() -> None:
            payload = req.call(self.me, window, self.wall()).to_payload()
            if invited is None:  # a call to everyone at QoS 1, with the MQTT 5 properties, as the seed
                bus.publish(self.topics.bid_request(req.rid, self.me), payload, qos=1, expiry_s=window,
                            response_topic=self.topics.bid_reply_stem(self.me, req.rid),
                            correlation_data=req.rid.encode())
                return
            # Invitations at QoS 0: an invitee that misses one is overdue within a second
            # (the others decide), and on a broker that stores QoS 1 (NATS's JetStream) each
            # cost a write (bench --scale, NATS). No MQTT 5 properties, as bids: the topic and
            # the payload say where to answer and how old the call is, a QoS 0 message is not
            # queued for an offline device, and paho packing three of them in pure Python took
            # 68 µs a message against 12 µs without: 1.1 ms of an auction that invites 20.
            # All in one write (Bus.publish_many): publishing them one by one woke paho's
            # thread and handed it the interpreter twenty times while the first bids came in.
            bus.publish_many([(self.topics.bid_invite(device, req.rid, self.me), payload) for device in invited])

        # Read before the call: once it is out, paho's thread needs the interpreter to write
        # it and then to take the bids (that hop took 0.27-0.37 ms on serve's path, per-hop
        # timestamps on scripts/bench --serve).
        (suspects, gone), latency = self.stragglers.suspects_and_absent(), self.latency.load(expected)
        call()
        called = self.clock()
        result = collect(wire.inbox, expected=expected, suspects=suspects, window_s=window, need=req.need,
                         may_have_free_npu=wire.fleet.roster.may_have_free_npu, clock=self.clock,
                         steady=wire.steady, resend=call, on_progress=self.hooks.on_progress,
                         interrupted=self.interrupted, latency=latency, absent=gone)
        result = replace(result, auction_ms=result.auction_ms + (called - started) * 1000)
        for _ in result.bids:
            fsm.fire("bid")
        fsm.fire(result.closing)
        if invited is None:
            return result
        self._remember_bids(result.bids, req)
        return replace(result, invited=invited)

    def _invitation(self, req: Request, roster: Roster, bidders: frozenset[str]) -> tuple[str, ...] | None:
        """Whom to invite (``agent.invite``), or None below the threshold: call everyone."""
        from agent.invite import (  # numpy: only the auction path pays for it
            choose_kept,
        )

        invite = self.cfg.auction.invite
        if not invite.past(len(roster.online())):
            self._kept = None
            return None
        kind = (req.model, req.need, req.tools)
        memory, view = self._asker_memory(), self._view(kind)
        with view.lock:  # one view of the fleet per process, kept between auctions
            # Only the devices whose metrics, or whose standing in this asker's memory,
            # changed since the last auction are read again (at N=1000: a handful, where
            # reading all of them was most of the choice, 1.3 of 1.8 ms).
            view.sync(roster, bidders)
            known = view.known(memory, self.clock(), estimate_tokens(req.prompt), req.max_new_tokens)
            invitation = choose_kept(view, known, me=self.me, best=invite.best, explore=invite.explore,
                                     rng=self._rng(), model=req.model, need=req.need, tools=req.tools,
                                     npu_granted=roster.may_have_free_npu, startup_s=memory.startup_s(),
                                     now=self.wall())
        from agent.viewkeeper import keeper
        self._kept = keeper(view, kind, memory)
        self._kept.used(roster)  # kept up to date from now on, between auctions
        log.debug("%s: inviting %d of %d possible bidders (own %s, npu %s, best %s, explore %s)", req.rid,
                  len(invitation.devices), len(bidders), invitation.own, invitation.npu, invitation.best,
                  invitation.explore)
        return invitation.devices

    def _asker_memory(self) -> Any:
        """What this device's orchestrators heard in their invited auctions' bids and sent
        since (``agent.invite.AskerMemory``), shared by every orchestrator of this process."""
        if self._asked is None:
            from agent.invite import shared_memory
            self._asked = shared_memory(str(self.cfg.state_dir))
        return self._asked

    def _view(self, kind: tuple[str | None, str, bool]) -> Any:
        """The metrics' rows ``choose_kept`` keeps between auctions of this job kind
        (``agent.invite.Rows``), one per process, state directory and kind, as the memory."""
        from agent.invite import shared_rows
        return shared_rows(str(self.cfg.state_dir), kind)

    def _remember_bids(self, bids: Mapping[str, Any], req: Request) -> None:
        memory, now, prompt = self._asker_memory(), self.clock(), estimate_tokens(req.prompt)
        for device, bid in bids.items():
            memory.heard(device, now, backlog_s=bid.snapshot.backlog_s, service_s=bid.service_s, init_s=bid.init_s,
                         slots=bid.snapshot.cpu_slots, prompt_tokens=prompt, max_new_tokens=req.max_new_tokens)


def closing_warnings(auction: AuctionResult, window_s: float) -> tuple[str, ...]:
    """What the caller is told about a bid window that closed before every expected bid."""
    if auction.closing == "timeout":
        return (f"bid window of {window_s:g} s closed without bids from {', '.join(auction.missing)}",)
    if auction.closing == "stragglers":
        return (f"did not wait for {', '.join(auction.missing)}: missed recent calls for bids",)
    if auction.closing == "overdue":
        return (f"did not wait for {', '.join(auction.missing)}: no bid long after it usually comes",)
    return ()


def auction_expected(inbox: Inbox) -> set[str]:
    expected, _, _ = inbox.book.view()
    return expected
