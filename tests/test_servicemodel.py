"""A device's own service record, its backlog in seconds, and the gate that uses both."""

from __future__ import annotations

import itertools
import random
import threading

import numpy as np
import pytest

from agent.gate import Gate
from agent.servicemodel import RIDGE, InitCost, ServiceRecord, _fit_nonneg, expected_wait, remaining


def test_the_record_learns_size_dependent_service_time() -> None:
    record = ServiceRecord(half_life_jobs=50)
    assert record.estimate("cpu", 100, 100) is None
    assert record.expected("cpu", 100, 100, default=10.0) == 10.0
    for prompt, new in [(100, 50), (2000, 50), (100, 500), (1000, 300), (500, 100), (1500, 400)] * 3:
        record.observe("cpu", prompt, 2 * new, new, 0.5 + 1.0 * prompt / 1000 + 8.0 * new / 1000)
    mean, n = record.estimate("cpu", 800, 400)  # type: ignore[misc]
    # Answers used half their budget: 400 allowed, 200 expected.
    assert mean == pytest.approx(0.5 + 0.8 + 1.6, rel=0.05) and n > 15
    assert record.estimate("npu", 800, 200) is None, "modes are kept apart"


def exhaustive_nonneg(G: list[list[float]], h: list[float]) -> list[float]:
    """The reference: the best non-negative θ over every set of free coefficients."""
    A = [[G[i][j] + (RIDGE if i == j else 0.0) for j in range(3)] for i in range(3)]

    def loss(t: list[float]) -> float:
        return sum(t[i] * A[i][j] * t[j] for i in range(3) for j in range(3)) - 2 * sum(h[i] * t[i] for i in range(3))

    best = [0.0, 0.0, 0.0]
    for k in (1, 2, 3):
        for free in itertools.combinations(range(3), k):
            sub = np.linalg.solve(np.array([[A[i][j] for j in free] for i in free]), np.array([h[i] for i in free]))
            if (sub >= 0).all():
                t = [0.0, 0.0, 0.0]
                for i, v in zip(free, sub, strict=True):
                    t[i] = float(v)
                if loss(t) < loss(best):
                    best = t
    return best


def test_the_non_negative_fit_is_the_exhaustive_optimum() -> None:
    rng = random.Random(7)
    constrained = 0
    for _ in range(400):
        rows = [(1.0, rng.uniform(0, 2), rng.uniform(0, 0.5)) for _ in range(rng.randint(1, 12))]
        truth = [rng.uniform(-1, 2), rng.uniform(-1, 3), rng.uniform(-2, 10)]  # some fits want a negative
        ys = [max(sum(t * x for t, x in zip(truth, row, strict=True)) + rng.gauss(0, 0.1), 0.0) for row in rows]
        G = [[sum(r[i] * r[j] for r in rows) for j in range(3)] for i in range(3)]
        h = [sum(y * r[i] for y, r in zip(ys, rows, strict=True)) for i in range(3)]
        got, want = _fit_nonneg(G, h), exhaustive_nonneg(G, h)
        constrained += min(want) == 0.0
        assert min(got) >= 0 and got == pytest.approx(want, abs=1e-6)
    assert constrained > 50, "the draw exercised the constrained cases too"


def speed(prompt: int, new: int) -> float:
    return 1.0 + prompt / 1000 + 10.0 * new / 1000


def test_a_device_that_slows_down_is_relearnt_within_a_few_jobs() -> None:
    record = ServiceRecord(half_life_jobs=20)
    sizes = [(100 + 37 * i % 1900, 16 + 53 * i % 480) for i in range(80)]
    for prompt, new in sizes[:60]:
        record.observe("cpu", prompt, 512, new, speed(prompt, new))
    before, _ = record.estimate("cpu", 1000, 512)  # type: ignore[misc]
    prompt, new = sizes[60]
    record.observe("cpu", prompt, 512, new, 3 * speed(prompt, new))
    assert record.estimate("cpu", 1000, 512)[0] > 2.0 * before, "one 3x job: mostly learnt"  # type: ignore[index]
    for prompt, new in sizes[61:65]:
        record.observe("cpu", prompt, 512, new, 3 * speed(prompt, new))
    after, _ = record.estimate("cpu", 1000, 512)  # type: ignore[misc]
    assert 2.6 * before < after < 3.2 * before, "five: all but learnt, and not overshot"


