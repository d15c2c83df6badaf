"""One way to replace a file: a failure part-way leaves the old file, and says which file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from agent import statefiles
from agent.armstore import ArmStore
from agent.errors import StateError
from agent.journal import Journal, Recorded
from agent.linucb import D
from agent.statefiles import atomic_write, ensure_dir


def test_replace_writes_private_files_in_a_private_directory(tmp_path: Path) -> None:
    target = tmp_path / "state" / "f.json"
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert stat.S_IMODE(target.parent.stat().st_mode) == 0o700
    assert [p.name for p in target.parent.iterdir()] == ["f.json"], "no temp file left behind"


@pytest.mark.parametrize("broken", ["write", "fsync", "replace"])
def test_a_failure_part_way_leaves_the_old_file(tmp_path: Path, monkeypatch, broken: str) -> None:
    target = tmp_path / "f.json"
    atomic_write(target, b"old")

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(statefiles.os, broken, fail)
    with pytest.raises(StateError) as info:
        atomic_write(target, b"new" * 1000)
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert info.value.path == str(target) and "disk is full" in info.value.reason
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"], "the temp file is cleaned up"


def test_durable_writes_sync_the_file_and_its_directory_and_relearnable_ones_do_not(tmp_path: Path,
                                                                                    monkeypatch) -> None:
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(statefiles.os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    atomic_write(tmp_path / "journal", b"answers")
    assert len(synced) == 2, "the file, then the directory it was renamed in"
    synced.clear()
    store = ArmStore(tmp_path)
    store.train("dev", np.ones(D), 1.0, "r1")
    assert synced == [] and ArmStore(tmp_path).load().arms["dev"].n == 1, "no disk wait per orchestration"
    Journal(tmp_path).record("r1", "d", b"{}")
    assert synced, "an answer is never relearnt: the journal still syncs"


def test_an_unusable_state_dir_is_a_state_error_naming_it(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with pytest.raises(StateError) as info:
        ensure_dir(blocker / "sub")
    assert str(blocker / "sub") in str(info.value)


def test_arm_store_save_failing_part_way_keeps_the_previous_store(tmp_path: Path, monkeypatch) -> None:
    store = ArmStore(tmp_path)
    store.train("dev", np.ones(D), 1.0, "r1")
    monkeypatch.setattr(statefiles.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(5, "I/O error")))
    with pytest.raises(StateError):
        store.train("dev", np.ones(D), 2.0, "r2")
    monkeypatch.undo()
    fresh = ArmStore(tmp_path).load()
    assert fresh.arms["dev"].n == 1 and "r2" not in fresh.trained


def test_journal_compaction_failing_part_way_keeps_every_entry(tmp_path: Path, monkeypatch) -> None:
    now = [0.0]
    journal = Journal(tmp_path, ttl_s=1e9, clock=lambda: now[0])
    for i in range(60):
        journal.record(f"r{i}", "d", b"{}")
    monkeypatch.setattr(statefiles.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(5, "I/O error")))
    with pytest.raises(StateError):
        journal._compact()
    monkeypatch.undo()
    again = Journal(tmp_path, ttl_s=1e9, clock=lambda: now[0])
    assert all(again.get(f"r{i}") == Recorded("d", b"{}") for i in range(60))


def test_journal_compaction_replaces_the_file_atomically(tmp_path: Path, monkeypatch) -> None:
    calls: list[tuple[Path, bytes]] = []
    real = statefiles.atomic_write

    def spy(path: Path, data: bytes, **kw: bool) -> None:
        calls.append((path, data))
        real(path, data, **kw)

    monkeypatch.setattr("agent.journal.atomic_write", spy)
    now = [0.0]
    journal = Journal(tmp_path, ttl_s=10, clock=lambda: now[0])
    for i in range(300):
        now[0] = float(i)
        journal.record(f"r{i}", "d", b"{}")
    assert calls and all(path == journal.path for path, _ in calls), "compaction goes through atomic_write"
    assert stat.S_IMODE(os.stat(journal.path).st_mode) == 0o600


def test_a_short_write_is_continued_until_everything_is_written(tmp_path: Path, monkeypatch) -> None:
    real = os.write
    monkeypatch.setattr(statefiles.os, "write", lambda fd, data: real(fd, bytes(data[:3])))
    atomic_write(tmp_path / "f", b"0123456789" * 10)
    statefiles.append_line(tmp_path / "log", b"a line of text\n")
    monkeypatch.undo()
    assert (tmp_path / "f").read_bytes() == b"0123456789" * 10
    assert (tmp_path / "log").read_bytes() == b"a line of text\n"
