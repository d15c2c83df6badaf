"""Who runs the job: NPU first, then the policy; pure, with a fake rng."""

from __future__ import annotations

import numpy as np
import pytest

from agent.linucb import Arm, features
from agent.messages import LatencySummary, Snapshot
from agent.selection import POLICIES, Offer, select


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


def residual_arm(residual: float, n: int = 30, work: float = 1.0, s: Snapshot | None = None,
                 jitter: float = 0.0) -> Arm:
    """An arm that saw ``n`` jobs come in ``residual`` seconds later than promised (± jitter)."""
    x = features(s or snap(), 100, 100, work)
    arm = Arm.fresh()
    for k in range(n):
        arm = arm.updated(x, residual + (jitter if k % 2 else -jitter), lam=1.0, gamma=1.0, base=work)
    return arm


def test_with_nothing_learnt_the_ranking_is_the_devices_own_promises() -> None:
    """Backlog + start-up + the device's estimate of the job: the self offer competes too."""
    offers = [Offer("slow", snap(), service_s=3.0, service_n=12),
              Offer("me", snap(), is_self=True, service_s=1.5, service_n=12),
              Offer("fast", snap(), service_s=0.5, service_n=12)]
    d = select(offers, {}, **GREEDY)
    assert order(d) == ["fast", "me", "slow"] and d.ranking[1].is_self
    assert [c.score for c in d.ranking] == pytest.approx([0.5, 1.5, 3.0])
    assert [c.promise for c in d.ranking] == pytest.approx([0.5, 1.5, 3.0])
    assert not any(c.explore for c in d.ranking), "a device with its own estimate is known"


def test_backlog_in_seconds_is_added_to_the_service_estimate() -> None:
    """A fast device with a queue loses to a slower idle one when its wait is longer."""
    offers = [Offer("fast-busy", snap(backlog=5.0, depth=3), service_s=1.0), Offer("slow-idle", snap(), service_s=3.0)]
    d = select(offers, {}, **GREEDY)
    assert order(d) == ["slow-idle", "fast-busy"]
    assert d.ranking[1].score == pytest.approx(6.0)
    d = select([Offer("fast-busy", snap(backlog=1.0, depth=3), service_s=1.0),
                Offer("slow-idle", snap(), service_s=3.0)], {}, **GREEDY)
    assert order(d) == ["fast-busy", "slow-idle"], "a short wait is worth it"


def test_a_cold_model_pays_its_start_up_in_the_score() -> None:
    """Equal devices: the one whose model would have to load first loses (warm models win)."""
    offers = [Offer("a-cold", snap(), service_s=1.0, service_n=12, init_s=30.0),
              Offer("b-warm", snap(), service_s=1.0, service_n=12)]
    d = select(offers, {}, **GREEDY)
    assert order(d) == ["b-warm", "a-cold"]
    assert d.ranking[1].score == pytest.approx(31.0) and d.ranking[1].promise == pytest.approx(31.0)
    busy = select([Offer("busy", snap(backlog=2.0), service_s=1.0, service_n=12, init_s=0.5)], {},
                  **GREEDY).ranking[0]
    assert (busy.score, busy.promise) == pytest.approx((3.5, 1.5)), "the promise is the job's own time"


def test_the_arm_learns_what_a_device_cannot_see_about_itself() -> None:
    """The fast device's answers reach this orchestrator 3 s later than it promises (a slow
    link, a biased estimate): the arm's residual moves this orchestrator elsewhere."""
    offers = [Offer("fast", snap(), service_s=1.0, service_n=12),
              Offer("steady", snap(), service_s=2.5, service_n=12)]
    assert order(select(offers, {}, **KW))[0] == "fast"
    d = select(offers, {"fast": residual_arm(3.0, n=20)}, **KW)
    assert order(d) == ["steady", "fast"]
    assert d.ranking[1].score == pytest.approx(4.0, abs=0.5) and d.ranking[1].promise == pytest.approx(1.0)


def test_with_honest_estimates_the_learnt_residual_changes_nothing() -> None:
    """Residuals that are noise around zero stay inside their own band: the score is the
    promise exactly, so learning never costs what the devices' estimates get right."""
    offers = [Offer("a", snap(backlog=0.4), service_s=1.0, service_n=12, init_s=0.1),
              Offer("b", snap(), service_s=1.4, service_n=12)]
    arms = {"a": residual_arm(0.02, jitter=0.3), "b": residual_arm(-0.03, jitter=0.4, work=1.4)}
    d = select(offers, arms, **GREEDY)
    assert [c.score for c in d.ranking] == pytest.approx([1.4, 1.5])
    assert [c.promise for c in d.ranking] == pytest.approx([1.4, 1.1]), "the job's own time; the wait apart"


