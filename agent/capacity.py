"""What this device can offer right now: its executors, its NPU, its health.

Theory of operation. Every other part of the daemon asks this one before it offers or
takes work, so "can this node take a job" has one answer:

- an executor whose model server cannot be reached (``Served.down``) is off the offer
  until a connect succeeds again (``retry_engines``, from the presence loop);
- the NPU is free when it is configured, up, not running a job of ours and not claimed
  by another process of this device (its ``flock``);
- ``health`` is "ok" or why the node takes no work (a ``state_dir`` it cannot write);
  ``draining`` is set on SIGTERM. ``taking_work`` is both.

It holds no thread of its own; ``on_change`` tells the presence loop that the metrics
should go out soon (health changed).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from agent.errors import StateError
from agent.executors import Served
from agent.locks import CpuSlots, NpuLock
from agent.statefiles import check_writable

# The daemon's parts log under its name: operators and tests filter its lines by it.
log = logging.getLogger("agent.node")


class Capacity:
    def __init__(self, state_dir: Path, npu: Served | None, cpu: Served | None, cpu_slots: int, *,
                 on_change: Callable[[], None] = lambda: None):
        self.state_dir = state_dir
        self.npu = npu
        self.cpu = cpu
        self.slots = cpu_slots if cpu is not None else 0
        self.npu_lock = NpuLock(state_dir)
        self.cpu_slots = CpuSlots(state_dir, self.slots)
        self.npu_busy_here = False  # a job of ours holds the NPU
        self.health = "ok"          # or why this node takes no work
        self.draining = False
        self._on_change = on_change

    def executor(self, mode: str) -> Served | None:
        return self.npu if mode == "npu" else self.cpu

    @property
    def executors(self) -> list[Served]:
        return [e for e in (self.npu, self.cpu) if e is not None]

    @property
    def simulated(self) -> bool:
        return any(getattr(e, "simulated", False) for e in self.executors)

    @property
    def taking_work(self) -> bool:
        return self.health == "ok" and not self.draining

    def npu_free(self) -> bool:
        return self.npu is not None and self.npu.down is None and not self.npu_busy_here \
            and self.npu_lock.is_free()

    def engines_down(self) -> str | None:
        """Why no mode can run anything now: every executor's model server is down."""
        executors = self.executors
        if not executors or any(e.down is None for e in executors):
            return None
        return "model server down: " + "; ".join(e.down or "" for e in executors)

    def any_engine_down(self) -> bool:
        return any(e.down is not None for e in self.executors)

    def retry_engines(self) -> bool:
        """Try the model servers that are down; True if one came back."""
        return any(e.down is not None and e.back() for e in self.executors)

    def health_word(self) -> str:
        """What the metrics say: "ok", "draining", or why this node takes no work."""
        if self.health != "ok":
            return self.health
        return "draining" if self.draining else (self.engines_down() or "ok")

    def unhealthy(self, why: str) -> None:
        if self.health == "ok":
            log.error("not taking work until this is fixed: %s", why)
        self.health = why
        self._on_change()

    def check_health(self, flush: Callable[[], None]) -> None:
        """Try the state_dir again; ``flush`` writes what the disk refused first."""
        try:
            check_writable(self.state_dir)
            flush()
        except StateError as exc:
            self.health = str(exc)
            return
        log.info("state_dir is writable again; taking work")
        self.health = "ok"
        self._on_change()

    def drain(self) -> None:
        self.draining = True
        self._on_change()
