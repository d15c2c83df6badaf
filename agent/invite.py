"""Whom to invite to an auction once the fleet is large: a pure function (no MQTT, no clock).

Below ``auction.invite.above`` online devices the orchestrator calls everyone, as the seed
did. Above it, calling everyone costs every device a decode and a bid and costs the asker
one bid per device to decode and rank, while the decision only ever needs the few devices
that could plausibly win. ``choose`` names them from what the asker already knows: each
device's last retained metrics (NPU free, models served, CPU slots, queue depth, backlog
in seconds, its own recent latencies) and, where the caller has them, expected seconds
of its own (``expected_s``). The invitation is, in this order and without repeats:

- the asker's own daemon, if it could take the job: its bid costs no other device
  anything, and it is the candidate the seed always had (never counted twice);
- every device with a free NPU that serves the model, fastest recent NPU first, at most
  ``max(best, 1)`` of them (pass 1 takes a free NPU whatever the CPUs say);
- ``best`` devices among those with the lowest expected completion as far as the asker
  knows, drawn at random among the ``SPREAD``·``best`` lowest so that askers reading the
  same metrics do not all pile onto the same few. What the asker knows: first its own
  memory (``AskerMemory``: the last bid each device sent it, aged by the time gone by
  and grown by the jobs it sent there since); else the retained metrics: backlog less
  the metrics' age, plus recent median latency (a device with no record yet as fast as
  the fastest), plus a start-up where the model is not warm (a bid's ``init_s`` if one
  ever told it, else ``COLD_S``);
- ``explore`` devices drawn at random among the rest, known or not (the "power of d
  choices": a few random probes keep a stale view honest and let unknown devices be
  learnt); if that would leave no peer invited at all (nothing known, ``explore`` 0),
  ``max(best, 1)`` drawn at random instead: an invitation always calls someone.

Devices that cannot take the job by their last metrics (``messages.can_take``) are never
invited. The choice depends only on its inputs and the seeded ``rng``.

At a thousand devices the choice runs on every auction, so it works on columns (numpy)
rather than a dozen calls per device: ``Rows`` keeps what each device's metrics say, and
works a row out again only when that device's snapshot is a new object (a new metrics
message); a device coming or going carries the others' rows over. The orchestrator goes
further (``choose_kept``): the roster and the asker's memory each tell the view which
devices changed since it last read them (``agent.feeds``), so an auction reads a handful
of devices, not a thousand (the choice at N=1000: 1.8 ms down to 0.5 ms). The same inputs
give the same invitation whichever way.
"""

from __future__ import annotations

import math
import operator
import threading
from collections.abc import Callable, Collection, Hashable, Mapping
from dataclasses import dataclass
from itertools import repeat
from typing import Any, Protocol

import numpy as np

from agent.feeds import Changes, Feeds
from agent.messages import Snapshot, can_take, serves
from agent.servicemodel import MIN_SECONDS, _fit_nonneg, decay_for