def test_a_residual_counts_only_beyond_twice_its_own_band() -> None:
    """Ten jobs 0.3 s late, give or take 0.6 s, is noise: the score stays the promise and
    the device keeps a job it wins by 0.05 s. Ten jobs 1 s late is a bias: it loses it."""
    offers = [Offer("a", snap(), service_s=1.0, service_n=12), Offer("b", snap(), service_s=1.05, service_n=12)]
    d = select(offers, {"a": residual_arm(0.3, n=10, jitter=0.6)}, **GREEDY)
    assert order(d) == ["a", "b"] and d.ranking[0].score == pytest.approx(1.0)
    d = select(offers, {"a": residual_arm(1.0, n=10, jitter=0.6)}, **GREEDY)
    assert order(d) == ["b", "a"] and d.ranking[1].score == pytest.approx(1.5, abs=0.1)


def test_a_promise_from_a_young_record_teaches_the_arm_nothing() -> None:
    """A device's first jobs are priced from a record of a few jobs: what such a promise
    misses is the record's youth, mended by the device's next jobs, not a bias of the
    device. The job carries no promise (its arm is not trained) yet is no exploration."""
    offers = [Offer("young", snap(), service_s=1.0, service_n=5.9),
              Offer("grown", snap(), service_s=2.0, service_n=6)]
    d = select(offers, {}, **GREEDY)
    young, grown = d.ranking
    assert (young.device, young.promise, young.explore) == ("young", None, False)
    assert young.score == pytest.approx(1.0), "it is still ranked by its own estimate"
    assert grown.promise == pytest.approx(2.0)


def test_an_optimistic_device_is_corrected_within_tens_of_jobs() -> None:
    """A device that promises 1 s and takes 2.5 s: after 10 jobs it no longer wins."""
    offers = [Offer("optimist", snap(), service_s=1.0), Offer("honest", snap(), service_s=2.0)]
    noisy = residual_arm(1.5, n=10, jitter=0.3)
    assert order(select(offers, {"optimist": noisy}, **KW))[0] == "honest"


def test_an_unknown_device_is_priced_as_fast_as_the_best_estimate_and_tried_once() -> None:
    offers = [Offer("a", snap(), service_s=1.0), Offer("b", snap(), service_s=3.0), Offer("new", snap())]
    d = select(offers, {}, **GREEDY, rng=np.random.default_rng(0))
    new = next(c for c in d.ranking if c.device == "new")
    assert new.explore and new.promise is None and new.score == pytest.approx(1.0)
    # With a job of this orchestrator's exploring it: priced as the slowest estimate (its
    # backlog shows that job as well), so it is not flooded.
    held = select(offers, {}, **GREEDY, exploring={"new"})
    assert order(held)[0] == "a"
    assert next(c for c in held.ranking if c.device == "new").score == pytest.approx(3.0)


def test_a_device_with_its_own_estimate_is_not_held_back_as_exploring() -> None:
    """Exploration is fleet-wide: a device whose record covers the job is known, whether or
    not this orchestrator has used it; it is never sent to the back of the ranking."""
    offers = [Offer("fast", snap(), service_s=1.0, service_n=12), Offer("slow", snap(), service_s=4.0, service_n=12)]
    d = select(offers, {}, **KW, exploring={"fast"})
    assert order(d) == ["fast", "slow"] and not any(c.explore for c in d.ranking)


def test_with_nothing_known_anywhere_every_device_is_a_guess_at_zero() -> None:
    d = select([Offer("x", snap()), Offer("y", snap())], {}, **KW)
    assert all(c.explore and c.mean == 0.0 for c in d.ranking)


def test_cold_ties_go_by_headroom_then_the_devices_estimates_never_by_name() -> None:
    offers = [Offer("aa", snap(depth=2, cpu=2), service_s=1.0), Offer("zz", snap(depth=0, cpu=2), service_s=1.0)]
    assert order(select(offers, {}, **GREEDY)) == ["zz", "aa"]
    # Nothing learnt anywhere, equal scores: the device whose own estimate is lower first,
    # even if its estimate rests on a single job.
    offers = [Offer("aa-slow", snap(), service_s=5.0, service_n=1),
              Offer("zz-fast", snap(), service_s=1.0, service_n=1)]
    assert order(select(offers, {}, **GREEDY))[0] == "zz-fast"
    # Nothing known at all: equal devices share the first jobs, whatever their names.
    equal = [Offer(d, snap()) for d in ("aa", "bb", "cc")]
    firsts = {order(select(equal, {}, **GREEDY, rng=np.random.default_rng(seed)))[0] for seed in range(30)}
    assert firsts == {"aa", "bb", "cc"}


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
