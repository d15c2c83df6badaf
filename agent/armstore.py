"""The arm store: one device's learnt ``linucb.Arms``, in a file its processes share.

The store is a JSON file under ``state_dir`` shared by the node daemon and ``trigger``
processes; read-modify-write happens under an ``fcntl`` lock, saves go through
``statefiles.atomic_write``. A corrupt, wrong-shaped or version-mismatched file is
reported, renamed aside with a timestamp, and replaced by a fresh store. What to learn
from an observation is ``linucb.Arms.train``'s (pure); this module only reads, locks and
writes.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import StateError
from agent.linucb import Arm, Arms
from agent.servicemodel import decay_for
from agent.statefiles import atomic_write, describe, ensure_dir, stamp

log = logging.getLogger(__name__)


class ArmStore:
    """The persisted ``Arms`` of one device's orchestrations."""

    def __init__(self, state_dir: Path, lam: float = 1.0, half_life_jobs: float = 20.0,
                 clock: Callable[[], float] = time.time):
        self.path = Path(state_dir) / "arms.json"
        self._lock_path = Path(state_dir) / "arms.lock"
        self.lam = lam
        self.gamma = decay_for(half_life_jobs)
        self._clock = clock
        # Parsed state, valid while the file's identity (inode, size, mtime) is unchanged:
        # a decision then costs one stat() instead of a JSON parse.
        self._cache: tuple[tuple[int, int, int] | None, Arms] | None = None  # statefiles.stamp

    @classmethod
    def for_config(cls, cfg: Any) -> ArmStore:
        """The store of the device a config describes."""
        lin = cfg.auction.linucb
        return cls(cfg.state_dir, lin.lambda_, lin.half_life_jobs)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        ensure_dir(self.path.parent)
        try:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StateError(self._lock_path, f"cannot open: {describe(exc)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def load(self) -> Arms:
        """The current arms (a fresh store if there is no file yet)."""
        with self._locked():
            return self._read()

    def train(self, device: str, x: np.ndarray, y: float | None, rid: str, base: float = 0.0) -> bool:
        """Add one observation (see ``Arms.train``); False (and no change) if this rid was
        already trained."""
        with self._locked():
            state = self._read()
            if not state.train(device, x, y, rid, self._clock(), lam=self.lam, gamma=self.gamma, base=base):
                return False
            self._write(state)
            return True

    def mark_exploring(self, device: str, rid: str, until: float) -> None:
        """Record that an untrained arm has a job in flight, so it is not flooded."""
        with self._locked():
            state = self._read()
            state.exploring[device] = (rid, until)
            self._write(state)

    def set_cursor(self, cursor: int) -> None:
        """Remember where round robin goes next (the policy is shared by every trigger)."""
        with self._locked():
            state = self._read()
            state.cursor = cursor
            self._write(state)

    # file format ------------------------------------------------------------------------
    def _read(self) -> Arms:
        key = stamp(self.path)
        if key is None:
            return Arms()
        if self._cache is None or self._cache[0] != key:
            try:
                raw = self.path.read_bytes()
            except FileNotFoundError:
                return Arms()
            except OSError as exc:
                raise StateError(self.path, f"cannot read: {describe(exc)}") from None
            try:
                self._cache = (key, Arms.from_obj(json.loads(raw)))
            except (ValueError, TypeError, KeyError, IndexError, RecursionError, np.linalg.LinAlgError) as exc:
                aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
                os.replace(self.path, aside)
                log.error("arm store %s is unusable (%s); moved it to %s and started a fresh one",
                          self.path, exc, aside)
                return Arms()
        cached = self._cache[1]
        now = self._clock()
        return Arms(dict(cached.arms), dict(cached.trained),
                    {d: v for d, v in cached.exploring.items() if v[1] > now}, cached.cursor)

    def _write(self, state: Arms) -> None:
        atomic_write(self.path, json.dumps(state.to_obj()).encode("utf-8"), durable=False)  # relearnt if lost
        self._cache = (stamp(self.path), replace(state, arms=dict(state.arms), trained=dict(state.trained),
                                                 exploring=dict(state.exploring)))


def learnt(cfg: Any) -> dict[str, Arm]:
    """The arms of the device a config describes, by device (``status``'s estimates); none
    when the store cannot be read here."""
    try:
        return dict(ArmStore.for_config(cfg).load().arms)
    except StateError:
        return {}
