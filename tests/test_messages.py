"""Wire messages (schema v2): round trips, and one typed error for anything else."""

from __future__ import annotations

import json
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import MessageError
from agent.messages import (
    SCHEMA_VERSION,
    Accepted,
    Bid,
    BidRequest,
    Cancel,
    Chat,
    ChatMessage,
    Declined,
    Done,
    Error,
    Job,
    LastResult,
    LatencySummary,
    Metrics,
    ModelInfo,
    Snapshot,
    Timings,
    Token,
    ToolCall,
    TriggerRequest,
    decode_result,
    encode_result,
)

SNAP = Snapshot(has_npu=True, npu_free=False, cpu_slots=2, cpu_percent=12.5, mem_available_mb=2048.0,
                load1=0.4, queue_depth=1, temperature_c=None, on_battery=False,
                recent={"cpu": LatencySummary(4, 350.0, 12.5)}, backlog_s=1.25)
JOB = Job("r1", "hub", "cpu", "claim.1", "héllo ✓", 64, 3.0, 600.0, "result/hub/r1", 0.7, sent_at=1e9)


@pytest.mark.parametrize("msg", [
    BidRequest("r1", "hub", 30.0, 12, 64, "npu", sent_at=1.7e9),
    BidRequest("r1", "hub", 30.0, 12, 64, sent_at=1.7e9, model="qwen", tools=True),
    Bid("r1", "dev-1", "hub", "claim.1", SNAP, service_s=1.5, service_n=12.0),
    JOB,
    Cancel("r1", "hub", "0123456789abcdef", "no accept in time"),
])
def test_round_trip(msg) -> None:
    assert type(msg).from_payload(msg.to_payload()) == msg


def test_a_bid_with_its_snapshot_encoded_apart_is_the_same_bytes() -> None:
    from agent.messages import encode_json, snapshot_members
    bid = Bid("r1", "dev-1", "hub", "claim.1", SNAP, service_s=1.5, service_n=12.0, init_s=0.25)
    whole = encode_json({"v": SCHEMA_VERSION, "rid": "r1", "device": "dev-1", "origin": "hub", "claim": "claim.1",
                         "service_s": 1.5, "service_n": 12.0, "init_s": 0.25, **SNAP.to_obj()})
    assert bid.to_payload() == bid.to_payload(snapshot_members(SNAP)) == whole


def test_metrics_round_trip() -> None:
    m = Metrics("dev-1", 1e9, SNAP, last_latency_ms=5.0, health="state_dir unwritable")
    assert Metrics.from_payload(m.to_payload()) == m


@pytest.mark.parametrize("event", [
    Accepted("r1", "d", "npu", 3, digest="abc"), Declined("r1", "d", "npu_busy"), Token("r1", "d", 7, "tok"),
    Done("r1", "d", "text", Timings(1, 2, 3, 4, 10), 5, 6, digest="abc"),
    Done("r1", "d", "text", Timings(), 5, 6, digest="abc", finish_reason="length"),
    Error("r1", "d", "boom", "timeout", 2, "par"), Error("r1", "d", "refused", "unavailable"),
])
def test_result_events_round_trip(event) -> None:
    assert decode_result(encode_result(event)) == event


def test_every_message_says_its_schema_version() -> None:
    assert SCHEMA_VERSION == 3
    for payload in (JOB.to_payload(), encode_result(Token("r1", "d", 0, "x")),
                    LastResult("r1", "d", None, None, False, "", None, 0.0).to_payload()):
        assert json.loads(payload)["v"] == 3


def test_the_job_digest_covers_what_it_asks_for_not_how_it_travels() -> None:
    from dataclasses import replace
    assert len(JOB.digest) == 16
    assert replace(JOB, accept_s=1.0, timeout_s=5.0, sent_at=0.0, claim="other").digest == JOB.digest
    for change in ({"prompt": "other"}, {"origin": "evil"}, {"mode": "npu"}, {"max_new_tokens": 65},
                   {"temperature": None}):
        assert replace(JOB, **change).digest != JOB.digest, change


def obj(**over):
    base = json.loads(BidRequest("r1", "hub", 30.0, 12, 64).to_payload())
    base.update(over)
    return json.dumps(base).encode()