def test_short_answers_or_one_slow_job_are_noise_not_a_changed_device() -> None:
    record = ServiceRecord(half_life_jobs=20)
    for i in range(40):
        new = 10 if i % 2 else 500  # answers of wildly different lengths, same speed
        record.observe("cpu", 500, 512, new, speed(500, new))
    steady, _ = record.estimate("cpu", 500, 512)  # type: ignore[misc]
    assert steady == pytest.approx(speed(500, 0.5 * 512 + 5), rel=0.05), "the expected length, at the same pace"
    record.observe("cpu", 500, 512, 100, 1.3 * speed(500, 100))  # +30 %
    after, _ = record.estimate("cpu", 500, 512)  # type: ignore[misc]
    assert after < 1.07 * steady, "one slow-ish job nudges the pace, it does not reset it"


def test_garbage_observations_are_ignored() -> None:
    record = ServiceRecord()
    for bad in (float("nan"), float("inf"), -1.0):
        record.observe("cpu", 100, 100, 50, bad)
    record.observe("cpu", 100, 0, 0, 1.0)
    assert record.estimate("cpu", 100, 100) is None


def test_a_cold_start_is_never_priced_below_a_warm_one_and_nothing_is_assumed_at_first() -> None:
    cost = InitCost()
    assert cost.expected("cpu", warm=True) == 0.0 and cost.expected("cpu", warm=False) == 0.0
    cost.observe("cpu", True, 5.0)
    cost.observe("cpu", False, 1.0)  # a noisy cold start that happened to be quick
    assert cost.expected("cpu", warm=True) == pytest.approx(5.0, rel=1e-3)
    assert cost.expected("cpu", warm=False) == pytest.approx(5.0, rel=1e-3), "cold costs at least what warm does"


def test_a_few_short_answers_do_not_make_every_answer_short() -> None:
    """Three answers that used a few percent of a 4000-token budget: the prior (80 %, worth
    one job) still counts, so the next one is expected to be far longer than they were."""
    record = ServiceRecord()
    for new in (400, 10, 200):
        record.observe("cpu", 100, 4000, new, 0.2 + 0.01 * new)  # 10 ms a token
    fill = (0.1 + 0.0025 + 0.05 + 0.8) / 4
    mean, _ = record.estimate("cpu", 100, 4000)  # type: ignore[misc]
    assert mean == pytest.approx(0.2 + 0.01 * 4000 * fill, rel=0.1)


@pytest.mark.parametrize("slots,running,queued,wait", [
    (1, [], [], 0.0),
    (2, [3.0], [], 0.0),                 # a free slot: starts at once
    (1, [3.0], [], 3.0),
    (1, [3.0], [2.0, 1.0], 6.0),         # after the running job and both queued ones
    (2, [3.0, 1.0], [2.0], 3.0),         # the queued job takes the slot free at 1 s, until 3 s
    (2, [3.0, 1.0], [2.0, 5.0], 3.0),
    (0, [], [], float("inf")),
])
def test_expected_wait_is_fifo_over_the_slots(slots: int, running: list[float], queued: list[float],
                                              wait: float) -> None:
    assert expected_wait(slots, running, queued) == wait


def test_a_running_job_past_its_estimate_is_never_done_yet() -> None:
    assert remaining(10.0, 4.0) == 6.0
    assert remaining(10.0, 16.0) == 8.0, "well past its estimate: half as long again as it ran"
    assert remaining(10.0, 10.0) == 5.0


def test_the_gate_reports_depth_and_backlog_in_seconds_and_runs_fifo() -> None:
    clock = [100.0]
    release = threading.Event()
    started: list[str] = []
    began = threading.Semaphore(0)

    def work(item: str, slot: int) -> None:
        started.append(item)
        began.release()
        release.wait(10)

    gate: Gate[str] = Gate(1, 2, work, expected=lambda item: {"a": 4.0, "b": 2.0, "c": 1.0}[item],
                           clock=lambda: clock[0])
    gate.start()
    try:
        assert gate.offer("a") == 0
        assert began.acquire(timeout=10)
        assert gate.offer("b") == 1 and gate.offer("c") == 2
        assert gate.offer("d") is None and not gate.has_room(), "slots + max_queue, no more"
        assert gate.depth == 3
        clock[0] = 101.0  # a has run for 1 s of its 4
        assert gate.backlog_s() == pytest.approx(3.0 + 2.0 + 1.0)
    finally:
        release.set()
        for _ in range(2):
            assert began.acquire(timeout=10)
        gate.stop()
    assert started == ["a", "b", "c"]


