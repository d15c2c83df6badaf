"""The orchestrator's parts, each alone on fakes (no broker, fake clocks): the learner, the
auctioneer, the delivery (the walk down the ranking, a peer, this process), and the pure
endings of the flow. ``tests/test_orchestrator.py`` drives them together."""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.auction import AuctionResult
from agent.auctioneer import Auctioneer, closing_warnings
from agent.bus import Message
from agent.config import Config, ModelConfig
from agent.delivery import Delivered, Delivery, Dispatcher, LocalRunner
from agent.dispatch import Answer, Step
from agent.errors import BrokerUnavailable, EngineUnavailable, ExecutionTimeout, ExecutorError, ExitCode
from agent.executors import Result
from agent.fsm import ORCHESTRATION, Machine
from agent.learner import Learner
from agent.linucb import residual_target
from agent.locks import CpuSlots, NpuLock
from agent.messages import (
    Accepted,
    Bid,
    BidRequest,
    Cancel,
    Chat,
    ChatMessage,
    Declined,
    Done,
    Job,
    Snapshot,
    Timings,
    Token,
    encode_result,
)
from agent.orchestration import Request, Wire
from agent.orchestrator import Orchestrator, no_device
from agent.outcome import Decided
from agent.selection import Choice
from agent.topics import Topics
from tests.test_orchestrator import CAP_S, RecordingArms, ScriptedFleet, config, done

T = Topics("")


class Clock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class Heard:
    """The hooks: what the caller hears."""

    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.decisions: list[Decided] = []
        self.progress: list[str] = []

    def on_token(self, text: str) -> None:
        self.tokens.append(text)

    def on_decision(self, decided: Decided) -> None:
        self.decisions.append(decided)

    def on_progress(self, line: str) -> None:
        self.progress.append(line)


