"""Configuration: YAML parsed once into frozen dataclasses.

Every key is optional except ``device_id``; unknown keys are errors. Parsing never stops
at the first problem: it walks the whole document and raises one ``ConfigError`` listing
every problem as ``path.to.key: message``. Precedence, lowest first: built-in defaults,
the file, environment (``AGENT_BROKER_HOST``, ``AGENT_BROKER_PORT``, ``AGENT_DEVICE_ID``,
``AGENT_STATE_DIR``), command-line flags.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from agent.credentials import file_problem
from agent.errors import ConfigError
from agent.messages import DEFAULT_MAX_BYTES
from agent.topics import ID_HINT, ID_RE, is_id

# Bigger than any sensible setting, small enough to stay exact as a float.
MAX_NUMBER = 1e12
# A prefix is a run of whole topic levels from the characters every tested broker takes
# in a topic (NATS maps "." to its own separator and drops the connection on one).
TOPIC_PREFIX_RE = re.compile(r"([A-Za-z0-9_-]+/)*")
EXECUTOR_KINDS = ("genie", "command", "openai", "sim")
PROTOCOLS = ("auto", "5", "3.1.1")
LOG_LEVELS = ("debug", "info", "warning", "error")
POLICIES = ("linucb", "least_backlog", "jsq", "round_robin", "random")
CHAT_TEMPLATES = ("raw", "llama3", "chatml")


DEFAULT_STATE_DIR = "~/.local/state/edge-agent"


@dataclass(frozen=True)
class TLSConfig:
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    @property
    def enabled(self) -> bool:
        return self.ca_file is not None


@dataclass(frozen=True)
class BrokerConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password_file: str | None = None
    tls: TLSConfig = field(default_factory=TLSConfig)
    keepalive_s: int = 5
    # How long the broker keeps a node's session (subscriptions, queued QoS 1 messages)
    # after it disconnects: long enough to ride out a reboot, short enough to forget a
    # device that was retired.
    session_expiry_s: int = 3600
    # MQTT version: "auto" tries 5 and falls back to 3.1.1 when the broker refuses it.
    protocol: str = "auto"
    # Other members of a broker cluster, "host:port", tried in turn when the current one
    # cannot be reached (a NATS/EMQX/VerneMQ cluster with an MQTT listener on each node).
    failover: tuple[tuple[str, int], ...] = ()

    @property
    def addresses(self) -> tuple[tuple[str, int], ...]:
        return ((self.host, self.port), *self.failover)


# The name an executor that names no model is listed under (GET /v1/models, /api/tags).
# A request for it through `serve` (or for "default", or none) goes to any device.
DEFAULT_MODEL = "edge-agent"


@dataclass(frozen=True)
class ModelConfig:
    """The model an executor serves: jobs that name a model go only where it is served.
    An executor without a name is listed as DEFAULT_MODEL and takes jobs that name none
    (or that name DEFAULT_MODEL)."""

    name: str | None = None
    aliases: tuple[str, ...] = ()
    context_tokens: int | None = None
    keep_warm_s: float = 0.0   # how long it stays loaded after a job (0: it loads for every job)
    tools: bool = False        # the executor passes tools to the model and returns its tool calls

    def serves(self, model: str | None) -> bool:
        return model is None or model == (self.name or DEFAULT_MODEL) or model in self.aliases


@dataclass(frozen=True)
class SimExecutorConfig:
    """Synthetic device: latency = base_ms (+ cold_ms when not warm) + ms_per_token x
    generated tokens (+ jitter)."""

    kind: str = "sim"
    base_ms: float = 50.0
    ms_per_token: float = 5.0
    jitter_ms: float = 0.0
    text: str | None = None  # fixed answer; None echoes the prompt
    seed: int = 0
    cold_ms: float = 0.0     # extra start-up when the model is not warm (see ModelConfig.keep_warm_s)
    ms_per_prompt_token: float = 0.0  # prefill: per token of the prompt, before the first answer token
    ttft_init: bool = False  # init_ms reports start-up + prefill (the time to the first token, as llama-cli)
    throttle: float = 1.0    # slowdown when fully hot: heats while it runs jobs, cools while idle
    heat_s: float = 10.0     # time constant of heating (cooling takes twice as long)
    served: ModelConfig = field(default_factory=ModelConfig)


@dataclass(frozen=True)
class CommandExecutorConfig:
    """Any CLI; ``{prompt}`` in argv is replaced by the prompt as one argument."""

    kind: str = "command"
    argv: tuple[str, ...] = ("llama-cli", "-p", "{prompt}")
    prompt_via: str = "arg"  # "arg" or "stdin"
    timeout_s: float = 600.0
    env: tuple[tuple[str, str], ...] = ()
    cwd: str | None = None
    served: ModelConfig = field(default_factory=ModelConfig)


@dataclass(frozen=True)
class GenieExecutorConfig:
    kind: str = "genie"
    command: str = "genie-t2t-run"
    config: str | None = None
    library_path: str | None = None       # LD_LIBRARY_PATH for the bundle
    adsp_library_path: str | None = None  # ADSP_LIBRARY_PATH for the DSP skeletons
    chat_template: str = "raw"
    profile: bool = True
    timeout_s: float = 600.0
    retries: int = 1
    served: ModelConfig = field(default_factory=ModelConfig)


@dataclass(frozen=True)
class OpenAIExecutorConfig:
    kind: str = "openai"
    base_url: str = "http://127.0.0.1:8080/v1"
    model: str = "default"   # sent to the server; also the name the fleet knows it by
    api_key_file: str | None = None
    api_key_env: str | None = None
    timeout_s: float = 600.0
    served: ModelConfig = field(default_factory=lambda: ModelConfig(name="default", keep_warm_s=300.0, tools=True))


ExecutorConfig = SimExecutorConfig | CommandExecutorConfig | GenieExecutorConfig | OpenAIExecutorConfig


@dataclass(frozen=True)
class NPUConfig:
    enabled: bool = False
    executor: ExecutorConfig = field(default_factory=GenieExecutorConfig)


@dataclass(frozen=True)
class CPUConfig:
    enabled: bool = True
    slots: int = 1
    max_queue: int = 16
    executor: ExecutorConfig = field(default_factory=CommandExecutorConfig)


@dataclass(frozen=True)
class LinUCBConfig:
    # Exploration bonus, in units of each arm's own noise (tuned with scripts/simulate).
    alpha: float = 0.0
    lambda_: float = 1.0
    # Service time (s) a failure or timeout counts as, and the most any observation counts.
    latency_cap_s: float = 120.0
    # An observation weighs half after this many newer ones (arms and each device's own
    # service record): a device that slows down is re-learnt within tens of jobs.
    half_life_jobs: float = 20.0


@dataclass(frozen=True)
class InviteConfig:
    # Past this many online devices an auction invites a few devices instead of calling
    # everyone (agent.invite); 0: always invite.
    above: int = 100
    # How many to invite by what the asker knows (k), and at random among the rest (d):
    # 18 bids to wait for, and at 1000 devices as good as 16+4's 20 or better
    # (scripts/simulate_invite, 4 seeds: 1.022x and 1.015x calling everyone at 70 and 90 %
    # load, 16+4 1.026x and 1.022x): more random probes keep the asker's memory fresher.
    best: int = 12
    explore: int = 6

    def past(self, online: int) -> bool:
        """Whether a fleet of ``online`` devices is past the threshold (``above`` 0: always):
        its auctions invite, and its nodes' job changes wait for their metrics' refresh."""
        return online > self.above


@dataclass(frozen=True)
class AuctionConfig:
    bid_timeout_s: float = 30.0
    # A winner that has not said accepted/declined by then is passed over for the runner-up.
    accept_timeout_s: float = 3.0
    # Wall-clock budget of one job once dispatched; also the exec message expiry.
    job_timeout_s: float = 600.0
    # How the CPU pass ranks devices: linucb | least_backlog | jsq | round_robin | random.
    policy: str = "linucb"
    linucb: LinUCBConfig = field(default_factory=LinUCBConfig)
    invite: InviteConfig = field(default_factory=InviteConfig)


@dataclass(frozen=True)
class HomeAssistantConfig:
    enabled: bool = True
    discovery_prefix: str = "homeassistant"
    support_url: str | None = None   # the origin's link in Home Assistant (your fleet's docs)


@dataclass(frozen=True)
class ServeConfig:
    """The HTTP endpoint (agent.serve: OpenAI's API and Ollama's): ``serve`` runs it;
    with ``enabled`` the node daemon runs it too. Past ``max_concurrent`` requests wait,
    up to ``max_queue`` of them for up to ``max_wait_s`` each (Ollama holds 512), then
    get 503 with Retry-After."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 8080
    api_key_file: str | None = None
    api_key_env: str | None = None
    max_concurrent: int = 8
    max_queue: int = 512
    max_wait_s: float = 300.0


