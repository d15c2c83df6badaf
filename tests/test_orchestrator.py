"""The orchestration loop against a scripted fleet, no broker: what it sends, and what it
learns. (The broker tests prove the wiring; these pin the loop's own decisions.)"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from agent.bus import Message
from agent.config import Config, load_config
from agent.feeds import Changes
from agent.linucb import Arms
from agent.mailroom import Mailroom
from agent.messages import Accepted, Bid, Done, Error, Job, ResultEvent, Snapshot, Timings, encode_result
from agent.orchestrator import Orchestrator
from agent.topics import Topics

T = Topics("")
CAP_S = 77.0

# What a scripted peer does with a job: the events it sends back (none: silent).
Script = Callable[[Job], list[ResultEvent]]


def done(job: Job, device: str) -> list[ResultEvent]:
    return [Accepted(job.rid, device, job.mode, digest=job.digest),
            Done(job.rid, device, "answer", Timings(total_ms=5.0), digest=job.digest)]


def failed(job: Job, device: str) -> list[ResultEvent]:
    return [Accepted(job.rid, device, job.mode, digest=job.digest),
            Error(job.rid, device, "the model crashed", kind="failed", digest=job.digest)]


class ScriptedFleet:
    """A bus, roster and mailroom in one: every peer bids at once; a job gets its script."""

    def __init__(self, peers: dict[str, Callable[[Job, str], list[ResultEvent]] | None]):
        self.peers = peers
        self.published: list[tuple[str, bytes]] = []
        self.qos: dict[str, int] = {}  # the QoS each topic was published at
        self.props: dict[str, set[str]] = {}  # the MQTT 5 properties each was published with
        self.batches: list[list[str]] = []  # the topics of each publish_many
        self._subs: dict[str, Callable[[Message], None]] = {}
        self.bus = self
        self.roster = self
        self.epoch, self.connected = 1, True
        self.mail = Mailroom(self, T, "hub")  # type: ignore[arg-type]

    # bus
    def subscribe(self, topic_filter: str, handler: Callable[[Message], None], qos: int = 1, *,
                  inline: bool = False) -> object:
        self._subs[topic_filter] = handler
        return object()

    def on_link(self, listener: Callable[[bool, bool], None]) -> Callable[[], None]:
        return lambda: None

    def barrier(self, timeout: float) -> bool:
        return True

    def publish_many(self, messages: list[tuple[str, bytes]]) -> None:
        """As the bus: each at QoS 0, without properties."""
        self.batches.append([topic for topic, _ in messages])
        for topic, payload in messages:
            self.publish(topic, payload, qos=0)

    def publish(self, topic: str, payload: bytes, **kw: Any) -> None:
        self.published.append((topic, payload))
        self.qos[topic] = kw.get("qos", 1)
        self.props[topic] = {k for k in ("expiry_s", "response_topic", "correlation_data") if kw.get(k) is not None}
        parsed = T.parse(topic)
        assert parsed is not None, topic
        if parsed.kind in ("bid_request", "bid_invite"):
            for device in self.peers if parsed.kind == "bid_request" else [parsed.device or ""]:
                bid = Bid(parsed.rid or "", device, "hub", f"claim-{device}", Snapshot(
                    has_npu=False, npu_free=False, cpu_slots=1, cpu_percent=0.0, mem_available_mb=1e3, load1=0.0,
                    queue_depth=0), service_s=None if device.startswith("new") else ESTIMATES.get(device, PROMISE_S),
                    service_n=0.0 if device.startswith("new") else 10.0)  # a record of ten jobs
                self._subs[T.all_bid_replies("hub")](Message(T.bid_reply("hub", bid.rid, device), bid.to_payload()))
        elif parsed.kind == "exec":
            job = Job.from_payload(payload)
            script = self.peers[parsed.device or ""]
            for event in script(job, parsed.device or "") if script else []:
                self._subs[T.all_results("hub")](Message(T.result("hub", job.rid, event.device), encode_result(event)))

    def cancels(self) -> list[str]:
        return [t for t, _ in self.published if (p := T.parse(t)) is not None and p.kind == "cancel"]

    # roster
    def bidders(self, model: str | None = None, need: str = "any", tools: bool = False) -> frozenset[str]:
        return frozenset(self.peers)

    def listen(self, listener: Callable[[str, bool], None]) -> Callable[[], None]:
        return lambda: None

    def may_have_free_npu(self, device: str) -> bool:
        return False

    def vouched(self, bids: dict[str, Bid]) -> dict[str, Bid]:
        return bids

    def known(self) -> dict[str, bool]:
        return {device: True for device in self.peers}

    def online(self) -> frozenset[str]:
        return frozenset(self.peers)

    def metrics(self) -> dict[str, Any]:
        return {}

    def feed(self) -> Changes:
        return Changes(threading.Lock())  # the peers never change

    def rows(self, devices: Collection[str]) -> list[tuple[Snapshot | None, float | None]]:
        return [(None, None) for _ in devices]

    # fleet
    def sync(self) -> None:
        return None


class RecordingArms:
    def __init__(self) -> None:
        self.trained: list[tuple[str, float | None]] = []

    def load(self) -> Arms:
        return Arms()

    def train(self, device: str, x: np.ndarray, y: float | None, rid: str, base: float = 0.0) -> bool:
        assert y is None or base == PROMISE_S, "the promise judges a surprise"
        self.trained.append((device, y))
        return True

    def mark_exploring(self, device: str, rid: str, until: float) -> None:
        return None

    def set_cursor(self, cursor: int) -> None:
        return None


PROMISE_S = 2.0  # a scripted device's own estimate of the job
ESTIMATES = {"a-silent": 1.0}  # ... the one that must be tried first says it is quicker


def config(tmp_path: Path, **auction: Any) -> Config:
    path = tmp_path / "hub.yaml"
    path.write_text(yaml.safe_dump({
        "device_id": "hub", "state_dir": str(tmp_path / "state"), "npu": {"enabled": False},
        "cpu": {"enabled": False},
        "auction": {"bid_timeout_s": 5, "accept_timeout_s": 0.05, "job_timeout_s": 5,
                    "linucb": {"latency_cap_s": CAP_S}, **auction}}))
    return load_config(path, env={})


def orchestrate(tmp_path: Path, fleet: ScriptedFleet, **auction: Any) -> tuple[Any, RecordingArms]:
    arms = RecordingArms()
    idle = Snapshot(has_npu=False, npu_free=False, cpu_slots=0, cpu_percent=0.0, mem_available_mb=1e3, load1=0.0,
                    queue_depth=0)
    connect: Any = lambda: fleet  # noqa: E731  (the scripted fleet stands in for agent.fleet.Fleet)
    orch = Orchestrator(config(tmp_path, **auction), connect=connect, npu_exec=None, cpu_exec=None,
                        arms=lambda: arms, local_snapshot=lambda: idle)
    return orch.run("a prompt", max_new_tokens=8), arms


def test_an_answer_trains_the_arm_of_the_device_that_gave_it(tmp_path: Path) -> None:
    """With what its promise missed: here the answer came far sooner than promised."""
    fleet = ScriptedFleet({"a": done})
    out, arms = orchestrate(tmp_path, fleet)
    assert out.ok and out.winner == "a" and out.text == "answer"
    assert [d for d, _ in arms.trained] == ["a"]
    y = arms.trained[0][1]
    assert y is not None and -PROMISE_S < y < -PROMISE_S + 1.0
    assert fleet.cancels() == []


def test_a_call_to_everyone_is_qos_1_and_invitations_qos_0(tmp_path: Path) -> None:
    """A call to everyone keeps the seed's QoS 1; an invitation, one of many small ones a
    large fleet sends, is QoS 0: an invitee that misses it is overdue within a second, and
    on a broker that persists QoS 1 (NATS's JetStream) each cost a store write."""
    fleet = ScriptedFleet({"a": done, "b": done})
    out, _ = orchestrate(tmp_path, fleet)
    assert out.ok and [q for t, q in fleet.qos.items() if T.parse(t).kind == "bid_request"] == [1]
    fleet = ScriptedFleet({"a": done, "b": done})
    (tmp_path / "2").mkdir()
    out, _ = orchestrate(tmp_path / "2", fleet, invite={"above": 0, "best": 1, "explore": 2})
    invites = {t: q for t, q in fleet.qos.items() if T.parse(t).kind == "bid_invite"}
    assert out.ok and len(invites) == 2 and set(invites.values()) == {0}, fleet.qos
    assert fleet.batches == [list(invites)], "all of them in one batch (one write, one wake-up)"


def test_invitations_carry_no_mqtt5_properties_a_call_to_everyone_does(tmp_path: Path) -> None:
    """Packing properties in pure Python cost 56 µs an invitation (bench --scale: 1.1 ms of
    20); the topic and the payload say where to answer and how old the call is."""
    fleet = ScriptedFleet({"a": done, "b": done})
    assert orchestrate(tmp_path, fleet)[0].ok
    calls = [p for t, p in fleet.props.items() if T.parse(t).kind == "bid_request"]
    assert calls == [{"expiry_s", "response_topic", "correlation_data"}]
    fleet = ScriptedFleet({"a": done, "b": done})
    (tmp_path / "2").mkdir()
    assert orchestrate(tmp_path / "2", fleet, invite={"above": 0, "best": 1, "explore": 2})[0].ok
    invites = [p for t, p in fleet.props.items() if T.parse(t).kind == "bid_invite"]
    assert invites == [set(), set()], fleet.props


def test_auction_ms_counts_choosing_whom_to_call_and_calling_them(tmp_path: Path) -> None:
    """From the auction's start, not from the last call sent: at a thousand devices the
    choice and twenty invitations are part of what the auction costs."""
    now = [100.0]

    class Slow(ScriptedFleet):
        def publish(self, topic: str, payload: bytes, **kw: Any) -> None:
            if T.parse(topic).kind == "bid_invite":
                now[0] += 0.004   # each invitation takes 4 ms to send; the bids come at once
            super().publish(topic, payload, **kw)

    cfg = config(tmp_path, invite={"above": 0, "best": 1, "explore": 2})
    idle = Snapshot(has_npu=False, npu_free=False, cpu_slots=0, cpu_percent=0.0, mem_available_mb=1e3, load1=0.0,
                    queue_depth=0)
    fleet = Slow({"a": done, "b": done})
    connect: Any = lambda: fleet  # noqa: E731
    orch = Orchestrator(cfg, connect=connect, npu_exec=None, cpu_exec=None, arms=RecordingArms,
                        local_snapshot=lambda: idle, clock=lambda: now[0])
    out = orch.run("a prompt", max_new_tokens=8)
    assert out.ok and out.auction_ms == pytest.approx(8.0), out.auction_ms


def queued(job: Job, device: str) -> list[ResultEvent]:
    return [Accepted(job.rid, device, job.mode, digest=job.digest),
            Done(job.rid, device, "answer", Timings(queue_ms=1500.0, total_ms=1505.0), digest=job.digest)]


def test_the_time_a_job_waited_in_the_device_queue_is_not_its_residual(tmp_path: Path) -> None:
    """The wait is priced by the device's backlog; the arm learns only the job's own time
    against its promise (here the scripted answer is instant: all of it was queue)."""
    out, arms = orchestrate(tmp_path, ScriptedFleet({"a": queued}))
    assert out.ok
    y = arms.trained[0][1]
    assert y is not None and y < -PROMISE_S - 1.4, y


def test_a_device_with_no_estimate_teaches_nothing_but_ends_its_exploration(tmp_path: Path) -> None:
    out, arms = orchestrate(tmp_path, ScriptedFleet({"new": done}))
    assert out.ok and arms.trained == [("new", None)]


def test_a_failure_is_learnt_as_the_latency_cap(tmp_path: Path) -> None:
    out, arms = orchestrate(tmp_path, ScriptedFleet({"a": failed}))
    assert not out.ok and "crashed" in (out.error or "")
    assert arms.trained == [("a", CAP_S - PROMISE_S)], "a device that fails must look slow, never fast"


def test_a_winner_that_never_accepts_is_told_to_drop_the_job_and_the_runner_up_answers(tmp_path: Path) -> None:
    fleet = ScriptedFleet({"a-silent": None, "b": done})
    out, arms = orchestrate(tmp_path, fleet)
    assert out.ok and out.winner == "b"
    assert [a["device"] for a in out.attempts] == ["a-silent", "b"]
    assert fleet.cancels() == [T.cancel("a-silent", "hub")], "its copy of the job must not run later"
    assert [d for d, _ in arms.trained] == ["b"]


def test_the_job_sent_carries_the_claim_its_device_gave(tmp_path: Path) -> None:
    fleet = ScriptedFleet({"a": done})
    orchestrate(tmp_path, fleet)
    jobs = [Job.from_payload(p) for t, p in fleet.published if (x := T.parse(t)) is not None and x.kind == "exec"]
    assert [j.claim for j in jobs] == ["claim-a"] and jobs[0].cancel_check
