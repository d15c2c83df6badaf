"""The keeper of an asker's view of a large fleet (agent.viewkeeper): a real roster and
memory, its thread at a fast pace; every wait is on its condition, with a timeout."""

from __future__ import annotations

import logging
from typing import Any

from agent.bus import Message
from agent.invite import AskerMemory, Rows
from agent.messages import LatencySummary, Metrics, Snapshot
from agent.roster import Roster
from agent.topics import Topics
from agent.viewkeeper import KEEP_EVERY_S, MAX_KEPT, ViewKeeper, keeper

T = Topics("")
KIND = (None, "any", False)
WAIT_S = 5.0


def metrics(device: str, backlog_s: float) -> Message:
    snap = Snapshot(has_npu=False, npu_free=False, cpu_slots=1, cpu_percent=0.0, mem_available_mb=1e3, load1=0.0,
                    queue_depth=0, backlog_s=backlog_s, recent={"cpu": LatencySummary(5, 1000.0)})
    return Message(T.metrics(device), Metrics(device=device, ts=100.0, snapshot=snap).to_payload(), retain=True)


def fleet(n: int) -> Roster:
    roster = Roster(T, "hub", wall=lambda: 100.0)
    for i in range(n):
        roster.handle(Message(T.availability(f"d{i}"), b"online", retain=True))
        roster.handle_metrics(metrics(f"d{i}", 0.0))
    return roster


def chosen_from(view: Rows, roster: Roster, memory: AskerMemory) -> None:
    """What an auction does to the view (agent.auctioneer)."""
    with view.lock:
        view.sync(roster, roster.bidders(*KIND))
        view.known(memory, 50.0, 100, 100)


def backlog(view: Rows, device: str) -> float:
    t = view.current()
    return float(t.backlog[t.index[device]])


def test_between_auctions_the_view_reads_what_changed_on_the_keeper_s_thread() -> None:
    roster, memory, view = fleet(30), AskerMemory(), Rows()
    chosen_from(view, roster, memory)
    kept = ViewKeeper(view, KIND, memory, every_s=0.01)
    kept.used(roster)
    roster.handle_metrics(metrics("d7", 4.0))
    memory.heard("d3", 50.0, backlog_s=2.0, service_s=1.0, init_s=0.0, slots=1)

    def read(_: ViewKeeper) -> bool:
        t = view.current()
        return backlog(view, "d7") == 4.0 and t.m_values[t.index["d3"]][2] == 1.0
    assert kept.wait(read, WAIT_S), "the new metrics and the bid heard, with no auction"
    roster.handle(Message(T.availability("d30"), b"online", retain=True))
    assert kept.wait(lambda k: "d30" in view.current().index, WAIT_S), "a device that came"


def test_an_auction_reading_the_view_is_not_waited_for_and_a_nudge_is_a_round_at_once() -> None:
    roster, memory, view = fleet(5), AskerMemory(), Rows()
    chosen_from(view, roster, memory)
    kept = ViewKeeper(view, KIND, memory, every_s=60.0)  # only nudges make rounds here
    kept.used(roster)
    roster.handle_metrics(metrics("d1", 3.0))
    with view.lock:  # an auction
        tries = kept.tries
        kept.nudge()
        assert kept.wait(lambda k: k.tries > tries, WAIT_S)
        assert backlog(view, "d1") == 0.0 and kept.rounds == 0, "stepped aside"
    kept.nudge()
    assert kept.wait(lambda k: k.rounds >= 1 and backlog(view, "d1") == 3.0, WAIT_S)
    kept.stop()
    assert kept.wait(lambda k: not k.running, WAIT_S)


