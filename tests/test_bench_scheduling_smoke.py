"""scripts/bench --scheduling runs its worlds end to end over a real broker: every job is
answered and the report has each policy (no timing assertions: that is the benchmark's)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not shutil.which("mosquitto"), reason="the benchmark starts its own mosquitto")
@pytest.mark.timeout(240)
def test_the_biased_world_runs_on_the_wire_and_answers_every_job(tmp_path: Path) -> None:
    """``real``: prefill reported as start-up, per-job model loads, throttling and a slow
    link through the delay proxy, all at once."""
    out = tmp_path / "sched.json"
    proc = subprocess.run([sys.executable, "scripts/bench.py", "--scheduling", "--world", "real", "--jobs", "4",
                           "--load", "0.5", "--policies", "linucb,least_backlog", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=230)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["world"] == "real"
    assert [p["policy"] for p in r["scheduling"]] == ["linucb", "least_backlog"]
    for p in r["scheduling"]:
        assert (p["answered"], p["failed"]) == (4, 0), p
    assert "world real" in proc.stdout and "vs least_backlog" in proc.stdout


def test_an_unknown_world_is_refused_by_name() -> None:
    proc = subprocess.run([sys.executable, "scripts/bench.py", "--scheduling", "--world", "mars"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "mars" in proc.stderr
