"""`serve`'s parts that keep things warm between requests, on fakes: the threads kept
waiting for connections (``Workers``: a waiting one takes the next job, a job that
blocks holds up only its own thread, no more than ``keep`` wait, ``stop`` ends the
waiting ones), and the orchestrators kept for the next request (the one used last goes
first: its caches are the ones still valid)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from agent.dispatch import Answer
from agent.errors import ExitCode
from agent.messages import Prompt
from agent.outcome import Outcome
from agent.serve import OrchestratorBackend, Stop, Workers
from tests.support.fleet import WAIT_S


def recorder() -> tuple[Callable[[], None], list[threading.Thread], threading.Event]:
    """A job that notes the thread it ran on, and an event set when it has."""
    ran_on: list[threading.Thread] = []
    done = threading.Event()

    def job() -> None:
        ran_on.append(threading.current_thread())
        done.set()
    return job, ran_on, done


def blocker(release: threading.Event) -> tuple[Callable[[], None], list[threading.Thread], threading.Event]:
    """A job that notes its thread, says it started, and waits for ``release``."""
    ran_on: list[threading.Thread] = []
    started = threading.Event()

    def job() -> None:
        ran_on.append(threading.current_thread())
        started.set()
        release.wait(WAIT_S)
    return job, ran_on, started


def test_a_started_thread_takes_the_jobs_one_after_another() -> None:
    workers = Workers(2, "t")
    workers.start(1)
    try:
        seen = []
        for _ in range(3):
            job, ran_on, done = recorder()
            workers.run(job)
            assert done.wait(WAIT_S)
            assert workers.wait_idle(1, WAIT_S), "back to wait after its job"
            seen += ran_on
        assert [t.name for t in seen] == ["t-1"] * 3, "no thread started per job"
    finally:
        workers.stop()


def test_a_job_that_blocks_holds_up_only_its_own_thread() -> None:
    workers = Workers(2, "t")
    workers.start(1)
    release = threading.Event()
    try:
        slow, slow_on, started = blocker(release)
        workers.run(slow)
        assert started.wait(WAIT_S)
        job, ran_on, done = recorder()
        workers.run(job)
        assert done.wait(WAIT_S), "the next job waited for the blocked one"
        assert ran_on[0] is not slow_on[0]
    finally:
        release.set()
        workers.stop()


def test_no_more_than_keep_threads_wait_and_stop_ends_them() -> None:
    workers = Workers(1, "t")
    releases = [threading.Event() for _ in range(3)]
    jobs = [blocker(release) for release in releases]
    for job, _, started in jobs:
        workers.run(job)
        assert started.wait(WAIT_S)
    first, second, third = (ran_on[0] for _, ran_on, _ in jobs)
    assert len({first, second, third}) == 3, "three jobs at once, three threads"
    releases[0].set()
    assert workers.wait_idle(1, WAIT_S), "the first one done waits for the next job"
    for release, thread in ((releases[1], second), (releases[2], third)):
        release.set()
        thread.join(WAIT_S)
        assert not thread.is_alive(), f"{thread.name} waits too, past keep"
    workers.stop()
    first.join(WAIT_S)
    assert not first.is_alive(), "the waiting thread still runs after stop"


def test_a_job_that_raises_is_logged_and_its_thread_serves_the_next(caplog: pytest.LogCaptureFixture) -> None:
    workers = Workers(1, "t")
    workers.start(1)
    try:
        def broken() -> None:
            raise RuntimeError("a bug")
        workers.run(broken)
        assert workers.wait_idle(1, WAIT_S)
        job, ran_on, done = recorder()
        workers.run(job)
        assert done.wait(WAIT_S)
        assert ran_on[0].name == "t-1"
        assert "t-1: a job failed" in caplog.text
    finally:
        workers.stop()


class FakeOrchestrator:
    """Answers at once, or once ``release`` is set; notes each run."""

    def __init__(self, name: str, runs: list[str], release: threading.Event | None = None):
        self.name, self.runs, self.release = name, runs, release
        self.started = threading.Event()
        self.interrupted = threading.Event()
        self.on_token: Callable[[str], None] = lambda t: None
        self.on_decision: Callable[[object], None] = lambda d: None

    def interrupt(self) -> None:
        self.interrupted.set()

    def run(self, prompt: str, **kw: object) -> Outcome:
        self.runs.append(self.name)
        self.started.set()
        if self.release is not None:
            assert self.release.wait(WAIT_S)
        return Outcome("r", Answer(True, ExitCode.OK, "hi"), winner=self.name)


def test_the_orchestrator_used_last_takes_the_next_request() -> None:
    runs: list[str] = []
    release = threading.Event()
    slow = FakeOrchestrator("slow", runs, release)
    made = iter([slow, FakeOrchestrator("quick", runs)])
    backend = OrchestratorBackend(lambda: next(made), fleet=lambda: None, own_models=[], me="gw")

    def ask() -> None:
        backend.run(Prompt("hi"), lambda device, path: None, lambda text: None, Stop())
    first = threading.Thread(target=ask, name="first")
    first.start()
    assert slow.started.wait(WAIT_S)
    ask()  # meanwhile: a second orchestrator, done first
    release.set()
    first.join(WAIT_S)
    slow.release = None
    ask()
    ask()
    assert runs == ["slow", "quick", "slow", "slow"], "the one back last goes first"
