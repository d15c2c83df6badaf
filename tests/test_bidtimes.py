"""What a device remembers of its peers' bids, shared through ``state_dir``: missed calls
and usual bid latency (moved from test_auction)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.bidtimes import BidLatency, Stragglers


def test_stragglers_count_missed_calls_and_a_bid_clears_the_record(tmp_path: Path) -> None:
    s = Stragglers(tmp_path)
    assert s.suspects() == set()
    s.update({"a", "b", "c"}, {"a"})
    assert s.load() == {"b": 1, "c": 1}
    s.update({"a", "b", "c"}, {"a", "c"})
    assert s.load() == {"b": 2}, "c bid the second time: punctual again"
    assert Stragglers(tmp_path).suspects() == {"b"}, "shared through state_dir"


def test_bid_latency_is_a_moving_average_shared_through_state_dir(tmp_path: Path) -> None:
    rec = BidLatency(tmp_path)
    assert rec.load() == {}
    rec.update({"a": 0.010, "slow": 0.400})
    rec.update({"a": 0.020})
    other = BidLatency(tmp_path).load()
    assert other["slow"] == pytest.approx(0.4), "shared, and kept while it does not bid"
    assert 0.010 < other["a"] < 0.020, "moves towards the newest"
    (tmp_path / "bid_latency.json").write_text('{"a": "fast", "b": -1, "c": 0.5}')
    assert BidLatency(tmp_path).load() == {"c": 0.5}, "garbage is ignored"


def test_bid_latency_rewrites_its_file_only_when_an_average_moved(tmp_path: Path) -> None:
    now = [0.0]
    rec = BidLatency(tmp_path, clock=lambda: now[0])
    path = tmp_path / "bid_latency.json"
    rec.update({"a": 0.010})
    assert json.loads(path.read_bytes()) == {"a": 0.01}, "a process's first auction is written"
    for _ in range(5):
        rec.update({"a": 0.0105})  # within a fifth of what is written: memory only
    assert json.loads(path.read_bytes()) == {"a": 0.01}
    assert rec.load()["a"] > 0.0102, "this process uses what it learnt"
    rec.update({"a": 0.010, "b": 0.2})
    assert set(json.loads(path.read_bytes())) == {"a", "b"}, "a new device is written at once"
    rec.update({"a": 0.100})
    assert json.loads(path.read_bytes())["a"] > 0.03, "a big move is written at once"
    rec.update({"a": 0.101})
    written = json.loads(path.read_bytes())["a"]
    now[0] += BidLatency.REWRITE_S
    rec.update({"a": 0.101})
    assert json.loads(path.read_bytes())["a"] != written, "small moves are written after REWRITE_S"
    other = BidLatency(tmp_path, clock=lambda: now[0])
    other.update({"c": 1.0})
    assert rec.load()["c"] == 1.0, "what another process wrote is read when the file changes"