@pytest.mark.parametrize("payload,field", [
    (b"\xff", None), (b"nope", None), (b"[1]", None), (obj(v=1), "v"), (obj(v=None), "v"), (obj(v=True), "v"),
    (obj(rid=5), "rid"), (obj(rid="has/slash"), "rid"), (obj(rid="x" * 65), "rid"), (obj(rid="r1\n"), "rid"),
    (obj(window_s="soon"), "window_s"), (obj(window_s=-1), "window_s"),
    (obj(prompt_tokens=True), "prompt_tokens"), (obj(max_new_tokens=0), "max_new_tokens"),
    (obj(need="gpu"), "need"), (obj(origin=None), "origin"),
])
def test_bad_call_for_bids_is_one_typed_error(payload: bytes, field: str | None) -> None:
    with pytest.raises(MessageError) as info:
        BidRequest.from_payload(payload)
    assert info.value.field == field
    assert info.value.kind == "bid_request"


def test_size_limit_is_checked_before_parsing_and_is_inclusive() -> None:
    with pytest.raises(MessageError, match="exceeds"):
        BidRequest.from_payload(obj(origin="a" * 300_000))
    with pytest.raises(MessageError, match="exceeds"):
        BidRequest.from_payload(obj(), max_bytes=10)
    payload = obj()
    assert BidRequest.from_payload(payload, max_bytes=len(payload)).rid == "r1"
    with pytest.raises(MessageError, match="exceeds"):
        BidRequest.from_payload(payload, max_bytes=len(payload) - 1)


def test_nan_is_rejected() -> None:
    raw = obj(window_s="NAN").replace(b'"NAN"', b"NaN")
    assert b"NaN" in raw
    with pytest.raises(MessageError):
        BidRequest.from_payload(raw)


@pytest.mark.parametrize("field,value", [
    ("cpu_percent", True), ("cpu_percent", "12"), ("cpu_percent", -1), ("cpu_percent", 10 ** 400),
    ("cpu_percent", float("inf")), ("cpu_percent", float("nan")), ("service_s", 1e8), ("load1", False),
    ("cpu_slots", True), ("cpu_slots", 2.0), ("cpu_slots", -1), ("cpu_slots", 10 ** 400),
    ("has_npu", 1), ("has_npu", "yes"), ("on_battery", 0),
])
def test_a_bid_number_flag_or_count_of_the_wrong_kind_is_one_typed_error(field: str, value: object) -> None:
    """The quick path for plain in-range values must send everything else to the full checks."""
    bid = json.loads(Bid("r1", "d", "hub", "c", SNAP).to_payload())
    bid[field] = value
    with pytest.raises(MessageError) as info:
        Bid.from_payload(json.dumps(bid).encode())
    assert info.value.field == field


def test_plain_values_at_the_bounds_decode_as_before() -> None:
    from agent.messages import _Fields

    f = _Fields({"x": 0, "y": 100.0, "i": 7, "b": True, "inf": float("inf")}, "k")
    assert f.number("x", 0, 1) == 0.0 and type(f.number("x", 0, 1)) is float
    assert f.number("y", 0, 100) == 100.0 and f.integer("i", 7, 7) == 7 and f.boolean("b") is True
    assert f.number("missing", 0, 1, optional=True) is None and f.integer("missing", 0, 1, optional=True) is None
    with pytest.raises(MessageError, match="between"):
        f.number("inf", 0, float("inf"))  # finite only, even with no upper bound


def test_bad_nested_fields() -> None:
    bid = json.loads(Bid("r1", "d", "hub", "c", SNAP).to_payload())
    bid["recent"] = {"gpu": {"n": 1, "p50_ms": 1}}
    with pytest.raises(MessageError, match="unknown mode"):
        Bid.from_payload(json.dumps(bid).encode())
    done = json.loads(encode_result(Done("r1", "d", "t", Timings())))
    older = {k: v for k, v in done.items() if k != "finish_reason"}  # a node from before finish_reason
    assert decode_result(json.dumps(older).encode()) == Done("r1", "d", "t", Timings())
    done["timings"] = {"total_ms": "fast"}
    with pytest.raises(MessageError, match="total_ms"):
        decode_result(json.dumps(done).encode())


@pytest.mark.parametrize("payload,prompt,max_new,answer_id", [
    (b"What is the time?", "What is the time?", None, None),
    (b'{"prompt": "hi", "max_new_tokens": 12}', "hi", 12, None),
    ('  {"prompt": "ünï"}'.encode(), "ünï", None, None),
    (b'{"prompt": "hi", "id": "q-17"}', "hi", None, "q-17"),
])
def test_trigger_accepts_text_or_json(payload: bytes, prompt: str, max_new, answer_id) -> None:
    t = TriggerRequest.from_payload(payload)
    assert (t.prompt, t.max_new_tokens, t.id) == (prompt, max_new, answer_id)


