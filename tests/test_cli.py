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


@pytest.mark.parametrize("argv", [["--role", "node", "--help"], ["--role=node", "-h"],
                                  ["-c", "x.yaml", "--role", "node", "-h"]])
def test_role_node_help_is_the_daemons_help(capsys, argv: list[str]) -> None:
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m agent node") and "drains" in text


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


# ---------------------------------------------------------------- every error has its code


def write(tmp_path, name: str, text: str, mode: int = 0o600):
    path = tmp_path / name
    path.write_text(text)
    path.chmod(mode)
    return path


def test_secret_files_that_others_can_read_or_that_are_missing_are_config_errors(tmp_path) -> None:
    loose = write(tmp_path, "loose.pw", "secret", 0o644)
    cfg = write(tmp_path, "c.yaml", f"device_id: d\nbroker: {{username: d, password_file: {loose},\n"
                                    f"  tls: {{ca_file: {tmp_path}/missing-ca.crt, cert_file: {loose}, "
                                    f"key_file: {loose}}}}}\n")
    code, _, err = run("trigger", "--config", str(cfg), "x")
    assert code == 2
    assert "broker.password_file" in err and f"chmod 600 {loose}" in err
    assert "broker.tls.ca_file" in err and "does not exist" in err
    assert "broker.tls.key_file" in err, "a private key readable by others is refused too"
    assert "broker.tls.cert_file" not in err, "a certificate is public"


def test_a_password_file_gone_after_loading_is_a_config_error(tmp_path, monkeypatch) -> None:
    from agent import config, credentials
    pw = write(tmp_path, "d.pw", "secret")
    cfg = write(tmp_path, "c.yaml", f"device_id: d\nbroker: {{username: d, password_file: {pw}, port: 1}}\n"
                                    f"cpu: {{enabled: false}}\nstate_dir: {tmp_path / 'state'}\n")
    monkeypatch.delenv(credentials.PASSWORD_ENV, raising=False)
    monkeypatch.setattr(config, "file_problem", lambda path, private: None)  # it was there when loaded
    pw.unlink()
    code, _, err = run("trigger", "--config", str(cfg), "x")
    assert code == 2 and "broker.password_file" in err and "does not exist" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("flag,value", [("--bid-timeout", "nan"), ("--bid-timeout", "inf"),
                                        ("--bid-timeout", "-1"), ("--max-new-tokens", "0")])
def test_numeric_flags_must_be_finite_and_positive(flag: str, value: str, capsys) -> None:
    assert main(["trigger", "--device-id", "d", flag, value, "x"]) == 2
    assert flag in capsys.readouterr().err


def test_a_prompt_that_is_not_utf8_is_a_usage_error(tmp_path, monkeypatch) -> None:
    bad = tmp_path / "p.txt"
    bad.write_bytes(b"caf\xe9")
    code, _, err = run("trigger", "--device-id", "d", "--prompt-file", str(bad))
    assert code == 2 and "UTF-8" in err
    code, _, err = run("trigger", "--device-id", "d", "caf\udce9")  # how Python passes such argv bytes
    assert code == 2 and "UTF-8" in err


def test_an_unexpected_error_is_one_line_a_hint_and_exit_70(tmp_path, monkeypatch) -> None:
    from agent.orchestrator import Orchestrator

    def boom(self, *a, **k):
        raise RuntimeError("something nobody expected")

    monkeypatch.setattr(Orchestrator, "run", boom)
    cfg = write(tmp_path, "c.yaml", "device_id: d\ncpu: {enabled: false}\n")
    code, _, err = run("trigger", "--config", str(cfg), "x")
    assert code == 70
    assert err.splitlines() == ["internal error: RuntimeError: something nobody expected",
                                "run again with -v to see the traceback, and please report it"]
    code, _, err = run("trigger", "-v", "--config", str(cfg), "x")
    assert code == 70 and "Traceback" in err


def test_status_without_a_broker_exits_5(tmp_path) -> None:
    from tests.support.mosquitto import free_port
    code, _, err = run("status", "--device-id", "d", "--broker", f"127.0.0.1:{free_port()}")
    assert code == 5 and "not reachable" in err


def test_check_says_a_ready_device_is_ready(env: Env) -> None:
    from tests.support.fake_openai import FakeOpenAI
    with FakeOpenAI() as server:
        cfg = env.config("board", npu=sim(base_ms=1),
                         cpu={"kind": "openai", "base_url": server.base_url, "model": "llama3.2:1b"})
        code, out, err = run("check", "--config", str(cfg))
    assert code == 0, out + err
    assert [line.split()[:2] for line in out.splitlines()] == [
        ["✓", "config"], ["✓", "state_dir"], ["✓", "npu"], ["✓", "cpu"], ["✓", "broker"]]
    assert "connected" in out


def test_check_reports_every_problem_at_once(tmp_path) -> None:
    from tests.support.fake_openai import FakeOpenAI
    from tests.support.launch import node_doc, write_config
    from tests.support.mosquitto import free_port
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with FakeOpenAI() as server:
        cfg = write_config(tmp_path / "c.yaml", node_doc(
            "board", port=free_port(), prefix="t/", state_dir=blocker / "state",
            npu={"kind": "command", "argv": ["no-such-runner", "{prompt}"]},
            cpu={"kind": "openai", "base_url": server.base_url, "model": "qwen3:8b"}))
        code, out, _ = run("check", "--config", str(cfg))
    assert code == 2, "something to fix"
    lines = {line.split()[1]: line for line in out.splitlines()}
    assert lines["state_dir"].startswith("✗") and str(blocker) in lines["state_dir"]
    assert lines["npu"].startswith("✗") and "no-such-runner" in lines["npu"]
    assert lines["cpu"].startswith("✗") and "qwen3:8b" in lines["cpu"] and "llama3.2:1b" in lines["cpu"]
    assert lines["broker"].startswith("✗") and "not reachable" in lines["broker"]
    url = f"http://127.0.0.1:{free_port()}/v1"
    cfg = write_config(tmp_path / "d.yaml", node_doc("board", port=free_port(), prefix="t/", state_dir=tmp_path / "s",
                                                     cpu={"kind": "openai", "base_url": url, "model": "m"}))
    code, out, _ = run("check", "--config", str(cfg))
    assert code == 2 and "is the model server running?" in out


def test_check_asks_a_running_daemon_instead_of_taking_its_identity(env: Env) -> None:
    cfg = env.config("board", cpu=sim(base_ms=1))
    with env.node_process(cfg):
        code, out, err = run("check", "--config", str(cfg))
    assert code == 0, out + err
    assert "a node daemon runs here" in out
