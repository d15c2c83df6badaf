"""Every parser of outside input raises only its typed errors; streaming parsers are linear.

The targets and strategies are in tests/support/fuzz.py; this runs them briefly and
deterministically (scripts/fuzz runs them at length). The regression cases are inputs
fuzzing found, each once a crash."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings

from agent.cli import main
from agent.errors import MessageError
from agent.executors.genie import (
    PREAMBLE_MAX_BYTES,
    TRAILER_MAX_BYTES,
    GenieOutput,
    parse_kpis,
)
from agent.messages import Job
from tests.support.fuzz import TARGETS, inputs, remove_scratch


@pytest.fixture(scope="module", autouse=True)
def _scratch_removed() -> Iterator[None]:
    yield
    remove_scratch()

BRIEF = settings(max_examples=150, derandomize=True, deadline=None, database=None,
                 suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_a_parser_survives_whatever_arrives(name: str) -> None:
    target = TARGETS[name]

    @BRIEF
    @given(inputs(name))
    def survives(data: bytes) -> None:
        target.check(data)

    for seed in target.seeds:
        target.run(seed)  # the seeds are valid: they must parse
    survives()


REGRESSIONS = {
    "bid_request": [b"[" * 5000, b'{"v": 3, "window_s": 1' + b"0" * 400 + b"}", b'{"v": true}',
                    b'{"v": 3, "rid": "r\\n", "origin": "hub"}', b'{"v": 3, "rid": ' + b"9" * 5000 + b"}"],
    "trigger": [b'{"prompt": "\\ud800"}', b"{" + b"[" * 5000],
    "config": [b"x: !!timestamp foo\n", b"x: !!int\n", b"x: !!bool\n", b"- " * 3000,
               b"device_id: d\nbroker: {session_expiry_s: 4294967296}\n",
               b"device_id: d\nauction: {bid_timeout_s: .nan}\n",
               b"device_id: \"dev\\n\"\n", b"device_id: d\nauction: {linucb: {alpha: " + b"9" * 400 + b"}}\n"],
    "genie_kpis": [b"Init Time: . us", b"Init Time: 1.2.3 us",
                   b"Prompt Processing Time: " + b"9" * 400 + b" us, Prompt Processing Rate : 9e999"],
    "genie_profile": [b"[" * 5000, b'{"components": 5}', b'{"components": [{"events": 7}]}',
                      b'{"components": [{"events": [{"type": "GenieDialog_query", "num-prompt-tokens": 1e999}]}]}'],
    "sse_event": [b"[" * 5000, b'{"usage": {"prompt_tokens": "many", "completion_tokens": [1]}}',
                  b'{"error": {"message": ["x"]}}'],
    "control": [b"[" * 5000 + b"\n", b'{"op": "trigger", "prompt": "x", "bid_timeout_s": NaN}\n'],
}


@pytest.mark.parametrize("name,data", [(n, d) for n, ds in REGRESSIONS.items() for d in ds])
def test_what_fuzzing_found_stays_fixed(name: str, data: bytes) -> None:
    TARGETS[name].check(data)


def test_schema_version_must_be_the_integer_2() -> None:
    job = json.loads(TARGETS["job"].seeds[0])
    for v in (True, 2.0, "2", 1):
        with pytest.raises(MessageError, match="schema version"):
            Job.from_payload(json.dumps({**job, "v": v}).encode())


def test_garbled_kpis_are_left_out_not_guessed() -> None:
    k = parse_kpis("Init Time: 1.2.3 us\nToken Generation Time: 1000000 us, Token Generation Rate: 12.5 toks/sec")
    assert k.init_us is None and (k.gen_us, k.generated_tokens) == (1e6, 12)


def test_a_lone_surrogate_on_stdin_or_in_an_argument_is_a_usage_error(monkeypatch) -> None:
    class Stdin:
        buffer = io.BytesIO(b"bad \xed\xa0\x80 bytes")

        def isatty(self) -> bool:
            return False
    monkeypatch.setattr("sys.stdin", Stdin())
    err = io.StringIO()
    assert main(["trigger", "--device-id", "d", "--broker", "127.0.0.1:1"], stdout=io.StringIO(), stderr=err) == 2
    assert "not valid UTF-8" in err.getvalue()
    err = io.StringIO()
    assert main(["trigger", "--device-id", "d", "--broker", "127.0.0.1:1", "bad \udc80"], stdout=io.StringIO(),
                stderr=err) == 2


def _parse_seconds(total: int) -> float:
    """Time to parse ``total`` bytes of preamble, answer and trailer, a third each, fed in
    4 KiB pieces (the size a pipe delivers)."""
    chunk = b"word " * 819 + b"w"
    third = total // 3
    data = (b"p" * third + b"[PROMPT]: hi\n\n[BEGIN]: " + chunk * (third // len(chunk)) + b"[END]\n"
            + b"k" * third)
    out = GenieOutput(b"hi")
    start = time.thread_time()  # CPU time of this thread: other processes on the machine do not count
    for i in range(0, len(data), 4096):
        out.feed(data[i:i + 4096])
    out.close()
    elapsed = time.thread_time() - start
    assert out.ended and len(out.trailer) == TRAILER_MAX_BYTES, "the trailer is kept to its bound"
    assert len(out.preamble) == PREAMBLE_MAX_BYTES, "and so is the preamble"
    return elapsed


def test_the_genie_parser_is_linear_in_its_output() -> None:
    # The same parser on two sizes, in the same run: 4x the output may cost about 4x the
    # CPU time (a quadratic parser took 16x); interleaved, best of five, against noise.
    rounds = [(_parse_seconds(1 << 20), _parse_seconds(4 << 20)) for _ in range(5)]
    small, large = min(r[0] for r in rounds), min(r[1] for r in rounds)
    assert large < 8 * small, f"1 MiB {small * 1000:.1f} ms, 4 MiB {large * 1000:.1f} ms"


@pytest.mark.parametrize("text", [b"device_id: d\nauction: {bid_timeout_s: .nan}\n",
                                  b"device_id: d\nauction: {linucb: {alpha: .inf}}\n",
                                  b"device_id: d\nbroker: {session_expiry_s: 4294967296}\n",
                                  b"device_id: \"dev\\n\"\n", b"device_id: d\nmetrics_interval_s: !!int\n",
                                  b"device_id: d\nauction: {bid_timeout_s: 1" + b"0" * 400 + b"}\n"])
def test_configs_fuzzing_found_are_refused_not_accepted(tmp_path, text: bytes) -> None:
    from agent.config import load_config
    from agent.errors import ConfigError
    path = tmp_path / "c.yaml"
    path.write_bytes(text)
    with pytest.raises(ConfigError):
        load_config(path, env={})
