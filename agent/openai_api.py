"""OpenAI's API, the pure half: a request body becomes a ``Prompt``, an answer becomes
OpenAI's JSON, and nothing here reads a socket or a clock.

Theory of operation. agent/serve.py routes and streams; for ``/v1/chat/completions`` and
``/v1/completions`` it hands the parsed body to ``completion_request`` (a ``BadRequest``
names the status and the field in OpenAI's terms), runs the ``Prompt`` through the backend,
and writes what a ``Reply`` shapes: the chunks of a stream (``chat.completion.chunk`` or
``text_completion``, then ``data: [DONE]``) or one object. The request parsers that both
fronts share (content parts, tool call arguments, tools) live here too, since Ollama's API
spells them as OpenAI's does; agent/ollama.py imports them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from agent.config import DEFAULT_MODEL
from agent.errors import BadPrompt, ExitCode
from agent.messages import Chat, ChatMessage, ModelInfo, Prompt, Timings, ToolCall, tool_name

# max_tokens absent: OpenAI's models stop when they are done; a fleet job needs a budget.
DEFAULT_MAX_TOKENS = 256


@dataclass(frozen=True)
class Answered:
    """What a backend (agent/serve.py) answers to either front: the text and who gave it."""
    ok: bool
    text: str
    winner: str | None
    path: str | None
    rid: str
    exit_code: int
    error: str | None
    prompt_tokens: int
    completion_tokens: int
    total_ms: float
    finish_reason: str = ""   # the engine's; "" when it did not say
    tool_calls: tuple[ToolCall, ...] = ()
    timings: Timings = Timings()
    kind: str = ""            # why no device ran it, where that has a name (dispatch.Answer.kind)


class BadRequest(Exception):
    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


def text_of(content: Any, where: str) -> str:
    """A message's content: a string, or text content parts (null: empty)."""
    if content is None:
        return ""
    if isinstance(content, list):  # content parts: text only
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
            raise BadRequest(400, f"{where}: only text content is supported", param="messages")
        return "".join(t for t in texts if isinstance(t, str))
    if not isinstance(content, str):
        raise BadRequest(400, f"{where}.content must be text", param="messages")
    return content


def arguments_of(raw: Any, where: str) -> dict[str, Any]:
    """Tool call arguments: an object, or a string holding one (OpenAI's shape)."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw) if raw.strip() else {}
        except (ValueError, RecursionError):
            raise BadRequest(400, f"{where}.arguments is not JSON", param="messages") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise BadRequest(400, f"{where}.arguments must be a JSON object", param="messages")
    return raw


def tools_of(raw: Any) -> tuple[dict[str, Any], ...]:
    """Function tools, as both APIs spell them ({"type": "function", "function": {...}})."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or len(raw) > 128:
        raise BadRequest(400, "tools must be a list of up to 128 tools", param="tools")
    for i, tool in enumerate(raw):
        if tool_name(tool) is None:
            raise BadRequest(400, f'tools[{i}] must be {{"type": "function", "function": {{"name": …}}}}',
                             param="tools")
    return tuple(raw)


def chat_of_openai(body: dict[str, Any]) -> Chat:
    """The conversation of a chat completion request: messages, tools, response format."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest(400, "messages must be a non-empty list", param="messages")
    turns = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            raise BadRequest(400, f"{where} must be an object with a role (system, user, assistant, tool)",
                             param="messages")
        calls = []
        for j, c in enumerate(m.get("tool_calls") or []):
            fn = c.get("function") if isinstance(c, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise BadRequest(400, f"{where}.tool_calls[{j}] must name a function", param="messages")
            calls.append(ToolCall(fn["name"], arguments_of(fn.get("arguments"), f"{where}.tool_calls[{j}]"),
                                  str(c.get("id") or "")))
        role = "system" if m["role"] == "developer" else m["role"]
        turns.append(ChatMessage(role, text_of(m.get("content"), where), tuple(calls),
                                 str(m.get("tool_call_id") or ""), str(m.get("name") or "")))
    fmt: Any = None
    rf = body.get("response_format")
    if isinstance(rf, dict) and rf.get("type") == "json_object":
        fmt = "json"
    elif isinstance(rf, dict) and rf.get("type") == "json_schema":
        schema = (rf.get("json_schema") or {}).get("schema") if isinstance(rf.get("json_schema"), dict) else None
        if not isinstance(schema, dict):
            raise BadRequest(400, "response_format.json_schema.schema must be an object", param="response_format")
        fmt = schema
    elif rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
        raise BadRequest(400, "response_format must be text, json_object or json_schema", param="response_format")
    tools = tools_of(body.get("tools")) if body.get("tool_choice") != "none" else ()
    return Chat(tuple(turns), tools, fmt)


def prompt_of(prompt: str, max_new_tokens: Any, model: str | None, temperature: Any, chat: Chat | None, *,
              names: dict[str, str]) -> Prompt:
    """The request as a ``Prompt`` (the bounds every front shares); a 400 naming the
    field in the API's own terms (``names``: ours -> theirs) if one is out of bounds."""
    try:
        return Prompt(prompt, max_new_tokens, model=model, temperature=temperature, chat=chat)
    except BadPrompt as exc:
        theirs = names.get(exc.field, exc.field)
        message = str(exc).replace(exc.field, theirs, 1)
        raise BadRequest(400, message, param=theirs) from None


