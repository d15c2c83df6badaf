"""The scheduling simulator runs, in seconds, and the shipped policy is near the oracle."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def test_quick_simulation_reports_every_policy_against_the_oracle(tmp_path: Path, capsys) -> None:
    import simulate

    assert simulate.main(["--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["scenarios"]["steady 70%"]
    assert set(rows) == {"oracle", "linucb", "least_backlog", "jsq", "round_robin", "random"}
    assert rows["oracle"]["ratio"] == 1.0
    # 300 jobs, one seed: loose bounds that still catch a broken policy or simulator.
    assert rows["linucb"]["ratio"] < 1.3, rows["linucb"]
    assert rows["linucb"]["mean"] < rows["jsq"]["mean"] < rows["round_robin"]["mean"]
    assert 0 < results["decision_time_us_32_offers"]["linucb"] < 5000
    report = (tmp_path / "report.md").read_text()
    assert "| linucb |" in report and "x oracle" in report
    assert "steady 70%" in capsys.readouterr().out


def test_the_simulated_node_uses_the_agents_own_code() -> None:
    """Not a copy: the simulator's devices and decisions are the agent's modules."""
    import simulate

    import agent.selection
    import agent.servicemodel
    assert simulate.select is agent.selection.select
    assert simulate.ServiceRecord is agent.servicemodel.ServiceRecord
    assert simulate.expected_wait is agent.servicemodel.expected_wait
