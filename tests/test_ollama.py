"""`serve` speaks Ollama's API: the official `ollama` client (the version Home Assistant
pins) against a gateway node over a real broker and a fleet of stand-in devices."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from agent.ollama import canonical, chat_of_ollama, options_of, resolve
from agent.openai_api import BadRequest
from tests.support.fleet import Env, sim
from tests.support.mosquitto import free_port

ollama = pytest.importorskip("ollama", reason="the ollama client is a test extra: pip install -e '.[test]'")

TOOLS = [{"type": "function", "function": {"name": "HassTurnOff", "description": "Turns off a device",
                                           "parameters": {"type": "object", "properties": {
                                               "name": {"type": "string"}}}}}]


@contextmanager
def fleet(env: Env, **serve: Any) -> Iterator[int]:
    """A gateway that serves "tiny" (no tools) and a worker that serves "toolbox" (a
    stand-in that calls tools)."""
    port = free_port()
    gw = env.config("gw", cpu=sim(base_ms=2, ms_per_token=1, model="tiny"),
                    serve={"enabled": True, "port": port, **serve})
    worker = env.config("worker", cpu=sim(base_ms=2, ms_per_token=1, model="toolbox", tools=True))
    with env.node_process(worker), env.node_process(gw):
        yield port


_clients: list[Any] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _clients:
        _clients.pop().close()


def client(port: int, key: str | None = None) -> Any:
    """The official client, as Home Assistant makes it (a URL, maybe a Bearer key)."""
    api = ollama.Client(host=f"http://127.0.0.1:{port}", timeout=30,
                        headers={"Authorization": f"Bearer {key}"} if key else None)
    _clients.append(api)
    return api


def test_list_ps_show_pull_and_the_root(env: Env) -> None:
    with fleet(env) as port:
        api = client(port)
        listed = {m.model: m for m in api.list().models}
        assert set(listed) == {"tiny", "toolbox"}, "what the fleet serves, names as configured"
        assert listed["tiny"].modified_at is not None and listed["tiny"].details is not None
        assert {m.model for m in api.ps().models} == {"tiny", "toolbox"}
        shown = api.show("toolbox")
        assert shown.capabilities == ["completion", "tools"] and shown.modelinfo is not None
        assert api.show("tiny:latest").capabilities == ["completion"], "name:latest is the same model"
        assert api.pull("tiny").status == "success"
        assert [p.status for p in api.pull("toolbox:latest", stream=True)][-1] == "success"
        for call in (lambda: api.pull("llama3.2:3b"), lambda: api.show("llama3.2:3b"),
                     lambda: api.chat("llama3.2:3b", messages=[{"role": "user", "content": "x"}]),
                     lambda: api.generate("nope", "x")):
            with pytest.raises(ollama.ResponseError) as missing:
                call()
            assert missing.value.status_code == 404, missing.value
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/")
        root = conn.getresponse()
        assert root.status == 200 and root.read() == b"Ollama is running"
        conn.request("HEAD", "/")
        head = conn.getresponse()
        assert head.status == 200 and head.read() == b""
        conn.request("GET", "/api/version")
        assert json.loads(conn.getresponse().read())["version"]
        conn.close()


def test_chat_streamed_and_not_with_the_whole_history(env: Env) -> None:
    history = [{"role": "system", "content": "You are a voice assistant."},
               {"role": "user", "content": "what time is it"},
               {"role": "assistant", "content": "It is noon."},
               {"role": "user", "content": "and the date"}]
    with fleet(env) as port:
        api = client(port)
        whole = api.chat("tiny", messages=history, stream=False)
        assert whole.done and whole.done_reason == "stop" and whole.message.role == "assistant"
        for turn in ("System: You are a voice assistant.", "User: what time is it", "Assistant: It is noon.",
                     "User: and the date"):
            assert turn in whole.message.content, "every turn reached the model"
        assert whole.eval_count and whole.eval_count > 0 and whole.total_duration and whole.total_duration > 0
        assert whole.prompt_eval_count and whole.prompt_eval_count > 0
        # As Home Assistant sends it: streamed, tools empty, floats where integers are meant.
        parts = list(api.chat("tiny:latest", messages=history[-1:], stream=True, tools=[], think=False,
                              keep_alive=300.0, options={"num_ctx": 8192.0}))
        assert all(not p.done for p in parts[:-1]) and parts[-1].done and parts[-1].done_reason == "stop"
        assert "".join(p.message.content or "" for p in parts) == "and the date"
        assert parts[-1].eval_count == 3 and parts[-1].eval_duration is not None
        assert {p.model for p in parts} == {"tiny:latest"}, "the name asked for comes back"
        structured = api.chat("tiny", messages=history[-1:], stream=False,
                              format={"type": "object", "properties": {"a": {"type": "string"}}})
        assert structured.done


def test_generate_streamed_and_not(env: Env) -> None:
    with fleet(env) as port:
        api = client(port)
        out = api.generate("tiny", "one two three four", options={"num_predict": 2})
        assert out.response == "one two" and out.done_reason == "length" and out.eval_count == 2
        streamed = list(api.generate("tiny", "a b c", stream=True))
        assert "".join(p.response or "" for p in streamed) == "a b c" and streamed[-1].done
        loaded = api.generate("tiny", "")
        assert loaded.done and loaded.done_reason == "load", "an empty prompt only loads the model"
        loaded_chat = api.chat("tiny", messages=[], stream=False)
        assert loaded_chat.done and loaded_chat.done_reason == "load", "so do no messages"
        with_system = api.generate("tiny", "hello", system="be brief")
        assert "System: be brief" in (with_system.response or "")


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_a_tool_call_round_trip(env: Env, stream: bool) -> None:
    """The model calls a tool; the client runs it and sends the result back; the model
    answers. Arguments arrive as an object, as Home Assistant iterates them."""
    with fleet(env) as port:
        api = client(port)
        messages: list[Any] = [{"role": "user", "content": "turn off the kitchen light"}]
        if stream:
            parts = list(api.chat("toolbox", messages=messages, tools=TOOLS, stream=True))
            calls = [c for p in parts for c in (p.message.tool_calls or [])]
            assert parts[-1].done
        else:
            reply = api.chat("toolbox", messages=messages, tools=TOOLS, stream=False)
            calls = list(reply.message.tool_calls or [])
        assert len(calls) == 1 and calls[0].function.name == "HassTurnOff"
        assert dict(calls[0].function.arguments) == {"text": "turn off the kitchen light"}
        messages += [{"role": "assistant", "content": "", "tool_calls": [
                         {"function": {"name": "HassTurnOff", "arguments": dict(calls[0].function.arguments)}}]},
                     {"role": "tool", "content": '{"success": true}', "tool_name": "HassTurnOff"}]
        final = api.chat("toolbox", messages=messages, tools=TOOLS, stream=False)
        assert not final.message.tool_calls, "after the tool's result the model answers"
        assert '{"success": true}' in final.message.content and "[called HassTurnOff(" in final.message.content
        with pytest.raises(ollama.ResponseError) as refused:
            api.chat("tiny", messages=messages[:1], tools=TOOLS)
        assert refused.value.status_code == 400 and "tools" in str(refused.value), "never a silent drop"


def test_the_same_bearer_key_as_the_openai_front(env: Env) -> None:
    key = env.tmp / "key"
    key.write_text("s3cret\n")
    key.chmod(0o600)
    with fleet(env, api_key_file=str(key)) as port:
        with pytest.raises(ollama.ResponseError) as refused:
            client(port).list()
        assert refused.value.status_code == 401
        with pytest.raises(ollama.ResponseError):
            client(port, "wrong").chat("tiny", messages=[{"role": "user", "content": "x"}])
        api = client(port, "s3cret")
        assert {m.model for m in api.list().models} == {"tiny", "toolbox"}
        assert api.chat("tiny", messages=[{"role": "user", "content": "hi there"}], stream=False).message.content \
            == "hi there"


def test_errors_are_ollama_shaped(env: Env) -> None:
    with fleet(env) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for path, body, status in (("/api/chat", {"model": "tiny", "messages": "hi"}, 400),
                                   ("/api/chat", {"model": "tiny", "messages": [{"role": "user", "content": "x",
                                                                                 "images": ["aGk="]}]}, 400),
                                   ("/api/chat", {"messages": [{"role": "user", "content": "x"}]}, 400),
                                   ("/api/generate", {"model": "tiny", "prompt": "x",
                                                      "options": {"num_predict": "many"}}, 400),
                                   ("/api/embed", {"model": "tiny", "input": "x"}, 404)):
            raw = json.dumps(body).encode()
            conn.request("POST", path, raw, {"Content-Type": "application/json", "Content-Length": str(len(raw))})
            resp = conn.getresponse()
            answer = json.loads(resp.read())
            assert resp.status == status and isinstance(answer["error"], str), (path, body, answer)
        conn.close()


# --------------------------------------------------------------------------- pure parts

def test_names_with_and_without_latest_resolve_to_what_is_listed() -> None:
    listed = [{"name": "llama3.2:1b", "aliases": []}, {"name": "qwen", "aliases": ["qwen2.5"]},
              {"name": "edge-agent", "aliases": []}]
    assert canonical("qwen:latest") == "qwen"
    assert resolve("qwen:latest", listed)[0] == "qwen"
    assert resolve("qwen2.5:latest", listed)[0] == "qwen"
    assert resolve("llama3.2:1b", listed)[0] == "llama3.2:1b"
    assert resolve("edge-agent:latest", listed)[0] is None, "the default name: any device"
    assert resolve("mistral", listed)[1] is None
    with pytest.raises(BadRequest):
        resolve(None, listed)


def test_options_may_be_floats_and_tool_arguments_may_be_strings() -> None:
    assert options_of({"options": {"num_ctx": 8192.0, "num_predict": 64.0, "temperature": 0}}) == (64, 0.0)
    assert options_of({"options": {"num_predict": -1}})[0] > 0
    chat = chat_of_ollama({"messages": [{"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "f", "arguments": '{"a": 1}'}}]}], "format": "json"})
    assert chat.messages[0].tool_calls[0].arguments == {"a": 1} and chat.format == "json"
    with pytest.raises(BadRequest):
        chat_of_ollama({"messages": [{"role": "user", "content": "x"}], "format": "yaml"})
