"""Who runs the job: NPU first, then the policy; pure, with a fake rng."""

from __future__ import annotations

import numpy as np
import pytest

from agent.linucb import Arm, features
from agent.messages import LatencySummary, Snapshot
from agent.selection import POLICIES, Offer, node_weight, select


def snap(*, npu: bool | None = None, cpu: int = 1, npu_p50: float | None = None, npu_n: int = 3,
         backlog: float = 0.0, depth: int = 0, cpu_percent: float = 10.0) -> Snapshot:
    recent = {}
    if npu_p50 is not None:
        recent["npu"] = LatencySummary(n=npu_n, p50_ms=npu_p50)
    return Snapshot(has_npu=npu is not None, npu_free=bool(npu), cpu_slots=cpu, cpu_percent=cpu_percent,
                    mem_available_mb=8000.0, load1=0.1, queue_depth=depth, recent=recent, backlog_s=backlog)


KW = dict(prompt_tokens=100, max_new_tokens=100, alpha=1.0, lam=1.0)
GREEDY = dict(KW, alpha=0.0)


def trained(seconds: float, n: int = 20, s: Snapshot | None = None) -> Arm:
    x = features(s or snap(), 100, 100)
    arm = Arm.fresh()
    for _ in range(n):
        arm = arm.updated(x, seconds, lam=1.0, gamma=1.0)
    return arm


def order(decision) -> list[str]:
    return [c.device for c in decision.ranking]


# ---------------------------------------------------------------- pass 1: NPU


def test_free_peer_npu_wins_over_any_cpu() -> None:
    offers = [Offer("cpu-a", snap()), Offer("npu-b", snap(npu=True, cpu=0)), Offer("me", snap(), is_self=True)]
    d = select(offers, {"cpu-a": trained(0.01)}, **KW)
    assert d.winner is not None and (d.winner.device, d.winner.mode) == ("npu-b", "npu")
    assert all(c.mode == "cpu" for c in d.ranking[1:])


def test_busy_npu_is_not_an_npu_candidate_but_can_run_cpu() -> None:
    d = select([Offer("npu-b", snap(npu=False, cpu=1))], {}, **KW)
    assert [(c.device, c.mode) for c in d.ranking] == [("npu-b", "cpu")]


def test_among_free_npus_lower_recent_latency_then_id_wins() -> None:
    offers = [Offer("b", snap(npu=True, npu_p50=900)), Offer("c", snap(npu=True, npu_p50=300)),
              Offer("a", snap(npu=True)), Offer("d", snap(npu=True, npu_p50=300)),
              Offer("e", snap(npu=True, npu_p50=1, npu_n=0))]
    assert order(select(offers, {}, **KW, need="npu")) == ["c", "d", "b", "a", "e"], \
        "a summary of no jobs says nothing"


def test_need_npu_never_falls_back_to_cpu() -> None:
    assert select([Offer("cpu-a", snap())], {}, **KW, need="npu").winner is None


def test_no_offers_no_winner() -> None:
    assert select([], {}, **KW).winner is None
    assert select([Offer("x", snap(cpu=0))], {}, **KW).winner is None


# ---------------------------------------------------------------- pass 2: linucb


def test_lowest_expected_completion_wins_and_self_is_a_candidate() -> None:
    offers = [Offer("slow", snap()), Offer("me", snap(), is_self=True), Offer("fast", snap())]
    arms = {"slow": trained(3.0), "me": trained(1.5), "fast": trained(0.5)}
    d = select(offers, arms, **KW)
    assert order(d) == ["fast", "me", "slow"] and d.ranking[1].is_self
    best = d.ranking[0]
    mean, width = arms["fast"].predict(np.array(best.x), 1.0)
    assert best.mean == pytest.approx(mean)
    assert best.score == pytest.approx(max(mean - 1.0 * arms["fast"].noise(mean) * width, 0.0))


def test_backlog_in_seconds_is_added_to_the_service_estimate() -> None:
    """A fast device with a queue loses to a slower idle one when its wait is longer."""
    offers = [Offer("fast-busy", snap(backlog=5.0, depth=3)), Offer("slow-idle", snap())]
    arms = {"fast-busy": trained(1.0), "slow-idle": trained(3.0)}
    d = select(offers, arms, **GREEDY)
    assert order(d) == ["slow-idle", "fast-busy"]
    assert d.ranking[1].score == pytest.approx(5.0 + d.ranking[1].mean)
    d = select([Offer("fast-busy", snap(backlog=1.0, depth=3)), Offer("slow-idle", snap())], arms, **GREEDY)
    assert order(d) == ["fast-busy", "slow-idle"], "a short wait is worth it"


def test_a_cold_model_pays_its_start_up_in_the_score() -> None:
    """Equal devices: the one whose model would have to load first loses (warm models win)."""
    offers = [Offer("a-cold", snap(), init_s=30.0), Offer("b-warm", snap())]
    arms = {"a-cold": trained(1.0), "b-warm": trained(1.0)}
    d = select(offers, arms, **GREEDY)
    assert order(d) == ["b-warm", "a-cold"]
    assert d.ranking[1].score == pytest.approx(30.0 + d.ranking[1].mean)

