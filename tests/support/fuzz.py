"""Fuzz targets: every parser of outside input, and the errors each may raise.

A target takes bytes (whatever arrived: an MQTT payload, a file, a line from a model
runner) and must either return or raise one of its typed errors; anything else is a bug.
``tests/test_fuzz.py`` runs them briefly with hypothesis on every CI run;
``scripts/fuzz`` runs them at length, with hypothesis and, where it installs, atheris.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import strategies as st

from agent.armstore import ArmStore
from agent.bidtimes import Stragglers
from agent.config import load_config
from agent.control import decode_request, parse_request
from agent.errors import (
    ConfigError,
    ExecutorError,
    MessageError,
    StateError,
    UsageError,
)
from agent.executors.genie import (
    GenieOutput,
    Kpis,
    merge_profile,
    parse_kpis,
    read_profile,
)
from agent.executors.openai import StreamState, parse_event, usage_counts
from agent.journal import Journal
from agent.messages import (
    Bid,
    BidRequest,
    Cancel,
    Capabilities,
    Job,
    Metrics,
    TriggerRequest,
    decode_result,
)
from agent.topics import Topics

_SCRATCH: list[Path] = []


def _work() -> Path:
    """A scratch directory for the targets that need files, made on first use."""
    if not _SCRATCH:
        _SCRATCH.append(Path(tempfile.mkdtemp(prefix="edge-agent-fuzz-")))
        atexit.register(remove_scratch)
    return _SCRATCH[0]


def remove_scratch() -> None:
    """Remove the scratch directory (the suite calls it when the fuzz tests end)."""
    while _SCRATCH:
        shutil.rmtree(_SCRATCH.pop(), ignore_errors=True)


@dataclass
class Target:
    run: Callable[[bytes], object]
    allowed: tuple[type[BaseException], ...] = ()
    seeds: list[bytes] = field(default_factory=list)

    def check(self, data: bytes) -> None:
        """Run on ``data``; AssertionError (with the input) for any error not allowed."""
        try:
            self.run(data)
        except self.allowed:
            pass
        except Exception as exc:
            raise AssertionError(f"{type(exc).__name__}: {exc} on input {data[:200]!r}") from exc


def _json(obj: object) -> bytes:
    return json.dumps(obj).encode()


_SNAP = {"has_npu": True, "npu_free": True, "cpu_slots": 1, "cpu_percent": 1.0, "mem_available_mb": 10.0,
         "load1": 0.1, "queue_depth": 0, "backlog_s": 0.0, "temperature_c": None, "on_battery": False,
         "recent": {"cpu": {"n": 1, "p50_ms": 10.0, "ms_per_token": 1.0}},
         "models": {"cpu": {"name": "llama3.2:1b", "aliases": ["l"], "context": 8192, "warm": True}}}
SEEDS: dict[str, list[bytes]] = {
    "bid_request": [_json({"v": 3, "rid": "r1", "origin": "hub", "window_s": 30, "sent_at": 1e9,
                           "prompt_tokens": 3, "max_new_tokens": 16, "need": "any", "model": "m"})],
    "bid": [_json({"v": 3, "rid": "r1", "device": "d", "origin": "hub", "claim": "c", "service_s": 0.5,
                   "service_n": 2.0, **_SNAP})],
    "metrics": [_json({"v": 3, "device": "d", "ts": 1e9, "health": "ok", "last_latency_ms": 12.0, **_SNAP})],
    "job": [_json({"v": 3, "rid": "r1", "origin": "hub", "mode": "cpu", "claim": "c", "prompt": "hi",
                   "max_new_tokens": 16, "accept_s": 3, "timeout_s": 60, "sent_at": 1e9,
                   "reply_to": "result/hub/r1", "cancel_check": "00ff"})],
    "cancel": [_json({"v": 3, "type": "cancel", "rid": "r1", "origin": "hub", "key": "k", "reason": "x"})],
    "capabilities": [_json({"v": 3, "device": "d", "npu": True, "models": ["llama3.2:1b"]}),
                     _json({"v": 3, "device": "d", "npu": False, "models": None})],
    "result": [_json({"v": 3, "type": "token", "rid": "r1", "device": "d", "seq": 0, "text": "a"}),
               _json({"v": 3, "type": "done", "rid": "r1", "device": "d", "text": "a", "digest": "ab",
                      "timings": {"queue_ms": 1, "init_ms": 1, "prefill_ms": 1, "decode_ms": 1, "total_ms": 4},
                      "prompt_tokens": 1, "generated_tokens": 1})],
    "trigger": [b"what time is it?", _json({"prompt": "hi", "max_new_tokens": 8, "id": "q-1"})],
    "topic": [b"p/agent/d/metrics", b"p/bid/reply/hub/r1/d", b"p/exec/d/cancel/hub", b"p/result/hub/r1/d",
              b"p/bid/request/r1/hub", b"p/capabilities/d"],
    "config": [b"device_id: d\nbroker: {host: h, port: 1883}\ncpu: {slots: 2, executor: {kind: sim}}\n",
               b"device_id: d\nauction: {bid_timeout_s: 30, linucb: {alpha: 1.0}}\n"],
    "genie_stdout": [b"Using libGenie.so version 1.1.0\n\n[PROMPT]: hi\n\n[BEGIN]: Hello there.[END]\n\n"
                     b"[KPIS]:\nInit Time: 1000 us\n"],
    "genie_kpis": [b"Init Time: 523180 us\nPrompt Processing Time: 36405 us, Prompt Processing Rate : 247.2 toks/sec\n"
                   b"Token Generation Time: 740800 us, Token Generation Rate: 12.1 toks/sec\n"],
    "genie_profile": [_json({"components": [{"events": [{"type": "GenieDialog_create", "duration": 5},
                                                        {"type": "GenieDialog_query",
                                                         "time-to-first-token": {"value": 2, "unit": "ms"},
                                                         "num-prompt-tokens": 3}]}]})],
    "sse_event": [_json({"choices": [{"delta": {"content": "hi"}}]}),
                  _json({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}})],
    "arm_store": [b'{"version": 2, "arms": {}, "trained": {}, "exploring": {}, "cursor": 0}'],
    "journal": [b'{"rid":"r","ts":1e9,"digest":"ab","result":"{}"}\n'],
    "stragglers": [b'{"d": 2}'],
    "control": [b'{"op": "trigger", "prompt": "hi", "max_new_tokens": 8, "need": "any"}\n',
                b'{"op": "status"}\n'],
}


def _config(data: bytes) -> None:
    path = _work() / "config.yaml"
    path.write_bytes(data)
    load_config(path, env={})


def _genie_stdout(data: bytes) -> None:
    out = GenieOutput(b"hi")
    for i in range(0, len(data), 7):  # in pieces, as a pipe delivers it
        out.feed(data[i:i + 7])
    out.close()
    _ = out.text


def _profile(data: bytes) -> None:
    path = _work() / "profile.json"
    path.write_bytes(data)
    merge_profile(Kpis(), read_profile(path))


def _store(cls: Callable[[Path], object], name: str) -> Callable[[bytes], object]:
    def run(data: bytes) -> None:
        state = _work() / f"state-{name}"
        state.mkdir(exist_ok=True)
        (state / name).write_bytes(data)
        store = cls(state)
        load = getattr(store, "load", None)
        if callable(load):
            load()
    return run


def _sse(data: bytes) -> None:
    _, usage = parse_event(data, [], name="fuzz", url="http://fuzz/v1/chat/completions")
    usage_counts(usage)
    state = StreamState()
    state.feed(data, name="fuzz", url="http://fuzz/v1/chat/completions")
    if state.ended:
        state.result("fuzz", "http://fuzz/v1/chat/completions", 0.0, 1.0, 0)


def _control(data: bytes) -> None:
    decode_request(parse_request(data))


_TOPICS = Topics("p/")
TARGETS: dict[str, Target] = {
    "bid_request": Target(BidRequest.from_payload, (MessageError,)),
    "bid": Target(Bid.from_payload, (MessageError,)),
    "metrics": Target(Metrics.from_payload, (MessageError,)),
    "job": Target(Job.from_payload, (MessageError,)),
    "cancel": Target(Cancel.from_payload, (MessageError,)),
    "capabilities": Target(Capabilities.from_payload, (MessageError,)),
    "result": Target(decode_result, (MessageError,)),
    "trigger": Target(TriggerRequest.from_payload, (MessageError,)),
    "topic": Target(lambda b: _TOPICS.parse(b.decode("utf-8", "replace"))),
    "config": Target(_config, (ConfigError,)),
    "genie_stdout": Target(_genie_stdout),
    "genie_kpis": Target(lambda b: parse_kpis(b.decode("utf-8", "replace"))),
    "genie_profile": Target(_profile),
    "sse_event": Target(_sse, (ExecutorError,)),
    "arm_store": Target(_store(lambda d: ArmStore(d, 1.0), "arms.json"), (StateError,)),
    "journal": Target(_store(Journal, "completed.jsonl"), (StateError,)),
    "stragglers": Target(_store(Stragglers, "stragglers.json")),
    "control": Target(_control, (ValueError, UsageError)),
}
for _name, _target in TARGETS.items():
    _target.seeds = SEEDS[_name]


# ----------------------------------------------------------------------- hypothesis

_scalars = (st.none() | st.booleans() | st.integers() | st.floats()
            | st.integers(min_value=10**300, max_value=10**400) | st.text(max_size=40)
            | st.sampled_from(["\ud800", "dev\n", "a/b", "+", "#", "", " ", "nan", "1.2.3", "."]))
json_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)


def _dump(value: object) -> bytes:
    return json.dumps(value, allow_nan=True).encode("utf-8", "surrogatepass")


@st.composite
def _mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A valid input with one field replaced, removed or added."""
    seed = draw(st.sampled_from(seeds))
    try:
        obj = json.loads(seed)
    except ValueError:
        obj = None
    if isinstance(obj, dict) and obj:
        key = draw(st.sampled_from(sorted(obj)) | st.text(max_size=8))
        if draw(st.booleans()):
            obj[key] = draw(json_values)
        else:
            obj.pop(key, None)
        return _dump(obj)
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(min_size=1, max_size=6))
    return bytes(data)


_deep = st.integers(1, 3000).flatmap(lambda n: st.sampled_from([b"[" * n, b"{\"a\":" * n, b"- " * n,
                                                                 b"[" * n + b"]" * n]))
_yaml = st.sampled_from([b"x: !!timestamp foo\n", b"x: !!int\n", b"x: !!bool\n", b"x: !!float\n",
                         b"device_id: !!binary Zm9v\n", b"device_id: d\nbroker: {port: .nan}\n",
                         b"device_id: d\nbroker: {session_expiry_s: 99999999999}\n",
                         b"device_id: d\nauction: {linucb: {alpha: .inf}}\n",
                         b"device_id: d\ncpu: {slots: 1e400}\n", b"device_id: &a [*a]\n",
                         b"device_id: d\nmetrics_interval_s: 2020-01-01\n", b"\xff\xfe", b"device_id: \"dev\\n\"\n"])


def inputs(name: str) -> st.SearchStrategy[bytes]:
    """Everything a target should survive: its seeds mutated, any JSON, deep nesting, bytes."""
    target = TARGETS[name]
    parts = [_mutated(target.seeds), json_values.map(_dump), _deep, st.binary(max_size=300)]
    if name == "config":
        parts.append(_yaml)
    return st.one_of(*parts)
