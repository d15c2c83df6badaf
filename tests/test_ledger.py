"""JobLedger: the exactly-once rules of a node, without a broker (milliseconds)."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from agent.errors import IllegalTransition
from agent.journal import Recorded
from agent.ledger import Admit, Attach, Decline, Ignore, JobLedger, Replay
from agent.messages import Cancel, Declined, Job, cancel_check, encode_result


def ledger(recorded: dict[str, Recorded] | None = None, keep: int = 4096, **shares: Any) -> JobLedger:
    journal = recorded if recorded is not None else {}
    return JobLedger("node", recorded=journal.get, encode=encode_result, keep=keep, **shares)


KEY = "the-origins-secret-key"


def job(claim: str, *, rid: str = "r1", mode: str = "cpu", origin: str = "hub", prompt: str = "prompt",
        accept_s: float = 5.0, timeout_s: float = 60.0, key: str = KEY) -> Job:
    return Job(rid, origin, mode, claim, prompt, 8, accept_s, timeout_s, f"result/{origin}/{rid}",
               cancel_check=cancel_check(key))


def reason(payload: bytes) -> str:
    return str(json.loads(payload)["reason"])


def admitted(lg: JobLedger, j: Job) -> None:
    assert isinstance(lg.receive(j, 0.0), Admit)


def test_a_claim_is_issued_per_rid_and_origin_and_is_unguessable() -> None:
    a, b = ledger(), ledger()
    claim = a.offer("r1", "hub")
    assert claim == a.offer("r1", "hub"), "asked again: the same claim"
    assert a.offer("r2", "hub") != claim
    assert a.offer("r1", "someone-else") == "", "the rid belongs to the first origin that called"
    assert b.offer("r1", "hub") != claim, "another process (a restarted node) issues other claims"
    assert len(claim) >= 16


def test_a_job_with_its_claim_from_its_origin_is_admitted() -> None:
    lg = ledger()
    admitted(lg, job(lg.offer("r1", "hub")))


@pytest.mark.parametrize("tamper", [{"claim": "some-other-claim"}, {"origin": "evil"}])
def test_a_job_without_the_claim_given_to_its_origin_is_declined_stale(tamper: dict[str, str]) -> None:
    lg = ledger()
    claim = lg.offer("r1", "hub")
    forged = replace(job(claim), **tamper)
    verdict = lg.receive(forged, 0.0)
    assert isinstance(verdict, Decline) and verdict.event.reason == "stale_claim"
    assert verdict.event.digest == forged.digest, "the decline names the job it is about"
    assert isinstance(lg.receive(job(claim), 0.0), Admit), "and is not remembered against the genuine job"


def test_a_forged_job_under_a_called_rid_does_not_decline_the_genuine_one() -> None:
    """Anyone may read calls for bids and send to exec/<dev>: the rid is no secret."""
    lg = ledger()
    claim = lg.offer("r1", "hub")
    forged = job("a-guess", prompt="something else")
    assert isinstance(lg.receive(forged, 0.0), Decline)
    assert isinstance(lg.receive(job(claim), 0.0), Admit)
    run = lg.accept(job(claim), 0.0, 60.0, queue_position=0)
    conflict = lg.receive(replace(forged, claim=claim), 0.0)
    assert isinstance(conflict, Decline) and conflict.event.reason == "rid_conflict"
    assert conflict.event.digest != run.job.digest, "its origin can tell it is not about its job"
    assert isinstance(lg.receive(job(claim), 0.0), Attach), "the genuine job is still the one running"


def test_a_claim_is_honoured_once() -> None:
    lg = ledger()
    claim = lg.offer("r1", "hub")
    run = lg.accept(job(claim), 0.0, 60.0, queue_position=0)
    lg.finish(run, ok=True)  # (journal write failed: nothing recorded)
    verdict = lg.receive(job(claim, mode="npu"), 0.0)
    assert isinstance(verdict, Decline) and verdict.event.reason == "stale_claim"


def test_a_restarted_node_refuses_a_copy_of_the_job_it_lost() -> None:
    """The process that replaced the one that accepted it never issued its claim."""
    before, after = ledger(), ledger()  # the node's process, then the one that replaced it
    claim = before.offer("r1", "hub")
    admitted(before, job(claim))
    verdict = after.receive(job(claim), 0.5)
    assert isinstance(verdict, Decline) and verdict.event.reason == "stale_claim"


def test_too_late_to_start_is_ignored_and_the_limit_is_inclusive() -> None:
    lg = ledger()
    claim = lg.offer("r1", "hub")
    assert isinstance(lg.receive(job(claim, accept_s=5.0), 5.0), Admit), "exactly at its limit: still fine"
    verdict = lg.receive(job(claim, accept_s=5.0), 5.001)
    assert isinstance(verdict, Ignore) and "too late" in verdict.reason
    assert isinstance(lg.receive(job(claim, accept_s=5.0, timeout_s=2.0), 3.0), Ignore), "its answer is not wanted"


def test_a_copy_that_arrives_while_queued_or_running_attaches() -> None:
    lg = ledger()
    claim = lg.offer("r1", "hub")
    run = lg.accept(job(claim), 0.0, 60.0, queue_position=2)
    for _ in range(2):
        verdict = lg.receive(job(claim), 0.0)
        assert isinstance(verdict, Attach) and verdict.accepted == run.accepted
        assert verdict.accepted.queue_position == 2 and verdict.accepted.digest == job(claim).digest
    assert lg.start(run)
    assert isinstance(lg.receive(job(claim), 100.0), Attach), "even long after: it is running"


def test_a_copy_that_arrives_after_the_answer_went_out_gets_the_answer_not_accepted() -> None:
    """Between the final event's publish and the journal's record, a copy is answered with
    that event: an ``accepted`` then would leave its sender waiting for a stream that ended."""
    lg = ledger()
    claim = lg.offer("r1", "hub")
    run = lg.accept(job(claim), 0.0, 60.0, queue_position=0)
    assert lg.start(run)
    lg.answered(run, b'{"type":"done"}')
    assert lg.receive(job(claim), 100.0) == Replay(b'{"type":"done"}')
    verdict = lg.receive(job(claim, prompt="someone else's"), 0.0)
    assert isinstance(verdict, Decline) and verdict.event.reason == "rid_conflict", "nobody gets another's answer"


def test_another_job_under_a_running_rid_is_refused_and_not_remembered() -> None:
    lg = ledger()
    claim = lg.offer("r1", "hub")
    lg.accept(job(claim), 0.0, 60.0, queue_position=0)
    hijack = job(claim, prompt="the attacker's prompt")
    verdict = lg.receive(hijack, 0.0)
    assert isinstance(verdict, Decline) and verdict.event.reason == "rid_conflict"
    assert isinstance(lg.receive(job(claim), 0.0), Attach), "the real job is unaffected"


def test_a_finished_job_is_replayed_from_the_journal_only_to_the_same_job() -> None:
    original = job("anything")
    lg = ledger({"r1": Recorded(original.digest, b'{"type":"done"}')})
    assert lg.receive(original, 1000.0) == Replay(b'{"type":"done"}'), "replayed even past its deadline"
    verdict = lg.receive(job("anything", prompt="someone else's"), 0.0)
    assert isinstance(verdict, Decline) and verdict.event.reason == "rid_conflict", "nobody gets another's answer"


def test_a_decline_is_remembered_per_mode() -> None:
    lg = ledger()
    claim = lg.offer("r1", "hub")
    declined = lg.decline(job(claim, mode="npu"), "npu_busy")
    assert declined == Declined("r1", "node", "npu_busy", job(claim, mode="npu").digest)
    again = lg.receive(job(claim, mode="npu"), 0.0)
    assert isinstance(again, Replay) and reason(again.payload) == "npu_busy"
    assert isinstance(lg.receive(job(claim, mode="cpu"), 0.0), Admit), "the CPU may still take it"


def test_a_cancel_before_the_job_declines_every_later_copy() -> None:
    lg = ledger()
    claim = lg.offer("r1", "hub")
    assert lg.cancel(Cancel("r1", "hub", KEY, "failed over")) is None
    assert lg.cancelled(Cancel("r1", "hub", KEY))
    verdict = lg.receive(job(claim), 0.0)
    assert isinstance(verdict, Decline) and verdict.event.reason == "cancelled"


def test_a_cancel_that_came_first_with_the_wrong_key_does_not_stop_the_job() -> None:
    """On a broker without the ACL anyone can send a cancel for a rid they saw called."""
    lg = ledger()
    claim = lg.offer("r1", "hub")
    assert lg.cancel(Cancel("r1", "hub", "a-guess", "forged")) is None
    assert isinstance(lg.receive(job(claim), 0.0), Admit)


def test_a_forged_cancel_does_not_overwrite_a_genuine_one_that_came_before_the_job() -> None:
    """Without the ACL anyone can cancel in the origin's name, with a key of their own."""
    lg = ledger()
    claim = lg.offer("r1", "hub")
    lg.cancel(Cancel("r1", "hub", KEY, "failed over"))
    lg.cancel(Cancel("r1", "hub", "a-guess", "forged"))
    assert lg.cancelled(Cancel("r1", "hub", KEY))
    verdict = lg.receive(job(claim), 0.0)
    assert isinstance(verdict, Decline) and verdict.event.reason == "cancelled", "the abandoned job never starts"