class Arms:
    """An arm store that records what it is told."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.trained: list[tuple[str, list[float], float | None, str, float]] = []
        self.exploring: list[tuple[str, str, float]] = []
        self.cursors: list[int] = []
        self.fail = fail

    def train(self, device: str, x: np.ndarray, y: float | None, rid: str, base: float = 0.0) -> bool:
        if self.fail is not None:
            raise self.fail
        self.trained.append((device, x.tolist(), y, rid, base))
        return True

    def mark_exploring(self, device: str, rid: str, until: float) -> None:
        self.exploring.append((device, rid, until))

    def set_cursor(self, cursor: int) -> None:
        self.cursors.append(cursor)

    def load(self) -> str:
        return "the state"


def request(**kw: Any) -> Request:
    return Request(**{"rid": "r1", "prompt": "a prompt", "max_new_tokens": 8, "need": "any", "dry_run": False, **kw})


def cpu(device: str, **kw: Any) -> Choice:
    return Choice(device, "cpu", kw.pop("is_self", False), **{"score": 1.5, "x": (1.0, 2.0), "promise": 2.0, **kw})


# ------------------------------------------------------------------ the learner
def learner(tmp_path: Path, arms: Arms, clock: Clock, wall: Clock) -> Learner:
    return Learner(config(tmp_path), lambda: arms, clock=clock, wall=wall)


def test_the_learner_opens_the_arm_store_once_and_only_when_asked(tmp_path: Path) -> None:
    opened: list[Arms] = []

    def factory() -> Arms:
        opened.append(Arms())
        return opened[-1]

    learn = Learner(config(tmp_path), factory, clock=Clock(), wall=Clock())
    assert opened == [], "the local NPU path never opens the store (nor imports numpy)"
    assert learn.state() == "the state" and learn.state() == "the state"
    learn.move_cursor(3)
    assert len(opened) == 1 and opened[0].cursors == [3]


def test_an_answer_teaches_the_arm_what_the_promise_missed_less_the_wait_in_the_queue(tmp_path: Path) -> None:
    arms, clock = Arms(), Clock(110.0)
    answer = Answer(True, ExitCode.OK, "hi", timings=Timings(queue_ms=2000.0))
    learner(tmp_path, arms, clock, Clock()).learn("r1", cpu("a", promise=3.0), answer, dispatched=100.0)
    assert arms.trained == [("a", [1.0, 2.0], residual_target(True, 8.0, CAP_S, 3.0), "r1", 3.0)]
    assert arms.exploring == []


def test_a_failure_teaches_the_cap_and_a_device_with_no_promise_only_ends_its_exploration(tmp_path: Path) -> None:
    arms = Arms()
    learn = learner(tmp_path, arms, Clock(101.0), Clock())
    learn.learn("r1", cpu("a"), Answer(False, ExitCode.FAILED), dispatched=100.0)
    learn.learn("r2", cpu("new", promise=None, explore=True), Answer(True, ExitCode.OK), dispatched=100.0)
    assert arms.trained == [("a", [1.0, 2.0], CAP_S - 2.0, "r1", 2.0), ("new", [1.0, 2.0], None, "r2", 0.0)]


@pytest.mark.parametrize("code", [ExitCode.INTERRUPTED, ExitCode.TERMINATED])
def test_a_job_its_asker_gave_up_on_teaches_nothing_but_ends_an_exploration(tmp_path: Path, code: ExitCode) -> None:
    arms, wall = Arms(), Clock(5000.0)
    learn = learner(tmp_path, arms, Clock(), wall)
    learn.learn("r1", cpu("a"), Answer(False, code), dispatched=0.0)
    assert arms.trained == [] and arms.exploring == [], "not exploring: nothing to end"
    learn.learn("r2", cpu("new", explore=True), Answer(False, code), dispatched=0.0)
    assert arms.trained == [] and arms.exploring == [("new", "r2", 5000.0)], "free to be tried again now"


def test_an_npu_answer_or_one_without_a_context_teaches_nothing(tmp_path: Path) -> None:
    arms = Arms()
    learn = learner(tmp_path, arms, Clock(), Clock())
    learn.learn("r1", Choice("a", "npu", False, x=(1.0,), explore=True), Answer(True, ExitCode.OK), 0.0)
    learn.learn("r2", cpu("a", x=None, explore=True), Answer(True, ExitCode.OK), 0.0)
    assert arms.trained == [] and arms.exploring == []


def test_an_exploration_is_marked_until_the_job_s_time_is_up(tmp_path: Path) -> None:
    arms = Arms()
    learner(tmp_path, arms, Clock(), Clock(1000.0)).exploring("new", "r1")
    assert arms.exploring == [("new", "r1", 1005.0)]  # job_timeout_s: 5


def test_an_arm_store_that_cannot_be_written_is_logged_not_raised(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    learn = learner(tmp_path, Arms(fail=OSError("read-only")), Clock(101.0), Clock())
    with caplog.at_level(logging.ERROR, logger="agent.orchestrator"):
        learn.learn("r1", cpu("a"), Answer(True, ExitCode.OK), dispatched=100.0)
    assert "could not train the arm store: read-only" in caplog.text


# ------------------------------------------------------------------ the auctioneer
def auction(closing: str, missing: tuple[str, ...] = ("b", "c")) -> AuctionResult:
    return AuctionResult({}, (), 1.0, closing, missing)


def test_a_window_closed_early_says_whom_it_did_not_wait_for() -> None:
    assert closing_warnings(auction("timeout"), 2.5) == ("bid window of 2.5 s closed without bids from b, c",)
    assert closing_warnings(auction("stragglers"), 2.5) == ("did not wait for b, c: missed recent calls for bids",)
    assert closing_warnings(auction("overdue"), 2.5) == (
        "did not wait for b, c: no bid long after it usually comes",)
    for closing in ("roster_complete", "decided"):
        assert closing_warnings(auction(closing), 2.5) == ()


def auctioneer(cfg: Config, heard: Heard, clock: Any) -> Auctioneer:
    return Auctioneer(cfg, T, heard, clock=clock, wall=Clock(1.7e9 + 0.12345), rng=lambda: np.random.default_rng(0),
                      interrupted=threading.Event())


def held(fleet: ScriptedFleet, cfg: Config, auctioneer: Auctioneer) -> tuple[AuctionResult, Wire, Machine]:
    from agent.mailroom import Inbox
    inbox = Inbox.open(fleet.mail, "r1", cfg.max_payload_bytes)
    wire = Wire(fleet, inbox, 1)  # type: ignore[arg-type]
    fsm = Machine("o", ORCHESTRATION, "start")
    try:
        return auctioneer.hold(request(), wire, fsm), wire, fsm
    finally:
        inbox.close()
        auctioneer.closed(inbox)


def test_the_bids_are_cut_to_what_the_operator_vouched_for(tmp_path: Path) -> None:
    class Vouching(ScriptedFleet):
        def vouched(self, bids: dict[str, Bid]) -> dict[str, Bid]:
            return {d: b for d, b in bids.items() if d != "rogue"}

    cfg = config(tmp_path)
    fleet = Vouching({"a": done, "rogue": done})
    result, _, fsm = held(fleet, cfg, auctioneer(cfg, Heard(), Clock()))
    (topic, call), = fleet.published
    assert topic == T.bid_request("r1", "hub") and BidRequest.from_payload(call).sent_at == round(1.7e9 + 0.12345, 3)
    assert set(result.bids) == {"a"} and result.closing == "roster_complete" and result.invited is None
    assert fsm.state == "closed"


def test_an_invited_auction_names_whom_it_invited_and_only_then_remembers(tmp_path: Path) -> None:
    from agent.invite import shared_memory
    (tmp_path / "called").mkdir()
    (tmp_path / "invited").mkdir()
    cfg = config(tmp_path / "called")
    called = auctioneer(cfg, Heard(), Clock())
    held(ScriptedFleet({"a": done, "b": done}), cfg, called)
    called.sent("a", 100.0, 2.0)
    assert shared_memory(str(cfg.state_dir)).known_s(100.0) == {}, "nothing invited: nothing remembered"

    cfg = config(tmp_path / "invited", invite={"above": 0, "best": 0, "explore": 2})
    inviting = auctioneer(cfg, Heard(), Clock())
    result, _, _ = held(ScriptedFleet({"a": done, "b": done}), cfg, inviting)
    assert sorted(result.invited or ()) == ["a", "b"]
    from agent.invite import shared_rows
    assert shared_rows(str(cfg.state_dir), (None, "any", False))._table is not None, "the view of its job kind"
    memory = shared_memory(str(cfg.state_dir))
    assert memory.known_s(100.0) == {"a": 2.0, "b": 2.0}, "the bids heard"
    inviting.sent("a", 100.0, 2.0)
    assert memory.known_s(100.0) == {"a": 4.0, "b": 2.0}, "and the job sent since"


def test_a_peer_that_missed_the_call_is_a_suspect_next_time(tmp_path: Path) -> None:
    class OneSilent(ScriptedFleet):
        def bidders(self, model: str | None = None, need: str = "any", tools: bool = False) -> frozenset[str]:
            return frozenset({*self.peers, "silent"})

    cfg = config(tmp_path, bid_timeout_s=0.05)
    part = auctioneer(cfg, Heard(), time.monotonic)  # the window closes on its own clock
    assert part.stragglers.suspects() == set()
    result, _, _ = held(OneSilent({"a": done}), cfg, part)
    assert result.missing == ("silent",) and part.stragglers.suspects() == {"silent"}
    assert set(part.latency.load()) == {"a"}, "the bid latency of those that bid"



def test_a_peer_on_a_slow_link_is_waited_for_as_long_as_its_bids_usually_take(tmp_path: Path) -> None:
    """The auction waits for a missing bid four times as long as that device's bids took
    before (``BidLatency``, read for the devices it expects), not the second an unknown gets."""
    from agent.auction import PATIENCE_FACTOR, PATIENCE_NEW_S

    class SlowLink(ScriptedFleet):
        def bidders(self, model: str | None = None, need: str = "any", tools: bool = False) -> frozenset[str]:
            return frozenset({*self.peers, "far"})

    cfg = config(tmp_path, bid_timeout_s=30)
    part = auctioneer(cfg, Heard(), time.monotonic)  # the window closes on its own clock: 2 s
    part.latency.update({"far": 0.5, "other": 0.01})
    result, _, _ = held(SlowLink({"a": done}), cfg, part)
    assert result.closing == "overdue" and result.missing == ("far",)
    assert result.auction_ms >= 0.5 * PATIENCE_FACTOR * 1000 > PATIENCE_NEW_S * 1000


def test_a_peer_that_missed_several_calls_in_a_row_costs_the_next_auction_no_grace(tmp_path: Path) -> None:
    from agent.auction import ABSENT_AFTER, GRACE_MIN_S

    class OneSilent(ScriptedFleet):
        def bidders(self, model: str | None = None, need: str = "any", tools: bool = False) -> frozenset[str]:
            return frozenset({*self.peers, "silent"})

    class Stepping(Clock):  # every reading 5 ms later: the grace passes in a few turns of the wait
        def __call__(self) -> float:
            self.t += 0.005
            return self.t

    cfg = config(tmp_path, bid_timeout_s=30)
    part = auctioneer(cfg, Heard(), Stepping())
    part.stragglers.update({"silent"}, set())  # missed one call: a suspect, given the grace
    result, _, _ = held(OneSilent({"a": done}), cfg, part)
    assert result.closing == "stragglers" and result.auction_ms >= GRACE_MIN_S * 1000, "waited the grace"
    for _ in range(ABSENT_AFTER - 2):
        part.stragglers.update({"silent"}, set())
    assert part.stragglers.suspects_and_absent() == ({"silent"}, {"silent"})
    result, _, _ = held(OneSilent({"a": done}), cfg, part)
    assert result.closing == "stragglers" and result.missing == ("silent",)
    assert result.auction_ms < GRACE_MIN_S * 1000, "absent for good: closed as soon as a was in"


# ------------------------------------------------------------------ the delivery: the walk
class Local:
    def __init__(self, *outcomes: tuple[Answer, str]):
        self.outcomes = list(outcomes)

    def on_cpu(self, req: Request, fsm: Machine) -> tuple[Answer, str]:
        answer, outcome = self.outcomes.pop(0)
        fsm.fire("passed" if outcome.startswith("unavailable:") else "done" if answer.ok else "error")
        return answer, outcome


class Peers:
    def __init__(self, **steps: Step):
        self.steps = steps
        self.runs: list[tuple[str, str, str, Decided, bool]] = []

    def run(self, wire: Any, req: Request, device: str, mode: str, claim: str, decided: Decided,
            last: bool) -> Step:
        self.runs.append((device, mode, claim, decided, last))
        return self.steps[device]


class Offline:
    def __init__(self, *devices: str):
        self.devices = set(devices)

    def offline(self, device: str) -> bool:
        return device in self.devices


OK = Answer(True, ExitCode.OK, "answer")
PASSED = Step("next", outcome="declined")


def bids(*devices: str) -> dict[str, Bid]:
    snap = Snapshot(has_npu=False, npu_free=False, cpu_slots=1, cpu_percent=0.0, mem_available_mb=1e3, load1=0.0,
                    queue_depth=0)
    return {d: Bid("r1", d, "hub", f"claim-{d}", snap) for d in devices}


class Walk:
    def __init__(self, local: Local, peers: Peers, clock: Clock):
        self.heard, self.explored, self.sent = Heard(), [], []
        self.delivery = Delivery("hub", local, peers, self.heard, clock=clock,  # type: ignore[arg-type]
                                 exploring=lambda d, rid: self.explored.append((d, rid)),
                                 sent=lambda d, at, promise: self.sent.append((d, at, promise)))
        self.fsm = Machine("o", ORCHESTRATION, "closed")

    def __call__(self, ranking: list[Choice], bids: dict[str, Bid], wire: Any = None) -> Delivered:
        return self.delivery.walk(request(), self.fsm, wire if wire is not None else Offline(), ranking, bids)


def test_the_walk_passes_to_the_runner_up_and_stops_at_the_first_answer() -> None:
    peers = Peers(a=PASSED, b=Step("finished", outcome="done", answer=OK), c=Step("finished", answer=OK))
    walk = Walk(Local(), peers, Clock(7.0))
    out = walk([cpu("a"), Choice("b", "npu", False, score=None), cpu("c")], bids("a", "b", "c"))
    assert out.answer == OK and out.choice is not None and out.choice.device == "b" and out.dispatched == 7.0
    assert out.attempts == ({"device": "a", "outcome": "declined"}, {"device": "b", "outcome": "done"})
    assert [(d, m, c, last) for d, m, c, _, last in peers.runs] == [("a", "cpu", "claim-a", False),
                                                                    ("b", "npu", "claim-b", False)]
    assert peers.runs[1][3] == Decided("b", "peer-npu", None)
    assert walk.sent == [("a", 7.0, 2.0)], "only a CPU job with a promise is counted as queued there"
    walk = Walk(Local(), Peers(new=Step("finished", answer=OK)), Clock())
    walk([cpu("new", promise=None)], bids("new"))
    assert walk.sent == [], "a device with no record promised nothing"
    assert walk.fsm.state == "done"


def test_a_device_that_restarted_and_bid_again_is_timed_from_its_new_claim() -> None:
    """The learner hears how long the job took from when it went out under the claim it
    ran with, against the start-up the new bid priced, in the context that bid told: the
    time a restarted device was away, and a model it had to load again, are not its speed."""
    from agent.executors import estimate_tokens
    from agent.linucb import context
    walk = Walk(Local(), Peers(a=Step("finished", outcome="done", answer=OK, since=12.5)), Clock(7.0))
    out = walk([cpu("a")], bids("a"))
    assert out.dispatched == 12.5 and out.choice == cpu("a"), "no new bid: the choice as it was"
    first = bids("a")
    first["a"] = replace(first["a"], init_s=0.5)
    again = replace(first["a"], claim="claim-new", init_s=4.0,
                    snapshot=replace(first["a"].snapshot, cpu_percent=80.0))
    out = Walk(Local(), Peers(a=Step("finished", answer=OK, since=12.5, bid=again)), Clock(7.0))([cpu("a")], first)
    assert out.choice is not None and out.choice.promise == pytest.approx(2.0 - 0.5 + 4.0), "cold after the restart"
    assert out.choice.x == tuple(context(again.snapshot, estimate_tokens(request().prompt), 8, 5.5)), \
        "its state as the new bid told, with that promise"
    assert out.choice.x != cpu("a").x
    out = Walk(Local(), Peers(a=Step("finished", answer=OK, since=12.5, bid=again)), Clock())(
        [cpu("a", promise=None)], bids("a"))
    assert out.choice is not None and out.choice.promise is None and out.choice.x == (1.0, 2.0), \
        "no promise: none made up"


def test_a_failed_answer_ends_the_walk_and_an_attempt_with_no_outcome_is_a_question_mark() -> None:
    walk = Walk(Local(), Peers(a=Step("finished", answer=Answer(False, ExitCode.FAILED)), b=PASSED), Clock())
    out = walk([cpu("a"), cpu("b")], bids("a", "b"))
    assert out.answer is not None and not out.answer.ok
    assert out.attempts == ({"device": "a", "outcome": "?"},) and walk.fsm.state == "failed"


def test_the_last_way_worth_trying_is_told_so_and_offline_devices_are_skipped() -> None:
    peers = Peers(a=PASSED, b=PASSED, c=PASSED)
    walk = Walk(Local(), peers, Clock())
    out = walk([cpu("a"), cpu("b"), cpu("c")], bids("a", "b", "c"), wire=Offline("b"))
    assert [(d, last) for d, _, _, _, last in peers.runs] == [("a", False), ("c", True)]
    assert out.answer is None and out.choice is None and len(out.attempts) == 2
    assert walk.fsm.state == "closed", "the orchestrator says there is no candidate"


def test_this_device_runs_what_it_has_no_daemon_for_and_passes_on_when_its_server_is_down() -> None:
    down = (Answer(False, ExitCode.FAILED, error="refused"), "unavailable: refused")
    walk = Walk(Local(down, (OK, "done")), Peers(), Clock())
    me = cpu("hub", is_self=True, explore=True)
    out = walk([me, me], {})
    assert out.answer == OK and out.attempts == ({"device": "hub", "outcome": "unavailable: refused"},
                                                 {"device": "hub", "outcome": "done"})
    assert walk.heard.decisions == [Decided("hub", "local-cpu", 1.5)] * 2
    assert walk.explored == [("hub", "r1")] * 2 and walk.sent == [], "a job run here is not queued at a peer"


def test_an_error_here_is_the_answer() -> None:
    failed = Answer(False, ExitCode.TIMEOUT, error="slow")
    out = Walk(Local((failed, "error: slow"), (OK, "done")), Peers(), Clock())([cpu("hub", is_self=True)] * 2, {})
    assert out.answer == failed and len(out.attempts) == 1


# ------------------------------------------------------------------ the delivery: a peer
class Bus:
    def __init__(self) -> None:
        self.published: list[tuple[str, bytes, dict[str, Any]]] = []
        self.barriers = 0

    def publish(self, topic: str, payload: bytes, **kw: Any) -> None:
        self.published.append((topic, payload, kw))

    def barrier(self, timeout: float) -> bool:
        self.barriers += 1
        return True


def test_an_interrupt_cancels_the_job_on_its_device_and_waits_for_the_broker(tmp_path: Path) -> None:
    from types import SimpleNamespace
    bus, interrupted = Bus(), threading.Event()
    interrupted.set()
    part = Dispatcher(config(tmp_path), T, Heard(), clock=Clock(), wall=Clock(1.7e9), interrupted=interrupted)
    wire = SimpleNamespace(fleet=SimpleNamespace(bus=bus), inbox=SimpleNamespace(events=queue.SimpleQueue()))
    step = part.run(wire, request(), "a", "cpu", "claim-a", Decided("a", "peer-cpu"), last=True)  # type: ignore
    assert step.outcome == "interrupted" and step.answer is not None
    assert step.answer.exit_code == ExitCode.INTERRUPTED and "a was told to stop" in (step.answer.error or "")
    assert not step.answer.ok
    (t1, job, _), (t2, cancel, kw) = bus.published
    assert t1 == T.exec("a") and Job.from_payload(job).claim == "claim-a"
    assert t2 == T.cancel("a", "hub") and Cancel.from_payload(cancel).reason == "interrupted"
    assert kw["qos"] == 1 and bus.barriers == 1


def test_a_job_sent_has_the_time_it_has_left_and_carries_the_chat_not_the_prompt(tmp_path: Path) -> None:
    part = Dispatcher(config(tmp_path), T, Heard(), clock=Clock(), wall=Clock(1.7e9 + 0.12345),
                      interrupted=threading.Event())
    job = part.job(request(), "npu", "c")
    assert (job.rid, job.origin, job.mode, job.claim, job.prompt) == ("r1", "hub", "npu", "c", "a prompt")
    assert (job.accept_s, job.timeout_s, job.sent_at) == (0.05, 5.0, round(1.7e9 + 0.12345, 3))
    assert part.job(request(), "cpu", "c").timeout_s == 5.0
    assert job.reply_to == T.result_stem("hub", "r1")
    chat = Chat((ChatMessage("user", "hi"),))
    assert part.job(request(chat=chat), "cpu", "c").prompt == "" and part.job(request(chat=chat), "cpu", "c").chat


# ------------------------------------------------------------------ the delivery: this process
class Exec:
    """What LocalRunner asks of a ``Served``: scripted tokens, then a result or an error."""

    def __init__(self, *, error: ExecutorError | None = None, model: str | None = None, tools: bool = False,
                 down: str | None = None, during: Any = None):
        self.served = ModelConfig(name=model)
        self.tools = tools
        self.down, self.error, self.during = down, error, during
        self.params: list[Any] = []

    def serves(self, model: str | None) -> bool:
        return self.served.serves(model)

    def check(self) -> str | None:
        return self.down

    def run(self, prompt: str, params: Any, on_token: Any, cancel: threading.Event | None = None) -> Result:
        self.params.append(params)
        on_token("an ")
        on_token("answer")
        if self.during is not None:
            self.during()
        if self.error is not None:
            raise self.error
        return Result("an answer", Timings(total_ms=3.0), 4, 2, "stop")


def runner(tmp_path: Path, heard: Heard, *, npu: Exec | None = None, cpu_exec: Exec | None = None,
           clock: Clock | None = None, interrupted: threading.Event | None = None) -> LocalRunner:
    return LocalRunner(config(tmp_path), heard, npu_exec=npu, cpu_exec=cpu_exec,  # type: ignore[arg-type]
                       clock=clock or Clock(), interrupted=interrupted or threading.Event())


def test_the_own_npu_runs_it_holding_the_lock_and_says_so_first(tmp_path: Path) -> None:
    heard, clock = Heard(), Clock(10.0)
    held: list[bool] = []
    npu = Exec(during=lambda: held.append(NpuLock(config(tmp_path).state_dir).is_free()))
    fsm = Machine("o", ORCHESTRATION, "start")
    out = runner(tmp_path, heard, npu=npu, clock=clock).own_npu(request(), 8.0, fsm)
    assert out is not None and out.ok and out.text == "an answer" and out.path == "local-npu" and out.winner == "hub"
    assert out.total_ms == 2000.0 and out.attempts == ({"device": "hub", "outcome": "done"},)
    assert held == [False] and NpuLock(config(tmp_path).state_dir).is_free(), "held while it ran, then freed"
    assert heard.decisions == [Decided("hub", "local-npu")] and heard.tokens == ["an ", "answer"]
    assert fsm.state == "done" and npu.params[0].timeout_s == 5.0 and npu.params[0].hold_fds == ()


TOOLS = ({"type": "function", "function": {"name": "f", "parameters": {}}},)


@pytest.mark.parametrize(("npu", "ask"), [
    (None, {}),
    (Exec(model="other"), {"model": "m"}),
    (Exec(down="no model"), {}),
    (Exec(tools=False), {"chat": Chat((ChatMessage("user", "hi"),), tools=TOOLS)}),
])
def test_the_own_npu_is_passed_over_when_it_cannot_serve_the_job(tmp_path: Path, npu: Exec | None,
                                                                 ask: dict[str, Any]) -> None:
    assert runner(tmp_path, Heard(), npu=npu).own_npu(request(**ask), 0.0, Machine("o", ORCHESTRATION, "start")) is None
    assert NpuLock(config(tmp_path).state_dir).is_free()


def test_the_own_npu_takes_a_job_with_tools_when_it_can_call_them(tmp_path: Path) -> None:
    ask = request(chat=Chat((ChatMessage("user", "hi"),), tools=TOOLS), model="m")
    out = runner(tmp_path, Heard(), npu=Exec(tools=True, model="m")).own_npu(ask, 0.0, Machine("o", ORCHESTRATION,
                                                                                               "start"))
    assert out is not None and out.ok


def test_a_busy_npu_is_passed_over_and_a_dry_run_only_looks(tmp_path: Path) -> None:
    heard, npu = Heard(), Exec()
    part = runner(tmp_path, heard, npu=npu, clock=Clock(1.0))
    dry = part.own_npu(request(dry_run=True), 0.25, Machine("o", ORCHESTRATION, "start"))
    assert dry is not None and dry.dry_run and dry.ok and dry.path == "local-npu" and dry.total_ms == 750.0
    assert dry.ranking == ({"device": "hub", "mode": "npu", "score": None},) and npu.params == []
    claim = NpuLock(config(tmp_path).state_dir).try_acquire("someone else")
    assert claim is not None
    with claim:
        assert part.own_npu(request(dry_run=True), 0.0, Machine("o", ORCHESTRATION, "start")) is None
        assert part.own_npu(request(), 0.0, Machine("o", ORCHESTRATION, "start")) is None
    assert npu.params == [] and heard.decisions == []


def cpu_run(tmp_path: Path, exe: Exec, interrupted: threading.Event | None = None) -> tuple[Answer, str, Machine]:
    fsm = Machine("o", ORCHESTRATION, "running_local")
    answer, outcome = runner(tmp_path, Heard(), cpu_exec=exe, interrupted=interrupted).on_cpu(request(), fsm)
    return answer, outcome, fsm


def test_a_cpu_run_here_holds_a_slot_for_its_process_and_answers_in_full(tmp_path: Path) -> None:
    exe = Exec()
    answer, outcome, fsm = cpu_run(tmp_path, exe)
    assert outcome == "done" and fsm.state == "done"
    assert answer == Answer(True, ExitCode.OK, "an answer", None, Timings(total_ms=3.0), 2, 4, "stop", ())
    assert len(exe.params[0].hold_fds) == 1, "the child inherits the slot's lock"
    assert CpuSlots(config(tmp_path).state_dir, 1).busy() == 0, "and it is released after"


@pytest.mark.parametrize(("error", "code", "outcome", "state"), [
    (EngineUnavailable("cpu", "refused"), ExitCode.FAILED, "unavailable: refused", "closed"),
    (ExecutionTimeout("cpu", 5.0), ExitCode.TIMEOUT, "error: timed out after 5.0 s", "failed"),
    (ExecutorError("cpu", "crashed", partial_text="an answer, then"), ExitCode.FAILED, "error: crashed", "failed"),
])
def test_a_failure_here_is_told_apart(tmp_path: Path, error: ExecutorError, code: ExitCode, outcome: str,
                                      state: str) -> None:
    answer, said, fsm = cpu_run(tmp_path, Exec(error=error))
    assert (answer.ok, answer.exit_code, said, fsm.state) == (False, code, outcome, state)
    assert answer.error == str(error)
    if state == "failed":
        assert answer.text == (error.partial_text or "an answer"), "the partial text, or what streamed"


def test_a_failure_after_an_interrupt_is_the_interrupt(tmp_path: Path) -> None:
    interrupted = threading.Event()
    interrupted.set()
    answer, said, _ = cpu_run(tmp_path, Exec(error=ExecutorError("cpu", "killed")), interrupted)
    assert answer.exit_code == ExitCode.INTERRUPTED and said == "error: killed"


def test_no_free_cpu_slot_within_the_job_s_time_is_a_timeout(tmp_path: Path) -> None:
    cfg = config(tmp_path, job_timeout_s=0.05)
    heard, exe = Heard(), Exec()
    part = LocalRunner(cfg, heard, npu_exec=None, cpu_exec=exe, clock=Clock(),  # type: ignore[arg-type]
                       interrupted=threading.Event())
    claim = CpuSlots(cfg.state_dir, 1).try_acquire("someone else")
    assert claim is not None
    with claim:
        fsm = Machine("o", ORCHESTRATION, "running_local")
        answer, said = part.on_cpu(request(), fsm)
    assert said == "no free slot" and answer.exit_code == ExitCode.TIMEOUT and fsm.state == "failed"
    assert not answer.ok
    assert answer.error == "no CPU slot of this device came free within 0.05 s" and exe.params == []


def test_this_device_s_models_are_those_its_executors_name(tmp_path: Path) -> None:
    part = runner(tmp_path, Heard(), npu=Exec(model="big"), cpu_exec=Exec())
    assert part.models() == {"big"}
    assert runner(tmp_path, Heard()).models() == set()


# ------------------------------------------------------------------ the flow's endings
def test_no_device_says_what_was_tried_or_what_nobody_offers() -> None:
    tried = ({"device": "a", "outcome": "declined"}, {"device": "hub", "outcome": "error: x"})
    assert no_device(request(model="m"), tried, ["n"]) == Answer(
        False, ExitCode.NO_DEVICE, error="no device can run this job (tried a: declined, hub: error: x)")
    assert no_device(request(), (), []).error == (
        "no device can run this job (no peer bid and this device has no usable executor)")
    missing = no_device(request(model="m"), (), ["a", "b"])
    assert missing.error == "no device serves model 'm' now; the fleet serves: a, b"
    assert missing.kind == "model_not_served" and missing.exit_code == ExitCode.NO_DEVICE
    assert no_device(request(model="m"), (), []).error == (
        "no device serves model 'm' now; no device has announced a model")


def test_no_device_can_call_tools_is_said_as_such() -> None:
    chat = Chat((ChatMessage("user", "hi"),), tools=TOOLS)
    answer = no_device(request(chat=chat, model="m"), (), [])
    assert answer.kind == "no_tools" and answer.error is not None
    assert answer.error.startswith("no device can call tools with model 'm' now")
    assert no_device(request(chat=chat), (), []).error.startswith("no device can call tools now")


def orchestrator(tmp_path: Path, connect: Any, **kw: Any) -> Orchestrator:
    snapshot = Snapshot(has_npu=False, npu_free=False, cpu_slots=kw.pop("slots", 0), cpu_percent=0.0,
                        mem_available_mb=1e3, load1=0.0, queue_depth=0)
    return Orchestrator(kw.pop("cfg", config(tmp_path)), connect=connect, npu_exec=None, cpu_exec=kw.pop("cpu", None),
                        arms=RecordingArms, local_snapshot=lambda: snapshot, **kw)


def unreachable() -> Any:
    raise BrokerUnavailable("x", 1883, "refused")


def test_with_no_broker_and_nothing_here_to_run_it_no_device_does(tmp_path: Path) -> None:
    out = orchestrator(tmp_path, unreachable).run("a prompt")
    assert out.exit_code == ExitCode.NO_DEVICE and out.warnings == () and not out.ok
    assert out.error == "broker x:1883 not reachable: refused, and this device has no usable executor to run it alone"


def test_with_no_broker_this_device_runs_it_alone_and_says_so(tmp_path: Path) -> None:
    decided: list[Decided] = []
    out = orchestrator(tmp_path, unreachable, slots=1, cpu=Exec(), on_decision=decided.append).run("a prompt")
    assert out.ok and out.text == "an answer" and out.winner == "hub" and out.path == "local-cpu"
    assert out.warnings == ("broker x:1883 not reachable: refused; running locally",)
    assert decided == [Decided("hub", "local-cpu", out.score)]


def test_a_dry_run_names_the_winner_and_sends_no_job(tmp_path: Path) -> None:
    fleet = ScriptedFleet({"a": done})
    out = orchestrator(tmp_path, lambda: fleet).run("a prompt", dry_run=True)
    assert out.ok and out.dry_run and out.winner == "a" and out.path == "peer-cpu" and out.score is not None
    assert [(b["device"], b["score"]) for b in out.bids] == [("a", round(out.score, 6))], "each CPU bid's score"
    assert [t for t, _ in fleet.published if T.parse(t).kind == "exec"] == []


def test_an_interrupt_before_the_auction_closes_ends_the_run(tmp_path: Path) -> None:
    orch = orchestrator(tmp_path, lambda: ScriptedFleet({}))
    orch.interrupted.set()
    out = orch.run("a prompt")
    assert out.exit_code == ExitCode.INTERRUPTED and out.error == "interrupted during the auction" and not out.ok


def test_a_warm_orchestrator_hears_the_hooks_it_has_now(tmp_path: Path) -> None:
    """``serve`` swaps the hooks of a warm orchestrator between requests: every part reads
    them when it calls, not when it was built."""
    fleet = ScriptedFleet({"a": done})
    orch = orchestrator(tmp_path, lambda: fleet)
    first: list[Decided] = []
    orch.on_decision = first.append
    orch.run("a prompt")
    second: list[Decided] = []
    orch.on_decision = second.append
    orch.run("a prompt")
    assert [d.winner for d in first] == ["a"] and [d.winner for d in second] == ["a"]


def test_a_model_nobody_serves_is_named_with_the_models_the_fleet_serves(tmp_path: Path) -> None:
    from agent.messages import ModelInfo

    class Serving(ScriptedFleet):
        def bidders(self, model: str | None = None, need: str = "any", tools: bool = False) -> frozenset[str]:
            return frozenset()

        def online(self) -> frozenset[str]:
            return frozenset({"a"})

        def metrics(self) -> dict[str, Any]:
            snap = replace(Snapshot(has_npu=False, npu_free=False, cpu_slots=1, cpu_percent=0.0,
                                    mem_available_mb=1e3, load1=0.0, queue_depth=0),
                           models={"cpu": ModelInfo("small")})
            return {"a": type("M", (), {"snapshot": snap})()}

    cfg = config(tmp_path, bid_timeout_s=0.05)
    out = orchestrator(tmp_path, lambda: Serving({}), cfg=cfg, cpu=Exec(model="mine")).run("p", model="big")
    assert out.exit_code == ExitCode.NO_DEVICE and out.answer.kind == "model_not_served"
    assert out.error == "no device serves model 'big' now; the fleet serves: mine, small"


def test_the_decision_s_own_time_is_reported(tmp_path: Path) -> None:
    """``decide_ms``: from before the arms are read until the ranking is made."""
    clock = Clock(50.0)

    class SlowArms(RecordingArms):
        def load(self) -> Any:
            clock.t += 0.25  # a store on a slow card
            return super().load()

    out = Orchestrator(config(tmp_path), connect=lambda: ScriptedFleet({"a": done}), npu_exec=None,  # type: ignore
                       cpu_exec=None, arms=SlowArms, local_snapshot=lambda: Snapshot(
                           has_npu=False, npu_free=False, cpu_slots=0, cpu_percent=0.0, mem_available_mb=1e3,
                           load1=0.0, queue_depth=0), clock=clock).run("a prompt", dry_run=True)
    assert out.decide_ms == 250.0 and out.total_ms == 250.0


# ------------------------------------------------------------------ what the parts share
class Link:
    """A bus as the wire sees it: connected, its connection count, a round trip."""

    def __init__(self, *, connected: bool = True, epoch: int = 1, answers: bool = True, reconnects: bool = False):
        self.connected, self.epoch, self.answers, self.reconnects = connected, epoch, answers, reconnects
        self.barriers = 0

    def barrier(self, timeout: float) -> bool:
        self.barriers += 1
        if self.reconnects:
            self.epoch += 1
        return self.answers


def wire(bus: Link, known: dict[str, bool] | None = None) -> Wire:
    from types import SimpleNamespace
    roster = SimpleNamespace(known=lambda: known or {})
    return Wire(SimpleNamespace(bus=bus, roster=roster), None, 1)  # type: ignore[arg-type]


def test_the_link_is_steady_only_if_it_is_the_same_connection_and_a_round_trip_works() -> None:
    assert wire(Link()).steady()
    assert not wire(Link(connected=False)).steady()
    assert not wire(Link(epoch=2)).steady(), "reconnected since the run began"
    assert not wire(Link(answers=False)).steady(), "no answer: the broker is going away"
    assert not wire(Link(reconnects=True)).steady(), "reconnected during the round trip"


def test_a_device_is_offline_only_when_its_will_fired_and_the_link_is_steady() -> None:
    bus = Link()
    assert wire(bus, {"a": False}).offline("a") and bus.barriers == 1
    assert not wire(Link(), {"a": True}).offline("a")
    quiet = Link()
    assert not wire(quiet, {}).offline("a") and quiet.barriers == 0, "unknown: not asked"
    assert not wire(Link(answers=False), {"a": False}).offline("a"), "a broker going away: everyone's Will"


def test_a_request_has_tools_only_when_its_chat_offers_some() -> None:
    assert not request().tools
    assert not request(chat=Chat((ChatMessage("user", "hi"),))).tools
    assert request(chat=Chat((ChatMessage("user", "hi"),), tools=TOOLS)).tools


# ------------------------------------------------------------------ the times and counts each ending reports
class Ticking:
    """A connect that takes half a second of the fake clock (and then fails, or gives ``fleet``)."""

    def __init__(self, clock: Clock, fleet: Any = None):
        self.clock, self.fleet = clock, fleet

    def __call__(self) -> Any:
        self.clock.t += 0.5
        if self.fleet is None:
            unreachable()
        return self.fleet


def test_every_ending_reports_the_time_until_it(tmp_path: Path) -> None:
    clock = Clock(10.0)
    out = orchestrator(tmp_path, Ticking(clock), clock=clock).run("p")
    assert out.exit_code == ExitCode.NO_DEVICE and out.total_ms == 500.0, "no broker, nothing here"

    cfg = config(tmp_path, bid_timeout_s=0.05)
    out = orchestrator(tmp_path, Ticking(clock, ScriptedFleet({})), cfg=cfg, clock=clock).run("p", dry_run=True)
    assert out.dry_run and not out.ok and out.winner is None and out.total_ms == 500.0, "a dry run with no winner"
    assert out.exit_code == ExitCode.NO_DEVICE

    out = orchestrator(tmp_path, Ticking(clock, ScriptedFleet({})), cfg=cfg, clock=clock).run("p")
    assert out.exit_code == ExitCode.NO_DEVICE and out.total_ms == 500.0 and out.attempts == (), "nobody bid"

    out = orchestrator(tmp_path, Ticking(clock, ScriptedFleet({"a": done})), clock=clock).run("p")
    assert out.ok and out.total_ms == 500.0, "answered"

    orch = orchestrator(tmp_path, Ticking(clock, ScriptedFleet({})), clock=clock)
    orch.interrupted.set()
    out = orch.run("p")
    assert out.exit_code == ExitCode.INTERRUPTED and out.total_ms == 500.0, "interrupted in the auction"


def test_an_outcome_says_how_many_were_invited_or_that_everyone_was_called(tmp_path: Path) -> None:
    (tmp_path / "called").mkdir()
    (tmp_path / "invited").mkdir()
    everyone = orchestrator(tmp_path, lambda: ScriptedFleet({"a": done, "b": done}), cfg=config(tmp_path / "called"))
    assert everyone.run("p").invited is None
    cfg = config(tmp_path / "invited", invite={"above": 0, "best": 0, "explore": 1})
    few = orchestrator(tmp_path, lambda: ScriptedFleet({"a": done, "b": done}), cfg=cfg)
    assert few.run("p").invited == 1


def test_this_process_is_a_candidate_only_when_no_daemon_of_this_device_bid(tmp_path: Path) -> None:
    alone = orchestrator(tmp_path, lambda: ScriptedFleet({}), slots=1, cpu=Exec()).run("p")
    assert alone.ok and alone.path == "local-cpu" and alone.text == "an answer"
    fleet = ScriptedFleet({"hub": done})  # this device's own daemon bids: the job goes through its gate
    daemon = orchestrator(tmp_path, lambda: fleet, slots=1, cpu=Exec()).run("p")
    assert daemon.ok and daemon.text == "answer" and [r["device"] for r in daemon.ranking] == ["hub"]


def test_a_prompt_is_too_large_when_its_job_with_a_claim_of_32_characters_is(tmp_path: Path) -> None:
    from agent.errors import PromptTooLarge
    cfg = config(tmp_path)
    wall = Clock(1.7e9)
    jobs = Dispatcher(cfg, T, Heard(), clock=Clock(), wall=wall, interrupted=threading.Event())
    fits = len(jobs.job(request(prompt="p" * 5000), "cpu", "x" * 32).to_payload())
    at_the_limit = orchestrator(tmp_path, unreachable, cfg=replace(cfg, max_payload_bytes=fits), wall=wall)
    out = at_the_limit.run("p" * 5000, rid="r1", max_new_tokens=8)
    assert out.exit_code == ExitCode.NO_DEVICE, "accepted, and then nobody runs it"
    with pytest.raises(PromptTooLarge):
        orchestrator(tmp_path, unreachable, cfg=replace(cfg, max_payload_bytes=fits - 1), wall=wall).run(
            "p" * 5000, rid="r1", max_new_tokens=8)


# ------------------------------------------------------------------ the delivery: a peer, event by event
class Events:
    """The inbox's queue, scripted: each ``get`` moves the fake clock on by the first of a
    pair, then gives the second (called, if it is a function; None: nothing came)."""

    def __init__(self, clock: Clock, *script: tuple[float, Any]):
        self.clock, self.script = clock, list(script)

    def get(self, timeout: float) -> Any:
        assert self.script, "the loop waited on past the script"
        advance, event = self.script.pop(0)
        self.clock.t += advance
        event = event() if callable(event) else event
        if event is None:
            raise queue.Empty
        return event


class Peer:
    """One peer's side of a ``Dispatcher.run``: the jobs it was sent, the events it sends back."""

    def __init__(self, tmp_path: Path, *, wall: float = 1.7e9) -> None:
        self.clock, self.bus, self.heard = Clock(0.0), Bus(), Heard()
        self.interrupted = threading.Event()
        self.part = Dispatcher(config(tmp_path), T, self.heard, clock=self.clock, wall=Clock(wall),
                               interrupted=self.interrupted)
        self.progress: list[tuple[float, str]] = []
        self.heard.on_progress = lambda line: self.progress.append((self.clock.t, line))  # type: ignore[method-assign]

    def jobs(self) -> list[Job]:
        return [Job.from_payload(p) for t, p, _ in self.bus.published if t == T.exec("a")]

    def cancels(self) -> list[str]:
        return [Cancel.from_payload(p).reason for t, p, _ in self.bus.published if t == T.cancel("a", "hub")]

    def says(self, event: Any) -> Any:
        """A result event of ``a``'s about the last job sent (made when it is received)."""
        def message() -> tuple[str, Message]:
            ev = replace(event, digest=self.jobs()[-1].digest)
            return "result", Message(T.result("hub", "r1", "a"), encode_result(ev))
        return message

    def run(self, *script: tuple[float, Any], last: bool = True, steady: bool = True) -> Step:
        from types import SimpleNamespace
        self.wanted: list[str] = []  # whose late bids the run asked for
        wire = SimpleNamespace(fleet=SimpleNamespace(bus=self.bus), inbox=SimpleNamespace(
            events=Events(self.clock, *script), book=SimpleNamespace(want_late=self.wanted.append)),
            steady=lambda: steady)
        return self.part.run(wire, request(), "a", "cpu", "claim-a", Decided("a", "peer-cpu", 1.5), last)  # type: ignore