# The k "best" are drawn at random among the SPREAD·k best: every asker reads the same
# retained metrics (up to metrics_interval_s old), and a strict top k would send every
# job of that interval to the same k devices (scripts/simulate_invite: 1.45x the mean
# latency of calling everyone at 70 % load on 100 devices, against 1.19x with 4). Once
# each device is priced for the job's size (AskerMemory's shape) a narrower draw pays:
# 300 devices, 70 % load, 2 seeds: 1.015x calling everyone with 2, 1.033x with 4.
SPREAD = 2
# What a cold model's start-up is taken to cost when nothing this asker heard says better:
# loading a GGUF model on an edge CPU takes seconds (scripts/simulate's kinds: 2-9 s).
COLD_S = 5.0
# A device's bids price each job by its own record, a + b·prompt + c·answer: linear in the
# job's prompt and answer budget. Fitted to the bids this asker heard from it (forgetting
# with this half-life, in bids), that shape prices the next job at its own size: a device
# that prefills fast wins long prompts, one that decodes fast long answers. The last bid's
# figure alone, for another job, ranked the best device for the job at hand among those
# invited in 9 % of the jobs (scripts/simulate_invite, 300 devices, 70 % load).
SHAPE_HALF_LIFE = 8.0
SHAPE_MIN_BIDS = 3     # three bids of different sizes pin the three coefficients down
SHAPE_SCALE = 100.0    # tokens per unit in that fit: the solve's small ridge then barely bends it
JOB_KINDS = 16         # job kinds (need, model, tools) whose "could take it" column ``Rows`` keeps
# What AskerMemory.rows says of a device, in this order (NaN: nothing): when its last bid
# came, when a new CPU job would start there, its last bid's service, its start-up, and
# the coefficients of its shape (NaN until SHAPE_MIN_BIDS were heard).
MEMORY_ROW = ("at", "free_at", "service_s", "init_s", "a", "b", "c")


@dataclass(frozen=True)
class Invitation:
    """The devices invited to one auction, by why they were."""

    own: bool = False                  # the asker's own daemon
    npu: tuple[str, ...] = ()          # free NPUs that serve the model
    best: tuple[str, ...] = ()         # the best by what the asker knows
    explore: tuple[str, ...] = ()      # drawn at random among the rest
    me: str = ""

    @property
    def devices(self) -> tuple[str, ...]:
        """Every invited device once, the asker's own first."""
        return ((self.me,) if self.own else ()) + self.npu + self.best + self.explore


def expected_s(snapshot: Snapshot) -> float | None:
    """What a device's own metrics say a CPU job would take there from now: its backlog in
    seconds plus its recent median latency; None when it has run nothing yet."""
    service = _service_s(snapshot)
    return None if service is None else snapshot.backlog_s + service


def choose(devices: Mapping[str, Snapshot | None], *, me: str, best: int, explore: int,
           rng: np.random.Generator, model: str | None = None, need: str = "any", tools: bool = False,
           known_s: Mapping[str, float] | None = None, startup_s: Mapping[str, float] | None = None,
           sent_s: Mapping[str, float] | None = None, now: float = 0.0,
           npu_granted: Callable[[str], bool] = lambda d: True,
           exclude: Collection[str] = (), spread: int = SPREAD, rows: Rows | None = None) -> Invitation:
    """The invitation for one job. ``devices``: every online device that may bid, with its
    last metrics (None: none seen yet); ``known_s``: the asker's own expected seconds per
    device, preferred over the metrics' where given; ``startup_s``: a device's start-up as its
    last cold bid said, added where its metrics say the model is not loaded (else the median
    of those known, else ``COLD_S``); ``sent_s``: when each device's metrics were sent, on
    the clock ``now`` reads (their backlog has run down since; none: taken as fresh);
    ``npu_granted``: whether the operator let a device offer an NPU; ``exclude``: never
    invite (e.g. devices known to be gone); ``rows``: what the devices' metrics say, kept
    from earlier choices (``Rows``): the same answer, without working a thousand snapshots
    out again."""
    t = (rows or Rows()).table(devices)  # rows in name order: the same draw whatever the input order
    return _choose(t, t.column(known_s, np.nan) if known_s else None, t.column(sent_s, np.nan) if sent_s else None,
                   me=me, best=best, explore=explore, rng=rng, model=model, need=need, tools=tools,
                   startup_s=startup_s, now=now, npu_granted=npu_granted, exclude=exclude, spread=spread)


