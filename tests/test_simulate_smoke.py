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
    assert simulate.job_seconds is agent.servicemodel.job_seconds
    assert simulate.InitCost is agent.servicemodel.InitCost


def test_every_world_runs_and_its_biases_are_hidden_from_the_policies() -> None:
    """Each world changes the hidden fleet only: the offers are built by the node's code."""
    import simulate

    for world in simulate.WORLDS:
        fleet = simulate.reference_fleet(world)
        assert len(fleet) == 6
        sc = simulate.Scenario(f"{world} smoke", 0.7, 60, world=world)
        run = simulate.simulate("linucb", sc, seed=1)
        assert len(run.chosen) == 60 and all(x == x for x in run.latencies), world  # every job answered
    assert any(h.link for h in simulate.reference_fleet("link"))
    assert all(h.ttft_init for h in simulate.reference_fleet("ttft"))