# Our names of a prompt's fields -> OpenAI's, for the errors.
OPENAI_NAMES = {"max_new_tokens": "max_tokens"}

# Model names that ask for no model in particular: any device answers.
NO_PREFERENCE = ("", "default", DEFAULT_MODEL)


def model_of(body: dict[str, Any]) -> str | None:
    model = body.get("model")
    if model is None or model in NO_PREFERENCE:
        return None  # no preference: any device, as a trigger without a model
    if not isinstance(model, str):
        raise BadRequest(400, "model must be a model name", param="model")
    return model  # its length is checked with the rest of the request (Prompt)


# Why no device ran a job (dispatch.Answer.kind) -> OpenAI's error code for it.
ERROR_CODES = {"model_not_served": "model_not_found", "no_tools": "tools_not_supported"}

STATUS_OF = {ExitCode.NO_DEVICE: 503, ExitCode.TIMEOUT: 504, ExitCode.USAGE: 400, ExitCode.BROKER: 503,
             ExitCode.INTERRUPTED: 499, ExitCode.FAILED: 502}


# ----------------------------------------------------------------------------- one request

def json_body(raw: bytes) -> dict[str, Any]:
    """A request's body (either API's): a JSON object."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise BadRequest(400, "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest(400, "the body must be a JSON object")
    return body


@dataclass(frozen=True)
class Completion:
    """A completion request, parsed: what to run and how to answer it."""
    ask: Prompt
    chat: bool             # /v1/chat/completions (else /v1/completions)
    stream: bool
    usage_in_stream: bool  # stream_options.include_usage: a last chunk with the usage
    shown_model: str       # the model the answer names: the one asked for, as asked


def completion_request(body: dict[str, Any], *, chat: bool) -> Completion:
    """The request of a (chat) completion body; BadRequest if it is not one."""
    conversation = None
    if chat:
        conversation = chat_of_openai(body)
        prompt = conversation.transcript()
    else:
        raw: Any = body.get("prompt")
        if isinstance(raw, list) and len(raw) == 1:
            raw = raw[0]
        if not isinstance(raw, str) or not raw.strip():
            raise BadRequest(400, "prompt must be a non-empty string", param="prompt")
        prompt = raw
    max_new = body.get("max_completion_tokens", body.get("max_tokens"))
    ask = prompt_of(prompt, DEFAULT_MAX_TOKENS if max_new is None else max_new, model_of(body),
                    body.get("temperature"), conversation, names=OPENAI_NAMES)
    options = body.get("stream_options")
    return Completion(ask, chat, stream=body.get("stream") is True,
                      usage_in_stream=isinstance(options, dict) and options.get("include_usage") is True,
                      shown_model=str(body.get("model") or DEFAULT_MODEL))


def failure_of(answered: Answered) -> tuple[int, str, str]:
    """A job no device ran, as (HTTP status, message, OpenAI error code)."""
    code = ExitCode(answered.exit_code) if answered.exit_code in ExitCode._value2member_map_ \
        else ExitCode.FAILED
    err_code = ERROR_CODES.get(answered.kind)
    status = 404 if err_code == "model_not_found" else 400 if err_code else STATUS_OF.get(code, 502)
    return status, answered.error or "failed", err_code or "edge_agent_error"


# ----------------------------------------------------------------------------- answers

def error_body(message: str, *, kind: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_kind(status: int) -> str:
    """OpenAI's error type for a failed job's HTTP status."""
    return "server_error" if status >= 500 else "invalid_request_error"


def stream_error(message: str, code: str) -> dict[str, Any]:
    """An error after the stream began: one event, then the end."""
    return {"error": {"message": message, "type": "server_error", "code": code}}


def fleet_models(served: Iterable[tuple[str, ModelInfo]]) -> list[dict[str, Any]]:
    """The models listed to both fronts, from (device, what it serves) pairs: one entry a
    name, sorted by name, with the aliases and context of the first pair that names it,
    every device that serves it (sorted), and whether any of them calls tools. The one
    place a listing is built, whether the pairs come from this process's executors, the
    roster's metrics or the node daemon's status rows."""
    entries: dict[str, dict[str, Any]] = {}
    for device, info in served:
        entry = entries.setdefault(info.name, {"name": info.name, "aliases": list(info.aliases),
                                               "context": info.context, "devices": [], "tools": False})
        entry["devices"] = sorted({*entry["devices"], device})
        entry["tools"] = entry["tools"] or info.tools
    return [entries[name] for name in sorted(entries)]


def models_list(models: list[dict[str, Any]]) -> dict[str, Any]:
    """GET /v1/models: the fleet's models (the backend's entries) in OpenAI's shape."""
    return {"object": "list", "data": [{"id": m["name"], "object": "model", "created": 0, "owned_by": "edge-agent",
                                        "aliases": m.get("aliases", []), "context_length": m.get("context"),
                                        "devices": m.get("devices", [])} for m in models]}