def choose_kept(view: Rows, known: np.ndarray | None, *, me: str, best: int, explore: int, rng: np.random.Generator,
                model: str | None = None, need: str = "any", tools: bool = False,
                startup_s: Mapping[str, float] | None = None, now: float = 0.0,
                npu_granted: Callable[[str], bool] = lambda d: True, spread: int = SPREAD) -> Invitation:
    """``choose`` on a view kept in step with its sources (``Rows.sync`` and ``Rows.known``,
    under its ``lock``): the devices, their metrics and when those were sent are the view's,
    ``known`` the asker's own expected seconds in its row order. The same invitation as
    ``choose`` given the same devices, ``known_s`` and ``sent_s`` as mappings."""
    t = view.current()
    return _choose(t, known, t.sent, me=me, best=best, explore=explore, rng=rng, model=model, need=need, tools=tools,
                   startup_s=startup_s, now=now, npu_granted=npu_granted, exclude=(), spread=spread)


def _choose(t: _Table, known: np.ndarray | None, sent: np.ndarray | None, *, me: str, best: int, explore: int,
            rng: np.random.Generator, model: str | None, need: str, tools: bool,
            startup_s: Mapping[str, float] | None, now: float, npu_granted: Callable[[str], bool],
            exclude: Collection[str], spread: int) -> Invitation:
    """The choice on one table: ``known`` and ``sent`` per row (NaN: none), or None for none at all."""
    if best < 0 or explore < 0:
        raise ValueError("best and explore must be >= 0")
    startup_s = startup_s or {}
    cold_default = float(np.median(list(startup_s.values()))) if startup_s else COLD_S
    able = t.able(need, model, tools)
    if exclude:
        able = able & ~np.fromiter((d in exclude for d in t.names), bool, len(t.names))
    me_at = t.index.get(me)
    own = me_at is not None and bool(able[me_at])
    if own:
        able = able.copy()
        able[me_at] = False
    others = np.flatnonzero(able)
    jitter = np.full(len(t.names), np.nan)
    jitter[others] = rng.random(len(others))

    # every free NPU that serves the model, fastest first, at most max(best, 1)
    free = others[t.free_npu[others]]
    npus = sorted((i for i in free.tolist() if serves(t.snaps[i], "npu", model, tools) and npu_granted(t.names[i])),
                  key=lambda i: (t.npu_ms[i], jitter[i]))
    npu = npus[:max(best, 1)]
    if npu:
        taken = np.zeros(len(t.names), bool)
        taken[npu] = True
        rest = others[~taken[others]]
    else:
        rest = others
    services = t.service[rest]
    services = services[~np.isnan(services)]
    optimistic = float(services.min()) if len(services) else 0.0  # no record yet: as fast as the fastest
    # each other device's expected completion: the asker's own figure, else its metrics'
    cost = np.full(len(rest), np.nan) if known is None else known[rest]
    guess = np.isnan(cost) & t.has_snap[rest]
    if guess.any():
        at = rest[guess]
        age = np.zeros(len(at)) if sent is None else now - np.where(np.isnan(sent[at]), now, sent[at])
        backlog = np.maximum(0.0, t.backlog[at] - np.maximum(age, 0.0))
        service = t.service[at]
        priced = backlog + np.where(np.isnan(service), optimistic, service)
        cold = t.cold[at]
        if cold.any():
            priced[cold] += [startup_s.get(t.names[i], cold_default) for i in at[cold].tolist()]
        cost[guess] = priced
    scored = ~np.isnan(cost)  # nothing known: only the random draw can pick it
    ranked, cost = rest[scored], cost[scored]
    wanted = best * spread if spread > 1 else best
    if 0 < wanted < len(cost):  # only the cheapest (ties with the last of them too) need ordering
        near = cost <= np.partition(cost, wanted - 1)[wanted - 1]
        ranked, cost = ranked[near], cost[near]
    ranked = ranked[np.lexsort((ranked, jitter[ranked], t.per_slot[ranked], cost))]
    if spread > 1 and len(ranked) > best:
        pool = ranked[:best * spread]
        ranked = pool[np.sort(rng.permutation(len(pool))[:best])]
    top = ranked[:best]
    chosen = np.zeros(len(t.names), bool)
    chosen[top] = True
    unpicked = rest[~chosen[rest]]
    # An invitation without a single peer would leave the job to the asker, or to nobody:
    # with nothing known (and explore 0), ``max(best, 1)`` are drawn at random instead.
    draw = explore if npu or len(top) or explore else max(best, 1)
    picks = rng.permutation(len(unpicked))[:draw] if len(unpicked) else np.zeros(0, int)
    names = t.names
    return Invitation(own=own, npu=tuple(names[i] for i in npu), best=tuple(names[i] for i in top.tolist()),
                      explore=tuple(names[i] for i in unpicked[np.sort(picks)].tolist()), me=me)