@pytest.mark.parametrize("payload", [b"", b"   ", b"{broken", b'{"prompt": 3}', b'{"prompt": "x", "evil": 1}',
                                     b"\xff\xfe", b'{"prompt": "x", "id": "a/b"}', b"{" + b"[" * 5000,
                                     b'{"prompt": "\\ud800"}'])
def test_bad_trigger(payload: bytes) -> None:
    with pytest.raises(MessageError):
        TriggerRequest.from_payload(payload)


def job_obj(**over):
    base = json.loads(JOB.to_payload())
    base.update(over)
    for key in [k for k, v in over.items() if v is ...]:
        del base[key]
    return json.dumps(base).encode()


@pytest.mark.parametrize("payload,field", [
    (job_obj(mode="gpu"), "mode"), (job_obj(mode=None), "mode"), (job_obj(accept_s=...), "accept_s"),
    (job_obj(timeout_s=...), "timeout_s"), (job_obj(claim=...), "claim"), (job_obj(prompt=7), "prompt"),
    (job_obj(max_new_tokens=0), "max_new_tokens"), (job_obj(temperature=11), "temperature"),
    (job_obj(claim="c" * 129), "claim"), (job_obj(timeout_s=-1), "timeout_s"),
])
def test_bad_jobs_are_refused_field_by_field(payload: bytes, field: str) -> None:
    with pytest.raises(MessageError) as info:
        Job.from_payload(payload)
    assert info.value.field == field


def test_job_field_limits_are_inclusive() -> None:
    assert Job.from_payload(job_obj(claim="c" * 128, temperature=0.0)).temperature == 0.0


@pytest.mark.parametrize("payload", [
    b"[" * 5000, b'{"v": 3, "rid": ' + b"[" * 5000,
    json.dumps({"v": True, "rid": "r1"}).encode(),
    b'{"v": 3, "rid": "r1", "origin": "hub", "window_s": 1' + b"0" * 400 + b', "prompt_tokens": 1, '
    b'"max_new_tokens": 1, "need": "any"}',
    b'{"v": 3, "rid": "r1", "origin": "hub", "window_s": 1, "prompt_tokens": 1' + b"0" * 400 + b', '
    b'"max_new_tokens": 1, "need": "any"}',
])
def test_hostile_payloads_are_typed_errors(payload: bytes) -> None:
    with pytest.raises(MessageError):
        BidRequest.from_payload(payload)


def test_a_lone_surrogate_is_not_text() -> None:
    raw = JOB.to_payload().replace("héllo ✓".encode(), b"\\ud800")
    with pytest.raises(MessageError, match="surrogate"):
        Job.from_payload(raw)


def test_an_error_event_without_a_kind_is_a_failure_and_an_unknown_kind_is_refused() -> None:
    plain = json.dumps({"v": 3, "type": "error", "rid": "r1", "device": "d", "reason": "boom"}).encode()
    assert decode_result(plain) == Error("r1", "d", "boom")
    with pytest.raises(MessageError, match="kind"):
        decode_result(plain.replace(b'"reason"', b'"kind": "weird", "reason"'))


# ------------------------------------------------------------------------- chat (schema 3)

CHAT = Chat(messages=(ChatMessage("system", "be brief"), ChatMessage("user", "lights off"),
                      ChatMessage("assistant", "", (ToolCall("HassTurnOff", {"name": "kitchen"}, "c1"),)),
                      ChatMessage("tool", '{"ok": true}', tool_call_id="c1", name="HassTurnOff")),
            tools=({"type": "function", "function": {"name": "HassTurnOff", "parameters": {"type": "object"}}},),
            format={"type": "object", "properties": {"a": {"type": "string"}}})


def test_a_job_carries_a_conversation_its_tools_and_format() -> None:
    from dataclasses import replace
    job = replace(JOB, prompt="", chat=CHAT)
    back = Job.from_payload(job.to_payload())
    assert back == job
    assert back.chat is not None and back.chat.messages[2].tool_calls[0].arguments == {"name": "kitchen"}
    assert "User: lights off" in back.text_prompt and back.text_prompt.endswith("Assistant:")
    assert replace(job, chat=replace(CHAT, tools=())).digest != job.digest


def test_a_done_carries_tool_calls_with_object_arguments() -> None:
    done = Done("r1", "d", "", Timings(total_ms=1.0), tool_calls=(ToolCall("f", {"x": [1, 2]}, "c9"),))
    assert decode_result(encode_result(done)) == done
    assert json.loads(encode_result(done))["tool_calls"] == [{"id": "c9", "name": "f", "arguments": {"x": [1, 2]}}]