@pytest.mark.parametrize("forged", [Cancel("r1", "hub", "a-guess"), Cancel("r1", "hub", ""),
                                    Cancel("r1", "evil", KEY), Cancel("r1", "hub", cancel_check(KEY))])
def test_only_the_key_of_the_job_cancels_it(forged: Cancel) -> None:
    lg = ledger()
    claim = lg.offer("r1", "hub")
    if forged.origin == "hub":
        lg.cancel(forged)  # before the job: kept, but it does not fit the job when it comes
        assert isinstance(lg.receive(job(claim), 0.0), Admit)
    else:
        assert lg.cancel(forged) is None and not lg.cancelled(forged), "not a rid offered to that origin"
    run = lg.accept(job(claim), 0.0, 60.0, queue_position=0)
    assert lg.cancel(forged) is None and not run.cancel.is_set(), "and while it runs"
    assert lg.cancel(Cancel("r1", "hub", KEY)) is run and run.cancel.is_set(), "the right key does"


def test_a_job_sent_without_a_cancel_check_cannot_be_cancelled_by_anyone() -> None:
    lg = ledger()
    run = lg.accept(replace(job(lg.offer("r1", "hub")), cancel_check=""), 0.0, 60.0, queue_position=0)
    assert lg.cancel(Cancel("r1", "hub", "")) is None and not run.cancel.is_set()


