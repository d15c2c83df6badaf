"""The bus's connection policy: what to try next, how long to wait, when to give up.

Theory of operation. ``step(link, event, now)`` is the whole policy, without sockets,
threads or a clock of its own: ``agent.bus`` feeds it what happened to its connection
and does what the returned action says. ``link`` is a frozen ``Link``; ``now`` is a
monotonic time and every random draw (``jitter`` in [0, 1)) arrives in the event, so a
test drives it with a fake clock and fixed draws.

Phases, and the events each one takes (``TABLE``; any other pair is a bug in the shell
and raises ``IllegalTransition`` naming both)::

    IDLE ──Begin──▶ TRYING ──AttemptFailed──▶ TRYING (next protocol or address)
                      │                     └▶ WAITING ──Begin──▶ TRYING (next round)
                      └──Connected──▶ UP ──Dropped──▶ DOWN ──Connected──▶ UP
                                          │            └─ReconnectFailed─▶ DOWN (maybe Retarget)
                                          └─Dropped─▶ GAVE_UP (another node is us; absorbs all)

and a few the threads make possible: a CONNACK that arrives in any phase (the attempt
timed out a moment before) is UP; an attempt that connected and was lost before the
connector looked is a failed attempt in UP or DOWN; paho's retries of a client the
round is replacing (ReconnectFailed in TRYING or WAITING) change nothing.

Rules, each one a line of code below:

- a round tries the addresses in order (primary, then ``broker.failover``), each at most
  once per protocol, until the round's deadline;
- with ``protocol: auto``, a broker that refuses MQTT 5 by name (CONNACK 132; 3.1.1
  return code 1) or hangs up on its CONNECT is asked again at once in 3.1.1, and every
  later attempt uses 3.1.1;
- a round that ends without a connection waits ``first_connect_delay`` (the first
  connection: a broker that is not up yet, so knock often) before the next one;
- once connected, paho reconnects by itself; after two of its failed retries at one
  address (nobody listening, or a broker that hung up or refused) the next address is
  used (round robin);
- after a drop the first retry comes quickly, with jitter, so a restarted broker is in
  use again at once without the whole fleet arriving in the same millisecond;
- a node that has never held a connection past ``FLAP_WINDOW_S`` gives up its identity
  when the broker hands it to another connection (MQTT 5 reason 142) or drops it right
  after connecting ``FLAP_LIMIT`` times in a row (3.1.1); an established node never
  does (``identity_verdict``).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

RECONNECT_FIRST_S = (0.05, 0.3)   # first retry after a drop: uniformly in this range
SESSION_TAKEN_OVER = 142           # MQTT 5 DISCONNECT reason code
UNSUPPORTED_PROTOCOL = (132, 1)    # MQTT 5 CONNACK reason code; 3.1.1 return code
FLAP_WINDOW_S = 2.0                # dropped this soon after a connect ...
FLAP_LIMIT = 4                     # ... this many times in a row: someone else has our client id
# Until the first connection a refused attempt costs nothing (the broker is simply not up
# yet: a board that boots before it, after a power cut), so try often: a broker that
# appears is in use within a second.
FIRST_CONNECT_MAX_S = 1.0
RETARGET_AFTER = 2                 # paho's failed reconnects at one address before the next


class Failure(enum.Enum):
    """Why one connect attempt did not give a connection, from what the attempt returned."""

    UNREACHABLE = "unreachable"        # no TCP connection: refused, unresolvable, timed out
    NO_ANSWER = "no answer"            # connected, but no CONNACK in time
    HUNG_UP = "hung up"                # closed before any CONNACK (RabbitMQ to an MQTT 5 CONNECT)
    OLD_PROTOCOL = "unsupported protocol"  # CONNACK: unsupported protocol version
    REFUSED = "refused"                # any other CONNACK failure (credentials, not authorised)
    DROPPED = "dropped"                # CONNACK success, then gone before the attempt ended

    @property
    def refused(self) -> bool:
        """The broker was reached and said no (as opposed to not being reached)."""
        return self in (Failure.HUNG_UP, Failure.OLD_PROTOCOL, Failure.REFUSED)


def connack_failure(code: int) -> Failure:
    """The failure a refusing CONNACK's reason (MQTT 5) or return code (3.1.1) means."""
    return Failure.OLD_PROTOCOL if code in UNSUPPORTED_PROTOCOL else Failure.REFUSED


class Phase(enum.Enum):
    IDLE = "idle"          # nothing tried yet
    TRYING = "trying"      # a round of attempts is under way (the first connection, or connect())
    WAITING = "waiting"    # a round ended without a connection; the next one comes after a wait
    UP = "up"
    DOWN = "down"          # was up; paho is reconnecting by itself
    GAVE_UP = "gave up"    # another live node holds our identity: never reconnect


