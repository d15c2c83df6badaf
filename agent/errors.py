"""The one error tree of edge-agent.

    AgentError
    ├── ConfigError            every problem of a config, as "path.to.key: message"
    ├── MessageError           a wire message that failed validation (kind, field, reason)
    ├── PromptTooLarge         refused before anything is published (size, limit)
    ├── BrokerUnavailable      the broker could not be reached (host, port, reason)
    ├── ExecutorError          an executor could not produce an answer (executor, reason)
    │   ├── ExecutableNotFound    the binary is not on PATH (command)
    │   ├── CommandFailed         non-zero exit (argv, returncode, output_tail)
    │   └── ExecutionTimeout      the wall-clock limit was hit (timeout_s)
    └── NoCandidate            no device, local or peer, can run the job

Exit codes of the CLI follow from the type (see ``agent.cli``).
"""

from __future__ import annotations

from collections.abc import Sequence


class AgentError(Exception):
    """Base of every error edge-agent raises on purpose."""


class ConfigError(AgentError):
    """A config that cannot be used; ``problems`` lists every one of them."""

    def __init__(self, source: str, problems: Sequence[str]):
        self.source = source
        self.problems = tuple(problems)
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"invalid config {source} ({len(self.problems)} problem(s)):\n{lines}")


class MessageError(AgentError):
    """A wire message that is not what its schema says."""

    def __init__(self, kind: str, field: str | None, reason: str):
        self.kind = kind
        self.field = field
        self.reason = reason
        where = f"{kind}.{field}" if field else kind
        super().__init__(f"{where}: {reason}")


class PromptTooLarge(AgentError):
    """The prompt would make a message larger than the payload limit."""

    def __init__(self, size: int, limit: int):
        self.size = size
        self.limit = limit
        super().__init__(
            f"prompt too large: the job would be {size} bytes, the limit is {limit} bytes "
            "(max_payload_bytes)"
        )


class BrokerUnavailable(AgentError):
    """The MQTT broker could not be reached."""

    def __init__(self, host: str, port: int, reason: str):
        self.host = host
        self.port = port
        self.reason = reason
        super().__init__(f"broker {host}:{port} not reachable: {reason}")


class ExecutorError(AgentError):
    """An executor failed to produce an answer."""

    def __init__(self, executor: str, reason: str, *, partial_text: str = ""):
        self.executor = executor
        self.reason = reason
        self.partial_text = partial_text
        super().__init__(f"{executor}: {reason}")


class ExecutableNotFound(ExecutorError):
    """The executor's binary does not exist."""

    def __init__(self, executor: str, command: str):
        self.command = command
        super().__init__(executor, f"executable not found: {command!r} (is it installed and on PATH?)")


class CommandFailed(ExecutorError):
    """A command exited non-zero."""

    def __init__(self, executor: str, argv: Sequence[str], returncode: int, output_tail: str,
                 *, partial_text: str = ""):
        self.argv = tuple(argv)
        self.returncode = returncode
        self.output_tail = output_tail
        tail = f"; output ends with:\n{output_tail}" if output_tail else ""
        super().__init__(executor, f"{argv[0]} exited with code {returncode}{tail}",
                         partial_text=partial_text)


class ExecutionTimeout(ExecutorError):
    """The executor ran past its wall-clock limit and was killed."""

    def __init__(self, executor: str, timeout_s: float, *, partial_text: str = ""):
        self.timeout_s = timeout_s
        super().__init__(executor, f"timed out after {timeout_s:.1f} s", partial_text=partial_text)


class NoCandidate(AgentError):
    """No device can run the job."""
