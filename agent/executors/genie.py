"""Qualcomm Genie on the NPU: ``genie-t2t-run -c CONFIG --prompt_file FILE [--profile FILE]``.

Theory of operation. The prompt, with the model's chat template applied (Genie applies
none), is written to a file; the process runs in its own process group with the bundle's
``LD_LIBRARY_PATH`` / ``ADSP_LIBRARY_PATH``. Its stdout looks like::

    <banner lines>
    [PROMPT]: <the prompt file, echoed>
    [BEGIN]: <tokens, written as they are generated>[END]
    [KPIS]:
    Init Time: N us
    Prompt Processing Time: N us, Prompt Processing Rate : X toks/sec
    Token Generation Time: N us, Token Generation Rate: X toks/sec

``GenieOutput`` parses that incrementally. The echo is skipped by the prompt's byte length,
so a prompt that itself contains ``[BEGIN]:`` or ``[END]`` cannot fool it. Tokens are
streamed as they arrive; a partial UTF-8 character, or a partial ``[END]`` / ``[KPIS]:``
marker, is held back until the next read. A missing ``[END]`` is tolerated. The KPI
block, and the ``--profile`` JSON where there is one, become ``init_ms``,
``prefill_ms``, ``decode_ms`` and token counts.
"""

from __future__ import annotations

import codecs
import json
import logging
import math
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import procs
from agent.config import GenieExecutorConfig
from agent.errors import (
    CommandFailed,
    ExecutableNotFound,
    ExecutionTimeout,
    ExecutorError,
)
from agent.executors import OnToken, Params, Result, Stream, estimate_tokens
from agent.messages import Timings

log = logging.getLogger(__name__)

PROMPT_MARK = b"[PROMPT]: "
BEGIN_MARK = b"[BEGIN]:"
END_MARK = b"[END]"
KPIS_MARK = b"[KPIS]:"
# Where the answer can stop: a clean [END], or (no [END]) the KPI block.
TERMINATORS = (END_MARK, b"\n" + KPIS_MARK)
DSP_NOT_FOUND = "Failed to create device: 14001"
# What is kept of the output around the answer: the preamble's tail (where start-up errors
# are) and the trailer's head (the KPIs); a runner that prints megabytes costs no more.
PREAMBLE_MAX_BYTES = TRAILER_MAX_BYTES = 64 * 1024
PROFILE_MAX_BYTES = 16 * 1024 * 1024

CHAT_TEMPLATES = {
    "raw": "{prompt}",
    "llama3": ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "chatml": "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n",
}


def apply_template(name: str, prompt: str) -> str:
    return CHAT_TEMPLATES[name].replace("{prompt}", prompt)


@dataclass
class Kpis:
    init_us: float | None = None
    prompt_us: float | None = None
    prompt_rate: float | None = None
    gen_us: float | None = None
    gen_rate: float | None = None
    prompt_tokens: int | None = None
    generated_tokens: int | None = None


_NUM = r"(\d+(?:\.\d+)?)"
_KPI_PATTERNS = {
    "init": re.compile(rf"Init Time:\s*{_NUM}\s*us"),
    "prompt": re.compile(rf"Prompt Processing Time:\s*{_NUM}\s*us,\s*Prompt Processing Rate\s*:\s*{_NUM}"),
    "gen": re.compile(rf"Token Generation Time:\s*{_NUM}\s*us,\s*Token Generation Rate\s*:\s*{_NUM}"),
}


def parse_kpis(text: str) -> Kpis:
    """The KPIs genie-t2t-run prints after the answer; what is missing or garbled stays None."""
    k = Kpis()
    if m := _KPI_PATTERNS["init"].search(text):
        k.init_us = _finite(m.group(1))
    if m := _KPI_PATTERNS["prompt"].search(text):
        k.prompt_us, k.prompt_rate = _finite(m.group(1)), _finite(m.group(2))
        k.prompt_tokens = _tokens(k.prompt_us, k.prompt_rate)
    if m := _KPI_PATTERNS["gen"].search(text):
        k.gen_us, k.gen_rate = _finite(m.group(1)), _finite(m.group(2))
        k.generated_tokens = _tokens(k.gen_us, k.gen_rate)
    return k


