"""LinUCB on the residual over a device's promise: the arm algebra, forgetting, noise scaling
(the store that keeps it: test_armstore)."""

from __future__ import annotations

import numpy as np
import pytest

from agent.linucb import (
    TRAINED_RIDS_KEPT,
    Arm,
    Arms,
    D,
    features,
    predict_many,
    residual_target,
    solve_arms,
    training_target,
)
from agent.messages import Snapshot
from agent.servicemodel import decay_for


def snap(**kw: object) -> Snapshot:
    base = dict(has_npu=False, npu_free=False, cpu_slots=1, cpu_percent=50.0,
                mem_available_mb=2048.0, load1=0.5, queue_depth=2, temperature_c=65.0)
    base.update(kw)
    return Snapshot(**base)  # type: ignore[arg-type]


def test_features_are_bounded_and_normalised() -> None:
    x = features(snap(), prompt_tokens=512, max_new_tokens=256, promise_s=5.0)
    assert x.shape == (D,)
    assert x.tolist() == pytest.approx([1.0, 0.5, 0.25, 0.25, 0.5, 0.25]), "state scales the promised work"
    extreme = features(snap(cpu_percent=800.0, mem_available_mb=0.0, temperature_c=150.0),
                       prompt_tokens=10**6, max_new_tokens=10**6, promise_s=1e9)
    assert extreme.max() <= 4.0 and extreme.min() >= 0.0
    assert features(snap(temperature_c=None), 1, 1, promise_s=5.0)[3] == 0.0
    assert features(snap(), 1, 1, promise_s=-3.0)[1] == 0.0


def test_without_forgetting_an_arm_is_the_closed_form_ridge_solution() -> None:
    rng = np.random.default_rng(7)
    lam = 0.5
    xs = rng.uniform(0, 1, size=(40, D))
    theta_true = rng.uniform(0, 2, size=D)
    ys = xs @ theta_true + rng.normal(0, 0.01, size=40)
    arm = Arm.fresh()
    for x, y in zip(xs, ys, strict=True):
        arm = arm.updated(x, y, lam=lam, gamma=1.0)
    A = lam * np.eye(D) + xs.T @ xs
    b = xs.T @ ys
    q = rng.uniform(0, 1, size=D)
    mean, width = arm.predict(q, lam)
    assert mean == pytest.approx(q @ np.linalg.inv(A) @ b, rel=1e-9)
    assert width == pytest.approx(np.sqrt(q @ np.linalg.inv(A) @ q), rel=1e-9)
    assert arm.n == 40 and arm.w == 40
    assert mean == pytest.approx(q @ theta_true, abs=0.1)


def test_forgetting_weighs_old_observations_down_but_never_the_ridge() -> None:
    x = features(snap(), 500, 128)
    gamma = decay_for(10)
    arm = Arm.fresh()
    for _ in range(40):
        arm = arm.updated(x, 1.0, lam=1.0, gamma=gamma)
    assert arm.w == pytest.approx(sum(gamma ** k for k in range(40)))
    for _ in range(30):
        arm = arm.updated(x, 1.5, lam=1.0, gamma=gamma)  # a device that got 50 % slower
    assert arm.predict(x, 1.0)[0] == pytest.approx(1.5, rel=0.1), "the recent past dominates"
    unused = Arm(G=arm.G * 1e-12, b=arm.b * 1e-12, n=arm.n, w=arm.w, sse=arm.sse)
    assert np.isfinite(unused.predict(x, 1.0)).all(), "λI keeps an old arm's solve well-posed"


def test_a_surprising_observation_makes_the_arm_forget_faster() -> None:
    x = features(snap(), 500, 128)
    slow_forgetting = decay_for(1000)
    arm = Arm.fresh()
    for _ in range(50):
        arm = arm.updated(x, 1.0, lam=1.0, gamma=slow_forgetting)
    after = arm.updated(x, 3.0, lam=1.0, gamma=slow_forgetting)  # 3x: not noise
    assert after.w < 0.3 * arm.w + 1.01, "the history now counts for a quarter"
    for _ in range(3):
        after = after.updated(x, 3.0, lam=1.0, gamma=slow_forgetting)
    assert after.predict(x, 1.0)[0] > 2.0, "four 3x jobs outweigh fifty old ones"
    usual = arm.updated(x, 1.2, lam=1.0, gamma=slow_forgetting)  # 20 %: noise
    assert usual.w == pytest.approx(slow_forgetting * arm.w + 1)


