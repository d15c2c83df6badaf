from __future__ import annotations

import itertools

import pytest

from agent.fsm import AUCTION, JOB, IllegalTransition, Machine, events, states


@pytest.mark.parametrize("name,table", [("auction", AUCTION), ("job", JOB)])
def test_every_state_event_pair_is_allowed_exactly_when_tabled(name: str, table: dict) -> None:
    for state, event in itertools.product(sorted(states(table)), sorted(events(table))):
        m = Machine(name, table, state)
        if (state, event) in table:
            assert m.fire(event) == table[(state, event)]
        else:
            with pytest.raises(IllegalTransition) as info:
                m.fire(event)
            assert state in str(info.value) and event in str(info.value)
            assert m.state == state, "an illegal event leaves the state alone"


def test_terminal_states_accept_nothing() -> None:
    for state in ("done", "failed"):
        assert not [e for (s, e) in AUCTION if s == state]
    for state in ("done", "failed", "declined"):
        assert not [e for (s, e) in JOB if s == state]


def test_every_state_is_reachable_from_start() -> None:
    for table, start in ((AUCTION, "start"), (JOB, "new")):
        seen, frontier = {start}, [start]
        while frontier:
            s = frontier.pop()
            for (src, _), dst in table.items():
                if src == s and dst not in seen:
                    seen.add(dst)
                    frontier.append(dst)
        assert seen == states(table)


def test_streamed_failure_never_fails_over() -> None:
    m = Machine("a", AUCTION, "streaming")
    assert m.fire("winner_offline") == "failed"
    m = Machine("a", AUCTION, "running")
    assert m.fire("winner_offline") == "closed"