@dataclass(frozen=True)
class TriggersConfig:
    """Prompts on agent/<dev>/trigger (Home Assistant, mosquitto_pub): at most ``workers``
    orchestrations at once, ``max_waiting`` more in line; past that the answer is "busy"."""

    workers: int = 4
    max_waiting: int = 32


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"      # debug | info | warning | error (the node; trigger says less unless -v)
    json: bool = False       # one JSON object per line, for journald/Loki/Elastic


DEFAULT_METRICS_INTERVAL_S = 10.0  # metrics_interval_s


@dataclass(frozen=True)
class Config:
    device_id: str
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    topic_prefix: str = ""
    state_dir: Path = Path(DEFAULT_STATE_DIR)  # expanded when a config is parsed
    metrics_interval_s: float = DEFAULT_METRICS_INTERVAL_S
    max_payload_bytes: int = DEFAULT_MAX_BYTES
    npu: NPUConfig = field(default_factory=NPUConfig)
    cpu: CPUConfig = field(default_factory=CPUConfig)
    auction: AuctionConfig = field(default_factory=AuctionConfig)
    homeassistant: HomeAssistantConfig = field(default_factory=HomeAssistantConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    triggers: TriggersConfig = field(default_factory=TriggersConfig)
    log: LogConfig = field(default_factory=LogConfig)
    # On SIGTERM a node stops taking work and lets what it runs finish, for up to this long.
    drain_s: float = 30.0
    source: str = "<defaults>"


# --------------------------------------------------------------------------- parsing


class _Section:
    """Reads one mapping of the document, recording problems instead of raising."""

    def __init__(self, data: Any, path: str, problems: list[str]):
        self.path = path
        self.problems = problems
        self.seen: set[str] = set()
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            self.problem(None, f"must be a mapping, got {_type_name(data)}")
            data = {}
        self.data = data

    def problem(self, key: str | None, message: str) -> None:
        where = self.key_path(key) if key else (self.path or "<top>")
        self.problems.append(f"{where}: {message}")

    def key_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str) -> Any:
        self.seen.add(key)
        return self.data.get(key)

    def sub(self, key: str) -> _Section:
        return _Section(self.raw(key), self.key_path(key), self.problems)

    def string(self, key: str, default: str | None, *, pattern: re.Pattern[str] | None = None,
               choices: tuple[str, ...] | None = None, required: bool = False,
               hint: str = "") -> str | None:
        value = self.raw(key)
        if value is None:
            if required:
                self.problem(key, "is required")
            return default
        if not isinstance(value, str):
            self.problem(key, f"must be a string, got {_type_name(value)}")
            return default
        if choices is not None and value not in choices:
            self.problem(key, f"must be one of {', '.join(choices)}; got {value!r}")
            return default
        if pattern is not None and not pattern.fullmatch(value):
            self.problem(key, f"{value!r} is not valid{': ' + hint if hint else ''}")
            return default
        return value

    def number(self, key: str, default: float, *, minimum: float | None = None,
               maximum: float | None = None, integer: bool = False,
               exclusive_min: bool = False) -> Any:
        value = self.raw(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                integer and not isinstance(value, int)):
            self.problem(key, f"must be {'an integer' if integer else 'a number'}, got {_type_name(value)}")
            return default
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an integer with hundreds of digits
            finite = False
        if not finite or abs(value) > MAX_NUMBER:
            self.problem(key, f"must be a finite number no larger than {MAX_NUMBER:g}")
            return default
        if minimum is not None and (value <= minimum if exclusive_min else value < minimum):
            self.problem(key, f"must be {'>' if exclusive_min else '>='} {minimum}, got {value}")
            return default
        if maximum is not None and value > maximum:
            self.problem(key, f"must be <= {maximum}, got {value}")
            return default
        return value

    def seconds(self, key: str, default: float, *, maximum: float | None = None) -> float:
        """A duration: a finite number of seconds > 0."""
        return float(self.number(key, default, minimum=0, exclusive_min=True, maximum=maximum))

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.problem(key, f"must be true or false, got {_type_name(value)}")
            return default
        return value

    def finish(self) -> None:
        for key in self.data:
            if key not in self.seen:
                self.problem(str(key), "unknown key")


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


