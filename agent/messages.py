"""Wire messages: small frozen dataclasses, JSON in UTF-8, schema version ``v``.

``from_payload`` validates types, ranges and sizes and raises only ``MessageError``; a
receiver logs that one line and carries on. Every id also travels in the payload so that
MQTT 3.1.1 clients, which have no response topic or correlation data, can take part.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import secrets
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any, ClassVar, TypeVar

from agent.errors import ERROR_KINDS, BadPrompt, MessageError
from agent.topics import is_id

T = TypeVar("T")

# 2: durations instead of deadlines, private reply topics, digests
# 3: chat in jobs (messages, tools, format), tool calls in answers, tool-capable models
SCHEMA_VERSION = 3
DEFAULT_MAX_BYTES = 256 * 1024
MAX_SECONDS = 7 * 24 * 3600
MODES = ("npu", "cpu")
NEEDS = ("any", "npu")
RESULT_TYPES = ("accepted", "declined", "token", "done", "error")
MAX_TOKENS = 1_000_000
NAME_MAX = 128  # characters of an id-like text: a claim, a model name or alias
ALIASES_MAX = 16
# The range of each number a call, a bid and a snapshot carry: read by the field-by-field
# checks and by the quick ones (``plain``) alike.
SENT_AT = (0, 1e11)
WINDOW = (0, MAX_SECONDS)
SERVICE_S, SERVICE_N, INIT_S = (0, 1e7), (0, 1e9), (0, 1e7)
CPU_SLOTS, CPU_PERCENT, MEM_MB, LOAD1, QUEUE = (0, 1024), (0, 100 * 1024), (0, 1e9), (0, 1e6), (0, 1_000_000)
TEMPERATURE, BACKLOG_S = (-100, 300), (0, 1e9)
RECENT_N, RECENT_MS, CONTEXT = (0, 2**31), (0, 1e9), (1, 10**8)
# The bounds of a prompt request (``Prompt``), the same on every front. Temperature: 0 to
# 2, the range OpenAI's API documents (the only public statement of one we answer to).
MAX_TEMPERATURE = 2.0
MAX_MODEL_NAME = 128
MAX_BID_TIMEOUT_S = 86400.0
DEFAULT_NEW_TOKENS = 256
ROLES = ("system", "user", "assistant", "tool")
MAX_MESSAGES = 1024
MAX_TOOLS = 128
MAX_TOOL_CALLS = 64


def decode_json(payload: bytes, kind: str, max_bytes: int = DEFAULT_MAX_BYTES) -> dict[str, Any]:
    """Bytes -> JSON object with the right schema version, or MessageError."""
    if len(payload) > max_bytes:
        raise MessageError(kind, None, f"payload of {len(payload)} bytes exceeds the {max_bytes}-byte limit")
    try:
        obj = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError:
        raise MessageError(kind, None, "payload is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise MessageError(kind, None, f"payload is not JSON ({exc.msg} at char {exc.pos})") from None
    except ValueError as exc:  # an integer of more digits than Python converts
        raise MessageError(kind, None, f"payload is not usable JSON ({str(exc)[:80]})") from None
    except RecursionError:
        raise MessageError(kind, None, "payload is nested too deeply") from None
    if not isinstance(obj, dict):
        raise MessageError(kind, None, f"payload must be a JSON object, got {type(obj).__name__}")
    v = obj.get("v")
    if type(v) is not int or v != SCHEMA_VERSION:
        raise MessageError(kind, "v", f"unsupported schema version {v!r} (this build speaks {SCHEMA_VERSION})")
    return obj


def decoded(topic: str, payload: bytes, decode: Callable[[bytes], T], *, what: str,
            logger: logging.Logger, matches: Callable[[T], bool] = lambda _: True) -> T | None:
    """Decode a received message, or log one line and return None.

    ``matches`` checks the decoded ids against the topic it came on: a message whose
    payload names another device or request than its topic is garbage too."""
    try:
        value = decode(payload)
    except MessageError as exc:
        logger.warning("dropped %s on %s: %s", what, topic, exc)
        return None
    if not matches(value):
        logger.warning("dropped %s on %s: the ids in it do not match the topic", what, topic)
        return None
    return value


def encode_json(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


class _Fields:
    """Typed access to a decoded object; every failure is a MessageError naming the field."""

    def __init__(self, obj: Mapping[str, Any], kind: str):
        self.obj = obj
        self.kind = kind

    def fail(self, name: str, reason: str) -> MessageError:
        return MessageError(self.kind, name, reason)

    def get(self, name: str, types: type | tuple[type, ...], *, optional: bool = False) -> Any:
        if name not in self.obj or self.obj[name] is None:
            if optional:
                return None
            raise self.fail(name, "is missing")
        value = self.obj[name]
        if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
            raise self.fail(name, f"must be {_names(types)}, got a boolean")
        if not isinstance(value, types):
            raise self.fail(name, f"must be {_names(types)}, got {type(value).__name__}")
        return value

    def id(self, name: str) -> str:
        value: str = self.get(name, str)
        if not is_id(value):
            raise self.fail(name, f"{value[:80]!r} is not a valid id")
        return value

    def text(self, name: str, max_len: int, *, optional: bool = False) -> str | None:
        value: str | None = self.get(name, str, optional=optional)
        if value is None:
            return None
        if len(value) > max_len:
            raise self.fail(name, f"longer than {max_len} characters")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # JSON can spell a lone surrogate ("\ud800"); UTF-8 cannot
            raise self.fail(name, "is not valid Unicode text (a lone surrogate)") from None
        return value

    def number(self, name: str, lo: float, hi: float, *, optional: bool = False) -> float | None:
        value = self.obj.get(name)
        # A plain number in range, the usual case, in one test (a bool's type is not int;
        # NaN, an infinity past a finite bound and a huge integer all fail the comparison
        # and get the full checks below, which say why): a bid has eight such fields.
        if (type(value) is float or type(value) is int) and lo <= value <= hi and hi < math.inf:
            return float(value)
        value = self.get(name, (int, float), optional=optional)
        if value is None:
            return None
        try:
            ok = math.isfinite(value) and lo <= value <= hi
        except OverflowError:  # an integer with hundreds of digits
            ok = False
        if not ok:
            raise self.fail(name, f"must be between {lo} and {hi}, got {str(value)[:40]}")
        return float(value)

    def integer(self, name: str, lo: int, hi: int, *, optional: bool = False) -> int | None:
        value: int | None = self.obj.get(name)
        if type(value) is int and lo <= value <= hi:  # the usual case (see ``number``)
            return value
        value = self.get(name, int, optional=optional)
        if value is not None and not lo <= value <= hi:
            raise self.fail(name, f"must be between {lo} and {hi}, got {str(value)[:40]}")
        return value

    def choice(self, name: str, choices: tuple[str, ...]) -> str:
        value: str = self.get(name, str)
        if value not in choices:
            raise self.fail(name, f"must be one of {', '.join(choices)}, got {value[:40]!r}")
        return value

    def boolean(self, name: str) -> bool:
        value = self.obj.get(name)
        if type(value) is bool:
            return value
        return bool(self.get(name, bool))

    def per_mode(self, name: str, parse: Callable[[Any, str, str], T]) -> dict[str, T]:
        """An optional object keyed by mode (``npu``/``cpu``), each value parsed."""
        out = {}
        for mode, value in (self.get(name, dict, optional=True) or {}).items():
            if mode not in MODES:
                raise self.fail(name, f"unknown mode {mode[:20]!r}")
            out[mode] = parse(value, self.kind, f"{name}.{mode}")
        return out


def _in(value: Any, bounds: tuple[float, float]) -> bool:
    """A JSON number (not a boolean) within ``bounds`` (both included): NaN and infinities
    fail the comparison."""
    lo, hi = bounds
    return (type(value) is float or type(value) is int) and lo <= value <= hi


def _names(types: type | tuple[type, ...]) -> str:
    ts = types if isinstance(types, tuple) else (types,)
    return " or ".join({int: "an integer", float: "a number", str: "a string", bool: "a boolean",
                        dict: "an object", list: "a list"}.get(t, t.__name__) for t in ts)


# ------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class LatencySummary:
    """Recent latencies of one mode on one device, advertised in bids and metrics."""

    n: int
    p50_ms: float
    ms_per_token: float | None = None

    @classmethod
    def from_obj(cls, obj: Any, kind: str, name: str) -> LatencySummary:
        if not isinstance(obj, dict):
            raise MessageError(kind, name, "must be an object")
        f = _Fields(obj, f"{kind}.{name}")
        return cls(n=f.integer("n", *RECENT_N) or 0, p50_ms=f.number("p50_ms", *RECENT_MS) or 0.0,
                   ms_per_token=f.number("ms_per_token", *RECENT_MS, optional=True))


@dataclass(frozen=True)
class ModelInfo:
    """The model one mode of a device serves, and whether it is loaded now."""

    name: str
    aliases: tuple[str, ...] = ()
    context: int | None = None
    warm: bool = False
    tools: bool = False      # its executor passes tools to the model and returns its tool calls

    def serves(self, model: str | None) -> bool:
        return model is None or model == self.name or model in self.aliases

    def to_obj(self) -> dict[str, Any]:
        return {"name": self.name, "aliases": list(self.aliases), "context": self.context, "warm": self.warm,
                "tools": self.tools}

    @classmethod
    def from_obj(cls, obj: Any, kind: str, where: str) -> ModelInfo:
        if not isinstance(obj, dict):
            raise MessageError(kind, where, "must be an object")
        f = _Fields(obj, kind)
        aliases = f.get("aliases", list, optional=True) or []
        if len(aliases) > ALIASES_MAX or not all(isinstance(a, str) and 0 < len(a) <= NAME_MAX for a in aliases):
            raise MessageError(kind, f"{where}.aliases", f"must be up to {ALIASES_MAX} names")
        return cls(name=f.text("name", NAME_MAX) or "", aliases=tuple(aliases),
                   context=f.integer("context", *CONTEXT, optional=True), warm=bool(obj.get("warm") is True),
                   tools=bool(obj.get("tools") is True))


def can_take(snapshot: Snapshot, need: str = "any", model: str | None = None, tools: bool = False) -> bool:
    """Whether a device with this snapshot could take a job: its NPU (serving the model,
    calling tools if the job has them), or, for a job that does not need an NPU, a CPU
    slot (likewise). A node bids only on such jobs (a device that only asks never bids),
    and auctions wait only for them."""
    npu = snapshot.has_npu and serves(snapshot, "npu", model, tools)
    return npu or (need == "any" and snapshot.cpu_slots > 0 and serves(snapshot, "cpu", model, tools))


def serves(snapshot: Snapshot, mode: str, model: str | None, tools: bool = False) -> bool:
    """Whether ``snapshot``'s device runs ``model`` in ``mode`` (any model, if None: a job
    that names none goes where it always went), and, for a job with ``tools``, whether
    that mode's executor can call tools."""
    if model is None and not tools:
        return True
    info = snapshot.models.get(mode)
    return info is not None and info.serves(model) and (info.tools or not tools)


