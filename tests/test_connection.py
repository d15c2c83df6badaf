"""The bus's connection policy, one transition at a time, on a fake clock (no broker)."""

from __future__ import annotations

import itertools
import math

import pytest

from agent.connection import (
    FLAP_LIMIT,
    FLAP_WINDOW_S,
    RECONNECT_FIRST_S,
    TABLE,
    AttemptFailed,
    Begin,
    Connected,
    Dropped,
    Event,
    Failure,
    GiveUp,
    IllegalTransition,
    Link,
    Nothing,
    Phase,
    Reconnect,
    ReconnectFailed,
    Retarget,
    Stop,
    Try,
    Wait,
    connack_failure,
    first_connect_delay,
    step,
)

T0 = 1000.0  # the fake clock's start: any monotonic value


def trying(addresses: int = 1, protocol: str = "auto", deadline: float = math.inf) -> Link:
    link, action = step(Link.initial(addresses, protocol), Begin(deadline), T0)
    assert action == Try(0, "3.1.1" if protocol == "3.1.1" else "5")
    return link


def up(addresses: int = 1, at: float = T0, **fields: object) -> Link:
    link, _ = step(trying(addresses), Connected(), at)
    return Link(**{**link.__dict__, **fields})  # type: ignore[arg-type]


# --------------------------------------------------------------------- the start

@pytest.mark.parametrize("protocol,speaks,auto", [("auto", "5", True), ("5", "5", False), ("3.1.1", "3.1.1", False)])
def test_the_configured_protocol_sets_the_first_attempt_and_whether_it_may_fall_back(
        protocol: str, speaks: str, auto: bool) -> None:
    link = Link.initial(2, protocol)
    assert (link.protocol, link.auto, link.phase) == (speaks, auto, Phase.IDLE)


def test_a_bus_without_an_address_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Link.initial(0, "auto")


def test_a_round_begins_at_the_primary_address_whatever_the_last_one_reached() -> None:
    link = Link(addresses=3, auto=False, phase=Phase.WAITING, address=2)
    link, action = step(link, Begin(T0 + 5), T0)
    assert action == Try(0, "5")
    assert (link.phase, link.address, link.deadline) == (Phase.TRYING, 0, T0 + 5)


# --------------------------------------------------------------------- a round of attempts

def test_an_unreachable_primary_moves_on_to_each_failover_address_then_waits() -> None:
    link = trying(addresses=3)
    link, action = step(link, AttemptFailed(Failure.UNREACHABLE), T0)
    assert action == Try(1, "5") and link.address == 1
    link, action = step(link, AttemptFailed(Failure.NO_ANSWER), T0)
    assert action == Try(2, "5")
    link, action = step(link, AttemptFailed(Failure.REFUSED, jitter=0.25), T0)
    assert action == Wait(first_connect_delay(0, 0.25))
    assert (link.phase, link.rounds) == (Phase.WAITING, 1)


def test_each_round_without_a_connection_waits_longer_up_to_the_cap() -> None:
    link, waits = trying(), []
    for _ in range(6):
        link, action = step(link, AttemptFailed(Failure.UNREACHABLE, jitter=0.0), T0)
        link, action2 = step(link, AttemptFailed(Failure.UNREACHABLE, jitter=0.0), T0) \
            if isinstance(action, Try) else (link, action)
        assert isinstance(action2, Wait)
        waits.append(action2.seconds)
        link, _ = step(link, Begin(), T0)
    assert waits == [first_connect_delay(n, 0.0) for n in range(6)]
    assert waits[0] < waits[2] and waits[-1] == waits[-2], "backs off, then holds at FIRST_CONNECT_MAX_S"