DONE = Done("r1", "a", "the answer", Timings(total_ms=3.0))
OTHERS = ("roster", "b", True)  # another device's news: nothing to this attempt


def test_a_peer_s_tokens_stream_and_the_winner_is_announced_once(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    peer = Peer(tmp_path)
    with caplog.at_level(logging.WARNING, logger="agent.orchestrator"):
        step = peer.run((0.1, peer.says(Accepted("r1", "a", "cpu"))), (0.1, peer.says(Token("r1", "a", 0, "the "))),
                        (0.1, peer.says(Token("r1", "b", 1, "forged"))), (0.1, peer.says(DONE)))
    assert "the ids in it do not match the topic" in caplog.text, "b's token on a's topic is dropped, and said"
    assert step.answer is not None and step.answer.ok and step.answer.text == "the answer"
    assert peer.heard.tokens == ["the "] and peer.heard.decisions == [Decided("a", "peer-cpu", 1.5)]
    assert len(peer.jobs()) == 1 and peer.cancels() == []


def test_a_silent_peer_is_waited_for_with_a_progress_line_each_second(tmp_path: Path) -> None:
    peer = Peer(tmp_path)
    peer.run((1.0, OTHERS), (0.5, OTHERS), (0.6, None), (0.3, peer.says(DONE)))
    assert peer.progress == [(1.0, "waiting for a (dispatched, 0 chunks)"),
                             (2.1, "waiting for a (dispatched, 0 chunks)")]


def test_a_will_met_by_a_slow_round_trip_fails_over_once_our_link_has_held_twice_the_keepalive(
        tmp_path: Path) -> None:
    """The round trip failed but our connection never dropped: twice the keepalive (1 s
    here) and PEER_RECONNECT_S later, the Will is taken as the device's own."""
    from agent.dispatch import PEER_RECONNECT_S
    peer = Peer(tmp_path)
    cfg = peer.part.cfg
    peer.part.cfg = replace(cfg, broker=replace(cfg.broker, keepalive_s=1),
                            auction=replace(cfg.auction, job_timeout_s=60))
    doubt = 2 * 1 + PEER_RECONNECT_S
    step = peer.run((0.1, peer.says(Accepted("r1", "a", "cpu"))), (0.1, ("roster", "a", False)),
                    (doubt - 0.1, None), (0.1, None), last=False, steady=False)
    assert (step.verdict, step.outcome) == ("next", "went offline")
    assert peer.clock.t == pytest.approx(0.2 + doubt)
    assert (0.2, "a and this device lost the broker; waiting for it to come back") in peer.progress


def test_a_streaming_answer_is_its_own_progress(tmp_path: Path) -> None:
    peer = Peer(tmp_path)
    peer.run((0.8, peer.says(Token("r1", "a", 0, "the "))), (0.2, OTHERS), (1.0, OTHERS), (0.1, peer.says(DONE)))
    assert peer.progress == [(2.0, "waiting for a (streaming, 1 chunks)")], "not at 1.0: a token came at 0.8"


def test_a_peer_that_comes_back_is_sent_the_job_again(tmp_path: Path) -> None:
    peer = Peer(tmp_path)
    step = peer.run((0.1, ("roster", "b", False)), (0.1, ("roster", "a", False)), (0.1, ("roster", "a", True)),
                    (0.1, peer.says(DONE)))
    assert step.answer is not None and step.answer.ok and len(peer.jobs()) == 2
    assert [line for _, line in peer.progress] == [
        "a is offline and no other device can run this job; waiting for it to come back (5 s left)"]


def test_a_peer_that_restarted_is_asked_to_bid_again_and_timed_from_its_new_claim(tmp_path: Path) -> None:
    peer = Peer(tmp_path)
    again = Bid("r1", "a", "hub", "claim-new", Snapshot(has_npu=False, npu_free=False, cpu_slots=1, cpu_percent=0.0,
                                                        mem_available_mb=1e3, load1=0.0, queue_depth=0), init_s=2.5)
    step = peer.run((0.1, peer.says(Declined("r1", "a", "stale_claim"))), (0.2, ("bid", again)),
                    (0.1, peer.says(DONE)))
    asked = [BidRequest.from_payload(p) for t, p, kw in peer.bus.published if t == T.bid_invite("a", "r1", "hub")]
    assert len(asked) == 1 and asked[0].rid == "r1" and asked[0].origin == "hub"
    assert [kw["qos"] for t, _, kw in peer.bus.published if t == T.bid_invite("a", "r1", "hub")] == [0]
    assert [job.claim for job in peer.jobs()] == ["claim-a", "claim-new"] and peer.wanted == ["a"]
    assert step.answer is not None and step.answer.ok and step.since == pytest.approx(0.3) and step.bid == again


def test_after_our_own_link_is_back_the_job_is_sent_again_with_the_time_it_has_left(tmp_path: Path) -> None:
    peer = Peer(tmp_path, wall=1.7e9 + 0.12345)
    peer.clock.t = 10.0
    step = peer.run((0.5, ("link", False, False)), (0.5, ("link", True, False)), (0.1, peer.says(DONE)), last=False)
    first, again = peer.jobs()
    assert (first.accept_s, first.timeout_s, first.sent_at) == (0.05, 5.0, round(1.7e9 + 0.12345, 3))
    assert (again.accept_s, again.timeout_s, again.sent_at) == (0.0, 4.0, round(1.7e9 + 0.12345, 3))
    assert again.digest == first.digest and step.answer is not None and step.answer.ok
    assert [kw["qos"] for t, _, kw in peer.bus.published if t == T.exec("a")] == [1, 1]
    assert peer.progress == [(11.0, "reconnected to the broker; sending the job again"),
                             (11.0, "waiting for a (dispatched, 0 chunks)")]
    alone = Peer(tmp_path)
    alone.run((0.5, ("link", False, False)), (0.5, ("link", True, False)), (0.1, alone.says(DONE)), last=True)
    assert [job.accept_s for job in alone.jobs()] == [0.05, 0.05], "no runner-up: the whole accept window"


def test_a_job_past_its_time_is_cancelled_on_its_device(tmp_path: Path) -> None:
    peer = Peer(tmp_path)
    step = peer.run((5.0, None))
    assert step.outcome == "timed out" and peer.cancels() == ["timed out"]
    assert step.answer is not None and step.answer.exit_code == ExitCode.TIMEOUT


def test_an_interrupt_while_waiting_wakes_the_loop_and_cancels_the_job(tmp_path: Path) -> None:
    peer = Peer(tmp_path)

    def interrupt() -> tuple[str]:
        peer.interrupted.set()  # as Orchestrator.interrupt does: the flag, then a wake-up
        return ("interrupt",)

    step = peer.run((0.1, peer.says(Token("r1", "a", 0, "the "))), (0.1, interrupt))
    assert step.outcome == "interrupted" and peer.cancels() == ["interrupted"] and peer.bus.barriers == 1
    assert step.answer is not None and not step.answer.ok and step.answer.text == "the "


def test_a_free_own_npu_answers_without_the_broker_ever_being_contacted(tmp_path: Path) -> None:
    def connect() -> Any:
        raise AssertionError("the local NPU path never connects")

    orch = Orchestrator(config(tmp_path), connect=connect, npu_exec=Exec(), cpu_exec=None,  # type: ignore[arg-type]
                        arms=RecordingArms, local_snapshot=lambda: Snapshot(
                            has_npu=True, npu_free=True, cpu_slots=0, cpu_percent=0.0, mem_available_mb=1e3,
                            load1=0.0, queue_depth=0))
    out = orch.run("p", model=None)
    assert out.ok and out.path == "local-npu" and out.text == "an answer" and out.winner == "hub"


def test_a_token_a_second_ago_is_progress_enough_no_more(tmp_path: Path) -> None:
    peer = Peer(tmp_path)
    peer.run((1.0, peer.says(Token("r1", "a", 0, "the "))), (1.0, OTHERS), (0.1, peer.says(DONE)))
    assert peer.progress == [(2.0, "waiting for a (streaming, 1 chunks)")]


def test_another_device_s_results_are_not_even_decoded(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    peer = Peer(tmp_path)
    elsewhere = ("result", Message(T.result("hub", "r1", "b"), b"not json"))
    other_asker = ("result", Message(T.result("other", "r1", "a"), b"not json"))
    with caplog.at_level(logging.DEBUG, logger="agent.orchestrator"):
        step = peer.run((0.1, elsewhere), (0.1, other_asker), (0.1, peer.says(DONE)))
    assert step.answer is not None and step.answer.ok and caplog.records == []


def test_the_own_npu_s_server_down_is_an_error_not_a_pass(tmp_path: Path) -> None:
    """Only the walk down the ranking passes on; the own NPU path has nowhere to pass to."""
    fsm = Machine("o", ORCHESTRATION, "start")
    out = runner(tmp_path, Heard(), npu=Exec(error=EngineUnavailable("npu", "refused"))).own_npu(request(), 0.0, fsm)
    assert out is not None and out.attempts == ({"device": "hub", "outcome": "error: refused"},)
    assert fsm.state == "failed" and out.exit_code == ExitCode.FAILED


def test_the_time_spent_waiting_for_a_slot_is_taken_from_the_job_s(tmp_path: Path) -> None:
    times = iter([10.0, 12.0])
    exe = Exec()
    part = runner(tmp_path, Heard(), cpu_exec=exe, clock=lambda: next(times))  # type: ignore[arg-type]
    part.on_cpu(request(), Machine("o", ORCHESTRATION, "running_local"))
    assert exe.params[0].timeout_s == 3.0


def test_a_wait_for_a_slot_is_shown_once_a_second(tmp_path: Path) -> None:
    heard = Heard()
    on_wait = runner(tmp_path, heard)._slot_progress()
    for waited in (0.5, 1.0, 1.5, 1.9, 2.0, 3.5):
        on_wait(waited)
    assert heard.progress == [f"waiting for a free CPU slot on this device ({n} s)" for n in ("1", "2", "4")]


def test_the_round_robin_cursor_moves_only_when_a_real_run_moved_it(tmp_path: Path) -> None:
    stores: list[RecordingArms] = []

    class Cursors(RecordingArms):
        def __init__(self) -> None:
            super().__init__()
            self.cursors: list[int] = []
            stores.append(self)

        def set_cursor(self, cursor: int) -> None:
            self.cursors.append(cursor)

    fleet = ScriptedFleet({"a": done, "b": done})
    for policy, dry_run in (("round_robin", False), ("round_robin", True), ("linucb", False)):
        (tmp_path / policy / str(dry_run)).mkdir(parents=True)
        cfg = config(tmp_path / policy / str(dry_run), policy=policy)
        Orchestrator(cfg, connect=lambda: fleet, npu_exec=None, cpu_exec=None, arms=Cursors,  # type: ignore
                     local_snapshot=lambda: Snapshot(has_npu=False, npu_free=False, cpu_slots=0, cpu_percent=0.0,
                                                     mem_available_mb=1e3, load1=0.0, queue_depth=0)
                     ).run("p", dry_run=dry_run)
    assert [s.cursors for s in stores] == [[1], [], []]


def test_a_prompt_asks_for_256_new_tokens_unless_told(tmp_path: Path) -> None:
    fleet = ScriptedFleet({"a": done})
    orch = orchestrator(tmp_path, lambda: fleet)
    orch.run("p")
    assert [Job.from_payload(p).max_new_tokens for t, p in fleet.published if t == T.exec("a")] == [256]


def test_an_interrupt_with_no_run_in_flight_only_sets_the_flag(tmp_path: Path) -> None:
    orch = orchestrator(tmp_path, unreachable)
    orch.interrupt()
    assert orch.interrupted.is_set()
