"""One attempt to have a peer run a job: what the orchestrator does with each event.

Theory of operation. ``DispatchState`` is a pure state machine (the ``ATTEMPT`` table in
``agent.fsm``) with a fake-able clock: the orchestrator feeds it the result events of the
job, the roster changes of the device it chose, and clock ticks, and it answers with a
``Step``: tokens to stream, whether to announce the winner, whether to cancel the job on
the device, and a verdict:

- ``continue``: keep waiting (``deadline`` says until when at most);
- ``next``: this device will not run it; try the runner-up under the same rid;
- ``finished``: the answer (or a failure that must not be retried) is in ``answer``.

Rules, each one a line below:
- a ``declined``, no ``accepted`` within ``accept_timeout_s``, or a winner that goes
  offline before any token: ``next`` (with a cancel, so a copy the device's session still
  holds never runs later);
- a winner going offline is acted on at once only when our own link is steady (one
  broker round trip works) and there is a runner-up; otherwise it gets
  ``accept_timeout_s`` to come back, since a broker restart makes everyone look offline;
- after a token has streamed, nothing is ever re-run elsewhere: a failure is reported
  with the partial text;
- redelivered tokens (same ``seq``) are streamed once; events from any other device
  than the one chosen are ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from agent.errors import ERROR_KINDS, ExitCode
from agent.fsm import ATTEMPT, Machine
from agent.messages import Accepted, Declined, Done, Error, ResultEvent, Timings, Token


@dataclass(frozen=True)
class Answer:
    """How a job ended, wherever it ran."""

    ok: bool
    exit_code: ExitCode
    text: str = ""
    error: str | None = None
    timings: Timings = field(default_factory=Timings)
    generated_tokens: int = 0


@dataclass(frozen=True)
class Step:
    verdict: str = "continue"          # continue | next | finished
    tokens: tuple[str, ...] = ()       # new text to stream, in order
    announce: bool = False             # the winner has answered: say who it is (once)
    cancel: str | None = None          # tell the device to drop the job, with this reason
    outcome: str | None = None         # for the attempts list: "done", "declined: npu_busy", …
    answer: Answer | None = None       # with verdict finished
    progress: str | None = None        # a line for a user who is waiting


CONTINUE = Step()


class DispatchState:
    """The orchestrator's side of one job on one device."""

    def __init__(self, rid: str, device: str, now: float, *, accept_timeout_s: float,
                 job_timeout_s: float, last: bool):
        self.rid = rid
        self.device = device
        self.accept_timeout_s = accept_timeout_s
        self.fsm = Machine(f"attempt {rid} on {device}", ATTEMPT, "dispatched")
        self.accept_deadline = now + accept_timeout_s
        self.job_deadline = now + job_timeout_s
        self.job_timeout_s = job_timeout_s
        self.last = last                     # no runner-up: never give up on it for nothing
        self.streamed: dict[int, str] = {}
        self.announced = False
        self.gone_until: float | None = None  # offline: when we stop waiting for it

    # ------------------------------------------------------------------ queries
    @property
    def state(self) -> str:
        return self.fsm.state

    @property
    def text(self) -> str:
        """What has streamed so far, in sequence order."""
        return "".join(self.streamed[k] for k in sorted(self.streamed))

    @property
    def gaps(self) -> int:
        """Token chunks missing from the stream (``done`` carries the whole text anyway)."""
        return (max(self.streamed) + 1 - len(self.streamed)) if self.streamed else 0

    @property
    def deadline(self) -> float:
        """The latest time ``on_tick`` must be called."""
        if self.gone_until is not None:
            return min(self.job_deadline, self.gone_until)
        return self.accept_deadline if self.state == "dispatched" else self.job_deadline

    # ------------------------------------------------------------------ inputs
    def on_result(self, ev: ResultEvent, now: float) -> Step:
        if ev.device != self.device or ev.rid != self.rid:
            return CONTINUE  # not ours: another device's (or another job's) event
        self.gone_until = None  # whatever the roster says, it is talking to us
        if isinstance(ev, Declined):
            if self.state != "dispatched":
                return CONTINUE  # a stale decline of an earlier copy
            self.fsm.fire("declined")
            return Step("next", outcome=f"declined: {ev.reason}")
        if isinstance(ev, Accepted):
            if self.fsm.can("accepted"):
                self.fsm.fire("accepted")
            progress = f"{self.device} accepted; queue position {ev.queue_position}" if ev.queue_position else None
            return Step(announce=self._announce(), progress=progress)
        if isinstance(ev, Token):
            if ev.seq in self.streamed or not self.fsm.can("token"):
                return CONTINUE  # redelivered chunk
            self.fsm.fire("token")
            self.streamed[ev.seq] = ev.text
            return Step(tokens=(ev.text,), announce=self._announce())
        if not self.fsm.can(ev.type):
            return CONTINUE  # an end event after the end (a redelivered copy)
        if isinstance(ev, Done):
            self.fsm.fire("done")
            answer = Answer(True, ExitCode.OK, ev.text, None, ev.timings, ev.generated_tokens)
            return Step("finished", announce=self._announce(), outcome="done", answer=answer)
        assert isinstance(ev, Error)
        self.fsm.fire("error")
        answer = Answer(False, ERROR_KINDS.get(ev.kind, ExitCode.FAILED), ev.partial_text or self.text,
                        f"{self.device}: {ev.reason}")
        return Step("finished", outcome=f"error: {ev.reason}", answer=answer)

    def on_peer(self, online: bool, now: float, steady: Callable[[], bool]) -> Step:
        """The chosen device's availability changed. ``steady()`` asks whether our own link
        to the broker is sound (a round trip); it is called only when the answer matters."""
        if online:
            self.gone_until = None  # it is back
            return CONTINUE
        if self.gone_until is not None:
            return CONTINUE
        if not self.last and steady():
            self.gone_until = now  # it died, and someone else can run it: act now
            return self.on_tick(now)
        self.gone_until = now + self.accept_timeout_s
        return Step(progress=f"{self.device} went offline; giving it {self.accept_timeout_s:g} s to come back")

    def on_tick(self, now: float) -> Step:
        if self.gone_until is not None and now >= self.gone_until:
            self.fsm.fire("winner_offline")
            if self.state == "passed":
                return Step("next", cancel="went offline; failed over", outcome="went offline")
            answer = Answer(False, ExitCode.FAILED, self.text,
                            f"{self.device} went offline after streaming part of the answer")
            return Step("finished", cancel="went offline while streaming",
                        outcome="went offline while streaming", answer=answer)
        if self.gone_until is not None or now < self.deadline:
            return CONTINUE
        if self.state == "dispatched":
            self.fsm.fire("accept_timeout")
            return Step("next", cancel="no accept in time", outcome="no answer")
        self.fsm.fire("timeout")
        answer = Answer(False, ExitCode.TIMEOUT, self.text,
                        f"{self.device} did not finish within {self.job_timeout_s:g} s")
        return Step("finished", outcome="timed out", answer=answer)

    def _announce(self) -> bool:
        first = not self.announced
        self.announced = True
        return first
