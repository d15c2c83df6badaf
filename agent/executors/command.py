"""Any command-line model runner (llama.cpp's ``llama-cli``, ``ollama run`` …).

The prompt replaces ``{prompt}`` inside argv as one argument, or goes on stdin; never
through a shell. stdout is streamed as it arrives (partial UTF-8 held back) and is the
answer; a non-zero exit is a ``CommandFailed`` with the tail of stderr.
"""

from __future__ import annotations

import codecs
import os
import shutil
import threading
import time

from agent import procs
from agent.config import CommandExecutorConfig
from agent.executors import OnToken, Params, Result, Stream, estimate_tokens
from agent.messages import Timings


class CommandExecutor:
    def __init__(self, cfg: CommandExecutorConfig, *, name: str):
        self.cfg = cfg
        self.name = f"{name}:command"

    def check(self) -> str | None:
        if shutil.which(self.cfg.argv[0]) is None:
            return f"executable not found: {self.cfg.argv[0]!r}"
        return None

    def argv(self, prompt: str) -> list[str]:
        if self.cfg.prompt_via == "stdin":
            return list(self.cfg.argv)
        return [a.replace("{prompt}", prompt) for a in self.cfg.argv]

    def run(self, prompt: str, params: Params, on_token: OnToken,
            cancel: threading.Event | None = None) -> Result:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stream = Stream(on_token, params.max_new_tokens, cancel)
        env = {**os.environ, **dict(self.cfg.env), **({"AGENT_RID": params.rid} if params.rid else {})}
        start = time.monotonic()
        procs.stream(self.name, self.argv(prompt), on_stdout=lambda b: stream.emit(decoder.decode(b)),
                     stdin=prompt.encode("utf-8") if self.cfg.prompt_via == "stdin" else None,
                     env=env, cwd=self.cfg.cwd, timeout_s=min(params.timeout_s, self.cfg.timeout_s),
                     stop=stream.stop_reason, partial=lambda: stream.text, pass_fds=params.hold_fds)
        stream.emit(decoder.decode(b"", final=True))
        end = time.monotonic()
        first = stream.first_at or end
        return Result(text=stream.text,
                      timings=Timings(init_ms=(first - start) * 1000, decode_ms=(end - first) * 1000,
                                      total_ms=(end - start) * 1000),
                      prompt_tokens=estimate_tokens(prompt), generated_tokens=estimate_tokens(stream.text))
