"""Attacks by one device on another, on the production setup and without it.

A private Mosquitto runs what ``scripts/provision`` writes for a fleet — TLS on loopback,
a password per device, client id = username, the generated ACL — with devices ``alice``
(who asks), ``worker`` (who runs), ``bob`` (the attacker, a device like the others) and
the operators ``homeassistant`` and ``dashboard``. Each attack must fail at the broker (never delivered, not
authorised); the ones the agent can also refuse are then repeated on an open broker.
"""

from __future__ import annotations

import io
import json
import re
import secrets
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from agent.bus import Bus, new_nonce
from agent.cli import main
from agent.config import BrokerConfig, TLSConfig
from agent.messages import (
    Bid,
    BidRequest,
    Cancel,
    Capabilities,
    Job,
    Metrics,
    cancel_check,
    decode_result,
    new_cancel_key,
)
from agent.topics import Topics
from tests.support.fleet import WAIT_S, Env, Gate, Spy, executions, job
from tests.support.launch import ArrivalWatch, NodeProcess, node_doc, write_config
from tests.support.mosquitto import REPO, LocalMosquitto, free_port

pytestmark = pytest.mark.skipif(not shutil.which("mosquitto") or not shutil.which("openssl"),
                                reason="needs the mosquitto and openssl binaries")
PREFIX = "sec/"
T = Topics(PREFIX)
DEVICES = ("alice", "worker", "bob")


@dataclass
class Secured:
    broker: LocalMosquitto
    pki: Path
    work: Path

    def broker_config(self, user: str) -> BrokerConfig:
        folder = self.pki / "devices" / user
        return BrokerConfig(host="127.0.0.1", port=self.broker.port, username=user,
                            password_file=str(folder / "mqtt.password"), keepalive_s=2,
                            tls=TLSConfig(ca_file=str(folder / "ca.crt")))

    def config(self, device: str, **node: Any) -> Path:
        """The device's config: the snippet provision printed, plus the node's parts."""
        snippet = (self.pki / "devices" / device / "broker.yaml").read_text()
        doc = node_doc(device, port=self.broker.port, prefix=PREFIX, state_dir=self.work / "state" / device,
                       **node)
        doc["broker"] = {**__import__("yaml").safe_load(snippet)["broker"], "keepalive_s": 2}
        return write_config(self.work / f"{device}.yaml", doc)

    def client(self, user: str, client_id: str | None = None) -> Bus:
        nonce = new_nonce()
        bus = Bus(client_id or f"{user}-{nonce}", self.broker_config(user), persistent=False, name=user,
                  sync_topic=T.sync(user, nonce))
        bus.connect(WAIT_S)
        return bus

    def node(self, device: str, arrivals: ArrivalWatch, **node: Any) -> NodeProcess:
        return NodeProcess(self.config(device, **node), device, arrivals=arrivals, log=self.work / f"{device}.log")


def provision(*argv: str) -> str:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "provision"), *argv], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    work = tmp_path_factory.mktemp("secured")
    pki, port = work / "pki", free_port()
    # Both listeners, as a default provisioning writes them: devices use the TLS one.
    provision("--dir", str(pki), "init", "--broker-host", "127.0.0.1", "--broker-host", "localhost",
              "--port", str(port), "--loopback-port", str(free_port()), "--prefix", PREFIX,
              "--broker-dir", str(pki / "broker"), "--device-dir", str(pki / "devices" / "{device}"))
    for device in DEVICES:
        assert f"device_id: {device}" in provision("--dir", str(pki), "add", device)
    for operator in ("homeassistant", "dashboard", "admin"):  # one connection each: client id = username
        provision("--dir", str(pki), "add", operator, "--operator")
    broker = LocalMosquitto(work / "mosquitto", port=port, conf=pki / "broker" / "edge-agent.conf",
                            listeners_as_written=True)
    broker.start()
    provision("--dir", str(pki), "publish", "--as", "admin")  # what each device may claim: no NPU
    yield Secured(broker, pki, work)
    broker.stop()


@pytest.fixture
def watch(secured: Secured) -> Iterator[ArrivalWatch]:
    arrivals = ArrivalWatch("127.0.0.1", secured.broker.port, PREFIX, broker=secured.broker_config("dashboard"))
    yield arrivals
    arrivals.close()


