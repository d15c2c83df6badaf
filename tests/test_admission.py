"""The line requests wait in past serve.max_concurrent (agent/admission.py)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from agent.admission import FULL, GONE, TIMEOUT, Admission

WAIT_S = 10.0


def waiter(adm: Admission, out: queue.Queue[tuple[int, str | None]], i: int,
           gone: Callable[[], bool] = lambda: False) -> threading.Thread:
    t = threading.Thread(target=lambda: out.put((i, adm.enter(gone))), daemon=True)
    t.start()
    return t


def test_past_the_limit_requests_wait_and_get_slots_first_come_first_served() -> None:
    adm = Admission(2, 10, 60.0, poll_s=0.01)
    assert adm.enter() is None and adm.enter() is None
    out: queue.Queue[tuple[int, str | None]] = queue.Queue()
    for i in range(3):
        waiter(adm, out, i)
        assert adm.wait_for(lambda running, waiting, n=i + 1: waiting == n, WAIT_S)  # in this order
    assert out.empty(), "nobody is admitted while both slots are held"
    for expected in range(3):
        adm.leave()
        assert out.get(timeout=WAIT_S) == (expected, None)
    assert adm.running == 2 and adm.waiting == 0, "a slot handed over is never free in between"
    adm.leave()
    adm.leave()
    assert adm.running == 0


def test_a_full_line_refuses_at_once() -> None:
    adm = Admission(1, 1, 60.0, poll_s=0.01)
    assert adm.enter() is None
    out: queue.Queue[tuple[int, str | None]] = queue.Queue()
    waiter(adm, out, 0)
    assert adm.wait_for(lambda running, waiting: waiting == 1, WAIT_S)
    assert adm.enter() == FULL
    adm.leave()
    assert out.get(timeout=WAIT_S) == (0, None)


def test_a_waiter_whose_client_left_leaves_the_line_and_takes_no_slot() -> None:
    adm = Admission(1, 5, 60.0, poll_s=0.01)
    assert adm.enter() is None
    left = threading.Event()
    out: queue.Queue[tuple[int, str | None]] = queue.Queue()
    waiter(adm, out, 0, gone=left.is_set)
    waiter(adm, out, 1)
    assert adm.wait_for(lambda running, waiting: waiting == 2, WAIT_S)
    left.set()
    assert out.get(timeout=WAIT_S) == (0, GONE)
    assert adm.waiting == 1
    adm.leave()
    assert out.get(timeout=WAIT_S) == (1, None), "the slot went to the one still waiting"


def test_a_slot_handed_over_as_the_client_leaves_is_passed_on() -> None:
    adm = Admission(1, 5, 60.0, poll_s=0.01)
    assert adm.enter() is None

    def gone() -> bool:
        adm.leave()  # the slot comes free at this very instant, to this waiter
        return True
    assert adm.enter(gone) == GONE
    assert adm.running == 0 and adm.waiting == 0, "the slot was not lost"


def test_a_waiter_gives_up_after_max_wait() -> None:
    now = [0.0]
    adm = Admission(1, 5, 30.0, clock=lambda: now[0], poll_s=0.01)
    assert adm.enter() is None
    out: queue.Queue[tuple[int, str | None]] = queue.Queue()
    waiter(adm, out, 0)
    assert adm.wait_for(lambda running, waiting: waiting == 1, WAIT_S)
    assert out.empty()
    now[0] = 30.5
    assert out.get(timeout=WAIT_S) == (0, TIMEOUT)
    assert adm.waiting == 0 and adm.running == 1