def test_a_job_that_raises_does_not_take_its_slot_away() -> None:
    done = threading.Event()

    def work(item: str, slot: int) -> None:
        if item == "bad":
            raise RuntimeError("a bug")
        done.set()

    gate: Gate[str] = Gate(1, 4, work, expected=lambda item: 1.0)
    gate.start()
    try:
        gate.offer("bad")
        gate.offer("good")
        assert done.wait(10), "the slot thread survived the failing job"
    finally:
        gate.stop()


def test_a_stopped_gate_takes_nothing_more() -> None:
    gate: Gate[str] = Gate(1, 4, lambda item, slot: None, expected=lambda item: 1.0)
    gate.start()
    gate.stop()
    assert gate.offer("late") is None and gate.depth == 0


# ---------------------------------------------------------------- start-up, on one basis


def test_start_up_is_priced_by_prompt_length_when_the_executor_counts_prefill_in_it() -> None:
    """llama-cli reports the time to the first token (load + prefill) as init_ms: a long
    prompt's start-up is long, and is priced so — not as the average of every prompt."""
    cost = InitCost()
    for prompt in (100, 2000, 300, 1500, 50, 800) * 3:
        cost.observe("cpu", False, 0.5 + 4.0 * prompt / 1000, prompt)
    assert cost.expected("cpu", warm=False, prompt_tokens=2000) == pytest.approx(8.5, rel=0.02)
    assert cost.expected("cpu", warm=False, prompt_tokens=100) == pytest.approx(0.9, rel=0.05)
    flat = InitCost()  # genie reports the prompt's processing apart: start-up is flat
    for prompt in (100, 2000, 300):
        flat.observe("npu", True, 1.2, prompt)
    assert flat.expected("npu", warm=True, prompt_tokens=4000) == pytest.approx(1.2, rel=0.01)


def test_a_queued_job_is_priced_from_its_start_as_a_running_job_is_aged(tmp_path) -> None:
    """The gate ages a running job from its start, start-up included; a queued job's
    expected time must include its start-up too, or the advertised wait is too low."""
    from types import SimpleNamespace

    from agent.config import parse_config
    from agent.executors import estimate_tokens
    from agent.node import Node

    cfg = parse_config({"device_id": "n1", "state_dir": str(tmp_path), "homeassistant": {"enabled": False},
                        "cpu": {"enabled": True, "executor": {"kind": "sim", "base_ms": 10, "ms_per_token": 1}}})
    node = Node(cfg)
    prompt = "word " * 400
    tokens = estimate_tokens(prompt)
    for _ in range(5):
        node.jobs.record.observe("cpu", tokens, 100, 80, 3.0)
        node.jobs.init_cost.observe("cpu", False, 2.0)
    job = SimpleNamespace(job=SimpleNamespace(mode="cpu", text_prompt=prompt, max_new_tokens=100))
    assert node.jobs.expected(job) == pytest.approx(5.0, rel=0.01), "start-up (2 s) + service (3 s)"

    clock = [100.0]
    release, began = threading.Event(), threading.Semaphore(0)

    def work(item: str, slot: int) -> None:
        began.release()
        release.wait(10)

    gate: Gate[str] = Gate(1, 2, work, expected=lambda item: node.jobs.expected(job), clock=lambda: clock[0])
    gate.start()
    try:
        gate.offer("running")
        assert began.acquire(timeout=10)
        gate.offer("queued")
        clock[0] = 101.0  # 1 s into the running job's start-up
        assert gate.backlog_s() == pytest.approx(4.0 + 5.0, rel=0.01)
    finally:
        release.set()
        assert began.acquire(timeout=10)
        gate.stop()