@pytest.mark.parametrize("chat", [
    {"messages": []},
    {"messages": [{"role": "wizard", "content": "x"}]},
    {"messages": [{"role": "user", "content": 3}]},
    {"messages": [{"role": "assistant", "tool_calls": [{"name": "f", "arguments": "{}"}]}]},
    {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {}}]},
    {"messages": [{"role": "user", "content": "x"}], "format": "yaml"},
])
def test_a_bad_conversation_is_refused_naming_the_field(chat) -> None:
    obj = json.loads(JOB.to_payload())
    obj["chat"] = chat
    with pytest.raises(MessageError, match="chat"):
        Job.from_payload(json.dumps(obj).encode())


def test_a_version_2_job_is_refused() -> None:
    obj = json.loads(JOB.to_payload())
    obj["v"] = 2
    with pytest.raises(MessageError, match="unsupported schema version 2"):
        Job.from_payload(json.dumps(obj).encode())


def test_an_error_event_names_only_kinds_a_node_sends() -> None:
    """A node sends an executor error's ``kind`` (agent/jobs.py); the wire accepts exactly
    those, so no kind is listed that nothing sends."""
    from agent import errors

    def kinds(cls: type[errors.ExecutorError]) -> set[str]:
        return {cls.kind}.union(*(kinds(sub) for sub in cls.__subclasses__()))

    assert kinds(errors.ExecutorError) == set(errors.ERROR_KINDS)


# ---------------------------------------------------------------- the usual call, checked at once
_ODD = st.one_of(st.none(), st.booleans(), st.sampled_from([-1, 0, 1, 2, 127, 128, 129, 10**6, 10**6 + 1, 10**30]),
                 st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                 st.sampled_from([0.0, -0.0, 1e11, 1e11 + 1, 7 * 24 * 3600, 7 * 24 * 3600 + 0.5]),
                 st.text(max_size=3), st.sampled_from(["any", "npu", "cpu", "r1", "a b", "é", "\ud800", "x" * 129,
                                                       "x" * 128]),
                 st.lists(st.integers(), max_size=2), st.just("missing"))
_CALL_FIELDS = ("rid", "origin", "window_s", "prompt_tokens", "max_new_tokens", "need", "sent_at", "model", "tools")


@settings(max_examples=600, derandomize=True, deadline=None, database=None)
@given(odd=st.dictionaries(st.sampled_from(_CALL_FIELDS), _ODD, max_size=3))
def test_the_quick_check_of_a_call_agrees_with_the_field_by_field_one(odd: dict[str, Any]) -> None:
    obj: dict[str, Any] = json.loads(BidRequest("r1", "hub", 30.0, 12, 64, sent_at=1.7e9, model="m").to_payload())
    for name, value in odd.items():
        if value == "missing":
            obj.pop(name, None)
        else:
            obj[name] = value
    try:
        full: BidRequest | None = BidRequest.from_obj(obj)
    except MessageError:
        full = None
    quick = BidRequest.plain(obj)
    assert quick is None or quick == full, "the quick check took what the full one refuses, or read it otherwise"
    if quick is not None and full is not None:
        assert all(type(getattr(quick, f)) is type(getattr(full, f)) for f in _CALL_FIELDS)
        assert quick.to_payload() == full.to_payload(), "the same call, down to -0.0 against 0.0"


@pytest.mark.parametrize("req", [BidRequest("r1", "hub", 30.0, 12, 64), BidRequest("r1", "hub", 30, 0, 1, "npu"),
                                 BidRequest("r1", "hub", 0.5, 12, 64, sent_at=1.7e9, model="qwen", tools=True)])
def test_the_usual_call_takes_the_quick_check(req: BidRequest) -> None:
    assert BidRequest.plain(json.loads(req.to_payload())) == req


_BID = Bid("r1", "dev-1", "hub", "claim.1", Snapshot(
    has_npu=True, npu_free=False, cpu_slots=2, cpu_percent=12.5, mem_available_mb=2048.0, load1=0.4, queue_depth=1,
    temperature_c=41.0, on_battery=False, recent={"cpu": LatencySummary(4, 350.0, 12.5), "npu": LatencySummary(1, 9.0)},
    backlog_s=1.25, models={"cpu": ModelInfo("qwen", ("q", "qw"), 4096, True, True), "npu": ModelInfo("llama")}),
    service_s=1.5, service_n=12.0, init_s=0.5)
