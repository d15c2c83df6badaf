"""DispatchState: the orchestrator's side of one attempt, with a fake clock (milliseconds)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from agent.dispatch import (
    LINK_DOUBT_S,
    PEER_RECONNECT_S,
    REBID_EVERY_S,
    DispatchState,
    Step,
    next_to_try,
    worth_trying,
)
from agent.errors import ExitCode
from agent.messages import Accepted, Bid, Declined, Done, Error, ResultEvent, Snapshot, Timings, Token

ACCEPT_S, JOB_S = 3.0, 60.0
D = "d1"  # the digest of the job the attempt sent


def attempt(*, last: bool = False, now: float = 0.0) -> DispatchState:
    return DispatchState("r1", "peer", now, accept_timeout_s=ACCEPT_S, job_timeout_s=JOB_S, last=last, digest=D)


def test_accepted_then_tokens_then_done_streams_and_finishes() -> None:
    a = attempt()
    step = a.on_result(Accepted("r1", "peer", "cpu", digest=D), 0.1)
    assert step.verdict == "continue" and step.announce and a.state == "running"
    step = a.on_result(Token("r1", "peer", 0, "hello ", digest=D), 0.2)
    assert step.tokens == ("hello ",) and not step.announce, "announced once"
    step = a.on_result(Token("r1", "peer", 1, "world", digest=D), 0.3)
    assert step.tokens == ("world",) and a.state == "streaming"
    step = a.on_result(Done("r1", "peer", "hello world", Timings(total_ms=5.0), 3, 2, digest=D), 0.4)
    assert step.verdict == "finished" and step.outcome == "done"
    assert step.answer is not None and step.answer.ok and step.answer.text == "hello world"
    assert step.answer.exit_code == ExitCode.OK and step.answer.timings.total_ms == 5.0


def test_a_redelivered_token_is_streamed_once() -> None:
    a = attempt()
    assert a.on_result(Token("r1", "peer", 0, "a", digest=D), 0.1).tokens == ("a",)
    assert a.on_result(Token("r1", "peer", 0, "a", digest=D), 0.2).tokens == ()
    assert a.text == "a"


def test_tokens_are_joined_in_sequence_order_and_gaps_counted() -> None:
    a = attempt()
    for seq, text in ((2, "c"), (0, "a")):
        a.on_result(Token("r1", "peer", seq, text, digest=D), 0.1)
    assert a.text == "ac" and a.gaps == 1


@pytest.mark.parametrize("event", [Accepted("r1", "other", "cpu"), Token("r1", "other", 0, "x"),
                                   Done("r1", "other", "x", Timings()), Declined("r1", "other", "npu_busy"),
                                   Token("r2", "peer", 0, "x")])
def test_events_from_another_device_or_job_are_ignored(event) -> None:
    a = attempt()
    assert a.on_result(event, 0.1) == Step()
    assert a.state == "dispatched" and a.text == ""


def test_a_decline_moves_on_without_a_cancel() -> None:
    step = attempt().on_result(Declined("r1", "peer", "npu_busy", digest=D), 0.1)
    assert (step.verdict, step.outcome, step.cancel) == ("next", "declined: npu_busy", None)


def test_a_stale_decline_after_accept_is_ignored() -> None:
    a = attempt()
    a.on_result(Accepted("r1", "peer", "cpu", digest=D), 0.1)
    assert a.on_result(Declined("r1", "peer", "npu_busy", digest=D), 0.2) == Step()
    assert a.state == "running"


def test_a_winner_that_restarted_before_any_token_is_passed_over_when_it_refuses_the_copy_sent_again() -> None:
    """Restarted after ``accepted`` while everyone was cut off: its run died with the old
    process. It was being waited for, until the job's deadline at worst; its refusal of the
    copy sent again ends that, and the runner-up gets the job."""
    a = attempt()
    a.on_result(Accepted("r1", "peer", "cpu", digest=D), 0.1)
    a.on_link(False, 0.5)
    a.on_peer(False, 0.5, lambda: pytest.fail("our link is known to be down"))
    assert a.on_link(True, 0.9).send
    a.on_peer(True, 1.0, lambda: True)
    step = a.on_result(Declined("r1", "peer", "stale_claim", digest=D), 1.1)
    assert (step.verdict, step.outcome, step.cancel) == ("next", "restarted and lost the job", None)
    assert a.state == "passed"


def bid(claim: str, device: str = "peer", rid: str = "r1") -> Bid:
    return Bid(rid, device, "hub", claim, Snapshot(False, False, 1, 0.0, 1000.0, 0.0, 0))


@pytest.mark.parametrize("when", ["after accepting", "before accepting"])
def test_the_only_candidate_that_restarted_is_asked_to_bid_again_and_sent_the_job_with_its_claim(when: str) -> None:
    """No runner-up: a refusal as ``stale_claim`` before any token means the device is back
    but lost the job (its new process never issued that claim). It is asked for a new bid,
    once, and the job goes out again with the new claim; its accept window runs from then."""
    a = attempt(last=True)
    if when == "after accepting":
        a.on_result(Accepted("r1", "peer", "cpu", digest=D), 0.1)
        a.on_peer(False, 0.5, lambda: True)
        assert a.on_peer(True, 1.0, lambda: True).send, "back: the job is sent again"
    step = a.on_result(Declined("r1", "peer", "stale_claim", digest=D), 1.1)
    assert step.rebid and step.verdict == "continue" and not step.send and "bid again" in (step.progress or "")
    assert a.state == "rebidding" and a.deadline == 1.1 + REBID_EVERY_S, "asked again if no bid comes"
    assert a.on_result(Declined("r1", "peer", "stale_claim", digest=D), 1.2) == Step(), "an older copy's refusal"
    assert a.on_bid(bid("x", device="other"), 1.3) == Step() and a.on_bid(bid("x", rid="r2"), 1.3) == Step()
    again = replace(bid("new-claim"), init_s=3.5)
    step = a.on_bid(again, 1.5)
    assert step.send and step.claim == "new-claim" and a.state == "dispatched"
    assert (a.reclaimed, a.reclaimed_bid) == (1.5, again), "when, and the bid it went out under"
    assert a.on_bid(bid("another"), 1.6) == Step(), "one new claim"
    assert a.resend_windows(ACCEPT_S, JOB_S, 9.0) == (ACCEPT_S, JOB_S - 9.0), "no runner-up: the whole window"
    a.on_result(Accepted("r1", "peer", "cpu", digest=D), 1.7)
    step = a.on_result(Done("r1", "peer", "answer", Timings(), 1, 1, digest=D), 2.0)
    assert step.verdict == "finished" and step.answer is not None and step.answer.ok


def test_asked_again_once_a_second_loss_passes_and_no_bid_in_time_passes() -> None:
    a = attempt(last=True)
    a.on_result(Declined("r1", "peer", "stale_claim", digest=D), 0.1)
    a.on_bid(bid("new"), 0.2)
    a.on_result(Accepted("r1", "peer", "cpu", digest=D), 0.3)
    step = a.on_result(Declined("r1", "peer", "stale_claim", digest=D), 0.4)
    assert (step.verdict, step.outcome) == ("next", "restarted and lost the job"), "asked once, not in a loop"
    b = attempt(last=True)
    assert b.on_result(Declined("r1", "peer", "stale_claim", digest=D), 0.1).rebid
    assert b.on_tick(1.0) == Step() and b.on_tick(1.1) == Step(rebid=True), "asked again each second"
    assert b.on_tick(2.1) == Step(rebid=True) and b.deadline == 0.1 + ACCEPT_S
    step = b.on_tick(0.1 + ACCEPT_S)
    assert (step.verdict, step.outcome, step.cancel) == ("next", "restarted and lost the job; no new bid", None)
    c = attempt(last=True)
    c.on_result(Declined("r1", "peer", "stale_claim", digest=D), 0.1)
    step = c.on_result(Done("r1", "peer", "it ran after all", Timings(), 1, 1, digest=D), 0.5)
    assert step.verdict == "finished" and step.answer is not None and step.answer.text == "it ran after all"


def test_a_device_asked_again_while_it_or_we_were_away_is_asked_again_when_back() -> None:
    """Bids and invitations are QoS 0: one asked for while either side was away is lost."""
    a = attempt(last=True)
    a.on_result(Declined("r1", "peer", "stale_claim", digest=D), 0.1)
    a.on_peer(False, 0.5, lambda: True)
    assert a.on_tick(10.0) == Step(), "offline: not given up on, the job's deadline stands"
    step = a.on_peer(True, 20.0, lambda: True)
    assert step.rebid and not step.send and a.rebid_until == 20.0 + ACCEPT_S
    a.on_link(False, 21.0)
    assert a.on_tick(22.5) == Step(), "our link is down: nothing to ask"
    step = a.on_link(True, 30.0)
    assert step.rebid and not step.send, "back: asked at once"
    assert a.rebid_until == 30.0 + ACCEPT_S + PEER_RECONNECT_S, "it may be reconnecting after the same outage"
    assert a.on_tick(30.0 + ACCEPT_S).rebid, "still asked"
    assert a.on_tick(30.0 + ACCEPT_S + PEER_RECONNECT_S).verdict == "next"
    c = attempt(last=True)
    c.on_result(Declined("r1", "peer", "stale_claim", digest=D), 0.1)
    assert c.on_tick(JOB_S).outcome == "timed out", "the job's deadline, whatever else"


def test_a_winner_that_restarted_after_streaming_fails_at_once_with_the_partial_text() -> None:
    a = attempt(last=True)
    a.on_result(Token("r1", "peer", 0, "partial ", digest=D), 0.1)
    a.on_peer(False, 0.5, lambda: True)
    assert a.on_peer(True, 1.0, lambda: True).send
    step = a.on_result(Declined("r1", "peer", "stale_claim", digest=D), 1.1)
    assert step.verdict == "finished" and step.answer is not None and not step.answer.ok
    assert step.answer.text == "partial " and step.answer.exit_code == ExitCode.FAILED
    assert "restarted" in (step.answer.error or "") and a.state == "failed"
    assert a.on_result(Declined("r1", "peer", "stale_claim", digest=D), 1.2) == Step(), "once"


def test_a_copy_sent_again_carries_what_is_left_and_after_accept_the_whole_accept_window() -> None:
    """A node ignores a copy older than its accept_s. Before ``accepted`` that keeps a late
    copy from starting; after it, the copy only attaches or replays, and a winner that
    restarted (the usual re-send: it came back) must see it to refuse it."""
    a = attempt()
    assert a.resend_windows(ACCEPT_S, JOB_S, 2.0) == (ACCEPT_S - 2.0, JOB_S - 2.0)
    assert a.resend_windows(ACCEPT_S, JOB_S, 5.0) == (0.0, JOB_S - 5.0)
    a.on_result(Accepted("r1", "peer", "cpu", digest=D), 0.1)
    assert a.resend_windows(ACCEPT_S, JOB_S, 5.0) == (ACCEPT_S, JOB_S - 5.0)
    a.on_result(Token("r1", "peer", 0, "partial ", digest=D), 0.2)
    assert a.resend_windows(ACCEPT_S, JOB_S, 70.0) == (ACCEPT_S, 0.0)
    # No runner-up: nobody else gets the job, and a device back after longer than the
    # window would ignore what is left of it; the job would wait out its deadline.
    assert attempt(last=True).resend_windows(ACCEPT_S, JOB_S, 5.0) == (ACCEPT_S, JOB_S - 5.0)


def test_a_restarted_winners_refusal_of_another_job_under_our_rid_changes_nothing() -> None:
    a = attempt()
    a.on_result(Token("r1", "peer", 0, "partial ", digest=D), 0.1)
    assert a.on_result(Declined("r1", "peer", "stale_claim", digest="forged"), 0.2) == Step()
    assert a.state == "streaming"


def test_no_accept_in_time_moves_on_and_cancels_the_copy_it_holds() -> None:
    a = attempt()
    assert a.on_tick(ACCEPT_S - 0.01) == Step()
    assert a.deadline == ACCEPT_S
    step = a.on_tick(ACCEPT_S)
    assert (step.verdict, step.outcome) == ("next", "no answer")
    assert step.cancel, "a copy still queued in its session must never run later"


def test_after_accept_the_job_deadline_applies() -> None:
    a = attempt()
    a.on_result(Accepted("r1", "peer", "cpu", digest=D), 0.1)
    assert a.deadline == JOB_S and a.on_tick(ACCEPT_S + 1) == Step()
    step = a.on_tick(JOB_S)
    assert step.verdict == "finished" and step.answer is not None
    assert step.answer.exit_code == ExitCode.TIMEOUT


def test_an_error_event_keeps_its_kind_and_partial_text() -> None:
    a = attempt()
    a.on_result(Token("r1", "peer", 0, "part", digest=D), 0.1)
    step = a.on_result(Error("r1", "peer", "killed after 5 s", kind="timeout", digest=D), 0.2)
    assert step.answer is not None and step.answer.exit_code == ExitCode.TIMEOUT
    assert step.answer.text == "part" and "killed" in (step.answer.error or "")
    step = attempt().on_result(Error("r1", "peer", "timed out, says the text", kind="failed", digest=D), 0.1)
    assert step.answer is not None and step.answer.exit_code == ExitCode.FAILED, "the kind decides, not the text"


def test_a_model_server_that_is_down_passes_the_job_on_unless_it_streamed() -> None:
    a = attempt()
    a.on_result(Accepted("r1", "peer", "cpu", digest=D), 0.1)
    step = a.on_result(Error("r1", "peer", "cannot reach http://x/v1", kind="unavailable", digest=D), 0.2)
    assert step.verdict == "next" and (step.outcome or "").startswith("unavailable:") and step.answer is None
    b = attempt()
    b.on_result(Token("r1", "peer", 0, "part", digest=D), 0.1)
    step = b.on_result(Error("r1", "peer", "cannot reach http://x/v1", kind="unavailable", digest=D), 0.2)
    assert step.verdict == "finished" and step.answer is not None and step.answer.text == "part"


def test_the_engines_finish_reason_is_part_of_the_answer() -> None:
    step = attempt().on_result(Done("r1", "peer", "hi", Timings(), 3, 2, finish_reason="length", digest=D), 0.1)
    assert step.answer is not None and step.answer.finish_reason == "length"


def test_winner_gone_with_a_steady_link_and_a_runner_up_fails_over_at_once() -> None:
    a = attempt()
    a.on_result(Accepted("r1", "peer", "cpu", digest=D), 0.1)
    step = a.on_peer(False, 1.0, lambda: True)
    assert (step.verdict, step.outcome) == ("next", "went offline") and step.cancel


def test_nothing_is_concluded_while_our_own_link_is_down() -> None:
    """A broker going away delivers every Will first: the winner looks dead, but the round
    trip on our own link fails too. Only after we are back does the winner get a grace."""
    asked: list[bool] = []

    def shaky() -> bool:
        asked.append(True)
        return False

    a = attempt()
    a.on_result(Accepted("r1", "peer", "cpu", digest=D), 0.1)
    step = a.on_peer(False, 1.0, shaky)
    assert step.verdict == "continue" and step.progress and asked
    a.on_link(False, 1.2)  # and then our connection drops
    assert a.deadline == JOB_S, "no grace timer runs while we are cut off"
    assert a.on_tick(30.0) == Step(), "however long the broker is down"
    step = a.on_link(True, 31.0)
    assert step.send, "back: the job is sent again (the node attaches or replays)"
    assert a.deadline == 31.0 + ACCEPT_S + PEER_RECONNECT_S, "and the winner gets a grace to reconnect too"
    step = a.on_peer(True, 32.0, shaky)
    assert step.send and a.on_tick(31.0 + ACCEPT_S + PEER_RECONNECT_S) == Step(), "it came back: no grace any more"


@pytest.mark.parametrize("last", [False, True])
def test_a_round_trip_that_failed_while_our_link_held_only_delays_what_the_will_means(last: bool) -> None:
    """The broker was slow to answer, not going away: no link event comes. Once our
    connection would have dropped (twice the keepalive here), the Will is taken as the
    device's own: the runner-up's turn, or, with none, the wait for it to come back."""
    a = DispatchState("r1", "peer", 0.0, accept_timeout_s=ACCEPT_S, job_timeout_s=JOB_S, last=last, digest=D,
                      link_doubt_s=4.0)
    a.on_result(Accepted("r1", "peer", "cpu", digest=D), 0.1)
    assert a.on_peer(False, 1.0, lambda: False).verdict == "continue"
    assert a.deadline == 5.0 and a.on_tick(4.9) == Step()
    step = a.on_tick(5.0)
    if last:
        assert step.verdict == "continue" and "waiting for it to come back" in (step.progress or "")
        assert a.deadline == JOB_S
    else:
        assert (step.verdict, step.outcome) == ("next", "went offline") and step.cancel
    assert LINK_DOUBT_S == 2 * 5 + PEER_RECONNECT_S, "paho's limit at the default keepalive, and a margin"
    b = attempt()
    b.on_peer(False, 1.0, lambda: False)
    assert b.on_peer(True, 2.0, lambda: True).send, "back within the doubt: sent the job again"
    b.on_result(Accepted("r1", "peer", "cpu", digest=D), 2.1)
    assert b.on_tick(1.0 + LINK_DOUBT_S) == Step() and b.deadline == JOB_S, "nothing to conclude"


def test_an_ask_held_back_while_our_link_was_in_doubt_is_made_when_the_doubt_ends() -> None:
    """The only candidate blinked while the broker was slow, came back and refused the copy
    as ``stale_claim``: the asks for its new bid wait while our link is in doubt (no busy
    wait: ``deadline`` does not stay in the past), then go out, with the rebid window
    running again from then."""
    a = DispatchState("r1", "peer", 0.0, accept_timeout_s=ACCEPT_S, job_timeout_s=JOB_S, last=True, digest=D,
                      link_doubt_s=20.0)
    a.on_result(Accepted("r1", "peer", "cpu", digest=D), 0.1)
    a.on_peer(False, 1.0, lambda: False)
    assert a.on_peer(True, 1.5, lambda: False).send
    assert a.on_result(Declined("r1", "peer", "stale_claim", digest=D), 1.6).rebid and a.state == "rebidding"
    assert a.on_tick(1.6 + REBID_EVERY_S) == Step(), "not asked while in doubt"
    assert a.deadline > 1.6 + REBID_EVERY_S, "and not due again at once"
    assert a.on_tick(1.6 + ACCEPT_S + 1) == Step(), "nor given up"
    step = a.on_tick(21.0)
    assert step.rebid and a.state == "rebidding", "the doubt's end: asked"
    assert a.on_tick(21.0 + ACCEPT_S - 0.01).rebid, "asked each second"
    step = a.on_tick(21.0 + ACCEPT_S)
    assert (step.verdict, step.outcome) == ("next", "restarted and lost the job; no new bid")


def test_a_winner_still_gone_after_our_link_returns_is_failed_over_after_the_grace() -> None:
    a = attempt()
    a.on_link(False, 1.0)
    a.on_peer(False, 1.5, lambda: pytest.fail("our link is known to be down"))
    a.on_link(True, 5.0)
    assert a.on_tick(5.0 + ACCEPT_S + PEER_RECONNECT_S - 0.01) == Step()
    step = a.on_tick(5.0 + ACCEPT_S + PEER_RECONNECT_S)
    assert (step.verdict, step.outcome) == ("next", "went offline") and step.cancel


def test_after_a_broker_outage_a_streamed_winner_gets_time_to_reconnect_before_it_is_given_up() -> None:
    """Its reconnect backoff may keep it away for seconds after the broker is back (the
    restart tests lost answers to a 3 s grace)."""
    a = attempt(last=True)
    a.on_result(Token("r1", "peer", 0, "partial ", digest=D), 0.1)
    a.on_link(False, 1.0)
    a.on_peer(False, 1.0, lambda: pytest.fail("our link is known to be down"))
    a.on_link(True, 6.0)
    assert a.on_tick(6.0 + ACCEPT_S + 1.0) == Step(), "not yet: it may be in its backoff"
    assert a.on_peer(True, 6.0 + ACCEPT_S + 2.0, lambda: True).send, "back: sent again, it replays the answer"


def test_our_link_dropping_suspends_the_accept_deadline_and_restarts_it() -> None:
    a = attempt()
    a.on_link(False, 1.0)
    assert a.on_tick(ACCEPT_S + 5) == Step(), "no accept can arrive while we are cut off"
    a.on_link(True, 10.0)
    assert a.deadline == 10.0 + ACCEPT_S
    assert a.on_tick(10.0 + ACCEPT_S).verdict == "next"


def test_with_no_runner_up_a_vanished_winner_is_waited_for_until_the_job_deadline() -> None:
    a = attempt(last=True)
    step = a.on_peer(False, 1.0, lambda: True)
    assert step.verdict == "continue" and "waiting for it to come back" in (step.progress or "")
    assert a.on_tick(ACCEPT_S + 10) == Step(), "not failed over to nobody"
    step = a.on_tick(JOB_S)
    assert step.verdict == "finished" and step.answer is not None
    assert step.answer.exit_code == ExitCode.TIMEOUT and "offline" in (step.answer.error or "")


def test_the_last_candidate_gets_no_accept_deadline_but_the_job_deadline_holds() -> None:
    a = attempt(last=True)
    assert a.deadline == JOB_S and a.on_tick(ACCEPT_S + 1) == Step()
    assert a.on_tick(JOB_S).answer.exit_code == ExitCode.TIMEOUT  # type: ignore[union-attr]


def test_the_job_deadline_holds_while_a_winner_is_gone() -> None:
    a = attempt()
    a.on_result(Accepted("r1", "peer", "cpu", digest=D), 0.1)
    a.on_link(False, JOB_S - 1)
    a.on_peer(False, JOB_S - 1, lambda: False)
    step = a.on_tick(JOB_S)
    assert step.verdict == "finished" and step.answer is not None and step.answer.exit_code == ExitCode.TIMEOUT


def test_a_streamed_winner_that_vanishes_gets_a_grace_then_fails_with_the_partial_text() -> None:
    a = attempt()
    a.on_result(Token("r1", "peer", 0, "partial ", digest=D), 0.1)
    step = a.on_peer(False, 1.0, lambda: True)
    assert step.verdict == "continue" and a.deadline == 1.0 + ACCEPT_S
    step = a.on_tick(1.0 + ACCEPT_S)
    assert step.verdict == "finished" and step.answer is not None
    assert step.answer.text == "partial " and not step.answer.ok and step.cancel


def test_an_event_from_the_winner_cancels_its_grace() -> None:
    a = attempt()
    a.on_result(Token("r1", "peer", 0, "x", digest=D), 0.1)
    a.on_peer(False, 1.0, lambda: True)
    a.on_result(Token("r1", "peer", 1, "y", digest=D), 1.5)
    assert a.on_tick(1.0 + ACCEPT_S) == Step()


def test_events_for_another_job_under_our_rid_are_not_our_answer() -> None:
    a = DispatchState("r1", "peer", 0.0, accept_timeout_s=ACCEPT_S, job_timeout_s=JOB_S, last=False,
                      digest="ours")
    assert a.on_result(Done("r1", "peer", "hijacked", Timings(), digest="theirs"), 0.1) == Step()
    assert a.on_result(Accepted("r1", "peer", "cpu", digest="theirs"), 0.1) == Step()
    assert a.on_result(Declined("r1", "peer", "rid_conflict", digest="theirs"), 0.1) == Step()
    assert a.on_result(Done("r1", "peer", "ours", Timings(), digest="ours"), 0.2).verdict == "finished"


def test_redelivered_accepts_progress_and_announcements() -> None:
    a = attempt()
    assert a.on_result(Token("r1", "peer", 0, "x", digest=D), 0.1).announce, "a token can come before any accept"
    assert a.on_result(Accepted("r1", "peer", "cpu", 2, digest=D), 0.2) == Step(
        progress="peer accepted; queue position 2")
    assert a.state == "streaming"
    b = attempt()
    assert b.on_result(Done("r1", "peer", "x", Timings(), digest=D), 0.1).announce, "a replayed done is the first event"
    c = attempt()
    step = c.on_result(Error("r1", "peer", "boom", partial_text="abc", digest=D), 0.1)
    assert step.answer is not None and step.answer.text == "abc"


def test_a_second_end_event_is_ignored() -> None:
    a = attempt()
    a.on_result(Done("r1", "peer", "x", Timings(), digest=D), 0.1)
    assert a.on_result(Done("r1", "peer", "x", Timings(), digest=D), 0.2) == Step()


def test_our_link_dropping_during_a_winners_grace_stops_the_clock() -> None:
    """A streamed winner went offline (grace running), then our own link dropped: nothing
    is concluded while we are cut off, however long that lasts."""
    a = attempt()
    a.on_result(Token("r1", "peer", 0, "x", digest=D), 0.1)
    a.on_peer(False, 1.0, lambda: True)
    assert a.on_link(False, 1.5) == Step()
    assert a.on_tick(1.0 + ACCEPT_S + 5.0).verdict == "continue", "no grace runs out while we are away"


def test_an_online_winner_that_was_never_gone_is_not_sent_the_job_again() -> None:
    a = attempt(last=True)  # no runner-up: a vanished winner is waited for
    a.on_result(Accepted("r1", "peer", "cpu", digest=D), 0.1)
    assert not a.on_peer(True, 0.2, lambda: True).send
    a.on_peer(False, 0.3, lambda: True)
    assert a.on_peer(True, 0.4, lambda: True).send, "back from a blink: its session may have lost the job"


@pytest.mark.parametrize("event", [
    Done("r1", "peer", "forged answer", Timings()), Error("r1", "peer", "forged failure"),
    Token("r1", "peer", 0, "forged text"), Accepted("r1", "peer", "cpu"), Declined("r1", "peer", "npu_busy")])
def test_an_event_without_the_jobs_digest_is_dropped(event: ResultEvent) -> None:
    """Every event about a job carries its digest; one without it (forged, on a broker
    without the ACL) is not about our job: no answer, no abort, no text, no failover."""
    a = attempt()
    assert a.on_result(event, 0.1) == Step()
    assert a.state == "dispatched" and a.text == ""
    assert a.on_result(Done("r1", "peer", "genuine", Timings(), digest=D), 0.2).verdict == "finished"


def test_failover_skips_every_mode_of_a_device_whose_will_fired() -> None:
    """b's NPU, then b's CPU, then c: b died under its NPU attempt, so c is next, at once."""
    ranking = ["b", "b", "c"]
    dead: set[str] = set()
    asked: list[str] = []

    def offline(device: str) -> bool:
        asked.append(device)
        return device in dead
    tried = []
    for device, last in worth_trying(ranking, lambda d: d, offline):
        tried.append((device, last))
        dead.add("b")  # its Will fires during the attempt
    assert tried == [("b", False), ("c", True)]
    assert next_to_try(["b", "b"], 0, lambda d: True) is None
    asked.clear()
    assert next_to_try(["b", "b", "b", "c"], 0, lambda d: asked.append(d) or d == "b") == 3
    assert asked == ["b", "c"], "each device is asked once (a round trip each)"


def test_the_last_device_alive_is_the_last_attempt_even_if_dead_ones_rank_after_it() -> None:
    """The last attempt is never failed over to nobody: a dead runner-up does not count."""
    assert list(worth_trying(["a", "b"], lambda d: d, lambda d: d == "b")) == [("a", True)]
