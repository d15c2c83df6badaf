"""When an auction's bid window closes, and what is learnt of each peer: the pure rules
(the book, the mailroom and the wait: test_mailroom; the files: test_bidtimes)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest

from agent.auction import (
    ABSENT_AFTER,
    GRACE_MAX_S,
    GRACE_MIN_S,
    LATENCY_WEIGHT,
    PATIENCE_FLOOR_S,
    PATIENCE_MAX_S,
    PATIENCE_NEW_S,
    absent,
    averaged,
    decided,
    first_overdue,
    grace,
    missed,
    patience,
    should_close,
    wake_at,
)
from agent.messages import Bid
from agent.topics import Topics
from tests.support.bids import bid

T = Topics("p/")


def close(expected: set[str], bids: dict[str, Bid], now: float, *, suspects: frozenset[str] = frozenset(),
          punctual_at: float | None = None, decided_at: float | None = None,
          patience: dict[str, float] | None = None, absent: frozenset[str] = frozenset()) -> str | None:
    return should_close(expected=expected, suspects=set(suspects), bids=bids, now=now, opened=0.0,
                        punctual_at=punctual_at, decided_at=decided_at, patience=patience, absent=absent)


# ----------------------------------------------------------------------------- when the window closes

def test_the_window_closes_when_every_expected_peer_has_bid_and_not_before() -> None:
    assert close({"a", "b"}, {"a": bid("a")}, 5.0) is None
    assert close({"a", "b"}, {"a": bid("a"), "b": bid("b")}, 0.001) == "roster_complete"
    assert close(set(), {}, 0.0) == "roster_complete", "nobody to wait for"


def test_a_decided_auction_waits_a_grace_for_runner_ups_then_closes() -> None:
    bids = {"npu": bid("npu", npu=True, free=True)}
    at = 0.010  # the free NPU came in 10 ms after the call
    assert close({"npu", "slow"}, bids, at, decided_at=at) is None
    assert close({"npu", "slow"}, bids, at + grace(at) - 1e-6, decided_at=at) is None
    assert close({"npu", "slow"}, bids, at + grace(at), decided_at=at) == "decided"


def test_missing_stragglers_are_not_waited_for_once_the_punctual_peers_are_in() -> None:
    bids = {"a": bid("a")}
    at = 0.004
    kw: dict[str, Any] = {"suspects": frozenset({"frozen"}), "punctual_at": at}
    assert close({"a", "frozen"}, bids, at + GRACE_MIN_S / 2, **kw) is None, "late bids are still welcome"
    assert close({"a", "frozen"}, bids, at + GRACE_MIN_S, **kw) == "stragglers"
    assert close({"a", "frozen", "b"}, bids, 10.0, **kw) is None, "a punctual peer is still missing"
    assert close({"a", "frozen"}, bids, 10.0, punctual_at=at) is None, "an unsuspected peer is waited for"


def test_a_peer_absent_for_several_calls_is_not_given_the_grace() -> None:
    bids = {"a": bid("a")}
    at = 0.004
    kw: dict[str, Any] = {"suspects": frozenset({"frozen", "flaky"}), "punctual_at": at}
    assert close({"a", "frozen"}, bids, at, absent=frozenset({"frozen"}), **kw) == "stragglers", \
        "absent for good: closed as soon as the punctual peers are in"
    assert close({"a", "frozen"}, bids, at - 1e-6, absent=frozenset({"frozen"}), **{**kw, "punctual_at": None}) \
        is None, "not before the punctual peers are in"
    assert close({"a", "frozen", "flaky"}, bids, at, absent=frozenset({"frozen"}), **kw) is None, \
        "a peer that missed only the last call or two still gets the grace"
    assert close({"a", "frozen", "b"}, bids, at, absent=frozenset({"frozen"}), **kw) is None, \
        "a punctual peer still missing is waited for"
    alone = {"suspects": frozenset({"frozen"}), "punctual_at": 0.0, "absent": frozenset({"frozen"})}
    assert close({"frozen"}, {}, 0.0, **alone) is None, \
        "nobody else bid: the grace is its one chance to be heard again (back from a reboot)"
    assert close({"frozen"}, {}, GRACE_MIN_S, **alone) == "stragglers"
    assert absent({"frozen": ABSENT_AFTER, "flaky": ABSENT_AFTER - 1}) == {"frozen"}


def test_a_frozen_peer_never_heard_from_costs_the_first_auction_about_a_second_not_the_window() -> None:
    bids = {"a": bid("a")}  # "a" bid at once; "frozen" has no record and no straggler history
    assert close({"a", "frozen"}, bids, PATIENCE_NEW_S - 1e-3, punctual_at=0.004, patience={}) is None
    assert close({"a", "frozen"}, bids, PATIENCE_NEW_S, punctual_at=0.004, patience={}) == "overdue"
    assert PATIENCE_NEW_S <= 1.0


def test_a_peer_is_overdue_only_past_its_own_usual_latency() -> None:
    bids = {"a": bid("a")}
    slow = {"a": patience(0.002), "slow": patience(0.4)}  # a bad link: its bids usually take 400 ms
    assert close({"a", "slow"}, bids, 1.5, patience=slow) is None, "still within 4x its usual 400 ms"
    assert close({"a", "slow"}, bids, 1.6, patience=slow) == "overdue"
    fast = {"a": patience(0.002), "b": patience(0.002)}
    assert close({"a", "b"}, bids, PATIENCE_FLOOR_S - 1e-3, patience=fast) is None, "the floor"
    assert close({"a", "b"}, bids, PATIENCE_FLOOR_S, patience=fast) == "overdue"


def test_the_window_closes_when_the_last_missing_peer_is_overdue_and_only_with_a_bid_in() -> None:
    waits = {"a": 1.0, "b": 3.0, "c": 1.0}
    assert close({"a", "b", "c"}, {"a": bid("a")}, 2.9, patience=waits) is None, "b may still come"
    assert close({"a", "b", "c"}, {"a": bid("a")}, 3.0, patience=waits) == "overdue"
    assert close({"a", "b"}, {}, 25.0, patience=waits) is None, "no bid in: nobody to run it, keep waiting"


def test_the_waiting_loop_looks_again_when_a_rule_could_change_its_mind() -> None:
    waits = {"a": 1.0, "b": 3.0, "c": 2.0}
    look = functools.partial(wake_at, opened=10.0, until=40.0, punctual_at=None, decided_at=None, patience=waits)
    assert first_overdue({"a", "b", "c"}, 10.0, waits) == 11.0
    assert first_overdue({"x"}, 10.0, {}) == 10.0 + PATIENCE_NEW_S
    assert look(now=10.0, missing={"a", "b", "c"}, any_bid=False) == 11.0, \
        "no bid seen yet: one may have come meanwhile without waking it (auction.first_overdue)"
    assert look(now=11.5, missing={"a", "b", "c"}, any_bid=False) == 40.0, "past it: the first bid will wake it"
    assert look(now=10.0, missing={"b", "c"}, any_bid=True) == 13.0, "the last missing peer's patience"
    assert look(now=10.0, missing={"a"}, any_bid=True, punctual_at=10.004) == pytest.approx(10.004 + GRACE_MIN_S)
    assert look(now=10.0, missing={"a"}, any_bid=True, decided_at=10.5) == pytest.approx(11.0), "the grace: 2 x 0.5 s"
    assert look(now=10.0, missing={"a"}, any_bid=True, patience=None) == 40.0, "no overdue rule"
    assert look(now=10.0, missing={"a"}, any_bid=False, until=10.5) == 10.5


def test_patience_is_the_usual_latency_times_a_factor_within_bounds() -> None:
    assert patience(None) == PATIENCE_NEW_S
    assert patience(0.0) == PATIENCE_FLOOR_S
    assert patience(0.5) == pytest.approx(2.0)
    assert patience(60.0) == PATIENCE_MAX_S


def test_the_grace_is_twice_what_the_punctual_peers_took_within_bounds() -> None:
    assert grace(0.0) == GRACE_MIN_S
    assert grace(0.1) == pytest.approx(0.2)
    assert grace(60.0) == GRACE_MAX_S


def test_decided_needs_a_free_npu_in_and_no_missing_peer_that_could_offer_one() -> None:
    free = {"n": bid("n", npu=True, free=True)}
    cpu_only: Callable[[str], bool] = lambda d: False  # noqa: E731
    unknown: Callable[[str], bool] = lambda d: True  # noqa: E731
    assert decided(expected={"n", "c"}, bids=free, may_have_free_npu=cpu_only, need="any")
    assert not decided(expected={"n", "c"}, bids=free, may_have_free_npu=unknown, need="any")
    busy = {"n": bid("n", npu=True, free=False)}
    assert not decided(expected={"n", "c"}, bids=busy, may_have_free_npu=cpu_only, need="any")
    assert decided(expected={"n", "c"}, bids=busy, may_have_free_npu=cpu_only, need="npu"), \
        "an NPU-only job: no missing peer could run it"


# ----------------------------------------------------------------------------- what is learnt of each peer

def test_a_missed_call_counts_one_more_and_a_bid_clears_the_record() -> None:
    assert missed({}, {"a", "b", "c"}, {"a"}) == {"b": 1, "c": 1}
    assert missed({"b": 1, "c": 1}, {"a", "b", "c"}, {"a", "c"}) == {"b": 2}, "c bid: punctual again"
    assert missed({"gone": 3}, {"a"}, {"a", "gone"}) == {}, "a bid clears a device not expected this time"
    assert missed({"away": 2}, {"a"}, {"a"}) == {"away": 2}, "a device not called keeps its record"
    frozen = {"f": ABSENT_AFTER}
    assert missed(frozen, {"a", "f"}, {"a"}) == frozen, "counted up to ABSENT_AFTER: nothing new to write"


def test_the_usual_latency_moves_towards_the_newest_bid_by_its_weight() -> None:
    assert averaged(None, 0.25) == 0.25, "the first bid is the usual"
    assert averaged(0.1, 1.1) == pytest.approx(0.1 + LATENCY_WEIGHT * 1.0)
    assert averaged(0.5, 0.5) == 0.5
    assert averaged(0.0, 0.123456789) == round(LATENCY_WEIGHT * 0.123456789, 4), "kept to 0.1 ms"