_BID_FIELDS = ("rid", "device", "origin", "claim", "service_s", "service_n", "init_s", "has_npu", "npu_free",
               "cpu_slots", "cpu_percent", "mem_available_mb", "load1", "queue_depth", "temperature_c", "on_battery",
               "backlog_s", "recent", "models")
_NESTED = ("n", "p50_ms", "ms_per_token", "name", "aliases", "context", "warm", "tools", "gpu")


@settings(max_examples=800, derandomize=True, deadline=None, database=None)
@given(odd=st.dictionaries(st.sampled_from(_BID_FIELDS), _ODD, max_size=3),
       nested=st.dictionaries(st.tuples(st.sampled_from(("recent", "models")), st.sampled_from(("cpu", "npu", "gpu")),
                                        st.sampled_from(_NESTED)),
                              st.one_of(_ODD, st.lists(st.sampled_from(["", "a", "é", "x" * 129]), max_size=17)),
                              max_size=2))
def test_the_quick_check_of_a_bid_agrees_with_the_field_by_field_one(odd: dict[str, Any],
                                                                      nested: dict[Any, Any]) -> None:
    obj: dict[str, Any] = json.loads(_BID.to_payload())
    for (section, mode, name), value in nested.items():
        entry = obj[section].setdefault(mode, {"name": "m"} if section == "models" else {"n": 1, "p50_ms": 2.0})
        if value == "missing":
            entry.pop(name, None)
        else:
            entry[name] = value
    for name, value in odd.items():
        if value == "missing":
            obj.pop(name, None)
        else:
            obj[name] = value
    _agree(obj)


def test_the_usual_bid_and_metrics_take_the_quick_check() -> None:
    assert Bid.plain(json.loads(_BID.to_payload())) == _BID
    assert Snapshot.plain(json.loads(Metrics("dev-1", 1e9, SNAP).to_payload())) == SNAP


_EDGES: list[Any] = [None, "missing", True, False, -1, 0, -0.0, 1, 2, 100, 127, 128, 129, 1024, 1025, 10**6, 10**6 + 1,
                     10**7, 10**7 + 1, 2**31, 2**31 + 1, 10**8, 10**8 + 1, 10**9, 10**9 + 1, 10**30, -0.5, 0.0, 0.5,
                     41.0, 300.0, 300.5, -100.0, -100.5, 102400.0, 102400.5, 1e11, 1e11 + 1, float("nan"),
                     float("inf"), float("-inf"), "", "a", "a b", "é", "\ud800", "x" * 128, "x" * 129, "cpu", "any",
                     [], ["a"], [""], ["é"], ["x" * 129], ["a"] * 16, ["a"] * 17, [1], {}, {"n": 1}]


def _agree(obj: dict[str, Any]) -> None:
    with mock.patch.object(Snapshot, "plain", return_value=None):  # the reference: field by field throughout
        try:
            full: Bid | None = Bid.from_obj(obj)
        except MessageError:
            full = None
    quick = Bid.plain(obj)
    assert quick is None or quick == full, f"the quick check differs on {obj}"
    if quick is not None and full is not None:
        assert quick.to_payload() == full.to_payload(), f"the same bid, down to -0.0 against 0.0: {obj}"
        for got, want in ((quick, full), (quick.snapshot, full.snapshot)):
            assert {k: type(v) for k, v in vars(got).items()} == {k: type(v) for k, v in vars(want).items()}, obj
            for section in ("recent", "models"):
                for mode, value in getattr(got, section, {}).items():
                    other = getattr(want, section)[mode]
                    assert {k: type(v) for k, v in vars(value).items()} == \
                        {k: type(v) for k, v in vars(other).items()}, obj


def test_each_odd_field_of_a_bid_gets_the_same_answer_from_both_checks() -> None:
    """Every field, top level and nested, set to each edge value in turn: the quick check
    takes it only where the field-by-field one does, and reads the same."""
    base = json.loads(_BID.to_payload())
    for name in _BID_FIELDS:
        for value in _EDGES:
            obj = json.loads(json.dumps(base))
            obj.pop(name) if value == "missing" else obj.__setitem__(name, value)
            _agree(obj)
    for section in ("recent", "models"):
        for mode in ("cpu", "npu", "gpu"):
            for name in _NESTED:
                for value in _EDGES:
                    obj = json.loads(json.dumps(base))
                    fresh = {"name": "m"} if section == "models" else {"n": 1, "p50_ms": 2.0}
                    entry = obj[section].setdefault(mode, fresh)
                    entry.pop(name, None) if value == "missing" else entry.__setitem__(name, value)
                    _agree(obj)
