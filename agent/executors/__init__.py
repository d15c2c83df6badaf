"""Executors: one interface, ``run(prompt, params, on_token, cancel) -> Result``.

An executor streams text through ``on_token`` as it is produced and returns the whole
answer with decomposed timings. It raises only ``ExecutorError`` subclasses. ``check()``
says, without running anything, why it cannot run at all (a missing binary), so a node
can refuse to bid for work it cannot do.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from agent.config import (CommandExecutorConfig, ExecutorConfig, GenieExecutorConfig,
                          OpenAIExecutorConfig, SimExecutorConfig)
from agent.messages import Timings

OnToken = Callable[[str], None]


@dataclass(frozen=True)
class Params:
    max_new_tokens: int = 256
    temperature: float | None = None
    timeout_s: float = 600.0


@dataclass(frozen=True)
class Result:
    text: str
    timings: Timings
    prompt_tokens: int
    generated_tokens: int


class Executor(Protocol):
    name: str

    def check(self) -> str | None: ...

    def run(self, prompt: str, params: Params, on_token: OnToken,
            cancel: threading.Event | None = None) -> Result: ...


def estimate_tokens(text: str) -> int:
    """A tokenizer-free estimate (~4 bytes a token for English), for features and sims."""
    return max(1, (len(text.encode("utf-8")) + 3) // 4) if text else 0


def build_executor(cfg: ExecutorConfig, *, name: str) -> Executor:
    """The executor a config section describes."""
    if isinstance(cfg, SimExecutorConfig):
        from agent.executors.sim import SimExecutor
        return SimExecutor(cfg, name=name)
    if isinstance(cfg, CommandExecutorConfig):
        from agent.executors.command import CommandExecutor
        return CommandExecutor(cfg, name=name)
    if isinstance(cfg, (GenieExecutorConfig, OpenAIExecutorConfig)):
        return _Unavailable(cfg.kind, name)
    raise TypeError(f"unknown executor config {cfg!r}")


class _Unavailable:
    """A kind this build validates in config but cannot run yet: it says so, never pretends."""

    def __init__(self, kind: str, name: str):
        self.name = f"{name}:{kind}"
        self.kind = kind

    def check(self) -> str | None:
        return f"executor kind {self.kind!r} is not available in this version of edge-agent"

    def run(self, prompt: str, params: Params, on_token: OnToken,
            cancel: threading.Event | None = None) -> Result:
        from agent.errors import ExecutorError
        raise ExecutorError(self.name, self.check() or "")
