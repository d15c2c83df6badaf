"""`serve`: the fleet behind an OpenAI-compatible endpoint, through the official client;
and jobs routed by model, with warm models preferred."""

from __future__ import annotations

import http.client
import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from agent.armstore import ArmStore
from agent.messages import decode_result
from tests.support.fleet import WAIT_S, Env, Gate, executions, job, sim
from tests.support.launch import NodeProcess
from tests.support.mosquitto import free_port

openai = pytest.importorskip("openai", reason="the openai client is a test extra: pip install -e '.[test]'")


def gateway_config(env: Env, device: str = "gw", **extra: Any) -> tuple[Path, int]:
    port = free_port()
    serve = {"enabled": True, "port": port, "max_concurrent": 32, **extra.pop("serve", {})}
    return env.config(device, cpu=sim(base_ms=5, ms_per_token=2, model="tiny"), serve=serve, **extra), port


def client(port: int, **kw: Any) -> Any:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=kw.pop("api_key", "unused"),
                         max_retries=0, timeout=30, **kw)


@contextmanager
def gateway(env: Env, **extra: Any) -> Iterator[tuple[NodeProcess, int]]:
    path, port = gateway_config(env, **extra)
    with env.node_process(path) as node:
        yield node, port


def test_chat_and_completions_streamed_and_not(env: Env) -> None:
    with gateway(env) as (_, port):
        api = client(port)
        chat = api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "one two three"}])
        assert chat.choices[0].message.content == "one two three" and chat.choices[0].finish_reason == "stop"
        assert chat.usage is not None and chat.usage.completion_tokens == 3 and chat.usage.prompt_tokens > 0
        assert chat.model_extra["edge_agent"]["device"] == "gw"  # who answered
        pieces, final = [], None
        for chunk in api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a b c d"}],
                                                 stream=True, stream_options={"include_usage": True}):
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                final = chunk.usage
        assert "".join(pieces) == "a b c d", "the streamed text is the answer"
        assert final is not None and final.completion_tokens == 4
        done = api.completions.create(model="tiny", prompt="say this", max_tokens=1)
        assert done.choices[0].text == "say" and done.choices[0].finish_reason == "length"
        streamed = "".join(c.choices[0].text for c in api.completions.create(model="tiny", prompt="x y", stream=True)
                           if c.choices)
        assert streamed == "x y"
        many = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
        text = api.chat.completions.create(model="tiny", messages=many).choices[0].message.content
        assert text is not None and "System: be brief" in text and text.endswith("Assistant:"), "a transcript"


def test_errors_are_openai_shaped_with_sensible_statuses(env: Env) -> None:
    key = env.tmp / "key"
    key.write_text("s3cret\n")
    key.chmod(0o600)
    with gateway(env, serve={"api_key_file": str(key)}) as (_, port):
        with pytest.raises(openai.AuthenticationError):
            client(port, api_key="wrong").models.list()
        api = client(port, api_key="s3cret")
        with pytest.raises(openai.NotFoundError) as missing:
            api.chat.completions.create(model="huge", messages=[{"role": "user", "content": "x"}])
        assert "tiny" in str(missing.value), "the models that exist are listed"
        with pytest.raises(openai.BadRequestError):
            api.chat.completions.create(model="tiny", messages=[])
        with pytest.raises(openai.BadRequestError):
            api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=0)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/health")
        health = conn.getresponse()
        assert health.status == 200 and json.loads(health.read())["device"] == "gw", "health needs no key"
        conn.close()


