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
def test_metrics_go_out_on_each_change_as_a_node_s_do_or_only_on_the_interval(on_change: bool) -> None:
    import simulate_invite

    devices, jobs, interval = 20, 200, 5.0
    r = simulate_invite.run(simulate_invite.Policy("invite", (4, 2)), devices, jobs, 0.7, 0, interval,
                            warm=True, on_change=on_change)
    assert sum(x == x for x in r.latencies) == jobs, "every job answered"
    periodic = devices * r.seconds / interval
    assert periodic - devices <= r.refreshes <= periodic + devices, "every device on its interval"
    # a job's arrival and its end are one change each; a burst within 0.2 s is one message
    assert (0 < r.changes <= 2 * jobs) if on_change else r.changes == 0


def test_help() -> None:
    done = subprocess.run([sys.executable, str(SCRIPTS / "simulate_invite.py"), "--help"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "--invite" in done.stdout and "everyone" in done.stdout
