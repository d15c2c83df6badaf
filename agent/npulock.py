"""The NPU lock: one non-blocking ``flock`` per device, under ``state_dir``.

The node daemon and every ``trigger`` on a device open the same file. Whoever holds the
exclusive lock owns the NPU; the kernel drops the lock when the holder's file is closed,
including when the process dies, so a crash never leaves the NPU marked busy (the seed's
flag file could). ``is_free`` probes with a shared lock for a few microseconds; a claim
that collides with a probe retries briefly instead of reporting the NPU busy.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path

from agent.errors import StateError
from agent.statefiles import describe, ensure_dir

_PROBE_RETRIES = 3
_PROBE_RETRY_S = 0.001


class NpuClaim:
    """A held NPU; release it (or use it as a context manager) when the job ends."""

    def __init__(self, fd: int, path: Path):
        self._fd: int | None = fd
        self.path = path

    @property
    def held(self) -> bool:
        return self._fd is not None

    @property
    def fd(self) -> int:
        """The locked descriptor; a child that inherits it keeps the NPU marked busy."""
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

    def __enter__(self) -> NpuClaim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class NpuLock:
    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / "npu.lock"

    def _open(self) -> int:
        ensure_dir(self.path.parent)
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StateError(self.path, f"cannot open the lock file: {describe(exc)}") from None

    def try_claim(self, owner: str = "") -> NpuClaim | None:
        """Take the NPU if it is free, without waiting on a job; None if it is busy."""
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
            return NpuClaim(fd, self.path)
        os.close(fd)
        return None

    def is_free(self) -> bool:
        """True if nobody holds the NPU right now."""
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