def finish_of(answered: Answered, max_new_tokens: int) -> str:
    """Why the answer ended: the engine's reason where it gave one, else a guess."""
    finish = "stop"
    if answered.finish_reason:
        finish = answered.finish_reason
    elif answered.completion_tokens >= max_new_tokens:
        finish = "length"
    if answered.tool_calls:
        finish = "tool_calls"
    return finish


def usage_of(answered: Answered) -> dict[str, int]:
    return {"prompt_tokens": answered.prompt_tokens, "completion_tokens": answered.completion_tokens,
            "total_tokens": answered.prompt_tokens + answered.completion_tokens}


def extension_of(answered: Answered) -> dict[str, Any]:
    """Our addition to the last chunk or the object: who answered, how, how fast."""
    return {"edge_agent": {"device": answered.winner, "path": answered.path, "rid": answered.rid,
                           "total_ms": round(answered.total_ms, 1)}}


def calls_of(answered: Answered) -> list[dict[str, Any]]:
    """The tool calls, in OpenAI's shape: arguments as a JSON string."""
    return [{"id": c.id or f"call_{i}", "type": "function",
             "function": {"name": c.name, "arguments": json.dumps(dict(c.arguments), ensure_ascii=False)}}
            for i, c in enumerate(answered.tool_calls)]


@dataclass(frozen=True)
class Reply:
    """The JSON objects of one answer: its id, time, model and kind, fixed at the start."""
    cid: str
    created: int
    model: str
    chat: bool

    @property
    def chunk_kind(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def chunk(self, piece: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
        return {"id": self.cid, "object": self.chunk_kind, "created": self.created, "model": self.model,
                "choices": [{"index": 0, **piece, "finish_reason": finish}], **extra}

    def opening(self) -> dict[str, Any] | None:
        """The first chunk of a chat stream (the assistant's role); None for a completion."""
        return self.chunk({"delta": {"role": "assistant", "content": ""}}) if self.chat else None

    def token(self, text: str) -> dict[str, Any]:
        return self.chunk({"delta": {"content": text}} if self.chat else {"text": text})

    def tool_calls(self, calls: list[dict[str, Any]]) -> dict[str, Any]:
        return self.chunk({"delta": {"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]}})

    def last(self, answered: Answered, finish: str) -> dict[str, Any]:
        return self.chunk({"delta": {}} if self.chat else {"text": ""}, finish, **extension_of(answered))

    def usage(self, answered: Answered) -> dict[str, Any]:
        return {"id": self.cid, "object": self.chunk_kind, "created": self.created, "model": self.model,
                "choices": [], "usage": usage_of(answered)}

    def stream(self, answered: Answered, *, finish: str, usage: bool) -> list[dict[str, Any]]:
        """The chunks after the text: tool calls if any, the last, the usage if asked."""
        calls = calls_of(answered)
        return [*([self.tool_calls(calls)] if calls else []), self.last(answered, finish),
                *([self.usage(answered)] if usage else [])]

    def whole(self, answered: Answered, finish: str) -> dict[str, Any]:
        """The answer as one object (not streamed)."""
        calls = calls_of(answered)
        reply: dict[str, Any] = {"role": "assistant", "content": answered.text or (None if calls else "")}
        if calls:
            reply["tool_calls"] = calls
        choice: dict[str, Any] = {"message": reply} if self.chat else {"text": answered.text}
        return {"id": self.cid, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model,
                "choices": [{"index": 0, **choice, "finish_reason": finish}],
                "usage": usage_of(answered), **extension_of(answered)}
