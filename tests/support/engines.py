"""Real inference engines for the tests: llama.cpp's ``llama-server`` and llama-cpp-python's
server, started on free ports with the tiny random-weight model (tests/support/tiny_gguf.py).

``scripts/engines`` builds both once per version into a cache outside the clone (setup
runs it); here they are only found and started. When one is missing the tests that need it
skip with the reason — unless ``EDGE_AGENT_REQUIRE_ENGINES=1`` (CI), which makes that a
failure. ``Engine`` is one running engine, or the stand-in (tests/support/fake_openai.py)
behind the same interface, so every engine test runs against all three.

Readiness is read from the engine's own log line ("model loaded" / "Uvicorn running"), not
by polling its port.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.fake_openai import FakeOpenAI
from tests.support.mosquitto import free_port
from tests.support.tiny_gguf import CONTEXT

REPO = Path(__file__).resolve().parents[2]
KINDS = ("stand-in", "llama-server", "llama-cpp-python")
MODEL = "tiny"        # the name every engine here serves the model under
START_TIMEOUT_S = 60.0


class EngineMissing(Exception):
    """An engine is not built or installed here (the message says how to get it)."""


def llama_server_binary() -> str:
    """The llama-server that scripts/engines built (or $EDGE_AGENT_LLAMA_SERVER)."""
    explicit = os.environ.get("EDGE_AGENT_LLAMA_SERVER")
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise EngineMissing(f"EDGE_AGENT_LLAMA_SERVER={explicit} is not an executable")
        return explicit
    out = subprocess.run(["bash", str(REPO / "scripts" / "engines"), "--path"], capture_output=True, text=True,
                         check=False)
    path = out.stdout.strip()
    if out.returncode != 0 or not path or not os.access(path, os.X_OK):
        raise EngineMissing(f"llama-server is not built ({path or out.stderr.strip()}); run scripts/engines")
    return path


def python_server() -> None:
    """Raise EngineMissing unless llama-cpp-python and its [server] extra are installed."""
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError as exc:
        raise EngineMissing(f"llama-cpp-python[server] is not installed ({exc}); run scripts/engines") from None


def require(kind: str) -> None:
    """Skip (or, with EDGE_AGENT_REQUIRE_ENGINES=1, fail) a test whose engine is missing."""
    try:
        if kind == "llama-server":
            llama_server_binary()
        elif kind == "llama-cpp-python":
            python_server()
    except EngineMissing as exc:
        if os.environ.get("EDGE_AGENT_REQUIRE_ENGINES") == "1":
            pytest.fail(f"{kind}: {exc} (EDGE_AGENT_REQUIRE_ENGINES=1)")
        pytest.skip(f"{kind}: {exc}")


@dataclass
class Engine:
    """One engine serving MODEL at ``base_url``: a real process, or the stand-in."""

    kind: str
    base_url: str
    slots: int
    api_key: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    fake: FakeOpenAI | None = None
    log_lines: list[str] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1].split("/")[0])

    @property
    def reports_stream_usage(self) -> bool:
        """llama-cpp-python's server ignores stream_options.include_usage."""
        return self.kind != "llama-cpp-python"

    def kill(self) -> None:
        """Stop the engine at once (SIGKILL), as a crash would."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        elif self.fake is not None:
            self.fake.kill()

    def log(self) -> str:
        return "\n".join(self.log_lines[-40:])


def _start(argv: list[str], ready_marker: str, log_lines: list[str], env: dict[str, str] | None = None
           ) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env, start_new_session=True)
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            log_lines.append(line)
            if ready_marker in line:
                ready.set()
        proc.stdout.close()
        ready.set()  # it exited

    threading.Thread(target=read, name="engine-log", daemon=True).start()
    if not ready.wait(START_TIMEOUT_S) or proc.poll() is not None:
        proc.kill()
        proc.wait(10)
        tail = "\n".join(log_lines[-30:])
        raise RuntimeError(f"{argv[0]} did not start within {START_TIMEOUT_S:g} s; its log ends:\n{tail}")
    return proc


@contextmanager
def engine(kind: str, model: Path, *, slots: int = 1, api_key: str | None = None, interrupt: bool = False,
           context: int = CONTEXT, port: int | None = None) -> Iterator[Engine]:
    """Start an engine on a free port (or ``port``) serving ``model`` as MODEL.

    ``slots``: llama-server's ``--parallel`` (and the stand-in's); llama-cpp-python's
    server runs one request at a time whatever it is told. ``interrupt``: llama-cpp-python's
    default (``--interrupt_requests True``), which cuts a running answer off when another
    request arrives; False everywhere else (the README's setting).
    """
    require(kind)
    port = port or free_port()
    if kind == "stand-in":
        with FakeOpenAI(answer=None, models=(MODEL,), api_key=api_key, slots=slots, context=context,
                        interrupt=interrupt, interrupt_hold_s=30.0 if interrupt else 0.0, port=port, timings=True,
                        prefill_ms=2) as fake:
            yield Engine(kind, fake.base_url, slots, api_key, fake=fake)
        return
    log_lines: list[str] = []
    if kind == "llama-server":
        argv = [llama_server_binary(), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
                "-a", MODEL, "-c", str(context * slots), "--parallel", str(slots), "-t", "1", "--no-warmup",
                "--no-webui"]
        if api_key:
            argv += ["--api-key", api_key]
        proc = _start(argv, "model loaded", log_lines)
    else:
        argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--model_alias", MODEL,
                "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(context), "--n_threads", "1",
                "--interrupt_requests", str(interrupt)]
        if api_key:
            argv += ["--api_key", api_key]
        proc = _start(argv, "Uvicorn running", log_lines, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        yield Engine(kind, f"http://127.0.0.1:{port}/v1", slots, api_key, proc=proc, log_lines=log_lines)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

