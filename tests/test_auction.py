"""Collecting bids without a broker: when the window closes, the book of bids, late peers,
and the mailroom that sorts replies by rid."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.auction import (
    GRACE_MAX_S,
    GRACE_MIN_S,
    PATIENCE_FLOOR_S,
    PATIENCE_MAX_S,
    PATIENCE_NEW_S,
    BidBook,
    BidLatency,
    Inbox,
    Mailroom,
    Stragglers,
    collect,
    decided,
    grace,
    patience,
    should_close,
)
from agent.bus import Message
from agent.messages import Bid, Snapshot, Token, encode_result
from agent.topics import Topics

T = Topics("p/")


def snap(*, npu: bool = False, free: bool = False) -> Snapshot:
    return Snapshot(has_npu=npu, npu_free=free, cpu_slots=1, cpu_percent=0.0, mem_available_mb=1000.0, load1=0.0,
                    queue_depth=0)


def bid(device: str, *, rid: str = "r1", origin: str = "hub", npu: bool = False, free: bool = False) -> Bid:
    return Bid(rid=rid, device=device, origin=origin, claim=f"claim-{device}", snapshot=snap(npu=npu, free=free))


def bid_msg(b: Bid, *, topic_device: str | None = None, topic_rid: str | None = None) -> Message:
    return Message(T.bid_reply(b.origin, topic_rid or b.rid, topic_device or b.device), b.to_payload())


def close(expected: set[str], bids: dict[str, Bid], now: float, *, suspects: frozenset[str] = frozenset(),
          punctual_at: float | None = None, decided_at: float | None = None,
          patience: dict[str, float] | None = None) -> str | None:
    return should_close(expected=expected, suspects=set(suspects), bids=bids, now=now, opened=0.0,
                        punctual_at=punctual_at, decided_at=decided_at, patience=patience)


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


# ----------------------------------------------------------------------------- the book

def test_the_book_keeps_bids_of_its_own_auction_only() -> None:
    book = BidBook("r1", "hub", T, 64 * 1024)
    book.expect({"a", "b", "c"})
    book.add(bid_msg(bid("a")))
    book.add(bid_msg(bid("b", rid="r2")))                      # another auction
    book.add(bid_msg(bid("b", origin="other")))               # another orchestrator's
    book.add(Message(T.bid_reply("other", "r1", "b"), bid("b").to_payload()))  # on another's topic
    book.add(bid_msg(bid("c"), topic_device="b"))             # speaking for another device
    book.add(Message(T.bid_reply("hub", "r1", "b"), b"{not json"))
    _, _, bids = book.view()
    assert set(bids) == {"a"}


def test_the_book_wakes_its_orchestrator_only_when_a_bid_could_close_the_window() -> None:
    book = BidBook("r1", "hub", T, 64 * 1024)
    book.expect({"a", "b", "c", "n"})
    book.wake.clear()
    book.add(bid_msg(bid("a")))
    assert book.wake.is_set(), "the first bid: peers missing from now on may become overdue"
    book.wake.clear()
    book.add(bid_msg(bid("b")))
    assert not book.wake.is_set(), "a second CPU bid of four changes nothing"
    book.add(bid_msg(bid("n", npu=True, free=True)))
    assert book.wake.is_set(), "a free NPU may decide it"
    book.wake.clear()
    book.add(bid_msg(bid("c")))
    assert book.wake.is_set(), "the last one completes the roster"


def test_bids_after_the_window_count_as_punctual_next_time_but_not_as_bids() -> None:
    book = BidBook("r1", "hub", T, 64 * 1024)
    book.expect({"a", "b"})
    book.add(bid_msg(bid("a")))
    assert set(book.close()) == {"a"}
    book.add(bid_msg(bid("b")))
    assert set(book.close()) == {"a"} and book.all_bidders() == {"a", "b"}


def test_the_book_times_each_bid_from_the_call_late_ones_too() -> None:
    now = [100.0]
    book = BidBook("r1", "hub", T, 64 * 1024, clock=lambda: now[0])
    book.expect({"a", "b", "c"}, opened=100.0)
    book.wake.clear()
    now[0] = 100.25
    book.add(bid_msg(bid("a")))
    assert book.wake.is_set(), "the first bid may let the overdue rule close"
    book.close()
    now[0] = 101.5
    book.add(bid_msg(bid("b")))   # after the window: still how long its bids take
    book.add(bid_msg(bid("a")))   # a duplicate keeps its first arrival
    assert book.latencies() == pytest.approx({"a": 0.25, "b": 1.5})


def test_a_peer_whose_will_fired_is_no_longer_expected() -> None:
    book = BidBook("r1", "hub", T, 64 * 1024)
    book.expect({"a", "b"}, suspects={"b", "stranger"})
    book.drop("b")
    expected, suspects, _ = book.view()
    assert expected == {"a"} and suspects == {"b"}, "suspects are only ever expected peers"


# ----------------------------------------------------------------------------- late peers

def test_stragglers_count_missed_calls_and_a_bid_clears_the_record(tmp_path: Path) -> None:
    s = Stragglers(tmp_path)
    assert s.suspects() == set()
    s.update({"a", "b", "c"}, {"a"})
    assert s.load() == {"b": 1, "c": 1}
    s.update({"a", "b", "c"}, {"a", "c"})
    assert s.load() == {"b": 2}, "c bid the second time: punctual again"
    assert Stragglers(tmp_path).suspects() == {"b"}, "shared through state_dir"


def test_bid_latency_is_a_moving_average_shared_through_state_dir(tmp_path: Path) -> None:
    rec = BidLatency(tmp_path)
    assert rec.load() == {}
    rec.update({"a": 0.010, "slow": 0.400})
    rec.update({"a": 0.020})
    other = BidLatency(tmp_path).load()
    assert other["slow"] == pytest.approx(0.4), "shared, and kept while it does not bid"
    assert 0.010 < other["a"] < 0.020, "moves towards the newest"
    (tmp_path / "bid_latency.json").write_text('{"a": "fast", "b": -1, "c": 0.5}')
    assert BidLatency(tmp_path).load() == {"c": 0.5}, "garbage is ignored"


def test_bid_latency_rewrites_its_file_only_when_an_average_moved(tmp_path: Path) -> None:
    now = [0.0]
    rec = BidLatency(tmp_path, clock=lambda: now[0])
    path = tmp_path / "bid_latency.json"
    rec.update({"a": 0.010})
    assert json.loads(path.read_bytes()) == {"a": 0.01}, "a process's first auction is written"
    for _ in range(5):
        rec.update({"a": 0.0105})  # within a fifth of what is written: memory only
    assert json.loads(path.read_bytes()) == {"a": 0.01}
    assert rec.load()["a"] > 0.0102, "this process uses what it learnt"
    rec.update({"a": 0.010, "b": 0.2})
    assert set(json.loads(path.read_bytes())) == {"a", "b"}, "a new device is written at once"
    rec.update({"a": 0.100})
    assert json.loads(path.read_bytes())["a"] > 0.03, "a big move is written at once"
    rec.update({"a": 0.101})
    written = json.loads(path.read_bytes())["a"]
    now[0] += BidLatency.REWRITE_S
    rec.update({"a": 0.101})
    assert json.loads(path.read_bytes())["a"] != written, "small moves are written after REWRITE_S"
    other = BidLatency(tmp_path, clock=lambda: now[0])
    other.update({"c": 1.0})
    assert rec.load()["c"] == 1.0, "what another process wrote is read when the file changes"


# ----------------------------------------------------------------------------- the mailroom

class FakeBus:
    """Just enough bus for the mailroom: subscriptions by filter, link listeners."""

    def __init__(self) -> None:
        self.subs: dict[str, Callable[[Message], None]] = {}
        self.qos: dict[str, int] = {}
        self.listeners: list[Callable[[bool, bool], None]] = []

    def subscribe(self, topic_filter: str, handler: Callable[[Message], None], qos: int = 1, *,
                  inline: bool = False) -> object:
        assert inline, "bids and results are sorted on the network thread"
        self.subs[topic_filter] = handler
        self.qos[topic_filter] = qos
        return object()

    def on_link(self, listener: Callable[[bool, bool], None]) -> Callable[[], None]:
        self.listeners.append(listener)
        return lambda: self.listeners.remove(listener)

    def deliver(self, msg: Message) -> None:
        for topic_filter, handler in self.subs.items():
            if topic_filter.endswith("/+/+") and msg.topic.startswith(topic_filter[:-4]):
                handler(msg)


def test_the_mailroom_subscribes_once_and_sorts_bids_and_results_by_rid() -> None:
    bus = FakeBus()
    mail = Mailroom(bus, T, "hub")  # type: ignore[arg-type]
    assert set(bus.subs) == {"p/bid/reply/hub/+/+", "p/result/hub/+/+"}
    # Bids are sent at QoS 0: a QoS 1 subscription buys nothing (on NATS it costs a
    # JetStream consumer); results must stay QoS 1 (a job's events are not repeated).
    assert bus.qos == {"p/bid/reply/hub/+/+": 0, "p/result/hub/+/+": 1}
    one, two = Inbox.open(mail, "r1", 64 * 1024), Inbox.open(mail, "r2", 64 * 1024)
    for inbox in (one, two):
        inbox.book.expect({"a"})
    bus.deliver(bid_msg(bid("a", rid="r2")))
    token = Message(T.result("hub", "r1", "a"), encode_result(Token("r1", "a", 0, "hi")))
    bus.deliver(token)
    assert set(two.book.view()[2]) == {"a"} and one.book.view()[2] == {}
    assert one.events.get_nowait() == ("result", token) and two.events.empty()
    for listener in list(bus.listeners):
        listener(False, False)
    assert one.events.get_nowait() == ("link", False, False), "link changes reach every open inbox"
    one.close()
    assert len(bus.listeners) == 1
    bus.deliver(Message(T.result("hub", "r1", "a"), encode_result(Token("r1", "a", 1, "late"))))
    bus.deliver(bid_msg(bid("b", rid="r9")))
    assert one.events.empty(), "a closed inbox gets nothing more, and unknown rids are dropped"



def test_a_link_that_comes_back_calls_again_even_with_its_session() -> None:
    """Bids are QoS 0: those sent while our link was down are gone even where the broker
    kept our session, so the call goes out again (a node bids the same claim)."""
    bus = FakeBus()
    mail = Mailroom(bus, T, "hub")  # type: ignore[arg-type]
    inbox = Inbox.open(mail, "r1", 64 * 1024)
    resent = threading.Event()

    def resend() -> None:
        resent.set()
        bus.deliver(bid_msg(bid("a", rid="r1")))  # the node answers the second call

    result: list[Any] = []
    worker = threading.Thread(target=lambda: result.append(collect(
        inbox, expected={"a"}, suspects=(), window_s=30.0, need="any", may_have_free_npu=lambda d: False,
        clock=time.monotonic, steady=lambda: True, resend=resend, on_progress=lambda s: None)), daemon=True)
    worker.start()
    for listener in list(bus.listeners):
        listener(False, False)
        listener(True, True)  # back, session present
    assert resent.wait(10), "the call was not sent again"
    worker.join(10)
    assert result and set(result[0].bids) == {"a"} and result[0].closing != "timeout"
