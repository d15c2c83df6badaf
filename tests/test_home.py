"""A real home: broker restarts, skewed clocks, frozen peers, full disks, signals, twins.

Every fault is injected for real: the broker process is stopped and started again on the
same port (with and without persistence), nodes run under libfaketime, are frozen with
SIGSTOP, sent SIGINT/SIGTERM, or limited in the file size they may write. Executions are
counted by the stand-in model (tests/support/job.py). An outage is held for a set time:
that duration is the fault being injected, not a wait for something to happen.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from agent.armstore import ArmStore
from agent.bus import FLAP_WINDOW_S
from agent.messages import Job, Metrics
from tests.support.broker import Broker
from tests.support.fleet import WAIT_S, Env, Gate, executions, job, sim
from tests.support.launch import NodeProcess
from tests.support.mosquitto import REPO, LocalMosquitto
from tests.test_reliability import Background, result_of

FAKETIME = next(iter(sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))), None)
WORDS = " ".join(f"w{i}" for i in range(60))  # 60 words at 50 ms: a 3 s job that streams


def hold_down(seconds: float) -> None:
    """The outage itself: the broker stays down this long."""
    threading.Event().wait(seconds)


@pytest.fixture(params=[True, False], ids=["persistent", "no-persistence"])
def private(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Env]:
    """A broker of this test's own, to stop and start; with or without persistence."""
    broker = LocalMosquitto(tmp_path / "mosquitto", persistence=request.param)
    broker.start()
    world = Env(broker=Broker(broker.host, broker.port, "mosquitto", local=broker), prefix="home/", tmp=tmp_path)
    yield world
    world.close()
    broker.stop()


# --------------------------------------------------------------------- broker restarts

@pytest.mark.parametrize("down_s", [1.0, 5.0])
@pytest.mark.parametrize("when", ["accepted", "token"])
def test_a_broker_restart_during_a_job_loses_nothing(private: Env, down_s: float, when: str) -> None:
    env = private
    log = env.tmp / "runs.log"
    hub = env.config("hub", auction={"accept_timeout_s": 3})
    node = env.config("worker", cpu=job(log, "work"))
    with env.node_process(node):
        with env.spy(f"{env.prefix}result/#") as spy:
            bg = Background(env, hub, WORDS)
            spy.wait_for(result_of(when), what=when)
        env.broker.local.stop()  # type: ignore[union-attr]
        hold_down(down_s)
        env.broker.local.start()  # type: ignore[union-attr]
        code, out, err = bg.result(timeout=60)
    assert code == 0, err
    assert out is not None and out["text"].split() == WORDS.split(), "the whole answer, not a part"
    assert list(executions(log).values()) == [{"start": 1, "done": 1}], "and the model ran once"


# --------------------------------------------------------------------- clock skew

@pytest.mark.skipif(FAKETIME is None, reason="needs libfaketime (apt-get install -y faketime)")
@pytest.mark.parametrize("node_skew,hub_skew", [("+10s", None), ("+120s", None), ("-120s", None),
                                                ("+0s", "-120s")])
def test_devices_whose_clocks_are_minutes_off_still_bid_run_and_answer(env: Env, node_skew: str,
                                                                      hub_skew: str | None) -> None:
    log = env.tmp / "runs.log"
    skewed = {"LD_PRELOAD": str(FAKETIME), "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    worker = NodeProcess(env.config("worker", cpu=job(log, "quick")), "worker", arrivals=env.arrivals,
                         log=env.tmp / "worker.log", env={**skewed, "FAKETIME": node_skew})
    hub = env.config("hub", auction={"bid_timeout_s": 10})
    with worker:
        for i in range(3):
            if hub_skew is None:
                code, out, _, err = env.trigger(hub, f"question {i}")
            else:  # the orchestrator's clock is the wrong one
                proc = subprocess.run([sys.executable, "-m", "agent", "trigger", "--config", str(hub), "--json", "-q",
                                       f"question {i}"], cwd=REPO, capture_output=True, text=True, timeout=60,
                                      env={**os.environ, **skewed, "FAKETIME": hub_skew})
                code, out, err = proc.returncode, json.loads(proc.stdout or "null"), proc.stderr
            assert code == 0, err
            assert out is not None and out["winner"] == "worker" and out["auction_ms"] < 5000, out
    assert len(executions(log)) == 3