@pytest.mark.parametrize("failure", [Failure.OLD_PROTOCOL, Failure.HUNG_UP])
def test_with_auto_a_broker_that_refuses_mqtt_5_is_asked_again_at_once_in_311(failure: Failure) -> None:
    link, action = step(trying(addresses=2), AttemptFailed(failure), T0)
    assert action == Try(0, "3.1.1", fell_back=True), "same address, other protocol"
    assert link.protocol == "3.1.1"
    link, action = step(link, AttemptFailed(Failure.UNREACHABLE), T0)
    assert action == Try(1, "3.1.1"), "the next address in 3.1.1 too: no second fallback"
    link, action = step(link, AttemptFailed(Failure.UNREACHABLE), T0)
    assert isinstance(action, Wait)
    link, action = step(link, Begin(), T0)
    assert action == Try(0, "3.1.1"), "the next round starts in 3.1.1"


@pytest.mark.parametrize("failure", [Failure.UNREACHABLE, Failure.NO_ANSWER, Failure.REFUSED, Failure.DROPPED])
def test_no_fallback_for_a_failure_that_says_nothing_about_the_protocol(failure: Failure) -> None:
    link, action = step(trying(addresses=1), AttemptFailed(failure), T0)
    assert isinstance(action, Wait) and link.protocol == "5"


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_no_fallback_when_the_protocol_is_configured(protocol: str) -> None:
    link, action = step(trying(protocol=protocol), AttemptFailed(Failure.OLD_PROTOCOL), T0)
    assert isinstance(action, Wait) and link.protocol == protocol


def test_the_round_ends_at_its_deadline_even_with_addresses_left() -> None:
    link = trying(addresses=3, deadline=T0 + 5)
    _, action = step(link, AttemptFailed(Failure.UNREACHABLE), T0 + 4.9)
    assert action == Try(1, "5")
    _, action = step(link, AttemptFailed(Failure.UNREACHABLE), T0 + 5)
    assert isinstance(action, Wait)


def test_a_round_tries_each_address_at_most_once_per_protocol() -> None:
    link, tries = trying(addresses=2), [Try(0, "5")]
    while True:
        link, action = step(link, AttemptFailed(Failure.OLD_PROTOCOL), T0)
        if not isinstance(action, Try):
            break
        tries.append(action)
    assert tries == [Try(0, "5"), Try(0, "3.1.1", fell_back=True), Try(1, "3.1.1")]


@pytest.mark.parametrize("phase", [Phase.UP, Phase.DOWN])
def test_a_connection_made_and_lost_inside_an_abandoned_attempt_is_a_failed_attempt(phase: Phase) -> None:
    link = Link(**{**trying(addresses=2).__dict__, "phase": phase})
    link, action = step(link, AttemptFailed(Failure.DROPPED), T0)
    assert action == Try(1, "5") and link.phase is Phase.TRYING


def test_an_abandoned_round_can_begin_again() -> None:
    link = trying(addresses=2)
    link, _ = step(link, AttemptFailed(Failure.UNREACHABLE), T0)
    link, action = step(link, Begin(), T0)
    assert action == Try(0, "5") and link.address == 0


# --------------------------------------------------------------------- connected, dropped, back

@pytest.mark.parametrize("phase", [Phase.IDLE, Phase.TRYING, Phase.WAITING, Phase.DOWN, Phase.UP])
def test_a_connack_that_accepts_us_means_up_whatever_we_were_doing(phase: Phase) -> None:
    link = Link(addresses=2, auto=True, phase=phase, failures_here=1)
    link, action = step(link, Connected(), T0 + 7)
    assert action == Nothing()
    assert (link.phase, link.connected_at, link.failures_here) == (Phase.UP, T0 + 7, 0)


def test_a_drop_after_a_long_connection_reconnects_quickly_with_jitter() -> None:
    link = up(at=T0)
    down, action = step(link, Dropped(jitter=0.0), T0 + 60)
    assert action == Reconnect(RECONNECT_FIRST_S[0], link.reconnect_max_s)
    assert (down.phase, down.established, down.flaps) == (Phase.DOWN, True, 0)
    _, action = step(link, Dropped(jitter=1.0), T0 + 60)
    assert action == Reconnect(pytest.approx(RECONNECT_FIRST_S[1]), link.reconnect_max_s)  # type: ignore[arg-type]


