"""Device-wide locks under ``state_dir``: the NPU, the CPU slots, the broker identity.

The node daemon and every ``trigger`` on a device open the same files. Whoever holds a
file's exclusive ``flock`` owns what it stands for: ``npu.lock`` the NPU (single
tenant), ``cpu-slot-<i>.lock`` one of the device's ``cpu.slots`` — so a job a trigger
runs on its own (no daemon, or no broker) counts against the same slots as the daemon's.
The kernel drops a lock when the holder's file is closed, including when the process
dies, so a crash never leaves anything marked busy (the seed's flag file could); a child
that inherits the descriptor keeps it held for as long as the model it runs lives.
``is_free`` probes with a shared lock for a few microseconds; an acquisition that collides with
a probe retries briefly instead of reporting the resource busy.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Callable
from pathlib import Path

from agent.errors import StateError
from agent.statefiles import describe, ensure_dir

_PROBE_RETRIES = 3
_PROBE_RETRY_S = 0.001
SLOT_POLL_S = (0.02, 0.25)  # waiting for a CPU slot held by another process: first, longest poll


class HeldLock:
    """A held lock; release it (or use it as a context manager) when the job ends."""

    def __init__(self, fd: int, path: Path):
        self._fd: int | None = fd
        self.path = path

    @property
    def held(self) -> bool:
        return self._fd is not None

    @property
    def fd(self) -> int:
        """The locked descriptor; a child that inherits it keeps the lock held."""
        assert self._fd is not None, "released"
        return self._fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.ftruncate(fd, 0)
            except OSError:
                pass
            os.close(fd)  # closing drops the flock

    def __enter__(self) -> HeldLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class DeviceLock:
    """One exclusive, non-blocking, crash-safe lock file."""

    def __init__(self, path: Path):
        self.path = path

    def _open(self) -> int:
        ensure_dir(self.path.parent)
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StateError(self.path, f"cannot open the lock file: {describe(exc)}") from None

    def try_acquire(self, owner: str = "") -> HeldLock | None:
        """Take it if it is free, without waiting; None if someone holds it."""
        fd = self._open()
        for attempt in range(_PROBE_RETRIES):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    os.close(fd)
                    raise
                if attempt + 1 < _PROBE_RETRIES:
                    time.sleep(_PROBE_RETRY_S)  # a probe holds LOCK_SH for microseconds only
                continue
            # Who holds it, for people reading the file while debugging.
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {owner}\n".encode(), 0)
            return HeldLock(fd, self.path)
        os.close(fd)
        return None

    def acquire(self, owner: str = "") -> HeldLock:
        """Take it, waiting as long as it takes (a worker thread that has nothing else to do)."""
        fd = self._open()
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {owner}\n".encode(), 0)
        return HeldLock(fd, self.path)

    def wait_acquire(self, owner: str, timeout_s: float, *, clock: Callable[[], float] = time.monotonic,
                   on_wait: Callable[[float], None] = lambda waited: None,
                   stop: Callable[[], bool] = lambda: False) -> HeldLock | None:
        """Take it, waiting up to ``timeout_s`` (None if it stayed held, or ``stop`` said so)."""
        return _poll(lambda: self.try_acquire(owner), timeout_s, clock=clock, on_wait=on_wait, stop=stop)

    def holder(self) -> str:
        """Who holds it, as the holder wrote it ("<pid> <owner>"), for messages."""
        try:
            return self.path.read_text(errors="replace").strip() or "unknown"
        except OSError:
            return "unknown"

    def is_free(self) -> bool:
        """True if nobody holds it right now."""
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            raise
        finally:
            os.close(fd)
        return True


class NpuLock(DeviceLock):
    def __init__(self, state_dir: Path):
        super().__init__(Path(state_dir) / "npu.lock")


class CpuSlots:
    """The device's ``cpu.slots``, as lock files shared by the daemon and every trigger."""

    def __init__(self, state_dir: Path, slots: int):
        self.locks = [DeviceLock(Path(state_dir) / f"cpu-slot-{i}.lock") for i in range(slots)]

    def busy(self) -> int:
        return sum(not lock.is_free() for lock in self.locks)

    def try_acquire(self, owner: str = "") -> HeldLock | None:
        for lock in self.locks:
            held = lock.try_acquire(owner)
            if held is not None:
                return held
        return None

    def wait_acquire(self, owner: str, timeout_s: float, *, clock: Callable[[], float] = time.monotonic,
                   on_wait: Callable[[float], None] = lambda waited: None) -> HeldLock | None:
        """A free slot, waiting up to ``timeout_s`` for one (None if none freed up)."""
        if not self.locks:
            return None
        return _poll(lambda: self.try_acquire(owner), timeout_s, clock=clock, on_wait=on_wait)


class IdentityLock(DeviceLock):
    """The device's broker identity. A broker that sets each client's id to its username
    (``use_username_as_clientid``, as mosquitto/prod.conf does) allows a device one
    connection: whoever holds this lock is the process that connects as the device."""

    def __init__(self, state_dir: Path):
        super().__init__(Path(state_dir) / "broker-identity.lock")


def _poll(attempt: Callable[[], HeldLock | None], timeout_s: float, *, clock: Callable[[], float],
          on_wait: Callable[[float], None], stop: Callable[[], bool] = lambda: False) -> HeldLock | None:
    """Try until it works or ``timeout_s`` passes. The holders are other processes, whose
    release no event of ours can signal, so this polls, backing off to a quarter second."""
    start = clock()
    delay = SLOT_POLL_S[0]
    while True:
        held = attempt()
        if held is not None:
            return held
        waited = clock() - start
        if waited >= timeout_s or stop():
            return None
        on_wait(waited)
        time.sleep(min(delay, max(timeout_s - waited, 0.0)))
        delay = min(delay * 2, SLOT_POLL_S[1])