@pytest.mark.skipif(FAKETIME is None, reason="needs libfaketime (apt-get install -y faketime)")
def test_a_skewed_clock_is_measured_and_logged_once(env: Env, caplog) -> None:
    caplog.set_level("WARNING", logger="agent.roster")
    skewed = {"LD_PRELOAD": str(FAKETIME), "FAKETIME_DONT_FAKE_MONOTONIC": "1", "FAKETIME": "+300s"}
    worker = NodeProcess(env.config("worker", cpu=sim(base_ms=1), metrics_interval_s=0.2), "worker",
                         arrivals=env.arrivals, log=env.tmp / "worker.log", env=skewed)
    watcher = env.config("watcher", cpu=sim(base_ms=1))
    with worker, env.node(watcher), env.spy(env.topics.metrics("worker")) as spy:
        spy.wait_for(lambda m: not m.retain, what="live metrics")
        spy.wait_for(lambda m: len([x for x in spy.seen if not x.retain]) >= 5, what="five live metrics")
    lines = [r.getMessage() for r in caplog.records if "clock of worker" in r.getMessage()]
    assert len(lines) == 1 and "+300" in lines[0].replace("+299", "+300"), lines


# --------------------------------------------------------------------- frozen peers

def test_a_frozen_peer_costs_one_auction_about_a_second_not_every_auction(env: Env) -> None:
    hub = env.config("hub", auction={"bid_timeout_s": 30})
    # peer-0 keeps its connection through the whole test when frozen (a long keepalive):
    # online to the broker, never bidding, as a hung process or a board stuck in I/O is.
    peers = [env.node_process(env.config(f"peer-{i}", cpu=sim(base_ms=1), broker={"keepalive_s": 60 if i == 0 else 2}))
             for i in range(3)]
    for p in peers:
        p.start()
    try:
        peers[0].pause()
        code, out, _, err = env.trigger(hub, "first")
        assert code == 0 and out is not None, err
        # Never heard from: overdue a second after the call, not 30 s (a loose bound for a
        # loaded machine; the warning says which rule closed it).
        assert out["auction_ms"] < 10_000, out["auction_ms"]
        assert any("peer-0" in w and "usually" in w for w in out["warnings"]), out["warnings"]
        later = [env.trigger(hub, f"later {i}") for i in range(3)]
        for code, out, _, err in later:
            assert code == 0, err
            # Closed by the stragglers rule (a short grace after the punctual peers), which
            # says so; not by the overdue rule's second, nor by the window.
            assert out is not None and out["auction_ms"] < 10_000, out["auction_ms"]
            assert any("peer-0" in w and "missed recent calls" in w for w in out["warnings"]), out["warnings"]
            assert not any("usually" in w for w in out["warnings"]), out["warnings"]
        peers[0].resume()
        code, out, _, _ = env.trigger(hub, "after it is back")
        assert code == 0 and out is not None
        code, out, _, _ = env.trigger(hub, "and again")
        assert out is not None and "peer-0" in [b["device"] for b in out["bids"]], "a bid makes it punctual again"
    finally:
        for p in peers:
            p.stop()