@dataclass(frozen=True)
class Snapshot:
    """A device's live state: what it advertises in metrics and bids."""

    has_npu: bool
    npu_free: bool
    cpu_slots: int          # 0: this device runs nothing on the CPU
    cpu_percent: float
    mem_available_mb: float
    load1: float
    queue_depth: int
    temperature_c: float | None = None
    on_battery: bool = False
    recent: Mapping[str, LatencySummary] = field(default_factory=dict)
    backlog_s: float = 0.0  # expected wait before a new CPU job would start here
    models: Mapping[str, ModelInfo] = field(default_factory=dict)  # per mode: what it serves

    def p50_ms(self, mode: str) -> float:
        """The median of this device's recent latencies in ``mode`` (ms); infinite with none."""
        summary = self.recent.get(mode)
        return summary.p50_ms if summary is not None and summary.n > 0 else math.inf

    def to_obj(self) -> dict[str, Any]:
        # Spelled out: dataclasses.asdict deep-copies and was half the cost of a bid.
        return {"has_npu": self.has_npu, "npu_free": self.npu_free, "cpu_slots": self.cpu_slots,
                "cpu_percent": self.cpu_percent, "mem_available_mb": self.mem_available_mb,
                "load1": self.load1, "queue_depth": self.queue_depth, "backlog_s": self.backlog_s,
                "temperature_c": self.temperature_c, "on_battery": self.on_battery,
                "recent": {mode: {"n": r.n, "p50_ms": r.p50_ms, "ms_per_token": r.ms_per_token}
                           for mode, r in self.recent.items()},
                "models": {mode: m.to_obj() for mode, m in self.models.items()}}

    @classmethod
    def from_fields(cls, f: _Fields) -> Snapshot:
        return cls.plain(f.obj) or cls._field_by_field(f)

    @classmethod
    def plain(cls, obj: Mapping[str, Any]) -> Snapshot | None:
        """The usual snapshot, checked a field at a time without the reasons (an asker reads
        every bid, and a node every device's metrics); None for anything else, which
        ``from_fields`` checks field by field and rejects with the reason."""
        g: Callable[[str], Any] = obj.get
        has_npu, npu_free, on_battery, slots, depth = g("has_npu"), g("npu_free"), g("on_battery"), g("cpu_slots"), \
            g("queue_depth")
        cpu, mem, load, temperature, backlog = g("cpu_percent"), g("mem_available_mb"), g("load1"), \
            g("temperature_c"), g("backlog_s")
        if not (type(has_npu) is bool and type(npu_free) is bool and type(on_battery) is bool
                and type(slots) is int and _in(slots, CPU_SLOTS) and type(depth) is int and _in(depth, QUEUE)
                and _in(cpu, CPU_PERCENT) and _in(mem, MEM_MB) and _in(load, LOAD1)
                and (temperature is None or _in(temperature, TEMPERATURE))
                and (backlog is None or _in(backlog, BACKLOG_S))):
            return None
        raw_recent, raw_models = g("recent"), g("models")
        if not ((raw_recent is None or type(raw_recent) is dict) and (raw_models is None or type(raw_models) is dict)):
            return None
        recent: dict[str, LatencySummary] = {}
        for mode, r in (raw_recent or {}).items():
            if mode not in MODES or type(r) is not dict:
                return None
            n, p50, per_token = r.get("n"), r.get("p50_ms"), r.get("ms_per_token")  # type: Any, Any, Any
            if not (type(n) is int and _in(n, RECENT_N) and _in(p50, RECENT_MS)
                    and (per_token is None or _in(per_token, RECENT_MS))):
                return None
            recent[mode] = LatencySummary(n, float(p50) or 0.0, None if per_token is None else float(per_token))
        models: dict[str, ModelInfo] = {}
        for mode, m in (raw_models or {}).items():
            if mode not in MODES or type(m) is not dict:
                return None
            name, aliases, context = m.get("name"), m.get("aliases"), m.get("context")
            aliases = [] if aliases is None else aliases
            if not (type(name) is str and len(name) <= NAME_MAX and name.isascii() and type(aliases) is list
                    and len(aliases) <= ALIASES_MAX and all(type(a) is str and 0 < len(a) <= NAME_MAX for a in aliases)
                    and (context is None or (type(context) is int and _in(context, CONTEXT)))):
                return None
            models[mode] = ModelInfo(name, tuple(aliases), context, m.get("warm") is True, m.get("tools") is True)
        # "or 0.0" as the field-by-field check has it: -0.0 reads as 0.0 either way
        return cls(has_npu=has_npu, npu_free=npu_free, cpu_slots=slots, cpu_percent=float(cpu) or 0.0,
                   mem_available_mb=float(mem) or 0.0, load1=float(load) or 0.0, queue_depth=depth,
                   temperature_c=None if temperature is None else float(temperature), on_battery=on_battery,
                   recent=recent, backlog_s=float(backlog or 0.0), models=models)

    @classmethod
    def _field_by_field(cls, f: _Fields) -> Snapshot:
        recent = f.per_mode("recent", LatencySummary.from_obj)
        models = f.per_mode("models", ModelInfo.from_obj)
        return cls(
            has_npu=f.boolean("has_npu"),
            npu_free=f.boolean("npu_free"),
            cpu_slots=f.integer("cpu_slots", *CPU_SLOTS) or 0,
            cpu_percent=f.number("cpu_percent", *CPU_PERCENT) or 0.0,
            mem_available_mb=f.number("mem_available_mb", *MEM_MB) or 0.0,
            load1=f.number("load1", *LOAD1) or 0.0,
            queue_depth=f.integer("queue_depth", *QUEUE) or 0,
            temperature_c=f.number("temperature_c", *TEMPERATURE, optional=True),
            on_battery=f.boolean("on_battery"),
            recent=recent,
            backlog_s=f.number("backlog_s", *BACKLOG_S, optional=True) or 0.0,
            models=models,
        )


