"""Running a child process for an executor: one function, typed failures.

The child gets its own session (process group), so a timeout or cancel kills it and
everything it started (no orphaned ``genie-t2t-run`` holding the NPU). stdout is read in
raw chunks as they arrive (no line buffering in our process); stderr is drained in the
background and only its tail kept, for error messages. Prompts travel as argv elements or
on stdin, never through a shell.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from agent.errors import (
    Cancelled,
    CommandFailed,
    ExecutableNotFound,
    ExecutionTimeout,
    ExecutorError,
)

log = logging.getLogger(__name__)

TAIL_BYTES = 4096
_KILL_GRACE_S = 2.0
_WATCHDOG_TICK_S = 0.05  # how soon a timeout or a stop request reaches the child


@dataclass(frozen=True)
class Finished:
    returncode: int
    stderr_tail: str
    elapsed_s: float


def resolve(executor: str, command: str) -> str:
    """Absolute path of ``command`` or ExecutableNotFound naming it."""
    found = shutil.which(command)
    if found is None:
        raise ExecutableNotFound(executor, command)
    return found


def stream(executor: str, argv: Sequence[str], *, on_stdout: Callable[[bytes], None],
           stdin: bytes | None = None, env: Mapping[str, str] | None = None,
           cwd: str | None = None, timeout_s: float = 600.0,
           stop: Callable[[], str | None] = lambda: None, check: bool = True,
           partial: Callable[[], str] = lambda: "", pass_fds: tuple[int, ...] = ()) -> Finished:
    """Run argv, feeding stdout chunks to ``on_stdout``; raise typed errors on failure.

    ``stop()`` is polled while the child runs: None goes on; "cancel" kills it and raises
    (the caller gave up); "enough" kills it and returns normally (the answer is complete,
    e.g. max_new_tokens reached)."""
    argv = [resolve(executor, argv[0]), *argv[1:]]
    start = time.monotonic()
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(env) if env else None,
                                cwd=cwd, start_new_session=True, bufsize=0, pass_fds=pass_fds)
    except OSError as exc:
        raise ExecutorError(executor, f"cannot start {argv[0]}: {exc.strerror or exc}") from None

    tail: deque[bytes] = deque()
    tail_size = [0]

    def drain_stderr() -> None:
        assert proc.stderr is not None
        for chunk in iter(lambda: proc.stderr.read(4096), b""):  # type: ignore[union-attr]
            tail.append(chunk)
            tail_size[0] += len(chunk)
            while tail_size[0] > TAIL_BYTES and len(tail) > 1:
                tail_size[0] -= len(tail.popleft())

    err_thread = threading.Thread(target=drain_stderr, name=f"{executor}-stderr", daemon=True)
    err_thread.start()
    if stdin is not None:
        threading.Thread(target=_feed, args=(proc, stdin), name=f"{executor}-stdin", daemon=True).start()

    timer_fired = threading.Event()
    stopped: list[str] = []
    deadline = start + timeout_s

    def watchdog() -> None:
        while proc.poll() is None:
            why = stop()
            if why is not None:
                stopped.append(why)
                break
            if time.monotonic() >= deadline:
                timer_fired.set()
                break
            time.sleep(_WATCHDOG_TICK_S)
        else:
            return
        _kill_group(proc)

    threading.Thread(target=watchdog, name=f"{executor}-watchdog", daemon=True).start()
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    try:
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            on_stdout(chunk)
    finally:
        proc.stdout.close()
        returncode = proc.wait()
        err_thread.join(timeout=5)
        if proc.stderr is not None:
            proc.stderr.close()
    stderr_tail = b"".join(tail)[-TAIL_BYTES:].decode("utf-8", "replace").strip()
    elapsed = time.monotonic() - start
    if timer_fired.is_set():
        raise ExecutionTimeout(executor, timeout_s, partial_text=partial())
    if stopped == ["enough"]:
        return Finished(0, stderr_tail, elapsed)
    if stopped:
        raise Cancelled(executor, partial_text=partial())
    if check and returncode != 0:
        raise CommandFailed(executor, argv, returncode, stderr_tail, partial_text=partial())
    return Finished(returncode, stderr_tail, elapsed)


def _feed(proc: subprocess.Popen[bytes], data: bytes) -> None:
    try:
        assert proc.stdin is not None
        proc.stdin.write(data)
        proc.stdin.close()
    except (BrokenPipeError, OSError):
        pass  # the child exited without reading all of it; its exit code says why


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the whole group, then SIGKILL what is still there after a grace period."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=_KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