_UNSEEN: Snapshot | None = Snapshot(has_npu=False, npu_free=False, cpu_slots=0, cpu_percent=0.0,
                                     mem_available_mb=0.0, load1=0.0, queue_depth=0)  # a row not worked out yet


class _Table:
    """One set of devices' rows as columns, in name order (``Rows``); the rows of
    ``previous`` that are still there are carried over, not worked out again."""

    _COLUMNS = ("has_snap", "service", "backlog", "per_slot", "cold", "free_npu", "npu_ms", "sent", "m_values")

    def __init__(self, names: list[str], previous: _Table | None = None):
        n = len(names)
        self.names = names
        self.index = {d: i for i, d in enumerate(names)}
        self.snaps: list[Snapshot | None] = [_UNSEEN] * n
        self.has_snap = np.zeros(n, bool)
        self.service = np.full(n, np.nan)   # seconds, by its recent CPU median; NaN: no record
        self.backlog = np.zeros(n)
        self.per_slot = np.zeros(n)         # queue depth per CPU slot
        self.cold = np.zeros(n, bool)       # the CPU model is not loaded
        self.free_npu = np.zeros(n, bool)
        self.npu_ms = np.full(n, np.inf)    # recent NPU median
        self.sent = np.full(n, np.nan)      # when its metrics were sent (kept views only); NaN: not known
        self.m_values = np.full((n, len(MEMORY_ROW)), np.nan)  # AskerMemory.rows (kept views only)
        self._able: dict[tuple[str, str | None, bool], np.ndarray] = {}
        fresh = set(names)
        if previous is not None:  # a device came or went: the others' rows stay as they were
            kept = [(i, j) for i, d in enumerate(names) if (j := previous.index.get(d)) is not None]
            if kept:
                here, there = (np.array(side) for side in zip(*kept, strict=True))
                for name in self._COLUMNS:
                    getattr(self, name)[here] = getattr(previous, name)[there]
                for i, j in kept:
                    self.snaps[i] = previous.snaps[j]
                for key, mask in previous._able.items():  # the new rows' entries: by ``update``
                    self._able[key] = column = np.zeros(n, bool)
                    column[here] = mask[there]
            fresh -= previous.index.keys()
        # rows a kept view has still to read from each source (a plain ``update`` finds them
        # by their placeholder snapshot), with those the previous table had not read yet
        self.fresh_metrics: set[str] = fresh | (previous.fresh_metrics & self.index.keys() if previous else set())
        self.fresh_memory: set[str] = fresh | (previous.fresh_memory & self.index.keys() if previous else set())

    def update(self, devices: Mapping[str, Snapshot | None]) -> None:
        """Work out again the rows whose snapshot is not the one seen last time."""
        snaps, n = self.snaps, len(self.names)
        # map: the identity check of a thousand rows runs in C
        changed = np.flatnonzero(np.fromiter(map(operator.is_not, map(devices.__getitem__, self.names), snaps),
                                             bool, n)).tolist()
        self.write(changed, [devices[self.names[i]] for i in changed])

    def write(self, rows: list[int], snapshots: list[Snapshot | None]) -> None:
        """Work these rows out from these snapshots."""
        for i, s in zip(rows, snapshots, strict=True):
            self.snaps[i] = s
            self.has_snap[i] = s is not None
            if s is None:
                self.service[i], self.backlog[i], self.per_slot[i] = np.nan, 0.0, 0.0
                self.cold[i], self.free_npu[i], self.npu_ms[i] = False, False, np.inf
                continue
            service = _service_s(s)
            self.service[i] = np.nan if service is None else service
            self.backlog[i] = s.backlog_s
            self.per_slot[i] = s.queue_depth / max(s.cpu_slots, 1)
            self.cold[i] = _cold(s)
            self.free_npu[i] = s.has_npu and s.npu_free
            self.npu_ms[i] = s.p50_ms("npu")
        if rows:
            for (need, model, tools), mask in self._able.items():
                for i in rows:
                    s = self.snaps[i]
                    mask[i] = s is None or can_take(s, need, model, tools)

    def column(self, values: Mapping[str, float], missing: float) -> np.ndarray:
        """``values`` per row, ``missing`` where it has none."""
        if not values:
            return np.full(len(self.names), missing)
        return np.fromiter(map(values.get, self.names, repeat(missing, len(self.names))), float, len(self.names))

    def able(self, need: str, model: str | None, tools: bool) -> np.ndarray:
        """Which rows could take such a job by their metrics (none seen: could)."""
        key = (need, model, tools)
        mask = self._able.pop(key, None)
        if mask is None:
            mask = np.fromiter((s is None or can_take(s, need, model, tools) for s in self.snaps), bool,
                               len(self.snaps))
            while len(self._able) >= JOB_KINDS:  # a model name is the caller's: bounded
                del self._able[next(iter(self._able))]
        self._able[key] = mask  # the most recently asked last
        return mask


