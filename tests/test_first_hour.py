"""The first hour of a new user and an operator: what a fleet set up by hand meets.

A board that boots before its broker, interruptions that must not teach the learner,
answers that always come, a `check` that changes nothing, a `forget` that forgets.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from agent.bus import FIRST_CONNECT_MAX_S, FLAP_LIMIT, FLAP_WINDOW_S, Message, first_connect_delay, identity_verdict
from agent.dispatch import Answer, teaches_the_learner
from agent.errors import ExitCode
from agent.messages import Metrics, Snapshot, TriggerRequest
from agent.roster import Roster
from agent.topics import Topics
from tests.support.broker import Broker
from tests.support.fleet import WAIT_S, Env, sim
from tests.support.launch import NodeProcess
from tests.support.mosquitto import REPO, LocalMosquitto, free_port


def metrics_payload(device: str, health: str = "draining") -> bytes:
    snap = Snapshot(has_npu=False, npu_free=False, cpu_slots=1, cpu_percent=1.0, mem_available_mb=100.0,
                    load1=0.0, queue_depth=0)
    return Metrics(device=device, ts=0.0, snapshot=snap, health=health).to_payload()


# --------------------------------------------------------------------- booting before the broker


def test_before_a_first_connection_a_node_knocks_at_least_once_a_second() -> None:
    delays = [first_connect_delay(n, u) for n in range(40) for u in (0.0, 0.5, 0.999)]
    assert max(delays) <= FIRST_CONNECT_MAX_S <= 1.0
    assert first_connect_delay(0, 0.0) < first_connect_delay(3, 0.0), "backs off from a quick first retry"
    assert first_connect_delay(0, 0.0) < first_connect_delay(0, 0.999), "jittered"


@pytest.mark.broker
@pytest.mark.parametrize("role", ["worker", "only-asks"])
@pytest.mark.parametrize("where", ["primary", "failover"])
def test_a_node_started_before_its_broker_connects_when_it_appears(tmp_path: Path, role: str, where: str) -> None:
    """The normal case after a power cut: nothing listens yet when the node starts."""
    port, dead = free_port(), free_port()
    broker = LocalMosquitto(tmp_path / "mosquitto", port=port)
    world = Env(broker=Broker(broker.host, port, "mosquitto", local=broker), prefix="boot/", tmp=tmp_path)
    extra = {"broker": {"host": "127.0.0.1", "port": dead, "keepalive_s": 2,
                        "failover": [f"127.0.0.1:{port}"]}} if where == "failover" else {}
    config = world.config("early", cpu=sim(base_ms=1) if role == "worker" else None, **extra)
    node = NodeProcess(config, "early", arrivals=None, log=tmp_path / "early.log")  # type: ignore[arg-type]
    node.launch()
    try:
        # The node is now retrying against a port where nothing listens.
        assert node.wait_log("retrying", WAIT_S), node.log_text()
        broker.start()
        with world.spy(world.topics.availability("early")) as spy:
            spy.wait_for(lambda m: m.payload == b"online", what="the early node online")
        assert node.running
        assert "Traceback" not in node.log_text()
    finally:
        node.stop()
        world.close()
        broker.stop()


# --------------------------------------------------------------------- what the learner learns

@pytest.mark.parametrize("code,teaches", [(ExitCode.OK, True), (ExitCode.FAILED, True), (ExitCode.TIMEOUT, True),
                                          (ExitCode.INTERRUPTED, False), (ExitCode.TERMINATED, False)])
def test_a_job_its_asker_gave_up_on_is_no_lesson_about_the_device(code: ExitCode, teaches: bool) -> None:
    assert teaches_the_learner(Answer(code == ExitCode.OK, code)) is teaches


# --------------------------------------------------------------------- two nodes, one device_id

def test_only_a_newcomer_gives_up_its_identity() -> None:
    taken = dict(taken_over=True, flaps=0)
    assert identity_verdict(held_s=0.2, established=False, **taken)[0] == "give_up", "the newcomer"
    assert identity_verdict(held_s=0.2, established=True, **taken)[0] == "reconnect", "taken back by the original"
    assert identity_verdict(held_s=300.0, established=False, **taken) == ("reconnect", 0, True)
    # MQTT 3.1.1: quick drops only; the newcomer gives up after FLAP_LIMIT of them, the original never.
    flaps, verdicts = 0, []
    for _ in range(FLAP_LIMIT):
        verdict, flaps, est = identity_verdict(taken_over=False, held_s=0.1, flaps=flaps, established=False)
        verdicts.append(verdict)
    assert verdicts == ["reconnect"] * (FLAP_LIMIT - 1) + ["give_up"] and not est
    assert all(identity_verdict(taken_over=False, held_s=0.1, flaps=n, established=True)[0] == "reconnect"
               for n in range(3 * FLAP_LIMIT))
    assert identity_verdict(taken_over=False, held_s=FLAP_WINDOW_S, flaps=FLAP_LIMIT - 1, established=False) == \
        ("reconnect", 0, True), "a connection held past a flap resets the count"


# --------------------------------------------------------------------- forget

def test_a_cleared_retained_presence_removes_the_device_from_the_roster() -> None:
    topics = Topics("")
    roster = Roster(topics, "hub")
    roster.handle(Message(topics.availability("old-pi"), b"offline", retain=True))
    roster.handle_metrics(Message(topics.metrics("old-pi"), metrics_payload("old-pi"), retain=True))
    assert "old-pi" in roster.known() and "old-pi" in roster.metrics()
    roster.handle(Message(topics.availability("old-pi"), b"", retain=False))
    roster.handle_metrics(Message(topics.metrics("old-pi"), b"", retain=False))
    assert "old-pi" not in roster.known() and "old-pi" not in roster.metrics(), "no ghost row"


@pytest.mark.broker
def test_forget_through_the_daemon_leaves_no_ghost_and_refuses_an_unknown_device(env: Env) -> None:
    hub = env.config("hub", cpu=sim(base_ms=1))
    old = env.config("old-pi", cpu=sim(base_ms=1))
    with env.node_process(hub):
        with env.node_process(old):
            pass  # it ran once, and is retired: offline, its metrics retained
        with env.spy(env.topics.availability("old-pi")) as spy:
            spy.wait_for(lambda m: m.payload == b"offline", what="old-pi offline")
        code, out, _, err = env.run("forget", "--config", str(hub), "old-pi")
        assert code == 0 and "forgot old-pi" in out, err
        code, status, _, err = env.status(hub)
        assert code == 0 and status is not None, err
        assert [d["device"] for d in status["devices"]] == ["hub"], "forgotten through the daemon: no ghost"

        code, out, _, err = env.run("forget", "--config", str(hub), "nosuchdevice")
        assert code == 2 and "knows no device 'nosuchdevice'" in err and out == ""
        code, status, _, err = env.status(hub)
        assert [d["device"] for d in status["devices"]] == ["hub"], "no phantom row"


# --------------------------------------------------------------------- triggers always answered

@pytest.mark.broker
def test_a_bad_or_oversized_mqtt_trigger_with_an_id_gets_an_answer_saying_why(env: Env) -> None:
    node = env.node_process(env.config("dev", cpu=sim(base_ms=1)))
    mine = f"{env.prefix}clients/kitchen/reply"
    huge = {"prompt": "x" * 1_000_000, "id": "b3"}
    with node, env.spy(f"{env.prefix}agent/dev/answer/#") as answers, env.spy(mine) as replies:
        answers.publish(env.topics.trigger("dev"), json.dumps({"promt": "typo", "id": "b2"}).encode())
        answers.publish(env.topics.trigger("dev"), json.dumps(huge).encode())
        answers.publish(env.topics.trigger("dev"), b"\xff not utf-8", response_topic=mine, correlation_data=b"b4")
        typo = answers.wait_for(lambda m: m.topic.endswith("/answer/b2"), what="the answer to b2")
        big = answers.wait_for(lambda m: m.topic.endswith("/answer/b3"), what="the answer to b3")
        raw = replies.wait_for(lambda m: True, what="the answer on the response topic")
    typo_a, big_a, raw_a = (json.loads(m.payload) for m in (typo, big, raw))
    assert (typo_a["ok"], typo_a["id"]) == (False, "b2") and "promt" in typo_a["error"], typo_a
    assert (big_a["ok"], big_a["id"]) == (False, "b3") and "exceeds" in big_a["error"], big_a["error"]
    assert (raw_a["ok"], raw_a["id"]) == (False, "b4") and "UTF-8" in raw_a["error"], raw_a
    assert "dropped trigger" in node.log_text() and "exceeds" in node.log_text()


@pytest.mark.parametrize("payload,correlation,expected", [
    (b'{"promt": "x", "id": "b2"}', None, "b2"),
    (b'{"prompt": "x", "id": "not an id!"}', b"c-1", "c-1"),
    (b"\xff\xfe", b"c-2", "c-2"),
    (b"{broken", None, None),
    (b'["id"]', b"bad id!", None),
])
def test_the_reply_id_of_a_trigger_that_cannot_be_used(payload: bytes, correlation: bytes | None,
                                                       expected: str | None) -> None:
    assert TriggerRequest.reply_id(payload, correlation) == expected


# --------------------------------------------------------------------- check

def tree(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_mode) for p in root.rglob("*"))


@pytest.mark.broker
@pytest.mark.parametrize("config", sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml")))
def test_check_on_every_shipped_config_reports_everything_at_once_and_writes_nothing(
        env: Env, tmp_path: Path, config: str) -> None:
    home, scratch = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    scratch.mkdir()
    state = tmp_path / "state"
    before = tree(home), tree(scratch)
    proc = subprocess.run([sys.executable, "-m", "agent", "check", "--config", str(REPO / config)],
                          cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "HOME": str(home), "TMPDIR": str(scratch),
                               "AGENT_BROKER_HOST": env.broker.host, "AGENT_BROKER_PORT": str(env.broker.port),
                               "AGENT_STATE_DIR": str(state)})
    assert (tree(home), tree(scratch)) == before and not state.exists(), "check wrote something"
    lines = {}
    for line in proc.stdout.splitlines():
        lines.setdefault(line.split()[1], []).append(line)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert set(lines) >= {"config", "state_dir", "broker"}, proc.stdout + proc.stderr
    assert lines["state_dir"][0].startswith("✓") and "will be created" in lines["state_dir"][0]
    doc = yaml.safe_load((REPO / config).read_text())
    if not doc.get("cpu", {}).get("enabled", True) and not doc.get("npu", {}).get("enabled", False):
        assert lines["runners"][0].startswith("✓ runners    none"), "a device that only asks is valid"
    secured = "password_file" in doc.get("broker", {})
    if secured:  # the files the example names do not exist here: said, and everything else too
        assert [line.split()[2] for line in lines["files"]] == ["broker.tls.ca_file:", "broker.password_file:"]
        assert lines["broker"][0].startswith("✗") and "answers on TCP" in lines["broker"][0]
        assert any(mode in lines for mode in ("cpu", "npu")), "the model runner is checked as well"
        assert proc.returncode == 2
    else:  # the demo fleet and a device that only asks: ready
        assert all(line.startswith("✓") for found in lines.values() for line in found), proc.stdout
        assert proc.returncode == 0


# --------------------------------------------------------------------- no broker

def test_without_a_broker_trigger_warns_once_and_never_inside_the_answer(tmp_path: Path) -> None:
    laptop = REPO / "configs/fleet/laptop.yaml"
    proc = subprocess.run([sys.executable, "-m", "agent", "trigger", "--config", str(laptop), "hello there"],
                          cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "AGENT_BROKER_PORT": str(free_port()),
                               "AGENT_STATE_DIR": str(tmp_path / "state")})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("not reachable") == 1, proc.stderr
    assert proc.stderr.startswith("warning: broker"), "the first thing on stderr, on its own line"
    assert proc.stdout.endswith("hello there\n"), "the answer's line is ended before the warning"


# --------------------------------------------------------------------- the demo, pasted

def test_a_python_without_the_dependencies_is_a_setup_error_not_a_bug() -> None:
    code = "import sys; sys.modules['paho'] = None; from agent.cli import main; raise SystemExit(main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", code, "status", "--device-id", "d", "--broker", "127.0.0.1:1"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "lacks the module 'paho'" in proc.stderr and ".venv/bin/python" in proc.stderr
    assert "report it" not in proc.stderr


@pytest.mark.broker
def test_the_demos_printed_commands_work_when_pasted_into_a_new_shell(tmp_path: Path) -> None:
    demo = subprocess.Popen([sys.executable, "scripts/demo.py", "--rounds", "1", "--stay"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in demo.stdout or ()], daemon=True)
    reader.start()
    printed: list[str] = []
    try:
        while True:
            line = lines.get(timeout=120)
            printed.append(line)
            if "stays up" in line:
                break
        triggers = [line[2:].strip() for line in printed if line.startswith("$ ") and " trigger " in line]
        assert triggers and all(" .venv/bin/python -m agent " in t for t in triggers), printed
        # A new shell: no virtualenv on PATH, nothing of the demo's environment.
        clean = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path)}
        pasted = subprocess.run(["bash", "-c", triggers[1]], cwd=REPO, env=clean, capture_output=True, text=True,
                                timeout=60)
        assert pasted.returncode == 0, pasted.stderr
        assert "✓ Winner: board-npu (NPU - Peer)" in pasted.stdout and "warning" not in pasted.stderr
    finally:
        demo.send_signal(signal.SIGINT)
        code = demo.wait(60)
        reader.join(10)  # the pipe's end: everything read
        if demo.stdout is not None:
            demo.stdout.close()
    assert code == 0, "".join(printed[-20:])


# --------------------------------------------------------------------- a broker by hand

@pytest.mark.broker
def test_scripts_broker_runs_a_private_broker_and_refuses_a_taken_port(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "scripts/broker.py", "--port", str(port), "--dir", str(tmp_path / "b")],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        said = [proc.stdout.readline() for _ in range(3)]
        assert f"export AGENT_BROKER_HOST=127.0.0.1 AGENT_BROKER_PORT={port}" in said[2], said
        world = Env(broker=Broker("127.0.0.1", port, "external"), prefix="byhand/", tmp=tmp_path)
        with world.spy("byhand/#") as spy:
            spy.publish("byhand/hello", b"hi")
            spy.wait_for(lambda m: m.payload == b"hi", what="our own message back")
        taken = subprocess.run([sys.executable, "scripts/broker.py", "--port", str(port), "--dir", str(tmp_path / "c")],
                               cwd=REPO, capture_output=True, text=True, timeout=60)
        assert taken.returncode == 2 and "already listens" in taken.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "stopped" in out, err


def test_serve_says_at_start_that_its_broker_cannot_be_reached(tmp_path: Path) -> None:
    laptop = REPO / "configs/fleet/laptop.yaml"
    proc = subprocess.Popen([sys.executable, "-m", "agent", "serve", "--config", str(laptop), "--port", "0"],
                            cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "AGENT_BROKER_PORT": str(free_port()),
                                 "AGENT_STATE_DIR": str(tmp_path / "state")})
    try:
        assert proc.stderr is not None
        said = [proc.stderr.readline() for _ in range(2)]
        assert "serving the fleet" in said[0]
        assert "not reachable" in said[1] and "requests run on this device alone" in said[1], said
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    assert proc.returncode == 0


def test_output_into_a_closed_pipe_is_not_reported_as_a_bug(tmp_path: Path) -> None:
    """`… | head -1`: the reader has gone; that is not an internal error."""
    laptop = REPO / "configs/fleet/laptop.yaml"
    proc = subprocess.Popen([sys.executable, "-m", "agent", "trigger", "--config", str(laptop), "-q",
                             "word " * 20_000], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "AGENT_BROKER_PORT": str(free_port()),
                                 "AGENT_STATE_DIR": str(tmp_path / "state")})
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.read(5)  # the first bytes, as head -c 5 reads them
    proc.stdout.close()
    err = proc.stderr.read()
    proc.stderr.close()
    assert proc.wait(60) == 0, err
    assert "internal error" not in err
