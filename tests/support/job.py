"""A stand-in model for `command` executors in fault tests.

    job.py LOG MODE [GATE]        (prompt on argv after them, as {prompt})

Appends "start <rid> <pid> <t>" and "done <rid> <pid> <t>" lines to LOG (AGENT_RID comes
from the agent), so a test can count executions per request. Modes:

    quick             echo the prompt, a word at a time
    hold              produce nothing until GATE exists, then answer
    token-then-hold   one token, then hold until GATE exists
    crash             one token, then exit 3

It exits on its own when orphaned (its agent was killed), as a model process would when
its output pipe breaks, so tests leave nothing running behind.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def note(log: str, what: str) -> None:
    line = f"{what} {os.environ.get('AGENT_RID', '-')} {os.getpid()} {time.time():.6f}\n"
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def hold(gate: Path, parent: int) -> None:
    while not gate.exists():
        if os.getppid() != parent:
            sys.exit(0)  # orphaned: the agent that ran us is gone
        time.sleep(0.01)  # a stand-in model, waiting to be released by the test


def main() -> int:
    log, mode = sys.argv[1], sys.argv[2]
    gate = Path(sys.argv[3]) if len(sys.argv) > 4 else Path("/nonexistent-gate")
    prompt = sys.argv[-1]
    parent = os.getppid()
    note(log, "start")
    if mode in ("token-then-hold", "crash"):
        sys.stdout.write("partial ")
        sys.stdout.flush()
        if mode == "crash":
            return 3
    if mode in ("hold", "token-then-hold"):
        hold(gate, parent)
    for word in prompt.split():
        sys.stdout.write(word + " ")
        sys.stdout.flush()
    note(log, "done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
