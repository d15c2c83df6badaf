"""One attempt to have a peer run a job: what the orchestrator does with each event.

Theory of operation. ``DispatchState`` is a pure state machine (the ``ATTEMPT`` table in
``agent.fsm``) with a fake-able clock: the orchestrator feeds it the result events of the
job, the chosen device's presence, the state of its own link to the broker, and clock
ticks, and it answers with a ``Step``: tokens to stream, whether to announce the winner,
whether to (re)send the job or cancel it on the device, a progress line, and a verdict:

- ``continue``: keep waiting (``deadline`` says until when at most);
- ``next``: this device will not run it; try the runner-up under the same rid;
- ``finished``: the answer (or a failure that must not be retried) is in ``answer``.

Rules, each one a line below:
- a ``declined``, or no ``accepted`` within ``accept_timeout_s`` while our link is up:
  ``next``, with a cancel, so a copy the device's session still holds never runs later;
- a winner that goes offline while our own link is sound (one broker round trip works,
  so it is not a broker restart) and before any token: ``next`` at once if there is a
  runner-up;
- nothing is concluded while our own link is down: a broker restart makes everyone look
  offline. A failed round trip puts our link in doubt: if our connection has not dropped
  within ``link_doubt_s`` (twice the keepalive, plus ``PEER_RECONNECT_S``), the broker was
  only slow and it is as if the link came back. When the link is back the job is sent
  again (the node attaches to the run or replays the recorded answer: it never runs
  twice), and a winner still offline gets
  ``accept_timeout_s`` plus the longest a node waits between reconnect attempts
  (``PEER_RECONNECT_S``) to come back — everyone is reconnecting, not just us;
- with no runner-up the job is never failed over to nobody: the winner is waited for
  until the job's deadline, with progress shown;
- after a token has streamed, nothing is ever re-run elsewhere: a winner gone for good
  is a failure with the partial text;
- a winner that restarted after it accepted has lost the run: the copy sent again when it
  came back (with the whole accept window again, ``resend_windows``) is refused as
  ``stale_claim`` (the new process never issued that claim). That refusal ends the wait
  at once: ``next`` if nothing streamed, else a failure with the partial text (any other
  decline after ``accepted`` is a stale one, of an earlier copy);
- with no runner-up, every copy carries the whole ``accept_s``: nobody else will be
  given the job, so a late start is the only start it can have (with what was left of
  the window, a device back after longer than that would ignore the copy, and the job
  would wait out its deadline);
- with no runner-up, a winner that refuses as ``stale_claim`` before any token (it
  restarted before or after it accepted) is asked for a new bid (``rebid``), again each
  ``REBID_EVERY_S`` (the asks are QoS 0), until ``accept_timeout_s`` after the first ask —
  after our own link came back, that plus ``PEER_RECONNECT_S``: it may still be
  reconnecting. Its bid's claim goes out with the job again (``claim``), once per
  attempt. No bid by then (while it and we are online): ``next``, that is, nobody. A
  ``done`` or ``error`` meanwhile (a run still alive after all) ends the attempt as
  usual;
- at the job's deadline it is a timeout, whatever else is going on;
- redelivered tokens (same ``seq``) are streamed once; events from any other device than
  the one chosen, or that do not carry the digest of the job we sent (every event about a
  job does: an event without one, or for another job under our rid, is not about ours),
  are ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

from agent.errors import ERROR_KINDS, ExitCode
from agent.fsm import ATTEMPT, Machine
from agent.messages import STALE_CLAIM, Accepted, Bid, Declined, Done, Error, ResultEvent, Timings, Token, ToolCall

# A node retries a lost broker at least every 5 s (agent.bus, reconnect_max_s), plus a
# margin: after a broker outage that is how long a winner may take to reappear.
PEER_RECONNECT_S = 6.0
# A device asked for a new bid is asked again this often until it bids (bids are QoS 0).
REBID_EVERY_S = 1.0


@dataclass(frozen=True)
class Answer:
    """How a job ended, wherever it ran."""

    ok: bool
    exit_code: ExitCode
    text: str = ""
    error: str | None = None
    timings: Timings = field(default_factory=Timings)
    generated_tokens: int = 0
    prompt_tokens: int = 0
    finish_reason: str = ""            # the engine's, where it said ("stop", "length", …)
    tool_calls: tuple[ToolCall, ...] = ()
    kind: str = ""                     # why no device ran it: "model_not_served" | "no_tools" | ""


def teaches_the_learner(answer: Answer) -> bool:
    """Whether a job's end says anything about its device's speed. A job its asker gave
    up on (Ctrl-C, SIGTERM, an HTTP client that hung up) does not: training it with the
    failure cap would make a good device look slow every time someone clicks "Stop"."""
    return answer.exit_code not in (ExitCode.INTERRUPTED, ExitCode.TERMINATED)

# How long a failed round trip leaves our own link in doubt when nothing says more: twice
# the MQTT keepalive (paho's own limit), plus PEER_RECONNECT_S (its checks' pace, and a
# peer's reconnect after a reconnect of ours, where the round trip fails too). The
# dispatcher passes this with the configured keepalive; here, the default's (5 s).
def link_doubt_s(keepalive_s: float) -> float:
    return 2 * keepalive_s + PEER_RECONNECT_S


LINK_DOUBT_S = link_doubt_s(5)

@dataclass(frozen=True)
class Step:
    verdict: str = "continue"          # continue | next | finished
    tokens: tuple[str, ...] = ()       # new text to stream, in order
    announce: bool = False             # the winner has answered: say who it is (once)
    send: bool = False                 # (re)send the job (after our link or the winner came back)
    cancel: str | None = None          # tell the device to drop the job, with this reason
    outcome: str | None = None         # for the attempts list: "done", "declined: npu_busy", …
    answer: Answer | None = None       # with verdict finished
    progress: str | None = None        # a line for a user who is waiting
    rebid: bool = False                # ask the device for a bid again (it restarted and lost the job)
    claim: str | None = None           # send the job with this claim from now on (with ``send``)
    since: float | None = None         # the final step: when the job went out with the claim it ran under
    bid: Bid | None = None             # ... and, if that was a new bid's, that bid (a restart: maybe cold)


CONTINUE = Step()


class DispatchState:
    """The orchestrator's side of one job on one device."""

    def __init__(self, rid: str, device: str, now: float, *, accept_timeout_s: float,
                 job_timeout_s: float, last: bool, digest: str, link_doubt_s: float = LINK_DOUBT_S):
        self.rid = rid
        self.device = device
        self.digest = digest                 # of the job we sent (messages.Job.digest)
        self.accept_timeout_s = accept_timeout_s
        self.job_timeout_s = job_timeout_s
        self.last = last                     # no runner-up: never give up on it for nothing
        self.fsm = Machine(f"attempt {rid} on {device}", ATTEMPT, "dispatched")
        self.accept_deadline = now + accept_timeout_s
        self.job_deadline = now + job_timeout_s
        self.streamed: dict[int, str] = {}
        self.announced = False
        self.link_up = True                  # our own connection to the broker
        # A round trip that failed says the broker is going away, and then our connection
        # drops (paho pings after a keepalive of silence and gives up after another, looking
        # about once a second). If it has not by then, the broker was only slow to answer,
        # and the device's Will was its own: acted on as such, as after our link came back.
        self.link_doubt_s = link_doubt_s
        self.doubt_until: float | None = None
        self.winner_online = True
        self.grace_until: float | None = None  # a vanished winner is given until then
        self.asked = False                   # asked for a new bid (once per attempt)
        self.rebid_until: float | None = None  # asked for a new bid: no bid by then, it is given up
        self.ask_at: float | None = None       # then ask again
        self.reclaimed: float | None = None    # when the job went out under the new bid's claim
        self.reclaimed_bid: Bid | None = None  # that bid: its start-up and state (a restart: maybe cold)

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
        deadline = self.job_deadline
        if self.grace_until is not None:
            deadline = min(deadline, self.grace_until)
        if self._awaiting_accept:
            deadline = min(deadline, self.accept_deadline)
        if self.rebid_until is not None:
            deadline = min(deadline, self.rebid_until)
        if self.ask_at is not None:
            deadline = min(deadline, self.ask_at)
        if self.doubt_until is not None:
            deadline = min(deadline, self.doubt_until)
        return deadline

    @property
    def _awaiting_accept(self) -> bool:
        return self.state == "dispatched" and self.link_up and self.winner_online and not self.last

    # ------------------------------------------------------------------ inputs
    def on_result(self, ev: ResultEvent, now: float) -> Step:
        if ev.device != self.device or ev.rid != self.rid:
            return CONTINUE  # not ours: another device's (or another job's) event
        if not ev.digest or ev.digest != self.digest:
            return CONTINUE  # no digest, or another job's under our rid (a forged one): not about ours
        self._heard_from(now)
        if self.state == "rebidding" and not isinstance(ev, (Done, Error)):
            return CONTINUE  # what the lost run's copies still bring; the new bid comes by on_bid
        if isinstance(ev, Declined):
            if ev.reason == STALE_CLAIM and self.last and not self.streamed and not self.asked \
                    and self.fsm.can("restarted"):
                return self._ask_again(now)
            if self.state == "dispatched":
                self.fsm.fire("declined")
                return Step("next", outcome=f"declined: {ev.reason}")
            if ev.reason == STALE_CLAIM and not self.done:
                return self._lost()
            return CONTINUE  # a stale decline of an earlier copy
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
            answer = Answer(True, ExitCode.OK, ev.text, None, ev.timings, ev.generated_tokens, ev.prompt_tokens,
                            ev.finish_reason, ev.tool_calls)
            return Step("finished", announce=self._announce(), outcome="done", answer=answer)
        assert isinstance(ev, Error)
        if ev.kind == "unavailable" and self.fsm.can("unavailable"):
            self.fsm.fire("unavailable")  # its model server is down and nothing streamed: the runner-up
            return Step("next", outcome=f"unavailable: {ev.reason}")
        self.fsm.fire("error")
        answer = Answer(False, ERROR_KINDS.get(ev.kind, ExitCode.FAILED), ev.partial_text or self.text,
                        f"{self.device}: {ev.reason}")
        return Step("finished", outcome=f"error: {ev.reason}", answer=answer)

    def on_bid(self, bid: Bid, now: float) -> Step:
        """A bid from the device, after its auction: the one asked for, if it restarted."""
        if self.state != "rebidding" or bid.device != self.device or bid.rid != self.rid or not bid.claim:
            return CONTINUE
        self.fsm.fire("rebid")
        self._heard_from(now)
        self.rebid_until = self.ask_at = None
        self.reclaimed, self.reclaimed_bid = now, bid
        self.accept_deadline = now + self.accept_timeout_s
        return Step(send=True, claim=bid.claim, progress=f"{self.device} bid again; sending it the job again")

    def on_peer(self, online: bool, now: float, steady: Callable[[], bool]) -> Step:
        """The chosen device's availability changed. ``steady()`` asks whether our own link
        to the broker is sound (a round trip); it is called only when the answer matters."""
        if online:
            was_gone = not self.winner_online
            self._heard_from(now)
            if self.state == "rebidding":  # a bid asked of it while it was away is lost (QoS 0)
                self.rebid_until = max(self.rebid_until or now, now + self.accept_timeout_s)
                return self._ask(now) if was_gone else CONTINUE
            # Back from a blink or a broker restart: its session may have lost the job.
            return Step(send=was_gone and not self.done)
        if not self.winner_online:
            return CONTINUE
        self.winner_online = False
        if not self.link_up:
            return CONTINUE  # we are cut off too: nothing to conclude until we are back
        if not steady():
            self.link_up = False  # the broker is going away; on_link(True) resumes
            self.doubt_until = now + self.link_doubt_s
            return Step(progress=f"{self.device} and this device lost the broker; waiting for it to come back")
        return self._gone(now)

    def _link_back(self, now: float) -> None:
        """Our link is up again (or held): the accept window, suspended meanwhile, runs again."""
        self.link_up = True
        self.accept_deadline = max(self.accept_deadline, now + self.accept_timeout_s)

    def _gone(self, now: float) -> Step:
        """The device's Will fired while our own link held."""
        if not self.streamed and not self.last:
            return self._passed("went offline")  # it died, and someone else can run it
        return self._wait_for_return(now)

    def on_link(self, up: bool, now: float) -> Step:
        """Our own connection to the broker went down, or came back."""
        self.doubt_until = None
        if not up:
            self.link_up = False
            self.grace_until = None
            return CONTINUE
        if self.link_up:
            return CONTINUE
        self._link_back(now)
        if self.state == "rebidding":  # it may be reconnecting too: asked until it can have been back
            self.rebid_until = now + self.accept_timeout_s + PEER_RECONNECT_S
            return replace(self._ask(now), progress="reconnected to the broker; asking for the bid again")
        step = Step(send=not self.done, progress="reconnected to the broker; sending the job again")
        if not self.winner_online:
            self.grace_until = now + self.accept_timeout_s + PEER_RECONNECT_S
        return step

    def on_tick(self, now: float) -> Step:
        if self.done:
            return CONTINUE
        if now >= self.job_deadline:
            self.fsm.fire("timeout")
            gone = "" if self.winner_online else " (offline since then)"
            answer = Answer(False, ExitCode.TIMEOUT, self.text,
                            f"{self.device} did not finish within {self.job_timeout_s:g} s{gone}")
            return Step("finished", cancel="timed out", outcome="timed out", answer=answer)
        if self.grace_until is not None and now >= self.grace_until:
            self.grace_until = None
            if self.streamed:
                self.fsm.fire("winner_offline")
                answer = Answer(False, ExitCode.FAILED, self.text,
                                f"{self.device} went offline after streaming part of the answer")
                return Step("finished", cancel="went offline while streaming", outcome="went offline while streaming",
                            answer=answer)
            if not self.last:
                return self._passed("went offline")
            return self._wait_for_return(now)
        if self.doubt_until is not None and now >= self.doubt_until:
            self.doubt_until = None
            self._link_back(now)  # no link event since the round trip failed: it held, the broker was slow
            if not self.winner_online:
                return self._gone(now)
            if self.state == "rebidding":  # the asks that were held back while in doubt
                self.rebid_until = max(self.rebid_until or now, now + self.accept_timeout_s)
                return self._ask(now)
        if self._awaiting_accept and now >= self.accept_deadline:
            return self._passed("no answer", event="accept_timeout", cancel="no accept in time")
        if self.rebid_until is not None and now >= self.rebid_until:
            self.rebid_until = self.ask_at = None
            if self.link_up and self.winner_online:
                return self._passed("restarted and lost the job; no new bid", event="no_bid", cancel=None)
        if self.ask_at is not None and now >= self.ask_at:
            if self.link_up and self.winner_online:
                return self._ask(now)
            self.ask_at = None  # asked again once it or our link is back (on_peer, on_link, the doubt's end)
        return CONTINUE

    # ------------------------------------------------------------------ helpers
    @property
    def done(self) -> bool:
        return self.state in ("done", "failed", "passed")

    def _heard_from(self, now: float) -> None:
        self.winner_online = True
        self.grace_until = None

    def _passed(self, outcome: str, *, event: str = "winner_offline",
                cancel: str | None = "went offline; failed over") -> Step:
        self.fsm.fire(event)
        return Step("next", cancel=cancel, outcome=outcome)

    def _ask_again(self, now: float) -> Step:
        """The only candidate restarted and lost the job before any token: ask it for a new
        bid (once), whose claim the job is sent again with."""
        self.fsm.fire("restarted")
        self.asked = True
        self.rebid_until = now + self.accept_timeout_s
        return replace(self._ask(now), progress=f"{self.device} restarted and lost the job; asking it to bid again")

    def _ask(self, now: float) -> Step:
        """Ask for the bid (again in ``REBID_EVERY_S`` while none has come)."""
        self.ask_at = now + REBID_EVERY_S
        return Step(rebid=True)

    def _lost(self) -> Step:
        """It accepted the job, then restarted: the job sent again after it came back does
        not carry a claim the new process issued, and the run died with the old one."""
        if not self.streamed:
            return self._passed("restarted and lost the job", cancel=None)  # it holds nothing to cancel
        self.fsm.fire("winner_offline")
        answer = Answer(False, ExitCode.FAILED, self.text,
                        f"{self.device} restarted after streaming part of the answer; the rest is lost")
        return Step("finished", outcome="restarted while streaming", answer=answer)

    def resend_windows(self, accept_s: float, timeout_s: float, spent: float) -> tuple[float, float]:
        """The ``accept_s`` and ``timeout_s`` a copy sent again carries, ``spent`` seconds
        after the first: what is left of each, so an outage gives the device no more time
        than the job has. Once it has accepted, the accept window is the whole one again:
        the copy only finds the run (attached) or its answer (replayed), never starts it
        late, and a winner that restarted meanwhile must see it in time to refuse it
        (``stale_claim``; a node ignores a copy older than its ``accept_s``). With no
        runner-up the whole window too: the job is not given to anyone else, so there is
        no late start to prevent, and a device back after longer than the window would
        ignore the copy and leave the job to wait out its deadline."""
        left = max(accept_s - spent, 0.0)
        whole = self.last or self.state in ("running", "streaming")
        return (accept_s if whole else left), max(timeout_s - spent, 0.0)

    def _wait_for_return(self, now: float) -> Step:
        if self.streamed:
            self.grace_until = now + self.accept_timeout_s
            return Step(progress=f"{self.device} went offline; giving it {self.accept_timeout_s:g} s to come back")
        left = self.job_deadline - now
        return Step(progress=f"{self.device} is offline and no other device can run this job; waiting for it "
                             f"to come back ({left:.0f} s left)")

    def _announce(self) -> bool:
        first = not self.announced
        self.announced = True
        return first


C = TypeVar("C")


def worth_trying(choices: Sequence[C], device_of: Callable[[C], str], offline: Callable[[str], bool]
                 ) -> Iterator[tuple[C, bool]]:
    """The ranked ways to run a job, each with whether it is the last one worth trying,
    skipping the devices that are offline when their turn comes (``next_to_try``)."""
    devices = [device_of(c) for c in choices]
    i = next_to_try(devices, 0, offline)
    while i is not None:
        yield choices[i], next_to_try(devices, i + 1, offline) is None
        i = next_to_try(devices, i + 1, offline)  # asked again: a device may have died meanwhile


def next_to_try(devices: Sequence[str], start: int, offline: Callable[[str], bool]) -> int | None:
    """The index, from ``start`` on, of the next way to run a job worth trying: every mode
    of a device whose Will has fired is skipped while it is offline (trying its CPU after
    its NPU would wait out an accept timeout on the dead, and leave a job in its session).
    None if none is left. ``offline`` is asked once per device."""
    seen: dict[str, bool] = {}
    for i in range(start, len(devices)):
        device = devices[i]
        if device not in seen:
            seen[device] = offline(device)
        if not seen[device]:
            return i
    return None
