"""The roster as the bus feeds it: availability, metrics, and whom an auction waits for."""

from __future__ import annotations

from agent.bus import Message
from agent.messages import Metrics, Snapshot
from agent.roster import Roster
from agent.topics import Topics

TOPICS = Topics("t/")


def metrics(device: str, health: str = "ok", *, npu: bool = False) -> Message:
    snap = Snapshot(has_npu=npu, npu_free=npu, cpu_slots=1, cpu_percent=0.0, mem_available_mb=1.0, load1=0.0,
                    queue_depth=0)
    return Message(TOPICS.metrics(device), Metrics(device=device, ts=100.0, snapshot=snap, health=health).to_payload(),
                   retain=True)


def roster_of(**online: bool) -> Roster:
    roster = Roster(TOPICS, "hub", wall=lambda: 100.0)
    for device, up in online.items():
        roster.handle(Message(TOPICS.availability(device), b"online" if up else b"offline", retain=True))
    return roster


def test_an_auction_waits_for_online_devices_that_take_work() -> None:
    roster = roster_of(a=True, b=True, c=True, d=False, hub=True)
    roster.handle_metrics(metrics("a"))
    roster.handle_metrics(metrics("b", "draining"))
    roster.handle_metrics(metrics("c", "cannot write /var/lib/edge-agent: No space left on device"))
    assert roster.bidders() == {"a", "hub"}, "no metrics yet: still expected; draining or unhealthy: not"
    roster.handle_metrics(metrics("b"))
    assert roster.bidders() == {"a", "b", "hub"}, "back to ok: expected again"
    assert roster.peers_online() == {"a", "b", "c"}


def test_availability_accepts_online_offline_and_a_cleared_topic_only() -> None:
    roster = roster_of(a=True, b=True)
    heard: list[tuple[str, bool]] = []
    roster.listen(lambda device, up: heard.append((device, up)))
    roster.handle(Message(TOPICS.availability("a"), b"maybe", retain=False))
    roster.handle(Message(TOPICS.availability("b"), b"", retain=True))
    roster.handle(Message(TOPICS.availability("b"), b"", retain=True))
    assert roster.known() == {"a": True, "b": False}
    assert heard == [("b", False)], "listeners hear changes, once"


def test_metrics_that_lie_about_their_device_are_dropped() -> None:
    roster = roster_of(a=True)
    forged = metrics("b", npu=True)
    roster.handle_metrics(Message(TOPICS.metrics("a"), forged.payload, retain=True))
    assert roster.metrics() == {}
    assert roster.may_have_free_npu("a"), "unknown: it could"
    roster.handle_metrics(metrics("a"))
    assert not roster.may_have_free_npu("a")


def test_a_job_for_a_model_waits_only_for_devices_that_serve_it() -> None:
    from dataclasses import replace

    from agent.messages import ModelInfo
    roster = roster_of(a=True, b=True, c=True)
    with_model = Metrics.from_payload(metrics("a").payload)
    roster.handle_metrics(Message(TOPICS.metrics("a"), replace(with_model, snapshot=replace(
        with_model.snapshot, models={"cpu": ModelInfo("llama", aliases=("l",))})).to_payload(), retain=True))
    roster.handle_metrics(metrics("b"))  # serves no named model
    assert roster.bidders("llama") == {"a", "c"} == roster.bidders("l"), "c: no metrics yet, could"
    assert roster.bidders() == {"a", "b", "c"}


def test_a_job_with_tools_waits_only_for_devices_that_can_call_them() -> None:
    from dataclasses import replace

    from agent.messages import ModelInfo
    roster = roster_of(a=True, b=True, c=True)
    for device, tools in (("a", True), ("b", False)):
        m = Metrics.from_payload(metrics(device).payload)
        roster.handle_metrics(Message(TOPICS.metrics(device), replace(m, snapshot=replace(
            m.snapshot, models={"cpu": ModelInfo("edge-agent", tools=tools)})).to_payload(), retain=True))
    assert roster.bidders(None, tools=True) == {"a", "c"}, "c: no metrics yet, could"
    assert roster.bidders("edge-agent", tools=True) == {"a", "c"}
    assert roster.bidders() == {"a", "b", "c"}


def test_only_live_metrics_measure_a_clock_a_retained_one_may_be_old() -> None:
    roster = Roster(TOPICS, "hub", wall=lambda: 160.0)
    roster.handle_metrics(metrics("a"))  # retained, stamped 100: could be a minute old
    assert roster.offsets.offset("a") is None and "a" in roster.metrics()
    live = metrics("a")
    roster.handle_metrics(Message(live.topic, live.payload, retain=False))
    assert roster.offsets.offset("a") == 60.0
