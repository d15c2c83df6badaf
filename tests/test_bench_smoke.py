"""The benchmark runs end to end in its quick mode and reports every section."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not shutil.which("mosquitto"), reason="the benchmark starts its own mosquitto")
@pytest.mark.timeout(300)
def test_quick_benchmark_reports_every_section(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "scripts/bench.py", "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    for n in ("1", "4"):
        assert r["floor"][n]["p50"] > 0 and r["auction"][n]["p50"] > 0
        assert r["ratios"][n]["auction_over_floor"] > 0
    assert r["local_npu_ms"]["p50"] > 0 and r["cli"]["to_exec"]["p50"] > 0
    assert r["node"]["rss_mb"] > 0
    assert [c["k"] for c in r["concurrency"]] == [1, 4] and all(c["errors"] == 0 for c in r["concurrency"])
    assert "auction/floor" in proc.stdout
    assert 0 < r["frozen"]["first_ms"] < r["frozen"]["window_s"] * 1000, "the frozen node is overdue, not timed out"
    assert 0 < r["frozen"]["first_never_heard_from_ms"] < r["frozen"]["window_s"] * 1000
    assert "skipped" in r["engine"] or r["engine"]["ratio_p50"] > 0, r["engine"]