def trigger(config: Path, prompt: str) -> tuple[int, dict[str, Any] | None, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(["trigger", "--config", str(config), "--json", "-q", prompt], stdout=out, stderr=err)
    return code, (json.loads(out.getvalue()) if out.getvalue().strip() else None), err.getvalue()


class InBackground:
    def __init__(self, config: Path, prompt: str):
        self.value: tuple[int, dict[str, Any] | None, str] | None = None
        self.thread = threading.Thread(target=self._run, args=(config, prompt), daemon=True)
        self.thread.start()

    def _run(self, config: Path, prompt: str) -> None:
        self.value = trigger(config, prompt)

    def result(self) -> tuple[int, dict[str, Any] | None, str]:
        self.thread.join(60)
        assert self.value is not None, "trigger did not finish"
        return self.value


# --------------------------------------------------------------------------- the fleet works

def test_provision_writes_private_files_and_a_broker_config_mosquitto_accepts(secured: Secured) -> None:
    for secret in [*secured.pki.glob("devices/*/mqtt.password"), secured.pki / "ca.key",
                   secured.pki / "broker" / "server.key", secured.pki / "broker" / "passwd"]:
        assert secret.stat().st_mode & 0o077 == 0, f"{secret} is readable by others"
    # (The tests run the broker as root, which it warns about; a real one runs as mosquitto.)
    log = "\n".join(line for line in secured.broker.log_lines if "run as root" not in line)
    assert "Warning" not in log and "recommended" not in log, log


def test_the_whole_path_works_with_tls_passwords_and_the_acl(secured: Secured, watch: ArrivalWatch) -> None:
    runs = secured.work / "runs-path.log"
    with secured.node("worker", watch, cpu=job(runs, "quick")):
        code, out, err = trigger(secured.config("alice"), "over tls")
        assert code == 0, err
        assert out is not None and out["winner"] == "worker" and out["text"].split() == ["over", "tls"]
        ha = secured.client("homeassistant")
        answers = Spy(ha, f"{PREFIX}agent/worker/answer/+")
        try:
            answers.publish(T.trigger("worker"), json.dumps({"prompt": "from home assistant", "id": "ha-1"}).encode())
            answer = json.loads(answers.wait_for(lambda m: True, what="the answer to Home Assistant").payload)
        finally:
            ha.stop()
    assert answer["ok"] and answer["text"].split() == ["from", "home", "assistant"]


# --------------------------------------------------------------------------- attacks

def test_a_device_reads_nothing_addressed_to_another(secured: Secured, watch: ArrivalWatch) -> None:
    runs = secured.work / "runs-read.log"
    bob = secured.client("bob")
    snoop = Spy(bob, f"{PREFIX}#")
    try:
        with secured.node("worker", watch, cpu=job(runs, "quick")):
            code, _, err = trigger(secured.config("alice"), "private question")
            assert code == 0, err
            code, _, err = trigger(secured.config("worker"), "the worker asks too")
        seen = snoop.topics_seen()
    finally:
        bob.stop()
    kinds = {T.parse(topic).kind for topic in seen if T.parse(topic)}  # type: ignore[union-attr]
    assert "bid_request" in kinds, "bob does see the public calls for bids (the spy works)"
    assert kinds <= {"bid_request", "availability", "metrics", "presence", "capabilities"}, seen


def test_a_device_cannot_cancel_replace_or_crash_anothers_job(secured: Secured, watch: ArrivalWatch) -> None:
    runs, gate = secured.work / "runs-cancel.log", Gate(secured.work / "gate-cancel")
    bob = secured.client("bob")
    calls = Spy(bob, T.all_bid_requests())
    ha = secured.client("homeassistant")
    busy = Spy(ha, T.metrics("worker"))
    try:
        with secured.node("worker", watch, cpu=job(runs, "hold", gate)):
            asked = InBackground(secured.config("alice"), "the real question")
            rid = BidRequest.from_payload(calls.wait_for(lambda m: not m.retain, what="alice's call").payload).rid
            busy.wait_for(lambda m: Metrics.from_payload(m.payload).snapshot.queue_depth >= 1, what="job running")
            key = secrets.token_hex(16)
            # Cancels: on alice's cancel topic (not bob's to write), and on bob's own with
            # alice named inside (the topic and the payload disagree) or bob as origin.
            for topic, origin in ((T.cancel("worker", "alice"), "alice"), (T.cancel("worker", "bob"), "alice"),
                                  (T.cancel("worker", "bob"), "bob")):
                bob.publish(topic, Cancel(rid, origin, key, "bob says stop").to_payload())
            # A job of bob's under alice's rid, and results in alice's inbox: garbage from
            # bob (his own id: allowed), and a forged answer in worker's name (not allowed).
            forged = Job(rid, "alice", "cpu", "a-guess", "bob's question", 8, 5.0, 60.0, T.result_stem("alice", rid))
            bob.publish(T.exec("worker"), forged.to_payload())
            bob.publish(T.result("alice", rid, "bob"), b"[" * 5000)
            bob.publish(T.result("alice", rid, "bob"), b'{"v": 3, "type": "done", "rid": "' + rid.encode() + b'"}')
            bob.publish(T.result("alice", rid, "worker"),
                        b'{"v":3,"type":"done","rid":"' + rid.encode() + b'","device":"worker","text":"pwned",'
                        b'"timings":{}}')
            bob.publish(T.result("alice", rid, "worker"), json.dumps(
                {"v": 2, "type": "error", "rid": rid, "device": "worker", "reason": "bob says it failed",
                 "digest": forged.digest}).encode())
            assert bob.barrier(WAIT_S)
            gate.release()
            code, out, err = asked.result()
    finally:
        bob.stop()
        ha.stop()
    assert code == 0, err
    assert out is not None and out["winner"] == "worker" and out["text"].split() == ["the", "real", "question"]
    assert executions(runs) == {rid: {"start": 1, "done": 1}}, "it ran once, to the end"
    log = (secured.work / "worker.log").read_text()
    assert "stale_claim" in log or "declined" in log, "bob's job was refused, not run"


def test_no_device_can_take_over_anothers_session(secured: Secured, watch: ArrivalWatch) -> None:
    runs = secured.work / "runs-session.log"
    ha = secured.client("homeassistant")
    presence = Spy(ha, T.availability("worker"))
    try:
        with secured.node("worker", watch, cpu=job(runs, "quick")) as worker:
            # On the TLS listener devices use (what the device's own config names).
            assert secured.broker_config("bob").tls is not None
            impostor = secured.client("bob", client_id="worker")  # the broker makes it "bob"
            impostor.stop()
            assert ha.barrier(WAIT_S)
            taken = [line for line in secured.broker.log_lines if "already connected" in line]
            assert not taken, taken
            assert worker.running and not [m for m in presence.seen if m.payload == b"offline" and not m.retain], \
                "worker was never knocked off"
            code, out, err = trigger(secured.config("alice"), "still there")
            assert code == 0 and out is not None and out["winner"] == "worker", err
    finally:
        ha.stop()


def test_a_device_without_a_daemon_waits_for_its_own_other_connection(secured: Secured, watch: ArrivalWatch) -> None:
    """One connection per device (client id = username): two triggers of one device take
    turns instead of knocking each other off, and both are answered."""
    runs, gate = secured.work / "runs-turns.log", Gate(secured.work / "gate-turns")
    with secured.node("worker", watch, cpu=job(runs, "hold", gate), slots=2):
        first = InBackground(secured.config("alice"), "first")
        ha = secured.client("homeassistant")
        try:
            Spy(ha, T.metrics("worker")).wait_for(
                lambda m: Metrics.from_payload(m.payload).snapshot.queue_depth >= 1, what="the first job")
        finally:
            ha.stop()
        second = InBackground(secured.config("alice"), "second")
        gate.release(runs=2)
        results = [first.result(), second.result()]
    assert [r[0] for r in results] == [0, 0], [r[2] for r in results]
    assert sorted(r[1]["text"].strip() for r in results if r[1]) == ["first", "second"]


# --------------------------------------------------------------------------- and with the ACL off

def bid_for(spy: Spy, t: Topics, rid: str, device: str) -> Bid:
    spy.publish(t.bid_request(rid), BidRequest(rid=rid, origin="hub", window_s=30, prompt_tokens=1,
                                               max_new_tokens=8).to_payload())
    return Bid.from_payload(spy.wait_for(lambda m: m.topic == t.bid_reply("hub", rid, device),
                                         what="its bid").payload)


def test_on_an_open_broker_the_agent_still_refuses_forged_cancels_and_jobs(env: Env) -> None:
    """Without the ACL anyone reads everything and may send anything, claims included. The
    agent still runs the genuine job: a cancel needs the origin's key, never sent before
    the cancel itself, and a second job under a running rid is refused."""
    runs, gate = env.tmp / "runs.log", Gate(env.tmp / "gate")
    t = env.topics
    with env.node_process(env.config("worker", cpu=job(runs, "hold", gate))), env.spy(f"{env.prefix}#") as spy:
        bid = bid_for(spy, t, "r1", "worker")
        key = new_cancel_key()
        genuine = Job("r1", "hub", "cpu", bid.claim, "the genuine job", 8, 5.0, 60.0, t.result_stem("hub", "r1"),
                      cancel_check=cancel_check(key))
        spy.publish(t.exec("worker"), genuine.to_payload())
        spy.wait_for(lambda m: m.topic == t.result("hub", "r1", "worker") and b'"accepted"' in m.payload,
                     what="accepted")
        spy.publish(t.cancel("worker", "hub"), Cancel("r1", "hub", genuine.cancel_check, "a guess").to_payload())
        spy.publish(t.exec("worker"), replace(genuine, prompt="bob's job").to_payload())
        conflict = decode_result(spy.wait_for(lambda m: b"rid_conflict" in m.payload, what="refused").payload)
        gate.release()
        done = decode_result(spy.wait_for(lambda m: b'"done"' in m.payload, what="done").payload)
    assert conflict.digest != genuine.digest
    assert getattr(done, "digest", None) == genuine.digest and "genuine" in getattr(done, "text", "")
    assert executions(runs) == {"r1": {"start": 1, "done": 1}}


def test_the_broker_files_work_the_debian_way(secured: Secured, tmp_path: Path) -> None:
    """README: the conf.d file next to Debian's main mosquitto.conf, which already sets
    persistence (repeating its location stops Mosquitto) and includes conf.d."""
    confd = tmp_path / "conf.d"
    confd.mkdir()
    conf = (secured.pki / "broker" / "edge-agent.conf").read_text()
    conf = re.sub(r"^listener \d+ 127\.0\.0\.1$", f"listener {free_port()} 127.0.0.1", conf, flags=re.M)
    conf = conf.replace(f"listener {secured.broker.port}\n", f"listener {free_port()}\n")
    (confd / "edge-agent.conf").write_text(conf)
    main_conf = tmp_path / "mosquitto.conf"
    main_conf.write_text(f"persistence true\npersistence_location {tmp_path}/\nlog_dest stderr\nlog_type information\n"
                         f"include_dir {confd}\n")
    broker = LocalMosquitto(tmp_path / "run", conf=main_conf)
    broker.start()
    try:
        problems = [line for line in broker.log_lines if ("Error" in line or "Warning" in line)
                    and "run as root" not in line]
    finally:
        broker.stop()
    assert problems == [], problems


def test_every_listener_provision_writes_makes_the_username_the_client_id(secured: Secured) -> None:
    """Mosquitto applies use_username_as_clientid to the listener it follows only."""
    conf = (secured.pki / "broker" / "edge-agent.conf").read_text()
    blocks = re.split(r"^(?=listener )", conf, flags=re.M)[1:]
    assert len(blocks) == 2, conf
    for block in blocks:
        assert re.search(r"^use_username_as_clientid true$", block, flags=re.M), block.splitlines()[0]


def test_on_an_open_broker_a_result_without_the_jobs_digest_is_not_believed(env: Env) -> None:
    """Without the ACL anyone may publish in the worker's name. A forged ``done`` or
    ``error`` that does not carry the digest of the job sent is not about it: the user
    gets the genuine answer, not the forgery, and the job is not aborted."""
    runs, gate = env.tmp / "runs.log", Gate(env.tmp / "gate")
    t = env.topics
    with env.node_process(env.config("worker", cpu=job(runs, "hold", gate))), env.spy(f"{env.prefix}#") as spy:
        answer: list[tuple[int, dict[str, Any] | None, str, str]] = []
        asking = threading.Thread(target=lambda: answer.append(env.trigger(env.config("hub"),
                                                                           "the real question")))
        asking.start()
        try:
            accepted = spy.wait_for(lambda m: (p := t.parse(m.topic)) is not None and p.kind == "result"
                                    and b'"accepted"' in m.payload, what="the job accepted")
            rid = json.loads(accepted.payload)["rid"]
            for forged in ({"type": "error", "reason": "bob says it failed", "kind": "failed"},
                           {"type": "done", "text": "pwned", "timings": {}}):
                spy.publish(t.result("hub", rid, "worker"),
                            json.dumps({"v": 2, "rid": rid, "device": "worker", **forged}).encode())
        finally:
            gate.release()
            asking.join(60)
    code, out, _, err = answer[0]
    assert code == 0, err
    assert out is not None and out["text"].split() == ["the", "real", "question"]


def test_retained_calls_for_bids_and_jobs_are_never_acted_on(secured: Secured, watch: ArrivalWatch) -> None:
    """bob leaves a call for bids and a job retained on the broker: every node that
    connects later would bid on the call and answer the job. Neither is ever genuine.
    (alice's node: a device that never had a node session, so its subscriptions are new
    and the broker hands it the retained messages as such.)"""
    runs = secured.work / "runs-retained.log"
    bob = secured.client("bob")
    answers = Spy(bob, f"{PREFIX}#")  # bob reads the bids and results addressed to him
    retained = [(T.bid_request("left-behind", "bob"), BidRequest("left-behind", "bob", 3600.0, 1, 8).to_payload()),
                (T.exec("alice"), Job("left-job", "bob", "cpu", "a-guess", "bob's question", 8, 3600.0, 3600.0,
                                       T.result_stem("bob", "left-job")).to_payload())]
    try:
        for topic, payload in retained:
            bob.publish(topic, payload, retain=True)
        assert bob.barrier(WAIT_S)
        with secured.node("alice", watch, cpu=job(runs, "quick")):
            # A genuine job after them: the node has seen both retained ones by then.
            code, out, err = trigger(secured.config("worker"), "after the retained ones")
            assert code == 0 and out is not None and out["winner"] == "alice", err
        assert bob.barrier(WAIT_S)
    finally:
        for topic, _ in retained:
            bob.publish(topic, b"", retain=True)
        bob.barrier(WAIT_S)
        bob.stop()
    acted = [m.topic for m in answers.seen if (p := T.parse(m.topic)) is not None
             and p.kind in ("bid_reply", "result") and p.rid in ("left-behind", "left-job")]
    assert acted == [], f"the node acted on retained messages: {acted}"
    assert "left-job" not in executions(runs)


def test_a_flood_of_calls_from_one_device_does_not_void_anothers_auction(secured: Secured,
                                                                         watch: ArrivalWatch) -> None:
    """6000 calls for bids from bob between worker's bid to alice and alice's job: the
    claim worker gave alice is still good (each caller has its own share of claims)."""
    runs = secured.work / "runs-flood.log"
    alice, bob = secured.client("alice"), secured.client("bob")
    try:
        with secured.node("worker", watch, cpu=job(runs, "quick")):
            mail = Spy(alice, f"{PREFIX}#")

            def call(rid: str) -> Bid:
                mail.publish(T.bid_request(rid, "alice"), BidRequest(rid, "alice", 30.0, 1, 8).to_payload())
                return Bid.from_payload(mail.wait_for(lambda m: m.topic == T.bid_reply("alice", rid, "worker"),
                                                      what=f"worker's bid for {rid}").payload)
            bid = call("genuine")
            for i in range(6000):
                bob.publish(T.bid_request(f"flood-{i}", "bob"), BidRequest(f"flood-{i}", "bob", 30.0, 1, 8)
                            .to_payload())
            assert bob.barrier(60)
            call("after-the-flood")  # worker has handled every call of the flood by then
            mail.publish(T.exec("worker"), Job("genuine", "alice", "cpu", bid.claim, "the genuine job", 8, 30.0, 60.0,
                                               T.result_stem("alice", "genuine")).to_payload())
            end = mail.wait_for(lambda m: m.topic == T.result("alice", "genuine", "worker")
                                and decode_result(m.payload).type in ("done", "declined", "error"), what="its end")
    finally:
        alice.stop()
        bob.stop()
    event = decode_result(end.payload)
    assert event.type == "done", event
    assert executions(runs) == {"genuine": {"start": 1, "done": 1}}


def test_a_device_that_claims_hardware_it_was_not_granted_is_not_picked_for_it(secured: Secured,
                                                                                watch: ArrivalWatch) -> None:
    """bob's node bids a free NPU; the operator's record for bob (provision publish) grants
    none, so alice's orchestrator ignores the claim and the prompt goes to worker. And bob
    cannot write his own record."""
    bob_runs, worker_runs = secured.work / "runs-liar.log", secured.work / "runs-honest.log"
    bob = secured.client("bob")
    try:
        bob.publish(T.capabilities("bob"), Capabilities("bob", npu=True).to_payload(), retain=True)
        assert bob.barrier(WAIT_S)
    finally:
        bob.stop()
    with secured.node("worker", watch, cpu=job(worker_runs, "quick")), \
            secured.node("bob", watch, npu=job(bob_runs, "quick")):
        code, out, err = trigger(secured.config("alice"), "who has an NPU?")
    assert code == 0 and out is not None, err
    assert [b["has_npu"] for b in out["bids"] if b["device"] == "bob"] == [False], "its claim, as vouched for"
    assert (out["winner"], out["path"]) == ("worker", "peer-cpu")
    assert executions(bob_runs) == {}


def test_provision_keeps_what_each_device_may_claim_and_clears_a_removed_ones(tmp_path: Path) -> None:
    import importlib.machinery
    import importlib.util
    loader = importlib.machinery.SourceFileLoader("provision_script", str(REPO / "scripts" / "provision"))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    script = importlib.util.module_from_spec(spec)
    loader.exec_module(script)
    pki = tmp_path / "pki"
    provision("--dir", str(pki), "init", "--broker-host", "127.0.0.1", "--prefix", PREFIX)
    provision("--dir", str(pki), "add", "board", "--npu", "--model", "llama")
    provision("--dir", str(pki), "add", "laptop")
    provision("--dir", str(pki), "add", "gone")
    provision("--dir", str(pki), "remove", "gone")
    provision("--dir", str(pki), "grant", "laptop", "--model", "qwen")
    records = dict(script.Pki(pki).records())
    assert records[T.capabilities("gone")] == b"", "a removed device's record is cleared"
    assert Capabilities.from_payload(records[T.capabilities("board")]) == Capabilities("board", True, ("llama",))
    assert Capabilities.from_payload(records[T.capabilities("laptop")]) == Capabilities("laptop", False, ("qwen",))
    assert "an NPU, models llama" in provision("--dir", str(pki), "list")


def test_on_an_open_broker_a_forged_cancel_does_not_undo_a_genuine_one_before_the_job(env: Env) -> None:
    """hub abandons a job before it reaches worker (its cancel comes first); bob, who reads
    everything here, cancels the same rid in hub's name with a key of his own. The job,
    when it arrives, must still be declined, never run."""
    runs = env.tmp / "runs.log"
    t = env.topics
    with env.node_process(env.config("worker", cpu=job(runs, "quick"))), env.spy(f"{env.prefix}#") as spy:
        bid = bid_for(spy, t, "r1", "worker")
        key = new_cancel_key()
        spy.publish(t.cancel("worker", "hub"), Cancel("r1", "hub", key, "failed over").to_payload())
        spy.publish(t.cancel("worker", "hub"), Cancel("r1", "hub", new_cancel_key(), "bob's").to_payload())
        spy.publish(t.exec("worker"), Job("r1", "hub", "cpu", bid.claim, "abandoned", 8, 5.0, 60.0,
                                          t.result_stem("hub", "r1"), cancel_check=cancel_check(key)).to_payload())
        end = decode_result(spy.wait_for(lambda m: m.topic == t.result("hub", "r1", "worker")
                                         and decode_result(m.payload).type in ("declined", "accepted"),
                                         what="the job's fate").payload)
    assert end.type == "declined" and getattr(end, "reason", "") == "cancelled", end
    assert executions(runs) == {}
