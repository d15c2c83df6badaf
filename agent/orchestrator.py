"""One orchestration: own NPU first, else auction, pick, dispatch, stream, train.

Theory of operation. ``Orchestrator.run`` drives the ``ORCHESTRATION`` table
(``agent.fsm``) from one thread; the decisions live in pure parts it calls:

1. The own NPU is claimed with a non-blocking ``flock``. If that works the job runs here
   and the broker is never contacted (not even connected to).
2. Otherwise ``agent.auction`` collects bids from the roster — in a fleet past
   ``auction.invite.above``, from the few devices ``agent.invite`` invites — ; if the
   broker cannot be reached, this device alone is the candidate.
3. ``agent.selection.select`` ranks the ways to run it (free peer NPUs, then LinUCB over
   CPU candidates including this device).
4. The ranking is walked: each peer attempt is a ``dispatch.DispatchState`` fed with the
   job's result events, roster changes and clock ticks; ``next`` moves on to the runner-up
   under the same ``rid``.
5. On the CPU path the arm of the device that ran it is trained once, with the context
   captured at decision time and the latency seen here (failures count as the cap).

Bus handlers only queue; every wait here has a timeout equal to the nearest deadline.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from agent.auction import AuctionResult
from agent.bidtimes import BidLatency, Stragglers
from agent.config import Config
from agent.dispatch import Answer, DispatchState, Step, teaches_the_learner, worth_trying
from agent.errors import (
    AgentError,
    BrokerUnavailable,
    ExecutorError,
    ExitCode,
    PromptTooLarge,
    UsageError,
)
from agent.executors import Params, Served, estimate_tokens
from agent.fsm import ORCHESTRATION, Machine
from agent.locks import CpuSlots, NpuLock
from agent.mailroom import Inbox, collect
from agent.messages import (
    Bid,
    BidRequest,
    Cancel,
    Chat,
    Job,
    Snapshot,
    cancel_check,
    decode_result,
    decoded,
    new_cancel_key,
)
from agent.outcome import Decided, Outcome, bid_summary, path_of, ranking_summary
from agent.topics import Topics

if TYPE_CHECKING:  # the bus (and paho) only when an auction connects: not on the local NPU path
    from agent.fleet import Fleet

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 1.0
STEADY_CHECK_S = 0.5  # one broker round trip takes < 1 ms; a broker going away, no answer


@dataclass(frozen=True)
class Request:
    rid: str
    prompt: str
    max_new_tokens: int
    need: str
    dry_run: bool
    model: str | None = None
    temperature: float | None = None
    chat: Chat | None = None   # a conversation; ``prompt`` is then its transcript

    @property
    def tools(self) -> bool:
        return self.chat is not None and bool(self.chat.tools)


@dataclass(frozen=True)
class _Wire:
    """The connection one run dispatches over."""

    fleet: Fleet
    inbox: Inbox
    epoch: int  # the bus's connection count when the run began (see _steady)


Connect = Callable[[], "Fleet"]


class Orchestrator:
    def __init__(self, cfg: Config, *, connect: Connect, npu_exec: Served | None,
                 cpu_exec: Served | None, arms: Callable[[], Any],
                 local_snapshot: Callable[[], Snapshot],
                 on_token: Callable[[str], None] = lambda t: None,
                 on_decision: Callable[[Decided], None] = lambda d: None,
                 on_progress: Callable[[str], None] = lambda m: None,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 rng: Any = None):
        self.cfg = cfg
        self.me = cfg.device_id
        self.topics = Topics(cfg.topic_prefix, cfg.homeassistant.discovery_prefix)
        self._connect = connect
        self.npu_exec = npu_exec
        self.cpu_exec = cpu_exec
        self.npu_lock = NpuLock(cfg.state_dir)
        self.cpu_slots = CpuSlots(cfg.state_dir, cfg.cpu.slots if cpu_exec is not None else 0)
        self._rng = rng  # numpy's, made on first use: the local NPU path never imports numpy
        self.stragglers = Stragglers(cfg.state_dir)
        self.latency = BidLatency(cfg.state_dir)
        # Set from a signal handler (Ctrl-C): the job in flight is cancelled on its device.
        self.interrupted = threading.Event()
        self._active: Inbox | None = None
        self._arms_factory = arms  # the store (and numpy) only when an auction needs it
        self._arms: Any = None
        self._asked: Any = None  # agent.invite.AskerMemory, once this orchestrator first invites
        self.local_snapshot = local_snapshot
        self.on_token = on_token
        self.on_decision = on_decision
        self.on_progress = on_progress
        self.clock = clock
        self.wall = wall

    def interrupt(self) -> None:
        """From a signal handler: stop waiting, cancel the job in flight on its device."""
        self.interrupted.set()
        inbox = self._active
        if inbox is not None:
            inbox.events.put(("interrupt",))
            inbox.book.poke()

    @property
    def rng(self) -> Any:
        if self._rng is None:
            import numpy as np
            self._rng = np.random.default_rng()
        return self._rng

    @property
    def arms(self) -> Any:
        if self._arms is None:
            self._arms = self._arms_factory()
        return self._arms

    # ------------------------------------------------------------------ entry point
    def run(self, prompt: str, *, max_new_tokens: int = 256, need: str = "any",
            rid: str | None = None, dry_run: bool = False, model: str | None = None,
            temperature: float | None = None, chat: Chat | None = None) -> Outcome:
        """Answer one prompt. Raises PromptTooLarge before anything is published.

        ``dry_run`` holds the auction and makes the decision, but runs nothing: the outcome
        names the device that would have won, and the ranking behind it."""
        if chat is not None:
            prompt = chat.transcript()
        req = Request(rid or uuid.uuid4().hex, prompt, max_new_tokens, need, dry_run, model, temperature, chat)
        self._check_prompt(req)
        return replace(self._run(req, self.clock()), model=req.model)

    def warm_up(self) -> None:
        """For a long-lived orchestrator (serve): before the first request, load what an
        auction needs, connect and sync (the roster, and the subscriptions for our mail)."""
        import agent.selection  # noqa: F401  (numpy, and the ranking code)

        try:
            fleet = self._connect()
        except BrokerUnavailable as exc:  # said at start, not first at the first request
            log.warning("%s; until it can be reached, requests run on this device alone", exc)
            return
        fleet.sync()

    def _check_prompt(self, req: Request) -> None:
        try:
            req.prompt.encode("utf-8")
            probe = self._job(req, "cpu", "x" * 32).to_payload()  # the chat, if any, is in it
        except UnicodeEncodeError:  # a lone surrogate (from JSON's "\ud800", or a bad argv)
            raise UsageError("the prompt is not valid Unicode text (it has a lone surrogate)") from None
        if len(probe) > self.cfg.max_payload_bytes:
            raise PromptTooLarge(len(probe), self.cfg.max_payload_bytes)

    def _run(self, req: Request, started: float) -> Outcome:
        fsm = Machine(f"orchestration {req.rid}", ORCHESTRATION, "start")

        # 1. Own NPU free? Run here; no network at all.
        local = self._own_npu(req, started, fsm)
        if local is not None:
            return local

        # 2. Auction, or this device alone if the broker cannot be reached.
        me = self._self_offer()
        try:
            fleet = self._connect()
        except BrokerUnavailable as exc:
            if not me.snapshot.cpu_slots:  # nothing here can run it: no "running locally"
                return Outcome(req.rid, Answer(False, ExitCode.NO_DEVICE,
                                               error=f"{exc}, and this device has no usable executor to run it alone"),
                               total_ms=(self.clock() - started) * 1000)
            log.info("%s; running locally", exc)  # a warning of the outcome: the caller shows it once
            fsm.fire("broker_down")
            return self._decide_and_run(req, started, fsm, None, [me] if me.snapshot.cpu_slots else [],
                                        None, (f"{exc}; running locally",))
        inbox = Inbox.open(fleet.mail, req.rid, self.cfg.max_payload_bytes, self.clock)
        self._active = inbox
        fleet.sync()  # once per connection: the retained roster, and our mail's subscriptions
        wire = _Wire(fleet, inbox, fleet.bus.epoch)
        stop_listening = fleet.roster.listen(inbox.on_roster)
        try:
            auction = self._auction(req, wire, fsm)
            if auction.closing == "interrupted":
                return Outcome(req.rid, Answer(False, ExitCode.INTERRUPTED, error="interrupted during the auction"),
                               roster=auction.roster, auction_ms=auction.auction_ms,
                               total_ms=(self.clock() - started) * 1000)
            # Claims beyond what the operator granted a device (an NPU, models) are ignored.
            auction = replace(auction, bids=wire.fleet.roster.vouched(auction.bids))
            offers = [self._offer_from_bid(b) for b in auction.bids.values()]
            if me.snapshot.cpu_slots and self.me not in auction.bids:
                offers.append(me)  # no daemon here: this process runs it, under the same slot locks
            warnings: tuple[str, ...] = ()
            if auction.closing == "timeout":
                warnings = (f"bid window of {self.cfg.auction.bid_timeout_s:g} s closed without bids from "
                            f"{', '.join(auction.missing)}",)
            elif auction.closing == "stragglers":
                warnings = (f"did not wait for {', '.join(auction.missing)}: missed recent calls for bids",)
            elif auction.closing == "overdue":
                warnings = (f"did not wait for {', '.join(auction.missing)}: no bid long after it usually comes",)
            return self._decide_and_run(req, started, fsm, wire, offers, auction, warnings)
        finally:
            stop_listening()
            inbox.close()
            self.stragglers.update(auction_expected(inbox), inbox.book.all_bidders())
            self.latency.update(inbox.book.latencies())

    def _own_npu(self, req: Request, started: float, fsm: Machine) -> Outcome | None:
        if self.npu_exec is None or not self.npu_exec.serves(req.model) or self.npu_exec.check() is not None \
                or (req.tools and not self.npu_exec.tools):
            return None
        if req.dry_run:
            if not self.npu_lock.is_free():
                return None
            fsm.fire("local_npu")
            return Outcome(req.rid, Answer(True, ExitCode.OK), self.me, "local-npu", dry_run=True,
                           ranking=({"device": self.me, "mode": "npu", "score": None},),
                           total_ms=(self.clock() - started) * 1000)
        claim = self.npu_lock.try_claim(owner=req.rid)
        if claim is None:
            return None
        with claim:
            fsm.fire("local_npu")
            self.on_decision(Decided(self.me, "local-npu"))
            answer, outcome = self._run_here(self.npu_exec, req, fsm)
        return Outcome(req.rid, answer, self.me, "local-npu", attempts=({"device": self.me, "outcome": outcome},),
                       total_ms=(self.clock() - started) * 1000)

    # ------------------------------------------------------------------ auction
    def _steady(self, wire: _Wire) -> bool:
        """Is our own link to the broker sound, as it was when this run began?

        A Will alone is ambiguous: on shutdown Mosquitto delivers every client's Will to the
        clients still connected. One round trip on the same connection tells a dead peer
        (act now) from a broker that is going away (every node will come back)."""
        bus = wire.fleet.bus
        return (bus.connected and bus.epoch == wire.epoch
                and bus.barrier(STEADY_CHECK_S) and bus.epoch == wire.epoch)

    def _offline(self, wire: _Wire | None, device: str) -> bool:
        """Has ``device``'s Will fired (and our own link is sound, so it is not a broker
        going away)? Its modes are not tried while it is offline."""
        return wire is not None and wire.fleet.roster.known().get(device) is False and self._steady(wire)

    def _auction(self, req: Request, wire: _Wire, fsm: Machine) -> AuctionResult:
        fsm.fire("open")
        window = self.cfg.auction.bid_timeout_s
        bus = wire.fleet.bus

        roster = wire.fleet.roster
        # This device's own daemon bids too, if it runs: its CPU jobs go through its gate.
        expected = roster.bidders(req.model, req.need, req.tools)
        invited = self._invitation(req, roster, expected)
        if invited is not None:
            expected = frozenset(invited)  # only the invited bid, and only they are waited for

        def call() -> None:
            request = BidRequest(rid=req.rid, origin=self.me, window_s=window, sent_at=round(self.wall(), 3),
                                 prompt_tokens=estimate_tokens(req.prompt), max_new_tokens=req.max_new_tokens,
                                 need=req.need, model=req.model, tools=req.tools)
            payload = request.to_payload()
            topics = ([self.topics.bid_request(req.rid, self.me)] if invited is None else
                      [self.topics.bid_invite(d, req.rid, self.me) for d in invited])
            # A call to everyone at QoS 1, as the seed; invitations at QoS 0: an invitee
            # that misses one is overdue within a second (the others decide), and on a broker
            # that stores QoS 1 (NATS's JetStream) each cost a write (bench --scale, NATS).
            for topic in topics:
                bus.publish(topic, payload, qos=1 if invited is None else 0, expiry_s=window,
                            response_topic=self.topics.bid_reply_stem(self.me, req.rid),
                            correlation_data=req.rid.encode())

        call()
        result = collect(wire.inbox, expected=expected, suspects=self.stragglers.suspects(), window_s=window,
                         need=req.need, may_have_free_npu=wire.fleet.roster.may_have_free_npu, clock=self.clock,
                         steady=lambda: self._steady(wire), resend=call, on_progress=self.on_progress,
                         interrupted=self.interrupted, latency=self.latency.load())
        for _ in result.bids:
            fsm.fire("bid")
        fsm.fire(result.closing)
        if invited is None:
            return result
        self._remember_bids(result.bids, req)
        return replace(result, invited=invited)

    def _invitation(self, req: Request, roster: Any, bidders: frozenset[str]) -> tuple[str, ...] | None:
        """Whom to invite (``agent.invite``), or None below the threshold: call everyone."""
        from agent.invite import choose, should_invite  # numpy: only the auction path pays for it

        invite = self.cfg.auction.invite
        if not should_invite(len(roster.online()), invite.above):
            return None
        metrics = roster.metrics()
        devices = {d: (metrics[d].snapshot if d in metrics else None) for d in bidders}
        memory, wall = self._asker_memory(), self.wall()
        # how old each device's metrics are (their backlog has run down since); unknown: not aged
        ages = {d: age for d in devices if d in metrics
                and math.isfinite(age := roster.offsets.age(d, metrics[d].ts, wall))}
        invitation = choose(devices, me=self.me, best=invite.best, explore=invite.explore, rng=self.rng,
                            model=req.model, need=req.need, tools=req.tools, npu_granted=roster.may_have_free_npu,
                            known_s=memory.known_s(self.clock(), estimate_tokens(req.prompt), req.max_new_tokens),
                            startup_s=memory.startup_s(), age_s=ages)
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

    def _remember_bids(self, bids: Mapping[str, Any], req: Request) -> None:
        memory, now, prompt = self._asker_memory(), self.clock(), estimate_tokens(req.prompt)
        for device, bid in bids.items():
            memory.heard(device, now, backlog_s=bid.snapshot.backlog_s, service_s=bid.service_s, init_s=bid.init_s,
                         slots=bid.snapshot.cpu_slots, prompt_tokens=prompt, max_new_tokens=req.max_new_tokens)

    # ------------------------------------------------------------------ decide + run
    def _decide_and_run(self, req: Request, started: float, fsm: Machine, wire: _Wire | None,
                        offers: list[Any], auction: AuctionResult | None,
                        warnings: tuple[str, ...]) -> Outcome:
        from agent.selection import select  # numpy: only the auction path pays for it

        deciding = self.clock()
        state = self.arms.load()
        lin, policy = self.cfg.auction.linucb, self.cfg.auction.policy
        decision = select(offers, state.arms, prompt_tokens=estimate_tokens(req.prompt),
                          max_new_tokens=req.max_new_tokens, alpha=lin.alpha, lam=lin.lambda_, policy=policy,
                          exploring=set(state.exploring), need=req.need, rng=self.rng, cursor=state.cursor,
                          model=req.model, tools=req.tools)
        decide_ms = (self.clock() - deciding) * 1000
        if decision.cursor != state.cursor and not req.dry_run:
            self.arms.set_cursor(decision.cursor)
        bids = auction.bids if auction else {}
        scores = {c.device: c.score for c in decision.ranking if c.mode == "cpu"}
        # What was seen before running anything; each ending below fills in the rest.
        seen = Outcome(req.rid, Answer(False, ExitCode.NO_DEVICE, error="no device can run this job"),
                       bids=tuple(bid_summary(b, scores.get(b.device)) for b in sorted(bids.values(),
                                                                                      key=lambda b: b.device)),
                       roster=auction.roster if auction else (), auction_ms=auction.auction_ms if auction else 0.0,
                       invited=None if auction is None or auction.invited is None else len(auction.invited),
                       decide_ms=decide_ms, warnings=warnings, ranking=ranking_summary(decision.ranking),
                       dry_run=req.dry_run)
        if req.dry_run:
            winner = decision.winner
            if winner is None:
                return replace(seen, total_ms=(self.clock() - started) * 1000)
            return replace(seen, answer=Answer(True, ExitCode.OK), winner=winner.device,
                           path=path_of(winner.mode, winner.is_self), score=winner.score,
                           total_ms=(self.clock() - started) * 1000)

        attempts: list[dict[str, str]] = []
        for choice, last in worth_trying(decision.ranking, lambda c: c.device if c.device in bids else "",
                                         lambda device: self._offline(wire, device)):
            path = path_of(choice.mode, choice.is_self)
            dispatched = self.clock()  # the device's promise runs from here
            if choice.explore:
                self.arms.mark_exploring(choice.device, req.rid, self.wall() + self.cfg.auction.job_timeout_s)
            if choice.device not in bids:  # this device, with no daemon to hand it to
                fsm.fire("run_local")
                self.on_decision(Decided(self.me, path, choice.score))
                executor = self.cpu_exec
                assert executor is not None, "a self offer with CPU slots has a CPU executor"
                answer, outcome = self._run_here(executor, req, fsm, slots=self.cpu_slots, pass_on=True)
                attempts.append({"device": self.me, "outcome": outcome})
                if outcome.startswith("unavailable:"):
                    continue  # its model server is down and nothing ran: the runner-up
            else:
                assert wire is not None, "peers come from an auction"
                fsm.fire("dispatch")
                if self._asked is not None and choice.mode == "cpu" and choice.promise is not None:
                    self._asked.sent(choice.device, dispatched, choice.promise)
                claim = bids[choice.device].claim
                step = self._dispatch(wire, req, choice.device, choice.mode, claim, Decided(choice.device, path,
                                                                                             choice.score), last)
                attempts.append({"device": choice.device, "outcome": step.outcome or "?"})
                if step.answer is None:
                    fsm.fire("passed")
                    continue
                answer = step.answer
                fsm.fire("answered" if answer.ok else "failed")
            total_ms = (self.clock() - started) * 1000
            if choice.mode == "cpu" and choice.x is not None:
                if teaches_the_learner(answer):
                    # The arm learns what the device's promise of start-up + service missed, as
                    # seen from here: the wait in its queue is the backlog's part, not the job's.
                    seen_s = self.clock() - dispatched - answer.timings.queue_ms / 1000
                    self._train(choice.device, choice.x, answer.ok, seen_s, req.rid, choice.promise)
                elif choice.explore:
                    # Its exploration ended with the job: the device is free to be tried again.
                    self.arms.mark_exploring(choice.device, req.rid, self.wall())
            return replace(seen, answer=answer, winner=choice.device, path=path, score=choice.score,
                           attempts=tuple(attempts), total_ms=total_ms)
        fsm.fire("no_candidate")
        tried = ", ".join(f"{a['device']}: {a['outcome']}" for a in attempts)
        error = "no device can run this job" + (f" (tried {tried})" if tried else
                                                " (no peer bid and this device has no usable executor)")
        kind = ""
        if req.model is not None and not tried:
            known = self._models_known(wire)
            error = (f"no device serves model {req.model!r} now; "
                     + (f"the fleet serves: {', '.join(known)}" if known else "no device has announced a model"))
            kind = "model_not_served"
        if req.tools and not tried:
            error = ("no device can call tools" + (f" with model {req.model!r}" if req.model else "")
                     + " now (an executor takes tools with `tools: true`; openai executors do by default)")
            kind = "no_tools"
        return replace(seen, answer=Answer(False, ExitCode.NO_DEVICE, error=error, kind=kind), attempts=tuple(attempts),
                       total_ms=(self.clock() - started) * 1000)

    def _dispatch(self, wire: _Wire, req: Request, device: str, mode: str, claim: str, decided: Decided,
                  last: bool) -> Step:
        """Send the job to a peer and see it through: the final (next or finished) step."""
        auction = self.cfg.auction
        bus, events = wire.fleet.bus, wire.inbox.events
        sent = self.clock()
        key = new_cancel_key()  # this job's alone: a cancel sent elsewhere does not fit it
        job = replace(self._job(req, mode, claim), cancel_check=cancel_check(key))

        def send() -> None:
            # The durations left, not the ones we started with: a re-send after an outage
            # must not give the device more time than the job has.
            spent = self.clock() - sent
            again = replace(job, accept_s=max(job.accept_s - spent, 0.0), timeout_s=max(job.timeout_s - spent, 0.0),
                            sent_at=round(self.wall(), 3))
            bus.publish(self.topics.exec(device), again.to_payload(), qos=1, expiry_s=again.timeout_s,
                        response_topic=job.reply_to, correlation_data=req.rid.encode())

        send()
        attempt = DispatchState(req.rid, device, sent, accept_timeout_s=auction.accept_timeout_s,
                                job_timeout_s=auction.job_timeout_s, last=last, digest=job.digest)
        next_progress = sent + PROGRESS_EVERY_S
        last_token = float("-inf")
        while True:
            now = self.clock()
            if self.interrupted.is_set():
                bus.publish(self.topics.cancel(device, self.me), Cancel(req.rid, self.me, key, "interrupted")
                            .to_payload(), qos=1, expiry_s=auction.job_timeout_s)
                bus.barrier(STEADY_CHECK_S)  # the cancel is at the broker before we go
                return Step("finished", outcome="interrupted", answer=Answer(
                    False, ExitCode.INTERRUPTED, attempt.text, f"interrupted; {device} was told to stop"))
            step = attempt.on_tick(now)
            if step.verdict == "continue" and now >= next_progress:
                if now - last_token >= PROGRESS_EVERY_S:  # a streaming answer is its own progress
                    self.on_progress(f"waiting for {device} ({attempt.state}, {len(attempt.streamed)} chunks)")
                next_progress = now + PROGRESS_EVERY_S
            if step.verdict == "continue":
                try:
                    event = events.get(timeout=max(0.0, min(attempt.deadline, next_progress) - now))
                except queue.Empty:
                    continue
                step = self._feed(attempt, event, wire)
            if step.progress:
                self.on_progress(step.progress)
            if step.announce:
                self.on_decision(decided)
            for text in step.tokens:
                self.on_token(text)
                last_token = self.clock()
            if step.send:
                send()
            if step.cancel:
                bus.publish(self.topics.cancel(device, self.me), Cancel(req.rid, self.me, key, step.cancel)
                            .to_payload(), qos=1, expiry_s=auction.job_timeout_s)
            if step.verdict != "continue":
                if attempt.gaps:
                    log.info("%s: %d token chunk(s) never arrived; done carries the whole text", req.rid,
                             attempt.gaps)
                return step

    def _feed(self, attempt: DispatchState, event: tuple[Any, ...], wire: _Wire) -> Step:
        now = self.clock()
        if event[0] == "roster":
            _, device, online = event
            if device != attempt.device:
                return Step()
            return attempt.on_peer(online, now, lambda: self._steady(wire))
        if event[0] == "link":
            return attempt.on_link(event[1], now)
        if event[0] == "interrupt":
            return Step()  # the loop sees self.interrupted and cancels the job
        msg = event[1]
        parsed = self.topics.parse(msg.topic)
        if parsed is None or parsed.device != attempt.device or parsed.origin != self.me:
            return Step()  # another device's results: not even decoded
        ev = decoded(msg.topic, msg.payload, lambda p: decode_result(p, self.cfg.max_payload_bytes),
                     what="result", logger=log, matches=lambda e: e.rid == attempt.rid and e.device == parsed.device)
        return Step() if ev is None else attempt.on_result(ev, now)

    # ------------------------------------------------------------------ local execution
    def _run_here(self, executor: Served, req: Request, fsm: Machine,
                  slots: CpuSlots | None = None, pass_on: bool = False) -> tuple[Answer, str]:
        """Run it in this process: on the NPU (already claimed), or on a CPU slot of this
        device, waiting for one if the daemon or other triggers hold them all. With
        ``pass_on``, a model server that cannot be reached sends the walk back to the
        ranking (outcome ``unavailable: …``)."""
        parts: list[str] = []

        def on_token(text: str) -> None:
            parts.append(text)
            self.on_token(text)

        timeout_s = self.cfg.auction.job_timeout_s
        claim = None
        if slots is not None:
            began = self.clock()
            claim = slots.wait_claim(req.rid, timeout_s, on_wait=self._slot_progress())
            if claim is None:
                fsm.fire("error")
                return (Answer(False, ExitCode.TIMEOUT, error=f"no CPU slot of this device came free within "
                                                               f"{timeout_s:g} s"), "no free slot")
            timeout_s -= self.clock() - began
        params = Params(max_new_tokens=req.max_new_tokens, temperature=req.temperature, timeout_s=timeout_s,
                        rid=req.rid, hold_fds=(claim.fd,) if claim is not None else (), chat=req.chat)
        try:
            result = executor.run(req.prompt, params, on_token, self.interrupted)
        except ExecutorError as exc:
            if pass_on and exc.kind == "unavailable":
                fsm.fire("passed")
                return Answer(False, ExitCode.FAILED, "", str(exc)), f"unavailable: {exc.reason}"
            fsm.fire("error")
            code = ExitCode.TIMEOUT if exc.kind == "timeout" else ExitCode.FAILED
            if self.interrupted.is_set():
                code = ExitCode.INTERRUPTED
            return Answer(False, code, exc.partial_text or "".join(parts), str(exc)), f"error: {exc.reason}"
        finally:
            if claim is not None:
                claim.release()
        fsm.fire("done")
        return Answer(True, ExitCode.OK, result.text, None, result.timings, result.generated_tokens,
                      result.prompt_tokens, result.finish_reason, result.tool_calls), "done"

    def _slot_progress(self) -> Callable[[float], None]:
        shown = [0.0]

        def on_wait(waited: float) -> None:
            if waited - shown[0] >= PROGRESS_EVERY_S:
                shown[0] = waited
                self.on_progress(f"waiting for a free CPU slot on this device ({waited:.0f} s)")
        return on_wait

    def _job(self, req: Request, mode: str, claim: str) -> Job:
        auction = self.cfg.auction
        return Job(rid=req.rid, origin=self.me, mode=mode, claim=claim, prompt="" if req.chat else req.prompt,
                   max_new_tokens=req.max_new_tokens, accept_s=auction.accept_timeout_s,
                   timeout_s=auction.job_timeout_s, reply_to=self.topics.result_stem(self.me, req.rid),
                   sent_at=round(self.wall(), 3), model=req.model, temperature=req.temperature, chat=req.chat)

    def _offer_from_bid(self, bid: Bid) -> Any:
        from agent.selection import Offer
        return Offer(bid.device, bid.snapshot, is_self=bid.device == self.me, service_s=bid.service_s,
                     service_n=bid.service_n, init_s=bid.init_s)

    def _models_known(self, wire: _Wire | None) -> list[str]:
        """Every model name an online device (or this one) announces, for error messages."""
        names = {e.served.name for e in (self.npu_exec, self.cpu_exec) if e is not None and e.served.name}
        if wire is not None:
            online = wire.fleet.roster.online()
            for device, m in wire.fleet.roster.metrics().items():
                if device in online:
                    names.update(info.name for info in m.snapshot.models.values())
        return sorted(names)

    def _self_offer(self) -> Any:
        from agent.selection import Offer
        return Offer(self.me, self.local_snapshot(), is_self=True)

    def _train(self, device: str, x: tuple[float, ...], ok: bool, seconds: float, rid: str,
               promise: float | None) -> None:
        """Teach the arm the residual (seen − promised); a job with no promise (a device
        with no record yet) only ends its exploration."""
        import numpy as np

        from agent.linucb import residual_target
        y = None if promise is None else residual_target(ok, seconds, self.cfg.auction.linucb.latency_cap_s, promise)
        try:
            self.arms.train(device, np.array(x), y, rid, base=promise or 0.0)
        except (OSError, AgentError) as exc:
            log.error("could not train the arm store: %s", exc)


def auction_expected(inbox: Inbox) -> set[str]:
    expected, _, _ = inbox.book.view()
    return expected