# Where problems with the files a config names go instead of failing the parse: `check`
# reports them beside everything else it finds (every problem at once), where a node or
# a trigger must refuse the config.
_DEFERRED_FILES: ContextVar[list[str] | None] = ContextVar("deferred_file_problems", default=None)


def _file(s: _Section, key: str, path: str, *, private: bool) -> None:
    problem = file_problem(path, private=private)
    if problem is None:
        return
    deferred = _DEFERRED_FILES.get()
    if deferred is None:
        s.problem(key, problem)
    else:
        deferred.append(f"{s.key_path(key)}: {problem}")


def _parse_tls(s: _Section) -> TLSConfig:
    tls = TLSConfig(
        ca_file=s.string("ca_file", None),
        cert_file=s.string("cert_file", None),
        key_file=s.string("key_file", None),
    )
    if (tls.cert_file is None) != (tls.key_file is None):
        s.problem(None, "cert_file and key_file go together")
    for key, path, private in (("ca_file", tls.ca_file, False), ("cert_file", tls.cert_file, False),
                               ("key_file", tls.key_file, True)):
        if path:
            _file(s, key, path, private=private)
    s.finish()
    return tls


def _parse_broker(s: _Section) -> BrokerConfig:
    cfg = BrokerConfig(
        host=s.string("host", "127.0.0.1") or "127.0.0.1",
        port=s.number("port", 1883, minimum=1, maximum=65535, integer=True),
        username=s.string("username", None),
        password_file=s.string("password_file", None),
        tls=_parse_tls(s.sub("tls")),
        keepalive_s=s.number("keepalive_s", 5, minimum=1, maximum=65535, integer=True),
        session_expiry_s=s.number("session_expiry_s", 3600, minimum=0, maximum=2**32 - 1, integer=True),
        protocol=s.string("protocol", "auto", choices=PROTOCOLS) or "auto",
        failover=_addresses(s, "failover"),
    )
    if cfg.password_file is not None and cfg.username is None:
        s.problem("password_file", "needs username")
    if cfg.password_file:
        _file(s, "password_file", cfg.password_file, private=True)
    s.finish()
    return cfg