def test_a_peer_on_a_slow_link_is_still_waited_for_as_long_as_it_usually_takes(env: Env) -> None:
    """Its bids take ~1.4 s (0.7 s each way through a slow proxy), past the 1 s a peer is
    waited for at least: the asker learnt that from an auction it had alone, and waits."""
    from tests.support.proxy import CuttableProxy
    hub = env.config("hub", auction={"bid_timeout_s": 30})
    with CuttableProxy(env.broker.host, env.broker.port, delay_s=0.7) as proxy:
        far = env.node_process(env.config("far", cpu=sim(base_ms=1), broker={"port": proxy.port, "keepalive_s": 10}))
        near = env.node_process(env.config("near", cpu=sim(base_ms=1)))
        with far:
            code, out, _, err = env.trigger(hub, "alone")  # nobody else bids: waited for, and timed
            assert code == 0 and out is not None and out["winner"] == "far", err
            with near:
                code, out, _, err = env.trigger(hub, "with a fast peer")
    assert code == 0 and out is not None, err
    assert sorted(b["device"] for b in out["bids"]) == ["far", "near"], out["warnings"]
    assert out["warnings"] == [], out["warnings"]


def test_a_free_npu_closes_the_auction_without_waiting_for_a_frozen_cpu_peer(env: Env) -> None:
    hub = env.config("hub", auction={"bid_timeout_s": 20})
    npu = env.node_process(env.config("board", npu=sim(base_ms=1)))
    cpu = env.node_process(env.config("frozen", cpu=sim(base_ms=1)))
    with npu, cpu:
        with env.spy(env.topics.metrics("frozen")) as spy:  # its metrics say it has no NPU
            spy.wait_for(lambda m: True, what="metrics of the CPU peer")
        cpu.pause()
        try:
            code, out, _, err = env.trigger(hub, "npu please")
        finally:
            cpu.resume()
    assert code == 0, err
    assert out is not None and out["path"] == "peer-npu" and out["auction_ms"] < 2000, out


# --------------------------------------------------------------------- state on disk