def snapshot_members(snapshot: Snapshot) -> bytes:
    """A snapshot as the members of a JSON object, without its braces: what a bid carries
    after its own fields."""
    return encode_json(snapshot.to_obj())[1:-1]


@dataclass(frozen=True)
class Capabilities:
    """What the operator allows a device to claim, on ``capabilities/<dev>`` (retained;
    written by ``scripts/provision publish`` with an operator's login, which the ACL alone
    allows): whether it may offer an NPU, and which models it may say it serves (None:
    any). Orchestrators ignore claims in bids beyond it (``roster.Roster.vouched``)."""

    KIND: ClassVar[str] = "capabilities"
    device: str
    npu: bool = False
    models: tuple[str, ...] | None = None

    def to_payload(self) -> bytes:
        return encode_json({"v": SCHEMA_VERSION, "device": self.device, "npu": self.npu,
                            "models": None if self.models is None else list(self.models)})

    @classmethod
    def from_payload(cls, payload: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> Capabilities:
        f = _Fields(decode_json(payload, cls.KIND, max_bytes), cls.KIND)
        models = f.get("models", list, optional=True)
        if models is not None and (len(models) > 64 or not all(isinstance(m, str) and 0 < len(m) <= 128
                                                                 for m in models)):
            raise f.fail("models", "must be up to 64 model names")
        return cls(device=f.id("device"), npu=f.boolean("npu"), models=None if models is None else tuple(models))


# ------------------------------------------------------------------------- auction


@dataclass(frozen=True)
class BidRequest:
    """The call for bids. ``window_s`` is how long the auction stays open; ``sent_at`` is
    the sender's wall clock, used only with a measured offset between the two clocks (a
    board without a real-time clock may be minutes off: no deadline compares clocks)."""

    KIND: ClassVar[str] = "bid_request"
    rid: str
    origin: str
    window_s: float
    prompt_tokens: int
    max_new_tokens: int
    need: str = "any"
    sent_at: float = 0.0
    model: str | None = None   # only devices that serve it bid; None: any
    tools: bool = False        # the job has tools: only devices whose executor can call them bid

    def to_payload(self) -> bytes:
        # Spelled out, as Snapshot.to_obj: dataclasses.asdict was 4/5 of the encoding (21 µs of 26).
        return encode_json({"v": SCHEMA_VERSION, "rid": self.rid, "origin": self.origin, "window_s": self.window_s,
                            "prompt_tokens": self.prompt_tokens, "max_new_tokens": self.max_new_tokens,
                            "need": self.need, "sent_at": self.sent_at, "model": self.model, "tools": self.tools})

    @classmethod
    def from_payload(cls, payload: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> BidRequest:
        obj = decode_json(payload, cls.KIND, max_bytes)
        return cls.plain(obj) or cls.from_obj(obj)

    @classmethod
    def plain(cls, obj: dict[str, Any]) -> BidRequest | None:
        """The usual call for bids, checked in one expression (every device reads every
        call: this is most of the time its decoding took); None for anything else, which
        ``from_obj`` decodes field by field and rejects with the reason."""
        g: Callable[[str], Any] = obj.get
        rid, origin, window, prompt, answer = g("rid"), g("origin"), g("window_s"), g("prompt_tokens"), \
            g("max_new_tokens")
        need, sent, model = g("need"), g("sent_at"), g("model")
        if type(rid) is str and type(origin) is str and is_id(rid) and is_id(origin) \
                and _in(window, WINDOW) and type(prompt) is int and 0 <= prompt <= MAX_TOKENS \
                and type(answer) is int and 1 <= answer <= MAX_TOKENS and need in NEEDS \
                and (sent is None or _in(sent, SENT_AT)) \
                and (model is None or (type(model) is str and len(model) <= NAME_MAX and model.isascii())):
            return cls(rid=rid, origin=origin, window_s=float(window) or 0.0, prompt_tokens=prompt,
                       max_new_tokens=answer, need=need, sent_at=float(sent or 0.0), model=model,
                       tools=obj.get("tools") is True)
        return None

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> BidRequest:
        f = _Fields(obj, cls.KIND)
        return cls(rid=f.id("rid"), origin=f.id("origin"), window_s=f.number("window_s", *WINDOW) or 0.0,
                   prompt_tokens=f.integer("prompt_tokens", 0, MAX_TOKENS) or 0,
                   max_new_tokens=f.integer("max_new_tokens", 1, MAX_TOKENS) or 1,
                   need=f.choice("need", NEEDS), sent_at=f.number("sent_at", *SENT_AT, optional=True) or 0.0,
                   model=f.text("model", NAME_MAX, optional=True), tools=f.obj.get("tools") is True)


@dataclass(frozen=True)
class Bid:
    KIND: ClassVar[str] = "bid"
    rid: str
    device: str
    origin: str              # the orchestrator it is for (its topic says so too)
    claim: str               # the token the node honours once, for this rid and origin
    snapshot: Snapshot
    service_s: float | None = None  # the device's own estimate of this job's service time
    service_n: float = 0.0          # the effective number of recent jobs it rests on
    init_s: float = 0.0             # the start-up it would pay first (a model that is not warm)

    def to_payload(self, members: bytes | None = None) -> bytes:
        """``members``: ``snapshot_members(self.snapshot)``, if the caller kept it (a node's
        snapshot is the same from one bid to the next until something changes)."""
        own = encode_json({"v": SCHEMA_VERSION, "rid": self.rid, "device": self.device, "origin": self.origin,
                           "claim": self.claim, "service_s": self.service_s, "service_n": self.service_n,
                           "init_s": self.init_s})
        return own[:-1] + b"," + (snapshot_members(self.snapshot) if members is None else members) + b"}"

    @classmethod
    def from_payload(cls, payload: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> Bid:
        obj = decode_json(payload, cls.KIND, max_bytes)
        return cls.plain(obj) or cls.from_obj(obj)

    @classmethod
    def plain(cls, obj: dict[str, Any]) -> Bid | None:
        """The usual bid, checked at once (``Snapshot.plain``); None for anything else."""
        rid, device, origin, claim = obj.get("rid"), obj.get("device"), obj.get("origin"), obj.get("claim")
        service, n, init = obj.get("service_s"), obj.get("service_n"), obj.get("init_s")
        if not (type(rid) is str and type(device) is str and type(origin) is str and is_id(rid) and is_id(device)
                and is_id(origin) and type(claim) is str and len(claim) <= NAME_MAX and claim.isascii()
                and (service is None or _in(service, SERVICE_S)) and (n is None or _in(n, SERVICE_N))
                and (init is None or _in(init, INIT_S))):
            return None
        snapshot = Snapshot.plain(obj)
        if snapshot is None:
            return None
        return cls(rid=rid, device=device, origin=origin, claim=claim, snapshot=snapshot,
                   service_s=None if service is None else float(service), service_n=float(n or 0.0),
                   init_s=float(init or 0.0))

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> Bid:
        f = _Fields(obj, cls.KIND)
        return cls(rid=f.id("rid"), device=f.id("device"), origin=f.id("origin"),
                   claim=f.text("claim", NAME_MAX) or "", snapshot=Snapshot.from_fields(f),
                   service_s=f.number("service_s", *SERVICE_S, optional=True),
                   service_n=f.number("service_n", *SERVICE_N, optional=True) or 0.0,
                   init_s=f.number("init_s", *INIT_S, optional=True) or 0.0)


@dataclass(frozen=True)
class Metrics:
    KIND: ClassVar[str] = "metrics"
    device: str
    ts: float                # the device's wall clock: how far off it is, measured on receipt
    snapshot: Snapshot
    last_latency_ms: float | None = None
    health: str = "ok"       # "ok", or why the node is not taking work (state_dir unwritable, …)

    def to_payload(self) -> bytes:
        return encode_json({"v": SCHEMA_VERSION, "device": self.device, "ts": self.ts, "health": self.health,
                            "last_latency_ms": self.last_latency_ms, **self.snapshot.to_obj()})

    @classmethod
    def from_payload(cls, payload: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> Metrics:
        f = _Fields(decode_json(payload, cls.KIND, max_bytes), cls.KIND)
        return cls(device=f.id("device"), ts=f.number("ts", 0, 1e11) or 0.0,
                   snapshot=Snapshot.from_fields(f),
                   last_latency_ms=f.number("last_latency_ms", 0, 1e9, optional=True),
                   health=f.text("health", 300, optional=True) or "ok")


# ------------------------------------------------------------------------- chat


@dataclass(frozen=True)
class ToolCall:
    """One call of a tool the model asked for; ``arguments`` is a JSON object (the
    OpenAI front sends it on as a string, the Ollama front as an object)."""

    name: str
    arguments: Mapping[str, Any]
    id: str = ""

    def to_obj(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "arguments": dict(self.arguments)}

    @classmethod
    def from_obj(cls, obj: Any, kind: str, where: str) -> ToolCall:
        if not isinstance(obj, dict):
            raise MessageError(kind, where, "must be an object")
        f = _Fields(obj, kind)
        name = f.text("name", 256) or ""
        if not name:
            raise MessageError(kind, f"{where}.name", "is empty")
        arguments = obj.get("arguments")
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            raise MessageError(kind, f"{where}.arguments", "must be an object")
        return cls(name=name, arguments=arguments, id=f.text("id", 128, optional=True) or "")


def tool_calls_of(raw: Any, kind: str, where: str) -> tuple[ToolCall, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or len(raw) > MAX_TOOL_CALLS:
        raise MessageError(kind, where, f"must be a list of up to {MAX_TOOL_CALLS} tool calls")
    return tuple(ToolCall.from_obj(c, kind, f"{where}[{i}]") for i, c in enumerate(raw))


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a conversation, in the fleet's own neutral shape."""

    role: str                          # system | user | assistant | tool
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()   # an assistant turn that called tools
    tool_call_id: str = ""             # a tool turn: the call it answers
    name: str = ""                     # a tool turn: the tool's name

    def to_obj(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            obj["tool_calls"] = [c.to_obj() for c in self.tool_calls]
        if self.tool_call_id:
            obj["tool_call_id"] = self.tool_call_id
        if self.name:
            obj["name"] = self.name
        return obj

    @classmethod
    def from_obj(cls, obj: Any, kind: str, where: str, max_len: int) -> ChatMessage:
        if not isinstance(obj, dict):
            raise MessageError(kind, where, "must be an object")
        f = _Fields(obj, f"{kind}.{where}")
        role = f.choice("role", ROLES)
        return cls(role=role, content=f.text("content", max_len, optional=True) or "",
                   tool_calls=tool_calls_of(obj.get("tool_calls"), kind, f"{where}.tool_calls"),
                   tool_call_id=f.text("tool_call_id", 128, optional=True) or "",
                   name=f.text("name", 256, optional=True) or "")


@dataclass(frozen=True)
class Chat:
    """A conversation as the client sent it: the turns, the tools the model may call
    (OpenAI's function-tool objects, which Ollama shares), and an optional output format
    ("json", or a JSON schema object). Executors that speak chat receive it as it is; the
    others run ``transcript()`` through their model's chat template."""

    messages: tuple[ChatMessage, ...]
    tools: tuple[Mapping[str, Any], ...] = ()
    format: str | Mapping[str, Any] | None = None

    def to_obj(self) -> dict[str, Any]:
        return {"messages": [m.to_obj() for m in self.messages], "tools": [dict(t) for t in self.tools],
                "format": self.format if not isinstance(self.format, Mapping) else dict(self.format)}

    @classmethod
    def from_obj(cls, obj: Any, kind: str, max_len: int) -> Chat:
        if not isinstance(obj, dict):
            raise MessageError(kind, "chat", "must be an object")
        raw = obj.get("messages")
        if not isinstance(raw, list) or not 0 < len(raw) <= MAX_MESSAGES:
            raise MessageError(kind, "chat.messages", f"must be a list of 1 to {MAX_MESSAGES} messages")
        messages = tuple(ChatMessage.from_obj(m, kind, f"chat.messages[{i}]", max_len) for i, m in enumerate(raw))
        tools = obj.get("tools") or []
        if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
            raise MessageError(kind, "chat.tools", f"must be a list of up to {MAX_TOOLS} tools")
        for i, tool in enumerate(tools):
            if tool_name(tool) is None:
                raise MessageError(kind, f"chat.tools[{i}]", 'must be {"type": "function", "function": {"name": …}}')
        fmt = obj.get("format")
        if fmt is not None and fmt != "json" and not isinstance(fmt, dict):
            raise MessageError(kind, "chat.format", 'must be "json" or a JSON schema object')
        return cls(messages=messages, tools=tuple(tools), format=fmt)

    def transcript(self) -> str:
        """One prompt, for executors that apply their own chat template: a single user
        message as it is, several as a "Role: text" transcript ending in "Assistant:"."""
        if len(self.messages) == 1 and self.messages[0].role == "user" and not self.tools:
            return self.messages[0].content
        lines = []
        if self.tools:
            names = ", ".join(n for t in self.tools if (n := tool_name(t)))
            lines.append(f"Tools: {names}")
        for m in self.messages:
            text = m.content
            if m.tool_calls:
                calls = "; ".join(f"{c.name}({encode_json(c.arguments).decode()})" for c in m.tool_calls)
                text = f"{text}\n[called {calls}]" if text else f"[called {calls}]"
            lines.append(f"{m.role.capitalize()}: {text}")
        return "\n\n".join(lines) + "\n\nAssistant:"


def tool_name(tool: Any) -> str | None:
    """A function tool's name, or None if ``tool`` is not one."""
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        return None
    fn = tool.get("function")
    name = fn.get("name") if isinstance(fn, dict) else None
    return name if isinstance(name, str) and 0 < len(name) <= 256 else None


# ------------------------------------------------------------------------- execution


@dataclass(frozen=True)
class Job:
    """A job for one device. Its times are durations from when it was sent: the node
    must not start it after ``accept_s``, and the answer is not wanted after ``timeout_s``."""

    KIND: ClassVar[str] = "job"
    rid: str
    origin: str
    mode: str                # npu | cpu
    claim: str
    prompt: str
    max_new_tokens: int
    accept_s: float
    timeout_s: float
    reply_to: str            # the result topic stem, for clients that cannot derive it
    temperature: float | None = None
    sent_at: float = 0.0     # the sender's wall clock (see BidRequest)
    cancel_check: str = ""   # cancel_check(key): only a cancel carrying the key stops this job
    model: str | None = None  # the model asked for (the node's executor for the mode must serve it)
    chat: Chat | None = None  # a conversation instead of ``prompt`` (which is then empty)

    @cached_property
    def text_prompt(self) -> str:
        """The prompt for executors that take text: ``prompt``, or the chat's transcript."""
        return self.chat.transcript() if self.chat is not None else self.prompt

    @cached_property
    def digest(self) -> str:
        """What the job asks for, in 16 hex digits: a second job under the same rid that
        asks for something else is not the same job (and is refused)."""
        what: dict[str, Any] = {"rid": self.rid, "origin": self.origin, "mode": self.mode, "prompt": self.prompt,
                                "max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
                                "model": self.model}
        if self.chat is not None:
            what["chat"] = self.chat.to_obj()
        return hashlib.sha256(encode_json(what)).hexdigest()[:16]

    def to_payload(self) -> bytes:
        return encode_json({"v": SCHEMA_VERSION, "rid": self.rid, "origin": self.origin, "mode": self.mode,
                            "claim": self.claim, "prompt": self.prompt, "max_new_tokens": self.max_new_tokens,
                            "accept_s": self.accept_s, "timeout_s": self.timeout_s, "reply_to": self.reply_to,
                            "cancel_check": self.cancel_check, "temperature": self.temperature,
                            "sent_at": self.sent_at, "model": self.model,
                            "chat": None if self.chat is None else self.chat.to_obj()})

    @classmethod
    def from_payload(cls, payload: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> Job:
        f = _Fields(decode_json(payload, cls.KIND, max_bytes), cls.KIND)
        raw_chat = f.obj.get("chat")
        return cls(chat=None if raw_chat is None else Chat.from_obj(raw_chat, cls.KIND, max_bytes),
                   rid=f.id("rid"), origin=f.id("origin"), mode=f.choice("mode", MODES),
                   claim=f.text("claim", 128) or "", prompt=f.text("prompt", max_bytes) or "",
                   max_new_tokens=f.integer("max_new_tokens", 1, MAX_TOKENS) or 1,
                   accept_s=f.number("accept_s", 0, MAX_SECONDS) or 0.0,
                   timeout_s=f.number("timeout_s", 0, MAX_SECONDS) or 0.0,
                   reply_to=f.text("reply_to", 512) or "",
                   cancel_check=f.text("cancel_check", 64) or "",
                   model=f.text("model", 128, optional=True),
                   temperature=f.number("temperature", 0, 10, optional=True),
                   sent_at=f.number("sent_at", 0, 1e11, optional=True) or 0.0)


@dataclass(frozen=True)
class Cancel:
    """Sent on ``exec/<dev>/cancel/<origin>`` when an orchestrator abandons a job it sent
    there (no accept in time, the device went offline, the user gave up): a queued copy
    never starts, a running one stops, a copy arriving later is declined.

    It carries a ``key`` that only the job's origin knows: the job carried
    ``cancel_check(key)``, so even on a broker without the ACL (where anyone may read the
    jobs, and send on any topic) nobody else can stop it. Each job sent gets its own key."""

    KIND: ClassVar[str] = "cancel"
    rid: str
    origin: str
    key: str
    reason: str = ""

    def to_payload(self) -> bytes:
        return encode_json({"v": SCHEMA_VERSION, "type": "cancel", **asdict(self)})

    @classmethod
    def from_payload(cls, payload: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> Cancel:
        f = _Fields(decode_json(payload, cls.KIND, max_bytes), cls.KIND)
        return cls(rid=f.id("rid"), origin=f.id("origin"), key=f.text("key", 64) or "",
                   reason=f.text("reason", 200, optional=True) or "")


def new_cancel_key() -> str:
    return secrets.token_hex(16)


def cancel_check(key: str) -> str:
    """What a job carries so that only the holder of ``key`` can cancel it."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:32] if key else ""


@dataclass(frozen=True)
class Timings:
    queue_ms: float = 0.0
    init_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    total_ms: float = 0.0

    @classmethod
    def from_obj(cls, obj: Any, kind: str) -> Timings:
        if not isinstance(obj, dict):
            raise MessageError(kind, "timings", "must be an object")
        f = _Fields(obj, f"{kind}.timings")
        return cls(**{k: f.number(k, 0, 1e10, optional=True) or 0.0
                      for k in ("queue_ms", "init_ms", "prefill_ms", "decode_ms", "total_ms")})


@dataclass(frozen=True)
class Accepted:
    rid: str
    device: str
    mode: str
    queue_position: int = 0
    digest: str = ""        # of the job it accepted (Job.digest)
    type: ClassVar[str] = "accepted"


# Why a node refuses a job carrying a claim this process never issued. A job sent again
# to a node that restarted since it accepted the job gets it: the run, and its claim,
# died with the old process.
STALE_CLAIM = "stale_claim"


@dataclass(frozen=True)
class Declined:
    rid: str
    device: str
    reason: str
    digest: str = ""         # of the job declined: a forged job's decline is not about ours
    type: ClassVar[str] = "declined"


@dataclass(frozen=True)
class Token:
    rid: str
    device: str
    seq: int
    text: str
    digest: str = ""        # of the job it streams (Job.digest): every event about a job names it
    type: ClassVar[str] = "token"


@dataclass(frozen=True)
class Done:
    rid: str
    device: str
    text: str
    timings: Timings
    prompt_tokens: int = 0
    generated_tokens: int = 0
    digest: str = ""        # of the job it answers (Job.digest)
    finish_reason: str = ""  # the engine's ("stop", "length", …); "" if it did not say (or an older node)
    tool_calls: tuple[ToolCall, ...] = ()   # the tools the model called (a job with tools)
    type: ClassVar[str] = "done"


@dataclass(frozen=True)
class Error:
    rid: str
    device: str
    reason: str
    kind: str = "failed"            # one of errors.ERROR_KINDS: what happened, for machines
    exit_code: int | None = None    # the executor's process exit code, if it had one
    partial_text: str = ""
    digest: str = ""                # of the job that failed (Job.digest)
    type: ClassVar[str] = "error"


ResultEvent = Accepted | Declined | Token | Done | Error


def encode_result(event: ResultEvent) -> bytes:
    obj: dict[str, Any] = {"v": SCHEMA_VERSION, "type": event.type, **asdict(event)}
    if isinstance(event, Done):
        obj["tool_calls"] = [c.to_obj() for c in event.tool_calls]
    return encode_json(obj)


def decode_result(payload: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> ResultEvent:
    kind = "result"
    f = _Fields(decode_json(payload, kind, max_bytes), kind)
    typ = f.choice("type", RESULT_TYPES)
    rid, device = f.id("rid"), f.id("device")
    if typ == "accepted":
        return Accepted(rid, device, f.choice("mode", MODES),
                        f.integer("queue_position", 0, 1_000_000, optional=True) or 0,
                        f.text("digest", 64, optional=True) or "")
    if typ == "declined":
        return Declined(rid, device, f.text("reason", 200) or "", f.text("digest", 64, optional=True) or "")
    if typ == "token":
        return Token(rid, device, f.integer("seq", 0, 2**53) or 0, f.text("text", max_bytes) or "",
                     f.text("digest", 64, optional=True) or "")
    if typ == "done":
        return Done(rid, device, f.text("text", max_bytes) or "",
                    Timings.from_obj(f.get("timings", dict), kind),
                    f.integer("prompt_tokens", 0, MAX_TOKENS, optional=True) or 0,
                    f.integer("generated_tokens", 0, MAX_TOKENS, optional=True) or 0,
                    f.text("digest", 64, optional=True) or "",
                    f.text("finish_reason", 32, optional=True) or "",
                    tool_calls_of(f.obj.get("tool_calls"), kind, "tool_calls"))
    kind_ = f.choice("kind", tuple(ERROR_KINDS)) if "kind" in f.obj else "failed"
    return Error(rid, device, f.text("reason", 4096) or "", kind_,
                 f.integer("exit_code", -1024, 1024, optional=True),
                 f.text("partial_text", max_bytes, optional=True) or "", f.text("digest", 64, optional=True) or "")


# ------------------------------------------------------------------------- triggers


TRIGGER_FIELDS = frozenset({"prompt", "max_new_tokens", "id", "v", "model"})


@dataclass(frozen=True)
class Prompt:
    """One prompt request, checked once, with one set of bounds, whichever front it came
    through: ``trigger``, the control socket, an MQTT trigger, OpenAI's or Ollama's API.
    Constructing one validates it (types too: the fields may come straight from JSON);
    ``BadPrompt`` names the field that is wrong."""

    prompt: str
    max_new_tokens: int = DEFAULT_NEW_TOKENS
    need: str = "any"
    dry_run: bool = False
    bid_timeout_s: float | None = None
    model: str | None = None
    temperature: float | None = None
    chat: Chat | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise BadPrompt("prompt", "the prompt is empty")
        if type(self.max_new_tokens) is not int or not 1 <= self.max_new_tokens <= MAX_TOKENS:
            raise BadPrompt("max_new_tokens", f"max_new_tokens must be an integer from 1 to {MAX_TOKENS}")
        if self.need not in NEEDS:
            raise BadPrompt("need", "need must be any or npu")
        if type(self.dry_run) is not bool:
            raise BadPrompt("dry_run", "dry_run must be true or false")
        if self.bid_timeout_s is not None and not _number_in(self.bid_timeout_s, 0.0, MAX_BID_TIMEOUT_S, open_=True):
            raise BadPrompt("bid_timeout_s", "bid_timeout_s must be a number of seconds > 0")
        if self.model is not None and not (isinstance(self.model, str) and 0 < len(self.model) <= MAX_MODEL_NAME):
            raise BadPrompt("model", "model must be a model name")
        if self.temperature is not None and not _number_in(self.temperature, 0.0, MAX_TEMPERATURE):
            raise BadPrompt("temperature", f"temperature must be a number from 0 to {MAX_TEMPERATURE:g}")
        if self.chat is not None and not isinstance(self.chat, Chat):
            raise BadPrompt("chat", "chat must be a conversation")
        # JSON numbers arrive as int or float: keep one type downstream.
        if self.bid_timeout_s is not None:
            object.__setattr__(self, "bid_timeout_s", float(self.bid_timeout_s))
        if self.temperature is not None:
            object.__setattr__(self, "temperature", float(self.temperature))

    def to_obj(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "max_new_tokens": self.max_new_tokens, "need": self.need,
                "dry_run": self.dry_run, "bid_timeout_s": self.bid_timeout_s, "model": self.model,
                "temperature": self.temperature, "chat": None if self.chat is None else self.chat.to_obj()}

    @classmethod
    def from_obj(cls, obj: Mapping[str, Any], max_bytes: int = 256 * 1024 * 1024) -> Prompt:
        """A prompt from JSON fields (absent ones take their defaults); BadPrompt if wrong."""
        chat = None
        if obj.get("chat") is not None:
            try:
                chat = Chat.from_obj(obj["chat"], "trigger", max_bytes)
            except MessageError as exc:
                raise BadPrompt("chat", str(exc)) from None
        return cls(obj.get("prompt"), obj.get("max_new_tokens", DEFAULT_NEW_TOKENS),  # type: ignore[arg-type]
                   obj.get("need", "any"), obj.get("dry_run", False), obj.get("bid_timeout_s"), obj.get("model"),
                   obj.get("temperature"), chat)


def _number_in(value: object, lo: float, hi: float, *, open_: bool = False) -> bool:
    """A JSON number (not a bool) in [lo, hi] — or (lo, hi) with ``open_`` — and finite."""
    return _in(value, (lo, hi)) and not (open_ and value in (lo, hi))


@dataclass(frozen=True)
class TriggerRequest:
    """A prompt sent to ``agent/<dev>/trigger``: plain text, or JSON with a ``prompt``.

    An ``id`` (JSON, or MQTT 5 correlation data) asks for the answer on
    ``agent/<dev>/answer/<id>`` as well as on ``last_result``: a client that subscribes
    there first gets its own answer, never a previous one."""

    KIND: ClassVar[str] = "trigger"
    prompt: str
    max_new_tokens: int | None = None
    id: str | None = None
    model: str | None = None

    @classmethod
    def from_payload(cls, payload: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> TriggerRequest:
        if len(payload) > max_bytes:
            raise MessageError(cls.KIND, None, f"payload of {len(payload)} bytes exceeds the {max_bytes}-byte limit")
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            raise MessageError(cls.KIND, None, "payload is not UTF-8") from None
        stripped = text.strip()
        answer_id = None
        if stripped.startswith("{"):
            try:
                obj = json.loads(stripped)
            except ValueError as exc:
                raise MessageError(cls.KIND, None, f"looks like JSON but is not ({exc})") from None
            except RecursionError:
                raise MessageError(cls.KIND, None, "nested too deeply") from None
            if not isinstance(obj, dict):
                raise MessageError(cls.KIND, None, "JSON must be an object")
            f = _Fields(obj, cls.KIND)
            unknown = set(obj) - TRIGGER_FIELDS
            if unknown:  # first: a misspelt "prompt" is named as such, not as a missing prompt
                raise MessageError(cls.KIND, sorted(unknown)[0],
                                   f"unknown field (a trigger takes {', '.join(sorted(TRIGGER_FIELDS - {'v'}))})")
            prompt = f.text("prompt", max_bytes) or ""
            max_new = obj.get("max_new_tokens")
            answer_id = f.id("id") if "id" in obj else None
            model = f.text("model", MAX_MODEL_NAME, optional=True) or None  # "": no preference
        else:
            prompt, max_new, model = text, None, None
        try:  # the bounds every front shares
            Prompt(prompt, DEFAULT_NEW_TOKENS if max_new is None else max_new, model=model)
        except BadPrompt as exc:
            raise MessageError(cls.KIND, exc.field, str(exc)) from None
        return cls(prompt=prompt, max_new_tokens=max_new, id=answer_id, model=model)

    def ask(self) -> Prompt:
        """The prompt request this trigger makes (checked when it was decoded)."""
        return Prompt(self.prompt, self.max_new_tokens or DEFAULT_NEW_TOKENS, model=self.model)

    @staticmethod
    def reply_id(payload: bytes, correlation_data: bytes | None) -> str | None:
        """The answer id of a trigger, even one that cannot be used (a typo in a field,
        an oversized prompt): whoever gave an id is waiting on its answer topic and must
        hear why nothing will come. The JSON ``id`` if it is a valid id, else MQTT 5
        correlation data that is one."""
        try:
            obj = json.loads(payload)
        except (ValueError, RecursionError):
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("id"), str) and is_id(obj["id"]):
            return str(obj["id"])
        if correlation_data is not None:
            correlation = correlation_data.decode("utf-8", "replace")
            return correlation if is_id(correlation) else None
        return None


@dataclass(frozen=True)
class LastResult:
    rid: str
    device: str
    winner: str | None
    path: str | None
    ok: bool
    text: str
    error: str | None
    total_ms: float
    id: str | None = None    # the trigger's id, when it had one

    def to_payload(self) -> bytes:
        return encode_json({"v": SCHEMA_VERSION, **asdict(self)})
