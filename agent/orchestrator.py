"""One orchestration: own NPU first, else auction, pick, dispatch, stream, train.

Theory of operation. ``Orchestrator.run`` drives the ``AUCTION`` state table
(``agent.fsm``) from one thread. Bus handlers only push ``(kind, …)`` tuples onto a
per-run queue; the run loop pulls them with a timeout equal to the nearest deadline, so
every wait is bounded and nothing sleeps.

1. The own NPU is claimed with a non-blocking ``flock``. If that works the job runs here
   and the broker is never contacted (not even connected to).
2. Otherwise the roster (retained availability, synchronised with a broker round trip) is
   the set of peers that must bid. The call for bids goes out at QoS 1 with a message
   expiry of the bid window; the auction closes when every peer still online has bid —
   a Will that fires shrinks the set — or at ``bid_timeout_s``.
3. ``selection.select`` ranks the ways to run it (free peer NPUs, then LinUCB over CPU
   candidates including this device). The ranking is walked: a ``declined``, an accept
   deadline missed, or a winner that goes offline before any token moves on to the next
   candidate under the same ``rid``. After tokens have streamed a failure is reported
   with the partial text; the job is never run a second time.
4. On the CPU path the arm of the device that ran it is trained once, with the context
   captured at decision time and the latency seen here (failures count as the cap).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from agent.config import Config
from agent.errors import (AgentError, BrokerUnavailable, ExecutionTimeout, ExecutorError,
                          MessageError, PromptTooLarge)
from agent.executors import Executor, Params, estimate_tokens
from agent.fsm import AUCTION, Machine
from agent.messages import (Accepted, Bid, BidRequest, Cancel, Declined, Done, Error,
                            Job, Snapshot, Timings, Token, decode_result)
from agent.npulock import NpuLock
from agent.topics import Topics

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_DEVICE, EXIT_TIMEOUT = 0, 1, 2, 3, 4
PATHS = ("local-npu", "peer-npu", "peer-cpu", "local-cpu")
PROGRESS_EVERY_S = 1.0
STEADY_CHECK_S = 0.5  # one broker round trip takes < 1 ms; a broker going away, no answer


@dataclass
class Outcome:
    """The answer to one prompt, and how it was reached (``trigger --json`` prints this)."""

    rid: str
    ok: bool = False
    exit_code: int = EXIT_FAILED
    winner: str | None = None
    path: str | None = None
    text: str = ""
    error: str | None = None
    bids: list[dict[str, Any]] = field(default_factory=list)
    roster: list[str] = field(default_factory=list)
    auction_ms: float = 0.0
    decide_ms: float = 0.0   # choosing the winner from the bids (LinUCB), after the auction
    total_ms: float = 0.0    # until the answer is in; training the arm store comes after
    timings: Timings = field(default_factory=Timings)
    attempts: list[dict[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    score: float | None = None
    ranking: list[dict[str, Any]] = field(default_factory=list)
    dry_run: bool = False
    started: float = field(default=0.0, repr=False)  # clock() when run() began

    def to_json(self) -> dict[str, Any]:
        return {"rid": self.rid, "winner": self.winner, "path": self.path, "text": self.text,
                "bids": self.bids, "roster": self.roster, "auction_ms": round(self.auction_ms, 3),
                "decide_ms": round(self.decide_ms, 3), "total_ms": round(self.total_ms, 3),
                "timings": {k: round(v, 3) for k, v in vars(self.timings).items()},
                "attempts": self.attempts, "ok": self.ok, "exit_code": self.exit_code,
                "error": self.error, "warnings": self.warnings, "ranking": self.ranking,
                "dry_run": self.dry_run}


class Fleet:
    """What an orchestration needs from the bus: publish, subscribe, and the live roster."""

    SYNC_TIMEOUT_S = 3.0

    def __init__(self, bus: Any, roster: Any, *, synced: bool = False):
        self.bus = bus
        self.roster = roster
        self._synced = synced
        self._lock = threading.Lock()

    def sync(self) -> None:
        """Once: a broker round trip, after which the retained roster and every subscription
        made so far are in place."""
        with self._lock:
            if self._synced:
                return
            if not self.bus.barrier(self.SYNC_TIMEOUT_S):
                log.warning("the broker did not echo our sync message; the roster may be incomplete")
            self._synced = True


class _Wire(NamedTuple):
    """The connection one run dispatches over."""

    fleet: Fleet
    events: queue.SimpleQueue[tuple[Any, ...]]
    epoch: int  # the bus's connection count when the run began (see _steady)


@dataclass
class _Reserved:
    """A rid whose reply subscriptions are already in place, so its auction does not wait
    for a SUBSCRIBE to be processed (measured: ~0.4 ms of a ~1 ms auction)."""

    rid: str
    bus: Any
    events: queue.SimpleQueue[tuple[Any, ...]]
    bids: _Bids
    subs: list[Any]


class _Bids:
    """The bids of one auction, gathered on the network thread.

    Each bid is decoded where it arrives and the orchestrator's thread is woken once, when
    every expected peer has bid, instead of once per bid (measured: ~120 µs a bid)."""

    def __init__(self, decode: Callable[[Any], Bid | None]):
        self._decode = decode
        self._lock = threading.Lock()
        self._bids: dict[str, Bid] = {}
        self._expected: set[str] | None = None
        self._open = True
        self.complete = threading.Event()
        self.wake = threading.Event()  # complete, or something for the orchestrator to look at

    def add(self, msg: Any) -> None:
        bid = self._decode(msg)
        if bid is None:
            return
        with self._lock:
            if self._open:
                self._bids[bid.device] = bid
                self._check()

    def expect(self, devices: Iterable[str]) -> set[str]:
        with self._lock:
            self._expected = set(devices)
            self._check()
            return set(self._expected)

    def drop(self, device: str) -> None:
        """A peer's Will fired: stop waiting for it."""
        with self._lock:
            if self._expected is not None:
                self._expected.discard(device)
                self._check()

    def _check(self) -> None:
        if self._expected is not None and self._expected <= self._bids.keys():
            self.complete.set()
            self.wake.set()

    def poke(self) -> None:
        self.wake.set()

    def missing(self) -> list[str]:
        with self._lock:
            return sorted((self._expected or set()) - self._bids.keys())

    def progress(self) -> tuple[int, int]:
        with self._lock:
            expected = self._expected or set()
            return len(expected & self._bids.keys()), len(expected)

    def close(self) -> dict[str, Bid]:
        with self._lock:
            self._open = False
            return dict(self._bids)


