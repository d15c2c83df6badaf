from __future__ import annotations

import itertools
from collections.abc import Mapping

import pytest

from agent.fsm import (
    ATTEMPT,
    JOB,
    ORCHESTRATION,
    IllegalTransition,
    Machine,
    events,
    states,
)

TABLES = [("orchestration", ORCHESTRATION, "start", {"done", "failed"}),
          ("attempt", ATTEMPT, "dispatched", {"done", "failed", "passed"}),
          ("job", JOB, "new", {"done", "failed", "declined"})]


@pytest.mark.parametrize("name,table", [(n, t) for n, t, _, _ in TABLES])
def test_every_state_event_pair_is_allowed_exactly_when_tabled(name: str, table: Mapping) -> None:
    for state, event in itertools.product(sorted(states(table)), sorted(events(table))):
        m = Machine(name, table, state)
        if (state, event) in table:
            assert m.can(event)
            assert m.fire(event) == table[(state, event)]
        else:
            assert not m.can(event)
            with pytest.raises(IllegalTransition) as info:
                m.fire(event)
            assert state in str(info.value) and event in str(info.value)
            assert m.state == state, "an illegal event leaves the state alone"


@pytest.mark.parametrize("name,table,start,terminal", TABLES)
def test_terminal_states_accept_nothing_and_every_state_is_reachable(name: str, table: Mapping, start: str,
                                                                      terminal: set[str]) -> None:
    assert {s for s in states(table) if not [e for (src, e) in table if src == s]} == terminal
    seen, frontier = {start}, [start]
    while frontier:
        s = frontier.pop()
        for (src, _), dst in table.items():
            if src == s and dst not in seen:
                seen.add(dst)
                frontier.append(dst)
    assert seen == states(table)


def test_streamed_failure_never_fails_over() -> None:
    assert Machine("a", ATTEMPT, "streaming").fire("winner_offline") == "failed"
    assert Machine("a", ATTEMPT, "running").fire("winner_offline") == "passed"


def test_unknown_start_state_is_refused() -> None:
    with pytest.raises(ValueError):
        Machine("a", JOB, "nowhere")