def _finite(value: Any) -> float | None:
    """A non-negative finite number from a KPI or profile field, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) and number >= 0 else None


def _tokens(us: float | None, rate: float | None) -> int | None:
    if us is None or rate is None:
        return None
    count = us / 1e6 * rate
    return round(count) if math.isfinite(count) else None


def _micros(value: Any) -> float | None:
    """A profile quantity in µs: a bare number (µs) or {"value": n, "unit": "us|ms|s"}."""
    unit: Any = "us"
    if isinstance(value, dict):
        unit, value = value.get("unit", "us"), value.get("value")
    if isinstance(value, str):
        return None
    scale = {"us": 1.0, "ms": 1e3, "s": 1e6}.get(unit.lower() if isinstance(unit, str) else "", 1.0)
    number = _finite(value)
    return None if number is None or not math.isfinite(number * scale) else number * scale


def _count(value: Any) -> int | None:
    if isinstance(value, dict):
        value = value.get("value")
    number = _finite(value) if not isinstance(value, str) else None
    return int(number) if number is not None else None


def merge_profile(k: Kpis, profile: Any) -> Kpis:
    """Fill what stdout did not say from the --profile JSON (only the fields we know;
    anything of another shape is ignored)."""
    components = profile.get("components") if isinstance(profile, dict) else None
    events = [e for c in components if isinstance(c, dict) and isinstance(c.get("events"), list)
              for e in c["events"] if isinstance(e, dict)] if isinstance(components, list) else []
    for e in events:
        if e.get("type") == "GenieDialog_create" and k.init_us is None:
            k.init_us = _micros(e.get("duration"))
        elif e.get("type") == "GenieDialog_query":
            if k.prompt_us is None:
                k.prompt_us = _micros(e.get("time-to-first-token"))
            if k.gen_us is None:
                k.gen_us = _micros(e.get("token-generation-time"))
            if k.prompt_tokens is None:
                k.prompt_tokens = _count(e.get("num-prompt-tokens"))
            if k.generated_tokens is None:
                k.generated_tokens = _count(e.get("num-generated-tokens"))
    return k


def read_profile(path: Path) -> Any:
    """The --profile file as JSON, or {} if it is missing or not JSON (logged)."""
    try:
        return json.loads(path.read_bytes()[:PROFILE_MAX_BYTES])
    except (OSError, ValueError, RecursionError) as exc:
        log.info("genie profile %s not usable: %s", path, type(exc).__name__ if isinstance(exc, RecursionError)
                 else exc)
        return {}


class GenieOutput:
    """Incremental parser of genie-t2t-run's stdout for one known prompt, in time linear in
    the output and memory bounded by the answer (see PREAMBLE_MAX_BYTES)."""

    def __init__(self, prompt_file_bytes: bytes):
        # Genie may trim trailing whitespace from the echo; skipping the trimmed length
        # is still past anything in the prompt that could look like a marker.
        self._echo_len = len(prompt_file_bytes.rstrip())
        self._state = "preamble"
        self._buf = b""
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text_parts: list[str] = []
        self._preamble = bytearray()
        self._trailer = bytearray()
        self.ended = False

    @property
    def started(self) -> bool:
        return self._state in ("answer", "trailer")

    @property
    def preamble(self) -> bytes:
        return bytes(self._preamble)

    @property
    def trailer(self) -> bytes:
        return bytes(self._trailer)

    def _keep_preamble(self, data: bytes) -> None:
        self._preamble += data[-PREAMBLE_MAX_BYTES:]
        if len(self._preamble) > PREAMBLE_MAX_BYTES:
            del self._preamble[:-PREAMBLE_MAX_BYTES]

    def _keep_trailer(self, data: bytes) -> None:
        room = TRAILER_MAX_BYTES - len(self._trailer)
        if room > 0:
            self._trailer += data[:room]

    def feed(self, data: bytes) -> str:
        """Take more stdout; return answer text that is now safe to stream."""
        self._buf += data  # small: each state below keeps at most a marker's length of it
        out: list[str] = []
        while True:
            if self._state == "preamble":
                i = self._buf.find(PROMPT_MARK)
                if i < 0:
                    keep = min(len(PROMPT_MARK) - 1, len(self._buf))
                    self._keep_preamble(self._buf[:len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep:]
                    break
                self._keep_preamble(self._buf[:i])
                self._buf = self._buf[i + len(PROMPT_MARK):]
                self._state = "echo"
            elif self._state == "echo":
                if len(self._buf) < self._echo_len:
                    self._echo_len -= len(self._buf)
                    self._buf = b""
                    break
                self._buf = self._buf[self._echo_len:]
                self._echo_len = 0
                self._state = "begin"
            elif self._state == "begin":
                i = self._buf.find(BEGIN_MARK)
                if i < 0:
                    keep = min(len(BEGIN_MARK) - 1, len(self._buf))
                    self._buf = self._buf[len(self._buf) - keep:]
                    break
                self._buf = self._buf[i + len(BEGIN_MARK):]
                self._state = "space"
            elif self._state == "space":
                if not self._buf:
                    break
                if self._buf[:1] == b" ":
                    self._buf = self._buf[1:]
                self._state = "answer"
            elif self._state == "answer":
                cut, mark = _first_terminator(self._buf)
                if cut >= 0:
                    out.append(self._decoder.decode(self._buf[:cut], final=True))
                    self._keep_trailer(self._buf[cut:])
                    self.ended = mark == END_MARK
                    self._buf = b""
                    self._state = "trailer"
                    continue
                safe = len(self._buf) - _held_back(self._buf)
                out.append(self._decoder.decode(self._buf[:safe]))
                self._buf = self._buf[safe:]
                break
            else:  # trailer
                self._keep_trailer(self._buf)
                self._buf = b""
                break
        text = "".join(out)
        if text:
            self.text_parts.append(text)
        return text

    def close(self) -> str:
        """End of stdout: flush what was held back (no [END] came); return it."""
        if self._state != "answer":
            return ""
        tail = self._decoder.decode(self._buf, final=True)
        self._buf = b""
        self._state = "trailer"
        if tail:
            self.text_parts.append(tail)
        return tail

    @property
    def text(self) -> str:
        text = "".join(self.text_parts)
        return text if self.ended else text.rstrip("\n")


def _first_terminator(buf: bytes) -> tuple[int, bytes]:
    hits = [(buf.find(m), m) for m in TERMINATORS]
    hits = [(i, m) for i, m in hits if i >= 0]
    return min(hits) if hits else (-1, b"")


def _held_back(buf: bytes) -> int:
    """Length of the longest tail of buf that could be the start of a terminator."""
    best = 0
    for mark in TERMINATORS:
        for n in range(min(len(mark) - 1, len(buf)), 0, -1):
            if buf.endswith(mark[:n]):
                best = max(best, n)
                break
    return best


class GenieExecutor:
    """One genie-t2t-run process per job; the NPU is single-tenant (the caller holds its lock)."""

    def __init__(self, cfg: GenieExecutorConfig, *, name: str):
        self.cfg = cfg
        self.name = f"{name}:genie"

    def check(self) -> str | None:
        import shutil
        if shutil.which(self.cfg.command) is None:
            return f"executable not found: {self.cfg.command!r}"
        if self.cfg.config is None:
            return "npu.executor.config is not set"
        if not os.path.isfile(self.cfg.config):
            return f"Genie config not found: {self.cfg.config}"
        return None

    def env(self, rid: str = "") -> dict[str, str]:
        env = dict(os.environ)
        if rid:
            env["AGENT_RID"] = rid
        if self.cfg.library_path:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(
                p for p in (self.cfg.library_path, env.get("LD_LIBRARY_PATH")) if p)
        if self.cfg.adsp_library_path:
            env["ADSP_LIBRARY_PATH"] = self.cfg.adsp_library_path
        return env

    def argv(self, prompt_file: str, profile_file: str | None) -> list[str]:
        argv = [self.cfg.command, "-c", str(self.cfg.config), "--prompt_file", prompt_file]
        if profile_file:
            argv += ["--profile", profile_file]
        return argv

    def run(self, prompt: str, params: Params, on_token: OnToken,
            cancel: threading.Event | None = None) -> Result:
        start = time.monotonic()
        templated = apply_template(self.cfg.chat_template, prompt).encode("utf-8")
        attempts = 1 + self.cfg.retries
        with tempfile.TemporaryDirectory(prefix="genie-") as tmp:
            prompt_file = Path(tmp) / "prompt.txt"
            prompt_file.write_bytes(templated)
            profile_file = Path(tmp) / "profile.json" if self.cfg.profile else None
            for attempt in range(1, attempts + 1):
                output = GenieOutput(templated)
                stream = Stream(on_token, params.max_new_tokens, cancel)
                try:
                    self._once(output, stream, prompt_file, profile_file, params, start)
                except (ExecutableNotFound, ExecutionTimeout):
                    raise
                except CommandFailed as exc:
                    message = self._explain(exc, output)
                    # Genie fails sporadically at start-up; retry only before any token.
                    if attempt < attempts and not stream.parts and DSP_NOT_FOUND not in message:
                        log.warning("%s: attempt %d failed (%s); retrying", self.name, attempt, message)
                        continue
                    raise ExecutorError(self.name, message, partial_text=stream.text) from None
                break
            kpis = parse_kpis(output.trailer.decode("utf-8", "replace"))
            if profile_file is not None:
                kpis = merge_profile(kpis, read_profile(profile_file))
        end = time.monotonic()
        # Stopped at max_new_tokens, the parser may already hold more than the cap allowed.
        text = stream.text if stream.at_limit else output.text
        init_ms = (kpis.init_us or 0) / 1000
        prefill_ms = (kpis.prompt_us or 0) / 1000
        decode_ms = (kpis.gen_us / 1000) if kpis.gen_us is not None else (
            (end - stream.first_at) * 1000 if stream.first_at else 0.0)
        return Result(text=text,
                      timings=Timings(init_ms=init_ms, prefill_ms=prefill_ms, decode_ms=decode_ms,
                                      total_ms=(end - start) * 1000),
                      prompt_tokens=kpis.prompt_tokens or estimate_tokens(templated.decode("utf-8")),
                      generated_tokens=kpis.generated_tokens or estimate_tokens(text))

    def _once(self, output: GenieOutput, stream: Stream, prompt_file: Path,
              profile_file: Path | None, params: Params, start: float) -> None:
        remaining = params.timeout_s - (time.monotonic() - start)
        argv = self.argv(str(prompt_file), str(profile_file) if profile_file else None)
        procs.stream(self.name, argv, on_stdout=lambda chunk: stream.emit(output.feed(chunk)),
                     env=self.env(params.rid), timeout_s=min(remaining, self.cfg.timeout_s),
                     stop=stream.stop_reason, partial=lambda: stream.text, pass_fds=params.hold_fds)
        if stream.at_limit:
            return  # stopped at max_new_tokens: a complete, truncated answer
        stream.emit(output.close())
        if not output.started:
            tail = output.preamble.decode("utf-8", "replace")[-500:]
            raise ExecutorError(self.name, "genie-t2t-run produced no [BEGIN]: answer; output was:\n" + tail)

    def _explain(self, exc: CommandFailed, output: GenieOutput) -> str:
        text = exc.output_tail + "\n" + output.preamble.decode("utf-8", "replace")
        if DSP_NOT_FOUND in text:
            return (f"{DSP_NOT_FOUND}: the DSP libraries were not found; set npu.executor.adsp_library_path "
                    "(ADSP_LIBRARY_PATH) to the directory with the Hexagon skeleton libraries, and "
                    "library_path (LD_LIBRARY_PATH) to the QAIRT libraries")
        return exc.reason


