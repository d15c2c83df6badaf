"""scripts/simulate_invite runs in seconds and reports both policies (no quality bounds here:
the 1000-device numbers are the script's, in the README)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))


def test_quick_run_answers_every_job_under_both_policies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import simulate_invite

    out = tmp_path / "results.json"
    assert simulate_invite.main(["--devices", "30", "--jobs", "60", "--seeds", "1", "--loads", "0.7",
                                 "--invite", "8,2", "--warm", "--metrics-only", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["loads"]["70%"]
    assert set(rows) == {"everyone", "invite k=8 d=2", "invite k=8 d=2, metrics only"}
    for row in rows.values():
        assert row["answered"] == row["jobs"] == 60
    assert rows["everyone"]["calls_per_job"] == 30 and rows["invite k=8 d=2"]["calls_per_job"] <= 10
    report = capsys.readouterr().out
    assert "| 70% | everyone |" in report and "| 70% | invite k=8 d=2 |" in report


@pytest.mark.parametrize("on_change", [True, False])
def test_metrics_go_out_as_a_node_sends_them(on_change: bool) -> None:
    """On each job's change, within METRICS_MIN_GAP_S and never closer together; else one
    interval after the last (``on_change`` False: only on the interval)."""
    from collections import defaultdict
    from itertools import pairwise

    import simulate_invite

    from agent.presence import METRICS_MIN_GAP_S

    devices, jobs, interval = 20, 300, 5.0
    r = simulate_invite.run(simulate_invite.Policy("invite", (4, 2)), devices, jobs, 0.7, 0, interval,
                            warm=True, on_change=on_change)
    assert sum(x == x for x in r.latencies) == jobs, "every job answered"
    times: defaultdict[str, list[float]] = defaultdict(list)
    for at, name, _ in r.sent:
        times[name].append(at)
    gaps = [b - a for ts in times.values() for a, b in pairwise(ts)]
    assert len(r.sent) == r.refreshes + r.changes and len(times) == devices
    if not on_change:
        assert r.changes == 0 and not r.changed
        assert all(g == pytest.approx(interval) for g in gaps), "every interval, nothing between"
        return
    assert min(gaps) >= METRICS_MIN_GAP_S - 1e-9 and max(gaps) <= interval + 1e-9
    assert len(r.changed) >= 2 * jobs * 0.9, "a job's arrival and its end are a change each"
    for at, name in r.changed:  # each went out within the gap (alone, or with a refresh)
        assert any(at <= t <= at + METRICS_MIN_GAP_S + 1e-9 for t in times[name]), (at, name)
    assert 0 < r.changes < len(r.changed), "a burst of changes is one message"
    assert r.refreshes < devices * r.seconds / interval - devices, "a change puts the next refresh off"


@pytest.mark.parametrize(("devices", "flag", "on_change"), [(30, None, True), (101, None, False),
                                                            (101, "--on-change", True), (30, "--periodic-only", False)])
def test_metrics_follow_the_fleet_size_as_a_node_s_do_unless_forced(tmp_path: Path, devices: int, flag: str | None,
                                                                     on_change: bool) -> None:
    """A node sends a job's change at once only in a fleet at or below auction.invite.above."""
    import simulate_invite

    out = tmp_path / "results.json"
    argv = ["--devices", str(devices), "--jobs", "20", "--seeds", "1", "--loads", "0.5", "--json", str(out)]
    assert simulate_invite.main(argv + ([flag] if flag else [])) == 0
    assert json.loads(out.read_text())["on_change"] is on_change


def test_help() -> None:
    done = subprocess.run([sys.executable, str(SCRIPTS / "simulate_invite.py"), "--help"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "--invite" in done.stdout and "everyone" in done.stdout