def _addresses(s: _Section, key: str) -> tuple[tuple[str, int], ...]:
    raw = s.raw(key)
    if raw is None:
        return ()
    if not isinstance(raw, list):
        s.problem(key, f"must be a list of \"host:port\", got {_type_name(raw)}")
        return ()
    out = []
    for i, item in enumerate(raw):
        host, sep, port = item.rpartition(":") if isinstance(item, str) else ("", "", "")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            s.problem(f"{key}[{i}]", f"must be \"host:port\", got {item!r}")
            continue
        out.append((host, int(port)))
    return tuple(out)


MODEL_NAME_RE = re.compile(r"[^\s/#+]{1,128}")


def _parse_model(s: _Section, *, name: str | None, keep_warm_s: float, tools: bool = False) -> ModelConfig:
    """The keys every executor takes about the model it serves."""
    hint = "1-128 characters without spaces, '/', '#' or '+'"
    model = s.string("model", name, pattern=MODEL_NAME_RE, hint=hint)
    raw = s.raw("aliases")
    aliases: list[str] = []
    if raw is not None:
        if not (isinstance(raw, list) and all(isinstance(a, str) and MODEL_NAME_RE.fullmatch(a) for a in raw)):
            s.problem("aliases", f"must be a list of model names ({hint})")
        else:
            aliases = list(raw)
    if aliases and model is None:
        s.problem("aliases", "need a model name")
    context = s.number("context_tokens", 0, minimum=1, integer=True) or None
    return ModelConfig(name=model, aliases=tuple(aliases), context_tokens=context,
                       keep_warm_s=float(s.number("keep_warm_s", keep_warm_s, minimum=0, maximum=86400 * 7)),
                       tools=s.boolean("tools", tools))


