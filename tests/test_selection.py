from __future__ import annotations

import numpy as np
import pytest

from agent.linucb import Arm, features
from agent.messages import LatencySummary, Snapshot
from agent.selection import Offer, select


def snap(*, npu: bool | None = None, cpu: int = 1, npu_p50: float | None = None,
         cpu_p50: float | None = None) -> Snapshot:
    recent = {}
    if npu_p50 is not None:
        recent["npu"] = LatencySummary(n=3, p50_ms=npu_p50)
    if cpu_p50 is not None:
        recent["cpu"] = LatencySummary(n=3, p50_ms=cpu_p50)
    return Snapshot(has_npu=npu is not None, npu_free=bool(npu), cpu_slots=cpu, cpu_percent=10.0,
                    mem_available_mb=8000.0, load1=0.1, queue_depth=0, recent=recent)


KW = dict(prompt_tokens=100, max_new_tokens=100, alpha=0.2, lam=1.0)


def trained(device_latency: float, n: int = 20) -> Arm:
    x = features(snap(), 100, 100)
    arm = Arm.fresh(1.0)
    for _ in range(n):
        arm = arm.updated(x, device_latency)
    return arm


def test_free_peer_npu_wins_over_any_cpu() -> None:
    offers = [Offer("cpu-a", snap()), Offer("npu-b", snap(npu=True, cpu=0)),
              Offer("me", snap(), is_self=True)]
    d = select(offers, {"cpu-a": trained(0.01)}, **KW)
    assert d.winner is not None and (d.winner.device, d.winner.mode) == ("npu-b", "npu")
    assert [c.device for c in d.ranking[1:]] and all(c.mode == "cpu" for c in d.ranking[1:])


def test_busy_npu_is_not_an_npu_candidate_but_can_run_cpu() -> None:
    d = select([Offer("npu-b", snap(npu=False, cpu=1))], {}, **KW)
    assert [(c.device, c.mode) for c in d.ranking] == [("npu-b", "cpu")]


def test_among_free_npus_lower_recent_latency_then_id_wins() -> None:
    offers = [Offer("b", snap(npu=True, npu_p50=900)), Offer("c", snap(npu=True, npu_p50=300)),
              Offer("a", snap(npu=True)), Offer("d", snap(npu=True, npu_p50=300))]
    d = select(offers, {}, **KW, need="npu")
    assert [c.device for c in d.ranking] == ["c", "d", "b", "a"]


def test_need_npu_never_falls_back_to_cpu() -> None:
    d = select([Offer("cpu-a", snap())], {}, **KW, need="npu")
    assert d.winner is None


def test_lowest_linucb_score_wins_and_self_is_a_candidate() -> None:
    offers = [Offer("slow", snap()), Offer("me", snap(), is_self=True), Offer("fast", snap())]
    arms = {"slow": trained(3.0), "me": trained(1.5), "fast": trained(0.5)}
    d = select(offers, arms, **KW)
    assert [c.device for c in d.ranking] == ["fast", "me", "slow"]
    assert d.ranking[1].is_self
    x = np.array(d.ranking[0].x)
    mean, width = arms["fast"].predict(x)
    assert d.ranking[0].score == max(mean - 0.2 * width, 0.0)


def test_untrained_arm_uses_advertised_latency_as_prior() -> None:
    offers = [Offer("known", snap()), Offer("new-slow", snap(cpu_p50=9000)),
              Offer("new-fast", snap(cpu_p50=100))]
    d = select(offers, {"known": trained(2.0)}, **KW)
    order = [c.device for c in d.ranking]
    assert order.index("new-fast") < order.index("known") < order.index("new-slow")
    assert all(c.explore for c in d.ranking if c.device.startswith("new"))


def test_untrained_arm_without_prior_is_explored_but_not_flooded() -> None:
    offers = [Offer("known", snap()), Offer("new", snap())]
    arms = {"known": trained(1.0)}
    first = select(offers, arms, **KW)
    assert first.winner is not None and first.winner.device == "new" and first.winner.explore
    held = select(offers, arms, **KW, exploring={"new"})
    assert [c.device for c in held.ranking] == ["known", "new"], "one exploration in flight at a time"


def test_no_offers_no_winner() -> None:
    assert select([], {}, **KW).winner is None
    assert select([Offer("x", snap(cpu=0))], {}, **KW).winner is None


def test_scores_tied_at_the_floor_go_to_the_lower_raw_bound() -> None:
    # Both bounds fall below the floor (0): the more uncertain arm must go first, whatever
    # the alphabet says.
    offers = [Offer("aa-known", snap()), Offer("zz-unsure", snap())]
    arms = {"aa-known": trained(0.001, n=50), "zz-unsure": trained(0.001, n=1)}
    d = select(offers, arms, prompt_tokens=100, max_new_tokens=100, alpha=5.0, lam=1.0)
    assert [c.score for c in d.ranking] == [0.0, 0.0]
    assert [c.device for c in d.ranking] == ["zz-unsure", "aa-known"]


def test_untrained_arm_without_an_advertised_record_is_priced_at_the_trained_mean() -> None:
    offers = [Offer("a", snap()), Offer("b", snap()), Offer("new", snap())]
    arms = {"a": trained(1.0), "b": trained(3.0)}
    d = select(offers, arms, prompt_tokens=100, max_new_tokens=100, alpha=0.0, lam=1.0)
    new = next(c for c in d.ranking if c.device == "new")
    assert new.explore and new.mean == pytest.approx((arms["a"].predict(np.array(new.x))[0]
                                                      + arms["b"].predict(np.array(new.x))[0]) / 2)
