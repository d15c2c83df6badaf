"""The guarantees of DESIGN.md's "Semantics that make it reliable", each proven by injecting
the fault for real: duplicate deliveries, a frozen node, racing orchestrators, a winner
killed mid-job, a broker restart, crashed executors. Executions are counted by the
stand-in model (tests/support/job.py), never inferred."""

from __future__ import annotations

import io
import json
import queue
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.bus import Message
from agent.cli import main
from agent.locks import NpuLock
from agent.messages import Bid, BidRequest, Declined, Job, cancel_check, decode_result
from tests.support.broker import REPO
from tests.support.fleet import WAIT_S, Env, Gate, executions, job


class Background:
    """`trigger --json` in a thread; .result() waits for it."""

    def __init__(self, env: Env, config: Path, prompt: str, *extra: str):
        self.progress = threading.Event()
        self.value: tuple[int, dict[str, Any] | None, str] | None = None
        outer = self

        class Err(io.StringIO):
            def write(self, s: str) -> int:
                if "waiting for" in s:
                    outer.progress.set()
                return super().write(s)

        def run() -> None:
            out, err = io.StringIO(), Err()
            code = main(["trigger", "--config", str(config), "--json", *extra, prompt], stdout=out, stderr=err)
            self.value = (code, json.loads(out.getvalue()) if out.getvalue().strip() else None, err.getvalue())

        self.thread = threading.Thread(target=run, name="trigger", daemon=True)
        self.thread.start()

    def result(self, timeout: float = 60) -> tuple[int, dict[str, Any] | None, str]:
        self.thread.join(timeout)
        assert self.value is not None, "trigger did not finish"
        return self.value


def result_of(kind: str, device: str | None = None) -> Callable[[Message], bool]:
    def match(m: Message) -> bool:
        try:
            ev = decode_result(m.payload)
        except Exception:
            return False
        return ev.type == kind and (device is None or ev.device == device)
    return match


def bid_for(spy: Any, env: Env, rid: str, device: str, origin: str = "hub") -> Bid:
    """Call for bids as ``origin`` and return ``device``'s bid (with its claim)."""
    t = env.topics
    spy.publish(t.bid_request(rid), BidRequest(rid, origin, 30.0, 3, 8).to_payload())
    reply = spy.wait_for(lambda m: m.topic == t.bid_reply(origin, rid, device), what="bid")
    return Bid.from_payload(reply.payload)


CANCEL_KEY = "hubs-own-cancel-key"


def job_for(rid: str, claim: str, prompt: str, mode: str = "cpu", origin: str = "hub") -> bytes:
    return Job(rid, origin, mode, claim, prompt, 8, 5.0, 60.0, f"result/{origin}/{rid}",
               cancel_check=cancel_check(CANCEL_KEY)).to_payload()


# --------------------------------------------------------------------- 1. exactly once

def test_redelivered_job_runs_once_even_across_a_node_restart(env: Env) -> None:
    log, gate = env.tmp / "runs.log", Gate(env.tmp / "gate")
    node = env.config("worker", cpu=job(log, "hold", gate))
    t = env.topics
    with env.node_process(node) as proc, env.spy(f"{env.prefix}#") as spy:
        bid = bid_for(spy, env, "r1", "worker")
        job_msg = job_for("r1", bid.claim, "one two three")
        spy.publish(t.exec("worker"), job_msg)
        spy.wait_for(result_of("accepted"), what="accepted")
        spy.publish(t.exec("worker"), job_msg)  # a duplicate while it runs: attaches
        spy.wait_for(lambda m: len([x for x in spy.seen if result_of("accepted")(x)]) == 2, what="second accepted")
        gate.release()
        done = spy.wait_for(result_of("done"), what="done")
        spy.publish(t.exec("worker"), job_msg)  # after it finished: the recorded result
        spy.wait_for(lambda m: len([x for x in spy.seen if result_of("done")(x)]) == 2, what="recorded done")
        proc.restart()                            # completed rids survive a restart
        count = len([x for x in spy.seen if result_of("done")(x)])
        spy.publish(t.exec("worker"), job_msg)
        spy.wait_for(lambda m: len([x for x in spy.seen if result_of("done")(x)]) > count,
                     what="done from the journal")
        replayed = [x for x in spy.seen if result_of("done")(x)][count]
        assert replayed.payload == done.payload, "the recorded answer, byte for byte"
    assert executions(log) == {"r1": {"start": 1, "done": 1}}