def _parse_executor(s: _Section, default_kind: str, *, active: bool) -> ExecutorConfig:
    """One executor section; fields a running executor needs are required only when active."""
    kind = s.string("kind", default_kind, choices=EXECUTOR_KINDS) or default_kind
    cfg: ExecutorConfig
    if kind != "openai":
        served = _parse_model(s, name=None, keep_warm_s=0.0)
    if kind == "sim":
        text = s.raw("text")
        if text is not None and not isinstance(text, str):
            s.problem("text", f"must be a string, got {_type_name(text)}")
            text = None
        cfg = SimExecutorConfig(
            base_ms=float(s.number("base_ms", 50.0, minimum=0)),
            ms_per_token=float(s.number("ms_per_token", 5.0, minimum=0)),
            jitter_ms=float(s.number("jitter_ms", 0.0, minimum=0)),
            text=text,
            seed=s.number("seed", 0, minimum=0, integer=True),
            cold_ms=float(s.number("cold_ms", 0.0, minimum=0)),
            ms_per_prompt_token=float(s.number("ms_per_prompt_token", 0.0, minimum=0)),
            ttft_init=s.boolean("ttft_init", False),
            throttle=float(s.number("throttle", 1.0, minimum=1.0, maximum=100.0)),
            heat_s=float(s.number("heat_s", 10.0, minimum=0.001)),
            served=served,
        )
    elif kind == "command":
        argv = s.raw("argv")
        if argv is None:
            argv = list(CommandExecutorConfig.argv)
        elif not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
            s.problem("argv", "must be a non-empty list of strings")
            argv = list(CommandExecutorConfig.argv)
        prompt_via = s.string("prompt_via", "arg", choices=("arg", "stdin")) or "arg"
        if prompt_via == "arg" and not any("{prompt}" in a for a in argv):
            s.problem("argv", 'needs a "{prompt}" argument when prompt_via is arg')
        env = s.raw("env") or {}
        if not (isinstance(env, Mapping) and all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in env.items())):
            s.problem("env", "must be a mapping of strings to strings")
            env = {}
        cfg = CommandExecutorConfig(
            argv=tuple(argv), prompt_via=prompt_via,
            timeout_s=s.seconds("timeout_s", 600.0),
            env=tuple(sorted(env.items())), cwd=s.string("cwd", None), served=served,
        )
    elif kind == "genie":
        cfg = GenieExecutorConfig(
            command=s.string("command", "genie-t2t-run") or "genie-t2t-run",
            config=s.string("config", None, required=active),
            library_path=s.string("library_path", None),
            adsp_library_path=s.string("adsp_library_path", None),
            chat_template=s.string("chat_template", "raw", choices=CHAT_TEMPLATES) or "raw",
            profile=s.boolean("profile", True),
            timeout_s=s.seconds("timeout_s", 600.0),
            retries=s.number("retries", 1, minimum=0, maximum=5, integer=True),
            served=served,
        )
    else:
        base_url = (s.string("base_url", OpenAIExecutorConfig.base_url,
                             pattern=re.compile(r"https?://.+"), hint="must start with http:// or https://")
                    or OpenAIExecutorConfig.base_url)
        served = _parse_model(s, name="default", keep_warm_s=300.0, tools=True)
        cfg = OpenAIExecutorConfig(
            base_url=base_url,
            model=served.name or "default",
            api_key_file=s.string("api_key_file", None),
            api_key_env=s.string("api_key_env", None),
            timeout_s=s.seconds("timeout_s", 600.0),
            served=served,
        )
    s.finish()
    return cfg


