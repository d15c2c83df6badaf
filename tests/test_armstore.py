"""The arm store: train once per rid, persisted and shared by a device's processes, a
corrupt file set aside, a killed save never leaves a broken one (moved from test_linucb)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from agent.armstore import ArmStore, learnt
from agent.config import parse_config
from agent.linucb import STORE_VERSION, D, features
from agent.messages import Snapshot


def snap(**kw: object) -> Snapshot:
    base = dict(has_npu=False, npu_free=False, cpu_slots=1, cpu_percent=50.0,
                mem_available_mb=2048.0, load1=0.5, queue_depth=2, temperature_c=65.0)
    base.update(kw)
    return Snapshot(**base)  # type: ignore[arg-type]


def test_store_trains_once_per_rid_and_persists(tmp_path) -> None:
    store = ArmStore(tmp_path, lam=1.0)
    x = features(snap(), 100, 100)
    assert store.train("dev", x, 2.0, "rid-1") is True
    assert store.train("dev", x, 9.0, "rid-1") is False
    again = ArmStore(tmp_path, lam=1.0).load()
    assert again.arms["dev"].n == 1
    assert again.arms["dev"].b.tolist() == pytest.approx((2.0 * x).tolist())
    store.set_cursor(3)
    assert ArmStore(tmp_path).load().cursor == 3


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


def good_arm(**over: object) -> dict[str, object]:
    return {"G": np.eye(D).tolist(), "b": [0.0] * D, "n": 1, "w": 1.0, "sse": 0.0, **over}


V = STORE_VERSION


@pytest.mark.parametrize("content", [
    b"{not json", b"[" * 5000,
    json.dumps({"v": 1, "d": 7, "arms": {}}).encode(),                       # an old format
    json.dumps({"v": 2, "d": D, "arms": {"x": good_arm()}}).encode(),        # v2: service-time arms
    json.dumps({"v": V, "d": D, "arms": []}).encode(),                        # right JSON, wrong shape
    json.dumps({"v": V, "d": D, "arms": {"x": "nope"}}).encode(),
    json.dumps({"v": V, "d": D, "arms": {"x": good_arm(G=[[1]])}}).encode(),
    json.dumps({"v": V, "d": D, "arms": {"x": good_arm(G=(-np.eye(D)).tolist())}}).encode(),
    json.dumps({"v": V, "d": D, "arms": {"x": good_arm(n="1")}}).encode(),
    json.dumps({"v": V, "d": D, "arms": {"x": good_arm(w=-1)}}).encode(),
    json.dumps({"v": V, "d": D, "arms": {"x": good_arm(n=-1)}}).encode(),
    json.dumps({"v": V, "d": D, "arms": {}, "trained": [1, 2]}).encode(),
    json.dumps({"v": V, "d": D, "arms": {}, "exploring": {"d": []}}).encode(),
    json.dumps({"v": V, "d": D, "arms": {}, "cursor": "3"}).encode(),
])
def test_corrupt_or_wrong_shaped_store_is_set_aside_and_replaced(tmp_path, caplog, content: bytes) -> None:
    (tmp_path / "arms.json").write_bytes(content)
    state = ArmStore(tmp_path).load()
    assert state.arms == {}
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("arms.json.corrupt-")]
    assert len(aside) == 1 and aside[0].read_bytes() == content
    assert "unusable" in caplog.text


def test_kill_during_save_leaves_old_or_new_store(tmp_path) -> None:
    """SIGKILL a process that saves in a tight loop; the file must load every time."""
    code = ("import numpy as np; from pathlib import Path\n"
            "from agent.armstore import ArmStore; from agent.linucb import D\n"
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


def test_two_processes_of_a_device_see_each_others_training(tmp_path) -> None:
    first, second = ArmStore(tmp_path), ArmStore(tmp_path)
    x = features(snap(), 100, 100)
    for i in range(1, 5):
        writer, reader = (first, second) if i % 2 else (second, first)
        reader.load()  # read and cached before the other process writes
        writer.train("dev", x, 1.0, f"r{i}")
        assert reader.load().arms["dev"].n == i, "a cached read notices the other's write"
    assert ArmStore(tmp_path).load().arms["dev"].n == 4, "and nothing either wrote is lost"


def test_status_sees_the_arms_learnt_here_and_none_where_the_store_cannot_be_read(tmp_path) -> None:
    cfg = parse_config({"device_id": "hub", "state_dir": str(tmp_path / "state")})
    assert learnt(cfg) == {}, "nothing learnt yet"
    ArmStore.for_config(cfg).train("dev", features(snap(), 100, 100), 1.0, "r1")
    assert set(learnt(cfg)) == {"dev"} and learnt(cfg)["dev"].n == 1
    (tmp_path / "not-a-dir").write_text("x")
    unreadable = parse_config({"device_id": "hub", "state_dir": str(tmp_path / "not-a-dir")})
    assert learnt(unreadable) == {}, "status still shows the fleet, without estimates"
