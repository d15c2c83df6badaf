"""`serve`'s two fronts together: the waiting line they share, tools through the OpenAI
front, the model list with the example configs, and chat reaching an OpenAI-compatible
model server as chat."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from agent.config import DEFAULT_MODEL, load_config
from agent.executors import Params, build_executor
from agent.executors.openai import ToolCallDeltas, request_body
from agent.messages import Chat, ChatMessage, ToolCall
from tests.support.fleet import WAIT_S, Env, Gate, executions, job, sim
from tests.support.mosquitto import REPO, free_port

openai = pytest.importorskip("openai", reason="the openai client is a test extra: pip install -e '.[test]'")
ollama = pytest.importorskip("ollama", reason="the ollama client is a test extra: pip install -e '.[test]'")

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]


def post(port: int, path: str, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        raw = json.dumps(body).encode()
        conn.request("POST", path, raw, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def health(port: int) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/health")
        return dict(json.loads(conn.getresponse().read()))
    finally:
        conn.close()


def until_health(port: int, predicate: Any, what: str) -> dict[str, Any]:
    """Ask /health until ``predicate`` holds (each answer is a round trip, no sleeps)."""
    end = time.monotonic() + WAIT_S
    while time.monotonic() < end:
        seen = health(port)
        if predicate(seen):
            return seen
    raise AssertionError(f"timed out waiting for {what}; last /health: {seen}")


def hang(port: int, path: str, body: dict[str, Any]) -> socket.socket:
    """Send a request and keep the connection open without reading."""
    raw = json.dumps(body)
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(raw)}\r\n\r\n{raw}".encode())
    return sock


@contextmanager
def gateway(env: Env, cpu: dict[str, Any] | None, **serve: Any) -> Iterator[int]:
    port = free_port()
    path = env.config("gw", cpu=cpu, serve={"enabled": True, "port": port, **serve})
    with env.node_process(path):
        yield port


# --------------------------------------------------------------------------- the waiting line

def test_thirty_streams_through_both_fronts_past_max_concurrent_4_all_complete(env: Env) -> None:
    with env.node_process(env.config("peer", cpu=sim(base_ms=5, ms_per_token=2, model="tiny"), slots=4)), \
            gateway(env, sim(base_ms=5, ms_per_token=2, model="tiny"), max_concurrent=4) as port:
        results: list[str | None] = [None] * 30
        oa = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)
        ol = ollama.Client(host=f"http://127.0.0.1:{port}", timeout=60)

        def one(i: int) -> None:
            try:
                results[i] = stream(i)
            except Exception as exc:  # noqa: BLE001 (reported in the assertion below)
                results[i] = repr(exc)

        def stream(i: int) -> str:
            text = f"stream {i} of thirty"
            if i % 2:
                return "".join(c.choices[0].delta.content or "" for c in oa.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": text}], stream=True) if c.choices)
            return "".join(p.message.content or "" for p in ol.chat(
                "tiny", messages=[{"role": "user", "content": text}], stream=True))
        threads = [threading.Thread(target=one, args=(i,)) for i in range(30)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        ol.close()
        oa.close()
    assert results == [f"stream {i} of thirty" for i in range(30)], "none refused, none lost"


def test_a_full_line_answers_503_at_once_and_a_waiter_that_hangs_up_leaves_it(env: Env) -> None:
    runs = env.tmp / "runs.log"
    gate = Gate(env.tmp / "gate")
    worker = env.config("worker", cpu={**job(runs, "hold", gate), "model": "held"})
    chat = {"model": "held", "stream": True, "messages": [{"role": "user", "content": "wait for it"}]}
    with env.node_process(worker), gateway(env, None, max_concurrent=1, max_queue=1) as port:
        running = hang(port, "/api/chat", chat)
        until_health(port, lambda h: h["running"] == 1, "the first request to run")
        waiting = hang(port, "/v1/chat/completions", chat)
        until_health(port, lambda h: h["waiting"] == 1, "the second to wait")
        began = time.monotonic()
        status, headers, body = post(port, "/api/chat", chat)
        assert status == 503 and headers.get("Retry-After") and "busy" in json.loads(body)["error"]
        status, headers, body = post(port, "/v1/chat/completions", chat)
        assert status == 503 and headers.get("Retry-After"), "the line is shared by both fronts"
        assert time.monotonic() - began < 10, "at once, not after a wait"  # generous: a loaded machine
        waiting.close()
        until_health(port, lambda h: h["waiting"] == 0, "the waiter that hung up to leave")
        later = hang(port, "/api/chat", {**chat, "stream": False})
        until_health(port, lambda h: h["waiting"] == 1, "a new waiter to take the free place")
        gate.release(2)
        answers = []
        for sock in (running, later):
            sock.settimeout(WAIT_S)
            data = b""
            while b'"done": true' not in data:
                chunk = sock.recv(65536)
                assert chunk, data
                data += chunk
            answers.append(data)
            sock.close()
        gate.close()
    assert len(executions(runs)) == 2, "the request whose client left never ran"


# --------------------------------------------------------------------------- tools, OpenAI front

def test_the_openai_client_with_tools_gets_a_tool_call_and_sends_the_result_back(env: Env) -> None:
    with gateway(env, sim(base_ms=2, ms_per_token=1, model="toolbox", tools=True)) as port:
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=30)
        messages: list[Any] = [{"role": "user", "content": "weather in Oslo?"}]
        first = api.chat.completions.create(model="toolbox", messages=messages, tools=TOOLS)
        choice = first.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
        call = choice.message.tool_calls[0]
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {
            "text": "weather in Oslo?"}, "arguments are a JSON string on this front"
        streamed = [c for c in api.chat.completions.create(model="toolbox", messages=messages, tools=TOOLS,
                                                           stream=True) if c.choices]
        deltas = [tc for c in streamed for tc in (c.choices[0].delta.tool_calls or [])]
        assert deltas and deltas[0].function.name == "get_weather" and streamed[-1].choices[0].finish_reason \
            == "tool_calls"
        messages += [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
        final = api.chat.completions.create(model="toolbox", messages=messages, tools=TOOLS)
        assert final.choices[0].finish_reason == "stop" and "sunny, 21 C" in (final.choices[0].message.content or "")
        with pytest.raises(openai.BadRequestError) as refused:
            api.chat.completions.create(model="toolbox", tools=[{"type": "function"}], messages=messages[:1])
        assert "tools" in str(refused.value)
        api.close()


def test_a_job_with_tools_that_no_device_can_call_gets_a_clear_error(env: Env) -> None:
    with gateway(env, sim(base_ms=2, ms_per_token=1)) as port:
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=30)
        with pytest.raises(openai.BadRequestError) as refused:
            api.chat.completions.create(model=DEFAULT_MODEL, tools=TOOLS,
                                        messages=[{"role": "user", "content": "x"}])
        api.close()
    assert "no device can call tools" in str(refused.value)


# --------------------------------------------------------------------------- the model list

EXAMPLES = sorted([*REPO.glob("configs/*.yaml"), *REPO.glob("configs/fleet/*.yaml")])


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_config_lists_a_model_for_each_executor_it_runs(path: Path, tmp_path: Path) -> None:
    import yaml
    doc = yaml.safe_load(path.read_text())
    doc.pop("broker", None)  # its credentials exist only on a provisioned device
    local = tmp_path / path.name
    local.write_text(yaml.safe_dump(doc))
    cfg = load_config(local, env={})
    for section in (cfg.npu, cfg.cpu):
        if section.enabled:
            name = build_executor(section.executor, name=cfg.device_id).model_info().name
            assert name, f"{path.name}: an executor that is listed under no name"
            if section.executor.kind in ("command", "genie", "openai") and path.parent.name == "configs":
                assert name != DEFAULT_MODEL, f"{path.name}: a real device names its real model"


def test_a_fleet_whose_executors_name_no_model_is_listed_and_answers_under_the_default_name(env: Env) -> None:
    laptop = load_config(REPO / "configs/fleet/laptop.yaml", env={})
    assert laptop.cpu.executor.served.name is None, "the demo fleet's devices name no model"
    with env.node_process(env.config("laptop", cpu=sim(base_ms=2, ms_per_token=1))), \
            gateway(env, None) as port:
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=30)
        listed = [m.id for m in api.models.list()]
        assert listed == [DEFAULT_MODEL], "Open WebUI's picker is never empty while a device serves"
        answer = api.chat.completions.create(model=listed[0], messages=[{"role": "user", "content": "hi all"}])
        assert answer.choices[0].message.content == "hi all"
        api.close()
        ol = ollama.Client(host=f"http://127.0.0.1:{port}", timeout=30)
        assert [m.model for m in ol.list().models] == [DEFAULT_MODEL]
        assert ol.chat(f"{DEFAULT_MODEL}:latest", messages=[{"role": "user", "content": "x y"}],
                       stream=False).message.content == "x y"
        ol.close()


# --------------------------------------------------------------------------- chat to an OpenAI-compatible server

def test_chat_reaches_an_openai_compatible_server_as_chat(env: Env) -> None:
    from tests.support.fake_openai import FakeOpenAI
    with FakeOpenAI(answer="Done.", models=("qwen2.5:1.5b",)) as server:
        with gateway(env, {"kind": "openai", "base_url": server.base_url, "model": "qwen2.5:1.5b"}) as port:
            ol = ollama.Client(host=f"http://127.0.0.1:{port}", timeout=30)
            history = [{"role": "system", "content": "brief"}, {"role": "user", "content": "hi"},
                       {"role": "assistant", "content": "", "tool_calls": [
                           {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
                       {"role": "tool", "content": "sunny", "tool_name": "get_weather"}]
            reply = ol.chat("qwen2.5:1.5b", messages=history, tools=TOOLS, stream=False,
                            format={"type": "object"})
            ol.close()
    assert reply.message.content == "Done."
    sent = [r["body"] for r in server.requests if r["path"] == "/v1/chat/completions"][-1]
    assert [m["role"] for m in sent["messages"]] == ["system", "user", "assistant", "tool"]
    call = sent["messages"][2]["tool_calls"][0]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    assert call["id"] and sent["messages"][3]["tool_call_id"] == call["id"], "the result names its call"
    assert sent["tools"] == TOOLS and sent["response_format"]["type"] == "json_schema"


def test_tool_call_deltas_are_assembled_from_a_stream() -> None:
    calls = ToolCallDeltas()
    for event in ({"choices": [{"delta": {"tool_calls": [{"index": 0, "id": "c1", "type": "function",
                                                         "function": {"name": "get_weather", "arguments": ""}}]}}]},
                  {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}}]},
                  {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": ' "Oslo"}'}}]}}]},
                  {"choices": [{"delta": {"tool_calls": [{"index": 1, "id": "c2",
                                                         "function": {"name": "now", "arguments": "{}"}}]}}]},
                  {"choices": [{"delta": {}, "finish_reason": "tool_calls"}]}):
        calls.feed(json.dumps(event).encode())
    assert calls.calls() == (ToolCall("get_weather", {"city": "Oslo"}, "c1"), ToolCall("now", {}, "c2"))


def test_the_request_body_carries_the_conversation_tools_and_format() -> None:
    chat = Chat((ChatMessage("user", "q"), ChatMessage("assistant", "", (ToolCall("f", {"a": 1}),)),
                 ChatMessage("tool", "r")), tuple(TOOLS), "json")
    body = request_body("m", "ignored transcript", Params(max_new_tokens=9, chat=chat))
    assert body["messages"][0] == {"role": "user", "content": "q"}
    assert body["messages"][1]["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"a": 1}'}
    assert body["messages"][2]["tool_call_id"] == body["messages"][1]["tool_calls"][0]["id"]
    assert body["tools"] == TOOLS and body["response_format"] == {"type": "json_object"}
    plain = request_body("m", "just this", Params())
    assert plain["messages"] == [{"role": "user", "content": "just this"}] and "tools" not in plain