def _parse(data: Any, source: str, env: Mapping[str, str], flags: Mapping[str, Any]) -> Config:
    problems: list[str] = []
    top = _Section(data, "", problems)

    device_id = top.string("device_id", None, pattern=ID_RE, hint=ID_HINT)
    broker = _parse_broker(top.sub("broker"))
    topic_prefix = top.string("topic_prefix", "", pattern=TOPIC_PREFIX_RE,
                              hint="whole topic levels of A-Z a-z 0-9 _ -, each ending in '/'") or ""
    state_dir = top.string("state_dir", None)
    metrics_interval_s = float(top.number("metrics_interval_s", DEFAULT_METRICS_INTERVAL_S, minimum=0.1))
    max_payload = top.number("max_payload_bytes", DEFAULT_MAX_BYTES, minimum=4096,
                             maximum=256 * 1024 * 1024, integer=True)

    npu_s = top.sub("npu")
    npu_enabled = npu_s.boolean("enabled", False)
    npu = NPUConfig(enabled=npu_enabled,
                    executor=_parse_executor(npu_s.sub("executor"), "genie", active=npu_enabled))
    npu_s.finish()

    cpu_s = top.sub("cpu")
    cpu_enabled = cpu_s.boolean("enabled", True)
    cpu = CPUConfig(enabled=cpu_enabled,
                    slots=cpu_s.number("slots", 1, minimum=1, maximum=64, integer=True),
                    max_queue=cpu_s.number("max_queue", 16, minimum=0, integer=True),
                    executor=_parse_executor(cpu_s.sub("executor"), "command", active=cpu_enabled))
    cpu_s.finish()

    auction_s = top.sub("auction")
    lin_s = auction_s.sub("linucb")
    linucb = LinUCBConfig(alpha=float(lin_s.number("alpha", 0.0, minimum=0, maximum=100)),
                          lambda_=float(lin_s.number("lambda", 1.0, minimum=0, exclusive_min=True, maximum=1e6)),
                          latency_cap_s=lin_s.seconds("latency_cap_s", 120.0),
                          half_life_jobs=float(lin_s.number("half_life_jobs", 20.0, minimum=1, maximum=1e6)))
    lin_s.finish()
    inv_s = auction_s.sub("invite")
    invite = InviteConfig(above=inv_s.number("above", InviteConfig.above, minimum=0, maximum=1_000_000, integer=True),
                          best=inv_s.number("best", InviteConfig.best, minimum=0, maximum=1000, integer=True),
                          explore=inv_s.number("explore", InviteConfig.explore, minimum=0, maximum=1000,
                                               integer=True))
    if invite.best + invite.explore == 0:
        inv_s.problem(None, "best and explore are both 0: an invited auction would call nobody but this device "
                            "(raise best or explore, or raise above to call everyone)")
    inv_s.finish()
    auction = AuctionConfig(
        bid_timeout_s=auction_s.seconds("bid_timeout_s", 30.0),
        accept_timeout_s=auction_s.seconds("accept_timeout_s", 3.0),
        job_timeout_s=auction_s.seconds("job_timeout_s", 600.0),
        policy=auction_s.string("policy", "linucb", choices=POLICIES) or "linucb",
        linucb=linucb,
        invite=invite,
    )
    auction_s.finish()

    ha_s = top.sub("homeassistant")
    ha = HomeAssistantConfig(
        enabled=ha_s.boolean("enabled", True),
        discovery_prefix=ha_s.string("discovery_prefix", "homeassistant",
                                     pattern=re.compile(r"[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*"),
                                     hint="topic levels without wildcards") or "homeassistant",
        support_url=ha_s.string("support_url", None, pattern=re.compile(r"https?://\S+"),
                                hint="an http(s) URL"),
    )
    ha_s.finish()

    serve_s = top.sub("serve")
    serve = ServeConfig(enabled=serve_s.boolean("enabled", False),
                        host=serve_s.string("host", "127.0.0.1") or "127.0.0.1",
                        port=serve_s.number("port", 8080, minimum=0, maximum=65535, integer=True),
                        api_key_file=serve_s.string("api_key_file", None),
                        api_key_env=serve_s.string("api_key_env", None),
                        max_concurrent=serve_s.number("max_concurrent", 8, minimum=1, maximum=1024, integer=True),
                        max_queue=serve_s.number("max_queue", 512, minimum=0, maximum=100_000, integer=True),
                        max_wait_s=float(serve_s.number("max_wait_s", 300.0, minimum=0, maximum=86400)))
    if serve.api_key_file and serve.api_key_env:
        serve_s.problem("api_key_file", "give api_key_file or api_key_env, not both")
    if serve.api_key_file:
        _file(serve_s, "api_key_file", serve.api_key_file, private=True)
    serve_s.finish()

    trig_s = top.sub("triggers")
    triggers = TriggersConfig(workers=trig_s.number("workers", 4, minimum=1, maximum=256, integer=True),
                              max_waiting=trig_s.number("max_waiting", 32, minimum=0, maximum=100_000, integer=True))
    trig_s.finish()

    log_s = top.sub("log")
    log_cfg = LogConfig(level=log_s.string("level", "info", choices=LOG_LEVELS) or "info",
                        json=log_s.boolean("json", False))
    log_s.finish()
    drain_s = float(top.number("drain_s", 30.0, minimum=0, maximum=86400))
    top.finish()

    # Environment, then flags, override the file.
    overrides: dict[str, Any] = {}
    for var, key in (("AGENT_BROKER_HOST", "host"), ("AGENT_BROKER_PORT", "port"),
                     ("AGENT_DEVICE_ID", "device_id"), ("AGENT_STATE_DIR", "state_dir")):
        if env.get(var):
            overrides[key] = (env[var], var)
    for key, value in flags.items():
        if value is not None:
            overrides[key] = (value, f"--{key.replace('_', '-')}")

    if "host" in overrides:
        broker = replace(broker, host=overrides["host"][0])
    if "port" in overrides:
        value, origin = overrides["port"]
        try:
            port = int(value)
            if not 1 <= port <= 65535:
                raise ValueError
            broker = replace(broker, port=port)
        except ValueError:
            problems.append(f"{origin}: port must be an integer 1-65535, got {value!r}")
    if "device_id" in overrides:
        value, origin = overrides["device_id"]
        if is_id(value):
            device_id = value
        else:
            problems.append(f"{origin}: device id {value!r} is not valid: {ID_HINT}")
    if "state_dir" in overrides:
        state_dir = overrides["state_dir"][0]

    if device_id is None and not any("device_id" in p for p in problems):
        problems.append("device_id: is required (or set AGENT_DEVICE_ID / --device-id)")
    if problems:
        raise ConfigError(source, problems)

    resolved_state = Path(state_dir or DEFAULT_STATE_DIR).expanduser()  # $HOME now, not at import
    assert device_id is not None
    return Config(device_id=device_id, broker=broker, topic_prefix=topic_prefix,
                  state_dir=resolved_state, metrics_interval_s=metrics_interval_s,
                  max_payload_bytes=max_payload, npu=npu, cpu=cpu, auction=auction,
                  homeassistant=ha, triggers=triggers, log=log_cfg, drain_s=drain_s, source=source, serve=serve)


