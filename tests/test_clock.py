"""How old a message is, without trusting another device's wall clock."""

from __future__ import annotations

import math

import pytest

from agent.clock import SKEW_WARN_S, WARN_AFTER, ClockOffsets


def test_the_offset_is_the_smallest_sample_since_network_delay_only_adds() -> None:
    offsets = ClockOffsets()
    assert offsets.offset("b") is None
    for delay in (0.30, 0.05, 0.20):
        offsets.observe("b", 1000.0, 1000.0 + 10.0 + delay)  # b is 10 s behind us
    assert offsets.offset("b") == pytest.approx(10.05)


def test_skew_is_reported_once_after_a_few_samples_agree() -> None:
    offsets = ClockOffsets()
    far = SKEW_WARN_S + 5
    said = [offsets.observe("b", 1000.0, 1000.0 + far) for _ in range(WARN_AFTER + 2)]
    assert said[:WARN_AFTER - 1] == [None] * (WARN_AFTER - 1), "one held-up message is not skew"
    assert said[WARN_AFTER - 1] == pytest.approx(far)
    assert said[WARN_AFTER:] == [None, None], "once per device"
    assert offsets.observe("b", 0.0, 5.0) is None and offsets.observe("b", float("nan"), 5.0) is None


def test_age_prefers_the_broker_expiry_then_the_corrected_clock_then_fresh() -> None:
    offsets = ClockOffsets()
    assert offsets.age("b", 900.0, 1000.0) == 0.0, "no offset known: taken as fresh"
    offsets.observe("b", 1000.0, 1120.0)  # b is 120 s behind
    assert offsets.age("b", 1000.0, 1123.0) == pytest.approx(3.0), "its clock, corrected"
    assert offsets.age("b", 0.0, 1123.0) == 0.0, "no timestamp: fresh"
    assert offsets.age("b", 1010.0, 1123.0) == 0.0, "never negative"
    assert offsets.age("b", 1000.0, 1123.0, expiry_set=30, expiry_left=26) == 4.0, "the broker's count first"


def test_one_message_held_up_in_a_broker_is_not_skew() -> None:
    offsets = ClockOffsets()
    said = [offsets.observe("b", 1000.0, 1000.0 + late) for late in (0.01, 0.02, 5.0, 0.01)]
    assert said == [None] * 4, "network and broker delay only ever add: the smallest sample is the clock"


def test_a_retained_message_whose_age_cannot_be_told_is_never_fresh() -> None:
    offsets = ClockOffsets()
    assert offsets.age("b", 900.0, 1000.0, retained=True) == math.inf, "no offset known"
    assert offsets.age("b", 0.0, 1000.0, retained=True) == math.inf, "no timestamp"
    offsets.observe("b", 1000.0, 1120.0)
    assert offsets.age("b", 1000.0, 1123.0, retained=True) == pytest.approx(3.0), "its clock, corrected"
    assert offsets.age("b", 1000.0, 1123.0, expiry_set=30, expiry_left=26, retained=True) == 4.0