def test_width_shrinks_with_data_and_noise_is_learnt_in_seconds() -> None:
    x = features(snap(), 100, 100, promise_s=10.0)
    arm = Arm.fresh()
    widths = []
    rng = np.random.default_rng(1)
    for _ in range(30):
        widths.append(arm.predict(x, 1.0)[1])
        arm = arm.updated(x, 10.0 + rng.normal(0, 1.0), lam=1.0, gamma=1.0)
    assert widths == sorted(widths, reverse=True) and widths[-1] < widths[0] / 4
    assert 0.6 < arm.noise(10.0) < 1.6, "σ ≈ the residual noise, in the target's own units"
    assert Arm.fresh().noise(10.0) == pytest.approx(3.0), "a fresh arm assumes 30 % noise"


def test_batched_prediction_equals_one_at_a_time() -> None:
    rng = np.random.default_rng(3)
    arms, xs = [], rng.uniform(0, 1, size=(5, D))
    for i in range(5):
        arm = Arm.fresh()
        for _ in range(i + 1):
            arm = arm.updated(rng.uniform(0, 1, D), float(rng.uniform(1, 5)), lam=1.0, gamma=0.9)
        arms.append(arm)
    means, widths = predict_many(arms, xs, 1.0)
    for arm, x, m, w in zip(arms, xs, means, widths, strict=True):
        assert (m, w) == pytest.approx(arm.predict(x, 1.0), rel=1e-9)


def test_a_failure_teaches_the_cap_and_success_is_capped() -> None:
    assert training_target(True, 2.5, cap=120.0) == 2.5
    assert training_target(True, 500.0, cap=120.0) == 120.0
    assert training_target(False, 0.01, cap=120.0) == 120.0, "a fast failure must not look fast"


def test_arms_train_once_per_rid_and_forget_old_rids() -> None:
    arms = Arms()
    x = features(snap(), 100, 100)
    assert arms.train("dev", x, 2.0, "r1", 0.0, lam=1.0, gamma=1.0)
    assert not arms.train("dev", x, 9.0, "r1", 1.0, lam=1.0, gamma=1.0)
    assert arms.arms["dev"].n == 1
    for i in range(TRAINED_RIDS_KEPT + 2):
        arms.train("dev", x, 2.0, f"later-{i}", 2.0 + i, lam=1.0, gamma=1.0)
    assert len(arms.trained) == TRAINED_RIDS_KEPT, "the memory is bounded"
    assert "r1" not in arms.trained and "later-0" not in arms.trained and "later-2" in arms.trained, "oldest first"


def test_an_exploration_marker_holds_until_its_time_runs_out() -> None:
    arms = Arms(exploring={"a": ("r1", 10.0), "b": ("r2", 5.0)})
    assert arms.exploring_now(7.0) == {"a"}
    assert arms.exploring_now(10.0) == set(), "until, not including"


def test_an_arm_learns_the_residual_over_the_promise_and_a_job_without_one_only_ends_exploring() -> None:
    assert residual_target(True, 7.5, cap=120.0, promise=5.0) == 2.5
    assert residual_target(False, 0.1, cap=120.0, promise=5.0) == 115.0, "a failure is the cap, late"
    arms = Arms(exploring={"new": ("r1", 1e9)})
    assert arms.train("new", np.ones(D), None, "r1", 0.0, lam=1.0, gamma=1.0)
    assert arms.exploring == {} and "new" not in arms.arms, "nothing to learn, the exploration is over"
    assert not arms.train("new", np.ones(D), 3.0, "r1", 0.0, lam=1.0, gamma=1.0), "still once per rid"


def test_arms_are_solved_once_and_alike_batched_or_not() -> None:
    rng = np.random.default_rng(3)
    arms = []
    for i in range(4):
        arm = Arm.fresh()
        for _ in range(i + 2):
            arm = arm.updated(rng.uniform(0, 1, D), float(rng.normal()), lam=1.0, gamma=0.95)
        arms.append(arm)
    theta, inv = solve_arms(arms, 0.5)
    xs = rng.uniform(0, 1, size=(4, D))
    for arm, x, t, v in zip(arms, xs, theta, inv, strict=True):
        mean, width = arm.predict(x, 0.5)
        assert x @ t == pytest.approx(mean, rel=1e-9) and np.sqrt(x @ v @ x) == pytest.approx(width, rel=1e-9)
    again, _ = solve_arms(arms, 0.5)
    assert again.tolist() == theta.tolist()
    other, _ = solve_arms(arms, 2.0)
    assert not np.allclose(other, theta), "another λ is another solve"
