"""The parts the node daemon is wired from, each alone: no broker, a recording publisher,
a fake clock where time matters (agent/capacity.py, jobs.py, bids.py, presence.py, fronts.py)."""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from agent.bids import Bids
from agent.bus import Message
from agent.capacity import Capacity
from agent.config import Config, ModelConfig, parse_config
from agent.errors import ExitCode, StateError
from agent.executors import Served
from agent.fronts import Fronts
from agent.jobs import Jobs
from agent.locks import CpuSlots, NpuLock
from agent.messages import (
    Accepted,
    Bid,
    BidRequest,
    Declined,
    Done,
    Job,
    Metrics,
    Snapshot,
    Token,
    TriggerRequest,
    decode_result,
)
from agent.node import _executor
from agent.presence import Presence
from agent.topics import Topics

WAIT_S = 10.0
T = Topics("p/")


class Wire:
    """Stands in for the bus: what was published, in order, and whether it is connected."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bool]] = []
        self.arrived: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.connected = True
        self.qos: dict[str, int] = {}  # the QoS each topic was last published at
        self.then: Callable[[str, bytes], None] = lambda topic, payload: None  # runs inside publish

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1) -> None:
        self.sent.append((topic, payload, retain))
        self.qos[topic] = qos
        self.arrived.put((topic, payload))
        self.then(topic, payload)

    def topics(self) -> list[str]:
        return [topic for topic, _, _ in self.sent]

    def next_on(self, topic: str) -> bytes:
        while True:
            got, payload = self.arrived.get(timeout=WAIT_S)
            if got == topic:
                return payload


def config(tmp_path: Path, **extra: Any) -> Config:
    return parse_config({"device_id": "dev", "state_dir": str(tmp_path), "topic_prefix": "p/",
                         "homeassistant": {"enabled": False},
                         "cpu": {"enabled": True, "slots": 1, "max_queue": 1,
                                 "executor": {"kind": "sim", "base_ms": 1, "ms_per_token": 0}}, **extra})


class Parts:
    """Capacity, Jobs and Bids wired as the node wires them, on a fake wire and clock."""

    def __init__(self, tmp_path: Path, *, age_s: float = 0.0, npu: Served | None = None,
                 cpu: Served | None | str = "sim"):
        self.cfg = cfg = config(tmp_path)
        self.wire = Wire()
        self.changes = 0
        self.changed = threading.Event()  # what the node hands Presence: set on every change
        self.now = [100.0]
        self.age_s = age_s
        self.capacity = Capacity(cfg.state_dir, npu, _executor(cfg, "cpu") if cpu == "sim" else cpu,  # type: ignore[arg-type]
                                 cfg.cpu.slots, on_change=self._changed)
        self.jobs = Jobs("dev", cfg.state_dir, self.capacity, T, publish=self.wire.publish, age=self._age,
                         max_queue=cfg.cpu.max_queue, job_timeout_s=60.0, half_life_jobs=20.0,
                         max_payload_bytes=cfg.max_payload_bytes, on_change=self._changed, clock=self.clock)
        self.bids = Bids("dev", self.capacity, self.jobs, T, publish=self.wire.publish, age=self._age,
                         snapshot=lambda: Metrics.from_payload(_METRICS).snapshot,
                         max_payload_bytes=cfg.max_payload_bytes, clock=self.clock)

    def clock(self) -> float:
        return self.now[0]

    def _changed(self) -> None:
        self.changes += 1
        self.changed.set()

    def _age(self, origin: str, sent_at: float, msg: Message, lifetime_s: float) -> float:
        return self.age_s

    def call(self, rid: str = "r1", **kw: Any) -> str | None:
        """Send a call for bids; the claim of the bid it got (None: no bid)."""
        bid = self.bid(rid, **kw)
        return bid.claim if bid else None

    def bid(self, rid: str = "r1", *, topic: str | None = None, origin: str = "hub", **kw: Any) -> Bid | None:
        """Send a call for bids (on ``topic``, by default its own); the bid it got, if any."""
        before = len(self.wire.sent)
        req = BidRequest(rid, origin, 30.0, 3, 8, **kw)
        self.bids.on_bid_request(Message(topic or T.bid_request(rid), req.to_payload()))
        reply = T.bid_reply(origin, rid, "dev")
        bids = [Bid.from_payload(p) for topic, p, _ in self.wire.sent[before:] if topic == reply]
        return bids[0] if bids else None

    def job(self, rid: str, claim: str, **kw: Any) -> Job:
        job = Job(rid, "hub", "cpu", claim, "hello there", 4, 3.0, 60.0, f"p/result/hub/{rid}", **kw)
        self.jobs.on_job(Message(T.exec("dev"), job.to_payload()))
        return job

    def results(self, rid: str) -> list[Any]:
        return [decode_result(p) for topic, p, _ in self.wire.sent if topic == T.result("hub", rid, "dev")]


_METRICS = Metrics("dev", 1.0, Snapshot(False, False, 1, 0.0, 1000.0, 0.0, 0)).to_payload()


# ---------------------------------------------------------------- capacity
def test_capacity_says_why_it_takes_no_work(tmp_path: Path) -> None:
    changes: list[int] = []
    cfg = config(tmp_path)
    cap = Capacity(cfg.state_dir, None, _executor(cfg, "cpu"), 2, on_change=lambda: changes.append(1))
    assert cap.taking_work and cap.health_word() == "ok" and cap.slots == 2
    cap.unhealthy("disk full")
    assert not cap.taking_work and cap.health_word() == "disk full" and changes

    def refused() -> None:
        raise StateError(tmp_path, "still full")
    cap.check_health(refused)
    assert cap.health.endswith("still full"), "what the journal could not write keeps it unhealthy"
    cap.check_health(lambda: None)
    assert cap.taking_work and cap.health_word() == "ok"
    cap.drain()
    assert not cap.taking_work and cap.health_word() == "draining"


def test_capacity_without_cpu_has_no_slots_and_no_npu(tmp_path: Path) -> None:
    cap = Capacity(tmp_path, None, None, 4)
    assert cap.slots == 0 and not cap.npu_free() and cap.engines_down() is None and not cap.simulated


class Engine:
    """An executor's outside, for Capacity: whether its model server is down, and whether a
    connect would find it back (``Served.back``: an executor that is up is back at once)."""

    def __init__(self, name: str, *, down: str | None = None, reachable: bool = False, simulated: bool = False):
        self.name = name
        self.down = down
        self.reachable = reachable
        if simulated:  # a real executor has no such attribute: only the simulated one says so
            self.simulated = True
        self.asked = 0

    def back(self) -> bool:
        self.asked += 1
        if self.down is not None and self.reachable:
            self.down = None
        return self.down is None


def test_capacity_offers_the_npu_only_while_it_is_free_up_and_not_ours(tmp_path: Path) -> None:
    npu, cpu = Engine("npu", simulated=True), Engine("cpu")
    cap = Capacity(tmp_path, npu, cpu, 2)  # type: ignore[arg-type]
    assert cap.executor("npu") is npu and cap.executor("cpu") is cpu and cap.executors == [npu, cpu]
    assert cap.simulated, "one simulated executor makes the node simulated"
    assert cap.npu_free()
    cap.npu_busy_here = True
    assert not cap.npu_free(), "a job of ours holds it"
    cap.npu_busy_here = False
    claim = NpuLock(tmp_path).try_acquire(owner="another process")
    assert claim is not None
    assert not cap.npu_free(), "another process of this device holds its flock"
    claim.release()
    assert cap.npu_free()
    npu.down = "refused"
    assert not cap.npu_free(), "its model server is down"


def test_capacity_is_out_of_engines_only_when_every_one_is_down(tmp_path: Path) -> None:
    npu, cpu = Engine("npu"), Engine("cpu")
    cap = Capacity(tmp_path, npu, cpu, 1)  # type: ignore[arg-type]
    assert cap.engines_down() is None and not cap.any_engine_down()
    assert not cap.retry_engines() and npu.asked == cpu.asked == 0, "nothing is down: nothing to try"
    npu.down = "npu gone"
    assert cap.engines_down() is None and cap.any_engine_down() and cap.health_word() == "ok"
    cpu.down = "cpu gone"
    assert cap.engines_down() == "model server down: npu gone; cpu gone"
    assert cap.health_word() == "model server down: npu gone; cpu gone"
    assert not cap.retry_engines(), "neither came back"
    cpu.reachable = True
    assert cap.retry_engines() and cpu.down is None and npu.down == "npu gone"
    assert cap.engines_down() is None


def test_capacity_health_word_puts_the_disk_before_draining_before_the_engines(tmp_path: Path) -> None:
    cpu = Engine("cpu", down="gone")
    cap = Capacity(tmp_path, None, cpu, 1)  # type: ignore[arg-type]
    assert not cap.simulated
    cap.drain()
    assert cap.health_word() == "draining"
    cap.unhealthy("disk full")
    assert cap.health_word() == "disk full"


def test_capacity_logs_the_first_reason_it_stops_taking_work_once(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    changes: list[int] = []
    cap = Capacity(tmp_path, None, None, 0, on_change=lambda: changes.append(1))
    with caplog.at_level("INFO", logger="agent.node"):
        cap.unhealthy("disk full")
        cap.unhealthy("still full")
        cap.check_health(lambda: None)
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        "not taking work until this is fixed: disk full"]
    assert len(changes) == 3 and cap.health == "ok"


# ---------------------------------------------------------------- bids
def test_a_bid_goes_to_the_origin_with_a_claim_and_none_while_draining(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    claim = parts.call("r1")
    assert claim, "a node that takes work bids"
    assert parts.wire.qos[T.bid_reply("hub", "r1", "dev")] == 0, "a late bid is useless: QoS 0"
    assert parts.call("r1") == claim, "asked again: the same claim"
    parts.capacity.drain()
    assert parts.call("r2") is None, "a draining node sits auctions out"


def test_no_bid_once_the_window_closed_or_for_a_retained_call(tmp_path: Path) -> None:
    parts = Parts(tmp_path, age_s=31.0)
    assert parts.call("late") is None
    parts.age_s = 0.0
    req = BidRequest("kept", "hub", 30.0, 3, 8)
    parts.bids.on_bid_request(Message(T.bid_request("kept"), req.to_payload(), retain=True))
    assert not parts.wire.sent


def test_no_bid_for_a_model_this_device_does_not_serve(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    assert parts.call("m", model="some-other-model") is None


def served(tmp_path: Path, model: str = "default", *, tools: bool = False) -> Served:
    """A simulated executor serving ``model``, with or without tools."""
    base = _executor(config(tmp_path), "cpu")
    assert base is not None
    return Served(base.inner, ModelConfig(name=model, tools=tools))


def test_a_call_whose_topic_disagrees_with_its_payload_gets_no_bid(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    assert parts.bid("r1", topic=T.bid_request("r1", "hub")), "the topic may name the caller"
    assert parts.bid("r2", topic=T.bid_request("other")) is None, "another rid in the topic"
    assert parts.bid("r3", topic=T.bid_request("r3", "mallory")) is None, "another caller in the topic"


def test_no_bid_while_unhealthy_or_with_every_model_server_down(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    cpu = parts.capacity.cpu
    assert cpu is not None
    cpu.down = "refused"
    assert parts.call("down") is None
    cpu.down = None
    parts.capacity.unhealthy("disk full")
    assert parts.call("sick") is None


def test_a_call_whose_window_closes_just_now_still_gets_a_bid(tmp_path: Path) -> None:
    assert Parts(tmp_path, age_s=30.0).call("edge"), "age == window_s: still open"


def test_a_bid_needs_an_executor_that_serves_the_model_and_its_tools(tmp_path: Path) -> None:
    cpu_only = Parts(tmp_path / "c", cpu=served(tmp_path, "m"))
    assert cpu_only.call("any", model="m")
    assert cpu_only.call("npu", model="m", need="npu") is None, "a CPU cannot take an NPU-only job"
    assert cpu_only.call("tools", model="m", tools=True) is None, "its executor cannot call tools"
    cpu_tools = Parts(tmp_path / "t", cpu=served(tmp_path, "m", tools=True))
    assert cpu_tools.call("tools", model="m", tools=True)
    npu_only = Parts(tmp_path / "n", npu=served(tmp_path, "m"), cpu=None)
    assert npu_only.call("any", model="m") and npu_only.call("npu", model="m", need="npu")
    assert npu_only.call("other", model="x") is None
    assert npu_only.call("tools", model="m", tools=True) is None
    npu_tools = Parts(tmp_path / "nt", npu=served(tmp_path, "m", tools=True), cpu=None)
    assert npu_tools.call("tools", model="m", tools=True, need="npu")


def test_no_bid_for_a_cpu_without_slots(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    parts.capacity.slots = 0
    assert parts.call("none") is None


def test_no_bid_over_the_callers_share_or_for_a_rid_another_origin_called(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    assert parts.bid("taken", origin="elsewhere")
    assert parts.call("taken") is None, "that rid is another caller's"
    parts.jobs.ledger.offer = lambda rid, origin, now: None  # type: ignore[method-assign]
    assert parts.call("over") is None


def test_a_bid_carries_the_cpu_estimate_rounded_and_none_without_a_usable_cpu(tmp_path: Path) -> None:
    asked: list[tuple[Any, ...]] = []
    both = Parts(tmp_path / "b", npu=served(tmp_path, "m", tools=True), cpu=served(tmp_path, "m"))
    both.jobs.record.estimate = lambda *a: (asked.append(a), (1.234567, 2.34567))[1]  # type: ignore[method-assign]
    both.jobs.init_cost.expected = lambda *a: (asked.append(a), 0.1234567)[1]  # type: ignore[method-assign]
    bid = both.bid("r", model="m")
    assert bid and (bid.service_s, bid.service_n, bid.init_s) == (1.2346, 2.35, 0.1235)
    assert asked == [("cpu", 3, 8), ("cpu", False, 3)]
    asked.clear()
    bid = both.bid("t", model="m", tools=True)  # the NPU can call tools, the CPU cannot
    assert bid and (bid.service_s, bid.service_n, bid.init_s) == (None, 0.0, 0.0) and not asked
    assert both.capacity.cpu is not None
    both.capacity.cpu.down = "refused"
    bid = both.bid("d", model="m")
    assert bid and bid.service_s is None and not asked
    npu_only = Parts(tmp_path / "n", npu=served(tmp_path, "m"), cpu=None)
    bid = npu_only.bid("n", model="m")
    assert bid and bid.service_s is None and bid.init_s == 0.0


# ---------------------------------------------------------------- jobs
def test_a_job_with_its_claim_is_accepted_run_and_journalled(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    parts.jobs.gate.start()
    try:
        claim = parts.call("r1")
        assert claim
        job = parts.job("r1", claim)
        done = decode_result(parts.wire.next_on(T.result("hub", "r1", "dev")))
        assert isinstance(done, Accepted)
        while not isinstance(done, Done):
            done = decode_result(parts.wire.next_on(T.result("hub", "r1", "dev")))
        assert done.text and done.digest == job.digest
        assert parts.jobs.gate.wait_idle(WAIT_S)
        assert parts.jobs.journal.get("r1") is not None, "the final event is recorded for a redelivery"
    finally:
        parts.jobs.stop()


def test_a_copy_that_arrives_as_the_answer_goes_out_gets_the_answer(tmp_path: Path) -> None:
    """The copy arrives inside the final event's publish, before the journal records it: it
    gets that event again, not an ``accepted`` for a stream that has ended."""
    parts = Parts(tmp_path)
    claim = parts.call("r1")
    assert claim
    copy = Job("r1", "hub", "cpu", claim, "hello there", 4, 3.0, 60.0, "p/result/hub/r1")

    def redeliver(topic: str, payload: bytes) -> None:
        if isinstance(decode_result(payload), Done) and parts.jobs.journal.get("r1") is None:
            parts.wire.then = lambda topic, payload: None
            parts.jobs.on_job(Message(T.exec("dev"), copy.to_payload()))
    parts.wire.then = redeliver
    parts.jobs.gate.start()
    try:
        parts.jobs.on_job(Message(T.exec("dev"), copy.to_payload()))
        assert parts.jobs.gate.wait_idle(WAIT_S)
        kinds = [type(event).__name__ for event in parts.results("r1") if not isinstance(event, Token)]
        assert kinds == ["Accepted", "Done", "Done"], kinds
        first, again = (p for topic, p, _ in parts.wire.sent if topic == T.result("hub", "r1", "dev")
                        and isinstance(decode_result(p), Done))
        assert again == first, "the same answer, byte for byte"
    finally:
        parts.jobs.stop()


def test_a_job_is_declined_with_the_reason(tmp_path: Path) -> None:
    parts = Parts(tmp_path)  # the gate is not started: admitted jobs wait in its line
    first, second, third = parts.call("a"), parts.call("b"), parts.call("c")
    assert first and second and third
    parts.job("a", first)
    parts.job("b", second)          # one slot and one place in the line: both fit
    parts.job("c", third)
    (declined,) = parts.results("c")
    assert isinstance(declined, Declined) and declined.reason == "queue_full"
    parts.capacity.drain()
    fourth = parts.jobs.ledger.offer("d", "hub", 0.0)
    assert fourth
    parts.job("d", fourth)
    (declined,) = parts.results("d")
    assert isinstance(declined, Declined) and declined.reason == "draining"


def test_a_job_for_an_unserved_model_or_the_npu_here_is_declined(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    claim = parts.jobs.ledger.offer("n", "hub", 0.0)
    assert claim
    job = Job("n", "hub", "npu", claim, "x", 4, 3.0, 60.0, "p/result/hub/n")
    parts.jobs.on_job(Message(T.exec("dev"), job.to_payload()))
    (declined,) = parts.results("n")
    assert isinstance(declined, Declined) and declined.reason == "no_npu"


def test_a_job_past_its_deadline_in_the_line_fails_without_running(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    claim = parts.call("old")
    assert claim
    parts.job("old", claim)
    (run,) = parts.jobs.ledger.running()
    parts.now[0] += 61.0  # the fake clock passes the node's job_timeout_s while it waits
    ran: list[str] = []
    executor = parts.capacity.cpu
    assert executor is not None
    executor.run = lambda prompt, *args: ran.append(prompt)  # type: ignore[method-assign]
    parts.jobs.execute(run, None)
    kinds = [type(e).__name__ for e in parts.results("old")]
    assert kinds == ["Accepted", "Error"], kinds
    assert not ran and parts.results("old")[1].kind == "timeout"
    assert parts.jobs.journal.get("old") is not None


def test_a_job_is_cancelled_only_with_its_key(tmp_path: Path) -> None:
    from agent.messages import Cancel, cancel_check
    parts = Parts(tmp_path)
    claim = parts.call("r")
    assert claim
    parts.job("r", claim, cancel_check=cancel_check("secret"))
    (run,) = parts.jobs.ledger.running()
    parts.jobs.on_cancel(Message(T.cancel("dev", "hub"), Cancel("r", "hub", "guess").to_payload()))
    assert not run.cancel.is_set(), "someone without the key cannot stop it"
    parts.jobs.on_cancel(Message(T.cancel("dev", "other"), Cancel("r", "hub", "secret").to_payload()))
    assert not run.cancel.is_set(), "a cancel whose topic names another origin is dropped"
    parts.jobs.on_cancel(Message(T.cancel("dev", "hub"), Cancel("r", "hub", "secret").to_payload()))
    assert run.cancel.is_set()


class Engine2:
    """A CPU or NPU executor whose run the test scripts: the Result it returns (or the
    error it raises), and what it was asked."""

    def __init__(self, parts: Parts, *, result: Any = None, takes: float = 0.0):
        self.parts, self.result, self.takes = parts, result, takes
        self.calls: list[tuple[str, Any, str]] = []

    def __call__(self, prompt: str, params: Any, on_token: Any, cancel: Any) -> Any:
        thread = threading.current_thread()
        self.calls.append((prompt, params, thread.name + (" (daemon)" if thread.daemon else "")))
        self.parts.now[0] += self.takes
        if isinstance(self.result, Exception):
            raise self.result
        on_token("he")
        return self.result


def finished(text: str = "hello", *, init_ms: float = 500.0, total_ms: float = 2500.0) -> Any:
    from agent.executors import Result
    from agent.messages import Timings
    return Result(text, Timings(init_ms=init_ms, total_ms=total_ms), 4, 7)


def test_a_job_runs_with_its_deadline_and_reports_its_time_in_the_line(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    cpu = parts.capacity.cpu
    assert cpu is not None
    engine = Engine2(parts, result=finished())
    cpu.run = engine  # type: ignore[method-assign]
    observed: list[tuple[Any, ...]] = []
    parts.jobs.init_cost.observe = lambda *a: observed.append(("init", *a))  # type: ignore[method-assign]
    parts.jobs.record.observe = lambda *a: observed.append(("work", *a))  # type: ignore[method-assign]
    claim = parts.call("r1")
    assert claim
    job = Job("r1", "hub", "cpu", claim, "hello there", 4, 3.0, 30.0, "p/result/hub/r1")
    parts.age_s = 2.0
    parts.jobs.on_job(Message(T.exec("dev"), job.to_payload()))
    (run,) = parts.jobs.ledger.running()
    assert run.deadline == 100.0 + 30.0 - 2.0, "its own timeout, less its age"
    assert run.accepted.queue_position == 0
    parts.now[0] += 2.0  # two seconds in the line
    parts.jobs.execute(run, 0)
    (prompt, params, _), = engine.calls
    assert prompt == "hello there" and params.timeout_s == 26.0 and params.max_new_tokens == 4
    assert len(params.hold_fds) == 1, "the slot's lock is held by whatever runs the model"
    assert CpuSlots(tmp_path, 1).try_acquire() is not None, "and released after the run"
    events = parts.results("r1")
    assert [type(e).__name__ for e in events] == ["Accepted", "Token", "Done"]
    done = events[-1]
    assert done.timings.queue_ms == 2000.0 and done.timings.total_ms == 4500.0
    assert run.fsm.state == "done"
    recorded = parts.jobs.journal.get("r1")
    assert recorded is not None and decode_result(recorded.payload) == done
    assert observed == [("init", "cpu", False, 0.5, 3), ("work", "cpu", 3, 4, 7, 2.0)], "start-up apart from the work"


def test_a_job_is_never_given_longer_than_the_nodes_own_timeout(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    claim = parts.call("long")
    assert claim
    parts.job("long", claim)  # asks for 60 s; the node allows 60
    job = Job("longer", "hub", "cpu", parts.call("longer") or "", "x", 4, 3.0, 600.0, "p/result/hub/longer")
    parts.jobs.on_job(Message(T.exec("dev"), job.to_payload()))
    assert sorted(r.deadline for r in parts.jobs.ledger.running()) == [160.0, 160.0]


def test_a_job_at_its_deadline_fails_and_a_cancelled_one_never_starts(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    cpu = parts.capacity.cpu
    assert cpu is not None
    engine = Engine2(parts, result=finished())
    cpu.run = engine  # type: ignore[method-assign]
    claim = parts.call("edge")
    assert claim
    parts.job("edge", claim)
    (run,) = parts.jobs.ledger.running()
    parts.now[0] = run.deadline  # not a moment left
    parts.jobs.execute(run, None)
    assert parts.results("edge")[-1].kind == "timeout" and not engine.calls and run.fsm.state == "failed"
    claim = parts.call("half")
    assert claim
    parts.job("half", claim)
    (run,) = parts.jobs.ledger.running()
    parts.now[0] = run.deadline - 0.5  # half a second is enough to start
    parts.jobs.execute(run, None)
    assert engine.calls[-1][1].timeout_s == 0.5 and run.fsm.state == "done"
    parts = Parts(tmp_path / "s")  # a fresh line: the two above still sit in the unstarted gate's
    assert parts.capacity.cpu is not None
    engine = Engine2(parts, result=finished())
    parts.capacity.cpu.run = engine  # type: ignore[method-assign]
    claim = parts.call("stop")
    assert claim
    parts.job("stop", claim)
    (run,) = parts.jobs.ledger.running()
    run.cancel.set()
    parts.jobs.execute(run, None)
    last = parts.results("stop")[-1]
    assert last.kind == "cancelled" and not engine.calls and run.fsm.state == "failed"


def test_a_failed_or_crashed_run_is_reported_journalled_and_marked_failed(tmp_path: Path) -> None:
    from agent.errors import ExecutorError
    parts = Parts(tmp_path)
    cpu = parts.capacity.cpu
    assert cpu is not None
    for rid, error in (("e", ExecutorError("sim", "engine said no")), ("c", RuntimeError("bug"))):
        cpu.run = Engine2(parts, result=error)  # type: ignore[method-assign]
        claim = parts.call(rid)
        assert claim
        parts.job(rid, claim)
        (run,) = parts.jobs.ledger.running()
        parts.jobs.execute(run, None)
        last = parts.results(rid)[-1]
        assert type(last).__name__ == "Error" and run.fsm.state == "failed"
        recorded = parts.jobs.journal.get(rid)
        assert recorded is not None and decode_result(recorded.payload) == last
    assert "internal error: bug" in parts.results("c")[-1].reason


def test_a_journal_that_cannot_write_makes_the_node_unhealthy(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    cpu = parts.capacity.cpu
    assert cpu is not None
    cpu.run = Engine2(parts, result=finished())  # type: ignore[method-assign]

    def full(*args: Any) -> None:
        raise StateError(tmp_path, "disk full")
    parts.jobs.journal.record = full  # type: ignore[method-assign]
    claim = parts.call("j")
    assert claim
    parts.job("j", claim)
    (run,) = parts.jobs.ledger.running()
    parts.jobs.execute(run, None)
    assert parts.capacity.health.endswith("disk full") and not parts.jobs.ledger.running()


def test_jobs_are_declined_with_the_reason_that_applies(tmp_path: Path) -> None:
    parts = Parts(tmp_path, cpu=served(tmp_path, "m"))
    cpu = parts.capacity.cpu
    assert cpu is not None

    def reason(rid: str, **kw: Any) -> str:
        claim = parts.jobs.ledger.offer(rid, "hub", 0.0)
        assert claim
        parts.job(rid, claim, **kw)
        (declined,) = parts.results(rid)
        assert isinstance(declined, Declined), declined
        return declined.reason
    from agent.messages import Chat
    assert reason("other", model="x") == "model_not_served: x"
    chat = Chat.from_obj({"messages": [{"role": "user", "content": "hi"}],
                          "tools": [{"type": "function", "function": {"name": "f"}}]}, "job", 10_000)
    assert reason("tools", model="m", chat=chat) == "no_tools: this device's executor cannot call tools"
    cpu.down = "refused"
    assert reason("down", model="m") == "model_server_down"
    cpu.down = None
    parts.capacity.unhealthy("disk full")
    assert reason("sick", model="m") == "unhealthy"
    no_cpu = Parts(tmp_path / "n", cpu=None)
    claim = no_cpu.jobs.ledger.offer("c", "hub", 0.0)
    assert claim
    no_cpu.job("c", claim)
    assert no_cpu.results("c")[0].reason == "no_cpu"


def test_an_npu_job_claims_the_npu_and_runs_on_the_npus_thread(tmp_path: Path) -> None:
    npu = served(tmp_path)
    parts = Parts(tmp_path, npu=npu)
    parts.jobs.start()
    done = threading.Event()
    engine = Engine2(parts, result=finished())
    busy_while_running: list[bool] = []

    def run(*args: Any) -> Any:
        busy_while_running.append(parts.capacity.npu_busy_here and not parts.capacity.npu_free())
        try:
            return engine(*args)
        finally:
            done.set()
    npu.run = run  # type: ignore[method-assign]
    over, finish = threading.Event(), parts.jobs.ledger.finish
    parts.jobs.ledger.finish = lambda run, ok: (finish(run, ok), over.set())  # type: ignore[method-assign]
    try:
        claim = parts.jobs.ledger.offer("npujob-123", "hub", 0.0)
        assert claim
        job = Job("npujob-123", "hub", "npu", claim, "hi", 4, 3.0, 60.0, "p/result/hub/npujob-123")
        parts.jobs.on_job(Message(T.exec("dev"), job.to_payload()))
        assert done.wait(WAIT_S) and over.wait(WAIT_S)
        accepted = parts.results("npujob-123")[0]
        assert isinstance(accepted, Accepted) and accepted.queue_position == 0
        assert busy_while_running == [True]
        assert engine.calls[0][2] == "npu-0 (daemon)", "a job never keeps a stopping daemon alive"
        assert engine.calls[0][1].hold_fds
        assert not parts.capacity.npu_busy_here and parts.capacity.npu_free(), "released after the run"
        held = NpuLock(tmp_path).try_acquire("another process")
        assert held is not None
        claim = parts.jobs.ledger.offer("second", "hub", 0.0)
        assert claim
        job = Job("second", "hub", "npu", claim, "hi", 4, 3.0, 60.0, "p/result/hub/second")
        parts.jobs.on_job(Message(T.exec("dev"), job.to_payload()))
        held.release()
        assert parts.results("second")[0].reason == "npu_busy"
    finally:
        parts.jobs.stop()


def test_the_next_npu_job_waits_for_the_last_ones_bookkeeping_not_for_a_thread(tmp_path: Path) -> None:
    """The NPU is free once its job has run; that job's journal write (an fsync) may still
    be going on: the next job is accepted and queued behind it, then runs."""
    npu = served(tmp_path)
    parts = Parts(tmp_path, npu=npu)
    parts.jobs.start()
    npu.run = Engine2(parts, result=finished())  # type: ignore[method-assign]
    journalling, release = threading.Event(), threading.Event()
    record = parts.jobs.journal.record

    def slow_record(rid: str, digest: str, payload: bytes) -> None:
        if rid == "first-npu":
            journalling.set()
            release.wait(WAIT_S)
        record(rid, digest, payload)
    parts.jobs.journal.record = slow_record  # type: ignore[method-assign]
    try:
        for rid in ("first-npu", "second-npu"):
            claim = parts.jobs.ledger.offer(rid, "hub", 0.0)
            assert claim
            parts.jobs.on_job(Message(T.exec("dev"), Job(rid, "hub", "npu", claim, "hi", 4, 3.0, 60.0,
                                                          f"p/result/hub/{rid}").to_payload()))
            if rid == "first-npu":
                assert journalling.wait(WAIT_S), "the first has run and is being journalled"
        assert isinstance(parts.results("second-npu")[0], Accepted), "the NPU was free: accepted"
        release.set()
        assert parts.jobs.npu_gate.wait_idle(WAIT_S)
        assert isinstance(parts.results("second-npu")[-1], Done), "and run after the first's bookkeeping"
    finally:
        release.set()
        parts.jobs.stop()


@pytest.mark.parametrize("mode", ["cpu", "npu"])
def test_on_job_never_waits_for_a_job_to_run(tmp_path: Path, mode: str) -> None:
    """on_job runs on paho's network thread: it queues the job and returns while the job
    runs (here: an executor that does not return until the test lets it)."""
    npu = served(tmp_path)
    parts = Parts(tmp_path, npu=npu)
    parts.jobs.start()
    running, release = threading.Event(), threading.Event()

    def blocked(*args: Any) -> Any:
        running.set()
        release.wait(WAIT_S)
        return finished()
    executor = parts.capacity.executor(mode)
    assert executor is not None
    executor.run = blocked  # type: ignore[method-assign]
    returned = threading.Event()
    try:
        claim = parts.call("r1") if mode == "cpu" else parts.jobs.ledger.offer("r1", "hub", 0.0)
        assert claim
        job = Job("r1", "hub", mode, claim, "hello there", 4, 3.0, 60.0, "p/result/hub/r1")
        network = threading.Thread(target=lambda: (parts.jobs.on_job(Message(T.exec("dev"), job.to_payload())),
                                                   returned.set()), name="network")
        network.start()
        assert running.wait(WAIT_S)
        assert returned.wait(WAIT_S), "on_job waited for the job"
        assert not release.is_set()
        assert isinstance(parts.results("r1")[0], Accepted)
    finally:
        release.set()
        parts.jobs.stop()


def test_the_expected_time_of_a_job_counts_a_cold_start_only_for_a_cold_executor(tmp_path: Path) -> None:
    from agent.servicemodel import job_seconds
    parts = Parts(tmp_path)
    parts.jobs.init_cost.observe("cpu", False, 5.0)
    parts.jobs.init_cost.observe("npu", False, 5.0)
    claim = parts.call("q")
    assert claim
    parts.job("q", claim)
    (run,) = parts.jobs.ledger.running()
    cold = job_seconds(parts.jobs.record, parts.jobs.init_cost, "cpu", 3, 4, warm=False)
    assert parts.jobs.expected(run) == cold and cold > 5.0
    npu_run = replace(run, job=replace(run.job, mode="npu"))
    warm = job_seconds(parts.jobs.record, parts.jobs.init_cost, "npu", 3, 4, warm=True)
    assert parts.jobs.expected(npu_run) == warm and warm < cold - 4.0, "no NPU here: taken as warm"


def test_a_retained_job_is_dropped(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    claim = parts.call("kept")
    assert claim
    job = Job("kept", "hub", "cpu", claim, "x", 4, 3.0, 60.0, "p/result/hub/kept")
    parts.jobs.on_job(Message(T.exec("dev"), job.to_payload(), retain=True))
    assert not parts.results("kept") and not parts.jobs.ledger.running()


def test_a_cancel_is_logged_for_what_it_did(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from agent.messages import Cancel, cancel_check
    parts = Parts(tmp_path)
    claim = parts.call("r")
    assert claim
    parts.job("r", claim, cancel_check=cancel_check("secret"))
    with caplog.at_level("INFO", logger="agent.node"):
        parts.jobs.on_cancel(Message(T.cancel("dev", "hub"), Cancel("r", "hub", "guess").to_payload()))
        assert [r.levelname for r in caplog.records] == ["WARNING"]
        caplog.clear()
        parts.jobs.on_cancel(Message(T.cancel("dev", "hub"), Cancel("r", "hub", "secret").to_payload()))
        assert [r.getMessage() for r in caplog.records] == ["job r cancelled by hub (no reason); stopping it"]
        (run,) = parts.jobs.ledger.running()
        parts.jobs.execute(run, None)  # it never starts, and is forgotten
        caplog.clear()
        parts.jobs.on_cancel(Message(T.cancel("dev", "hub"), Cancel("r", "hub", "secret").to_payload()))
        assert [r.getMessage() for r in caplog.records] == ["job r cancelled by hub (no reason)"]


# ---------------------------------------------------------------- presence
def test_presence_sends_metrics_before_online_and_again_when_asked(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    changed, stop = threading.Event(), threading.Event()
    presence = Presence(parts.cfg, parts.capacity, parts.jobs, T, parts.wire, changed=changed, stop=stop,
                        wall=lambda: 1234.56789)
    presence.on_connect(False)
    assert parts.wire.topics()[:2] == [T.metrics("dev"), T.availability("dev")]
    metrics = Metrics.from_payload(parts.wire.sent[0][1])
    assert metrics.ts == 1234.568 and metrics.health == "ok" and metrics.snapshot.cpu_slots == 1
    presence.on_presence_query(Message(T.presence("dev"), b""))
    assert not changed.is_set(), "its own query is not a reason"
    presence.on_presence_query(Message(T.presence("other"), b""))
    assert changed.is_set()


def test_presence_metrics_say_draining(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    presence = Presence(parts.cfg, parts.capacity, parts.jobs, T, parts.wire, changed=threading.Event(),
                        stop=threading.Event())
    parts.capacity.drain()
    presence.publish_metrics()
    assert Metrics.from_payload(parts.wire.sent[-1][1]).health == "draining"


def test_the_loop_publishes_at_once_then_on_a_change_and_retries_the_disk(tmp_path: Path) -> None:
    """A fake clock that stands still: only a change (or the health retry) makes it publish."""
    parts = Parts(tmp_path)
    changed, stop = parts.changed, threading.Event()
    presence = Presence(parts.cfg, parts.capacity, parts.jobs, T, parts.wire, changed=changed, stop=stop,
                        clock=lambda: 50.0)
    parts.capacity.unhealthy("disk gone")  # the first look at the disk finds it writable again
    loop = threading.Thread(target=presence.loop, name="metrics-under-test", daemon=True)
    loop.start()
    try:
        first = Metrics.from_payload(parts.wire.next_on(T.metrics("dev")))
        assert first.health in ("ok", "disk gone")
        while first.health != "ok":  # the retry found the disk writable: published at once
            first = Metrics.from_payload(parts.wire.next_on(T.metrics("dev")))
        parts.capacity.drain()  # sets ``changed``: the health differs, so it goes out now
        while Metrics.from_payload(parts.wire.next_on(T.metrics("dev"))).health != "draining":
            pass
    finally:
        stop.set()
        changed.set()
        loop.join(WAIT_S)
    assert not loop.is_alive(), "a stop ends the loop"


class Ticks(threading.Event):
    """``changed`` for a loop run on the test's own thread: each wait moves the fake clock
    on by the timeout asked (or by what ``script`` says for that wait, after which ``poke``
    runs), and the ``steps``-th wait stops the loop. Nothing sleeps."""

    def __init__(self, now: list[float], stop: threading.Event, steps: int,
                 script: dict[int, tuple[float, Any]] | None = None):
        super().__init__()
        self.now, self.stop, self.steps, self.script = now, stop, steps, script or {}
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        assert timeout is not None and timeout >= 0
        self.waits.append(round(timeout, 6))
        advance, poke = self.script.get(len(self.waits), (timeout, None))
        self.now[0] += advance
        if poke is not None:
            poke(self)
        if len(self.waits) >= self.steps:
            self.stop.set()
        return self.is_set()


def run_loop(parts: Parts, steps: int, script: dict[int, tuple[float, Any]] | None = None, *,
             large: bool = False) -> tuple[Ticks, list[float]]:
    """Run the presence loop for ``steps`` waits (``large``: in a fleet past
    ``auction.invite.above``); the waits and when metrics went out."""
    now, stop = parts.now, threading.Event()
    now[0] = 0.0
    ticks = Ticks(now, stop, steps, script)
    sent_at: list[float] = []

    class Link:
        connected = True

        def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
            parts.wire.publish(topic, payload, retain=retain)
            if topic == T.metrics("dev"):
                sent_at.append(round(now[0], 6))
    parts.link = Link()  # type: ignore[attr-defined]
    presence = Presence(parts.cfg, parts.capacity, parts.jobs, T, parts.link,  # type: ignore[attr-defined]
                        changed=ticks, stop=stop, clock=lambda: now[0], sample=quiet_host, large=lambda: large)
    parts.presence = presence  # type: ignore[attr-defined]
    presence.loop()
    return ticks, sent_at


def job_changed(changed: threading.Event) -> None:
    """A job changed state (what Jobs tells the node)."""
    changed.set()


def quiet_host() -> Any:
    from agent.metrics import HostSample
    return HostSample(0.0, 1000.0, 0.0, None, False)


def test_the_loop_publishes_on_its_interval_and_leaves_a_healthy_disk_alone(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    flushes: list[int] = []
    parts.jobs.journal.flush = lambda: flushes.append(1)  # type: ignore[method-assign]
    ticks, sent_at = run_loop(parts, 3)
    assert ticks.waits == [10.0, 10.0, 10.0] and sent_at == [0.0, 10.0, 20.0]
    assert not flushes and parts.changes == 0


def test_the_loop_publishes_a_job_change_once_the_gap_has_passed(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    # 0.05 s after the first publish a job changes state: the metrics wait for the gap.
    ticks, sent_at = run_loop(parts, 3, {1: (0.05, job_changed)})
    assert ticks.waits[:2] == [10.0, 0.15] and sent_at[:2] == [0.0, 0.2]
    assert ticks.waits[2] == 10.0, "published: back to the interval"


def test_the_loop_retries_an_unwritable_disk_every_few_seconds(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    tries: list[float] = []

    def refused() -> None:
        tries.append(1)
        raise StateError(tmp_path, "still full")
    parts.jobs.journal.flush = refused  # type: ignore[method-assign]
    parts.capacity.unhealthy("disk full")
    ticks, _ = run_loop(parts, 3)
    assert ticks.waits == [5.0, 5.0, 5.0] and len(tries) == 3
    tries.clear()
    ticks, _ = run_loop(parts, 3, {1: (1.0, job_changed)})  # a wake-up a second in: no retry then
    assert ticks.waits == [5.0, 5.0, 5.0] and len(tries) == 2


def test_the_loop_retries_a_model_server_each_second_and_says_when_it_is_back(tmp_path: Path) -> None:
    parts = Parts(tmp_path, npu=served(tmp_path))
    cpu = parts.capacity.cpu
    assert cpu is not None
    cpu.down = "refused"
    asked: list[float] = []

    def back() -> bool:
        asked.append(round(parts.now[0], 6))
        if len(asked) == 3:
            cpu.down = None
        return cpu.down is None
    cpu.back = back  # type: ignore[method-assign]
    # The NPU is polled every 0.5 s; a job changes state at 0.1 s: no retry in between.
    ticks, sent_at = run_loop(parts, 7, {1: (0.1, job_changed)})
    assert ticks.waits == [0.5, 0.1, 0.5, 0.3, 0.5, 0.5, 0.5], ticks.waits
    assert asked == [0.0, 1.0, 2.0] and cpu.down is None
    assert sent_at == [0.0, 0.2, 2.0], "back: its metrics go out at once, though the NPU and the health did not change"


def test_the_loop_polls_the_npu_and_publishes_at_once_when_another_process_takes_it(tmp_path: Path) -> None:
    parts = Parts(tmp_path, npu=served(tmp_path))
    claims: list[Any] = []
    ticks, sent_at = run_loop(parts, 3, {1: (0.5, lambda _: claims.append(NpuLock(tmp_path).try_acquire("other")))})
    assert ticks.waits == [0.5, 0.5, 0.5] and sent_at == [0.0, 0.5]
    assert Metrics.from_payload(parts.wire.sent[-1][1]).snapshot.npu_free is False
    claims[0].release()


def test_a_job_change_while_disconnected_waits_for_the_interval_after_a_reconnect(tmp_path: Path) -> None:
    parts = Parts(tmp_path)

    def drop(ticks: Ticks) -> None:
        parts.link.connected = False  # type: ignore[attr-defined]
        ticks.set()

    def back(ticks: Ticks) -> None:
        parts.link.connected = True  # type: ignore[attr-defined]
    _, sent_at = run_loop(parts, 4, {1: (1.0, drop), 2: (1.0, back)})
    assert sent_at == [0.0, 10.0], "the change was forgotten with the connection"


def test_a_model_going_cold_is_sent_when_it_happens_not_at_the_next_refresh(tmp_path: Path) -> None:
    """Invitations charge a cold model its start-up: the next refresh (10 s away) would
    leave every asker believing it warm until then."""
    cpu = served(tmp_path)
    cpu._warm_until = time.monotonic() + 4.0  # a job ended: warm for keep_warm_s

    def cooled(ticks: Ticks) -> None:
        cpu._warm_until = 0.0  # the 4 s passed (the fake clock moved; the executor's did not)
    parts = Parts(tmp_path, cpu=cpu)
    assert parts.cfg.metrics_interval_s == 10.0
    ticks, sent_at = run_loop(parts, 2, {1: (4.05, cooled)})
    assert 3.0 < ticks.waits[0] <= 4.05, "it woke when the model would go cold"
    warm = [Metrics.from_payload(p).snapshot.models["cpu"].warm for t, p, _ in parts.wire.sent if t == T.metrics("dev")]
    assert warm == [True, False] and sent_at == [0.0, 4.05]


def test_in_a_large_fleet_a_job_change_waits_for_the_refresh_and_a_model_going_cold_does_not(
        tmp_path: Path) -> None:
    """Past auction.invite.above, every node would read a thousand devices' job changes;
    its askers go by the bids they heard. What is not a job's change still goes out soon."""
    ticks, sent_at = run_loop(Parts(tmp_path), 3, {1: (0.05, job_changed)}, large=True)
    assert sent_at[:2] == [0.0, 10.0] and ticks.waits[1] == pytest.approx(9.95), "the change waits for the refresh"
    cpu = served(tmp_path)
    cpu._warm_until = time.monotonic() + 4.0

    def cooled(ticks: Ticks) -> None:
        cpu._warm_until = 0.0
        ticks.set()  # a job ended at the same time
    _, sent_at = run_loop(Parts(tmp_path, cpu=cpu), 2, {1: (4.05, cooled)}, large=True)
    assert sent_at == [0.0, 4.05], "a model gone cold is sent at once"