def test_a_newcomer_whose_session_is_taken_over_gives_up_and_stays_given_up() -> None:
    link, action = step(up(at=T0), Dropped(taken_over=True), T0 + 0.2)
    assert action == GiveUp(taken_over=True, flaps=1) and link.phase is Phase.GAVE_UP
    for event in (Begin(), AttemptFailed(Failure.UNREACHABLE)):
        assert step(link, event, T0 + 1) == (link, Stop()), "the connector stops"
    for event in (Connected(), ReconnectFailed(), Dropped()):
        assert step(link, event, T0 + 1) == (link, Nothing())


def test_an_established_node_whose_session_is_taken_over_takes_it_back() -> None:
    link, action = step(up(at=T0, established=True), Dropped(taken_over=True), T0 + 0.2)
    assert isinstance(action, Reconnect) and link.phase is Phase.DOWN


def test_on_311_a_newcomer_dropped_right_after_each_connect_gives_up_after_the_flap_limit() -> None:
    link, now, actions = trying(), T0, []
    for _ in range(FLAP_LIMIT):
        link, _ = step(link, Connected(), now)
        now += FLAP_WINDOW_S / 4
        link, action = step(link, Dropped(), now)
        actions.append(type(action))
        now += 0.1
    assert actions == [Reconnect] * (FLAP_LIMIT - 1) + [GiveUp]


def test_a_connection_held_past_the_flap_window_resets_the_count() -> None:
    link = up(at=T0, flaps=FLAP_LIMIT - 1)
    link, action = step(link, Dropped(), T0 + FLAP_WINDOW_S)
    assert isinstance(action, Reconnect) and (link.flaps, link.established) == (0, True)


def test_with_one_address_paho_keeps_retrying_it() -> None:
    link = Link(addresses=1, auto=True, phase=Phase.DOWN)
    for n in range(1, 5):
        link, action = step(link, ReconnectFailed(), T0)
        assert action == Nothing() and link.failures_here == n


def test_after_two_failed_reconnects_paho_is_aimed_at_the_next_address_round_robin() -> None:
    link = Link(addresses=2, auto=True, phase=Phase.DOWN)
    link, action = step(link, ReconnectFailed(), T0)
    assert action == Nothing() and link.failures_here == 1
    link, action = step(link, ReconnectFailed(), T0)
    assert action == Retarget(1) and (link.address, link.failures_here) == (1, 0)
    for _ in range(2):
        link, action = step(link, ReconnectFailed(), T0)
    assert action == Retarget(0), "back to the primary"


@pytest.mark.parametrize("phase", [Phase.TRYING, Phase.WAITING])
def test_paho_retrying_a_client_the_round_will_replace_changes_nothing(phase: Phase) -> None:
    link = Link(addresses=2, auto=True, phase=phase, failures_here=1)
    assert step(link, ReconnectFailed(), T0) == (link, Nothing())


# --------------------------------------------------------------------- the table itself

EVENTS: list[Event] = [Begin(), AttemptFailed(Failure.UNREACHABLE), Connected(), ReconnectFailed(), Dropped()]


@pytest.mark.parametrize("phase,event", list(itertools.product(Phase, EVENTS)))
def test_every_pair_is_a_rule_or_an_error_naming_both(phase: Phase, event: Event) -> None:
    link = Link(addresses=2, auto=True, phase=phase)
    if (phase, type(event)) in TABLE:
        new, _ = step(link, event, T0)
        assert isinstance(new, Link)
    else:
        with pytest.raises(IllegalTransition) as raised:
            step(link, event, T0)
        assert type(event).__name__ in str(raised.value) and phase.value in str(raised.value)


