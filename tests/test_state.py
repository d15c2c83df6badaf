"""The on-device state shared by the node and trigger: NPU lock and completed-rid journal."""

from __future__ import annotations

from pathlib import Path

from agent.journal import Journal, Recorded
from agent.locks import NpuLock
from tests.support.fleet import hold_npu_in_other_process

REPO = Path(__file__).resolve().parents[1]


def test_npu_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    lock = NpuLock(tmp_path)
    assert lock.is_free()
    claim = lock.try_acquire("job-1")
    assert claim is not None and not lock.is_free()
    assert lock.try_acquire("job-2") is None
    claim.release()
    assert lock.is_free()
    with lock.try_acquire("job-3") as again:
        assert again is not None and again.held
    assert lock.is_free()


def test_npu_lock_held_by_another_process_and_freed_when_it_dies(tmp_path: Path) -> None:
    lock = NpuLock(tmp_path)
    holder = hold_npu_in_other_process(tmp_path)
    assert not lock.is_free() and lock.try_acquire() is None
    holder.kill()
    holder.communicate()
    assert lock.is_free(), "the kernel drops a dead holder's flock"


def test_journal_remembers_across_restarts_and_forgets_after_ttl(tmp_path: Path) -> None:
    now = [1000.0]
    j = Journal(tmp_path, ttl_s=100, clock=lambda: now[0])
    j.record("r1", "d1", b'{"type":"done"}')
    assert Journal(tmp_path, ttl_s=100, clock=lambda: now[0]).get("r1") == Recorded("d1", b'{"type":"done"}')
    now[0] = 1200.0
    assert Journal(tmp_path, ttl_s=100, clock=lambda: now[0]).get("r1") is None


def test_journal_survives_a_torn_last_line(tmp_path: Path, caplog) -> None:
    j = Journal(tmp_path)
    j.record("r1", "d1", b"{}")
    with open(tmp_path / "completed.jsonl", "a") as fh:
        fh.write('{"rid": "r2", "ts": 1')
    again = Journal(tmp_path)
    assert again.get("r1") == Recorded("d1", b"{}") and again.get("r2") is None
    assert "unreadable" in caplog.text


def test_journal_compacts(tmp_path: Path) -> None:
    now = [0.0]
    j = Journal(tmp_path, ttl_s=10, clock=lambda: now[0])
    for i in range(300):
        now[0] = float(i)
        j.record(f"r{i}", "d", b"{}")
    lines = (tmp_path / "completed.jsonl").read_text().splitlines()
    assert len(lines) < 100
    assert Journal(tmp_path, ttl_s=10, clock=lambda: now[0]).get("r299") == Recorded("d", b"{}")


def test_a_record_after_a_torn_line_starts_on_a_line_of_its_own(tmp_path: Path) -> None:
    Journal(tmp_path).record("r1", "d1", b"{}")
    with open(tmp_path / "completed.jsonl", "a") as fh:
        fh.write('{"rid": "r2", "ts": 1')  # a crash mid-append
    Journal(tmp_path).record("r3", "d3", b"{}")
    again = Journal(tmp_path)
    assert again.get("r1") == Recorded("d1", b"{}") and again.get("r3") == Recorded("d3", b"{}")


def test_a_journal_full_of_expired_lines_is_compacted_soon_after_a_restart(tmp_path: Path) -> None:
    now = [0.0]
    j = Journal(tmp_path, ttl_s=10, clock=lambda: now[0])
    for i in range(200):
        j.record(f"old{i}", "d", b"{}")
    now[0] = 100.0
    Journal(tmp_path, ttl_s=10, clock=lambda: now[0]).record("new", "d", b"{}")
    lines = (tmp_path / "completed.jsonl").read_text().splitlines()
    assert not any('"old' in line for line in lines), "the expired lines read at start count toward compaction"
