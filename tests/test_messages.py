from __future__ import annotations

import json

import pytest

from agent.errors import MessageError
from agent.messages import (
    Accepted,
    Bid,
    BidRequest,
    Declined,
    Done,
    Error,
    Job,
    LatencySummary,
    Metrics,
    Snapshot,
    Timings,
    Token,
    TriggerRequest,
    decode_result,
    encode_result,
)

SNAP = Snapshot(has_npu=True, npu_free=False, cpu_slots=2, cpu_percent=12.5, mem_available_mb=3000.0,
                load1=0.7, queue_depth=1, temperature_c=None, on_battery=True,
                recent={"cpu": LatencySummary(n=4, p50_ms=812.0, ms_per_token=9.5)})


@pytest.mark.parametrize("msg", [
    BidRequest("r1", "hub", 1e9, 12, 64, "npu"),
    Bid("r1", "dev-1", "claim.1", SNAP),
    Job("r1", "hub", "cpu", "claim.1", "héllo ✓", 64, 1e9, 1e9, "exec/result/r1", 0.7),
])
def test_round_trip(msg) -> None:
    assert type(msg).from_payload(msg.to_payload()) == msg


def test_metrics_round_trip() -> None:
    m = Metrics("dev-1", 1e9, SNAP, last_latency_ms=5.0)
    assert Metrics.from_payload(m.to_payload()) == m


@pytest.mark.parametrize("event", [
    Accepted("r1", "d", "npu", 3), Declined("r1", "d", "npu_busy"), Token("r1", "d", 7, "tok"),
    Done("r1", "d", "text", Timings(1, 2, 3, 4, 10), 5, 6), Error("r1", "d", "boom", "timeout", 2, "par"),
])
def test_result_events_round_trip(event) -> None:
    assert decode_result(encode_result(event)) == event


def obj(**over):
    base = json.loads(BidRequest("r1", "hub", 1e9, 12, 64).to_payload())
    base.update(over)
    return json.dumps(base).encode()


@pytest.mark.parametrize("payload,field", [
    (b"\xff", None), (b"nope", None), (b"[1]", None), (obj(v=2), "v"), (obj(v=None), "v"),
    (obj(rid=5), "rid"), (obj(rid="has/slash"), "rid"), (obj(rid="x" * 65), "rid"),
    (obj(deadline="soon"), "deadline"), (obj(deadline=-1), "deadline"),
    (obj(prompt_tokens=True), "prompt_tokens"), (obj(max_new_tokens=0), "max_new_tokens"),
    (obj(need="gpu"), "need"), (obj(origin=None), "origin"),
])
def test_bad_call_for_bids_is_one_typed_error(payload: bytes, field: str | None) -> None:
    with pytest.raises(MessageError) as info:
        BidRequest.from_payload(payload)
    assert info.value.field == field
    assert info.value.kind == "bid_request"


def test_size_limit_is_checked_before_parsing() -> None:
    big = obj(origin="a" * 300_000)
    with pytest.raises(MessageError, match="exceeds"):
        BidRequest.from_payload(big)
    with pytest.raises(MessageError, match="exceeds"):
        BidRequest.from_payload(obj(), max_bytes=10)


def test_nan_is_rejected() -> None:
    raw = obj(deadline="NAN").replace(b'"NAN"', b"NaN")
    assert b"NaN" in raw
    with pytest.raises(MessageError):
        BidRequest.from_payload(raw)


def test_bad_nested_fields() -> None:
    bid = json.loads(Bid("r1", "d", "c", SNAP).to_payload())
    bid["recent"] = {"gpu": {"n": 1, "p50_ms": 1}}
    with pytest.raises(MessageError, match="unknown mode"):
        Bid.from_payload(json.dumps(bid).encode())
    done = json.loads(encode_result(Done("r1", "d", "t", Timings())))
    done["timings"] = {"total_ms": "fast"}
    with pytest.raises(MessageError, match="total_ms"):
        decode_result(json.dumps(done).encode())


@pytest.mark.parametrize("payload,prompt,max_new", [
    (b"What is the time?", "What is the time?", None),
    (b'{"prompt": "hi", "max_new_tokens": 12}', "hi", 12),
    ('  {"prompt": "ünï"}'.encode(), "ünï", None),
])
def test_trigger_accepts_text_or_json(payload: bytes, prompt: str, max_new) -> None:
    t = TriggerRequest.from_payload(payload)
    assert (t.prompt, t.max_new_tokens) == (prompt, max_new)


@pytest.mark.parametrize("payload", [b"", b"   ", b"{broken", b'{"prompt": 3}', b'{"prompt": "x", "evil": 1}',
                                     b"\xff\xfe"])
def test_bad_trigger(payload: bytes) -> None:
    with pytest.raises(MessageError):
        TriggerRequest.from_payload(payload)


def job_obj(**over):
    base = json.loads(Job("r1", "hub", "cpu", "c", "p", 8, 1e9, 1e9, "exec/result/r1").to_payload())
    base.update(over)
    for key in [k for k, v in over.items() if v is ...]:
        del base[key]
    return json.dumps(base).encode()


@pytest.mark.parametrize("payload,field", [
    (job_obj(mode="gpu"), "mode"), (job_obj(mode=None), "mode"), (job_obj(accept_by=...), "accept_by"),
    (job_obj(deadline=...), "deadline"), (job_obj(claim=...), "claim"), (job_obj(prompt=7), "prompt"),
    (job_obj(max_new_tokens=0), "max_new_tokens"), (job_obj(temperature=11), "temperature"),
])
def test_bad_jobs_are_refused_field_by_field(payload: bytes, field: str) -> None:
    with pytest.raises(MessageError) as info:
        Job.from_payload(payload)
    assert info.value.field == field


@pytest.mark.parametrize("payload", [
    b"[" * 5000, b'{"v": 1, "rid": ' + b"[" * 5000,
    json.dumps({"v": True, "rid": "r1"}).encode(),
    b'{"v": 1, "rid": "r1", "origin": "hub", "deadline": 1' + b"0" * 400 + b', "prompt_tokens": 1, '
    b'"max_new_tokens": 1, "need": "any"}',
    json.dumps({"v": 1, "rid": "r1\n", "origin": "hub", "deadline": 1, "prompt_tokens": 1,
                "max_new_tokens": 1, "need": "any"}).encode(),
])
def test_hostile_payloads_are_typed_errors(payload: bytes) -> None:
    with pytest.raises(MessageError):
        BidRequest.from_payload(payload)


def test_a_lone_surrogate_is_not_text() -> None:
    raw = Job("r1", "hub", "cpu", "c", "PROMPT", 8, 1e9, 1e9, "x").to_payload().replace(b"PROMPT", b"\\ud800")
    with pytest.raises(MessageError, match="surrogate"):
        Job.from_payload(raw)


def test_an_error_event_without_a_kind_is_a_failure_and_an_unknown_kind_is_refused() -> None:
    legacy = json.dumps({"v": 1, "type": "error", "rid": "r1", "device": "d", "reason": "boom"}).encode()
    assert decode_result(legacy) == Error("r1", "d", "boom")
    with pytest.raises(MessageError, match="kind"):
        decode_result(legacy.replace(b'"reason"', b'"kind": "weird", "reason"'))