def test_cancel_keeps_a_late_copy_from_ever_starting(env: Env) -> None:
    from agent.messages import Cancel

    log = env.tmp / "runs.log"
    node = env.config("worker", cpu=job(log, "quick"))
    t = env.topics
    with env.node(node), env.spy(f"{env.prefix}#") as spy:
        bid = bid_for(spy, env, "r9", "worker")
        spy.publish(t.cancel("worker", "hub"), Cancel("r9", "hub", CANCEL_KEY, "failed over").to_payload())
        # The orchestrator's job arrives after its cancel (a late copy from a session): declined.
        spy.publish(t.exec("worker"), job_for("r9", bid.claim, "x"))
        declined = spy.wait_for(result_of("declined"), what="declined")
        assert decode_result(declined.payload).reason == "cancelled"
    assert executions(log) == {}


# --------------------------------------------------------------------- 2. queued while away

def frozen_auction(env: Env, prompt: str, while_frozen: Callable[[], None] = lambda: None
                   ) -> tuple[int, dict[str, Any] | None, str, Path]:
    """The only peer is frozen (SIGSTOP) when the auction opens; once the auction is seen
    waiting for it, `while_frozen` runs, then the peer is thawed."""
    log = env.tmp / "runs.log"
    hub = env.config("hub", auction={"bid_timeout_s": 20})
    node = env.config("sleepy", cpu=job(log, "quick"), broker={"keepalive_s": 10})
    with env.node_process(node) as proc:
        proc.pause()
        try:
            bg = Background(env, hub, prompt)
            assert bg.progress.wait(WAIT_S), "the auction should be waiting for the frozen node"
            while_frozen()
        finally:
            proc.resume()
        code, out, err = bg.result()
    return code, out, err, log


def test_node_frozen_during_the_auction_bids_and_runs_when_it_returns(env: Env) -> None:
    code, out, err, log = frozen_auction(env, "wake up")
    assert code == 0, err
    assert out is not None and out["winner"] == "sleepy" and out["text"].strip() == "wake up"
    assert out["auction_ms"] >= 1000, "it waited for the node instead of giving up on it"
    assert [v["done"] for v in executions(log).values()] == [1]


def test_a_call_for_bids_that_expired_while_away_is_never_acted_on(env: Env) -> None:
    """A frozen node reads the call only when it thaws, after the auction closed without
    it: whatever it does with the call, no job ever runs for it."""
    log = env.tmp / "runs.log"
    hub = env.config("hub", auction={"bid_timeout_s": 1})
    node = env.config("sleepy", cpu=job(log, "quick"), broker={"keepalive_s": 10})
    with env.node_process(node) as proc:
        proc.pause()
        try:
            code, out, _, _ = env.trigger(hub, "too late")
        finally:
            proc.resume()
        assert code == 3 and out is not None
        stale_rid = out["rid"]
        code, out2, _, err = env.trigger(hub, "in time")   # the node handles messages in order:
        assert code == 0, err                               # once it bid on this one, it has seen
        assert out2 is not None and out2["winner"] == "sleepy"  # the stale call long before
    assert stale_rid not in executions(log) and out2["rid"] in executions(log)


# --------------------------------------------------------------------- 3. race-free NPU