Connect = Callable[[], Fleet]


class Orchestrator:
    def __init__(self, cfg: Config, *, connect: Connect, npu_exec: Executor | None,
                 cpu_exec: Executor | None, arms: Callable[[], Any],
                 local_snapshot: Callable[[], Snapshot],
                 on_token: Callable[[str], None] = lambda t: None,
                 on_decision: Callable[[Outcome], None] = lambda o: None,
                 on_progress: Callable[[str], None] = lambda m: None,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 keep_warm: bool = False):
        self.cfg = cfg
        self.me = cfg.device_id
        self.topics = Topics(cfg.topic_prefix, cfg.homeassistant.discovery_prefix)
        self._connect = connect
        self.npu_exec = npu_exec
        self.cpu_exec = cpu_exec
        self.npu_lock = NpuLock(cfg.state_dir)
        self._arms_factory = arms  # the store (and numpy) only when an auction needs it
        self._arms: Any = None
        self.local_snapshot = local_snapshot
        self.on_token = on_token
        self.on_decision = on_decision
        self.on_progress = on_progress
        self.clock = clock
        self.wall = wall
        # A long-lived orchestrator (benchmarks, embedders) subscribes for its next rid as
        # soon as an answer is in, off the next auction's critical path.
        self.keep_warm = keep_warm
        self._next: _Reserved | None = None

    @property
    def arms(self) -> Any:
        if self._arms is None:
            self._arms = self._arms_factory()
        return self._arms

    # ------------------------------------------------------------------ entry point
    def run(self, prompt: str, *, max_new_tokens: int = 256, need: str = "any",
            rid: str | None = None, dry_run: bool = False) -> Outcome:
        """Answer one prompt. Raises PromptTooLarge before anything is published.

        ``dry_run`` holds the auction and makes the decision, but runs nothing: the outcome
        names the device that would have won, and the ranking behind it."""
        reserved, self._next = (self._next, None) if rid is None else (None, self._next)
        rid = reserved.rid if reserved else (rid or uuid.uuid4().hex)
        try:
            self._check_size(rid, prompt, max_new_tokens)
        except PromptTooLarge:
            self._next = reserved  # nothing was sent: keep it for the next prompt
            raise
        start = self.clock()
        out = Outcome(rid=rid, started=start, dry_run=dry_run)
        fsm = Machine(f"auction {rid}", AUCTION, "start")
        used: list[_Reserved] = [reserved] if reserved else []
        try:
            self._run(prompt, max_new_tokens, need, out, fsm, start, used)
        finally:
            if not out.total_ms:
                out.total_ms = (self.clock() - start) * 1000
            for r in used:
                for sub in r.subs:
                    r.bus.unsubscribe(sub)
            if self.keep_warm and used:
                self._next = self._reserve(used[-1].bus, uuid.uuid4().hex)
        return out

    def _reserve(self, bus: Any, rid: str) -> _Reserved:
        events: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        bids = _Bids(lambda m: self._decode_bid(m, rid))
        # Inline: both handlers are quick and never block; that saves two thread hand-offs
        # per message.
        subs = [bus.subscribe(self.topics.bid_replies(rid), bids.add, inline=True),
                bus.subscribe(self.topics.exec_results(rid), lambda m: events.put(("result", m)), inline=True)]
        return _Reserved(rid, bus, events, bids, subs)

    def _answered(self, out: Outcome) -> None:
        """The answer (or the failure) is in: stop the user-visible clock."""
        out.total_ms = (self.clock() - out.started) * 1000

    def _check_size(self, rid: str, prompt: str, max_new_tokens: int) -> None:
        probe = Job(rid=rid, origin=self.me, mode="cpu", claim="x" * 32, prompt=prompt,
                    max_new_tokens=max_new_tokens, deadline=0.0, accept_by=0.0,
                    reply_to=self.topics.exec_results(rid)).to_payload()
        if len(probe) > self.cfg.max_payload_bytes:
            raise PromptTooLarge(len(probe), self.cfg.max_payload_bytes)

    def _run(self, prompt: str, max_new: int, need: str, out: Outcome, fsm: Machine, start: float,
             used: list[_Reserved]) -> None:
        params = Params(max_new_tokens=max_new, timeout_s=self.cfg.auction.job_timeout_s)

        # 1. Own NPU free? Run here; no network at all.
        if self.npu_exec is not None and self.npu_exec.check() is None:
            if out.dry_run and self.npu_lock.is_free():
                fsm.fire("local_npu")
                out.winner, out.path, out.ok, out.exit_code = self.me, "local-npu", True, EXIT_OK
                out.ranking = [{"device": self.me, "mode": "npu", "score": None}]
                return
            claim = None if out.dry_run else self.npu_lock.try_claim(owner=out.rid)
            if claim is not None:
                with claim:
                    fsm.fire("local_npu")
                    out.winner, out.path = self.me, "local-npu"
                    self.on_decision(out)
                    self._run_here(self.npu_exec, prompt, params, out, fsm)
                return

        # 2. Auction, or local fallback if the broker cannot be reached.
        me_offer = self._self_offer()
        try:
            fleet = self._connect()
        except BrokerUnavailable as exc:
            out.warnings.append(f"{exc}; running locally")
            log.warning("%s; running locally", exc)
            fsm.fire("broker_down")
            offers = [me_offer] if me_offer.snapshot.cpu_slots else []
            self._decide_and_dispatch(None, offers, {}, prompt, max_new, need, params, out, fsm)
            return

        if not used or used[0].bus is not fleet.bus:
            used.append(self._reserve(fleet.bus, out.rid))
        fleet.sync()  # one round trip covers the retained roster and our new subscriptions
        reserved = used[-1]
        events = reserved.events
        epoch = fleet.bus.epoch

        def on_roster(dev: str, up: bool) -> None:
            events.put(("roster", dev, up))
            reserved.bids.poke()

        stop_listening = fleet.roster.listen(on_roster)
        try:
            bids = self._auction(fleet, reserved, epoch, prompt, max_new, need, out, fsm)
            offers = [_offer_from_bid(b) for b in bids.values()]
            if me_offer.snapshot.cpu_slots:
                offers.append(me_offer)
            self._decide_and_dispatch(_Wire(fleet, events, epoch), offers, bids, prompt, max_new, need,
                                      params, out, fsm)
        finally:
            stop_listening()

    # ------------------------------------------------------------------ auction
    def _steady(self, fleet: Fleet, epoch: int) -> bool:
        """Is our own link to the broker sound, as it was when this run began?

        A Will alone is ambiguous: on shutdown Mosquitto delivers every client's Will to the
        clients still connected. One round trip on the same connection tells a dead peer
        (act now) from a broker that is going away (every node will come back)."""
        return (fleet.bus.connected and fleet.bus.epoch == epoch
                and fleet.bus.barrier(STEADY_CHECK_S) and fleet.bus.epoch == epoch)

    def _auction(self, fleet: Fleet, reserved: _Reserved, epoch: int, prompt: str, max_new: int,
                 need: str, out: Outcome, fsm: Machine) -> dict[str, Bid]:
        fsm.fire("open")
        window = self.cfg.auction.bid_timeout_s
        opened = self.clock()
        collector = reserved.bids
        out.roster = sorted(collector.expect(fleet.roster.peers_online()))
        request = BidRequest(rid=out.rid, origin=self.me, deadline=self.wall() + window,
                             prompt_tokens=estimate_tokens(prompt), max_new_tokens=max_new, need=need)
        fleet.bus.publish(self.topics.bid_request(out.rid), request.to_payload(), qos=1,
                          expiry_s=window, response_topic=self.topics.bid_replies(out.rid)[:-2],
                          correlation_data=out.rid.encode())
        deadline = opened + window
        next_progress = opened + PROGRESS_EVERY_S
        while True:
            if collector.complete.is_set():
                closing = "roster_complete"
                break
            now = self.clock()
            if now >= deadline:
                closing = "timeout"
                out.warnings.append(f"bid window of {window:g} s closed without bids from "
                                    f"{', '.join(collector.missing())}")
                break
            if now >= next_progress:
                have, want = collector.progress()
                self.on_progress(f"waiting for bids: {have} of {want} in, missing "
                                 f"{', '.join(collector.missing())} ({deadline - now:.0f} s left)")
                next_progress = now + PROGRESS_EVERY_S
            collector.wake.wait(max(0.0, min(deadline, next_progress) - now))
            collector.wake.clear()
            while True:  # roster changes: a peer whose Will fired is not waited for
                try:
                    event = reserved.events.get_nowait()
                except queue.Empty:
                    break
                if event[0] == "roster" and not event[2] and self._steady(fleet, epoch):
                    collector.drop(event[1])
        bids = collector.close()
        out.auction_ms = (self.clock() - opened) * 1000
        for _ in bids:
            fsm.fire("bid")
        fsm.fire(closing)
        return bids

    def _decode_bid(self, msg: Any, rid: str) -> Bid | None:
        parsed = self.topics.parse(msg.topic)
        try:
            bid = Bid.from_payload(msg.payload, self.cfg.max_payload_bytes)
        except MessageError as exc:
            log.warning("dropping bid on %s: %s", msg.topic, exc)
            return None
        if parsed is None or bid.rid != rid or bid.device != parsed.device:
            log.warning("dropping bid on %s: rid/device do not match the topic", msg.topic)
            return None
        return bid

    # ------------------------------------------------------------------ decide + dispatch
    def _decide_and_dispatch(self, wire: _Wire | None,
                             offers: list[Any], bids: dict[str, Bid], prompt: str, max_new: int,
                             need: str, params: Params, out: Outcome, fsm: Machine) -> None:
        from agent.selection import select  # numpy: only the auction path pays for it

        deciding = self.clock()
        state = self.arms.load()
        lin = self.cfg.auction.linucb
        now = self.wall()
        decision = select(offers, state.arms, prompt_tokens=estimate_tokens(prompt),
                          max_new_tokens=max_new, alpha=lin.alpha, lam=lin.lambda_,
                          exploring=set(state.exploring), need=need)
        out.decide_ms = (self.clock() - deciding) * 1000
        out.ranking = [{"device": c.device, "mode": c.mode,
                        "score": None if c.score is None else round(c.score, 6)} for c in decision.ranking]
        scores = {c.device: c.score for c in decision.ranking if c.mode == "cpu"}
        out.bids = [_bid_summary(b, scores.get(b.device)) for b in sorted(bids.values(), key=lambda b: b.device)]
        if out.dry_run:
            winner = decision.winner
            if winner is not None:
                out.winner, out.score = winner.device, winner.score
                out.path = ("local-" if winner.is_self else "peer-") + winner.mode
                out.ok, out.exit_code = True, EXIT_OK
            else:
                out.exit_code, out.error = EXIT_NO_DEVICE, "no device can run this job"
            return

        for choice in decision.ranking:
            out.winner = choice.device
            out.score = choice.score
            out.path = ("local-" if choice.is_self else "peer-") + choice.mode
            if choice.explore:
                self.arms.mark_exploring(choice.device, out.rid, now + self.cfg.auction.job_timeout_s)
            if choice.is_self:
                fsm.fire("run_local")
                self.on_decision(out)
                began = self.clock()
                self._run_here(self.cpu_exec, prompt, params, out, fsm)  # type: ignore[arg-type]
            else:
                assert wire is not None
                fsm.fire("dispatch")
                began = self.clock()
                last = choice is decision.ranking[-1]
                verdict = self._dispatch(wire, choice, bids[choice.device].claim, prompt, params, out, fsm,
                                         last=last)
                if verdict == "next":
                    continue
            self._answered(out)
            if choice.mode == "cpu" and choice.x is not None:
                self._train(choice, out, self.clock() - began)
            return
        fsm.fire("no_candidate")
        out.winner = out.path = None
        out.exit_code = EXIT_NO_DEVICE
        tried = ", ".join(f"{a['device']}: {a['outcome']}" for a in out.attempts)
        out.error = ("no device can run this job" + (f" (tried {tried})" if tried else
                     " (no peer bid and this device has no usable executor)"))

    def _dispatch(self, wire: _Wire, choice: Any, claim: str, prompt: str, params: Params, out: Outcome,
                  fsm: Machine, *, last: bool) -> str:
        """Send the job to a peer and see it through; "next" means try the runner-up.

        ``last``: there is no runner-up, so a winner that drops off the network is waited
        for (accept_timeout_s) rather than abandoned for nothing."""
        fleet, events, epoch = wire
        auction = self.cfg.auction
        sent_at = self.clock()
        wall_now = self.wall()
        job = Job(rid=out.rid, origin=self.me, mode=choice.mode,
                  claim=claim,
                  prompt=prompt, max_new_tokens=params.max_new_tokens,
                  deadline=wall_now + auction.job_timeout_s,
                  accept_by=wall_now + auction.accept_timeout_s,
                  reply_to=self.topics.exec_results(out.rid)[:-2])
        fleet.bus.publish(self.topics.exec(choice.device), job.to_payload(), qos=1,
                          expiry_s=auction.job_timeout_s, response_topic=job.reply_to,
                          correlation_data=out.rid.encode())
        announced = False
        accept_deadline = sent_at + auction.accept_timeout_s
        job_deadline = sent_at + auction.job_timeout_s
        streamed: dict[int, str] = {}
        next_progress = sent_at + PROGRESS_EVERY_S
        # When the winner goes offline: if our connection stayed up and there is a runner-up,
        # we act at once. If we were cut off too (a broker restart makes every node look
        # offline for a moment), or there is nowhere else to go, it gets accept_timeout_s to
        # come back and carry on: its session kept the job.
        gone_until: float | None = None
        while True:
            now = self.clock()
            waiting_accept = fsm.state == "dispatched"
            deadline = accept_deadline if waiting_accept else job_deadline
            if gone_until is not None and now >= gone_until:
                fsm.fire("winner_offline")
                if fsm.state == "closed":
                    out.attempts.append({"device": choice.device, "outcome": "went offline"})
                    # If it was only a network blink, its session still holds the job:
                    # this cancel, queued behind it, keeps it from running a second time.
                    self._cancel(fleet, choice.device, out.rid, "went offline; failed over")
                    return "next"
                out.attempts.append({"device": choice.device, "outcome": "went offline while streaming"})
                out.exit_code, out.text = EXIT_FAILED, _joined(streamed)
                out.error = f"{choice.device} went offline after streaming part of the answer"
                self._cancel(fleet, choice.device, out.rid, "went offline while streaming")
                return "done"
            if gone_until is not None:
                deadline = min(job_deadline, gone_until)  # the grace replaces the accept deadline
            elif now >= deadline:
                if waiting_accept:
                    fsm.fire("accept_timeout")
                    out.attempts.append({"device": choice.device, "outcome": "no answer"})
                    self._cancel(fleet, choice.device, out.rid, "no accept in time")
                    return "next"
                fsm.fire("timeout")
                out.attempts.append({"device": choice.device, "outcome": "timed out"})
                out.exit_code, out.text = EXIT_TIMEOUT, _joined(streamed)
                out.error = f"{choice.device} did not finish within {auction.job_timeout_s:g} s"
                return "done"
            if now >= next_progress:
                self.on_progress(f"waiting for {choice.device} ({fsm.state}, {len(streamed)} chunks)")
                next_progress = now + PROGRESS_EVERY_S
            try:
                event = events.get(timeout=max(0.0, min(deadline, next_progress) - now))
            except queue.Empty:
                continue
            if event[0] == "roster":
                _, device, up = event
                if device == choice.device:
                    if up:
                        gone_until = None  # it is back
                    elif gone_until is None and not last and self._steady(fleet, epoch):
                        gone_until = self.clock()  # it died, and someone else can run it
                    elif gone_until is None:
                        gone_until = self.clock() + auction.accept_timeout_s
                        self.on_progress(f"{choice.device} went offline; giving it "
                                         f"{auction.accept_timeout_s:g} s to come back")
                continue
            if event[0] != "result":
                continue  # a late bid
            ev = self._decode_result(event[1], out.rid)
            if ev is None or ev.device != choice.device:
                continue
            gone_until = None  # whatever the roster says, it is talking to us
            if isinstance(ev, Declined):
                if fsm.state != "dispatched":
                    continue
                fsm.fire("declined")
                out.attempts.append({"device": choice.device, "outcome": f"declined: {ev.reason}"})
                return "next"
            if isinstance(ev, Accepted):
                if fsm.can("accepted"):
                    fsm.fire("accepted")
                if not announced:
                    announced = True
                    self.on_decision(out)
                if ev.queue_position:
                    self.on_progress(f"{choice.device} accepted; queue position {ev.queue_position}")
            elif isinstance(ev, Token):
                if ev.seq in streamed:
                    continue  # redelivered chunk
                fsm.fire("token")
                if not announced:
                    announced = True
                    self.on_decision(out)
                streamed[ev.seq] = ev.text
                self.on_token(ev.text)
            elif isinstance(ev, Done):
                fsm.fire("done")
                if not announced:
                    self.on_decision(out)
                gaps = _gaps(streamed)
                if gaps:
                    log.info("%s: %d token chunk(s) never arrived; done carries the whole text", out.rid, gaps)
                out.attempts.append({"device": choice.device, "outcome": "done"})
                out.ok, out.exit_code, out.text, out.timings = True, EXIT_OK, ev.text, ev.timings
                return "done"
            elif isinstance(ev, Error):
                fsm.fire("error")
                out.attempts.append({"device": choice.device, "outcome": f"error: {ev.reason}"})
                out.exit_code = EXIT_TIMEOUT if "timed out" in ev.reason else EXIT_FAILED
                out.text = ev.partial_text or _joined(streamed)
                out.error = f"{choice.device}: {ev.reason}"
                return "done"

    def _cancel(self, fleet: Fleet, device: str, rid: str, reason: str) -> None:
        fleet.bus.publish(self.topics.exec(device), Cancel(rid, self.me, reason).to_payload(), qos=1,
                          expiry_s=self.cfg.auction.job_timeout_s)

    def _decode_result(self, msg: Any, rid: str) -> Any:
        parsed = self.topics.parse(msg.topic)
        try:
            ev = decode_result(msg.payload, self.cfg.max_payload_bytes)
        except MessageError as exc:
            log.warning("dropping result on %s: %s", msg.topic, exc)
            return None
        if parsed is None or ev.rid != rid or ev.device != parsed.device:
            log.warning("dropping result on %s: rid/device do not match the topic", msg.topic)
            return None
        return ev

    # ------------------------------------------------------------------ local execution
    def _run_here(self, executor: Executor, prompt: str, params: Params, out: Outcome,
                  fsm: Machine) -> None:
        parts: list[str] = []

        def on_token(text: str) -> None:
            parts.append(text)
            self.on_token(text)

        try:
            result = executor.run(prompt, params, on_token)
        except ExecutorError as exc:
            fsm.fire("error")
            out.attempts.append({"device": self.me, "outcome": f"error: {exc.reason}"})
            out.exit_code = EXIT_TIMEOUT if isinstance(exc, ExecutionTimeout) else EXIT_FAILED
            out.text, out.error = exc.partial_text or "".join(parts), str(exc)
            return
        fsm.fire("done")
        out.attempts.append({"device": self.me, "outcome": "done"})
        out.ok, out.exit_code, out.text, out.timings = True, EXIT_OK, result.text, result.timings

    def _self_offer(self) -> Any:
        from agent.selection import Offer
        return Offer(self.me, self.local_snapshot(), is_self=True)

    def _train(self, choice: Any, out: Outcome, seconds: float) -> None:
        import numpy as np
        cap = self.cfg.auction.linucb.latency_cap_s
        y = min(seconds, cap) if out.ok else cap
        try:
            self.arms.train(choice.device, np.array(choice.x), y, out.rid)
        except (OSError, AgentError) as exc:
            log.error("could not train the arm store: %s", exc)


def _offer_from_bid(bid: Bid) -> Any:
    from agent.selection import Offer
    return Offer(bid.device, bid.snapshot)


def _bid_summary(bid: Bid, score: float | None) -> dict[str, Any]:
    s = bid.snapshot
    return {"device": bid.device, "has_npu": s.has_npu, "npu_free": s.npu_free,
            "cpu_slots": s.cpu_slots, "cpu_percent": s.cpu_percent, "queue_depth": s.queue_depth,
            "score": None if score is None else round(score, 6)}


def _joined(streamed: dict[int, str]) -> str:
    return "".join(streamed[k] for k in sorted(streamed))


def _gaps(streamed: dict[int, str]) -> int:
    return (max(streamed) + 1 - len(streamed)) if streamed else 0

