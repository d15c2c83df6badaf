"""A stand-in model for `command` executors in fault tests.

    job.py LOG MODE [GATE]        (prompt on argv after them, as {prompt})

Appends "start <rid> <pid> <t>" and "done <rid> <pid> <t>" lines to LOG (AGENT_RID comes
from the agent), so a test can count executions per request. Modes:

    quick             echo the prompt, a word at a time
    work              the same, taking WORK_S (0.05 s) per word, as a model would
    hold              produce nothing until GATE exists, then answer
    token-then-hold   one token, then hold until GATE exists
    crash             one token, then exit 3

GATE is a FIFO (tests/support/fleet.Gate): holding is a blocking read on it, released by
the test writing one byte. The kernel kills this process when the agent thread that
started it dies (PR_SET_PDEATHSIG), so a test that kills a node leaves nothing behind.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

WORK_S = 0.05


def note(log: str, what: str) -> None:
    line = f"{what} {os.environ.get('AGENT_RID', '-')} {os.getpid()} {time.time():.6f}\n"
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def die_with_parent() -> None:
    import ctypes
    import signal
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the agent died before the signal was armed: we were reparented
        sys.exit(0)


def hold(gate: Path) -> None:
    with open(gate, "rb", buffering=0) as fifo:
        fifo.read(1)  # blocks until the test releases the gate; one byte per run


def main() -> int:
    log, mode = sys.argv[1], sys.argv[2]
    gate = Path(sys.argv[3]) if len(sys.argv) > 4 else Path("/nonexistent-gate")
    prompt = sys.argv[-1]
    die_with_parent()
    note(log, "start")
    if mode in ("token-then-hold", "crash"):
        sys.stdout.write("partial ")
        sys.stdout.flush()
        if mode == "crash":
            return 3
    if mode in ("hold", "token-then-hold"):
        hold(gate)
    for word in prompt.split():
        if mode == "work":
            time.sleep(WORK_S)  # the stand-in model's own work, not a test waiting on something
        sys.stdout.write(word + " ")
        sys.stdout.flush()
    note(log, "done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
