from __future__ import annotations

import io
import json

import pytest

from agent.cli import main
from tests.support.fleet import Env, sim


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    return main(list(argv), stdout=out, stderr=err), out.getvalue(), err.getvalue()


def test_help_names_the_commands_and_exit_codes(capsys) -> None:
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for word in ("trigger", "status", "node", "--role", "Exit codes"):
        assert word in text
    assert main(["trigger", "--help"]) == 0
    assert "--json" in capsys.readouterr().out


def test_usage_errors_exit_2(capsys) -> None:
    assert main([]) == 2
    assert main(["frobnicate"]) == 2
    assert main(["trigger", "--max-new-tokens", "many", "x"]) == 2
    assert main(["trigger", "--device-id", "d", "--broker", "nohostport", "x"]) == 2
    assert "HOST:PORT" in capsys.readouterr().err


def test_oversized_prompt_is_refused_before_anything_is_published(env: Env) -> None:
    hub = env.config("hub", cpu=sim(base_ms=1), max_payload_bytes=8192)
    with env.spy("#") as spy:
        code, out, err = run("trigger", "--config", str(hub), "x" * 10_000)
        assert code == 2
        assert "prompt too large" in err and "8192" in err
        assert not [t for t in spy.topics_seen() if t.startswith(env.prefix)]


def test_plain_output_prints_the_winner_line_then_the_answer(env: Env) -> None:
    hub = env.config("hub", npu=sim(base_ms=1))
    code, out, err = run("trigger", "--config", str(hub), "tell me something")
    assert code == 0, err
    assert out.splitlines() == ["✓ Winner: hub (NPU - Local)", "tell me something"]
    assert "answered by hub (local-npu)" in err


def test_prompt_from_a_file(env: Env, tmp_path) -> None:
    hub = env.config("hub", npu=sim(base_ms=1))
    (tmp_path / "p.txt").write_text("from a file")
    code, out, err = run("trigger", "--config", str(hub), "--json", "--prompt-file", str(tmp_path / "p.txt"))
    assert code == 0, err
    assert json.loads(out)["text"] == "from a file"


def test_json_has_the_documented_keys(env: Env) -> None:
    hub = env.config("hub", npu=sim(base_ms=1))
    code, out, _ = run("trigger", "--config", str(hub), "--json", "k")
    assert code == 0
    obj = json.loads(out)
    for key in ("rid", "winner", "path", "text", "bids", "roster", "auction_ms", "total_ms",
                "timings", "attempts"):
        assert key in obj
    assert set(obj["timings"]) == {"queue_ms", "init_ms", "prefill_ms", "decode_ms", "total_ms"}


def test_need_npu_with_only_cpu_peers_exits_3(env: Env) -> None:
    hub = env.config("hub", auction={"bid_timeout_s": 5})
    peer = env.config("cpu-peer", cpu=sim(base_ms=1))
    with env.node(peer):
        code, out, err = run("trigger", "--config", str(hub), "--json", "--need", "npu", "x")
    assert code == 3
    assert json.loads(out)["path"] is None and "no device" in err


def test_status_lists_every_device(env: Env) -> None:
    a = env.config("alpha", npu=sim(base_ms=1))
    b = env.config("beta", cpu=sim(base_ms=1))
    with env.node(a), env.node(b):
        code, out, err = run("status", "--config", str(a), "--json")
        assert code == 0, err
        rows = {r["device"]: r for r in json.loads(out)["devices"]}
        assert rows["alpha"]["online"] and rows["alpha"]["npu"] == "free"
        assert rows["beta"]["online"] and rows["beta"]["npu"] is None and rows["beta"]["cpu_slots"] == 1
        code, out, _ = run("status", "--config", str(a))
        assert code == 0 and "alpha" in out and "beta" in out and "online" in out
    code, out, _ = run("status", "--config", str(a), "--json")
    rows = {r["device"]: r for r in json.loads(out)["devices"]}
    assert not rows["alpha"]["online"] and not rows["beta"]["online"], "clean stop publishes offline"


@pytest.mark.parametrize("argv", [["--role", "node"], ["node"]])
def test_node_without_device_id_is_a_config_error(argv: list[str], monkeypatch) -> None:
    monkeypatch.delenv("AGENT_DEVICE_ID", raising=False)
    code, _, err = run(*argv)
    assert code == 2 and "device_id" in err


def test_dry_run_shows_the_ranking_and_runs_nothing(env: Env) -> None:
    hub = env.config("hub")
    slow = env.config("slow", cpu=sim(base_ms=1))
    fast = env.config("fast", npu=sim(base_ms=1))
    with env.node(slow), env.node(fast), env.spy(f"{env.prefix}exec/#") as spy:
        code, out, err = run("trigger", "--config", str(hub), "--json", "--dry-run", "x")
        assert code == 0, err
        obj = json.loads(out)
        assert obj["dry_run"] and obj["winner"] == "fast" and obj["path"] == "peer-npu"
        assert sorted(b["device"] for b in obj["bids"]) == ["fast", "slow"]
        assert [(c["device"], c["mode"]) for c in obj["ranking"]] == [("fast", "npu"), ("slow", "cpu")]
        assert obj["text"] == "" and spy.topics_seen() == [], "nothing was dispatched"
        code, out, _ = run("trigger", "--config", str(hub), "--dry-run", "x")
        assert code == 0 and out.splitlines()[0] == "✓ Winner would be: fast (NPU - Peer)"