class Fleet(Protocol):
    """Where a kept view reads the devices' metrics (``agent.roster.Roster``)."""

    def feed(self) -> Changes: ...
    def rows(self, devices: Collection[str]) -> list[tuple[Snapshot | None, float | None]]: ...


class Rows:
    """The devices' rows for ``choose``, kept between choices, in one of two ways.

    ``table(devices)`` (``choose``'s ``rows``) works a device's row out again only when its
    snapshot is a new one (a new metrics message): a thousand devices cost an identity
    check each, not a dozen calls. ``sync(fleet, names)`` and ``known(memory, ...)``
    (``choose_kept``) go further: each source says which devices changed since the view
    last read it (``Changes``), and only those rows are read again, with when their metrics
    were sent and what the asker's memory says of them; nothing is done per device per
    auction. The two ways share no promise: ``table`` forgets the feeds. Not thread-safe:
    a caller that shares one holds its ``lock`` (see ``shared_rows``)."""

    def __init__(self) -> None:
        self._table: _Table | None = None
        self._names: frozenset[str] = frozenset()
        self._fleet: tuple[Fleet, Changes] | None = None
        self._memory: tuple[AskerMemory, Changes] | None = None
        self.lock = threading.Lock()  # held by a caller that shares one between threads
        self.keeper: Any = None       # what keeps it up to date between choices (agent.viewkeeper)

    def table(self, devices: Mapping[str, Snapshot | None]) -> _Table:
        self._fleet = self._memory = None
        self._reshape(frozenset(devices))
        assert self._table is not None
        self._table.update(devices)
        return self._table

    def current(self) -> _Table:
        """The table the last ``sync`` left."""
        if self._table is None:
            raise RuntimeError("Rows.current before Rows.sync")
        return self._table

    def _reshape(self, names: frozenset[str]) -> None:
        if self._table is None or (names is not self._names and names != self._names):  # the roster's own: same object
            self._table, self._names = _Table(sorted(names), self._table), names

    def sync(self, fleet: Fleet, names: frozenset[str]) -> _Table:
        """The rows of ``names`` as ``fleet`` has them now, reading only what changed."""
        if self._fleet is None or self._fleet[0] is not fleet:  # a new source: every row is read once
            self._fleet = (fleet, fleet.feed())
            self._table = None
        self._reshape(names)
        t = self.current()
        changed = self._fleet[1].take()
        read = sorted(i for d in (changed | t.fresh_metrics) if (i := t.index.get(d)) is not None)
        try:
            if read:
                got = fleet.rows([t.names[i] for i in read])
                t.write(read, [snapshot for snapshot, _ in got])
                t.sent[read] = [np.nan if sent is None else sent for _, sent in got]
        except BaseException:
            self._fleet = None  # what was taken is not read: the next sync reads every row
            raise
        t.fresh_metrics = set()
        return t

    def known(self, memory: AskerMemory, now: float, prompt_tokens: int, max_new_tokens: int) -> np.ndarray:
        """``memory.known_s(now, prompt_tokens, max_new_tokens)`` in the current table's row
        order (NaN: not known), reading only the devices it heard from or sent to since."""
        t = self.read(memory)
        return memory.price(t.m_values, now, prompt_tokens, max_new_tokens)

    def read(self, memory: AskerMemory) -> _Table:
        """Read into the current table what ``memory`` says of the devices it heard from or
        sent to since (``known`` does, and a caller may ahead of the next auction)."""
        t = self.current()
        if self._memory is None or self._memory[0] is not memory:
            self._memory = (memory, memory.feed())
            t.fresh_memory = set(t.names)
        read = sorted(i for d in (self._memory[1].take() | t.fresh_memory) if (i := t.index.get(d)) is not None)
        try:
            if read:
                t.m_values[read] = memory.rows([t.names[i] for i in read])
        except BaseException:
            self._memory = None  # as in ``sync``: every row again next time
            raise
        t.fresh_memory = set()
        return t


