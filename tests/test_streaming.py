"""Tokens stream over MQTT from a peer's real executor to `trigger`, before `done`."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from agent.cli import main
from tests.support.fake_openai import FakeOpenAI
from tests.support.fleet import Env

FAKE_GENIE = Path(__file__).parent / "support" / "fake_genie.py"
ANSWER = "one two three four five six seven eight"
DELAY_MS = 40


class TimedOut:
    """A stdout that remembers when each piece was written."""

    def __init__(self) -> None:
        self.writes: list[tuple[float, str]] = []

    def write(self, text: str) -> int:
        self.writes.append((time.monotonic(), text))
        return len(text)

    def flush(self) -> None:
        pass

    @property
    def text(self) -> str:
        return "".join(t for _, t in self.writes)


def genie_peer(env: Env) -> Path:
    binary = env.tmp / "genie-t2t-run"
    binary.write_text(f"#!/bin/sh\nexec {sys.executable} {FAKE_GENIE} \"$@\"\n")
    binary.chmod(0o755)
    config = env.tmp / "genie_config.json"
    config.write_text(json.dumps({"fake": {"answer": ANSWER, "delay_ms": DELAY_MS}}))
    return env.config("board", npu={"kind": "genie", "command": str(binary), "config": str(config),
                                    "chat_template": "llama3"})


def command_peer(env: Env) -> Path:
    script = ("import sys, time\n"
              f"for w in {ANSWER.split()!r}:\n"
              f"    time.sleep({DELAY_MS / 1000})\n"  # a stand-in model taking time per token
              "    sys.stdout.write(w + ' '); sys.stdout.flush()\n")
    return env.config("pi", cpu={"kind": "command", "argv": [sys.executable, "-c", script, "{prompt}"]})


@pytest.mark.parametrize("kind", ["genie", "openai", "command"])
def test_tokens_arrive_as_they_are_generated(env: Env, kind: str) -> None:
    hub = env.config("hub")
    with FakeOpenAI(answer=ANSWER, delay_ms=DELAY_MS) as server:
        peer = {"genie": lambda: genie_peer(env),
                "openai": lambda: env.config("laptop", cpu={"kind": "openai", "base_url": server.base_url,
                                                            "model": "m"}),
                "command": lambda: command_peer(env)}[kind]()
        with env.node(peer):
            out = TimedOut()
            code = main(["trigger", "--config", str(hub), "-q", "the prompt"], stdout=out)  # type: ignore[arg-type]
    assert code == 0
    lines = out.text.splitlines()
    assert lines[0].startswith("✓ Winner: ")
    streamed = out.text[len(lines[0]) + 1:].strip()
    assert streamed == ANSWER
    token_times = [t for t, text in out.writes[1:] if text.strip()]
    assert len(token_times) >= 4, "the answer came in pieces"
    spread = token_times[-1] - token_times[0]
    assert spread >= (len(ANSWER.split()) - 2) * DELAY_MS / 1000 * 0.5, \
        f"pieces arrived together ({spread:.3f} s apart): not streamed"


def test_json_mode_collects_the_text_and_timings(env: Env) -> None:
    hub = env.config("hub")
    with env.node(genie_peer(env)):
        code, out, _, err = env.trigger(hub, "q")
    assert code == 0, err
    assert out is not None and out["path"] == "peer-npu" and out["text"] == ANSWER
    t = out["timings"]
    assert t["init_ms"] > 0 and t["decode_ms"] >= (len(ANSWER.split()) - 1) * DELAY_MS * 0.5
    assert t["total_ms"] >= t["decode_ms"]


def test_failed_executor_on_a_peer_reports_partial_text_and_exit_1(env: Env) -> None:
    hub = env.config("hub")
    with FakeOpenAI(mode="drop", answer=ANSWER) as server:
        peer = env.config("laptop", cpu={"kind": "openai", "base_url": server.base_url})
        with env.node(peer):
            code, out, _, err = env.trigger(hub, "q")
    assert code == 1, err
    assert out is not None and out["ok"] is False
    assert out["text"].startswith("one"), "the partial answer is kept"
    assert out["error"].startswith("laptop: ") and "closed the stream before the answer was complete" in out["error"]
