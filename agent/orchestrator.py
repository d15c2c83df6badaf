"""One orchestration: own NPU first, else auction, pick, dispatch, stream, train.

Theory of operation. ``Orchestrator.run`` drives the ``ORCHESTRATION`` table
(``agent.fsm``) from one thread; it is the decision flow, and each step is a part with one
job (``agent.orchestration`` holds what they share):

1. The own NPU is claimed with a non-blocking ``flock`` (``delivery.LocalRunner``). If that
   works the job runs here and the broker is never contacted (not even connected to).
2. Otherwise the ``auctioneer.Auctioneer`` collects bids from the roster — in a fleet past
   ``auction.invite.above``, from the few devices ``agent.invite`` invites — ; if the
   broker cannot be reached, this device alone is the candidate.
3. ``agent.selection.select`` ranks the ways to run it (free peer NPUs, then LinUCB over
   CPU candidates including this device).
4. ``delivery.Delivery`` walks the ranking: each peer attempt is a
   ``dispatch.DispatchState`` fed with the job's result events, roster changes and clock
   ticks; ``next`` moves on to the runner-up under the same ``rid``.
5. On the CPU path the ``learner.Learner`` trains the arm of the device that ran it once,
   with the context captured at decision time and the latency seen here (failures count as
   the cap).

Bus handlers only queue; every wait here has a timeout equal to the nearest deadline.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from agent.auction import AuctionResult
from agent.auctioneer import Auctioneer, closing_warnings
from agent.config import Config
from agent.delivery import Attempt, Delivery, Dispatcher, LocalRunner
from agent.dispatch import Answer
from agent.errors import BrokerUnavailable, ExitCode, PromptTooLarge, UsageError
from agent.executors import Served, estimate_tokens
from agent.fsm import ORCHESTRATION, Machine
from agent.learner import Learner
from agent.mailroom import Inbox
from agent.messages import Bid, Chat, Snapshot
from agent.orchestration import Request, Wire
from agent.outcome import Decided, Outcome, bid_summary, path_of, ranking_summary
from agent.topics import Topics

if TYPE_CHECKING:  # the bus (and paho) only when an auction connects; numpy only when it decides
    from agent.fleet import Fleet
    from agent.selection import Decision, Offer

log = logging.getLogger(__name__)

Connect = Callable[[], "Fleet"]


class Orchestrator:
    """One prompt's decision flow; ``run`` is its entry, the parts do the rest."""

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
        self._rng = rng  # numpy's, made on first use: the local NPU path never imports numpy
        # Set from a signal handler (Ctrl-C): the job in flight is cancelled on its device.
        self.interrupted = threading.Event()
        self._active: Inbox | None = None
        self.local_snapshot = local_snapshot
        # The hooks are read by the parts at each call: serve swaps them between requests.
        self.on_token = on_token
        self.on_decision = on_decision
        self.on_progress = on_progress
        self.clock = clock
        self.wall = wall
        self.learner = Learner(cfg, arms, clock=clock, wall=wall)
        self.auctioneer = Auctioneer(cfg, self.topics, self, clock=clock, wall=wall, rng=lambda: self.rng,
                                     interrupted=self.interrupted)
        self.local = LocalRunner(cfg, self, npu_exec=npu_exec, cpu_exec=cpu_exec, clock=clock,
                                 interrupted=self.interrupted)
        self.dispatcher = Dispatcher(cfg, self.topics, self, clock=clock, wall=wall, interrupted=self.interrupted)
        self.delivery = Delivery(self.me, self.local, self.dispatcher, self, clock=clock,
                                 exploring=self.learner.exploring, sent=self.auctioneer.sent)

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
            probe = self.dispatcher.job(req, "cpu", "x" * 32).to_payload()  # the chat, if any, is in it
        except UnicodeEncodeError:  # a lone surrogate (from JSON's "\ud800", or a bad argv)
            raise UsageError("the prompt is not valid Unicode text (it has a lone surrogate)") from None
        if len(probe) > self.cfg.max_payload_bytes:
            raise PromptTooLarge(len(probe), self.cfg.max_payload_bytes)

    # ------------------------------------------------------------------ the flow
    def _run(self, req: Request, started: float) -> Outcome:
        fsm = Machine(f"orchestration {req.rid}", ORCHESTRATION, "start")

        # 1. Own NPU free? Run here; no network at all.
        local = self.local.own_npu(req, started, fsm)
        if local is not None:
            return local

        # 2. Auction, or this device alone if the broker cannot be reached.
        me = self._self_offer()
        try:
            fleet = self._connect()
        except BrokerUnavailable as exc:
            return self._alone(req, started, fsm, me, exc)
        inbox = Inbox.open(fleet.mail, req.rid, self.cfg.max_payload_bytes, self.clock)
        self._active = inbox
        fleet.sync()  # once per connection: the retained roster, and our mail's subscriptions
        wire = Wire(fleet, inbox, fleet.bus.epoch)
        stop_listening = fleet.roster.listen(inbox.on_roster)
        try:
            return self._auction_and_run(req, started, fsm, wire, me)
        finally:
            stop_listening()
            inbox.close()
            self.auctioneer.closed(inbox)

    def _alone(self, req: Request, started: float, fsm: Machine, me: Offer, exc: BrokerUnavailable) -> Outcome:
        if not me.snapshot.cpu_slots:  # nothing here can run it: no "running locally"
            return Outcome(req.rid, Answer(False, ExitCode.NO_DEVICE,
                                           error=f"{exc}, and this device has no usable executor to run it alone"),
                           total_ms=(self.clock() - started) * 1000)
        log.info("%s; running locally", exc)  # a warning of the outcome: the caller shows it once
        fsm.fire("broker_down")
        return self._decide_and_run(req, started, fsm, None, [me], None, (f"{exc}; running locally",))

    def _auction_and_run(self, req: Request, started: float, fsm: Machine, wire: Wire, me: Offer) -> Outcome:
        auction = self.auctioneer.hold(req, wire, fsm)
        if auction.closing == "interrupted":
            return Outcome(req.rid, Answer(False, ExitCode.INTERRUPTED, error="interrupted during the auction"),
                           roster=auction.roster, auction_ms=auction.auction_ms,
                           total_ms=(self.clock() - started) * 1000)
        offers = [self._offer_from_bid(b) for b in auction.bids.values()]
        if me.snapshot.cpu_slots and self.me not in auction.bids:
            offers.append(me)  # no daemon here: this process runs it, under the same slot locks
        warnings = closing_warnings(auction, self.cfg.auction.bid_timeout_s)
        return self._decide_and_run(req, started, fsm, wire, offers, auction, warnings)

    def _decide_and_run(self, req: Request, started: float, fsm: Machine, wire: Wire | None,
                        offers: list[Offer], auction: AuctionResult | None,
                        warnings: tuple[str, ...]) -> Outcome:
        decision, seen = self._decide(req, offers, auction, warnings)
        if req.dry_run:
            winner = decision.winner
            if winner is None:
                return replace(seen, total_ms=(self.clock() - started) * 1000)
            return replace(seen, answer=Answer(True, ExitCode.OK), winner=winner.device,
                           path=path_of(winner.mode, winner.is_self), score=winner.score,
                           total_ms=(self.clock() - started) * 1000)
        walked = self.delivery.walk(req, fsm, wire, decision.ranking, auction.bids if auction else {})
        choice, answer = walked.choice, walked.answer
        if choice is None or answer is None:
            fsm.fire("no_candidate")
            return replace(seen, answer=self._nobody(req, wire, walked.attempts), attempts=walked.attempts,
                           total_ms=(self.clock() - started) * 1000)
        total_ms = (self.clock() - started) * 1000
        self.learner.learn(req.rid, choice, answer, walked.dispatched)  # after the answer is in
        return replace(seen, answer=answer, winner=choice.device, path=path_of(choice.mode, choice.is_self),
                       score=choice.score, attempts=walked.attempts, total_ms=total_ms)

    def _decide(self, req: Request, offers: list[Offer], auction: AuctionResult | None,
                warnings: tuple[str, ...]) -> tuple[Decision, Outcome]:
        """Rank the offers; and what was seen before running anything, for the outcome."""
        from agent.selection import select  # numpy: only the auction path pays for it

        deciding = self.clock()
        state = self.learner.state()
        lin, policy = self.cfg.auction.linucb, self.cfg.auction.policy
        decision = select(offers, state.arms, prompt_tokens=estimate_tokens(req.prompt),
                          max_new_tokens=req.max_new_tokens, alpha=lin.alpha, lam=lin.lambda_, policy=policy,
                          exploring=set(state.exploring), need=req.need, rng=self.rng, cursor=state.cursor,
                          model=req.model, tools=req.tools)
        decide_ms = (self.clock() - deciding) * 1000
        if decision.cursor != state.cursor and not req.dry_run:
            self.learner.move_cursor(decision.cursor)
        return decision, seen_before_running(req, auction, decision, decide_ms, warnings)

    def _nobody(self, req: Request, wire: Wire | None, attempts: tuple[Attempt, ...]) -> Answer:
        """The answer when no way to run it was left: what was tried, or why nothing could be."""
        # every model an online device (or this one) announces, for a model nobody serves
        known = sorted(self.local.models() | (wire.models() if wire is not None else set()))
        return no_device(req, attempts, known)

    # ------------------------------------------------------------------ offers
    def _offer_from_bid(self, bid: Bid) -> Offer:
        from agent.selection import Offer
        return Offer(bid.device, bid.snapshot, is_self=bid.device == self.me, service_s=bid.service_s,
                     service_n=bid.service_n, init_s=bid.init_s)

    def _self_offer(self) -> Offer:
        from agent.selection import Offer
        return Offer(self.me, self.local_snapshot(), is_self=True)