@pytest.mark.parametrize("mode", ["work", "hold"], ids=["while-streaming", "before-any-token"])
def test_a_client_that_hangs_up_cancels_its_job(env: Env, mode: str) -> None:
    """Mid-stream a failed write shows it; before any token only the socket's EOF does."""
    runs = env.tmp / "runs.log"
    worker = env.config("worker", cpu={**job(runs, mode, Gate(env.tmp / "gate") if mode == "hold" else None),
                                       "model": "slow"})
    path, port = gateway_config(env)
    with env.node_process(worker), env.node_process(path) as gw, \
            env.spy(f"{env.prefix}exec/worker/cancel/+") as cancels, \
            env.spy(f"{env.prefix}result/gw/+/worker") as results:
        body = json.dumps({"model": "slow", "stream": True,
                           "messages": [{"role": "user", "content": " ".join(f"w{i}" for i in range(60))}]})
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
        received = b""
        while received.count(b"data:") < (3 if mode == "work" else 1):  # the role chunk (, then tokens)
            received += sock.recv(4096)
        sock.close()
        cancel = cancels.wait_for(lambda m: True, what="the cancel of the abandoned job")
        rid = json.loads(cancel.payload)["rid"]
        stopped = results.wait_for(lambda m: decode_result(m.payload).type in ("error", "done"), what="its end")
        assert gw.wait_log("went away", WAIT_S), "the gateway has finished with the request"
    assert decode_result(stopped.payload).type == "error", "stopped, not finished"
    assert executions(runs).get(rid, {"start": 0, "done": 0})["done"] == 0, "its model never finished"
    assert "worker" not in ArmStore(env.tmp / "state" / "gw").load().arms, "a hang-up teaches the learner nothing"


def test_twenty_concurrent_streams_all_complete(env: Env) -> None:
    with env.node_process(env.config("peer", cpu=sim(base_ms=5, ms_per_token=2, model="tiny"), slots=4)), \
            gateway(env, slots=4) as (_, port):
        api = client(port)
        results: list[str | None] = [None] * 20

        def one(i: int) -> None:
            parts = [c.choices[0].delta.content or "" for c in api.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": f"stream {i} of twenty"}], stream=True)
                if c.choices]
            results[i] = "".join(parts)
        threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert results == [f"stream {i} of twenty" for i in range(20)]


def test_models_lists_the_fleet_and_drops_a_dead_nodes_models(env: Env) -> None:
    other = env.node_process(env.config("other", cpu=sim(base_ms=1, model="big", aliases=["large"],
                                                         context_tokens=8192)))
    with gateway(env) as (_, port), env.spy(env.topics.availability("other")) as presence:
        other.start()
        api = client(port)
        listed = {m.id: m.model_extra for m in api.models.list()}
        assert set(listed) == {"tiny", "big"}
        assert listed["big"]["devices"] == ["other"] and listed["big"]["aliases"] == ["large"]
        assert listed["big"]["context_length"] == 8192
        other.kill()
        presence.wait_for(lambda m: m.payload == b"offline" and not m.retain, what="its Will")
        assert {m.id for m in api.models.list()} == {"tiny"}


# --------------------------------------------------------------------------- routing by model

def test_jobs_go_to_the_devices_that_serve_their_model(env: Env) -> None:
    hub = env.config("hub", cpu=None)
    alpha = env.config("alpha-dev", cpu=sim(base_ms=1, model="alpha"))
    beta = env.config("beta-dev", cpu=sim(base_ms=1, model="beta", aliases=["b"]))
    board = env.config("board", npu=sim(base_ms=1, model="npu-only"), cpu=None)
    # A free NPU that serves another model, and a CPU that serves alpha: not the NPU.
    combo = env.config("combo", npu=sim(base_ms=1, model="npu-small"), cpu=sim(base_ms=1, model="alpha"))
    with env.node_processes(alpha, beta, board, combo):
        code, out, _, err = env.trigger(hub, "not on that NPU", "--model", "alpha")
        assert code == 0 and out is not None and out["path"] == "peer-cpu", out
        assert len(out["attempts"]) == 1, "no detour through a device that declined"
        for model, devices in (("beta", {"beta-dev"}), ("b", {"beta-dev"}), ("alpha", {"alpha-dev", "combo"})):
            code, out, _, err = env.trigger(hub, f"for {model}", "--model", model)
            assert code == 0, err
            assert out is not None and out["winner"] in devices and out["path"] == "peer-cpu", out
            assert out["model"] == model
        code, out, _, err = env.trigger(hub, "for the npu", "--model", "npu-only")
        assert code == 0 and out is not None and out["path"] == "peer-npu", "the NPU rule among those that serve it"
        code, out, _, err = env.trigger(hub, "for nobody", "--model", "gamma")
    assert code == 3 and out is not None
    assert "gamma" in out["error"] and all(m in out["error"] for m in ("alpha", "beta", "npu-only")), out["error"]