@dataclass(frozen=True)
class Link:
    """Everything the policy remembers about one bus's connection."""

    addresses: int                 # broker addresses, primary first (at least one)
    auto: bool                     # broker.protocol auto: MQTT 5 may fall back to 3.1.1
    protocol: str = "5"            # "5" | "3.1.1": what the next attempt speaks
    reconnect_max_s: float = 5.0   # the longest paho waits between its own retries
    phase: Phase = Phase.IDLE
    address: int = 0               # index into the addresses
    deadline: float = math.inf     # end of the current round
    rounds: int = 0                # rounds that ended without a connection (the backoff exponent)
    failures_here: int = 0         # paho's failed reconnects at this address
    connected_at: float = 0.0
    flaps: int = 0                 # drops in a row right after connecting
    established: bool = False      # has held a connection past FLAP_WINDOW_S

    @classmethod
    def initial(cls, addresses: int, protocol: str, reconnect_max_s: float = 5.0) -> Link:
        """A link for ``broker.protocol`` ``protocol`` (auto | 5 | 3.1.1)."""
        if addresses < 1:
            raise ValueError("a bus needs at least one broker address")
        return cls(addresses=addresses, auto=protocol == "auto",
                   protocol="5" if protocol in ("auto", "5") else "3.1.1", reconnect_max_s=reconnect_max_s)


# Events ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Begin:
    """Start a round of attempts that must end by ``deadline``."""

    deadline: float = math.inf


@dataclass(frozen=True)
class AttemptFailed:
    """The attempt the last ``Try`` asked for did not connect."""

    failure: Failure
    jitter: float = 0.5


@dataclass(frozen=True)
class Connected:
    """A CONNACK that accepted us."""


@dataclass(frozen=True)
class ReconnectFailed:
    """paho's own reconnect (after a drop) gave no connection: not reached, or turned away."""


@dataclass(frozen=True)
class Dropped:
    """A connection we held is gone; ``taken_over``: the broker said another took our session."""

    taken_over: bool = False
    jitter: float = 0.5


Event = Begin | AttemptFailed | Connected | ReconnectFailed | Dropped


# Actions --------------------------------------------------------------------------
@dataclass(frozen=True)
class Nothing:
    pass


@dataclass(frozen=True)
class Try:
    """Attempt a connection to address ``address`` in ``protocol``; ``fell_back``: the
    broker just refused MQTT 5, so this is the first 3.1.1 attempt."""

    address: int
    protocol: str
    fell_back: bool = False


@dataclass(frozen=True)
class Wait:
    """The round is over without a connection: the next one starts ``seconds`` from now."""

    seconds: float


@dataclass(frozen=True)
class Retarget:
    """Point paho's own reconnects at address ``address``."""

    address: int


@dataclass(frozen=True)
class Reconnect:
    """paho's retries after this drop: the first after ``first_s``, backing off to ``max_s``."""

    first_s: float
    max_s: float


@dataclass(frozen=True)
class GiveUp:
    """Another live node has our identity; ``taken_over`` says how we know (else flaps)."""

    taken_over: bool
    flaps: int


@dataclass(frozen=True)
class Stop:
    """We gave up our identity: the attempt in progress is the last one."""


Action = Nothing | Try | Wait | Retarget | Reconnect | GiveUp | Stop


class IllegalTransition(Exception):
    """An event the policy cannot take in its phase: a bug in the shell that fed it."""

    def __init__(self, phase: Phase, event: Event):
        super().__init__(f"connection policy: {type(event).__name__} in phase {phase.value}")
        self.phase = phase
        self.event = event


# The table ------------------------------------------------------------------------
def _begin(link: Link, event: Event, now: float) -> tuple[Link, Action]:
    assert isinstance(event, Begin)
    link = replace(link, phase=Phase.TRYING, address=0, deadline=event.deadline)
    return link, Try(0, link.protocol)


def _attempt_failed(link: Link, event: Event, now: float) -> tuple[Link, Action]:
    # Also taken while UP or DOWN: a connection made (and maybe lost) inside the attempt
    # after the shell had stopped waiting for it; the shell has torn that client down.
    assert isinstance(event, AttemptFailed)
    # Each address at most once per protocol: the fallback happens once, the addresses
    # only move forward, so a round is at most addresses + 1 attempts.
    link = replace(link, phase=Phase.TRYING)
    if now < link.deadline:
        if link.auto and link.protocol == "5" and event.failure in (Failure.OLD_PROTOCOL, Failure.HUNG_UP):
            return replace(link, protocol="3.1.1"), Try(link.address, "3.1.1", fell_back=True)
        if link.address + 1 < link.addresses:
            return replace(link, address=link.address + 1), Try(link.address + 1, link.protocol)
    return replace(link, phase=Phase.WAITING, rounds=link.rounds + 1), \
        Wait(first_connect_delay(link.rounds, event.jitter))


def _connected(link: Link, event: Event, now: float) -> tuple[Link, Action]:
    return replace(link, phase=Phase.UP, connected_at=now, failures_here=0), Nothing()


