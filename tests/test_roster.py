"""The roster as the bus feeds it: availability, metrics, and whom an auction waits for."""

from __future__ import annotations

from typing import Any

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


def test_the_bidders_are_the_same_object_until_someone_joins_or_leaves() -> None:
    """An invitation's view compares the bidders with what it had on every auction: while
    only metrics changed, the roster hands back the very set it gave last time."""
    roster = roster_of(a=True, b=True, hub=True)
    roster.handle_metrics(metrics("a"))
    first = roster.bidders()
    roster.handle_metrics(metrics("a"))  # new metrics, the same answer
    roster.handle_metrics(metrics("b"))
    assert roster.bidders() is first
    roster.handle_metrics(metrics("b", "draining"))
    second = roster.bidders()
    assert second == {"a", "hub"} and first == {"a", "b", "hub"}, "the set handed out earlier is not changed"
    roster.handle_metrics(metrics("b"))  # one left and one came back in the same changes
    roster.handle_metrics(metrics("a", "draining"))
    assert roster.bidders() == {"b", "hub"}
    roster.handle(Message(TOPICS.availability("c"), b"online", retain=True))
    assert roster.bidders() == {"b", "c", "hub"}
    assert roster.bidders("other-model") == {"c", "hub"}, "each job kind its own (b serves no such model)"


def test_bidders_half_worked_out_when_something_raised_are_worked_out_whole_next_time(monkeypatch: Any) -> None:
    import agent.roster
    roster = roster_of(a=True, b=True)
    assert roster.bidders() == {"a", "b"}
    roster.handle_metrics(metrics("a", "draining"))
    roster.handle_metrics(metrics("b"))

    def broken(*args: Any) -> bool:
        raise RuntimeError("a bug")
    with monkeypatch.context() as m:
        m.setattr(agent.roster, "can_take", broken)
        try:
            roster.bidders()
        except RuntimeError:
            pass
        else:
            raise AssertionError("the error is not swallowed")
    assert roster.bidders() == {"b"}


def test_availability_accepts_online_offline_and_a_cleared_topic_only() -> None:
    roster = roster_of(a=True, b=True)
    heard: list[tuple[str, bool]] = []
    roster.listen(lambda device, up: heard.append((device, up)))
    roster.handle(Message(TOPICS.availability("a"), b"maybe", retain=False))
    roster.handle(Message(TOPICS.availability("b"), b"", retain=True))
    roster.handle(Message(TOPICS.availability("b"), b"", retain=True))
    assert roster.known() == {"a": True}, "a cleared topic: the device was retired (forget)"
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


def test_an_auction_does_not_wait_for_a_device_that_can_run_nothing() -> None:
    """A device that only asks (no NPU, no CPU runner) never bids: nobody waits for it."""
    from dataclasses import replace
    roster = roster_of(asker=True, cpu=True, npu=True)
    for device, npu, slots in (("asker", False, 0), ("cpu", False, 1), ("npu", True, 0)):
        m = Metrics.from_payload(metrics(device, npu=npu).payload)
        roster.handle_metrics(Message(TOPICS.metrics(device), replace(
            m, snapshot=replace(m.snapshot, cpu_slots=slots)).to_payload(), retain=True))
    assert roster.bidders() == {"cpu", "npu"}
    assert roster.bidders(need="npu") == {"npu"}, "a job that needs an NPU waits for the NPUs only"


def caps(device: str, npu: bool = False, models: tuple[str, ...] | None = None) -> Message:
    from agent.messages import Capabilities
    return Message(TOPICS.capabilities(device), Capabilities(device, npu, models).to_payload(), retain=True)


def bid(device: str, *, npu: bool, models: dict[str, str] | None = None) -> Any:
    from agent.messages import Bid, ModelInfo
    snap = Snapshot(has_npu=npu, npu_free=npu, cpu_slots=1, cpu_percent=0.0, mem_available_mb=1.0, load1=0.0,
                    queue_depth=0, models={mode: ModelInfo(name) for mode, name in (models or {}).items()})
    return Bid("r1", device, "hub", "claim", snap)


def test_claims_beyond_what_the_operator_granted_are_ignored() -> None:
    roster = roster_of(liar=True, board=True, cpu=True)
    bids = {"liar": bid("liar", npu=True), "board": bid("board", npu=True, models={"npu": "llama", "cpu": "qwen"}),
            "cpu": bid("cpu", npu=False, models={"cpu": "qwen"})}
    assert roster.vouched(bids) == bids, "no records in the fleet: claims are taken as they are"
    roster.handle_capabilities(caps("board", npu=True, models=("llama",)))
    roster.handle_capabilities(caps("cpu"))
    vouched = roster.vouched(bids)
    assert not vouched["liar"].snapshot.has_npu and not vouched["liar"].snapshot.npu_free, "no record: no NPU"
    assert vouched["board"].snapshot.npu_free and set(vouched["board"].snapshot.models) == {"npu"}, "llama only"
    assert vouched["cpu"] == bids["cpu"], "within its grant: untouched"
    assert not roster.may_have_free_npu("liar") and roster.may_have_free_npu("board")


def test_a_capabilities_record_must_name_its_own_device_and_can_be_cleared() -> None:
    roster = roster_of(liar=True)
    forged = caps("liar", npu=True)
    roster.handle_capabilities(Message(TOPICS.capabilities("other"), forged.payload, retain=True))
    roster.handle_capabilities(caps("someone"))
    assert not roster.vouched({"liar": bid("liar", npu=True)})["liar"].snapshot.has_npu
    roster.handle_capabilities(Message(TOPICS.capabilities("someone"), b"", retain=True))
    assert roster.vouched({"liar": bid("liar", npu=True)})["liar"].snapshot.has_npu, "no records left"


