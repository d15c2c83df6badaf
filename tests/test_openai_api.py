"""OpenAI's API, the pure half (agent/openai_api.py): request bodies in, prompts and JSON
out, with no server. tests/test_serve.py drives the same code through a real gateway."""

from __future__ import annotations

import json
from typing import Any

import pytest

from agent.errors import ExitCode
from agent.messages import ModelInfo, ToolCall
from agent.openai_api import (
    DEFAULT_MAX_TOKENS,
    Answered,
    BadRequest,
    Reply,
    completion_request,
    error_kind,
    failure_of,
    finish_of,
    fleet_models,
    json_body,
    models_list,
)


def answered(**kw: Any) -> Answered:
    base: dict[str, Any] = dict(ok=True, text="hi", winner="dev-b", path="auction", rid="r1", exit_code=0,
                                error=None, prompt_tokens=3, completion_tokens=2, total_ms=12.345)
    return Answered(**{**base, **kw})


def test_a_chat_request_becomes_a_prompt_with_its_conversation() -> None:
    req = completion_request({"model": "tiny", "messages": [{"role": "developer", "content": "be brief"},
                                                            {"role": "user", "content": [{"type": "text",
                                                                                          "text": "hello"}]}],
                              "max_completion_tokens": 9, "max_tokens": 99, "temperature": 0.5, "stream": True,
                              "stream_options": {"include_usage": True}}, chat=True)
    assert req.chat and req.stream and req.usage_in_stream
    assert req.ask.max_new_tokens == 9  # max_completion_tokens wins over the older max_tokens
    assert req.ask.model == "tiny" and req.ask.temperature == 0.5 and req.shown_model == "tiny"
    assert req.ask.chat is not None and [m.role for m in req.ask.chat.messages] == ["system", "user"]
    assert req.ask.prompt == req.ask.chat.transcript()


def test_a_completion_request_takes_a_prompt_or_a_list_of_one() -> None:
    req = completion_request({"prompt": ["say hi"], "model": "default"}, chat=False)
    assert req.ask.prompt == "say hi" and req.ask.chat is None and req.ask.model is None
    assert req.ask.max_new_tokens == DEFAULT_MAX_TOKENS and not req.stream and not req.usage_in_stream
    assert req.shown_model == "default"
    assert completion_request({"prompt": "x"}, chat=False).shown_model == "edge-agent"
    loose = completion_request({"prompt": "x", "stream": "yes", "stream_options": {"include_usage": 1}}, chat=False)
    assert not loose.stream and not loose.usage_in_stream  # only true is true


@pytest.mark.parametrize(("body", "chat", "param", "says"), [
    ({"prompt": ["a", "b"]}, False, "prompt", "prompt must be a non-empty string"),
    ({"prompt": "  "}, False, "prompt", "prompt must be a non-empty string"),
    ({"messages": []}, True, "messages", "messages must be a non-empty list"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, True, "messages", "only text"),
    ({"prompt": "x", "max_tokens": 0}, False, "max_tokens", "max_tokens"),
    ({"prompt": "x", "model": 7}, False, "model", "model must be a model name"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}, True,
     "response_format", "response_format must be"),
])
def test_a_bad_request_names_the_field_in_openais_terms(body: dict[str, Any], chat: bool, param: str,
                                                         says: str) -> None:
    with pytest.raises(BadRequest) as caught:
        completion_request(body, chat=chat)
    assert caught.value.status == 400 and caught.value.param == param and says in str(caught.value)


def test_a_body_must_be_a_json_object() -> None:
    assert json_body(b'{"a": 1}') == {"a": 1}
    for raw, says in ((b"{", "not valid JSON"), (b"[1]", "must be a JSON object"), (b"[" * 100000, "not valid")):
        with pytest.raises(BadRequest, match=says) as caught:
            json_body(raw)
        assert caught.value.status == 400


@pytest.mark.parametrize(("kw", "status", "code"), [
    ({"kind": "model_not_served"}, 404, "model_not_found"),
    ({"kind": "no_tools"}, 400, "tools_not_supported"),
    ({"exit_code": int(ExitCode.NO_DEVICE)}, 503, "edge_agent_error"),
    ({"exit_code": int(ExitCode.TIMEOUT)}, 504, "edge_agent_error"),
    ({"exit_code": 77}, 502, "edge_agent_error"),   # not an exit code of ours: a failure
])
def test_a_job_no_device_ran_gets_the_status_its_reason_calls_for(kw: dict[str, Any], status: int,
                                                                   code: str) -> None:
    assert failure_of(answered(ok=False, error="why", **kw)) == (status, "why", code)
    assert failure_of(answered(ok=False, error=None, **kw))[1] == "failed"
    assert error_kind(status) == ("server_error" if status >= 500 else "invalid_request_error")


