"""Disjoint LinUCB (Li et al. 2010) used to *minimise* latency, and its on-disk store.

One arm per device (CPU mode). Per arm keep ``A = λI + Σ x xᵀ`` and ``b = Σ y x``. For a
context ``x``: ``θ = A⁻¹ b``, mean ``xᵀθ``, width ``sqrt(xᵀ A⁻¹ x)``, and the score is
``max(mean − α·width, floor)``: the lowest score wins, so uncertainty makes an arm look
faster and gets it tried. Both solves go through ``numpy.linalg.solve`` on the stored
``A`` in float64; no inverse is stored, so nothing drifts.

The store is a JSON file under ``state_dir`` shared by the node daemon and ``trigger``
processes; read-modify-write happens under an ``fcntl`` lock, and a save is a temp file,
fsync, rename, so a crash leaves the old or the new file, never half of one. A corrupt or
version-mismatched file is reported, renamed aside with a timestamp, and replaced by a
fresh store.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.messages import Snapshot
from agent.statefiles import atomic_write, ensure_dir

log = logging.getLogger(__name__)

STORE_VERSION = 1
# Context: [1, prompt_tokens/T, max_new_tokens/T, cpu/100, min(queue, Q)/Q, mem pressure,
#           temperature]; every entry is kept in [0, 1] so no feature dominates A.
D = 7
TOKEN_SCALE = 1024          # T: prompts and answers are measured in units of 1k tokens
QUEUE_SCALE = 8             # Q: a queue of 8 or more counts as "full"
MEM_COMFORT_MB = 4096.0     # below this much available memory, pressure rises to 1
TEMP_COOL_C, TEMP_HOT_C = 40.0, 90.0
TRAINED_RIDS_KEPT = 2048    # train-once memory; older rids cannot come back (job TTL)


def features(snapshot: Snapshot, prompt_tokens: int, max_new_tokens: int) -> np.ndarray:
    """The bounded, normalised context vector for one device and one prompt."""
    temp = snapshot.temperature_c
    temp_f = 0.0 if temp is None else (temp - TEMP_COOL_C) / (TEMP_HOT_C - TEMP_COOL_C)
    return np.array([
        1.0,
        min(prompt_tokens / TOKEN_SCALE, 4.0),
        min(max_new_tokens / TOKEN_SCALE, 4.0),
        min(snapshot.cpu_percent / 100.0, 1.0),
        min(snapshot.queue_depth, QUEUE_SCALE) / QUEUE_SCALE,
        1.0 - min(snapshot.mem_available_mb / MEM_COMFORT_MB, 1.0),
        min(max(temp_f, 0.0), 1.0),
    ], dtype=np.float64)


def training_target(ok: bool, seconds: float, cap: float) -> float:
    """What one job teaches its arm: the latency seen, capped; a failure counts as the cap
    (a device that fails must look slow, never fast)."""
    return min(seconds, cap) if ok else cap


@dataclass(frozen=True)
class Arm:
    A: np.ndarray
    b: np.ndarray
    n: int = 0

    @classmethod
    def fresh(cls, lam: float) -> Arm:
        return cls(A=lam * np.eye(D), b=np.zeros(D), n=0)

    def predict(self, x: np.ndarray) -> tuple[float, float]:
        """(mean, width) of the latency estimate at context x."""
        sol = np.linalg.solve(self.A, np.column_stack([self.b, x]))
        mean = float(x @ sol[:, 0])
        width = math.sqrt(max(float(x @ sol[:, 1]), 0.0))
        return mean, width

    def updated(self, x: np.ndarray, y: float) -> Arm:
        return Arm(A=self.A + np.outer(x, x), b=self.b + y * x, n=self.n + 1)


@dataclass(frozen=True)
class StoreState:
    arms: dict[str, Arm]
    trained: dict[str, float]            # rid -> when it was trained
    exploring: dict[str, tuple[str, float]]  # device -> (rid, until unix time)


class ArmStore:
    """The persisted arms of one device's orchestrations."""

    def __init__(self, state_dir: Path, lam: float = 1.0, clock: Callable[[], float] = time.time):
        self.path = Path(state_dir) / "arms.json"
        self._lock_path = Path(state_dir) / "arms.lock"
        self.lam = lam
        self._clock = clock
        # Parsed state, valid while the file's identity (inode, size, mtime) is unchanged:
        # a decision then costs one stat() instead of a JSON parse.
        self._cache: tuple[tuple[int, int, int], StoreState] | None = None

    @classmethod
    def for_config(cls, cfg: Any) -> ArmStore:
        """The store of the device a config describes."""
        return cls(cfg.state_dir, cfg.auction.linucb.lambda_)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        ensure_dir(self.path.parent)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def load(self) -> StoreState:
        """The current arms (a fresh store if there is no file yet)."""
        with self._locked():
            return self._read()

    def train(self, device: str, x: np.ndarray, y: float, rid: str) -> bool:
        """Add one observation; False (and no change) if this rid was already trained."""
        with self._locked():
            state = self._read()
            if rid in state.trained:
                return False
            arm = state.arms.get(device) or Arm.fresh(self.lam)
            state.arms[device] = arm.updated(np.asarray(x, dtype=np.float64), float(y))
            state.trained[rid] = self._clock()
            if state.exploring.get(device, ("", 0.0))[0] == rid:
                del state.exploring[device]
            self._write(state)
            return True

    def mark_exploring(self, device: str, rid: str, until: float) -> None:
        """Record that an untrained arm has a job in flight, so it is not flooded."""
        with self._locked():
            state = self._read()
            state.exploring[device] = (rid, until)
            self._write(state)

    # file format ------------------------------------------------------------------------
    def _read(self) -> StoreState:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return StoreState({}, {}, {})
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        if self._cache is not None and self._cache[0] == key:
            cached = self._cache[1]
            now = self._clock()
            return StoreState(dict(cached.arms), dict(cached.trained),
                              {d: v for d, v in cached.exploring.items() if v[1] > now})
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return StoreState({}, {}, {})
        try:
            state = self._decode(json.loads(raw))
            self._cache = (key, state)
            return StoreState(dict(state.arms), dict(state.trained), dict(state.exploring))
        except (ValueError, TypeError, KeyError, AttributeError, np.linalg.LinAlgError) as exc:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
            os.replace(self.path, aside)
            log.error("arm store %s is unusable (%s); moved it to %s and started a fresh one",
                      self.path, exc, aside)
            return StoreState({}, {}, {})

    def _decode(self, obj: object) -> StoreState:
        if not isinstance(obj, dict) or obj.get("v") != STORE_VERSION or obj.get("d") != D:
            raise ValueError(f"version/dimension mismatch (want v={STORE_VERSION}, d={D})")
        arms = {}
        for device, a in obj["arms"].items():
            A = np.array(a["A"], dtype=np.float64)
            b = np.array(a["b"], dtype=np.float64)
            if A.shape != (D, D) or b.shape != (D,) or not (np.isfinite(A).all() and np.isfinite(b).all()):
                raise ValueError(f"arm {device!r} has a bad shape or non-finite values")
            np.linalg.cholesky(A)  # must be positive definite
            arms[device] = Arm(A=A, b=b, n=int(a["n"]))
        now = self._clock()
        trained = {str(r): float(t) for r, t in obj.get("trained", {}).items()}
        exploring = {str(d): (str(v[0]), float(v[1])) for d, v in obj.get("exploring", {}).items()
                     if float(v[1]) > now}
        return StoreState(arms, trained, exploring)

    def _write(self, state: StoreState) -> None:
        trained = dict(sorted(state.trained.items(), key=lambda kv: kv[1])[-TRAINED_RIDS_KEPT:])
        obj = {"v": STORE_VERSION, "d": D, "lambda": self.lam,
               "arms": {dev: {"A": arm.A.tolist(), "b": arm.b.tolist(), "n": arm.n}
                        for dev, arm in sorted(state.arms.items())},
               "trained": trained,
               "exploring": {dev: list(v) for dev, v in state.exploring.items()}}
        atomic_write(self.path, json.dumps(obj).encode("utf-8"))
        st = os.stat(self.path)
        self._cache = ((st.st_ino, st.st_size, st.st_mtime_ns),
                       StoreState(dict(state.arms), dict(trained), dict(state.exploring)))
