"""The delivery: a decided job run where the ranking says, failing over down the ranking.

- ``Delivery.walk`` tries the ranked ways to run a job in turn (``dispatch.worth_trying``
  skips every mode of a device whose Will has fired) until one answers; an attempt that
  passes — declined, silent, gone, or its model server down before anything ran — hands
  the job to the runner-up under the same ``rid``.
- ``Dispatcher`` sends the job to a peer and drives the attempt's ``dispatch.DispatchState``
  with the run's events (results, roster changes, link changes) and clock ticks, carrying
  out each step: stream the tokens, announce the winner, send again, cancel.
- ``LocalRunner`` runs it in this process: on the own NPU, claimed with a non-blocking
  ``flock`` before any network, or on a CPU slot of this device (the same slot locks as the
  daemon's), waiting for one.

Every wait here has a timeout equal to the nearest deadline; Ctrl-C (``interrupted``)
cancels the job in flight on its device.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from agent.config import Config
from agent.dispatch import Answer, DispatchState, Step, link_doubt_s, worth_trying
from agent.errors import ExecutorError, ExitCode
from agent.executors import Params, Served, estimate_tokens
from agent.fsm import Machine
from agent.locks import CpuSlots, NpuLock
from agent.messages import Bid, Cancel, Job, cancel_check, decode_result, decoded, new_cancel_key
from agent.orchestration import PROGRESS_EVERY_S, STEADY_CHECK_S, Hooks, Request, Wire
from agent.outcome import Decided, Outcome, path_of
from agent.topics import Topics

if TYPE_CHECKING:  # numpy: only the auction path pays for it
    from agent.selection import Choice

log = logging.getLogger("agent.orchestrator")  # the orchestrator's parts log under its name

Attempt = Mapping[str, str]  # {"device": …, "outcome": …}, as ``trigger --json`` lists it


@dataclass(frozen=True)
class Delivered:
    """How the walk ended: the answer and the choice that gave it (None: nobody could run
    it), and every attempt made on the way."""

    attempts: tuple[Attempt, ...]
    choice: Choice | None = None
    answer: Answer | None = None
    dispatched: float = 0.0  # when the answering attempt began: the device's promise runs from here


class Delivery:
    """Walks the ranking: this process or a peer for each way in turn, until one answers."""

    def __init__(self, me: str, local: LocalRunner, peers: Dispatcher, hooks: Hooks, *, clock: Callable[[], float],
                 exploring: Callable[[str, str], None], sent: Callable[[str, float, float], None]):
        self.me = me
        self.local = local
        self.peers = peers
        self.hooks = hooks
        self.clock = clock
        self.exploring = exploring  # (device, rid): a job that explores the device is sent
        self.sent = sent            # (device, at, promise): a CPU job went to a peer

    def walk(self, req: Request, fsm: Machine, wire: Wire | None, ranking: Sequence[Choice],
             bids: Mapping[str, Bid]) -> Delivered:
        """Try the ranked ways to run it in turn, until one answers or none is left."""
        attempts: list[Attempt] = []
        for choice, last in worth_trying(ranking, lambda c: c.device if c.device in bids else "",
                                         lambda device: wire is not None and wire.offline(device)):
            dispatched = self.clock()  # the device's promise runs from here
            if choice.explore:
                self.exploring(choice.device, req.rid)
            if choice.device not in bids:  # this device, with no daemon to hand it to
                answer, attempt = self._here(req, fsm, choice)
            else:
                assert wire is not None, "peers come from an auction"
                answer, attempt, dispatched, choice = self._peer(req, fsm, wire, choice, bids[choice.device], last,
                                                                 dispatched)
            attempts.append(attempt)
            if answer is not None:
                return Delivered(tuple(attempts), choice, answer, dispatched)
        return Delivered(tuple(attempts))

    def _here(self, req: Request, fsm: Machine, choice: Choice) -> tuple[Answer | None, Attempt]:
        fsm.fire("run_local")
        self.hooks.on_decision(Decided(self.me, path_of(choice.mode, choice.is_self), choice.score))
        answer, outcome = self.local.on_cpu(req, fsm)
        if outcome.startswith("unavailable:"):
            return None, {"device": self.me, "outcome": outcome}  # its model server is down and nothing ran
        return answer, {"device": self.me, "outcome": outcome}

    def _peer(self, req: Request, fsm: Machine, wire: Wire, choice: Choice, bid: Bid, last: bool,
              dispatched: float) -> tuple[Answer | None, Attempt, float, Choice]:
        """The answer (None: the runner-up's turn), the attempt, when the job went out under
        the claim it ran with, and the choice as the learner should see it. If the device
        restarted and bid again, the job ran from then, and its promise carries the start-up
        the new bid priced instead of the first one's: the time it was away, or a model it
        had to load again, is not its speed."""
        fsm.fire("dispatch")
        if choice.mode == "cpu" and choice.promise is not None:
            self.sent(choice.device, dispatched, choice.promise)
        decided = Decided(choice.device, path_of(choice.mode, choice.is_self), choice.score)
        step = self.peers.run(wire, req, choice.device, choice.mode, bid.claim, decided, last)
        attempt = {"device": choice.device, "outcome": step.outcome or "?"}
        if step.answer is None:
            fsm.fire("passed")
            return None, attempt, dispatched, choice
        fsm.fire("answered" if step.answer.ok else "failed")
        if step.bid is not None and choice.promise is not None:
            choice = rebid_choice(choice, bid, step.bid, req)
        return step.answer, attempt, dispatched if step.since is None else step.since, choice


def rebid_choice(choice: Choice, first: Bid, again: Bid, req: Request) -> Choice:
    """The choice as the learner should see a job that went out again under ``again``, a
    bid from the same device after it restarted: its promise carries the start-up the new
    bid priced instead of the first one's (a model loaded again is not a slower device),
    and its context is the device's state as that bid said, with that promise."""
    from agent.linucb import context  # numpy: as selection, only once an auction decided
    assert choice.promise is not None
    promise = max(choice.promise - first.init_s + again.init_s, 0.0)  # init_s: >= 0 (Bid.from_payload)
    x = None if choice.x is None else tuple(context(again.snapshot, estimate_tokens(req.prompt),
                                                    req.max_new_tokens, promise))
    return replace(choice, promise=promise, x=x)


class Dispatcher:
    """Sends a job to a peer and sees its attempt through, event by event."""

    def __init__(self, cfg: Config, topics: Topics, hooks: Hooks, *, clock: Callable[[], float],
                 wall: Callable[[], float], interrupted: threading.Event):
        self.cfg = cfg
        self.me = cfg.device_id
        self.topics = topics
        self.hooks = hooks
        self.clock = clock
        self.wall = wall
        self.interrupted = interrupted

    def job(self, req: Request, mode: str, claim: str) -> Job:
        auction = self.cfg.auction
        return Job(rid=req.rid, origin=self.me, mode=mode, claim=claim, prompt="" if req.chat else req.prompt,
                   max_new_tokens=req.max_new_tokens, accept_s=auction.accept_timeout_s,
                   timeout_s=auction.job_timeout_s, reply_to=self.topics.result_stem(self.me, req.rid),
                   sent_at=round(self.wall(), 3), model=req.model, temperature=req.temperature, chat=req.chat)

    def run(self, wire: Wire, req: Request, device: str, mode: str, claim: str, decided: Decided,
            last: bool) -> Step:
        """Send the job to a peer and see it through: the final (next or finished) step."""
        auction = self.cfg.auction
        bus, events = wire.fleet.bus, wire.inbox.events
        sent = self.clock()
        key = new_cancel_key()  # this job's alone: a cancel sent elsewhere does not fit it
        jobs = [replace(self.job(req, mode, claim), cancel_check=cancel_check(key))]  # [-1]: with the claim held now

        def send(claim: str | None = None) -> None:
            if claim is not None:  # it restarted and bid again: the job goes with the new claim
                jobs.append(replace(jobs[-1], claim=claim))
            job = jobs[-1]
            accept_s, timeout_s = attempt.resend_windows(job.accept_s, job.timeout_s, self.clock() - sent)
            again = replace(job, accept_s=accept_s, timeout_s=timeout_s, sent_at=round(self.wall(), 3))
            bus.publish(self.topics.exec(device), again.to_payload(), qos=1, expiry_s=again.timeout_s,
                        response_topic=job.reply_to, correlation_data=req.rid.encode())

        def ask_again() -> None:  # QoS 0, as invitations: asked again until it bids
            wire.inbox.book.want_late(device)
            bus.publish(self.topics.bid_invite(device, req.rid, self.me),
                        req.call(self.me, auction.bid_timeout_s, self.wall()).to_payload(), qos=0)

        def cancel(reason: str) -> None:
            bus.publish(self.topics.cancel(device, self.me), Cancel(req.rid, self.me, key, reason).to_payload(),
                        qos=1, expiry_s=auction.job_timeout_s)

        attempt = DispatchState(req.rid, device, sent, accept_timeout_s=auction.accept_timeout_s,
                                job_timeout_s=auction.job_timeout_s, last=last, digest=jobs[0].digest,
                                link_doubt_s=link_doubt_s(self.cfg.broker.keepalive_s))
        next_progress = sent + PROGRESS_EVERY_S
        last_token = float("-inf")
        send()  # then straight to the wait: paho's thread, which writes it, needs the GIL
        while True:
            now = self.clock()
            if self.interrupted.is_set():
                cancel("interrupted")
                bus.barrier(STEADY_CHECK_S)  # the cancel is at the broker before we go
                return Step("finished", outcome="interrupted", answer=Answer(
                    False, ExitCode.INTERRUPTED, attempt.text, f"interrupted; {device} was told to stop"))
            step = attempt.on_tick(now)
            if step.verdict == "continue" and now >= next_progress:
                if now - last_token >= PROGRESS_EVERY_S:  # a streaming answer is its own progress
                    self.hooks.on_progress(f"waiting for {device} ({attempt.state}, {len(attempt.streamed)} chunks)")
                next_progress = now + PROGRESS_EVERY_S
            if step.verdict == "continue":
                try:
                    event = events.get(timeout=max(0.0, min(attempt.deadline, next_progress) - now))
                except queue.Empty:
                    continue
                step = self._feed(attempt, event, wire)
            self._carry_out(step, decided, send, cancel, ask_again)
            if step.tokens:
                last_token = self.clock()
            if step.verdict != "continue":
                if attempt.gaps:
                    log.info("%s: %d token chunk(s) never arrived; done carries the whole text", req.rid,
                             attempt.gaps)
                return replace(step, since=attempt.reclaimed, bid=attempt.reclaimed_bid)

    def _carry_out(self, step: Step, decided: Decided, send: Callable[[str | None], None],
                   cancel: Callable[[str], None], ask_again: Callable[[], None]) -> None:
        """What a step asks of the caller and the wire: progress, the winner, tokens, a re-send
        (with a new claim), a cancel, a new bid."""
        if step.progress:
            self.hooks.on_progress(step.progress)
        if step.announce:
            self.hooks.on_decision(decided)
        for text in step.tokens:
            self.hooks.on_token(text)
        if step.send:
            send(step.claim)
        if step.cancel:
            cancel(step.cancel)
        if step.rebid:
            ask_again()

    def _feed(self, attempt: DispatchState, event: tuple[Any, ...], wire: Wire) -> Step:
        now = self.clock()
        if event[0] == "roster":
            _, device, online = event
            if device != attempt.device:
                return Step()
            return attempt.on_peer(online, now, wire.steady)
        if event[0] == "link":
            return attempt.on_link(event[1], now)
        if event[0] == "interrupt":
            return Step()  # the loop sees self.interrupted and cancels the job
        if event[0] == "bid":
            return attempt.on_bid(event[1], now)
        msg = event[1]
        parsed = self.topics.parse(msg.topic)
        if parsed is None or parsed.device != attempt.device or parsed.origin != self.me:
            return Step()  # another device's results: not even decoded
        ev = decoded(msg.topic, msg.payload, lambda p: decode_result(p, self.cfg.max_payload_bytes),
                     what="result", logger=log, matches=lambda e: e.rid == attempt.rid and e.device == parsed.device)
        return Step() if ev is None else attempt.on_result(ev, now)


class LocalRunner:
    """Runs a job in this process: on the own NPU, or on a CPU slot of this device."""

    def __init__(self, cfg: Config, hooks: Hooks, *, npu_exec: Served | None, cpu_exec: Served | None,
                 clock: Callable[[], float], interrupted: threading.Event):
        self.cfg = cfg
        self.me = cfg.device_id
        self.hooks = hooks
        self.npu_exec = npu_exec
        self.cpu_exec = cpu_exec
        self.npu_lock = NpuLock(cfg.state_dir)
        self.cpu_slots = CpuSlots(cfg.state_dir, cfg.cpu.slots if cpu_exec is not None else 0)
        self.clock = clock
        self.interrupted = interrupted

    def models(self) -> set[str]:
        """The model names this device's own executors serve."""
        return {e.served.name for e in (self.npu_exec, self.cpu_exec) if e is not None and e.served.name}

    def own_npu(self, req: Request, started: float, fsm: Machine) -> Outcome | None:
        """Own NPU free? Run it there, no network at all; None if it cannot."""
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
        held = self.npu_lock.try_acquire(owner=req.rid)
        if held is None:
            return None
        with held:
            fsm.fire("local_npu")
            self.hooks.on_decision(Decided(self.me, "local-npu"))
            answer, outcome = self._run(self.npu_exec, req, fsm)
        return Outcome(req.rid, answer, self.me, "local-npu", attempts=({"device": self.me, "outcome": outcome},),
                       total_ms=(self.clock() - started) * 1000)

    def on_cpu(self, req: Request, fsm: Machine) -> tuple[Answer, str]:
        """On a CPU slot of this device; a model server that cannot be reached sends the
        walk back to the ranking (outcome ``unavailable: …``)."""
        executor = self.cpu_exec
        assert executor is not None, "a self offer with CPU slots has a CPU executor"
        return self._run(executor, req, fsm, slots=self.cpu_slots, pass_on=True)

    def _run(self, executor: Served, req: Request, fsm: Machine,
             slots: CpuSlots | None = None, pass_on: bool = False) -> tuple[Answer, str]:
        """Run it in this process: on the NPU (already claimed), or on a CPU slot of this
        device, waiting for one if the daemon or other triggers hold them all. With
        ``pass_on``, a model server that cannot be reached sends the walk back to the
        ranking (outcome ``unavailable: …``)."""
        parts: list[str] = []

        def on_token(text: str) -> None:
            parts.append(text)
            self.hooks.on_token(text)

        timeout_s = self.cfg.auction.job_timeout_s
        held = None
        if slots is not None:
            began = self.clock()
            held = slots.wait_acquire(req.rid, timeout_s, on_wait=self._slot_progress())
            if held is None:
                fsm.fire("error")
                return (Answer(False, ExitCode.TIMEOUT, error=f"no CPU slot of this device came free within "
                                                               f"{timeout_s:g} s"), "no free slot")
            timeout_s -= self.clock() - began
        params = Params(max_new_tokens=req.max_new_tokens, temperature=req.temperature, timeout_s=timeout_s,
                        rid=req.rid, hold_fds=(held.fd,) if held is not None else (), chat=req.chat)
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
            if held is not None:
                held.release()
        fsm.fire("done")
        return Answer(True, ExitCode.OK, result.text, None, result.timings, result.generated_tokens,
                      result.prompt_tokens, result.finish_reason, result.tool_calls), "done"

    def _slot_progress(self) -> Callable[[float], None]:
        shown = [0.0]

        def on_wait(waited: float) -> None:
            if waited - shown[0] >= PROGRESS_EVERY_S:
                shown[0] = waited
                self.hooks.on_progress(f"waiting for a free CPU slot on this device ({waited:.0f} s)")
        return on_wait
