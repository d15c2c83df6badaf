"""Executors: one interface, ``run(prompt, params, on_token, cancel) -> Result``.

An executor streams text through ``on_token`` as it is produced and returns the whole
answer with decomposed timings. It raises only ``ExecutorError`` subclasses. ``check()``
says, without running anything, why it cannot run at all (a missing binary), so a node
can refuse to bid for work it cannot do.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from agent.config import (
    DEFAULT_MODEL,
    CommandExecutorConfig,
    ExecutorConfig,
    GenieExecutorConfig,
    ModelConfig,
    OpenAIExecutorConfig,
    SimExecutorConfig,
)
from agent.errors import EngineUnavailable
from agent.messages import Chat, ModelInfo, Timings, ToolCall

log = logging.getLogger(__name__)

OnToken = Callable[[str], None]


@dataclass(frozen=True)
class Params:
    max_new_tokens: int = 256
    temperature: float | None = None
    timeout_s: float = 600.0
    rid: str = ""                      # exported to child processes as AGENT_RID
    hold_fds: tuple[int, ...] = ()     # inherited by the child: the NPU lock stays held
                                       # for as long as the process using the NPU lives
    warm: bool = False                 # the model was loaded when the job started (Served)
    chat: Chat | None = None           # the conversation, for executors that speak chat
                                       # (the others get its transcript as the prompt)


@dataclass(frozen=True)
class Result:
    text: str
    timings: Timings
    prompt_tokens: int
    generated_tokens: int
    finish_reason: str = ""   # the engine's ("stop", "length", …); "" when it does not say
    tool_calls: tuple[ToolCall, ...] = ()   # the tools the model called, if it had tools


class Executor(Protocol):
    name: str

    def check(self) -> str | None: ...

    def run(self, prompt: str, params: Params, on_token: OnToken,
            cancel: threading.Event | None = None) -> Result: ...


class Served:
    """An executor and the model it serves: whether a job may name it, and whether it is
    warm — loaded, because a job ended less than ``keep_warm_s`` ago (a server keeps its
    model; ``genie-t2t-run`` and a CLI load it for every job: ``keep_warm_s`` 0).

    ``down`` says why its model server cannot be reached (the last run met
    ``EngineUnavailable``), None while it can: the node offers the mode only when it is
    None, and ``back()`` — a connect, no request — tells when to offer it again."""

    def __init__(self, inner: Executor, served: ModelConfig):
        self.inner = inner
        self.served = served
        self.name = inner.name
        self.down: str | None = None
        self._warm_until = 0.0
        self._lock = threading.Lock()

    def __getattr__(self, attr: str) -> Any:  # probe(), simulated, cfg, …
        return getattr(self.inner, attr)

    def check(self) -> str | None:
        return self.inner.check()

    def serves(self, model: str | None) -> bool:
        return self.served.serves(model)

    def is_warm(self) -> bool:
        with self._lock:
            return time.monotonic() < self._warm_until

    def cools_in(self) -> float | None:
        """Seconds until it counts as cold again (no job for ``keep_warm_s``); None: it is."""
        with self._lock:
            left = self._warm_until - time.monotonic()
        return left if left > 0 else None

    @property
    def tools(self) -> bool:
        """Whether it passes tools to its model and returns the model's tool calls."""
        return self.served.tools

    def model_info(self) -> ModelInfo:
        """What it serves, as bids and metrics advertise it (DEFAULT_MODEL if unnamed)."""
        return ModelInfo(self.served.name or DEFAULT_MODEL, self.served.aliases, self.served.context_tokens,
                         self.is_warm(), self.served.tools)

    def run(self, prompt: str, params: Params, on_token: OnToken,
            cancel: threading.Event | None = None) -> Result:
        try:
            result = self.inner.run(prompt, replace(params, warm=self.is_warm()), on_token, cancel)
        except EngineUnavailable as exc:
            if self.down is None:
                log.error("%s: its model server is down, not offering it until it is back: %s", self.name, exc.reason)
            self.down = exc.reason
            with self._lock:
                self._warm_until = 0.0
            raise
        self.down = None
        with self._lock:
            self._warm_until = time.monotonic() + self.served.keep_warm_s
        return result

    def back(self) -> bool:
        """While ``down``: whether the model server accepts connections again (then it is
        no longer down). An executor with no server to reach is back at once."""
        if self.down is None:
            return True
        reachable = getattr(self.inner, "reachable", None)
        if reachable is None or reachable(1.0):
            log.info("%s: its model server is reachable again", self.name)
            self.down = None
            return True
        return False


_BYTES_PER_TOKEN = 4


def estimate_tokens(text: str) -> int:
    """A tokenizer-free estimate (~4 bytes a token for English), for features and limits."""
    return max(1, (len(text.encode("utf-8")) + 3) // _BYTES_PER_TOKEN) if text else 0


def build_executor(cfg: ExecutorConfig, *, name: str) -> Served:
    """The executor a config section describes, with the model it serves."""
    inner: Executor
    if isinstance(cfg, SimExecutorConfig):
        from agent.executors.sim import SimExecutor
        inner = SimExecutor(cfg, name=name)
    elif isinstance(cfg, CommandExecutorConfig):
        from agent.executors.command import CommandExecutor
        inner = CommandExecutor(cfg, name=name)
    elif isinstance(cfg, GenieExecutorConfig):
        from agent.executors.genie import GenieExecutor
        inner = GenieExecutor(cfg, name=name)
    elif isinstance(cfg, OpenAIExecutorConfig):
        from agent.executors.openai import OpenAIExecutor
        inner = OpenAIExecutor(cfg, name=name)
    else:
        raise TypeError(f"unknown executor config {cfg!r}")
    return Served(inner, cfg.served)


def usable(cfg: ExecutorConfig, *, name: str) -> tuple[Served | None, str | None]:
    """The executor a section describes, or None and why it cannot run here at all."""
    executor = build_executor(cfg, name=name)
    problem = executor.check()
    return (None, problem) if problem else (executor, None)


class Stream:
    """What an executor has produced so far: the pieces, when the first came, and whether
    it should stop (token budget spent, or the caller cancelled)."""

    def __init__(self, on_token: OnToken, max_new_tokens: int, cancel: threading.Event | None):
        self.parts: list[str] = []
        self.first_at: float | None = None
        self.at_limit = False
        self._cancel = cancel
        self._on_token = on_token
        self._budget = max_new_tokens
        self._produced = 0

    def stop_reason(self) -> str | None:
        """For procs.stream: "enough" once the budget is spent, "cancel" if the caller gave up."""
        if self.at_limit:
            return "enough"
        if self._cancel is not None and self._cancel.is_set():
            return "cancel"
        return None

    def emit(self, text: str) -> None:
        if not text or self.at_limit:
            return
        if self.first_at is None:
            self.first_at = time.monotonic()
        left = self._budget - self._produced
        if estimate_tokens(text) >= left:
            text = text[:left * _BYTES_PER_TOKEN]  # a hard cap, even for a 64 KiB chunk
            self.at_limit = True
        self.parts.append(text)
        self._on_token(text)
        self._produced += estimate_tokens(text)

    @property
    def text(self) -> str:
        return "".join(self.parts)