def test_a_cancel_while_queued_keeps_it_from_ever_starting() -> None:
    lg = ledger()
    claim = lg.offer("r1", "hub")
    run = lg.accept(job(claim), 0.0, 60.0, queue_position=1)
    stopped = lg.cancel(Cancel("r1", "hub", KEY, "no accept in time"))
    assert stopped is run and run.cancel.is_set()
    assert lg.start(run) is False
    assert run.fsm.state == "failed"


def test_a_cancel_while_running_stops_it() -> None:
    lg = ledger()
    claim = lg.offer("r1", "hub")
    run = lg.accept(job(claim), 0.0, 60.0, queue_position=0)
    assert lg.start(run)
    assert lg.cancel(Cancel("r1", "hub", KEY, "went offline")) is run
    assert run.cancel.is_set(), "the executor watches this event"


def test_finish_forgets_the_run_and_the_lifecycle_follows_the_table() -> None:
    lg = ledger()
    run = lg.accept(job(lg.offer("r1", "hub")), 0.0, 60.0, queue_position=0)
    assert lg.running() == [run]
    assert lg.start(run)
    lg.finish(run, ok=True)
    assert run.fsm.state == "done" and lg.running() == []
    with pytest.raises(IllegalTransition):
        lg.start(run)


def test_memories_are_bounded_oldest_first_and_hold_exactly_keep() -> None:
    lg = ledger(keep=3, claims_per_caller=3)
    claims = [lg.offer(f"r{i}", "hub") or "" for i in range(5)]
    assert isinstance(lg.receive(job(claims[0], rid="r0"), 0.0), Decline), "r0's claim was forgotten"
    assert isinstance(lg.receive(job(claims[1], rid="r1"), 0.0), Decline), "... and r1's: exactly three kept"
    assert isinstance(lg.receive(job(claims[2], rid="r2"), 0.0), Admit), "the last three are kept"
    for i in range(5):
        lg.offer(f"c{i}", "hub")
        lg.cancel(Cancel(f"c{i}", "hub", KEY))
    assert not lg.cancelled(Cancel("c0", "hub", KEY)) and lg.cancelled(Cancel("c4", "hub", KEY))


def test_a_flood_of_calls_from_one_device_forgets_only_its_own_claims() -> None:
    """6000 calls from bob while alice's auction is open: alice's claim is still good."""
    lg = ledger()
    claim = lg.offer("alice-job", "alice", 0.0) or ""
    for i in range(6000):
        lg.offer(f"flood-{i}", "bob", 1.0 + i)  # spread out: never over his rate
    admitted(lg, job(claim, rid="alice-job", origin="alice"))


def test_each_caller_has_its_own_call_rate() -> None:
    lg = ledger(call_burst=3, call_rate=2.0)
    assert [lg.offer(f"b{i}", "bob", 0.0) is not None for i in range(5)] == [True] * 3 + [False] * 2
    assert lg.offer("b0", "bob", 0.0), "a call asked again is no new call: the same claim"
    assert lg.offer("a0", "alice", 0.0), "alice has her own share"
    assert lg.offer("b5", "bob", 0.5) and lg.offer("b6", "bob", 0.5) is None, "one more call per 1/rate s"


def test_callers_are_bounded_least_recently_heard_first() -> None:
    lg = ledger(callers=2)
    kept = lg.offer("r-a", "a", 0.0) or ""
    gone = lg.offer("r-b", "b", 0.0) or ""
    lg.offer("r-a2", "a", 0.0)
    lg.offer("r-c", "c", 0.0)  # b is forgotten, not a
    admitted(lg, job(kept, rid="r-a", origin="a"))
    assert isinstance(lg.receive(job(gone, rid="r-b", origin="b"), 0.0), Decline)
    assert lg.offer("r-b", "c", 0.0), "a forgotten rid belongs to nobody"