def test_the_finish_reason_is_the_engines_else_a_guess_and_tool_calls_win() -> None:
    assert finish_of(answered(), 256) == "stop"
    assert finish_of(answered(completion_tokens=8), 8) == "length"
    assert finish_of(answered(completion_tokens=8, finish_reason="stop"), 8) == "stop"
    assert finish_of(answered(finish_reason="length", tool_calls=(ToolCall("f", {}),)), 8) == "tool_calls"


def test_a_chat_stream_opens_with_the_role_then_tokens_then_calls_last_and_usage() -> None:
    reply = Reply("chatcmpl-1", 1700000000, "tiny", chat=True)
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000, "model": "tiny"}
    assert reply.opening() == {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                    "finish_reason": None}]}
    assert reply.token("hé") == {**head, "choices": [{"index": 0, "delta": {"content": "hé"},
                                                      "finish_reason": None}]}
    done = answered(tool_calls=(ToolCall("turn_off", {"name": "lamp"}, "c9"), ToolCall("f", {"x": "é"})))
    calls, last, usage = reply.stream(done, finish="tool_calls", usage=True)
    assert calls["choices"][0]["delta"]["tool_calls"] == [
        {"index": 0, "id": "c9", "type": "function", "function": {"name": "turn_off",
                                                                  "arguments": '{"name": "lamp"}'}},
        {"index": 1, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x": "é"}'}}]
    assert last == {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}],
                    "edge_agent": {"device": "dev-b", "path": "auction", "rid": "r1", "total_ms": 12.3}}
    assert usage == {**head, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2,
                                                      "total_tokens": 5}}
    assert [c["choices"] for c in reply.stream(answered(), finish="stop", usage=False)] == [
        [{"index": 0, "delta": {}, "finish_reason": "stop"}]]


def test_a_completion_stream_carries_text_and_has_no_opening() -> None:
    reply = Reply("cmpl-1", 5, "m", chat=False)
    assert reply.opening() is None
    assert reply.token("a")["object"] == "text_completion"
    assert reply.token("a")["choices"] == [{"index": 0, "text": "a", "finish_reason": None}]
    (last,) = reply.stream(answered(), finish="length", usage=False)
    assert last["choices"] == [{"index": 0, "text": "", "finish_reason": "length"}]


def test_a_whole_answer_is_one_object_and_keys_keep_their_order() -> None:
    whole = Reply("chatcmpl-2", 7, "tiny", chat=True).whole(answered(), "stop")
    assert json.dumps(whole) == json.dumps({
        "id": "chatcmpl-2", "object": "chat.completion", "created": 7, "model": "tiny",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        "edge_agent": {"device": "dev-b", "path": "auction", "rid": "r1", "total_ms": 12.3}})
    calling = Reply("c", 7, "tiny", chat=True).whole(answered(text="", tool_calls=(ToolCall("f", {}),)),
                                                     "tool_calls")
    message = calling["choices"][0]["message"]
    assert message["content"] is None and message["tool_calls"][0]["function"]["arguments"] == "{}"
    assert Reply("c", 7, "m", chat=False).whole(answered(), "stop")["choices"] == [
        {"index": 0, "text": "hi", "finish_reason": "stop"}]
    assert Reply("c", 7, "m", chat=False).whole(answered(), "stop")["object"] == "text_completion"


def test_the_fleets_models_are_one_entry_a_name_with_every_device_that_serves_it() -> None:
    tiny = ModelInfo("tiny", ("t",), 2048)
    listed = fleet_models([("b", ModelInfo("zeta", tools=True)), ("me", tiny), ("a", ModelInfo("tiny", ("o",), 512)),
                           ("a", ModelInfo("zeta")), ("me", ModelInfo("tiny"))])
    assert listed == [
        {"name": "tiny", "aliases": ["t"], "context": 2048, "devices": ["a", "me"], "tools": False},
        {"name": "zeta", "aliases": [], "context": None, "devices": ["a", "b"], "tools": True}], \
        "sorted by name; the first pair's aliases and context; devices once, sorted; tools if any has them"
    assert fleet_models([]) == []


def test_models_are_listed_in_openais_shape() -> None:
    assert models_list([{"name": "tiny", "aliases": ["t"], "context": 2048, "devices": ["a", "b"]},
                        {"name": "bare"}]) == {"object": "list", "data": [
        {"id": "tiny", "object": "model", "created": 0, "owned_by": "edge-agent", "aliases": ["t"],
         "context_length": 2048, "devices": ["a", "b"]},
        {"id": "bare", "object": "model", "created": 0, "owned_by": "edge-agent", "aliases": [],
         "context_length": None, "devices": []}]}
