"""State machines as tables: ``{(state, event): next_state}``.

Every transition the orchestrator or a node makes goes through ``Machine.fire``; a pair
that is not in the table raises ``IllegalTransition`` naming both, so a protocol bug shows
up as an error at the line that caused it instead of as a hang later.
"""

from __future__ import annotations

from collections.abc import Mapping

from agent.errors import IllegalTransition

__all__ = ["ATTEMPT", "IllegalTransition", "JOB", "Machine", "ORCHESTRATION", "events", "states"]

# One orchestration. "closed" is the decision point: the ranking is walked from there,
# one ATTEMPT per peer tried; an attempt that passes comes back to "closed".
ORCHESTRATION: Mapping[tuple[str, str], str] = {
    ("start", "local_npu"): "running_local",
    ("start", "open"): "collecting",
    ("start", "broker_down"): "closed",
    ("collecting", "bid"): "collecting",
    ("collecting", "roster_complete"): "closed",
    ("collecting", "timeout"): "closed",
    ("collecting", "decided"): "closed",      # a free NPU bid and no other NPU can still bid
    ("collecting", "stragglers"): "closed",   # only peers that missed recent calls are missing
    ("collecting", "overdue"): "closed",      # the missing peers are well past their usual bid latency
    ("collecting", "interrupted"): "failed",  # Ctrl-C before anything was sent
    ("closed", "dispatch"): "dispatched",
    ("closed", "run_local"): "running_local",
    ("closed", "no_candidate"): "failed",
    ("dispatched", "passed"): "closed",       # declined, silent or gone: the runner-up
    ("dispatched", "answered"): "done",
    ("dispatched", "failed"): "failed",
    ("running_local", "done"): "done",
    ("running_local", "passed"): "closed",    # its model server is down: the runner-up
    ("running_local", "error"): "failed",
}

# One job sent to one peer, as its orchestrator sees it.
ATTEMPT: Mapping[tuple[str, str], str] = {
    ("dispatched", "accepted"): "running",
    ("dispatched", "token"): "streaming",
    ("dispatched", "done"): "done",
    ("dispatched", "error"): "failed",
    ("dispatched", "declined"): "passed",
    ("dispatched", "unavailable"): "passed",  # its model server is down: nothing ran, fail over
    ("dispatched", "accept_timeout"): "passed",
    ("dispatched", "winner_offline"): "passed",
    ("dispatched", "timeout"): "failed",      # no runner-up, and it never answered
    ("running", "accepted"): "running",       # a redelivered accept
    ("running", "token"): "streaming",
    ("running", "done"): "done",
    ("running", "error"): "failed",
    ("running", "winner_offline"): "passed",  # nothing streamed yet: fail over
    ("running", "unavailable"): "passed",
    ("running", "timeout"): "failed",
    ("streaming", "token"): "streaming",
    ("streaming", "done"): "done",
    ("streaming", "error"): "failed",
    ("streaming", "winner_offline"): "failed",  # partial text: report, never re-run
    ("streaming", "timeout"): "failed",
    # The only candidate restarted before any token and refused the copy (stale_claim):
    # asked for a new bid, and sent the job again with its claim.
    ("dispatched", "restarted"): "rebidding",
    ("running", "restarted"): "rebidding",
    ("rebidding", "rebid"): "dispatched",
    ("rebidding", "no_bid"): "passed",
    ("rebidding", "timeout"): "failed",
    ("rebidding", "done"): "done",      # a run alive after all (a refusal not of its own)
    ("rebidding", "error"): "failed",
}

# One job on a node.
JOB: Mapping[tuple[str, str], str] = {
    ("new", "accept"): "queued",
    ("new", "decline"): "declined",
    ("queued", "start"): "running",
    ("queued", "expire"): "failed",
    ("running", "finish"): "done",
    ("running", "fail"): "failed",
}


def states(table: Mapping[tuple[str, str], str]) -> set[str]:
    return {s for s, _ in table} | set(table.values())


def events(table: Mapping[tuple[str, str], str]) -> set[str]:
    return {e for _, e in table}


class Machine:
    def __init__(self, name: str, table: Mapping[tuple[str, str], str], state: str):
        if state not in states(table):
            raise ValueError(f"{name}: unknown state {state!r}")
        self.name, self.table, self.state = name, table, state

    def fire(self, event: str) -> str:
        try:
            self.state = self.table[(self.state, event)]
        except KeyError:
            raise IllegalTransition(self.name, self.state, event) from None
        return self.state

    def can(self, event: str) -> bool:
        return (self.state, event) in self.table
