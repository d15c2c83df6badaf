"""What ``trigger --json`` prints about the auction stays bounded as the fleet grows."""

from __future__ import annotations

import json

from agent.dispatch import Answer
from agent.errors import ExitCode
from agent.outcome import SHOWN, Outcome, top_bids


def bid(device: str, score: float | None) -> dict[str, object]:
    return {"device": device, "has_npu": False, "score": score}


def test_a_few_bids_are_all_listed_in_their_order() -> None:
    bids = [bid("a", 0.1), bid("b", None), bid("c", 0.3)]
    assert top_bids(bids, "c", 3) == bids


def test_many_bids_keep_the_winner_and_the_best_scored_in_their_order() -> None:
    bids = [bid(f"d{i:03d}", i / 1000) for i in range(1000)] + [bid("npu-board", None)]
    kept = top_bids(bids, "npu-board", 4)  # an NPU's bid has no score, and it won
    assert [b["device"] for b in kept] == ["d997", "d998", "d999", "npu-board"]
    assert [b["device"] for b in top_bids(bids, "d999", 2)] == ["d998", "d999"]


def test_the_json_is_bounded_with_the_totals_beside_it() -> None:
    n = 1000
    bids = tuple(bid(f"d{i:04d}", float(i)) for i in range(n))
    ranking = tuple({"device": f"d{i:04d}", "mode": "cpu", "score": float(i)} for i in reversed(range(n)))
    out = Outcome("r1", Answer(True, ExitCode.OK, "hi"), winner="d0999", path="peer-cpu", bids=bids,
                  ranking=ranking, roster=tuple(b["device"] for b in bids))
    obj = out.to_json()
    assert obj["bids_total"] == n and obj["ranking_total"] == n
    assert len(obj["bids"]) == SHOWN and obj["bids"][-1]["device"] == "d0999"
    assert obj["ranking"] == list(ranking[:SHOWN])
    assert len(json.dumps(obj)) < 20_000 + 15 * n   # the roster's names are all that grows
    small = Outcome("r2", Answer(True, ExitCode.OK, "hi"), winner="d0", bids=bids[:2], ranking=ranking[:2])
    assert small.to_json()["bids"] == list(bids[:2]) and small.to_json()["bids_total"] == 2