def test_a_warm_model_wins_over_one_that_must_load_first(env: Env) -> None:
    """Both devices serve "m" at the same speed, but loading it costs 0.4 s; one keeps it
    loaded (a server), the other loads it for every job (genie-t2t-run does)."""
    hub = env.config("hub", cpu=None)
    warm = env.config("keeps-it", cpu=sim(base_ms=5, ms_per_token=2, model="m", cold_ms=400, keep_warm_s=600))
    cold = env.config("reloads", cpu=sim(base_ms=5, ms_per_token=2, model="m", cold_ms=400))
    winners = []
    with env.node_processes(warm, cold):
        for i in range(8):
            code, out, _, err = env.trigger(hub, f"question {i}", "--model", "m")
            assert code == 0 and out is not None, err
            winners.append(out["winner"])
    assert set(winners[:3]) == {"keeps-it", "reloads"}, "both are tried"
    assert winners[-4:] == ["keeps-it"] * 4, winners


def test_a_model_named_in_an_mqtt_trigger_is_honoured(env: Env) -> None:
    node = env.config("dev", cpu=sim(base_ms=1, model="local"))
    other = env.config("far", cpu=sim(base_ms=1, model="remote"))
    with env.node_processes(node, other), env.spy(f"{env.prefix}agent/dev/answer/+") as answers:
        answers.publish(env.topics.trigger("dev"), json.dumps({"prompt": "route me", "model": "remote",
                                                               "id": "q1"}).encode())
        answer = json.loads(answers.wait_for(lambda m: True, what="the answer", timeout=WAIT_S).payload)
    assert answer["ok"] and answer["winner"] == "far"


@pytest.mark.parametrize("with_daemon", [False, True], ids=["own-connection", "through-the-node"])
def test_the_serve_command_alone_or_through_this_devices_node(env: Env, with_daemon: bool) -> None:
    import subprocess
    import sys

    from tests.support.mosquitto import REPO
    worker = env.config("worker", cpu=sim(base_ms=1, model="tiny"))
    hub = env.config("hub", cpu=None)
    port = free_port()
    with env.node_process(worker), (env.node_process(hub) if with_daemon else _nothing()):
        proc = subprocess.Popen([sys.executable, "-m", "agent", "serve", "--config", str(hub), "--port", str(port)],
                                cwd=REPO, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stderr is not None
            banner = proc.stderr.readline()
            assert ("node daemon" in banner) == with_daemon, banner
            chat = client(port).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi you"}])
            assert chat.choices[0].message.content == "hi you"
            assert chat.model_extra["edge_agent"]["device"] == "worker"
            # A model nobody serves is a 404 model_not_found, by its kind, either way.
            with pytest.raises(openai.NotFoundError) as missing:
                client(port).chat.completions.create(model="nosuch", messages=[{"role": "user", "content": "x"}])
            assert missing.value.code == "model_not_found", missing.value
        finally:
            proc.terminate()
            assert proc.wait(15) == 0, "SIGTERM stops it cleanly"
            if proc.stderr is not None:
                proc.stderr.close()


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


def test_temperature_reaches_the_model_server(env: Env) -> None:
    from tests.support.fake_openai import FakeOpenAI
    with FakeOpenAI(answer="Warm enough.", models=("llama3.2:1b",)) as server:
        port = free_port()
        path = env.config("gw", cpu={"kind": "openai", "base_url": server.base_url, "model": "llama3.2:1b"},
                          serve={"enabled": True, "port": port})
        with env.node_process(path):
            api = client(port)
            chat = api.chat.completions.create(model="llama3.2:1b", temperature=0.3,
                                               messages=[{"role": "user", "content": "how warm?"}])
            with pytest.raises(openai.BadRequestError):
                api.chat.completions.create(model="llama3.2:1b", temperature=7,
                                            messages=[{"role": "user", "content": "x"}])
    assert chat.choices[0].message.content == "Warm enough."
    sent = [r["body"] for r in server.requests if r["path"] == "/v1/chat/completions"]
    assert sent and sent[-1]["temperature"] == 0.3 and sent[-1]["messages"][0]["content"] == "how warm?"
