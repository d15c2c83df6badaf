"""Secret and certificate files: checked once with the config, read when connecting.

A password file or a TLS private key that others can read is refused, with the command
that fixes it: on a shared board, a world-readable key is everyone's key. CA and
certificate files are public, but must exist and be readable. The broker password may
also come from the ``AGENT_BROKER_PASSWORD`` environment variable (systemd credentials,
container secrets), which wins over ``broker.password_file``.
"""

from __future__ import annotations

import os
import stat

from agent.errors import ConfigError

PASSWORD_ENV = "AGENT_BROKER_PASSWORD"


def file_problem(path: str, *, private: bool) -> str | None:
    """Why ``path`` cannot be used as a secret (``private``) or certificate file, or None."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"{path} does not exist"
    except OSError as exc:
        return f"cannot use {path}: {exc.strerror or exc}"
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    if not os.access(path, os.R_OK):
        return f"{path} is not readable by this user"
    if private and st.st_mode & 0o077:
        return (f"{path} can be read by other users (mode {stat.S_IMODE(st.st_mode):04o}); "
                f"run: chmod 600 {path}")
    return None


def read_password(path: str | None) -> str | None:
    """The broker password: the environment variable, else the file; ConfigError if unusable."""
    from_env = os.environ.get(PASSWORD_ENV)
    if from_env:
        return from_env
    if path is None:
        return None
    problem = file_problem(path, private=True)
    if problem is None:
        try:
            with open(path, encoding="utf-8") as fh:
                return fh.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            problem = f"cannot read {path}: {exc}"
    raise ConfigError(path, [f"broker.password_file: {problem}"])
