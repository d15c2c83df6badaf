"""A simulated device, for the demo, the tests, the benchmarks and the scheduler simulator.

Latency model (documented, deterministic for a given seed):

    start-up  = base_ms, + cold_ms when the model is not warm (model load)
    prefill   = ms_per_prompt_token × prompt tokens × heat slowdown
    per token = (ms_per_token + U(0, jitter_ms)) × heat slowdown
    total     = start-up + prefill + Σ per-token delays    over the generated tokens

``init_ms`` reports the start-up, and ``prefill_ms`` the prefill apart; with
``ttft_init`` it reports both as ``init_ms`` (the time to the first token, as llama-cli
does), so the node's start-up record learns the prefill. The heat slowdown is
``1 + (throttle − 1) · heat``: heat rises towards 1 with time constant ``heat_s`` while
any job runs and falls back with ``2 · heat_s`` while idle (a phone that throttles when
hot); a job's slowdown is fixed when it starts. ``throttle: 1`` (the default) never slows.

The answer is ``text`` from the config, or the prompt echoed back, cut to
``max_new_tokens`` whitespace-separated tokens. Everything it produces is labelled as
simulated in logs and status.

With ``tools: true`` it stands in for a model that calls tools: given a conversation with
tools whose last turn is not a tool's result, it answers with one call of the first tool,
``{"text": <the last user message>}``, and no text; after a tool's result it answers in
text as usual.
"""

from __future__ import annotations

import math
import random
import re
import threading
import time

from agent.config import SimExecutorConfig
from agent.errors import Cancelled, ExecutionTimeout
from agent.executors import OnToken, Params, Result, estimate_tokens
from agent.messages import Chat, Timings, ToolCall, tool_name

_TOKEN_RE = re.compile(r"\s*\S+")


class SimExecutor:
    simulated = True

    def __init__(self, cfg: SimExecutorConfig, *, name: str):
        self.cfg = cfg
        self.name = f"{name}:sim"
        self._rng = random.Random(cfg.seed)
        self._rng_lock = threading.Lock()  # also guards the heat
        self._heat, self._heat_at, self._running = 0.0, time.monotonic(), 0

    def _warm_up(self, now: float, running: int) -> None:
        """Advance the heat to ``now``, then count ``running`` jobs from here (lock held)."""
        dt = max(now - self._heat_at, 0.0)
        if self._running:
            self._heat += (1.0 - self._heat) * (1.0 - math.exp(-dt / self.cfg.heat_s))
        else:
            self._heat *= math.exp(-dt / (2.0 * self.cfg.heat_s))
        self._heat_at, self._running = now, running

    def check(self) -> str | None:
        return None

    def run(self, prompt: str, params: Params, on_token: OnToken,
            cancel: threading.Event | None = None) -> Result:
        cancel = cancel or threading.Event()
        start = time.monotonic()
        deadline = start + params.timeout_s
        call = sim_tool_call(params.chat) if self.cfg.served.tools else None
        tokens = _TOKEN_RE.findall(self.cfg.text if self.cfg.text is not None else prompt)
        tokens = [] if call is not None else (tokens[:params.max_new_tokens] or ["…"])
        with self._rng_lock:
            self._warm_up(start, self._running + 1)
            slow = 1.0 + (self.cfg.throttle - 1.0) * self._heat
            delays = [(self.cfg.ms_per_token + self._rng.uniform(0, self.cfg.jitter_ms)) * slow / 1000
                      for _ in tokens]
        try:
            return self._run(prompt, params, on_token, cancel, start, deadline, call, tokens, delays, slow)
        finally:
            with self._rng_lock:
                self._warm_up(time.monotonic(), self._running - 1)

    def _run(self, prompt: str, params: Params, on_token: OnToken, cancel: threading.Event, start: float,
             deadline: float, call: ToolCall | None, tokens: list[str], delays: list[float],
             slow: float) -> Result:
        def wait(seconds: float, produced: str) -> None:
            remaining = deadline - time.monotonic()
            if cancel.wait(min(seconds, max(remaining, 0.0))):
                raise Cancelled(self.name, partial_text=produced)
            if time.monotonic() >= deadline and seconds > remaining:
                raise ExecutionTimeout(self.name, params.timeout_s, partial_text=produced)

        prefill_s = self.cfg.ms_per_prompt_token * estimate_tokens(prompt) * slow / 1000
        wait((self.cfg.base_ms + (0.0 if params.warm else self.cfg.cold_ms)) / 1000, "")
        if self.cfg.ttft_init:
            wait(prefill_s, "")
        init_done = prefill_done = time.monotonic()
        if prefill_s > 0 and not self.cfg.ttft_init:
            wait(prefill_s, "")
            prefill_done = time.monotonic()
        produced: list[str] = []
        for token, delay in zip(tokens, delays, strict=True):
            wait(delay, "".join(produced))
            produced.append(token)
            on_token(token)
        end = time.monotonic()
        text = "".join(produced)
        return Result(text=text,
                      timings=Timings(init_ms=(init_done - start) * 1000,
                                      prefill_ms=(prefill_done - init_done) * 1000,
                                      decode_ms=(end - prefill_done) * 1000,
                                      total_ms=(end - start) * 1000),
                      prompt_tokens=estimate_tokens(prompt), generated_tokens=len(produced) or int(call is not None),
                      tool_calls=(call,) if call is not None else ())


def sim_tool_call(chat: Chat | None) -> ToolCall | None:
    """The deterministic tool call of the module docstring, or None (answer in text)."""
    if chat is None or not chat.tools or chat.messages[-1].role == "tool":
        return None
    name = tool_name(chat.tools[0])
    users = [m.content for m in chat.messages if m.role == "user"]
    return None if name is None else ToolCall(name=name, arguments={"text": users[-1] if users else ""},
                                              id="call_sim_0")
