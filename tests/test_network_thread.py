"""paho's network thread never waits for the disk: a journal write in progress (an fsync
on a slow SD card) holds up neither lookups nor the jobs, bids and keepalives behind it."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent import journal as journal_module
from agent.journal import Journal, Recorded
from tests.support.fleet import WAIT_S, Env, sim


@pytest.fixture
def stalled_disk(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[threading.Event, threading.Event]]:
    """Every journal append waits for ``release`` (after setting ``writing``), as an fsync
    stuck behind a slow card would."""
    writing, release = threading.Event(), threading.Event()
    real: Callable[[Path, bytes], None] = journal_module.append_line

    def slow(path: Path, line: bytes) -> None:
        writing.set()
        release.wait()  # the fixture releases it at the latest
        real(path, line)

    monkeypatch.setattr(journal_module, "append_line", slow)
    try:
        yield writing, release
    finally:
        release.set()


def test_a_lookup_does_not_wait_for_a_journal_write_in_progress(tmp_path: Path, stalled_disk) -> None:
    writing, release = stalled_disk
    journal = Journal(tmp_path)
    writer = threading.Thread(target=journal.record, args=("r1", "d", b"{}"), name="writer")
    writer.start()
    assert writing.wait(WAIT_S)
    looked: list[Recorded | None] = []
    done = threading.Event()
    threading.Thread(target=lambda: (looked.append(journal.get("r1")), done.set()), name="lookup").start()
    assert done.wait(WAIT_S), "a lookup waited for the disk"
    assert looked == [Recorded("d", b"{}")], "known at once, before it is on disk"
    release.set()
    writer.join(WAIT_S)
    assert Journal(tmp_path).get("r1") == Recorded("d", b"{}"), "and then on disk"


@pytest.mark.broker
def test_jobs_and_bids_flow_while_a_journal_write_is_stalled(env: Env, stalled_disk) -> None:
    writing, release = stalled_disk
    hub = env.config("hub", auction={"job_timeout_s": 10})  # stalled behind the disk, the job would time out
    with env.node(env.config("worker", cpu=sim(base_ms=1), slots=2)):  # the first job still holds a slot
        code, out, _, err = env.trigger(hub, "first")
        assert code == 0, err
        assert writing.wait(WAIT_S), "the first job's journal write is in progress, and stays so"
        # A new auction (bids on paho's thread) and a new job (a journal lookup) meanwhile.
        code, out, _, err = env.trigger(hub, "second")
        assert code == 0 and out is not None and out["winner"] == "worker", err
        assert not release.is_set()
        release.set()  # the disk catches up before the node stops