def _reconnect_failed(link: Link, event: Event, now: float) -> tuple[Link, Action]:
    failures = link.failures_here + 1
    if link.addresses > 1 and failures >= RETARGET_AFTER:
        address = (link.address + 1) % link.addresses
        return replace(link, address=address, failures_here=0), Retarget(address)
    return replace(link, failures_here=failures), Nothing()


def _ignored_reconnect_failure(link: Link, event: Event, now: float) -> tuple[Link, Action]:
    # paho retrying, in the background, a client the current round is about to replace.
    return link, Nothing()


def _dropped(link: Link, event: Event, now: float) -> tuple[Link, Action]:
    assert isinstance(event, Dropped)
    verdict, flaps, established = identity_verdict(
        taken_over=event.taken_over, held_s=now - link.connected_at, flaps=link.flaps, established=link.established)
    if verdict == "give_up":
        return replace(link, phase=Phase.GAVE_UP, flaps=flaps, established=established), \
            GiveUp(event.taken_over, flaps)
    first = RECONNECT_FIRST_S[0] + event.jitter * (RECONNECT_FIRST_S[1] - RECONNECT_FIRST_S[0])
    return replace(link, phase=Phase.DOWN, flaps=flaps, established=established), \
        Reconnect(first, link.reconnect_max_s)


def _gave_up(link: Link, event: Event, now: float) -> tuple[Link, Action]:
    return link, Stop()


def _after_giving_up(link: Link, event: Event, now: float) -> tuple[Link, Action]:
    return link, Nothing()


_Rule = Callable[[Link, Event, float], tuple[Link, Action]]
TABLE: dict[tuple[Phase, type], _Rule] = {
    (Phase.IDLE, Begin): _begin,
    (Phase.WAITING, Begin): _begin,
    (Phase.TRYING, Begin): _begin,       # a round abandoned (stop, an unexpected error) starts over
    (Phase.TRYING, AttemptFailed): _attempt_failed,
    (Phase.UP, AttemptFailed): _attempt_failed,
    (Phase.DOWN, AttemptFailed): _attempt_failed,
    (Phase.IDLE, Connected): _connected,
    (Phase.TRYING, Connected): _connected,
    (Phase.WAITING, Connected): _connected,
    (Phase.DOWN, Connected): _connected,
    (Phase.UP, Connected): _connected,   # a drop the shell did not report (its own teardown)
    (Phase.DOWN, ReconnectFailed): _reconnect_failed,
    (Phase.TRYING, ReconnectFailed): _ignored_reconnect_failure,
    (Phase.WAITING, ReconnectFailed): _ignored_reconnect_failure,
    (Phase.UP, Dropped): _dropped,
    (Phase.GAVE_UP, Begin): _gave_up,
    (Phase.GAVE_UP, AttemptFailed): _gave_up,
    (Phase.GAVE_UP, Connected): _after_giving_up,
    (Phase.GAVE_UP, ReconnectFailed): _after_giving_up,
    (Phase.GAVE_UP, Dropped): _after_giving_up,
}


def step(link: Link, event: Event, now: float) -> tuple[Link, Action]:
    """The next state of ``link`` after ``event`` at monotonic time ``now``, and what to do."""
    rule = TABLE.get((link.phase, type(event)))
    if rule is None:
        raise IllegalTransition(link.phase, event)
    return rule(link, event, now)


# The rules the table uses, also used on their own ------------------------------------
def identity_verdict(*, taken_over: bool, held_s: float, flaps: int, established: bool) -> tuple[str, int, bool]:
    """After a disconnect: ``give_up`` (another live node is this device) or ``reconnect``;
    then the count of quick drops in a row and whether this node is established.

    Two processes with one client id see the same disconnects, so a symmetric rule lets
    either lose, and the one that loses may be the device that had run for weeks (its unit
    does not restart on exit 2). So only a newcomer gives up: a node that has never held a
    connection longer than FLAP_WINDOW_S. An established node reconnects, which takes the
    identity back, and the newcomer is then the one dropped. ``taken_over``: the broker
    said another connection took our session (MQTT 5); with MQTT 3.1.1 the only sign is
    being dropped right after connecting, FLAP_LIMIT times in a row.
    """
    quick = held_s < FLAP_WINDOW_S
    established = established or not quick
    flaps = flaps + 1 if quick else 0
    if not established and (taken_over or flaps >= FLAP_LIMIT):
        return "give_up", flaps, established
    return "reconnect", flaps, established


def first_connect_delay(attempt: int, u: float) -> float:
    """Wait before connect attempt ``attempt + 1`` when none has succeeded yet: doubling
    from the first reconnect delay up to FIRST_CONNECT_MAX_S, jittered by ``u`` in [0, 1)
    so that a fleet powered on together does not knock in step."""
    ceiling: float = min(RECONNECT_FIRST_S[1] * 2.0 ** min(attempt, 16), FIRST_CONNECT_MAX_S)
    return (0.5 + 0.5 * u) * ceiling