def _service_s(snapshot: Snapshot) -> float | None:
    """Its recent median CPU latency in seconds; None when it has run nothing yet."""
    p50 = snapshot.p50_ms("cpu")
    return None if p50 == math.inf else p50 / 1000


def _cold(snapshot: Snapshot) -> bool:
    """Whether the metrics say the CPU model is not loaded (no word on it: not cold)."""
    info = snapshot.models.get("cpu")
    return info is not None and not info.warm


@dataclass
class _Shape:
    """Discounted sums of the bids heard from one device: G = Σ γ^k x xᵀ, h = Σ γ^k s x with
    x = (1, prompt, budget) in hundreds of tokens and s the bid's service estimate."""

    G: list[list[float]]
    h: list[float]
    n: int = 0                                         # bids heard
    theta: tuple[float, float, float] | None = None   # solved lazily, once per new bid

    def add(self, gamma: float, prompt_tokens: int, max_new_tokens: int, service_s: float) -> None:
        x = (1.0, prompt_tokens / SHAPE_SCALE, max_new_tokens / SHAPE_SCALE)
        for i in range(3):
            self.h[i] = gamma * self.h[i] + service_s * x[i]
            for j in range(3):
                self.G[i][j] = gamma * self.G[i][j] + x[i] * x[j]
        self.n += 1
        self.theta = None

    def fitted(self) -> tuple[float, float, float] | None:
        """The coefficients, fitted once per new bid; None until ``SHAPE_MIN_BIDS``."""
        if self.n < SHAPE_MIN_BIDS:
            return None
        if self.theta is None:
            self.theta = _fit_nonneg(self.G, self.h)
        return self.theta


@dataclass
class _Heard:
    at: float            # when its last bid came
    free_at: float       # when a new CPU job would start there, as far as this asker knows
    service_s: float | None
    init_s: float        # start-up the next job pays (0 once this asker has sent it one)
    slots: int