def count_decodes(monkeypatch) -> list[bytes]:
    """Every metrics payload decoded from now on."""
    decodes: list[bytes] = []
    real = Metrics.from_payload

    def counting(payload: bytes, max_bytes: int = 256 * 1024) -> Metrics:
        decodes.append(payload)
        return real(payload, max_bytes)

    monkeypatch.setattr(Metrics, "from_payload", counting)
    return decodes


def test_metrics_are_decoded_once_when_first_needed_and_only_the_latest(monkeypatch) -> None:
    decodes = count_decodes(monkeypatch)
    roster = roster_of(a=True, b=True)
    for health in ("ok", "draining", "ok", "draining"):   # a thousand devices: a hundred a second
        roster.handle_metrics(metrics("a", health))
    live = metrics("a")
    roster.handle_metrics(Message(live.topic, live.payload, retain=False))
    roster.handle_metrics(metrics("a", "draining"))
    assert decodes == [], "stored as it came, a live one's clock read from its head"
    assert roster.offsets.offset("a") == 0.0
    assert roster.bidders() == {"b"} and len(decodes) == 1, "only the latest is decoded, when needed"
    assert roster.bidders() == {"b"} and len(decodes) == 1, "and only once"
    roster.handle_metrics(Message(TOPICS.metrics("a"), b"{not json", retain=True))
    assert roster.bidders() == {"b"} and len(decodes) == 2, "a bad one is dropped: the last good one stands"


def test_a_clock_is_measured_from_when_its_metrics_came_not_when_they_are_decoded() -> None:
    now = [160.0]
    roster = Roster(TOPICS, "hub", wall=lambda: now[0])
    live = metrics("a")
    roster.handle_metrics(Message(live.topic, live.payload, retain=False))
    now[0] = 900.0
    assert roster.offsets.offset("a") == 60.0
    assert roster.offsets.age("a", 100.0, 900.0) == 740.0


def test_metrics_laid_out_otherwise_are_decoded_at_once_as_before() -> None:
    import json
    roster = Roster(TOPICS, "hub", wall=lambda: 160.0)
    obj = json.loads(metrics("a").payload)
    reordered = json.dumps(dict(reversed(list(obj.items())))).encode()  # another encoder: "ts" not up front
    roster.handle_metrics(Message(TOPICS.metrics("a"), reordered, retain=False))
    assert roster.offsets.offset("a") == 60.0 and "a" in roster.metrics()
    roster.handle_metrics(Message(TOPICS.metrics("b"), b'{"v":3,"device":"b","ts":1', retain=False))
    assert roster.offsets.offset("b") is None, "garbage measures nothing"


def test_bidders_are_worked_out_again_only_where_something_changed(monkeypatch) -> None:
    """A thousand devices, every auction: who would bid is kept per job kind and worked out
    again for the devices whose availability or metrics changed since, not for all."""
    roster = roster_of(a=True, b=True, c=True)
    for d in "abc":
        roster.handle_metrics(metrics(d))
    assert roster.bidders() == {"a", "b", "c"}
    decodes = count_decodes(monkeypatch)
    roster.handle_metrics(metrics("b", "draining"))
    assert roster.bidders() == {"a", "c"} and len(decodes) == 1, "b alone worked out again"
    roster.handle(Message(TOPICS.availability("c"), b"offline"))
    roster.handle(Message(TOPICS.availability("d"), b"online"))
    assert roster.bidders() == {"a", "d"}, "c gone, d new (no metrics yet: expected)"
    roster.handle_metrics(Message(TOPICS.metrics("a"), b"", retain=True))  # a retired device's metrics cleared
    roster.handle_metrics(metrics("b"))
    assert roster.bidders() == {"a", "b", "d"}
    roster.drop("d")
    assert roster.bidders() == {"a", "b"} and roster.online() == {"a", "b"}
    assert roster.bidders(model="m") == {"a"}, "another job kind, worked out whole: b serves no m, a said nothing"


def test_the_job_kinds_kept_are_bounded_whatever_models_callers_name() -> None:
    from agent.roster import BIDDER_KINDS
    roster = roster_of(a=True)
    for i in range(3 * BIDDER_KINDS):
        roster.bidders(model=f"model-{i}")
    assert len(roster._bidders) == BIDDER_KINDS
    assert roster.bidders() == {"a"}


def test_when_metrics_were_sent_on_our_clock_where_that_can_be_told() -> None:
    now = [160.0]
    roster = Roster(TOPICS, "hub", wall=lambda: now[0])
    def sent() -> float | None:
        return roster.rows(["a"])[0][1]

    roster.handle_metrics(metrics("a"))   # retained, its clock not measured yet: cannot be told
    assert sent() is None
    live = metrics("a")                   # stamped 100, heard at 160: its clock is 60 s behind
    roster.handle_metrics(Message(live.topic, live.payload, retain=False))
    assert sent() == 160.0
    roster.handle_metrics(metrics("a"))   # a retained one now: its stamp on our clock
    assert sent() == 160.0
    roster.handle_metrics(Message(TOPICS.metrics("a"), b"", retain=True))
    assert roster.rows(["a"]) == [(None, None)], "cleared: forgotten"
