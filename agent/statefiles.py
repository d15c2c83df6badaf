"""Files under ``state_dir``: one way to create the directory and one way to replace a file.

A replacement is written to a temp file in the same directory, fsynced, renamed over the
old file, and the directory is fsynced, so after a crash or a power cut the file is the
old one or the new one, never a mix and never missing. Everything here is private to the
device's user: the directory is 0700 and files are 0600 (journals keep answers for a day).
Failures are ``StateError`` naming the path, never a bare ``OSError``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

from agent.errors import StateError

DIR_MODE = 0o700
FILE_MODE = 0o600
LOW_DISK_BYTES = 16 * 2**20  # journals and the arm store are small; below this, writes will fail


def ensure_dir(path: Path) -> Path:
    """Create ``path`` (and its parents) private to this user; StateError if impossible."""
    try:
        path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    except OSError as exc:
        raise StateError(path, f"cannot create the directory: {describe(exc)}") from None
    if not path.is_dir():
        raise StateError(path, "exists and is not a directory")
    return path


def check_writable(directory: Path) -> None:
    """StateError unless a file can be created, written, synced and removed in ``directory``."""
    probe = ensure_dir(directory) / f".probe.{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
        try:
            os.write(fd, b"probe")
            os.fsync(fd)
        finally:
            os.close(fd)
        probe.unlink()
    except OSError as exc:
        raise StateError(directory, f"cannot write here: {describe(exc)}") from None


def writable_problem(directory: Path) -> tuple[str | None, str]:
    """Whether a node could keep its state in ``directory``, found without writing:
    (the problem or None, a note for a good answer). For ``check``, which changes nothing."""
    d = Path(directory)
    if d.exists():
        if not d.is_dir():
            return f"{d} is not a directory", ""
        if not os.access(d, os.W_OK | os.X_OK):
            return f"{d}: this user cannot write here", ""
        note = "writable"
    else:
        parent = next(p for p in d.parents if p.exists())
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            return f"{d} does not exist, and this user cannot create it in {parent}", ""
        d, note = parent, "will be created"
    free = shutil.disk_usage(d).free
    if free < LOW_DISK_BYTES:
        return f"{d}: only {free // 2**20} MiB free", ""
    return None, f"{note}, {free / 2**30:.1f} GiB free"


def read_json_object(path: Path) -> dict[str, Any]:
    """A small best-effort state file as a JSON object; {} if it is missing, unreadable,
    not JSON or not an object (its owner starts afresh and rewrites it)."""
    try:
        obj = json.loads(Path(path).read_bytes())
    except (OSError, ValueError, RecursionError):
        return {}
    return obj if isinstance(obj, dict) else {}


def stamp(path: Path) -> tuple[int, int, int] | None:
    """What tells one version of a file from the next without reading it — inode (each
    ``atomic_write`` renames a new one into place), size, mtime — or None if it is absent."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def atomic_write(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file.

    ``durable=False`` is for what can be relearnt (the arm store, the late-peer record),
    written on every orchestration: no fsync, so a trigger does not wait on the disk (two
    fsyncs cost ~2 ms here, far more on an SD card). Another process still sees the old or
    the new file; after a power cut the file may also be empty or garbled, which its
    reader takes as a fresh start."""
    ensure_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
        try:
            _write_all(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    except OSError as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise StateError(path, f"cannot write: {describe(exc)}") from None


def _write_all(fd: int, data: bytes) -> None:
    """All of ``data``: a write may take part of it."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def append_line(path: Path, line: bytes) -> None:
    """Append one line and fsync it. A torn last line (a crash, or a disk that filled up
    half-way) is the worst that can be left, and the next append starts on a new line."""
    ensure_dir(path.parent)
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line
            _write_all(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise StateError(path, f"cannot append: {describe(exc)}") from None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def describe(exc: OSError) -> str:
    """An OSError as a user would want it said (disk full and read-only are common)."""
    hints = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
             errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
             errno.EPERM: "operation not permitted"}
    return hints.get(exc.errno or 0, exc.strerror or str(exc))