class AskerMemory:
    """What this asker heard in bids and sent since, per device: fresher than the retained
    metrics (which every asker reads alike, up to ``metrics_interval_s`` old) and carrying
    the cold start a bid prices and metrics do not. Pure: the caller passes every time.

    ``known_s(now, prompt_tokens, max_new_tokens)`` is what ``choose`` takes as ``known_s``:
    for a device heard within ``max_age_s`` and with a service estimate, the wait its bid
    said, plus what this asker has sent it since (its promises spread over its slots), less
    the time gone by, plus its start-up and its service for a job of that size: from the
    shape fitted to its bids (``SHAPE_HALF_LIFE``) once ``SHAPE_MIN_BIDS`` were heard with
    their job's size, else its last bid's figure. ``startup_s()`` is each device's start-up as its last cold bid said
    (kept however old: it changes with the model, not with the load). At most ``limit``
    devices are kept, the least recently heard dropped first. Safe to share between threads
    (a daemon's trigger workers): see ``shared_memory``."""

    def __init__(self, max_age_s: float = 30.0, limit: int = 4096):
        if max_age_s <= 0 or limit < 1:
            raise ValueError("max_age_s must be > 0 and limit >= 1")
        self.max_age_s, self.limit = max_age_s, limit
        self._heard: dict[str, _Heard] = {}
        self._startup: dict[str, float] = {}
        self._shapes: dict[str, _Shape] = {}
        self._gamma = decay_for(SHAPE_HALF_LIFE)
        self._lock = threading.Lock()
        self._unfitted: set[str] = set()  # devices with a bid since their shape was last fitted
        self._feeds = Feeds(self._lock)  # kept views (Rows.known): who changed since they read

    def feed(self) -> Changes:
        """A new consumer's ``Changes``: every device heard, sent to or dropped from now on."""
        return self._feeds.open()

    def heard(self, device: str, at: float, *, backlog_s: float, service_s: float | None, init_s: float,
              slots: int, prompt_tokens: int | None = None, max_new_tokens: int | None = None) -> None:
        """A bid from ``device`` arrived at ``at``, for a job of ``prompt_tokens`` and
        ``max_new_tokens`` (given: its service estimate teaches the device's shape)."""
        with self._lock:
            self._heard_locked(device, at, backlog_s, service_s, init_s, slots)
            if service_s is not None and prompt_tokens is not None and max_new_tokens is not None:
                shape = self._shapes.pop(device, None) or _Shape([[0.0] * 3 for _ in range(3)], [0.0] * 3)
                shape.add(self._gamma, prompt_tokens, max_new_tokens, service_s)
                self._shapes[device] = shape
                self._unfitted.add(device)
                self._trim(self._shapes)

    def _heard_locked(self, device: str, at: float, backlog_s: float, service_s: float | None, init_s: float,
                      slots: int) -> None:
        self._heard.pop(device, None)
        self._heard[device] = _Heard(at, at + max(backlog_s, 0.0), service_s, max(init_s, 0.0), max(slots, 1))
        if init_s > 0:
            self._startup.pop(device, None)
            self._startup[device] = init_s
        self._feeds.touch(device)
        self._trim(self._heard)
        self._trim(self._startup)

    def _trim(self, store: dict[str, Any]) -> None:
        """Forget the least recently heard past ``limit`` (the lock held); kept views read them again."""
        while len(store) > self.limit:
            self._feeds.touch(dropped := next(iter(store)))
            del store[dropped]

    def sent(self, device: str, at: float, seconds: float) -> None:
        """This asker gave ``device`` a job it expects to take ``seconds`` there."""
        with self._lock:
            h = self._heard.get(device)
            if h is None:
                return
            h.free_at = max(h.free_at, at) + max(seconds, 0.0) / h.slots
            h.init_s = 0.0      # the model will be loaded by the time the next job starts
            self._feeds.touch(device)

    def known_s(self, now: float, prompt_tokens: int | None = None,
                max_new_tokens: int | None = None) -> dict[str, float]:
        sized = prompt_tokens is not None and max_new_tokens is not None
        with self._lock:
            names = list(self._heard)
            rows = self._rows_locked(names, shaped=sized)
        prices = self.price(np.array(rows, float).reshape(len(names), len(MEMORY_ROW)), now, prompt_tokens or 0,
                            max_new_tokens or 0)
        return {d: float(p) for d, p in zip(names, prices.tolist(), strict=True) if not math.isnan(p)}

    def startup_s(self) -> dict[str, float]:
        with self._lock:
            return dict(self._startup)

    def rows(self, devices: Collection[str]) -> list[tuple[float, ...]]:
        """What this memory says of each device (``MEMORY_ROW``), for ``price``."""
        with self._lock:
            return self._rows_locked(devices, shaped=True)

    def _rows_locked(self, devices: Collection[str], *, shaped: bool) -> list[tuple[float, ...]]:
        """``rows`` (the lock held); without ``shaped``, no shape: the last bid's figure."""
        nan = math.nan
        out = []
        for d in devices:
            h = self._heard.get(d)
            if h is None:
                out.append((nan,) * len(MEMORY_ROW))
                continue
            shape = self._shapes.get(d) if shaped else None
            theta = shape.fitted() if shape is not None else None
            a, b, c = (nan, nan, nan) if theta is None else theta
            out.append((h.at, h.free_at, nan if h.service_s is None else h.service_s, h.init_s, a, b, c))
        return out

    def price(self, rows: np.ndarray, now: float, prompt_tokens: int, max_new_tokens: int) -> np.ndarray:
        """What each device of ``rows`` (a row of ``rows()`` each) is expected to take for a
        job of this size (NaN: no figure), a column at a time; ``known_s`` as a mapping."""
        at, free_at, service, init, a, b, c = rows.T
        shaped = np.maximum(a + (b * prompt_tokens + c * max_new_tokens) / SHAPE_SCALE, MIN_SECONDS)
        out: np.ndarray = np.maximum(0.0, free_at - now) + np.where(np.isnan(a), service, shaped) + init
        out[np.isnan(service) | ~(now - at < self.max_age_s)] = np.nan
        return out

    def settle(self) -> None:
        """Fit the shapes that new bids left unfitted (otherwise fitted when first priced):
        called once an orchestration is over, it keeps the fits out of the next auction."""
        with self._lock:
            for device in self._unfitted:
                if (shape := self._shapes.get(device)) is not None:
                    shape.fitted()
            self._unfitted.clear()


