"""JobLedger: the exactly-once rules of a node, without a broker (milliseconds)."""

from __future__ import annotations

import json

import pytest

from agent.errors import IllegalTransition
from agent.ledger import Admit, Attach, Decline, Ignore, JobLedger, Replay
from agent.messages import Cancel, Declined, Job, encode_result

NOW = 1_000_000.0


def ledger(recorded: dict[str, bytes] | None = None, keep: int = 4096) -> JobLedger:
    journal = recorded if recorded is not None else {}
    return JobLedger("node", "epoch", recorded=journal.get, encode=encode_result, keep=keep)


def job(claim: str, *, rid: str = "r1", mode: str = "cpu", deadline: float = NOW + 60,
        accept_by: float = NOW + 5) -> Job:
    return Job(rid, "hub", mode, claim, "prompt", 8, deadline, accept_by, "exec/result/r1")


def reason(payload: bytes) -> str:
    return str(json.loads(payload)["reason"])


def test_a_claim_is_issued_once_per_rid_and_is_unique_to_the_process() -> None:
    a, b = ledger(), JobLedger("node", "other-epoch", recorded=lambda r: None, encode=encode_result)
    assert a.offer("r1") == a.offer("r1")
    assert a.offer("r1") != a.offer("r2")
    assert a.offer("r1") != b.offer("r1"), "a restarted node issues different claims"


def test_a_job_with_its_claim_is_admitted() -> None:
    lg = ledger()
    assert isinstance(lg.receive(job(lg.offer("r1")), NOW), Admit)


def test_a_job_with_a_claim_this_process_never_issued_is_declined_stale() -> None:
    lg = ledger()
    lg.offer("r1")
    verdict = lg.receive(job("some-other-claim"), NOW)
    assert isinstance(verdict, Decline) and verdict.event.reason == "stale_claim"
    again = lg.receive(job("some-other-claim"), NOW)
    assert isinstance(again, Replay) and reason(again.payload) == "stale_claim", "the same answer again"


def test_a_claim_is_honoured_once() -> None:
    lg = ledger()
    claim = lg.offer("r1")
    run = lg.accept(job(claim), 0.0, queue_position=0)
    lg.finish(run, ok=True)  # (journal write failed: nothing recorded)
    verdict = lg.receive(job(claim, mode="npu"), NOW)
    assert isinstance(verdict, Decline) and verdict.event.reason == "stale_claim"


@pytest.mark.parametrize("field", ["deadline", "accept_by"])
def test_too_late_to_start_is_ignored(field: str) -> None:
    lg = ledger()
    late = job(lg.offer("r1"), **{field: NOW - 0.001})
    verdict = lg.receive(late, NOW)
    assert isinstance(verdict, Ignore) and "too late" in verdict.reason


def test_a_copy_that_arrives_while_queued_or_running_attaches() -> None:
    lg = ledger()
    claim = lg.offer("r1")
    run = lg.accept(job(claim), 0.0, queue_position=2)
    for _ in range(2):
        verdict = lg.receive(job(claim), NOW)
        assert isinstance(verdict, Attach) and verdict.accepted == run.accepted
        assert verdict.accepted.queue_position == 2
    assert lg.start(run)
    assert isinstance(lg.receive(job(claim), NOW), Attach)


def test_a_finished_job_is_replayed_from_the_journal_even_past_its_deadline() -> None:
    journal = {"r1": b'{"type":"done"}'}
    lg = ledger(journal)
    verdict = lg.receive(job("anything", deadline=NOW - 100, accept_by=NOW - 100), NOW)
    assert verdict == Replay(b'{"type":"done"}')


def test_a_decline_is_remembered_per_mode() -> None:
    lg = ledger()
    claim = lg.offer("r1")
    declined = lg.decline(job(claim, mode="npu"), "npu_busy")
    assert declined == Declined("r1", "node", "npu_busy")
    again = lg.receive(job(claim, mode="npu"), NOW)
    assert isinstance(again, Replay) and reason(again.payload) == "npu_busy"
    assert isinstance(lg.receive(job(claim, mode="cpu"), NOW), Admit), "the CPU may still take it"


def test_a_cancel_before_the_job_declines_every_later_copy() -> None:
    lg = ledger()
    claim = lg.offer("r1")
    assert lg.cancel(Cancel("r1", "hub", "failed over"), NOW) is None
    verdict = lg.receive(job(claim), NOW)
    assert isinstance(verdict, Decline) and verdict.event.reason == "cancelled"


def test_a_cancel_while_queued_keeps_it_from_ever_starting() -> None:
    lg = ledger()
    run = lg.accept(job(lg.offer("r1")), 0.0, queue_position=1)
    stopped = lg.cancel(Cancel("r1", "hub", "no accept in time"), NOW)
    assert stopped is run and run.cancel.is_set()
    assert lg.start(run) is False
    assert run.fsm.state == "failed"


def test_a_cancel_while_running_stops_it() -> None:
    lg = ledger()
    run = lg.accept(job(lg.offer("r1")), 0.0, queue_position=0)
    assert lg.start(run)
    assert lg.cancel(Cancel("r1", "hub", "went offline"), NOW) is run
    assert run.cancel.is_set(), "the executor watches this event"


def test_finish_forgets_the_run_and_the_lifecycle_follows_the_table() -> None:
    lg = ledger()
    run = lg.accept(job(lg.offer("r1")), 0.0, queue_position=0)
    assert lg.running() == [run]
    assert lg.start(run)
    lg.finish(run, ok=True)
    assert run.fsm.state == "done" and lg.running() == []
    with pytest.raises(IllegalTransition):
        lg.start(run)


def test_memories_are_bounded_oldest_first() -> None:
    lg = ledger(keep=3)
    claims = [lg.offer(f"r{i}") for i in range(5)]
    assert isinstance(lg.receive(job(claims[0], rid="r0"), NOW), Decline), "r0's claim was forgotten"
    assert isinstance(lg.receive(job(claims[4], rid="r4"), NOW), Admit)
    for i in range(5):
        lg.cancel(Cancel(f"c{i}", "hub"), NOW)
    assert isinstance(lg.receive(job(lg.offer("c0"), rid="c0"), NOW), Admit), "c0's cancel was forgotten"
    assert isinstance(lg.receive(job(lg.offer("c4"), rid="c4"), NOW), Decline)
