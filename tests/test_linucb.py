from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from agent.linucb import Arm, ArmStore, D, features
from agent.messages import Snapshot


def snap(**kw: object) -> Snapshot:
    base = dict(has_npu=False, npu_free=False, cpu_slots=1, cpu_percent=50.0,
                mem_available_mb=2048.0, load1=0.5, queue_depth=2, temperature_c=65.0)
    base.update(kw)
    return Snapshot(**base)  # type: ignore[arg-type]


def test_features_are_bounded_and_normalised() -> None:
    x = features(snap(), prompt_tokens=512, max_new_tokens=256)
    assert x.shape == (D,)
    assert x.tolist() == pytest.approx([1.0, 0.5, 0.25, 0.5, 0.25, 0.5, 0.5])
    extreme = features(snap(cpu_percent=800.0, queue_depth=99, mem_available_mb=0.0,
                            temperature_c=150.0), prompt_tokens=10**6, max_new_tokens=10**6)
    assert extreme.max() <= 4.0 and extreme.min() >= 0.0
    assert features(snap(temperature_c=None), 1, 1)[6] == 0.0


def test_arm_matches_the_closed_form_ridge_solution() -> None:
    rng = np.random.default_rng(7)
    lam = 0.5
    xs = rng.uniform(0, 1, size=(40, D))
    theta_true = rng.uniform(0, 2, size=D)
    ys = xs @ theta_true + rng.normal(0, 0.01, size=40)
    arm = Arm.fresh(lam)
    for x, y in zip(xs, ys, strict=True):
        arm = arm.updated(x, y)
    A = lam * np.eye(D) + xs.T @ xs
    b = xs.T @ ys
    q = rng.uniform(0, 1, size=D)
    mean, width = arm.predict(q)
    assert mean == pytest.approx(q @ np.linalg.inv(A) @ b, rel=1e-9)
    assert width == pytest.approx(np.sqrt(q @ np.linalg.inv(A) @ q), rel=1e-9)
    assert arm.n == 40
    assert mean == pytest.approx(q @ theta_true, abs=0.1)


def test_width_shrinks_with_data() -> None:
    x = features(snap(), 100, 100)
    arm = Arm.fresh(1.0)
    widths = []
    for _ in range(5):
        widths.append(arm.predict(x)[1])
        arm = arm.updated(x, 1.0)
    assert widths == sorted(widths, reverse=True) and widths[-1] < widths[0] / 2


def test_store_trains_once_per_rid_and_persists(tmp_path) -> None:
    store = ArmStore(tmp_path, lam=1.0)
    x = features(snap(), 100, 100)
    assert store.train("dev", x, 2.0, "rid-1") is True
    assert store.train("dev", x, 9.0, "rid-1") is False
    again = ArmStore(tmp_path, lam=1.0).load()
    assert again.arms["dev"].n == 1
    assert again.arms["dev"].b.tolist() == pytest.approx((2.0 * x).tolist())


def test_store_exploration_marker_clears_on_training(tmp_path) -> None:
    clock = [1000.0]
    store = ArmStore(tmp_path, clock=lambda: clock[0])
    store.mark_exploring("dev", "rid-1", until=2000.0)
    assert store.load().exploring == {"dev": ("rid-1", 2000.0)}
    store.train("dev", np.ones(D), 1.0, "rid-1")
    assert store.load().exploring == {}
    store.mark_exploring("dev", "rid-2", until=1500.0)
    clock[0] = 1600.0
    assert store.load().exploring == {}, "an expired marker is forgotten"


@pytest.mark.parametrize("content", [b"{not json", json.dumps({"v": 99, "d": D, "arms": {}}).encode(),
                                     json.dumps({"v": 1, "d": D,
                                                 "arms": {"x": {"A": [[1]], "b": [1], "n": 1}}}).encode(),
                                     json.dumps({"v": 1, "d": D, "arms": {"x": {
                                         "A": (-np.eye(D)).tolist(), "b": [0] * D, "n": 1}}}).encode()])
def test_corrupt_store_is_set_aside_and_replaced(tmp_path, caplog, content: bytes) -> None:
    (tmp_path / "arms.json").write_bytes(content)
    state = ArmStore(tmp_path).load()
    assert state.arms == {}
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("arms.json.corrupt-")]
    assert len(aside) == 1 and aside[0].read_bytes() == content
    assert "unusable" in caplog.text


def test_kill_during_save_leaves_old_or_new_store(tmp_path) -> None:
    """SIGKILL a process that saves in a tight loop; the file must load every time."""
    code = ("import numpy as np; from pathlib import Path; from agent.linucb import ArmStore, D\n"
            f"s = ArmStore(Path({str(tmp_path)!r}))\n"
            "i = 0\n"
            "while True:\n"
            "    s.train('dev', np.ones(D), 1.0, f'r{i}'); i += 1\n"
            "    print(i, flush=True)\n")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for round_ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=repo)
        assert proc.stdout is not None
        for line in proc.stdout:  # kill it while it is busy saving, after a few saves
            if int(line) >= 5 + round_ * 7:
                break
        proc.kill()
        proc.communicate()
        state = ArmStore(tmp_path).load()
        assert not [p for p in tmp_path.iterdir() if "corrupt" in p.name]
        assert state.arms["dev"].n >= 5


def test_a_failure_teaches_the_cap_and_success_is_capped() -> None:
    from agent.linucb import training_target
    assert training_target(True, 2.5, cap=120.0) == 2.5
    assert training_target(True, 500.0, cap=120.0) == 120.0
    assert training_target(False, 0.01, cap=120.0) == 120.0, "a fast failure must not look fast"
