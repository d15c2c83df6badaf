"""The bus's paho-free half alone (agent/router.py): the subscription tables and matching,
link listeners, the dispatcher thread and barriers. No broker; threads are synchronised
with events and queue timeouts."""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading

import pytest
from paho.mqtt.matcher import MQTTMatcher

from agent.router import Barriers, Dispatcher, Message, Router, Subscription, is_wild

WAIT_S = 10.0


def sub(topic_filter: str, qos: int = 1, inline: bool = False, handler=None) -> Subscription:
    return Subscription(topic_filter, handler or (lambda m: None), qos, inline)


@pytest.fixture
def router() -> Router:
    return Router(MQTTMatcher())


@pytest.mark.parametrize(("topic_filter", "wild"), [("a/b", False), ("a/+/c", True), ("a/#", True),
                                                    ("#", True), ("+", True), ("a+b", True), ("", False)])
def test_a_filter_is_wild_exactly_when_it_has_a_wildcard(topic_filter: str, wild: bool) -> None:
    assert is_wild(topic_filter) is wild


def test_messages_go_to_exact_then_wildcard_subscriptions(router: Router) -> None:
    exact, plus, hash_, other = sub("a/b/c"), sub("a/+/c"), sub("a/#"), sub("x/y")
    for s in (plus, hash_, exact, other):
        router.add(s)
    matched = router.matching("a/b/c")
    assert matched[0] is exact and sorted(map(id, matched[1:])) == sorted(map(id, [plus, hash_])), \
        "exact first; the matcher's order among wildcards is its own"
    assert router.matching("a/z/c") in ([plus, hash_], [hash_, plus])
    assert router.matching("a/z") == [hash_]
    assert router.matching("x/y") == [other]
    assert router.matching("b/c") == []


def test_the_first_subscription_of_a_filter_is_news_and_the_last_removal_too(router: Router) -> None:
    for topic_filter in ("a/b", "a/+"):
        one, two = sub(topic_filter), sub(topic_filter)
        assert router.add(one) is True
        assert router.add(two) is False
        assert router.matching("a/b").count(one) == 1 and router.matching("a/b").count(two) == 1
        assert router.remove(one) is False
        assert one not in router.matching("a/b") and two in router.matching("a/b")
        assert router.remove(one) is False, "removed already"
        assert router.remove(two) is True
        assert router.matching("a/b") == []
        assert router.remove(two) is False, "the filter is gone"
        assert router.add(one) is True, "a filter seen again is news again"
        assert router.remove(one) is True


def test_removing_a_subscription_never_made_changes_nothing(router: Router) -> None:
    kept = sub("a/+")
    router.add(kept)
    assert router.remove(sub("a/+")) is False
    assert router.remove(sub("a/b")) is False
    assert router.matching("a/b") == [kept]
    assert router.filters() == [("a/+", 1)]


def test_a_wildcard_filter_removed_matches_nothing_and_can_come_back(router: Router) -> None:
    s = sub("a/#")
    router.add(s)
    router.remove(s)
    assert router.matching("a/b") == []
    again = sub("a/#")
    router.add(again)
    assert router.matching("a/b") == [again]


def test_every_filter_is_resubscribed_with_its_first_subscriptions_qos(router: Router) -> None:
    assert router.filters() == []
    first, later = sub("a/b", qos=0), sub("a/b", qos=1)
    router.add(first)
    router.add(later)
    router.add(sub("c/+", qos=1))
    router.add(sub("d/#", qos=2))
    assert sorted(router.filters()) == [("a/b", 0), ("c/+", 1), ("d/#", 2)]
    router.remove(first)
    assert sorted(router.filters()) == [("a/b", 1), ("c/+", 1), ("d/#", 2)]


def test_link_listeners_are_added_and_removed(router: Router) -> None:
    def one(up: bool, sp: bool) -> None: ...
    def two(up: bool, sp: bool) -> None: ...
    remove_one = router.on_link(one)
    router.on_link(two)
    assert router.listeners() == [one, two]
    remove_one()
    assert router.listeners() == [two]
    remove_one()  # twice is harmless
    assert router.listeners() == [two]


class Recorder:
    """Handlers that record (thread name, what) and signal each call."""

    def __init__(self) -> None:
        self.calls: queue.Queue[tuple[str, str, object]] = queue.Queue()

    def handler(self, label: str):
        def handle(arg: object) -> None:
            self.calls.put((label, threading.current_thread().name, arg))
        return handle

    def next(self) -> tuple[str, str, object]:
        return self.calls.get(timeout=WAIT_S)


@pytest.fixture
def dispatcher():
    made: list[Dispatcher] = []

    def make(on_connect=None) -> Dispatcher:
        d = Dispatcher("t", on_connect)
        made.append(d)
        return d
    yield make
    for d in made:
        d.stop()


def test_inline_handlers_run_at_once_on_the_callers_thread_and_the_rest_in_order_on_the_dispatcher(
        dispatcher) -> None:
    rec = Recorder()
    d = dispatcher()
    m1, m2 = Message("a", b"1"), Message("a", b"2")
    d.deliver(m1, [sub("a", handler=rec.handler("queued")), sub("a", inline=True, handler=rec.handler("inline"))])
    assert rec.calls.get_nowait() == ("inline", threading.current_thread().name, m1), "before deliver returned"
    d.deliver(m2, [sub("a", handler=rec.handler("queued"))])
    assert rec.calls.empty(), "nothing runs the queue before start"
    d.start()
    assert rec.next() == ("queued", "t-dispatch", m1)
    assert rec.next() == ("queued", "t-dispatch", m2)


