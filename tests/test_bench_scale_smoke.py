"""scripts/bench --scale runs end to end on small sizes and answers every auction."""

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
@pytest.mark.parametrize("in_turns", [True, False], ids=["in-turns", "one-at-a-time"])
def test_scale_benchmark_reports_every_size_and_answers_every_auction(tmp_path: Path, in_turns: bool) -> None:
    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, "scripts/bench.py", "--scale", "--sizes", "8,20", "--rounds", "3",
                           "--out", str(out), *([] if in_turns else ["--one-at-a-time", "--gap-s", "0.05"])],
                          cwd=REPO, capture_output=True, text=True, timeout=220)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["broker"] == "mosquitto" and set(r["sizes"]) == {"8", "20"} and r["in_turns"] is in_turns
    if in_turns:  # the two fleets' auctions took turns: both were up, measured block by block
        assert "block 10/10 done" in proc.stderr and "taking turns" in proc.stdout
    else:  # and each auction after an idle spell, said
        assert r["gap_s"] == 0.05 and "each measured auction after 0.05 s idle" in proc.stdout
    for n in (8, 20):
        row = r["sizes"][str(n)]
        assert row["answered"] == row["rounds"] == 3
        assert row["floor"]["p50"] > 0 and row["auction"]["p50"] > 0
        # Every device bids on what it is called for: calls out plus as many bids back
        # (the call-everyone auction of a small fleet: N and N).
        assert 0 < row["bids_per_orchestration"] <= n
        assert row["messages_per_orchestration"] == 2 * row["bids_per_orchestration"]
        assert row["answer_from"].startswith(f"v{n}-")
        # what each side's CPU cost: the asker's per orchestration, the devices' per bid
        # (counted in clock ticks of 10 ms: three rounds of a small fleet may read 0)
        assert row["asker_cpu_ms"] > 0 and row["fleet_cpu_ms_per_bid"] >= 0 and row["broker_cpu_ms"] >= 0
    assert r["sizes"]["8"]["auction_vs_first"] == 1.0
    text = proc.stdout
    assert "auctions answered: 6/6" in text
    assert "auction p50 at N=20" in text and "messages per orchestration" in text
    assert "load average" in text and "asker CPU ms" in text and "broker CPU ms" in text