def seen_before_running(req: Request, auction: AuctionResult | None, decision: Decision, decide_ms: float,
                        warnings: tuple[str, ...]) -> Outcome:
    """What was seen before running anything (the bids, the roster, the ranking); each
    ending fills in the rest. Until then: no device can run it."""
    bids = auction.bids if auction else {}
    scores = {c.device: c.score for c in decision.ranking if c.mode == "cpu"}
    return Outcome(req.rid, Answer(False, ExitCode.NO_DEVICE, error="no device can run this job"),
                   bids=tuple(bid_summary(b, scores.get(b.device)) for b in sorted(bids.values(),
                                                                                  key=lambda b: b.device)),
                   roster=auction.roster if auction else (), auction_ms=auction.auction_ms if auction else 0.0,
                   invited=None if auction is None or auction.invited is None else len(auction.invited),
                   decide_ms=decide_ms, warnings=warnings, ranking=ranking_summary(decision.ranking),
                   dry_run=req.dry_run)


def no_device(req: Request, attempts: tuple[Attempt, ...], known: list[str]) -> Answer:
    """Why no device ran it: the attempts that failed; with none, the model or the tools
    nobody offers (``known``: the models the fleet serves)."""
    tried = ", ".join(f"{a['device']}: {a['outcome']}" for a in attempts)
    error = "no device can run this job" + (f" (tried {tried})" if tried else
                                            " (no peer bid and this device has no usable executor)")
    kind = ""
    if req.model is not None and not tried:
        error = (f"no device serves model {req.model!r} now; "
                 + (f"the fleet serves: {', '.join(known)}" if known else "no device has announced a model"))
        kind = "model_not_served"
    if req.tools and not tried:
        error = ("no device can call tools" + (f" with model {req.model!r}" if req.model else "")
                 + " now (an executor takes tools with `tools: true`; openai executors do by default)")
        kind = "no_tools"
    return Answer(False, ExitCode.NO_DEVICE, error=error, kind=kind)