def test_a_device_estimate_counts_as_recent_observations() -> None:
    """An orchestrator that never used a device trusts what the device says of itself, in
    proportion to the recent jobs behind it."""
    offers = [Offer("known", snap()), Offer("says-fast", snap(), service_s=0.5, service_n=30)]
    d = select(offers, {"known": trained(2.0)}, **GREEDY)
    assert order(d) == ["says-fast", "known"]
    assert d.ranking[0].mean == pytest.approx(0.5, rel=0.1) and d.ranking[0].explore
    assert node_weight(1.0) == 0.0, "a record of one or two jobs cannot fit a size model yet"
    # Its estimate also corrects a stale arm: the device says it is now 3x slower.
    stale = {"known": trained(2.0), "says-fast": trained(0.5, n=10)}
    slowed = [Offer("known", snap()), Offer("says-fast", snap(), service_s=1.5, service_n=30)]
    assert select(slowed, stale, **GREEDY).ranking[1].mean > 1.0


def test_an_unknown_device_is_priced_as_fast_as_the_best_known_one_and_tried_once() -> None:
    offers = [Offer("a", snap()), Offer("b", snap()), Offer("new", snap())]
    arms = {"a": trained(1.0), "b": trained(3.0)}
    d = select(offers, arms, **KW)
    new = next(c for c in d.ranking if c.device == "new")
    a = next(c for c in d.ranking if c.device == "a")
    assert new.explore and new.mean == pytest.approx(a.mean)
    assert order(d)[0] == "new", "optimism: the same mean, but the wider bound goes first"
    held = select(offers, arms, **KW, exploring={"new"})
    assert order(held)[-1] == "new", "one exploration in flight at a time"
    both = {"a": trained(1.0), "b": trained(2.0)}
    assert order(select([Offer("a", snap()), Offer("b", snap())], both, **KW, exploring={"a"}))[0] == "a", \
        "only untrained arms are held back"


def test_with_nothing_known_anywhere_every_device_is_a_guess_at_zero() -> None:
    d = select([Offer("x", snap()), Offer("y", snap())], {}, **KW)
    assert all(c.explore and c.mean == 0.0 for c in d.ranking)


def test_ties_go_to_the_device_with_more_headroom_not_the_alphabet() -> None:
    offers = [Offer("aa", snap(depth=2, cpu=2)), Offer("zz", snap(depth=0, cpu=2))]
    arms = {"aa": trained(1.0), "zz": trained(1.0)}
    assert order(select(offers, arms, **GREEDY)) == ["zz", "aa"]


# ---------------------------------------------------------------- baselines


def test_jsq_joins_the_shortest_queue_per_slot() -> None:
    offers = [Offer("a", snap(depth=2, cpu=1)), Offer("b", snap(depth=3, cpu=4)), Offer("c", snap(depth=1, cpu=1))]
    assert order(select(offers, {}, **KW, policy="jsq", rng=np.random.default_rng(0))) == ["b", "c", "a"]


def test_least_backlog_ignores_speed() -> None:
    offers = [Offer("a", snap(backlog=2.0)), Offer("b", snap(backlog=0.5))]
    d = select(offers, {"b": trained(50.0)}, **KW, policy="least_backlog", rng=np.random.default_rng(0))
    assert order(d) == ["b", "a"]


def test_round_robin_walks_the_devices_and_returns_the_next_cursor() -> None:
    offers = [Offer(d, snap()) for d in ("c", "a", "b")]
    cursor, firsts = 0, []
    for _ in range(4):
        d = select(offers, {}, **KW, policy="round_robin", cursor=cursor)
        firsts.append(order(d)[0])
        cursor = d.cursor
    assert firsts == ["a", "b", "c", "a"]


def test_random_is_reproducible_with_a_seeded_rng_and_spreads() -> None:
    offers = [Offer(d, snap()) for d in "abcd"]
    picks = [order(select(offers, {}, **KW, policy="random", rng=np.random.default_rng(s)))[0] for s in range(40)]
    assert len(set(picks)) == 4
    assert picks == [order(select(offers, {}, **KW, policy="random", rng=np.random.default_rng(s)))[0]
                     for s in range(40)]


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_ranks_every_cpu_offer_once_and_keeps_the_context(policy: str) -> None:
    offers = [Offer(d, snap()) for d in "abc"] + [Offer("npu", snap(npu=True, cpu=0))]
    d = select(offers, {}, **KW, policy=policy, rng=np.random.default_rng(1))
    assert d.ranking[0].device == "npu"
    assert sorted(order(d)[1:]) == ["a", "b", "c"] and all(c.x is not None for c in d.ranking[1:])


def test_an_unknown_policy_is_an_error() -> None:
    with pytest.raises(ValueError, match="policy"):
        select([Offer("a", snap())], {}, **KW, policy="fastest-guess")


def test_a_job_with_tools_goes_only_to_modes_whose_executor_can_call_them() -> None:
    from dataclasses import replace

    from agent.messages import ModelInfo
    caller = replace(snap(npu=True), models={"cpu": ModelInfo("m", tools=True), "npu": ModelInfo("m")})
    plain = replace(snap(), models={"cpu": ModelInfo("m")})
    offers = [Offer("caller", caller), Offer("plain", plain), Offer("unknown", snap())]
    assert [(c.device, c.mode) for c in select(offers, {}, **KW, tools=True).ranking] == [("caller", "cpu")]
    assert {c.device for c in select(offers, {}, **KW).ranking} == {"caller", "plain", "unknown"}