def test_the_keeper_stops_after_an_idle_spell_and_the_next_auction_starts_it_again() -> None:
    now = [0.0]
    roster, memory, view = fleet(3), AskerMemory(), Rows()
    chosen_from(view, roster, memory)
    idle = ViewKeeper(view, KIND, memory, every_s=0.01, idle_s=10.0, clock=lambda: now[0])
    idle.used(roster)
    assert idle.wait(lambda k: k.rounds >= 1, WAIT_S) and idle.running
    now[0] = 10.0
    assert idle.wait(lambda k: not k.running, WAIT_S), "no auction for idle_s"
    roster.handle_metrics(metrics("d2", 5.0))
    idle.used(roster)
    assert idle.running and idle.wait(lambda k: backlog(view, "d2") == 5.0, WAIT_S)
    now[0] = 18.0
    idle.nudge()  # an orchestration's end counts as use
    rounds = idle.rounds
    now[0] = 22.0  # 12 s after the auction, 4 s after the end of its orchestration
    idle.nudge()
    assert idle.wait(lambda k: k.rounds >= rounds + 1, WAIT_S) and idle.running
    idle.stop()
    assert idle.wait(lambda k: not k.running, WAIT_S)


def test_one_keeper_per_view_at_a_tenth_of_a_second() -> None:
    memory, view = AskerMemory(), Rows()
    assert keeper(view, KIND, memory) is keeper(view, KIND, memory)
    assert keeper(Rows(), KIND, memory) is not keeper(view, KIND, memory)
    assert keeper(view, KIND, memory).every_s == KEEP_EVERY_S == 0.1


def test_at_most_max_kept_keepers_run_the_least_recently_used_stopped() -> None:
    """A job kind is the caller's (any model name): each kept kind costs a thread and a
    bidders set in the roster."""
    roster, memory = fleet(3), AskerMemory()
    kept = [keeper(Rows(), (f"model-{i}", "any", False), memory) for i in range(MAX_KEPT + 1)]
    for k in kept:
        k.every_s = 60.0
        k.used(roster)
    assert kept[0].wait(lambda k: not k.running, WAIT_S), "the least recently used"
    assert all(k.running for k in kept[1:])
    kept[0].used(roster)  # used again: kept again, and now kept[1] is the oldest
    assert kept[0].running and kept[1].wait(lambda k: not k.running, WAIT_S)


def test_a_keeper_that_cannot_start_its_thread_leaves_the_auction_alone(monkeypatch: Any,
                                                                        caplog: Any) -> None:
    import agent.viewkeeper

    class NoThreads:
        def __init__(self, **kw: Any) -> None:
            pass

        def start(self) -> None:
            raise RuntimeError("can't start new thread")
    roster, memory, view = fleet(3), AskerMemory(), Rows()
    kept = ViewKeeper(view, KIND, memory, every_s=0.01)
    with monkeypatch.context() as m:
        m.setattr(agent.viewkeeper.threading, "Thread", NoThreads)
        kept.used(roster)
    assert not kept.running and "cannot keep the fleet's view up to date" in caplog.text
    kept.used(roster)
    assert kept.running, "tried again at the next auction"
    kept.stop()


def test_a_round_that_fails_is_said_once_at_warning_then_quietly_until_one_works(caplog: Any) -> None:
    class Broken(Roster):
        fail = True

        def bidders(self, model: str | None = None, need: str = "any", tools: bool = False) -> frozenset[str]:
            if self.fail:
                raise RuntimeError("a bug")
            return super().bidders(model, need, tools)
    roster = Broken(T, "hub", wall=lambda: 100.0)
    view, memory = Rows(), AskerMemory()
    kept = ViewKeeper(view, KIND, memory, every_s=0.01)
    with caplog.at_level(logging.DEBUG, logger="agent.orchestrator"):
        kept.used(roster)
        assert kept.wait(lambda k: k.tries >= 4, WAIT_S)
        roster.fail = False
        roster.handle(Message(T.availability("d0"), b"online", retain=True))
        assert kept.wait(lambda k: k.rounds >= 1, WAIT_S)
    kept.stop()
    said = [r.levelno for r in caplog.records if "keeping the fleet's view" in r.getMessage()]
    assert said[0] == logging.WARNING and set(said[1:]) <= {logging.DEBUG} and len(said) >= 3