def test_a_presence_query_gets_metrics_then_online_at_once_both_retained(tmp_path: Path) -> None:
    parts = Parts(tmp_path)

    def query(ticks: Ticks) -> None:
        parts.presence.on_presence_query(Message(T.presence("newcomer"), b""))  # type: ignore[attr-defined]
    _, sent_at = run_loop(parts, 2, {1: (1.0, query)})
    assert sent_at == [0.0, 1.0]
    assert parts.wire.topics() == [T.metrics("dev"), T.metrics("dev"), T.availability("dev")]
    assert all(retain for _, _, retain in parts.wire.sent)


def test_the_loop_publishes_nothing_while_disconnected(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    now, stop = [0.0], threading.Event()
    ticks = Ticks(now, stop, 2, {1: (1.0, job_changed)})
    parts.wire.connected = False
    presence = Presence(parts.cfg, parts.capacity, parts.jobs, T, parts.wire, changed=ticks, stop=stop,
                        clock=lambda: now[0], sample=quiet_host)
    presence.loop()
    assert ticks.waits == [1.0, 1.0] and not parts.wire.sent


def test_presence_snapshots_offer_no_npu_to_its_own_orchestrations(tmp_path: Path) -> None:
    parts = Parts(tmp_path, npu=served(tmp_path))
    presence = Presence(parts.cfg, parts.capacity, parts.jobs, T, parts.wire, changed=threading.Event(),
                        stop=threading.Event(), sample=quiet_host)
    snap = presence.snapshot()
    assert snap.has_npu and snap.npu_free and snap.cpu_slots == 1
    offer = presence.offer_snapshot()
    assert offer.has_npu and not offer.npu_free and offer.cpu_slots == 1
    assert parts.capacity.cpu is not None
    assert set(snap.models) == {"npu", "cpu"}
    parts.capacity.cpu.down = "refused"
    down = presence.snapshot()
    assert down.cpu_slots == 0 and set(down.models) == {"npu"}, "a CPU whose model server is down offers nothing"
    assert not Presence(parts.cfg, Capacity(tmp_path, None, None, 0), parts.jobs, T, parts.wire,
                        changed=threading.Event(), stop=threading.Event(), sample=quiet_host).snapshot().has_npu


def test_presence_makes_a_new_snapshot_only_when_something_in_it_changed(tmp_path: Path) -> None:
    from agent.metrics import HostSample
    parts = Parts(tmp_path)
    host = [HostSample(0.0, 1000.0, 0.0, None, False)]
    presence = Presence(parts.cfg, parts.capacity, parts.jobs, T, parts.wire, changed=threading.Event(),
                        stop=threading.Event(), sample=lambda: host[0])
    first = presence.snapshot()
    assert presence.snapshot() is first, "nothing changed: the same snapshot, and the bids keep its encoding"
    host[0] = HostSample(5.0, 900.0, 0.25, None, False)
    sampled = presence.snapshot()
    assert sampled.cpu_percent == 5.0 and sampled.load1 == 0.25 and presence.snapshot() is sampled
    cpu = parts.capacity.cpu
    assert cpu is not None and not sampled.models["cpu"].warm
    cpu._warm_until = float("inf")  # a job just ended: the model is loaded
    assert presence.snapshot().models["cpu"].warm
    parts.jobs.latency.add("cpu", 120.0, 4)
    assert presence.snapshot().recent["cpu"].n == 1
    claim = parts.call("r1")
    assert claim is not None
    parts.job("r1", claim)  # the gate's slots are not started: it waits
    queued = presence.snapshot()
    assert queued.queue_depth == 1 and queued.backlog_s > 0
    cpu.down = "refused"
    down = presence.snapshot()
    assert down.cpu_slots == 0 and "cpu" not in down.models


def test_a_bid_encodes_its_device_s_snapshot_once_while_it_stays_the_same(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import agent.bids
    parts = Parts(tmp_path)
    snaps = [Metrics.from_payload(_METRICS).snapshot]
    parts.bids._snapshot = lambda: snaps[0]
    encoded: list[Any] = []
    real = agent.bids.snapshot_members
    monkeypatch.setattr(agent.bids, "snapshot_members", lambda s: encoded.append(s) or real(s))
    one, two = parts.bid("r1"), parts.bid("r2")
    assert one is not None and two is not None and one.snapshot == two.snapshot == snaps[0]
    assert encoded == [snaps[0]]
    snaps[0] = replace(snaps[0], queue_depth=3)
    three = parts.bid("r3")
    assert three is not None and three.snapshot.queue_depth == 3 and len(encoded) == 2


def test_presence_retains_what_it_publishes_and_answers_home_assistant(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    parts = Parts(tmp_path)
    cfg = config(tmp_path, homeassistant={"enabled": True})
    presence = Presence(cfg, parts.capacity, parts.jobs, T, parts.wire, changed=threading.Event(),
                        stop=threading.Event(), sample=quiet_host)
    presence.on_connect(False)
    assert parts.wire.topics() == [T.metrics("dev"), T.availability("dev"), T.ha_config("dev")]
    assert all(retain for _, _, retain in parts.wire.sent), "a newcomer must see them at once"
    with caplog.at_level("WARNING", logger="agent.node"):
        presence.on_ha_status(Message(T.ha_status(), b"offline"))
        assert len(parts.wire.sent) == 3 and not caplog.records, "HA going away needs nothing"
        presence.on_ha_status(Message(T.ha_status(), b"online"))
        assert parts.wire.topics()[3:] == [T.ha_config("dev")] and parts.wire.sent[3][2]
        presence.on_ha_status(Message(T.ha_status(), b"maybe"))
    assert len(parts.wire.sent) == 4 and "ignoring Home Assistant status" in caplog.text


# ---------------------------------------------------------------- fronts
class NoOrchestrator:
    def __call__(self, cfg: Config, **hooks: Any) -> Any:
        raise AssertionError("garbage must never reach an orchestrator")


def test_a_bad_trigger_with_an_id_is_answered_on_its_topic_not_on_last_result(tmp_path: Path) -> None:
    wire = Wire()
    fronts = Fronts(config(tmp_path), T, publish=wire.publish, make=NoOrchestrator(), fleet=lambda: None)
    fronts.on_trigger(Message(T.trigger("dev"), json.dumps({"id": "q1", "prompt": ""}).encode()))
    assert wire.topics() == [T.answer("dev", "q1")]
    answer = json.loads(wire.sent[0][1])
    assert answer["ok"] is False and answer["error"].startswith("bad trigger")
    fronts.on_trigger(Message(T.trigger("dev"), b"\xff\xfe"))  # no id, no response topic: nobody waits
    assert len(wire.sent) == 1


def test_the_control_socket_will_not_forget_its_own_node(tmp_path: Path) -> None:
    from agent.control import Failure, ForgetRequest

    class Channel:
        def __init__(self) -> None:
            self.events: list[Any] = []

        def send(self, event: Any) -> None:
            self.events.append(event)

    fronts = Fronts(config(tmp_path), T, publish=Wire().publish, make=NoOrchestrator(), fleet=lambda: None)
    channel = Channel()
    fronts.on_control(ForgetRequest("dev"), channel)  # type: ignore[arg-type]
    assert channel.events == [Failure("forget: a device id other than this node's", ExitCode.USAGE)]


@pytest.mark.parametrize("answer_id", [None, "q2"])
def test_a_trigger_that_finds_the_line_full_is_refused(tmp_path: Path, answer_id: str | None) -> None:
    cfg = config(tmp_path, triggers={"workers": 1, "max_waiting": 0})
    wire = Wire()
    fronts = Fronts(cfg, T, publish=wire.publish, make=NoOrchestrator(), fleet=lambda: None)
    # The pool is not started: the first trigger takes the only place, the second is refused.
    body = {"prompt": "hi"} if answer_id is None else {"prompt": "hi", "id": answer_id}
    fronts.on_trigger(Message(T.trigger("dev"), json.dumps(body).encode()))
    fronts.on_trigger(Message(T.trigger("dev"), json.dumps(body).encode()))
    refused = json.loads(wire.next_on(T.last_result("dev")))
    assert refused["error"].startswith("busy") and refused["id"] == answer_id



class Orchestrations:
    """``make`` for Fronts: records the config and hooks each orchestrator got, and what it
    was asked; its run answers, or raises ``error``."""

    def __init__(self, *, error: Exception | None = None, total_ms: float = 12.3456):
        self.error, self.total_ms = error, total_ms
        self.made: list[tuple[Config, dict[str, Any]]] = []
        self.runs: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, cfg: Config, **hooks: Any) -> Any:
        self.made.append((cfg, hooks))
        return self

    def interrupt(self) -> None:
        pass

    def run(self, prompt: str, **kw: Any) -> Any:
        self.runs.append((prompt, kw))
        if self.error is not None:
            raise self.error
        from types import SimpleNamespace
        return SimpleNamespace(rid="r9", ok=True, winner="peer", path="cpu", text="an answer", error=None,
                               total_ms=self.total_ms, to_json=lambda: {"ok": True},
                               answer=SimpleNamespace(kind="answer"))


class Recorder:
    def __init__(self) -> None:
        self.events: list[Any] = []
        self.watched: list[Any] = []

    def send(self, event: Any) -> None:
        self.events.append(event)

    def watch(self, on_gone: Any) -> None:
        self.watched.append(on_gone)


def test_the_one_orchestrator_factory_builds_an_orchestrator(tmp_path: Path) -> None:
    from agent.fronts import orchestrator
    from agent.orchestrator import Orchestrator
    orch = orchestrator(config(tmp_path), connect=lambda: None, npu_exec=None, cpu_exec=None,
                        local_snapshot=lambda: Metrics.from_payload(_METRICS).snapshot)
    assert isinstance(orch, Orchestrator)


def test_an_mqtt_trigger_is_answered_on_every_topic_it_asked_for(tmp_path: Path) -> None:
    wire, made = Wire(), Orchestrations(total_ms=12.3456)
    fronts = Fronts(config(tmp_path), T, publish=wire.publish, make=made, fleet=lambda: None)
    fronts._orchestrate(TriggerRequest("hi", id="q1"), "reply/here")
    assert wire.topics() == [T.last_result("dev"), T.answer("dev", "q1"), "reply/here"]
    assert [retain for _, _, retain in wire.sent] == [True, False, False]
    last = json.loads(wire.sent[0][1])
    assert last["ok"] is True and last["text"] == "an answer" and last["total_ms"] == 12.3 and last["id"] == "q1"
    assert made.runs == [("hi", {"max_new_tokens": TriggerRequest("hi").ask().max_new_tokens, "model": None})]
    wire.sent.clear()
    fronts._orchestrate(TriggerRequest("hi"), None)
    assert wire.topics() == [T.last_result("dev")], "no id, no response topic: the dashboard only"


def test_an_mqtt_trigger_the_orchestrator_refuses_is_answered_with_why(tmp_path: Path) -> None:
    from agent.errors import AgentError
    wire = Wire()
    fronts = Fronts(config(tmp_path), T, publish=wire.publish, make=Orchestrations(error=AgentError("no devices")),
                    fleet=lambda: None)
    fronts._orchestrate(TriggerRequest("hi", id="q1"), None)
    last = json.loads(wire.next_on(T.answer("dev", "q1")))
    assert last["ok"] is False and last["error"] == "no devices"


def test_a_trigger_answers_to_its_correlation_data_without_an_id(tmp_path: Path) -> None:
    cfg = config(tmp_path, triggers={"workers": 1, "max_waiting": 0})
    wire = Wire()
    fronts = Fronts(cfg, T, publish=wire.publish, make=NoOrchestrator(), fleet=lambda: None)
    fronts.on_trigger(Message(T.trigger("dev"), b'{"prompt": "hi"}'))
    fronts.on_trigger(Message(T.trigger("dev"), b'{"prompt": "hi"}', correlation_data=b"c7"))
    refused = json.loads(wire.next_on(T.answer("dev", "c7")))
    assert refused["ok"] is False and refused["id"] == "c7"


def test_a_bad_trigger_with_only_a_response_topic_is_answered_there(tmp_path: Path) -> None:
    wire = Wire()
    fronts = Fronts(config(tmp_path), T, publish=wire.publish, make=NoOrchestrator(), fleet=lambda: None)
    fronts.on_trigger(Message(T.trigger("dev"), b'{"prompt": ""}', response_topic="reply/me"))
    assert wire.topics() == ["reply/me"] and json.loads(wire.sent[0][1])["ok"] is False


def test_a_control_prompt_streams_its_events_with_its_own_bid_timeout(tmp_path: Path) -> None:
    from agent.control import Outcome, PromptRequest
    from agent.messages import Prompt
    made = Orchestrations()
    fronts = Fronts(config(tmp_path), T, publish=Wire().publish, make=made, fleet=lambda: None)
    channel = Recorder()
    fronts.on_control(PromptRequest(Prompt("hi", 5, bid_timeout_s=0.7)), channel)  # type: ignore[arg-type]
    assert channel.events == [Outcome({"ok": True}, "answer")] and len(channel.watched) == 1
    (cfg, hooks), = made.made
    assert cfg.auction.bid_timeout_s == 0.7 and set(hooks) == {"on_token", "on_decision", "on_progress"}
    fronts.on_control(PromptRequest(Prompt("hi", 5)), channel)  # type: ignore[arg-type]
    assert made.made[1][0].auction.bid_timeout_s == config(tmp_path).auction.bid_timeout_s


def test_control_prompts_are_bounded_by_the_trigger_pool_and_its_line(tmp_path: Path) -> None:
    from agent.control import Failure, PromptRequest
    from agent.errors import AgentError
    from agent.messages import Prompt
    cfg = config(tmp_path, triggers={"workers": 2, "max_waiting": 1})
    fronts = Fronts(cfg, T, publish=Wire().publish, make=Orchestrations(error=AgentError("no devices")),
                    fleet=lambda: None)
    channel = Recorder()
    fronts.on_control(PromptRequest(Prompt("hi")), channel)  # type: ignore[arg-type]
    assert channel.events == [Failure("no devices", AgentError("x").exit_code)], "refused, and its place freed"
    taken = [fronts._control_busy.acquire(blocking=False) for _ in range(3)]
    assert taken == [True, True, True], "two workers and one place in the line"
    fronts.on_control(PromptRequest(Prompt("hi")), channel)  # type: ignore[arg-type]
    assert isinstance(channel.events[-1], Failure) and channel.events[-1].error.startswith("busy")


def subscriptions(tmp_path: Path, cpu: dict[str, Any]) -> dict[str, int]:
    """What a node started with this ``cpu`` section subscribes to (filter -> QoS), no broker."""
    from agent.node import Node

    cfg = parse_config({"device_id": "n1", "state_dir": str(tmp_path), "topic_prefix": "p/",
                        "homeassistant": {"enabled": False}, "cpu": cpu})
    node = Node(cfg)
    subscribed: dict[str, int] = {}
    real = node.bus.subscribe

    def subscribe(topic_filter: str, handler: Any, qos: int = 1, **kw: Any) -> Any:
        subscribed[topic_filter] = qos
        return real(topic_filter, handler, qos, **kw)

    node.bus.subscribe = subscribe  # type: ignore[method-assign]
    node.bus.start = lambda: None  # type: ignore[method-assign]  # no broker: only what it asks for
    try:
        node.start()
    finally:
        node.stop()
    return subscribed


def test_the_node_subscribes_at_the_qos_each_topic_is_sent_at(tmp_path: Path) -> None:
    """Jobs, cancels, triggers and calls to everyone are QoS 1. Invitations are sent at
    QoS 0, and a presence query is answered within a second or never (a queued one would
    reach a device after its asker stopped listening): both at QoS 0, since on NATS every
    QoS 1 subscription is a JetStream consumer per device (the auction's bids:
    tests/test_auction.py)."""
    subscribed = subscriptions(tmp_path, {"enabled": True, "executor": {"kind": "sim"}})
    assert {f for f, q in subscribed.items() if q == 0} == {T.bid_invites("n1"), T.all_presence()}, subscribed
    assert subscribed[T.all_bid_requests()] == subscribed[T.exec("n1")] == subscribed[T.cancels("n1")] == 1
    assert subscribed[T.trigger("n1")] == 1


def test_a_node_with_no_executor_hears_no_calls_for_bids(tmp_path: Path) -> None:
    """It never bids (nothing here could take a job), so its network thread is left to the
    bids of its own auctions (a gateway's, through serve); jobs still reach it, to be declined."""
    subscribed = subscriptions(tmp_path, {"enabled": False})
    assert T.all_bid_requests() not in subscribed and T.bid_invites("n1") not in subscribed, subscribed
    assert T.exec("n1") in subscribed and T.cancels("n1") in subscribed


@pytest.mark.parametrize("above", [0, 2])
def test_the_node_tells_presence_whether_its_fleet_is_past_the_invitation_threshold(tmp_path: Path,
                                                                                    above: int) -> None:
    from agent.node import Node

    cfg = parse_config({"device_id": "n1", "state_dir": str(tmp_path), "topic_prefix": "p/",
                        "homeassistant": {"enabled": False}, "auction": {"invite": {"above": above}}})
    node = Node(cfg)
    large = []
    for device in ("a", "b", "c"):
        node.fleet.roster.handle(Message(T.availability(device), b"online", retain=True))
        large.append(node.presence._large())
    assert large == [n > above for n in (1, 2, 3)]
