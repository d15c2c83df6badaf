from __future__ import annotations

import math
import os
import select
import threading
import time

import pytest

from agent.config import CommandExecutorConfig, SimExecutorConfig
from agent.errors import CommandFailed, ExecutableNotFound, ExecutionTimeout
from agent.executors import Params, build_executor, estimate_tokens
from agent.executors.sim import SimExecutor


def collect():
    parts: list[str] = []
    return parts, parts.append


def test_sim_follows_its_latency_model() -> None:
    ex = build_executor(SimExecutorConfig(base_ms=30, ms_per_token=5), name="d")
    parts, on_token = collect()
    r = ex.run("one two three four", Params(max_new_tokens=3), on_token)
    assert r.text == "one two three" == "".join(parts)
    assert r.generated_tokens == 3
    assert r.timings.init_ms >= 30 and r.timings.decode_ms >= 15
    assert r.timings.total_ms >= r.timings.init_ms + r.timings.decode_ms - 1


def test_sim_reports_prefill_apart_or_as_start_up_like_llama_cli() -> None:
    """The same prefill (2 ms a prompt token): reported as prefill_ms, or (ttft_init)
    inside init_ms, which is what a node's start-up record then learns."""
    prompt = "w " * 40
    prefill = 2.0 * estimate_tokens(prompt)
    apart = build_executor(SimExecutorConfig(base_ms=5, ms_per_token=0, ms_per_prompt_token=2.0), name="d")
    r = apart.run(prompt, Params(max_new_tokens=1), collect()[1])
    assert r.timings.prefill_ms >= prefill and 5 <= r.timings.init_ms < prefill
    ttft = build_executor(SimExecutorConfig(base_ms=5, ms_per_token=0, ms_per_prompt_token=2.0, ttft_init=True),
                          name="d")
    r = ttft.run(prompt, Params(max_new_tokens=1), collect()[1])
    assert r.timings.init_ms >= 5 + prefill and r.timings.prefill_ms == 0


def test_sim_heats_while_it_runs_and_a_hot_device_is_slower() -> None:
    ex = SimExecutor(SimExecutorConfig(base_ms=0, ms_per_token=20, throttle=3.0, heat_s=100.0), name="d")
    ex._warm_up(0.0, 1)          # one job running from t = 0 ...
    ex._warm_up(1000.0, 0)       # ... for ten time constants: fully hot
    assert ex._heat == pytest.approx(1.0, abs=1e-3)
    ex._warm_up(1200.0, 0)       # idle for one cooling constant (2 × heat_s)
    assert ex._heat == pytest.approx(math.exp(-1), abs=1e-3)
    ex._heat, ex._heat_at = 1.0, time.monotonic()
    r = ex.run("a b c", Params(max_new_tokens=3), collect()[1])
    assert r.timings.decode_ms >= 3 * 3 * 20 * 0.95, "three tokens at 3x the cool pace"


def test_sim_fixed_text_and_timeout() -> None:
    ex = build_executor(SimExecutorConfig(base_ms=0, ms_per_token=50, text="a b c d e f"), name="d")
    parts, on_token = collect()
    with pytest.raises(ExecutionTimeout) as info:
        ex.run("ignored", Params(timeout_s=0.12), on_token)
    assert info.value.partial_text == "".join(parts) and 1 <= len(parts) < 6


def test_command_gets_the_prompt_as_one_argument_never_a_shell(tmp_path) -> None:
    prompt = "it's $(rm -rf /) `whoami`; echo pwned | cat > x"
    ex = build_executor(CommandExecutorConfig(argv=("printf", "%s", "{prompt}")), name="d")
    parts, on_token = collect()
    r = ex.run(prompt, Params(), on_token)
    assert r.text == prompt == "".join(parts)


def test_command_prompt_on_stdin() -> None:
    ex = build_executor(CommandExecutorConfig(argv=("tr", "a-z", "A-Z"), prompt_via="stdin"), name="d")
    parts, on_token = collect()
    assert ex.run("hello ünï", Params(), on_token).text == "HELLO üNï"


def test_command_streams_before_it_exits(tmp_path) -> None:
    """The child only finishes after we react to its first chunk: no streaming, no answer."""
    fifo = tmp_path / "gate"
    os.mkfifo(fifo)
    ex = build_executor(CommandExecutorConfig(
        argv=("sh", "-c", f'printf first; read line < {fifo}; printf " second"', "{prompt}")), name="d")
    parts: list[str] = []

    def on_token(text: str) -> None:
        parts.append(text)
        if len(parts) == 1:
            threading.Thread(target=fifo.write_text, args=("go\n",), daemon=True).start()

    r = ex.run("x", Params(timeout_s=10), on_token)
    assert parts[0] == "first" and r.text == "first second"


def test_command_missing_binary_is_named() -> None:
    ex = build_executor(CommandExecutorConfig(argv=("no-such-llm-binary", "{prompt}")), name="d")
    assert "no-such-llm-binary" in (ex.check() or "")
    with pytest.raises(ExecutableNotFound, match="no-such-llm-binary"):
        ex.run("x", Params(), lambda t: None)


def test_command_failure_carries_code_and_stderr_tail() -> None:
    ex = build_executor(CommandExecutorConfig(
        argv=("sh", "-c", 'echo partial; echo "model file missing" >&2; exit 3', "{prompt}")), name="d")
    with pytest.raises(CommandFailed) as info:
        ex.run("x", Params(), lambda t: None)
    assert info.value.returncode == 3
    assert "model file missing" in info.value.output_tail
    assert info.value.partial_text == "partial\n"


def test_command_timeout_kills_the_whole_process_group(tmp_path) -> None:
    pidfile = tmp_path / "grandchild.pid"
    script = f'sleep 60 & echo $! > {pidfile}; printf started; wait'
    ex = build_executor(CommandExecutorConfig(argv=("sh", "-c", script, "{prompt}"), timeout_s=0.5), name="d")
    with pytest.raises(ExecutionTimeout) as info:
        ex.run("x", Params(), lambda t: None)
    assert info.value.partial_text == "started"
    grandchild = int(pidfile.read_text())
    # The grandchild (not just the shell) was killed too: its pidfd turns readable when it
    # exits. It is not our child, so waitpid cannot tell us.
    try:
        fd = os.pidfd_open(grandchild)
    except ProcessLookupError:
        return  # already gone
    try:
        ready, _, _ = select.select([fd], [], [], 5.0)
        assert ready, "the grandchild outlived the timeout: the process group was not killed"
    finally:
        os.close(fd)


def test_command_max_new_tokens_stops_the_process() -> None:
    ex = build_executor(CommandExecutorConfig(argv=("sh", "-c", "yes word", "{prompt}")), name="d")
    r = ex.run("x", Params(max_new_tokens=20, timeout_s=10), lambda t: None)
    assert 18 <= r.generated_tokens <= 21, "cut at the budget, even from one 64 KiB chunk"
    assert r.timings.total_ms < 5000, "stopped the process, did not wait for the timeout"