def test_an_unusable_state_dir_stops_the_node_at_start_naming_it(env: Env) -> None:
    from tests.support.launch import node_doc, write_config
    blocker = env.tmp / "a-file"
    blocker.write_text("not a directory")
    node = write_config(env.tmp / "worker.yaml", node_doc("worker", port=env.broker.port, prefix=env.prefix,
                                                          state_dir=blocker / "state", cpu=sim(base_ms=1)))
    proc = subprocess.run([sys.executable, "-m", "agent", "--role", "node", "--config", str(node)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert str(blocker / "state") in proc.stderr and "Traceback" not in proc.stderr


def test_a_disk_that_fills_up_makes_the_node_step_aside_and_come_back(env: Env) -> None:
    """The node's journal hits a file-size limit (as on a full disk): it stops bidding and
    says why in its metrics; when the limit is lifted it takes work again."""
    log = env.tmp / "runs.log"
    hub = env.config("hub", auction={"bid_timeout_s": 3})
    worker = NodeProcess(env.config("worker", cpu=job(log, "quick"), metrics_interval_s=0.5), "worker",
                         arrivals=env.arrivals, log=env.tmp / "worker.log",
                         env={"PYTHONFAULTHANDLER": "1"})
    with worker, env.spy(env.topics.metrics("worker")) as metrics:
        assert env.trigger(hub, "fits")[0] == 0
        # From now on no file of the node may grow past its current size (EFBIG, like ENOSPC).
        journal = env.tmp / "state" / "worker" / "completed.jsonl"
        resource.prlimit(worker.pid, resource.RLIMIT_FSIZE, (journal.stat().st_size, resource.RLIM_INFINITY))
        code, out, _, err = env.trigger(hub, "this answer cannot be journaled")
        assert code == 0, "the answer itself still gets through"
        sick = metrics.wait_for(lambda m: Metrics.from_payload(m.payload).health != "ok", what="unhealthy metrics")
        assert "cannot" in Metrics.from_payload(sick.payload).health
        code, out, _, err = env.trigger(hub, "nobody to run this")
        assert code == 3 and out is not None and out["bids"] == [], "an unhealthy node does not bid"
        assert out["auction_ms"] < 2000, "and nobody waits out the window for it"
        resource.prlimit(worker.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        metrics.wait_for(lambda m: Metrics.from_payload(m.payload).health == "ok", after=sick, what="healthy again")
        code, out, _, err = env.trigger(hub, "back to work")
        assert code == 0, err
    assert worker.proc is not None and worker.proc.returncode == 0, "no thread died on the way"


def test_a_corrupt_arm_store_and_journal_do_not_stop_anything(env: Env) -> None:
    hub = env.config("hub")
    worker = env.config("worker", cpu=sim(base_ms=1))
    for device, name, content in (("hub", "arms.json", b'{"v": 2, "d": 6, "arms": []}'),
                                  ("worker", "completed.jsonl", b'{"rid": "x"}\nnot json at all\n\xff\xfe\n')):
        (env.tmp / "state" / device).mkdir(parents=True, exist_ok=True, mode=0o700)
        (env.tmp / "state" / device / name).write_bytes(content)
    with env.node(worker):
        code, out, _, err = env.trigger(hub, "still fine")
    assert code == 0, err
    assert list((env.tmp / "state" / "hub").glob("arms.json.corrupt-*")), "the bad store was set aside"


# --------------------------------------------------------------------- signals

@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.parametrize("through_daemon", [False, True])
def test_interrupting_trigger_cancels_the_remote_job(env: Env, sig: int, code: int, through_daemon: bool) -> None:
    log, gate = env.tmp / "runs.log", Gate(env.tmp / "gate")
    hub = env.config("hub")
    worker = env.config("worker", cpu=job(log, "token-then-hold", gate))
    hub_daemon = env.node_process(hub) if through_daemon else None
    with env.node_process(worker) as peer, env.spy(f"{env.prefix}#") as spy:
        if hub_daemon:
            hub_daemon.start()
        try:
            trigger = subprocess.Popen([sys.executable, "-m", "agent", "trigger", "--config", str(hub), "-q",
                                        "hold this"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            spy.wait_for(result_of("token", "worker"), what="the model running")
            trigger.send_signal(sig)
            _, err = trigger.communicate(timeout=WAIT_S)
            assert trigger.returncode == code, err
            assert "✗ interrupted; worker was told to stop" in err.decode() and b"went away" not in err, err
            spy.wait_for(lambda m: m.topic.endswith("/cancel/hub"), what="the cancel")
            spy.wait_for(result_of("error", "worker"), what="the job stopped on the worker")
        finally:
            if hub_daemon:
                hub_daemon.stop()
        (rid, counts), = executions(log).items()
        assert counts == {"start": 1, "done": 0}, "it never finished"
        assert "cancelled by hub" in peer.log_text()
    # Ctrl-C says nothing about the worker's speed: it was not trained as a failure.
    assert "worker" not in ArmStore(env.tmp / "state" / "hub").load().arms


def test_a_job_cancelled_while_queued_never_starts(env: Env) -> None:
    """One slot, held by a first job; a second waits in the queue; its trigger is
    interrupted: the cancel reaches the node before the slot frees, so it never runs."""
    log, gate = env.tmp / "runs.log", Gate(env.tmp / "gate")
    hub = env.config("hub")
    worker = env.config("worker", cpu=job(log, "hold", gate), slots=1)
    with env.node_process(worker) as peer, env.spy(f"{env.prefix}result/#") as spy:
        first = Background(env, hub, "first")
        running = spy.wait_for(result_of("accepted", "worker"), what="the first job accepted")
        second = subprocess.Popen([sys.executable, "-m", "agent", "trigger", "--config", str(hub), "-q", "second"],
                                  cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        queued = spy.wait_for(result_of("accepted", "worker"), after=running, what="the second job queued")
        assert json.loads(queued.payload)["queue_position"] == 1
        second.send_signal(signal.SIGINT)
        _, err = second.communicate(timeout=WAIT_S)
        assert second.returncode == 130, err
        # Know the node has handled the cancel: it handles its queue's messages in order,
        # so a probe job sent after it is declined after it.
        probe = Job("probe", "hub", "cpu", "not-a-claim", "probe", 8, 5.0, 60.0, env.topics.result_stem("hub", "probe"))
        spy.publish(env.topics.exec("worker"), probe.to_payload())
        spy.wait_for(result_of("declined", "worker"), what="the probe declined, after the cancel")
        assert "cancelled by hub" in peer.log_text()
        gate.release()
        code, out, err = first.result()
        assert code == 0 and out is not None and out["text"].strip() == "first", err
        dropped = spy.wait_for(lambda m: result_of("error", "worker")(m) and json.loads(m.payload)["rid"] ==
                               json.loads(queued.payload)["rid"], what="the queued job's end")
        assert "before it started" in json.loads(dropped.payload)["reason"], "its model was never started"
    (rid, counts), = executions(log).items()
    assert rid == out["rid"] and counts == {"start": 1, "done": 1}, "only the first job ran"


def test_a_node_holds_a_job_to_its_own_time_limit_whatever_the_job_asks(env: Env) -> None:
    """An orchestrator may ask for more time than a device allows: the device's limit holds."""
    log, gate = env.tmp / "runs.log", Gate(env.tmp / "gate")
    worker = env.config("worker", cpu=job(log, "hold", gate), auction={"job_timeout_s": 1})
    with env.node_process(worker):
        code, out, _, err = env.trigger(env.config("hub", auction={"job_timeout_s": 8}), "never ends")
    assert out is not None and not out["ok"] and code == 4, err
    assert out["error"] == "worker: timed out after 1.0 s"
    (_, counts), = executions(log).items()
    assert counts == {"start": 1, "done": 0}, "stopped, not finished"


def test_sigterm_on_a_node_lets_its_running_job_finish(env: Env) -> None:
    log, gate = env.tmp / "runs.log", Gate(env.tmp / "gate")
    hub = env.config("hub")
    worker = env.node_process(env.config("worker", cpu=job(log, "hold", gate), drain_s=30))
    worker.start()
    with env.spy(f"{env.prefix}result/#") as spy, env.spy(env.topics.metrics("worker")) as metrics:
        bg = Background(env, hub, "finish me")
        spy.wait_for(result_of("accepted"), what="accepted")
        worker.signal(signal.SIGTERM)
        metrics.wait_for(lambda m: json.loads(m.payload).get("health") == "draining", what="draining")
        code, out, _, _ = env.trigger(hub, "a newcomer", "--bid-timeout", "2")
        assert code == 3, "draining: no new work"
        gate.release()
        code, out, err = bg.result()
    assert code == 0 and out is not None and out["text"].strip() == "finish me", err
    assert worker.wait(WAIT_S) == 0
    assert "draining" in worker.log_text()


def test_a_second_signal_stops_a_draining_node_at_once(env: Env) -> None:
    log, gate = env.tmp / "runs.log", Gate(env.tmp / "gate")
    worker = env.node_process(env.config("worker", cpu=job(log, "hold", gate), drain_s=600))
    # Started by the with (and stopped by it if the test fails: a draining node left behind
    # would hold its job for 600 s and fail a later test when it is collected).
    with worker, env.spy(f"{env.prefix}result/#") as spy, env.spy(env.topics.metrics("worker")) as metrics:
        bg = Background(env, env.config("hub"), "long")
        spy.wait_for(result_of("accepted"), what="accepted")
        worker.signal(signal.SIGTERM)
        # As a person would: see it draining, then press again. (Two signals sent back
        # to back may reach Python as one.)
        metrics.wait_for(lambda m: json.loads(m.payload).get("health") == "draining", what="draining")
        worker.signal(signal.SIGTERM)
        assert worker.wait(WAIT_S) == 0
        code, out, err = bg.result()
    assert code != 0


# --------------------------------------------------------------------- identity, bounds

@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_second_node_with_the_same_device_id_gives_up_and_the_first_keeps_running(env: Env, protocol: str) -> None:
    """Only the newcomer may lose: the original may be a device that has run for weeks,
    and its unit does not restart it after exit 2. Tried three times against one original."""
    config = env.config("twin", cpu=sim(base_ms=1), broker={"protocol": protocol})
    first = NodeProcess(config, "twin", arrivals=env.arrivals, log=env.tmp / "first.log")
    first.start()
    try:
        # The fault: an original that has held its connection for a while (past a flap).
        threading.Event().wait(FLAP_WINDOW_S + 0.5)
        for attempt in range(3):
            second = NodeProcess(config, "twin", arrivals=env.arrivals, log=env.tmp / f"second-{attempt}.log")
            second.launch()
            try:
                assert second.wait(WAIT_S * 2) == 2, second.log_text()
            finally:
                second.stop()  # a newcomer that did not give up must not outlive the test
            assert "another node is already connected as 'twin'" in second.log_text()
            assert first.running, f"attempt {attempt}: the original gave up:\n{first.log_text()[-2000:]}"
        with env.spy(env.topics.availability("twin")) as spy:
            spy.wait_for(lambda m: m.payload == b"online", what="the original online")
    finally:
        first.stop()


def test_a_burst_of_1000_mqtt_triggers_is_bounded_and_every_one_is_answered(env: Env) -> None:
    node = env.node_process(env.config("dev", cpu=sim(base_ms=20, ms_per_token=0), slots=1,
                                       triggers={"workers": 4, "max_waiting": 32}))
    with node, env.spy(env.topics.last_result("dev")) as answers:
        proc = psutil.Process(node.pid)
        rss_before = proc.memory_info().rss
        for i in range(1000):
            answers.bus.publish(env.topics.trigger("dev"), f"prompt {i}".encode())
        threads = []
        answers.wait_for(lambda m: threads.append(proc.num_threads()) is None and
                         len([x for x in answers.seen if not x.retain]) >= 1000, timeout=120, what="1000 answers")
        rss_after = proc.memory_info().rss
    live = [json.loads(m.payload) for m in answers.seen if not m.retain]
    answered = [a for a in live if a["ok"]]
    busy = [a for a in live if not a["ok"] and a["error"].startswith("busy")]
    assert len(answered) + len(busy) == 1000 and answered, (len(answered), len(busy))
    assert max(threads) < 40, f"threads: {max(threads)}"
    assert rss_after - rss_before < 30 * 2**20


def test_an_mqtt_trigger_with_an_id_or_a_response_topic_gets_its_own_answer(env: Env) -> None:
    """last_result is retained, so a subscriber that comes after the trigger may read the
    previous answer; a trigger that names itself gets the new one, and only it."""
    node = env.node_process(env.config("dev", cpu=sim(base_ms=1)))
    mine = f"{env.prefix}clients/kitchen/reply"
    with node, env.spy(f"{env.prefix}agent/dev/answer/#") as answers, env.spy(mine) as replies:
        answers.publish(env.topics.trigger("dev"), json.dumps({"prompt": "first", "id": "q-1"}).encode())
        answers.publish(env.topics.trigger("dev"), b"second", response_topic=mine, correlation_data=b"q-2")
        one = answers.wait_for(lambda m: m.topic == env.topics.answer("dev", "q-1"), what="the answer to q-1")
        two = replies.wait_for(lambda m: True, what="the answer on the response topic")
        answers.wait_for(lambda m: m.topic == env.topics.answer("dev", "q-2"), what="q-2 by its correlation")
    first, second = json.loads(one.payload), json.loads(two.payload)
    assert (first["id"], first["ok"], first["text"].split()) == ("q-1", True, ["first"])
    assert (second["id"], second["ok"], second["text"].split()) == ("q-2", True, ["second"])
    assert not one.retain and not two.retain
