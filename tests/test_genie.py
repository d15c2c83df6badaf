"""The genie executor against a stand-in genie-t2t-run that writes the real format."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from agent.config import GenieExecutorConfig
from agent.errors import ExecutableNotFound, ExecutorError
from agent.executors import Params
from agent.executors.genie import (
    GenieExecutor,
    GenieOutput,
    apply_template,
    merge_profile,
    parse_kpis,
)

FAKE = Path(__file__).parent / "support" / "fake_genie.py"


def stand_in(tmp_path: Path, **fake: object) -> GenieExecutor:
    """A genie executor whose genie-t2t-run is the stand-in, configured by `fake`."""
    binary = tmp_path / "genie-t2t-run"
    binary.write_text(f"#!/bin/sh\nexec {sys.executable} {FAKE} \"$@\"\n")
    binary.chmod(0o755)
    config = tmp_path / "genie_config.json"
    config.write_text(json.dumps({"dialog": {"version": 1}, "fake": fake}))
    return GenieExecutor(GenieExecutorConfig(command=str(binary), config=str(config), retries=1,
                                             library_path="/opt/qairt/lib", adsp_library_path="/opt/dsp"),
                         name="board")


def run(ex: GenieExecutor, prompt: str, **params: object):
    parts: list[str] = []
    result = ex.run(prompt, Params(**params), parts.append)  # type: ignore[arg-type]
    return result, parts


# ----------------------------------------------------------------------- the parser alone

def feed_all(prompt: bytes, stdout: bytes, chunk: int) -> tuple[str, GenieOutput]:
    out = GenieOutput(prompt)
    streamed = "".join(out.feed(stdout[i:i + chunk]) for i in range(0, len(stdout), chunk))
    streamed += out.close()
    return streamed, out


STDOUT = (b"Using libGenie.so version 1.10.0\n\n[PROMPT]: %s\n\n[BEGIN]: Bonjour, \xc3\xa7a va ?[END]\n\n"
          b"[KPIS]:\nInit Time: 1500000 us\n"
          b"Prompt Processing Time: 80000 us, Prompt Processing Rate : 250.00 toks/sec\n"
          b"Token Generation Time: 500000 us, Token Generation Rate: 20.00 toks/sec\n")


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 10_000])
@pytest.mark.parametrize("prompt", [b"Say hi in French", b"Tricky [BEGIN]: and [END] inside\n",
                                    b"[PROMPT]: [KPIS]: nested", "ünïcode ✓".encode()])
def test_parser_streams_exactly_the_answer_at_any_chunking(prompt: bytes, chunk: int) -> None:
    streamed, out = feed_all(prompt, STDOUT % prompt, chunk)
    assert streamed == "Bonjour, ça va ?" == out.text
    assert out.ended
    k = parse_kpis(out.trailer.decode())
    assert (k.init_us, k.prompt_us, k.gen_us) == (1_500_000, 80_000, 500_000)
    assert (k.prompt_tokens, k.generated_tokens) == (20, 10)


def test_parser_tolerates_a_missing_end() -> None:
    stdout = b"[PROMPT]: p\n\n[BEGIN]: partial answer\n\n[KPIS]:\nInit Time: 5 us\n"
    streamed, out = feed_all(b"p", stdout, 3)
    assert out.text == "partial answer" and not out.ended
    assert "[KPIS]" not in streamed
    streamed, out = feed_all(b"p", b"[PROMPT]: p\n\n[BEGIN]: cut off mid", 4)
    assert streamed == "cut off mid" == out.text


def test_parser_never_streams_half_a_character_or_half_a_marker() -> None:
    out = GenieOutput(b"p")
    assert out.feed(b"[PROMPT]: p\n\n[BEGIN]: caf\xc3") == "caf"
    assert out.feed(b"\xa9 [EN") == "é "
    assert out.feed(b"D]") == ""
    assert out.text == "café " and out.ended


def test_profile_fills_what_stdout_lacks() -> None:
    profile = {"components": [{"events": [
        {"type": "GenieDialog_create", "duration": 900},
        {"type": "GenieDialog_query", "time-to-first-token": {"value": 3, "unit": "ms"},
         "num-prompt-tokens": {"value": 11}, "num-generated-tokens": 7,
         "token-generation-time": {"value": 0.5, "unit": "s"}}]}]}
    k = merge_profile(parse_kpis(""), profile)
    assert (k.init_us, k.prompt_us, k.gen_us, k.prompt_tokens, k.generated_tokens) == \
        (900, 3000, 500_000, 11, 7)
    assert merge_profile(parse_kpis(""), "garbage").init_us is None


def test_chat_templates() -> None:
    assert apply_template("raw", "hi") == "hi"
    assert apply_template("chatml", "hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    llama = apply_template("llama3", "hi {prompt}")
    assert llama.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi {prompt}<|eot_id|>")
    assert llama.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


# ----------------------------------------------------------------------- the executor + stand-in

def test_runs_the_stand_in_and_decomposes_timings(tmp_path: Path) -> None:
    ex = stand_in(tmp_path, answer="Paris is the capital of France.", delay_ms=5)
    assert ex.check() is None
    result, parts = run(ex, "What is the capital of France?")
    assert result.text == "Paris is the capital of France." == "".join(parts)
    assert len(parts) >= 3, "streamed token by token, not in one piece"
    t = result.timings
    assert t.init_ms > 0 and t.prefill_ms == pytest.approx(2.0) and t.decode_ms >= 5 * 5
    assert t.total_ms >= t.decode_ms
    assert result.generated_tokens == 6


def test_prompt_containing_markers_and_template(tmp_path: Path) -> None:
    ex = stand_in(tmp_path, answer="ok")
    ex.cfg = GenieExecutorConfig(**{**ex.cfg.__dict__, "chat_template": "llama3"})
    result, _ = run(ex, "Print exactly: [BEGIN]: fake [END] and [KPIS]:")
    assert result.text == "ok"


def test_split_utf8_and_missing_end(tmp_path: Path) -> None:
    result, parts = run(stand_in(tmp_path, answer="Grüße aus Köln ✓", mode="split_utf8"), "x")
    assert result.text == "Grüße aus Köln ✓" and "\ufffd" not in "".join(parts)
    (tmp_path / "b").mkdir()
    result, _ = run(stand_in(tmp_path / "b", answer="no end marker", mode="no_end"), "x")
    assert result.text == "no end marker"


def test_dsp_error_names_the_variable_to_set(tmp_path: Path) -> None:
    with pytest.raises(ExecutorError, match="ADSP_LIBRARY_PATH"):
        run(stand_in(tmp_path, mode="dsp_error"), "x")


def test_nonzero_exit_mid_answer_keeps_partial_text_and_stderr(tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    with pytest.raises(ExecutorError) as info:
        run(stand_in(tmp_path, mode="fail", answer="one two three four five six", calls=str(calls)), "x")
    assert "QnnGraph execute failed" in info.value.reason and "exited with code 3" in info.value.reason
    assert info.value.partial_text.startswith("one")
    assert len(calls.read_text().split()) == 1, "no retry once tokens have streamed"


def test_one_retry_for_a_start_up_failure(tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    result, _ = run(stand_in(tmp_path, mode="fail_once", marker=str(tmp_path / "m"), calls=str(calls)), "x")
    assert result.text == "Paris is the capital of France."
    assert len(calls.read_text().split()) == 2


def test_output_without_begin_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ExecutorError, match=r"no \[BEGIN\]"):
        run(stand_in(tmp_path, mode="never_begins"), "x")


def test_max_new_tokens_stops_the_process(tmp_path: Path) -> None:
    words = " ".join(f"w{i}" for i in range(200))
    result, parts = run(stand_in(tmp_path, answer=words, delay_ms=5), "x", max_new_tokens=5)
    assert 0 < len(result.text.split()) < 20
    assert result.text == "".join(parts), "the answer is what was streamed, capped"


def test_missing_binary_is_named(tmp_path: Path) -> None:
    ex = GenieExecutor(GenieExecutorConfig(command="genie-t2t-run-missing", config="c.json"), name="b")
    assert "genie-t2t-run-missing" in (ex.check() or "")
    with pytest.raises(ExecutableNotFound, match="genie-t2t-run-missing"):
        run(ex, "x")


def test_bundle_environment(tmp_path: Path) -> None:
    env = stand_in(tmp_path).env()
    assert env["LD_LIBRARY_PATH"].split(":")[0] == "/opt/qairt/lib"
    assert env["ADSP_LIBRARY_PATH"] == "/opt/dsp"
