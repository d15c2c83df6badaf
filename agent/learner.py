"""The orchestrator's learner: the arm store a decision reads, and what each answer teaches it.

On the CPU path the arm of the device that ran a job is trained once, with the context
captured at decision time and the latency seen here (failures count as the cap): the
residual between what was seen and what the device promised (``linucb.residual_target``).
A device with no record is explored: marked while its job runs, free to be tried again
once the job ends. The store (and numpy) is only opened when an auction needs it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from agent.config import Config
from agent.dispatch import Answer, teaches_the_learner
from agent.errors import AgentError

if TYPE_CHECKING:  # numpy: only the auction path pays for it
    from agent.selection import Choice

log = logging.getLogger("agent.orchestrator")  # the orchestrator's parts log under its name


class Learner:
    """The arm store of this orchestrator: read for a decision, taught by each answer."""

    def __init__(self, cfg: Config, arms: Callable[[], Any], *, clock: Callable[[], float],
                 wall: Callable[[], float]):
        self.cfg = cfg
        self._arms_factory = arms
        self._arms: Any = None
        self.clock = clock
        self.wall = wall

    @property
    def arms(self) -> Any:
        if self._arms is None:
            self._arms = self._arms_factory()
        return self._arms

    def state(self) -> Any:
        """What a decision reads: the arms, the devices being explored, the round-robin cursor."""
        return self.arms.load()

    def move_cursor(self, cursor: int) -> None:
        self.arms.set_cursor(cursor)

    def exploring(self, device: str, rid: str) -> None:
        """A job that explores ``device`` is sent: it is priced as such until the job's time is up."""
        self.arms.mark_exploring(device, rid, self.wall() + self.cfg.auction.job_timeout_s)

    def learn(self, rid: str, choice: Choice, answer: Answer, dispatched: float) -> None:
        """What the answer of the ``choice`` sent at ``dispatched`` teaches, once per rid."""
        if choice.mode != "cpu" or choice.x is None:
            return
        if teaches_the_learner(answer):
            # The arm learns what the device's promise of start-up + service missed, as
            # seen from here: the wait in its queue is the backlog's part, not the job's.
            seen_s = self.clock() - dispatched - answer.timings.queue_ms / 1000
            self._train(choice.device, choice.x, answer.ok, seen_s, rid, choice.promise)
        elif choice.explore:
            # Its exploration ended with the job: the device is free to be tried again.
            self.arms.mark_exploring(choice.device, rid, self.wall())

    def _train(self, device: str, x: tuple[float, ...], ok: bool, seconds: float, rid: str,
               promise: float | None) -> None:
        """Teach the arm the residual (seen − promised); a job with no promise (a device
        with no record yet) only ends its exploration."""
        import numpy as np

        from agent.linucb import residual_target
        y = None if promise is None else residual_target(ok, seconds, self.cfg.auction.linucb.latency_cap_s, promise)
        try:
            self.arms.train(device, np.array(x), y, rid, base=promise or 0.0)
        except (OSError, AgentError) as exc:
            log.error("could not train the arm store: %s", exc)
