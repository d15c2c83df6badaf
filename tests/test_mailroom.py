"""The mailroom that sorts replies by rid, the book of bids of one auction, and the wait
for the window to close (moved from test_auction)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from agent.bus import Message
from agent.mailroom import BidBook, Inbox, Mailroom, collect
from agent.messages import Bid, Token, encode_result
from agent.topics import Topics
from tests.support.bids import bid

T = Topics("p/")


def bid_msg(b: Bid, *, topic_device: str | None = None, topic_rid: str | None = None) -> Message:
    return Message(T.bid_reply(b.origin, topic_rid or b.rid, topic_device or b.device), b.to_payload())


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
    now = [100.0]
    book = BidBook("r1", "hub", T, 64 * 1024, clock=lambda: now[0])
    book.expect({"a", "b", "c", "n"}, opened=100.0, first_overdue=101.0)
    book.wake.clear()
    book.add(bid_msg(bid("a")))
    assert not book.wake.is_set(), "the first bid, long before anyone could be overdue: it looks by itself"
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


def test_the_first_bid_wakes_the_orchestrator_once_the_overdue_rule_could_close() -> None:
    now = [100.0]
    for first_overdue, wakes in ((101.0, True), (101.5, False), (None, False)):
        book = BidBook("r1", "hub", T, 64 * 1024, clock=lambda: now[0])
        book.expect({"a", "b", "c"}, opened=100.0, first_overdue=first_overdue)
        book.wake.clear()
        now[0] = 101.25
        book.add(bid_msg(bid("a")))
        assert book.wake.is_set() is wakes, first_overdue


def test_the_book_times_each_bid_from_the_call_late_ones_too() -> None:
    now = [100.0]
    book = BidBook("r1", "hub", T, 64 * 1024, clock=lambda: now[0])
    book.expect({"a", "b", "c"}, opened=100.0)
    now[0] = 100.25
    book.add(bid_msg(bid("a")))
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


def test_a_bid_after_the_auction_closed_reaches_the_run_as_an_event() -> None:
    """A device asked to bid again (it restarted and lost the job) answers after the
    auction: its bid reaches the attempt through the inbox's events, not the closed book."""
    bus = FakeBus()
    inbox = Inbox.open(Mailroom(bus, T, "hub"), "r1", 64 * 1024)  # type: ignore[arg-type]
    inbox.book.expect({"a"})
    bus.deliver(bid_msg(bid("a")))
    assert inbox.events.empty(), "in the window: a bid of the auction, not an event"
    inbox.book.close()
    again = replace(bid("a"), claim="new")
    bus.deliver(bid_msg(again))
    assert inbox.events.empty(), "a late bid nobody asked for only counts as late"
    inbox.book.want_late("a")
    bus.deliver(bid_msg(bid("b")))
    bus.deliver(bid_msg(again))
    assert inbox.events.get_nowait() == ("bid", again) and inbox.events.empty()
    assert inbox.book.close() == {"a": bid("a")} and inbox.book.all_bidders() == {"a", "b"}



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
