from __future__ import annotations

import re
from pathlib import Path

import pytest

from agent.config import (
    CommandExecutorConfig,
    GenieExecutorConfig,
    SimExecutorConfig,
    load_config,
    parse_config,
)
from agent.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_minimal_config_gets_the_documented_defaults() -> None:
    cfg = parse_config({"device_id": "kitchen-pi"})
    assert cfg.broker.host == "127.0.0.1" and cfg.broker.port == 1883 and cfg.broker.keepalive_s == 5
    assert cfg.topic_prefix == "" and cfg.metrics_interval_s == 10
    assert cfg.npu.enabled is False and cfg.cpu.enabled is True and cfg.cpu.slots == 1
    assert isinstance(cfg.cpu.executor, CommandExecutorConfig)
    assert cfg.auction.bid_timeout_s == 30 and cfg.auction.linucb.alpha == 0.0
    assert cfg.auction.policy == "linucb" and cfg.auction.linucb.half_life_jobs == 20
    assert cfg.auction.linucb.lambda_ == 1.0
    assert cfg.homeassistant.enabled and cfg.homeassistant.discovery_prefix == "homeassistant"
    assert cfg.max_payload_bytes == 256 * 1024


def test_the_design_example_is_accepted() -> None:
    cfg = parse_config({
        "device_id": "kitchen-pi",
        "broker": {"host": "127.0.0.1", "port": 1883, "username": None, "password_file": None,
                   "tls": {"ca_file": None, "cert_file": None, "key_file": None}, "keepalive_s": 5},
        "topic_prefix": "", "state_dir": "~/.local/state/edge-agent", "metrics_interval_s": 10,
        "npu": {"enabled": False, "executor": {"kind": "genie", "command": "genie-t2t-run",
                                               "config": "genie_config.json"}},
        "cpu": {"enabled": True, "slots": 1, "executor": {"kind": "command",
                                                          "argv": ["llama-cli", "-p", "{prompt}"]}},
        "auction": {"bid_timeout_s": 30, "linucb": {"alpha": 0.2, "lambda": 1.0}},
        "homeassistant": {"enabled": True, "discovery_prefix": "homeassistant"},
    })
    assert isinstance(cfg.npu.executor, GenieExecutorConfig)
    assert cfg.state_dir == Path("~/.local/state/edge-agent").expanduser()


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({
            "device_id": "bad id",
            "broker": {"port": 70000, "keepalive_s": "5", "tls": {"cert_file": "c"}, "x": 1},
            "npu": {"enabled": "yes", "executor": {"kind": "sim", "base_ms": -1}},
            "cpu": {"slots": 1.5, "executor": {"kind": "command", "argv": ["llama-cli"]}},
            "auction": {"linucb": {"lambda": 0}},
            "topic_prefix": "a/#/",
            "homeassistant": [],
        })
    problems = "\n".join(info.value.problems)
    for path in ("device_id:", "broker.port:", "broker.keepalive_s:", "broker.tls:", "broker.x: unknown key",
                 "npu.enabled:", "npu.executor.base_ms:", "cpu.slots:", "cpu.executor.argv:",
                 "auction.linucb.lambda:", "topic_prefix:", "homeassistant: must be a mapping",
                 "broker.tls.cert_file: c does not exist"):
        assert path in problems, f"{path} missing from\n{problems}"
    assert len(info.value.problems) == 13


def test_missing_device_id_mentions_the_overrides() -> None:
    with pytest.raises(ConfigError, match="AGENT_DEVICE_ID"):
        parse_config({})


def test_environment_then_flags_override_the_file() -> None:
    env = {"AGENT_BROKER_HOST": "10.0.0.5", "AGENT_BROKER_PORT": "1884", "AGENT_DEVICE_ID": "from-env",
           "AGENT_STATE_DIR": "/var/lib/x"}
    cfg = parse_config({"device_id": "file"}, env=env)
    assert (cfg.device_id, cfg.broker.host, cfg.broker.port, str(cfg.state_dir)) == \
        ("from-env", "10.0.0.5", 1884, "/var/lib/x")
    cfg = parse_config({"device_id": "file"}, env=env, flags={"device_id": "flag", "port": "1999"})
    assert (cfg.device_id, cfg.broker.port) == ("flag", 1999)
    with pytest.raises(ConfigError, match="AGENT_BROKER_PORT"):
        parse_config({"device_id": "x"}, env={"AGENT_BROKER_PORT": "http"})


def test_disabled_sections_do_not_demand_their_executor_fields() -> None:
    parse_config({"device_id": "x", "npu": {"enabled": False, "executor": {"kind": "genie"}}})
    with pytest.raises(ConfigError, match="npu.executor.config: is required"):
        parse_config({"device_id": "x", "npu": {"enabled": True, "executor": {"kind": "genie"}}})


def test_yaml_errors_and_missing_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("device_id: [unclosed\n")
    with pytest.raises(ConfigError, match="line"):
        load_config(bad, env={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml", env={})


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_shipped_examples_are_valid(path: Path) -> None:
    """Valid but for the secret and certificate files they point to on a real device."""
    try:
        cfg = load_config(path, env={})
    except ConfigError as exc:
        others = [p for p in exc.problems if not re.search(r"/etc/edge-agent/\S+ does not exist$", p)]
        assert others == [], others
    else:
        assert cfg.device_id


def test_sim_defaults() -> None:
    cfg = parse_config({"device_id": "x", "cpu": {"executor": {"kind": "sim"}}})
    assert cfg.cpu.executor == SimExecutorConfig()


def test_invite_keys() -> None:
    cfg = parse_config({"device_id": "x"})
    assert (cfg.auction.invite.above, cfg.auction.invite.best, cfg.auction.invite.explore) == (100, 12, 6)
    cfg = parse_config({"device_id": "x", "auction": {"invite": {"above": 0, "best": 3, "explore": 0}}})
    assert (cfg.auction.invite.above, cfg.auction.invite.best, cfg.auction.invite.explore) == (0, 3, 0)
    with pytest.raises(ConfigError) as info:
        parse_config({"device_id": "x", "auction": {"invite": {"above": -1, "best": 2.5, "explor": 1}}})
    text = str(info.value)
    assert "auction.invite.above: must be >= 0" in text and "auction.invite.best: must be an integer" in text
    assert "auction.invite.explor: unknown key" in text
    with pytest.raises(ConfigError, match="auction.invite: best and explore are both 0"):
        parse_config({"device_id": "x", "auction": {"invite": {"best": 0, "explore": 0}}})
