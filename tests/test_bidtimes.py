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


def test_a_peer_frozen_for_good_stops_costing_a_write_per_auction(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import agent.bidtimes as bidtimes
    from agent.auction import ABSENT_AFTER
    writes: list[Path] = []
    real = bidtimes.atomic_write

    def counted(path: Path, data: bytes, **kw: object) -> None:
        writes.append(path)
        real(path, data, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(bidtimes, "atomic_write", counted)
    s = Stragglers(tmp_path)
    for _ in range(ABSENT_AFTER + 5):
        s.update({"a", "frozen"}, {"a"})
    assert s.load() == {"frozen": ABSENT_AFTER}
    assert len(writes) == ABSENT_AFTER, "a write while the count moved, none after"


def test_bid_latency_is_a_moving_average_shared_through_state_dir(tmp_path: Path) -> None:
    rec = BidLatency(tmp_path)
    assert rec.load() == {}
    rec.update({"a": 0.300, "slow": 2.0})
    rec.update({"a": 1.0})
    other = BidLatency(tmp_path).load()
    assert other["slow"] == pytest.approx(2.0), "shared, and kept while it does not bid"
    assert 0.300 < other["a"] < 1.0, "moves towards the newest"
    assert BidLatency(tmp_path).load(["slow", "never-heard"]) == {"slow": pytest.approx(2.0)}, \
        "an auction's devices only: those known"
    (tmp_path / "bid_latency.json").write_text('{"a": "fast", "b": -1, "c": 0.5}')
    assert BidLatency(tmp_path).load() == {"c": 0.5}, "garbage is ignored"


def test_bid_latency_rewrites_its_file_only_when_a_patience_moved(tmp_path: Path) -> None:
    """What reads the file is ``auction.patience``: four times the average, at least a
    second. A move that changes no device's patience waits for ``REWRITE_S``."""
    now = [0.0]
    rec = BidLatency(tmp_path, clock=lambda: now[0])
    path = tmp_path / "bid_latency.json"
    rec.update({"a": 0.010})
    assert json.loads(path.read_bytes()) == {"a": 0.01}, "a process's first auction is written"
    for _ in range(5):
        rec.update({"a": 0.0105})
    assert json.loads(path.read_bytes()) == {"a": 0.01}, "memory only"
    assert rec.load()["a"] > 0.0102, "this process uses what it learnt"
    rec.update({"a": 0.100, "b": 0.2})
    assert json.loads(path.read_bytes()) == {"a": 0.01}, \
        "under the floor of a second both wait as long as for an unknown device: memory only"
    rec.update({"b": 2.0})
    assert set(json.loads(path.read_bytes())) == {"a", "b"}, "b's patience moved: written at once"
    rec.update({"a": 2.0})
    assert json.loads(path.read_bytes())["a"] > 0.5, "a's patience moved: written at once"
    written = json.loads(path.read_bytes())["a"]
    rec.update({"a": written + 0.05})
    assert json.loads(path.read_bytes())["a"] == written != rec.load()["a"], "a small move: memory only"
    now[0] += BidLatency.REWRITE_S
    rec.update({"a": written + 0.05})
    assert json.loads(path.read_bytes())["a"] != written, "small moves are written after REWRITE_S"
    other = BidLatency(tmp_path, clock=lambda: now[0])
    other.update({"c": 1.0})
    assert rec.load()["c"] == 1.0, "what another process wrote is read when the file changes"


def test_bid_latency_writes_nothing_when_nothing_is_unwritten(tmp_path: Path, monkeypatch) -> None:
    import agent.bidtimes as bidtimes
    writes: list[bytes] = []
    real = bidtimes.atomic_write
    monkeypatch.setattr(bidtimes, "atomic_write",
                        lambda path, data, **kw: (writes.append(data), real(path, data, **kw)))
    now = [0.0]
    rec = BidLatency(tmp_path, clock=lambda: now[0])
    rec.update({"a": 2.0})
    rec.update({"a": 2.0})                      # the same average
    now[0] += BidLatency.REWRITE_S
    rec.update({"a": 2.0})
    assert len(writes) == 1, "the file holds what this process knows: nothing to write"
    writes.clear()
    rec = BidLatency(tmp_path / "2", clock=lambda: now[0])
    rec.update({"a": 2.0})                      # written: its first auction
    rec.update({"b": 0.1})                      # new, within the floor: not written yet
    other = BidLatency(tmp_path / "2", clock=lambda: now[0])
    other.update({"b": 0.1})                    # another process writes a and the same b
    now[0] += BidLatency.REWRITE_S
    rec.update({"a": 2.0})
    assert len(writes) == 2, "what another process wrote is not written again"
