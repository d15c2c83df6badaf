"""The shipped systemd unit: valid for systemd, and in step with the agent it runs."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agent.config import Config
from agent.errors import ExitCode

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "edge-agent.service"


def service() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    return parser["Service"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    # ExecStart must name an existing executable for verify; the rest is as shipped.
    unit = tmp_path / "edge-agent.service"
    unit.write_text(UNIT.read_text().replace("/opt/edge-agent/venv/bin/edge-agent",
                                             str(Path(sys.executable).parent / "edge-agent")))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    complaints = [line for line in proc.stderr.splitlines() if str(unit) in line]
    assert proc.returncode == 0 and not complaints, proc.stderr


def test_the_unit_agrees_with_the_agent() -> None:
    svc = service()
    assert svc["StateDirectory"] == "edge-agent"
    assert float(svc["TimeoutStopSec"]) > Config.drain_s, "systemd must not kill a node that is still draining"
    assert str(int(ExitCode.USAGE)) in svc["RestartPreventExitStatus"].split(), "no restart loop on a config error"
    assert svc["KillSignal"] == "SIGTERM" and svc["Restart"] == "on-failure"
    argv = svc["ExecStart"].split()
    assert argv[1:4] == ["--role", "node", "--config"]


@pytest.mark.parametrize("example", ["node-cpu.yaml", "node-npu.yaml"])
def test_the_device_examples_keep_their_state_where_the_service_does(example: str) -> None:
    doc = yaml.safe_load((REPO / "configs" / example).read_text())
    assert doc["state_dir"] == "/var/lib/" + service()["StateDirectory"]
