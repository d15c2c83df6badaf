"""``edge-agent node`` (or ``--role node``): the daemon, until SIGINT/SIGTERM (agent/node.py)."""

from __future__ import annotations

import logging
import signal
import threading
from typing import TextIO

from agent.config import Config
from agent.errors import AgentError, ExitCode

log = logging.getLogger("agent")


def run(cfg: Config, err: TextIO) -> int:
    """Run until SIGINT/SIGTERM. The first signal drains (no new work; running jobs get
    ``drain_s`` to finish), a second one stops at once. Another node with our device_id
    ends it with exit 2."""
    from agent.node import Node

    stop = threading.Event()
    fatal: list[AgentError] = []
    signals: list[int] = []

    def on_fatal(error: AgentError) -> None:
        fatal.append(error)
        stop.set()

    def on_signal(signum: int, frame: object) -> None:
        signals.append(signum)
        if len(signals) == 1:
            log.info("received %s: finishing running jobs (up to %g s); send it again to stop at once",
                     signal.Signals(signum).name, cfg.drain_s)
        else:
            log.warning("received %s again: stopping now", signal.Signals(signum).name)
        stop.set()

    node = Node(cfg, on_fatal=on_fatal)
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        node.start()
        # Short waits: a signal may land on another thread, and Python runs its handler
        # only when the main thread wakes up.
        while not stop.wait(0.5):
            pass
        if signals and not fatal:
            stop.clear()
            drained = threading.Thread(target=node.drain, args=(cfg.drain_s,), name="drain", daemon=True)
            drained.start()
            while drained.is_alive() and len(signals) < 2:
                drained.join(0.2)
    finally:
        node.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    if fatal:
        print(f"error: {fatal[0]}", file=err)
        return fatal[0].exit_code
    return ExitCode.OK