def load_config(path: str | os.PathLike[str] | None, *, env: Mapping[str, str] | None = None,
                flags: Mapping[str, Any] | None = None, file_problems: list[str] | None = None) -> Config:
    """Load and validate a config file (or defaults when path is None); raise ConfigError.
    With ``file_problems``, missing or unsafe credential and TLS files are listed there
    instead of making the config invalid (for ``check``, which reports them itself)."""
    token = _DEFERRED_FILES.set(file_problems)
    try:
        return _load_config(path, env=env, flags=flags)
    finally:
        _DEFERRED_FILES.reset(token)


def _load_config(path: str | os.PathLike[str] | None, *, env: Mapping[str, str] | None,
                 flags: Mapping[str, Any] | None) -> Config:
    import yaml

    env = os.environ if env is None else env
    flags = flags or {}
    if path is None:
        return _parse({}, "<defaults>", env, flags)
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(source, [f"<file>: {source} does not exist"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(source, [f"<file>: cannot read: {exc}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, [f"<yaml>: {where}{problem}"]) from None
    except RecursionError:
        raise ConfigError(source, ["<yaml>: nested too deeply"]) from None
    except (ValueError, TypeError, OverflowError, AttributeError, KeyError, IndexError) as exc:
        # a tag whose value does not convert (x: !!int, x: !!timestamp foo): PyYAML raises anything
        raise ConfigError(source, [f"<yaml>: a value with an explicit tag does not convert: {exc}"]) from None
    return _parse(data, source, env, flags)


def parse_config(data: Any, *, source: str = "<dict>", env: Mapping[str, str] | None = None,
                 flags: Mapping[str, Any] | None = None) -> Config:
    """Validate an already-loaded document (used by tests and embedders)."""
    return _parse(data, source, {} if env is None else env, flags or {})