def test_the_illegal_pairs_are_exactly_the_impossible_ones() -> None:
    illegal = {(p, type(e)) for p, e in itertools.product(Phase, EVENTS)} - set(TABLE)
    assert illegal == {
        (Phase.UP, Begin), (Phase.DOWN, Begin),                     # a round only before the first connection
        (Phase.IDLE, AttemptFailed), (Phase.WAITING, AttemptFailed),  # no round open
        (Phase.UP, ReconnectFailed), (Phase.IDLE, ReconnectFailed),
        (Phase.IDLE, Dropped), (Phase.TRYING, Dropped), (Phase.WAITING, Dropped), (Phase.DOWN, Dropped),
    }


# --------------------------------------------------------------------- typed failures

@pytest.mark.parametrize("code,failure", [(132, Failure.OLD_PROTOCOL), (1, Failure.OLD_PROTOCOL),
                                          (135, Failure.REFUSED), (5, Failure.REFUSED), (136, Failure.REFUSED)])
def test_a_refusing_connack_is_typed_by_its_code(code: int, failure: Failure) -> None:
    assert connack_failure(code) is failure


def test_refused_means_reached_and_told_no() -> None:
    assert {f for f in Failure if f.refused} == {Failure.HUNG_UP, Failure.OLD_PROTOCOL, Failure.REFUSED}


def test_the_numbers_are_the_ones_the_protocol_and_the_docs_give() -> None:
    """The rest of this file is written in the names; these are the values behind them:
    MQTT 5's reason codes, and what docs/architecture.md's table and README promise."""
    from agent import connection
    assert connection.SESSION_TAKEN_OVER == 0x8E, "MQTT 5: session taken over"
    assert connection.UNSUPPORTED_PROTOCOL == (0x84, 1), "MQTT 5 CONNACK 0x84; 3.1.1 return code 1"
    assert (FLAP_WINDOW_S, FLAP_LIMIT) == (2.0, 4), "a newcomer: never held 2 s; dropped quickly 4 times"
    assert RECONNECT_FIRST_S == (0.05, 0.3) and connection.FIRST_CONNECT_MAX_S == 1.0
    assert connection.RETARGET_AFTER == 2, "twice at one address, then the next"


def test_only_the_fallback_attempt_says_it_fell_back() -> None:
    link, action = step(Link.initial(2, "auto"), Begin(), T0)
    assert isinstance(action, Try) and action.fell_back is False
    link, action = step(link, AttemptFailed(Failure.UNREACHABLE), T0)
    assert action == Try(1, "5") and action.fell_back is False, "the next address is no fallback"
    link, action = step(link, AttemptFailed(Failure.OLD_PROTOCOL), T0)
    assert isinstance(action, Try) and action.fell_back is True


def test_links_events_and_actions_cannot_be_changed_in_place() -> None:
    """A step returns a new link; nothing another thread holds changes under it."""
    import dataclasses
    for value in (Link.initial(1, "5"), Begin(), AttemptFailed(Failure.REFUSED), Connected(), ReconnectFailed(),
                  Dropped(), Nothing(), Try(0, "5"), Wait(1.0), Retarget(0), Reconnect(0.1, 5.0),
                  GiveUp(False, 4), Stop()):
        field = next(iter(f.name for f in dataclasses.fields(value)), "anything")
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(value, field, None)


def test_with_three_addresses_paho_is_aimed_at_each_in_turn() -> None:
    link = step(up(addresses=3), Dropped(), T0 + 60)[0]
    aimed = []
    for _ in range(6):
        link, action = step(link, ReconnectFailed(), T0 + 61)
        if isinstance(action, Retarget):
            aimed.append(action.address)
    assert aimed == [1, 2, 0]


def test_the_wait_between_first_rounds_is_jittered_up_from_half_the_ceiling() -> None:
    assert first_connect_delay(0, 0.0) == pytest.approx(RECONNECT_FIRST_S[1] / 2)
    assert first_connect_delay(0, 0.5) == pytest.approx(RECONNECT_FIRST_S[1] * 0.75)
    assert first_connect_delay(0, 1.0) == pytest.approx(RECONNECT_FIRST_S[1])