_SHARED: dict[str, AskerMemory] = {}
_SHARED_ROWS: dict[tuple[str, Hashable], Rows] = {}
_SHARED_LOCK = threading.Lock()
SHARED_VIEWS = 4 * JOB_KINDS  # kept views per process, the least recently used dropped first


def shared_memory(key: str) -> AskerMemory:
    """One ``AskerMemory`` per ``key`` (a device's state directory) for this process: a daemon
    builds an orchestrator per trigger, and what one heard serves the next. A one-off
    ``trigger`` process without a daemon starts empty and goes by the metrics alone."""
    with _SHARED_LOCK:
        return _SHARED.setdefault(key, AskerMemory())


def shared_rows(key: str, kind: Hashable = None) -> Rows:
    """One ``Rows`` per ``key`` and job ``kind`` for this process, like ``shared_memory``: a
    daemon's orchestrators choose from the same view of the fleet, under its ``lock``. A
    view per kind (the model, need and tools that decide who bids): jobs of two kinds in
    turn would otherwise rebuild one view's table at every auction, their bidders being
    two sets (0.8 ms at N=1000). At most ``SHARED_VIEWS`` are kept."""
    with _SHARED_LOCK:
        rows = _SHARED_ROWS.pop((key, kind), None) or Rows()
        _SHARED_ROWS[(key, kind)] = rows  # the most recently used last
        while len(_SHARED_ROWS) > SHARED_VIEWS:
            del _SHARED_ROWS[next(iter(_SHARED_ROWS))]
        return rows