def test_racing_orchestrators_never_share_the_npu_and_nobody_waits_on_it(env: Env) -> None:
    npu_log, cpu_log, gate = env.tmp / "npu.log", env.tmp / "cpu.log", Gate(env.tmp / "gate")
    peer = env.config("npu-peer", npu=job(npu_log, "hold", gate), cpu=None)
    backup = env.config("cpu-peer", cpu=job(cpu_log, "quick"), slots=8)
    hubs = [env.config(f"hub-{i}") for i in range(5)]
    with env.node_process(peer), env.node_process(backup):
        procs = [subprocess.Popen([sys.executable, "-m", "agent", "trigger", "--config", str(h), "--json", "-q",
                                   f"prompt {i}"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for i, h in enumerate(hubs)]
        finished: queue.SimpleQueue[tuple[subprocess.Popen[str], str, str]] = queue.SimpleQueue()
        for p in procs:
            threading.Thread(target=lambda p=p: finished.put((p, *p.communicate())), daemon=True).start()
        # Every trigger except the one on the NPU must finish while the NPU is still held:
        # if any of them waited on the busy NPU, this would time out.
        results = {}
        for _ in range(len(procs) - 1):
            p, out, err = finished.get(timeout=60)
            results[p.pid] = (p.returncode, json.loads(out), err)
        (holder,) = [p for p in procs if p.pid not in results]
        assert holder.poll() is None, "the one left is still running: it holds the NPU"
        gate.release()
        p, out, err = finished.get(timeout=60)
        results[p.pid] = (p.returncode, json.loads(out), err)
        assert list(executions(npu_log)) == [results[holder.pid][1]["rid"]], "its job is the one on the NPU"
    assert all(code == 0 for code, _, _ in results.values()), results
    paths = sorted(o["path"] for _, o, _ in results.values())
    assert paths == ["peer-cpu"] * 4 + ["peer-npu"], paths
    npu_runs = executions(npu_log)
    assert len(npu_runs) == 1 and all(v == {"start": 1, "done": 1} for v in npu_runs.values())
    assert len(executions(cpu_log)) == 4


# --------------------------------------------------------------------- 4. failover

def kill_the_winner(env: Env, mode: str, kill_when: str, *, restart: bool = False,
                    **hub: Any) -> tuple[int, dict[str, Any], list[Message]]:
    """Two CPU peers; "aa-first" wins, runs a model in `mode`, and is SIGKILLed when it
    sends its first `kill_when` event (and started again, with `restart`). It wins because
    it has never run a job: "zz-second" ran one warm-up job alone, so "aa-first" is priced
    as fast as "zz-second" says it is, and a tie goes to the device not tried yet (never to
    a name). Returns the trigger's exit code and JSON, and what was said on exec/# and
    result/#."""
    hub = env.config("hub", **hub)
    first = env.config("aa-first", cpu=job(env.tmp / "first.log", mode, Gate(env.tmp / "never")))
    second = env.config("zz-second", cpu=job(env.tmp / "second.log", "quick"))
    with env.node_process(second):
        code, warm, _, err = env.trigger(hub, "warm up")
        assert code == 0 and warm is not None and warm["winner"] == "zz-second", err
        with env.node_process(first) as doomed, env.spy(f"{env.prefix}#") as spy:
            bg = Background(env, hub, "the prompt")
            spy.wait_for(result_of(kill_when, "aa-first"), what=f"{kill_when} from aa-first")
            doomed.kill()
            if restart:
                doomed.start()
            code, out, err = bg.result()
            assert out is not None, err
            return code, out, list(spy.seen)


def test_winner_killed_before_any_token_fails_over_under_the_same_rid(env: Env) -> None:
    code, out, said = kill_the_winner(env, "hold", kill_when="accepted")
    assert code == 0, out
    assert out["winner"] == "zz-second" and out["text"].strip() == "the prompt"
    assert out["attempts"] == [{"device": "aa-first", "outcome": "went offline"},
                               {"device": "zz-second", "outcome": "done"}]
    cancels = [m for m in said if m.topic == env.topics.cancel("aa-first", "hub")]
    assert len(cancels) == 1, "the abandoned copy was cancelled"
    ran = list(executions(env.tmp / "second.log"))
    assert len(ran) == 2 and ran[-1] == out["rid"], "the warm-up, then the same rid on the runner-up"
    # Killed right after "accepted": its model may or may not have started, never finished.
    assert executions(env.tmp / "first.log").get(out["rid"], {"done": 0})["done"] == 0


def test_a_dead_winners_other_mode_is_never_tried_the_runner_up_gets_it_at_once(env: Env) -> None:
    """aa-first wins on its NPU and has a CPU too (it ranks above zz-second's): killed after
    ``accepted``, its Will fires and zz-second is sent the job next, without a try of
    aa-first's CPU that would wait out the accept timeout on the dead device."""
    hub = env.config("hub", auction={"accept_timeout_s": 30})
    never = Gate(env.tmp / "never")
    first = env.config("aa-first", npu=job(env.tmp / "first.log", "hold", never),
                       cpu=job(env.tmp / "first.log", "hold", never))
    second = env.config("zz-second", cpu=job(env.tmp / "second.log", "quick"))
    t = env.topics
    with env.node_process(second), env.node_process(first) as doomed, env.spy(f"{env.prefix}#") as spy:
        bg = Background(env, hub, "the prompt")
        spy.wait_for(result_of("accepted", "aa-first"), what="accepted by aa-first")
        doomed.kill()
        code, out, err = bg.result()
        said = list(spy.seen)
    assert code == 0 and out is not None, err
    assert out["attempts"] == [{"device": "aa-first", "outcome": "went offline"},
                               {"device": "zz-second", "outcome": "done"}]
    jobs = [Job.from_payload(m.payload).mode for m in said if m.topic == t.exec("aa-first")]
    assert jobs == ["npu"], "the dead device's CPU was never sent the job"


def test_winner_killed_after_streaming_reports_the_partial_text(env: Env) -> None:
    code, out, _ = kill_the_winner(env, "token-then-hold", kill_when="token")
    assert code == 1
    assert out["ok"] is False and out["text"] == "partial "
    assert "went offline after streaming" in out["error"]
    assert len(executions(env.tmp / "second.log")) == 1, "only the warm-up: never run a second time"


def test_winner_restarted_after_streaming_fails_at_once_not_at_the_job_deadline(env: Env) -> None:
    """Back within the grace its orchestrator gives it (accept_timeout_s), the restarted
    node is sent the job again and refuses it (its run died with the old process): the
    trigger fails then, with the partial text, instead of waiting out job_timeout_s."""
    code, out, said = kill_the_winner(env, "token-then-hold", kill_when="token", restart=True,
                                      auction={"accept_timeout_s": 60, "job_timeout_s": 600})
    assert code == 1 and out["text"] == "partial ", out
    assert "restarted after streaming" in out["error"], out["error"]
    to_hub = env.topics.result("hub", out["rid"], "aa-first")
    refusals = [e for e in (decode_result(m.payload) for m in said if m.topic == to_hub) if isinstance(e, Declined)]
    assert [e.reason for e in refusals] == ["stale_claim"], "the copy sent again was refused, once"
    assert len(executions(env.tmp / "second.log")) == 1, "only the warm-up: never run a second time"


def test_the_only_device_restarted_after_accepting_bids_again_and_answers(env: Env) -> None:
    """No runner-up: the device is killed after ``accepted`` and started again. Its new
    process refuses the copy sent again (it never issued that claim), is asked for a new
    bid, and runs the job under the new claim: the trigger answers instead of exit 3."""
    log, gate = env.tmp / "runs.log", Gate(env.tmp / "gate")
    hub = env.config("hub", auction={"accept_timeout_s": 60})
    node = env.config("worker", cpu=job(log, "hold", gate))
    with env.node_process(node) as proc, env.spy(f"{env.prefix}#") as spy:
        bg = Background(env, hub, "the prompt")
        spy.wait_for(result_of("accepted", "worker"), what="accepted")
        proc.kill()
        gate.release()  # the new process's run goes through
        proc.start()
        code, out, err = bg.result()
        said = list(spy.seen)
    assert code == 0 and out is not None and out["ok"], err
    assert out["winner"] == "worker" and out["text"].strip() == "the prompt"
    assert out["attempts"] == [{"device": "worker", "outcome": "done"}]
    t = env.topics
    assert len([m for m in said if m.topic == t.bid_invite("worker", out["rid"], "hub")]) == 1, "asked once"
    claims = [Job.from_payload(m.payload).claim for m in said if m.topic == t.exec("worker")]
    assert len(set(claims)) == 2 and claims[-1] != claims[0], "sent again with the new claim"
    assert executions(log)[out["rid"]]["done"] == 1
    assert "bid again" in err, "the wait is explained"


def test_the_only_device_restarted_before_accepting_gets_the_job_again_and_answers(env: Env) -> None:
    """The device is frozen once it has bid, so the job waits in its session; a second
    later it is killed and started again. The copy its session held is too late for its
    accept window, and is ignored; the copy sent again when it is back carries the whole
    window (no runner-up), is refused (not a claim the new process issued), and the device
    is asked to bid again: the job ends answered, not at its deadline."""
    log = env.tmp / "runs.log"
    hub = env.config("hub", auction={"accept_timeout_s": 0.2})
    node = env.config("worker", cpu=job(log, "quick"))
    t = env.topics

    def is_bid(m: Message) -> bool:
        parsed = t.parse(m.topic)
        return parsed is not None and parsed.kind == "bid_reply" and parsed.device == "worker"
    with env.node_process(node) as proc, env.spy(f"{env.prefix}#") as spy:
        bg = Background(env, hub, "the prompt")
        spy.wait_for(is_bid, what="its bid")
        proc.pause()
        spy.wait_for(lambda m: m.topic == t.exec("worker"), what="the job, held in its session")
        bg.progress.clear()
        assert bg.progress.wait(WAIT_S), "a progress line: a second has passed, five times its accept window"
        proc.kill()
        proc.start()
        code, out, err = bg.result()
    assert code == 0 and out is not None and out["ok"], err
    assert out["winner"] == "worker" and out["attempts"] == [{"device": "worker", "outcome": "done"}]
    assert executions(log)[out["rid"]] == {"start": 1, "done": 1}


# --------------------------------------------------------------------- 5. broker restart

@pytest.fixture
def restartable(env: Env) -> Env:
    if not env.broker.restartable:
        pytest.skip("needs the local mosquitto (an external broker cannot be restarted here)")
    return env


def test_broker_restart_during_a_job(restartable: Env) -> None:
    env = restartable
    log, gate = env.tmp / "runs.log", Gate(env.tmp / "gate")
    hub = env.config("hub")
    node = env.config("worker", cpu=job(log, "hold", gate))
    with env.node_process(node):
        with env.spy(f"{env.prefix}result/#") as spy:
            bg = Background(env, hub, "survive the restart")
            spy.wait_for(result_of("accepted"), what="accepted")
        env.broker.restart()
        gate.release()
        code, out, err = bg.result()
        assert code == 0, err
        assert out is not None and out["text"].strip() == "survive the restart"
        with env.spy(env.topics.availability("worker")) as avail:
            avail.wait_for(lambda m: m.payload == b"online", what="worker online after the restart")
    assert [v for v in executions(log).values()] == [{"start": 1, "done": 1}]


def test_broker_restart_during_an_auction(restartable: Env) -> None:
    env = restartable
    code, out, err, log = frozen_auction(env, "auction across a restart", env.broker.restart)
    assert code == 0, err
    assert out is not None and out["winner"] == "sleepy"
    assert [v for v in executions(log).values()] == [{"start": 1, "done": 1}]


# --------------------------------------------------------------------- 6. no stuck state

def test_npu_stays_busy_while_an_orphaned_executor_runs_and_frees_after(tmp_path: Path) -> None:
    from agent.config import CommandExecutorConfig
    from agent.executors import Params, build_executor

    lock = NpuLock(tmp_path)
    claim = lock.try_acquire("job")
    assert claim is not None
    fifo = tmp_path / "release"
    import os
    os.mkfifo(fifo)
    ex = build_executor(CommandExecutorConfig(argv=("sh", "-c", f"printf started; read x < {fifo}", "{prompt}")),
                        name="d")
    started = threading.Event()
    done = threading.Event()

    def run() -> None:
        ex.run("x", Params(hold_fds=(claim.fd,)), lambda t: started.set())
        done.set()

    threading.Thread(target=run, daemon=True).start()
    assert started.wait(WAIT_S)
    claim.release()  # as if the agent had died: its own descriptor is gone
    assert not lock.is_free(), "the running child still holds the NPU"
    fifo.write_text("go\n")
    assert done.wait(WAIT_S)
    assert lock.is_free(), "and it is free the moment the child exits"


def test_crashing_executor_frees_the_npu_and_the_node_keeps_serving(env: Env) -> None:
    log = env.tmp / "runs.log"
    hub = env.config("hub")
    node = env.config("board", npu=job(log, "crash"))
    with env.node(node) as n:
        code, out, _, _ = env.trigger(hub, "crash please")
        assert code == 1 and out is not None and "exited with code 3" in out["error"]
        assert out["text"] == "partial "
        assert n.capacity.npu_lock.is_free()
        code, out, _, _ = env.trigger(hub, "again")
        assert code == 1 and out is not None and out["path"] == "peer-npu", "the NPU was offered again"


# --------------------------------------------------------------------- connection cut

def test_a_cut_connection_mid_job_loses_nothing(env: Env) -> None:
    from tests.support.proxy import CuttableProxy

    log, gate = env.tmp / "runs.log", Gate(env.tmp / "gate")
    hub = env.config("hub", auction={"accept_timeout_s": 8})
    with CuttableProxy(env.broker.host, env.broker.port) as proxy:
        node = env.config("worker", cpu=job(log, "hold", gate), broker={"port": proxy.port})
        with env.node_process(node), env.spy(env.topics.availability("worker")) as avail:
            with env.spy(f"{env.prefix}result/#") as spy:
                bg = Background(env, hub, "across the blink")
                spy.wait_for(result_of("accepted"), what="accepted")
            proxy.cut()  # the node's Will fires; it reconnects and resumes its session
            avail.wait_for(lambda m: m.payload == b"offline", what="the Will")
            gate.release()  # it finishes while reconnecting: its done is queued, not lost
            code, out, err = bg.result()
            avail.wait_for(lambda m: m.payload == b"online" and not m.retain, what="back online")
    assert code == 0, err
    assert out is not None and out["winner"] == "worker" and out["text"].strip() == "across the blink"
    assert [v for v in executions(log).values()] == [{"start": 1, "done": 1}]


def test_a_device_that_declines_the_npu_can_still_take_the_job_on_its_cpu(env: Env) -> None:
    from tests.support.fleet import hold_npu_in_other_process

    log = env.tmp / "runs.log"
    node = env.config("both", npu=job(log, "quick"), cpu=job(log, "quick"))
    t = env.topics
    with env.node(node), env.spy(f"{env.prefix}#") as spy:
        bid = bid_for(spy, env, "r5", "both")
        assert bid.snapshot.npu_free
        holder = hold_npu_in_other_process(env.tmp / "state" / "both")  # taken between bid and job
        try:
            for mode in ("npu", "cpu"):
                spy.publish(t.exec("both"), job_for("r5", bid.claim, "on the cpu", mode))
            done = spy.wait_for(result_of("done"), what="done on the CPU")
        finally:
            holder.communicate("")
    declined = [decode_result(m.payload) for m in spy.seen if result_of("declined")(m)]
    assert [d.reason for d in declined] == ["npu_busy"]
    assert decode_result(done.payload).text.strip() == "on the cpu"
