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
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.config import Config
from agent.errors import (AgentError, BrokerUnavailable, ExecutionTimeout, ExecutorError,
                          MessageError, PromptTooLarge)
from agent.executors import Executor, Params, estimate_tokens
from agent.fsm import AUCTION, Machine
from agent.messages import (Accepted, Bid, BidRequest, Declined, Done, Error,
                            Job, Snapshot, Timings, Token, decode_result)
from agent.npulock import NpuLock
from agent.topics import Topics

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_DEVICE, EXIT_TIMEOUT = 0, 1, 2, 3, 4
PATHS = ("local-npu", "peer-npu", "peer-cpu", "local-cpu")
PROGRESS_EVERY_S = 1.0


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
    total_ms: float = 0.0
    timings: Timings = field(default_factory=Timings)
    attempts: list[dict[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    score: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"rid": self.rid, "winner": self.winner, "path": self.path, "text": self.text,
                "bids": self.bids, "roster": self.roster, "auction_ms": round(self.auction_ms, 3),
                "total_ms": round(self.total_ms, 3),
                "timings": {k: round(v, 3) for k, v in vars(self.timings).items()},
                "attempts": self.attempts, "ok": self.ok, "exit_code": self.exit_code,
                "error": self.error, "warnings": self.warnings}


class Fleet:
    """What an orchestration needs from the bus: publish, subscribe, and the live roster."""

    def __init__(self, bus: Any, roster: Any):
        self.bus = bus
        self.roster = roster


Connect = Callable[[], Fleet]


class Orchestrator:
    def __init__(self, cfg: Config, *, connect: Connect, npu_exec: Executor | None,
                 cpu_exec: Executor | None, arms: Any, local_snapshot: Callable[[], Snapshot],
                 on_token: Callable[[str], None] = lambda t: None,
                 on_decision: Callable[[Outcome], None] = lambda o: None,
                 on_progress: Callable[[str], None] = lambda m: None,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time):
        self.cfg = cfg
        self.me = cfg.device_id
        self.topics = Topics(cfg.topic_prefix, cfg.homeassistant.discovery_prefix)
        self._connect = connect
        self.npu_exec = npu_exec
        self.cpu_exec = cpu_exec
        self.npu_lock = NpuLock(cfg.state_dir)
        self.arms = arms
        self.local_snapshot = local_snapshot
        self.on_token = on_token
        self.on_decision = on_decision
        self.on_progress = on_progress
        self.clock = clock
        self.wall = wall

    # ------------------------------------------------------------------ entry point
    def run(self, prompt: str, *, max_new_tokens: int = 256, need: str = "any",
            rid: str | None = None) -> Outcome:
        """Answer one prompt. Raises PromptTooLarge before anything is published."""
        rid = rid or uuid.uuid4().hex
        self._check_size(rid, prompt, max_new_tokens)
        start = self.clock()
        out = Outcome(rid=rid)
        fsm = Machine(f"auction {rid}", AUCTION, "start")
        try:
            self._run(prompt, max_new_tokens, need, out, fsm, start)
        finally:
            out.total_ms = (self.clock() - start) * 1000
        return out

    def _check_size(self, rid: str, prompt: str, max_new_tokens: int) -> None:
        probe = Job(rid=rid, origin=self.me, mode="cpu", claim="x" * 32, prompt=prompt,
                    max_new_tokens=max_new_tokens, deadline=0.0, accept_by=0.0,
                    reply_to=self.topics.exec_results(rid)).to_payload()
        if len(probe) > self.cfg.max_payload_bytes:
            raise PromptTooLarge(len(probe), self.cfg.max_payload_bytes)

    def _run(self, prompt: str, max_new: int, need: str, out: Outcome, fsm: Machine, start: float) -> None:
        params = Params(max_new_tokens=max_new, timeout_s=self.cfg.auction.job_timeout_s)

        # 1. Own NPU free? Run here; no network at all.
        if self.npu_exec is not None and self.npu_exec.check() is None:
            claim = self.npu_lock.try_claim(owner=out.rid)
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

        events: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        subs = [fleet.bus.subscribe(self.topics.bid_replies(out.rid), lambda m: events.put(("bid", m))),
                fleet.bus.subscribe(self.topics.exec_results(out.rid), lambda m: events.put(("result", m)))]
        stop_listening = fleet.roster.listen(lambda dev, up: events.put(("roster", dev, up)))
        try:
            bids = self._auction(fleet, events, prompt, max_new, need, out, fsm)
            offers = [_offer_from_bid(b) for b in bids.values()]
            if me_offer.snapshot.cpu_slots:
                offers.append(me_offer)
            self._decide_and_dispatch((fleet, events), offers, bids, prompt, max_new, need,
                                      params, out, fsm)
        finally:
            stop_listening()
            for sub in subs:
                fleet.bus.unsubscribe(sub)

    # ------------------------------------------------------------------ auction
    def _auction(self, fleet: Fleet, events: queue.SimpleQueue[tuple[Any, ...]], prompt: str,
                 max_new: int, need: str, out: Outcome, fsm: Machine) -> dict[str, Bid]:
        fsm.fire("open")
        window = self.cfg.auction.bid_timeout_s
        opened = self.clock()
        expected = set(fleet.roster.peers_online())
        out.roster = sorted(expected)
        request = BidRequest(rid=out.rid, origin=self.me, deadline=self.wall() + window,
                             prompt_tokens=estimate_tokens(prompt), max_new_tokens=max_new, need=need)
        fleet.bus.publish(self.topics.bid_request(out.rid), request.to_payload(), qos=1,
                          expiry_s=window, response_topic=self.topics.bid_replies(out.rid)[:-2],
                          correlation_data=out.rid.encode())
        bids: dict[str, Bid] = {}
        deadline = opened + window
        next_progress = opened + PROGRESS_EVERY_S
        while not expected <= bids.keys():
            now = self.clock()
            if now >= deadline:
                fsm.fire("timeout")
                missing = sorted(expected - bids.keys())
                out.warnings.append(f"bid window of {window:g} s closed without bids from {', '.join(missing)}")
                break
            if now >= next_progress:
                missing = sorted(expected - bids.keys())
                self.on_progress(f"waiting for bids: {len(bids.keys() & expected)} of {len(expected)}"
                                 f" in, missing {', '.join(missing)} "
                                 f"({deadline - now:.0f} s left)")
                next_progress = now + PROGRESS_EVERY_S
            try:
                event = events.get(timeout=min(deadline, next_progress) - now)
            except queue.Empty:
                continue
            if event[0] == "bid":
                bid = self._decode_bid(event[1], out.rid)
                if bid is not None:
                    fsm.fire("bid")
                    bids[bid.device] = bid
            elif event[0] == "roster" and not event[2]:
                expected.discard(event[1])  # its Will fired: stop waiting for it
        else:
            fsm.fire("roster_complete")
        out.auction_ms = (self.clock() - opened) * 1000
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
    def _decide_and_dispatch(self, wire: tuple[Fleet, queue.SimpleQueue[tuple[Any, ...]]] | None,
                             offers: list[Any], bids: dict[str, Bid], prompt: str, max_new: int,
                             need: str, params: Params, out: Outcome, fsm: Machine) -> None:
        from agent.selection import select  # numpy: only the auction path pays for it

        state = self.arms.load()
        lin = self.cfg.auction.linucb
        now = self.wall()
        decision = select(offers, state.arms, prompt_tokens=estimate_tokens(prompt),
                          max_new_tokens=max_new, alpha=lin.alpha, lam=lin.lambda_,
                          exploring=set(state.exploring), need=need)
        scores = {c.device: c.score for c in decision.ranking if c.mode == "cpu"}
        out.bids = [_bid_summary(b, scores.get(b.device)) for b in sorted(bids.values(), key=lambda b: b.device)]

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
                verdict = self._dispatch(wire[0], wire[1], choice, bids[choice.device].claim,
                                         prompt, params, out, fsm)
                if verdict == "next":
                    continue
            if choice.mode == "cpu" and choice.x is not None:
                self._train(choice, out, self.clock() - began)
            return
        fsm.fire("no_candidate")
        out.winner = out.path = None
        out.exit_code = EXIT_NO_DEVICE
        tried = ", ".join(f"{a['device']}: {a['outcome']}" for a in out.attempts)
        out.error = ("no device can run this job" + (f" (tried {tried})" if tried else
                     " (no peer bid and this device has no usable executor)"))

    def _dispatch(self, fleet: Fleet, events: queue.SimpleQueue[tuple[Any, ...]], choice: Any,
                  claim: str, prompt: str, params: Params, out: Outcome, fsm: Machine) -> str:
        """Send the job to a peer and see it through; "next" means try the runner-up."""
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
        while True:
            now = self.clock()
            waiting_accept = fsm.state == "dispatched"
            deadline = accept_deadline if waiting_accept else job_deadline
            if now >= deadline:
                if waiting_accept:
                    fsm.fire("accept_timeout")
                    out.attempts.append({"device": choice.device, "outcome": "no answer"})
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
                event = events.get(timeout=min(deadline, next_progress) - now)
            except queue.Empty:
                continue
            if event[0] == "roster":
                if event[1] == choice.device and not event[2]:
                    fsm.fire("winner_offline")
                    if fsm.state == "closed":
                        out.attempts.append({"device": choice.device, "outcome": "went offline"})
                        return "next"
                    out.attempts.append({"device": choice.device, "outcome": "went offline while streaming"})
                    out.exit_code, out.text = EXIT_FAILED, _joined(streamed)
                    out.error = f"{choice.device} went offline after streaming part of the answer"
                    return "done"
                continue
            if event[0] != "result":
                continue  # a late bid
            ev = self._decode_result(event[1], out.rid)
            if ev is None or ev.device != choice.device:
                continue
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

