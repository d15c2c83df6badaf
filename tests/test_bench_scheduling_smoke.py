"""scripts/bench --scheduling runs its worlds end to end over a real broker: every job is
answered and the report has each policy (no timing assertions: that is the benchmark's).
One policy goes over the wire (the fleet's start-up is most of the run, and a second policy
only ran the same path again); running each policy in turn and comparing them is checked
without a broker."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))


@pytest.mark.skipif(not shutil.which("mosquitto"), reason="the benchmark starts its own mosquitto")
@pytest.mark.timeout(240)
def test_the_biased_world_runs_on_the_wire_and_answers_every_job(tmp_path: Path) -> None:
    """``real``: prefill reported as start-up, per-job model loads, throttling and a slow
    link through the delay proxy, all at once."""
    out = tmp_path / "sched.json"
    proc = subprocess.run([sys.executable, "scripts/bench.py", "--scheduling", "--world", "real", "--jobs", "4",
                           "--load", "0.5", "--policies", "linucb", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=230)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["world"] == "real"
    assert [p["policy"] for p in r["scheduling"]] == ["linucb"]
    for p in r["scheduling"]:
        assert (p["answered"], p["failed"]) == (4, 0), p
    assert "world real" in proc.stdout and "linucb" in proc.stdout


def test_each_policy_runs_from_its_own_cold_fleet_and_is_compared_with_the_baseline(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import bench_scheduling

    runs: list[tuple[str, str]] = []

    def run_policy(policy: str, port: int, workdir: Path, jobs: int, load: float, seed: int,
                   world: str = "honest") -> dict[str, Any]:
        runs.append((policy, world))
        mean = {"linucb": 900.0, "least_backlog": 1000.0}[policy]
        return {"policy": policy, "world": world, "answered": jobs, "failed": 0, "jobs": jobs, "mean_ms": mean,
                "p95_ms": mean, "share": {d: 0.2 for d, _, _ in bench_scheduling.DEVICES}, "wall_s": 1.0}

    monkeypatch.setattr(bench_scheduling, "run_policy", run_policy)
    results = bench_scheduling.measure_scheduling(1, Path("."), jobs=4, load=0.5,
                                                  policies=["linucb", "least_backlog"], world="real")
    assert runs == [("linucb", "real"), ("least_backlog", "real")], "one run per policy, in the order asked"
    assert [r["policy"] for r in results] == ["linucb", "least_backlog"]
    bench_scheduling.print_scheduling(results, 0.5, "real")
    text = capsys.readouterr().out
    assert "world real" in text and "(+10 % vs least_backlog)" in text
    assert "vs least_backlog" not in next(line for line in text.splitlines() if line.startswith("least_backlog"))


def test_an_unknown_world_is_refused_by_name(monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    import bench

    monkeypatch.setattr(sys, "argv", ["bench.py", "--scheduling", "--world", "mars"])
    with pytest.raises(SystemExit) as refused:
        bench.main()
    assert refused.value.code != 0 and "mars" in capsys.readouterr().err
    with pytest.raises(ValueError, match="mars"):
        import bench_scheduling
        bench_scheduling.measure_scheduling(1, Path("."), jobs=1, load=0.5, policies=["linucb"], world="mars")
