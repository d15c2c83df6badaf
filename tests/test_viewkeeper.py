"""The keeper of an asker's view of a large fleet (agent.viewkeeper): a real roster and
memory, its thread at a fast pace; every wait is on its condition, with a timeout."""

from __future__ import annotations

from agent.bus import Message
from agent.invite import AskerMemory, Rows
from agent.messages import LatencySummary, Metrics, Snapshot
from agent.roster import Roster
from agent.topics import Topics
from agent.viewkeeper import KEEP_EVERY_S, ViewKeeper, keeper

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
    assert kept.wait(lambda k: backlog(view, "d7") == 4.0, WAIT_S), "the new metrics, with no auction"
    t = view.current()
    assert t.m_values[t.index["d3"]][2] == 1.0, "and the bid heard"
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
    assert kept.wait(lambda k: k.rounds == 1, WAIT_S) and backlog(view, "d1") == 3.0


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


def test_one_keeper_per_view_at_a_tenth_of_a_second() -> None:
    memory, view = AskerMemory(), Rows()
    assert keeper(view, KIND, memory) is keeper(view, KIND, memory)
    assert keeper(Rows(), KIND, memory) is not keeper(view, KIND, memory)
    assert keeper(view, KIND, memory).every_s == KEEP_EVERY_S == 0.1