def test_a_message_nobody_queued_for_reaches_no_handler(dispatcher) -> None:
    rec = Recorder()
    d = dispatcher(on_connect=rec.handler("connect"))
    d.start()
    d.deliver(Message("a", b"x"), [])
    d.deliver(Message("a", b"y"), [sub("a", inline=True, handler=rec.handler("inline"))])
    d.connected(True)
    assert rec.next()[0] == "inline"
    assert rec.next() == ("connect", "t-dispatch", True), "the connect came next: nothing was queued before it"


def test_the_connect_callback_runs_after_the_messages_queued_before_it(dispatcher) -> None:
    rec = Recorder()
    d = dispatcher(on_connect=rec.handler("connect"))
    d.deliver(Message("a", b"1"), [sub("a", handler=rec.handler("msg"))])
    d.connected(False)
    d.connected(True)
    d.start()
    assert [rec.next()[0::2] for _ in range(3)] == [("msg", Message("a", b"1")), ("connect", False),
                                                  ("connect", True)]


def test_a_handler_that_raises_is_logged_and_the_next_one_runs(dispatcher, caplog) -> None:
    caplog.set_level(logging.ERROR, logger="agent.bus")
    rec = Recorder()

    def bad(msg: Message) -> None:
        raise ValueError("boom")
    d = dispatcher()
    d.start()
    d.deliver(Message("t/1", b""), [sub("t/1", inline=True, handler=bad), sub("t/1", inline=True,
                                                                         handler=rec.handler("inline"))])
    d.deliver(Message("t/2", b""), [sub("t/2", handler=bad), sub("t/2", handler=rec.handler("after"))])
    assert rec.next()[0] == "inline"
    assert rec.next()[0] == "after"
    failed = [r for r in caplog.records if "handler" in r.getMessage()]
    assert len(failed) == 2 and all(r.name == "agent.bus" and r.exc_info for r in failed)
    assert "t/1" in failed[0].getMessage() and "t/2" in failed[1].getMessage()
    assert failed[0].getMessage().startswith("t: handler")


def test_run_skips_a_missing_callback(dispatcher) -> None:
    dispatcher().run(None, "x")  # no on_connect given: a connect runs nothing and raises nothing


def test_start_runs_one_thread_and_stop_ends_it_after_what_is_queued(dispatcher) -> None:
    rec = Recorder()
    d = dispatcher()
    d.start()
    d.start()
    assert [t.name for t in threading.enumerate()].count("t-dispatch") == 1
    release = threading.Event()
    d.deliver(Message("a", b""), [sub("a", handler=lambda m: release.wait(WAIT_S)),
                                  sub("a", handler=rec.handler("last"))])
    stopper = threading.Thread(target=d.stop)
    stopper.start()
    release.set()
    stopper.join(WAIT_S)
    assert rec.calls.get_nowait()[0] == "last", "stop waited for the queue"
    assert "t-dispatch" not in [t.name for t in threading.enumerate()]
    d.start()
    d.deliver(Message("a", b"again"), [sub("a", handler=rec.handler("again"))])
    assert rec.next() == ("again", "t-dispatch", Message("a", b"again")), "started again after a stop"


def test_a_handler_may_stop_its_own_dispatcher(dispatcher) -> None:
    d = dispatcher()
    d.start()
    stopped = threading.Event()

    def stop(msg: Message) -> None:
        d.stop()
        stopped.set()
    d.deliver(Message("a", b""), [sub("a", handler=stop)])
    assert stopped.wait(WAIT_S), "a handler stopping its dispatcher must not wait for itself"
    d.start()  # and the owner can start a new one
    rec = Recorder()
    d.deliver(Message("a", b""), [sub("a", handler=rec.handler("after"))])
    assert rec.next()[0] == "after"


def test_link_listeners_all_hear_even_when_one_raises(dispatcher, caplog) -> None:
    caplog.set_level(logging.ERROR, logger="agent.bus")
    heard: list[tuple[str, bool, bool]] = []

    def bad(up: bool, sp: bool) -> None:
        raise RuntimeError("listener bug")
    dispatcher().tell([bad, lambda up, sp: heard.append(("ok", up, sp))], True, False)
    assert heard == [("ok", True, False)]
    assert [r.getMessage() for r in caplog.records] == ["t: link listener failed"]


def test_a_barrier_token_comes_back_once_and_only_its_own() -> None:
    barriers = Barriers()
    token, done = barriers.open()
    other, other_done = barriers.open()
    assert len(token) == 8 and token != other
    barriers.on_sync(Message("sync", b"not a token"))
    assert not done.is_set() and not other_done.is_set()
    barriers.on_sync(Message("sync", token))
    assert done.is_set() and not other_done.is_set()
    barriers.close(other)
    barriers.on_sync(Message("sync", other))
    assert not other_done.is_set(), "a closed token is forgotten"
    barriers.close(other)  # twice is harmless


def test_a_message_is_frozen_and_by_default_a_fresh_qos_1_publish_without_properties() -> None:
    m = Message("t", b"p")
    assert (m.qos, m.retain, m.dup, m.response_topic, m.correlation_data, m.expiry_left) == (
        1, False, False, None, None, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.topic = "u"  # type: ignore[misc]


def test_a_subscription_runs_on_the_dispatcher_unless_asked_inline(dispatcher) -> None:
    rec = Recorder()
    d = dispatcher()
    d.start()
    d.deliver(Message("a", b""), [Subscription("a", rec.handler("default"), 1)])
    assert rec.next()[:2] == ("default", "t-dispatch")


def test_the_dispatcher_thread_never_keeps_a_process_alive(dispatcher) -> None:
    d = dispatcher()
    d.start()
    (thread,) = [t for t in threading.enumerate() if t.name == "t-dispatch"]
    assert thread.daemon
