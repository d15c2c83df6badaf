"""The answer to one prompt and how it was reached: what ``trigger --json`` prints.

Built once, at the end of an orchestration, from what each phase returned (the auction,
the decision, the attempts, the answer); nothing writes into it along the way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent.dispatch import Answer
from agent.errors import ExitCode
from agent.messages import Bid, Timings

# How many bids and ranking entries ``trigger --json`` lists: the best ones, with the
# totals beside them. A fleet of a thousand printed a thousand of each (#23).
SHOWN = 10


def path_of(mode: str, is_self: bool) -> str:
    return ("local-" if is_self else "peer-") + mode


@dataclass(frozen=True)
class Decided:
    """Who was chosen to run it, announced once the winner has answered."""

    winner: str
    path: str
    score: float | None = None


@dataclass(frozen=True)
class Outcome:
    rid: str
    answer: Answer
    winner: str | None = None
    path: str | None = None
    score: float | None = None
    bids: tuple[Mapping[str, Any], ...] = ()
    roster: tuple[str, ...] = ()
    auction_ms: float = 0.0
    decide_ms: float = 0.0   # choosing the winner from the bids, after the auction
    total_ms: float = 0.0    # until the answer is in; training the arm store comes after
    attempts: tuple[Mapping[str, str], ...] = ()
    warnings: tuple[str, ...] = ()
    ranking: tuple[Mapping[str, Any], ...] = ()
    dry_run: bool = False
    model: str | None = None  # the model the job asked for (None: any)
    invited: int | None = None  # how many devices the auction invited (None: it called everyone)

    # the answer's parts, for callers that read them directly
    @property
    def ok(self) -> bool:
        return self.answer.ok

    @property
    def exit_code(self) -> ExitCode:
        return self.answer.exit_code

    @property
    def text(self) -> str:
        return self.answer.text

    @property
    def error(self) -> str | None:
        return self.answer.error

    @property
    def timings(self) -> Timings:
        return self.answer.timings

    def to_json(self) -> dict[str, Any]:
        """The public ``trigger --json`` object (keys documented in the README)."""
        return {"rid": self.rid, "winner": self.winner, "path": self.path, "text": self.text,
                "bids": top_bids(self.bids, self.winner, SHOWN), "bids_total": len(self.bids),
                "roster": list(self.roster),
                "auction_ms": round(self.auction_ms, 3), "decide_ms": round(self.decide_ms, 3),
                "total_ms": round(self.total_ms, 3),
                "timings": {k: round(v, 3) for k, v in vars(self.timings).items()},
                "attempts": list(self.attempts), "ok": self.ok, "exit_code": int(self.exit_code),
                "error": self.error, "warnings": list(self.warnings), "ranking": list(self.ranking[:SHOWN]),
                "ranking_total": len(self.ranking),
                "dry_run": self.dry_run, "model": self.model, "invited": self.invited,
                "usage": {"prompt_tokens": self.answer.prompt_tokens,
                          "completion_tokens": self.answer.generated_tokens},
                "finish_reason": self.answer.finish_reason or None,
                "tool_calls": [c.to_obj() for c in self.answer.tool_calls]}


def bid_summary(bid: Bid, score: float | None) -> dict[str, Any]:
    s = bid.snapshot
    return {"device": bid.device, "has_npu": s.has_npu, "npu_free": s.npu_free,
            "cpu_slots": s.cpu_slots, "cpu_percent": s.cpu_percent, "queue_depth": s.queue_depth,
            "score": None if score is None else round(score, 6)}


def ranking_summary(ranking: Sequence[Any]) -> tuple[dict[str, Any], ...]:
    return tuple({"device": c.device, "mode": c.mode,
                  "score": None if c.score is None else round(c.score, 6)} for c in ranking)


def top_bids(bids: Sequence[Mapping[str, Any]], winner: str | None, k: int) -> list[Mapping[str, Any]]:
    """At most ``k`` of the bids, in their own order: all of them if they fit, else the
    winner's and the best scored (a bid without a score, e.g. an NPU's, after those)."""
    if len(bids) <= k:
        return list(bids)
    def rank(i: int) -> tuple[bool, bool, float]:
        b = bids[i]
        return (b.get("device") != winner, b.get("score") is None, -(b.get("score") or 0.0))
    keep = set(sorted(range(len(bids)), key=rank)[:k])
    return [b for i, b in enumerate(bids) if i in keep]
