"""The one error tree of edge-agent, and the exit code each branch means.

    AgentError
    ├── UsageError             a command line that cannot be acted on (what)            → 2
    │   └── BadPrompt             a prompt request out of its bounds (field)
    ├── ConfigError            every problem of a config, as "path.to.key: message"      → 2
    ├── StateError             state_dir or a file in it is unusable (path, reason)     → 2
    ├── DuplicateIdentity      another live node uses this device_id (device)            → 2
    ├── PromptTooLarge         refused before anything is published (size, limit)       → 2
    ├── MessageError           a wire message that failed validation (kind, field)      → 1
    ├── IllegalTransition      a state machine was driven off its table (a bug)         → 70
    ├── BrokerUnavailable      the broker could not be reached (host, port, reason)     → 5
    ├── DeviceBusy             another process of this device holds its broker identity → 1
    └── ExecutorError          an executor could not produce an answer (executor)       → 1
        ├── ExecutableNotFound    the binary is not on PATH (command)
        ├── CommandFailed         non-zero exit (argv, returncode, output_tail)
        ├── ExecutionTimeout      the wall-clock limit was hit (timeout_s)              → 4
        ├── EngineUnavailable     the model server cannot be reached: fail over, mark the mode down
        └── Cancelled             the caller gave up on the job (why)

Every ``ExecutorError`` has a ``kind`` that travels on the wire in an ``error`` result
event, so an orchestrator never has to read a reason string to know what happened.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence


class ExitCode(enum.IntEnum):
    """What the CLI returns; documented in the README and in ``--help``."""

    OK = 0
    FAILED = 1          # the job ran and failed (or a message could not be used)
    USAGE = 2           # bad flags, bad config, unusable state_dir, prompt too large
    NO_DEVICE = 3       # no device can run the job
    TIMEOUT = 4         # the job did not finish in time
    BROKER = 5          # the broker is needed (status, a node that must start) and is not there
    INTERNAL = 70       # a bug: one line on stderr, the traceback with -v (EX_SOFTWARE)
    INTERRUPTED = 130   # SIGINT (Ctrl-C): the remote job was cancelled
    TERMINATED = 143    # SIGTERM: the remote job was cancelled


class AgentError(Exception):
    """Base of every error edge-agent raises on purpose."""

    exit_code: ExitCode = ExitCode.FAILED


class UsageError(AgentError):
    """A command line (or request) that cannot be acted on."""

    exit_code = ExitCode.USAGE


class BadPrompt(UsageError):
    """A prompt request outside the bounds every front shares (``messages.Prompt``):
    ``field`` names what is wrong, so each front reports it in its own terms."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)


class ConfigError(AgentError):
    """A config that cannot be used; ``problems`` lists every one of them."""

    exit_code = ExitCode.USAGE

    def __init__(self, source: str, problems: Sequence[str]):
        self.source = source
        self.problems = tuple(problems)
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"invalid config {source} ({len(self.problems)} problem(s)):\n{lines}")


class StateError(AgentError):
    """A file or directory under ``state_dir`` cannot be used (unwritable, full, corrupt)."""

    exit_code = ExitCode.USAGE

    def __init__(self, path: object, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"state {self.path}: {reason}")


class DuplicateIdentity(AgentError):
    """Another live node on the broker uses this ``device_id``."""

    exit_code = ExitCode.USAGE

    def __init__(self, device: str, detail: str):
        self.device = device
        super().__init__(f"another node is already connected as {device!r} ({detail}); every device "
                         "needs its own device_id")


class MessageError(AgentError):
    """A wire message that is not what its schema says."""

    def __init__(self, kind: str, field: str | None, reason: str):
        self.kind = kind
        self.field = field
        self.reason = reason
        where = f"{kind}.{field}" if field else kind
        super().__init__(f"{where}: {reason}")


class IllegalTransition(AgentError):
    """A state machine was asked for a transition its table does not have."""

    exit_code = ExitCode.INTERNAL

    def __init__(self, machine: str, state: str, event: str):
        self.machine, self.state, self.event = machine, state, event
        super().__init__(f"{machine}: event {event!r} is not allowed in state {state!r}")


class PromptTooLarge(AgentError):
    """The prompt would make a message larger than the payload limit."""

    exit_code = ExitCode.USAGE

    def __init__(self, size: int, limit: int):
        self.size = size
        self.limit = limit
        super().__init__(
            f"prompt too large: the job would be {size} bytes, the limit is {limit} bytes "
            "(max_payload_bytes)"
        )


class BrokerUnavailable(AgentError):
    """The MQTT broker could not be reached, or refused us."""

    exit_code = ExitCode.BROKER

    def __init__(self, host: str, port: int, reason: str, *, refused: bool = False):
        self.host = host
        self.port = port
        self.reason = reason
        self.refused = refused  # it answered, and said no (auth, protocol): not a network problem
        verb = "refused the connection" if refused else "not reachable"
        super().__init__(f"broker {host}:{port} {verb}: {reason}")


class DeviceBusy(AgentError):
    """Another process of this device is connected as it, and the broker allows one."""

    exit_code = ExitCode.FAILED

    def __init__(self, holder: str, waited_s: float):
        self.holder = holder
        super().__init__(
            f"another process of this device (pid {holder}) is connected to the broker as it, and the broker "
            f"allows one connection per device; waited {waited_s:.0f} s. Run the node daemon on this device: "
            "trigger and status then go through it, any number at once")


class ExecutorError(AgentError):
    """An executor failed to produce an answer."""

    kind = "failed"

    def __init__(self, executor: str, reason: str, *, partial_text: str = ""):
        self.executor = executor
        self.reason = reason
        self.partial_text = partial_text
        super().__init__(f"{executor}: {reason}")


class ExecutableNotFound(ExecutorError):
    """The executor's binary does not exist."""

    kind = "not_found"

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

    kind = "timeout"
    exit_code = ExitCode.TIMEOUT

    def __init__(self, executor: str, timeout_s: float, *, partial_text: str = ""):
        self.timeout_s = timeout_s
        super().__init__(executor, f"timed out after {timeout_s:.1f} s", partial_text=partial_text)


class Cancelled(ExecutorError):
    """The job was stopped because its orchestrator (or the user) gave up on it."""

    kind = "cancelled"

    def __init__(self, executor: str, why: str = "cancelled", *, partial_text: str = ""):
        self.why = why
        super().__init__(executor, why, partial_text=partial_text)


class EngineUnavailable(ExecutorError):
    """The model server behind an executor cannot be reached (connection refused, no
    route, still loading): nothing was run, so another device may take the job."""

    kind = "unavailable"


# What an ``error`` result event's ``kind`` field may say, and the exit code it means to
# the orchestrator that receives it.
ERROR_KINDS: dict[str, ExitCode] = {
    "failed": ExitCode.FAILED,
    "not_found": ExitCode.FAILED,
    "timeout": ExitCode.TIMEOUT,
    "cancelled": ExitCode.FAILED,
    "unavailable": ExitCode.FAILED,
}
