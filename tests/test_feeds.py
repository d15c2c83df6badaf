"""A source's feeds of changed devices (agent.feeds): what each consumer has still to read."""

from __future__ import annotations

import gc
import threading

from agent.feeds import Feeds


def test_each_consumer_takes_what_changed_since_it_last_took() -> None:
    feeds = Feeds(threading.Lock())
    early = feeds.open()
    feeds.touch("a")
    late = feeds.open()
    feeds.touch("b")
    assert early.take() == {"a", "b"} and late.take() == {"b"}, "a consumer hears only what came after it opened"
    assert early.take() == set(), "taken: gone"
    feeds.touch("a")
    assert late.take() == {"a"} and early.take() == {"a"}


def test_a_consumer_that_is_gone_is_dropped() -> None:
    feeds = Feeds(threading.Lock())
    kept = feeds.open()
    gone = feeds.open()
    del gone
    gc.collect()
    feeds.touch("a")
    feeds.open()  # opening prunes the dead
    assert len(feeds._all) == 2 and kept.take() == {"a"}
