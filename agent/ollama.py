"""Ollama's API on the `serve` address, for clients that speak only Ollama (Home
Assistant's ``ollama`` integration, Open WebUI, most local-LLM tools).

    GET  /  HEAD /      "Ollama is running"
    GET  /api/version   GET /api/tags   GET /api/ps
    POST /api/show      POST /api/pull  POST /api/chat   POST /api/generate

Theory of operation. This module only translates: a request becomes the same ``Prompt``
the OpenAI front builds (a chat, with tools and format, for /api/chat), runs through the
same line of waiting requests and the same backend (agent/serve.py), and the answer is
written in Ollama's shapes: NDJSON (``application/x-ndjson``, one object a line, the last
with ``done: true``, ``done_reason`` and the durations in nanoseconds) when streamed —
Ollama's default — or one object when ``stream`` is false. Tool calls carry their
``arguments`` as an object. Errors are ``{"error": "…"}`` with Ollama's statuses; an error
after the stream began is one last line with ``error``.

Models: /api/tags lists what the fleet serves, names as configured (an executor that
names none is listed as ``edge-agent``). A request may name a listed model with or
without ``:latest``; ``edge-agent`` and ``default`` mean any device. Nothing is ever
downloaded: /api/pull of a served model succeeds at once, of any other is a 404.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.config import DEFAULT_MODEL
from agent.messages import Chat, ChatMessage, Prompt, ToolCall
from agent.openai_api import NO_PREFERENCE, BadRequest, arguments_of, prompt_of, text_of, tools_of
from agent.serve import Stop

if TYPE_CHECKING:
    from agent.openai_api import Answered
    from agent.serve import _Handler

log = logging.getLogger(__name__)

# num_predict absent or negative: Ollama generates until the model stops; a fleet job
# needs a budget, and an assistant's answer fits in this.
DEFAULT_PREDICT = 1024
# What /api/version says: the Ollama API version this front follows (clients compare it).
API_VERSION = "0.6.2"
_EPOCH = "2024-01-01T00:00:00Z"  # modified_at of every listed model: nothing is ever pulled
_FAR = "2100-01-01T00:00:00Z"    # expires_at in /api/ps: the fleet keeps its models


# ----------------------------------------------------------------------------- pure parts

def canonical(name: str) -> str:
    """``name`` without a ``:latest`` tag (Ollama's default tag)."""
    return name[:-7] if name.endswith(":latest") else name


def resolve(requested: Any, listed: list[dict[str, Any]]) -> tuple[str | None, dict[str, Any] | None]:
    """(the model to ask the fleet for, None for any device; its listing entry, None if
    no listed model fits). BadRequest if ``requested`` is not a name."""
    if not isinstance(requested, str) or not 0 < len(requested) <= 200:
        raise BadRequest(400, "model is required")
    want = canonical(requested)
    for entry in listed:
        if want in (canonical(entry["name"]), *map(canonical, entry.get("aliases") or ())):
            return (None if entry["name"] in NO_PREFERENCE else entry["name"]), entry
    if want in NO_PREFERENCE:
        return None, {"name": DEFAULT_MODEL, "devices": [], "tools": False}
    return want, None


def not_found(requested: Any) -> BadRequest:
    return BadRequest(404, f'model "{requested}" not found, try pulling it first')


# Our names of a prompt's fields -> Ollama's, for the errors.
OLLAMA_NAMES = {"max_new_tokens": "options.num_predict", "temperature": "options.temperature"}


def options_of(body: dict[str, Any]) -> tuple[int, Any]:
    """(max new tokens, temperature) from ``options``; other options (num_ctx, …) may
    arrive as floats and are accepted and left to the device."""
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise BadRequest(400, "options must be an object")
    predict = options.get("num_predict")
    if predict is None or (isinstance(predict, (int, float)) and not isinstance(predict, bool) and predict < 0):
        max_new = DEFAULT_PREDICT
    elif isinstance(predict, (int, float)) and not isinstance(predict, bool) and predict == int(predict):
        max_new = max(1, min(int(predict), 1_000_000))
    else:
        raise BadRequest(400, "options.num_predict must be an integer")
    return max_new, options.get("temperature")  # checked with the rest of the request (Prompt)


def format_of(raw: Any) -> str | dict[str, Any] | None:
    if raw is None or raw == "":
        return None
    if raw == "json" or isinstance(raw, dict):
        return raw  # type: ignore[no-any-return]
    raise BadRequest(400, 'format must be "json" or a JSON schema object')


def chat_of_ollama(body: dict[str, Any]) -> Chat:
    """The conversation of an /api/chat request."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest(400, "messages must be a non-empty list")
    turns = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool"):
            raise BadRequest(400, f"{where} must be an object with a role (system, user, assistant, tool)")
        if m.get("images"):
            raise BadRequest(400, f"{where}: images are not supported")
        calls = []
        for j, c in enumerate(m.get("tool_calls") or []):
            fn = c.get("function") if isinstance(c, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise BadRequest(400, f"{where}.tool_calls[{j}] must name a function")
            calls.append(ToolCall(fn["name"], arguments_of(fn.get("arguments"), f"{where}.tool_calls[{j}]"),
                                  str(c.get("id") or "")))
        name = m.get("tool_name") or m.get("name") or ""
        turns.append(ChatMessage(m["role"], text_of(m.get("content"), where), tuple(calls),
                                 str(m.get("tool_call_id") or ""), str(name)))
    return Chat(tuple(turns), tools_of(body.get("tools")), format_of(body.get("format")))


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def details(entry: dict[str, Any]) -> dict[str, Any]:
    return {"parent_model": "", "format": "edge-agent", "family": "edge-agent", "families": ["edge-agent"],
            "parameter_size": "", "quantization_level": ""}


def digest(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def tag_of(entry: dict[str, Any]) -> dict[str, Any]:
    """One model in /api/tags."""
    return {"name": entry["name"], "model": entry["name"], "modified_at": _EPOCH, "size": 0,
            "digest": digest(entry["name"]), "details": details(entry)}


def show_of(entry: dict[str, Any]) -> dict[str, Any]:
    """/api/show of one model."""
    info: dict[str, Any] = {"general.architecture": "edge-agent", "edge-agent.devices": entry.get("devices", [])}
    if entry.get("context"):
        info["edge-agent.context_length"] = entry["context"]
    return {"modelfile": "", "parameters": "", "template": "", "license": "", "details": details(entry),
            "model_info": info, "modified_at": _EPOCH,
            "capabilities": ["completion", *(["tools"] if entry.get("tools") else [])]}


def final_fields(answered: Answered, max_new: int) -> dict[str, Any]:
    """The last object's ``done`` fields: reason, counts, durations in nanoseconds."""
    t = answered.timings
    ns = 1_000_000
    # The engine's reason where it gave one (Ollama says "stop" or "length" alike).
    reason = answered.finish_reason if answered.finish_reason in ("stop", "length") else \
        "length" if answered.completion_tokens >= max_new and not answered.tool_calls else "stop"
    return {"done": True, "done_reason": reason, "total_duration": int(answered.total_ms * ns),
            "load_duration": int(t.init_ms * ns), "prompt_eval_count": answered.prompt_tokens,
            "prompt_eval_duration": int(t.prefill_ms * ns), "eval_count": answered.completion_tokens,
            "eval_duration": int(t.decode_ms * ns)}


def tool_calls_out(calls: tuple[ToolCall, ...]) -> list[dict[str, Any]]:
    return [{"id": c.id, "function": {"index": i, "name": c.name, "arguments": dict(c.arguments)}}
            for i, c in enumerate(calls)]


# ----------------------------------------------------------------------------- routes

def _send(h: _Handler, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
    h._json(status, obj, headers)


def _error(h: _Handler, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    _send(h, status, {"error": message}, headers)


def _authorised(h: _Handler) -> bool:
    if h.key_ok():
        return True
    _error(h, 401, "unauthorized: missing or wrong API key (Authorization: Bearer …)")
    return False


def head(h: _Handler, path: str) -> None:
    h.send_response(200 if path == "/" else 404)
    h.send_header("Content-Type", "text/plain; charset=utf-8")
    h.send_header("Content-Length", "0" if path != "/" else str(len(b"Ollama is running")))
    h.end_headers()


def get(h: _Handler, path: str) -> None:
    if path == "/":
        body = b"Ollama is running"
        h.send_response(200)
        h.send_header("Content-Type", "text/plain; charset=utf-8")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)
        return
    if path == "/api/version":
        _send(h, 200, {"version": API_VERSION, "edge_agent": __version__})
        return
    if not _authorised(h):
        return
    if path == "/api/tags":
        _send(h, 200, {"models": [tag_of(e) for e in h.gateway.backend.models()]})
    elif path == "/api/ps":
        _send(h, 200, {"models": [{**tag_of(e), "expires_at": _FAR, "size_vram": 0,
                                   "context_length": e.get("context") or 0}
                                  for e in h.gateway.backend.models()]})
    else:
        _error(h, 404, f"no route {path}")


def post(h: _Handler, path: str) -> None:
    if path not in ("/api/chat", "/api/generate", "/api/show", "/api/pull"):
        _error(h, 404, f"no route {path}")
        return
    if not _authorised(h):
        return
    try:
        body = h._body()
        requested = body.get("model") or body.get("name")
        model, entry = resolve(requested, h.gateway.backend.models())
        if path == "/api/show":
            if entry is None:
                raise not_found(requested)
            _send(h, 200, show_of(entry))
            return
        if path == "/api/pull":
            if entry is None:
                raise BadRequest(404, "pull model manifest: file does not exist (this fleet serves only "
                                      "the models /api/tags lists)")
            _pulled(h, body.get("stream") is not False)
            return
        if entry is None:
            raise not_found(requested)
        max_new, temperature = options_of(body)
        stream = body.get("stream") is not False
        chat: Chat | None
        if path == "/api/chat" and body.get("messages") == []:  # Ollama's way to load a model
            _send(h, 200, {"model": requested, "created_at": now_iso(),
                           "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "load"})
            return
        if path == "/api/chat":
            chat = chat_of_ollama(body)
        else:
            prompt = body.get("prompt") or ""
            system = body.get("system") or ""
            if not isinstance(prompt, str) or not isinstance(system, str):
                raise BadRequest(400, "prompt and system must be strings")
            if body.get("images"):
                raise BadRequest(400, "images are not supported")
            if not prompt.strip():  # Ollama's way to load a model: nothing to run here
                _send(h, 200, {"model": requested, "created_at": now_iso(), "response": "", "done": True,
                               "done_reason": "load"})
                return
            fmt = format_of(body.get("format"))
            turns = ((ChatMessage("system", system),) if system else ()) + (ChatMessage("user", prompt),)
            chat = Chat(turns, (), fmt) if system or fmt is not None else None
        ask = prompt_of(chat.transcript() if chat is not None else str(body["prompt"]), max_new, model, temperature,
                        chat, names=OLLAMA_NAMES)
        if chat is not None and chat.tools and entry.get("devices") and not entry.get("tools"):
            raise BadRequest(400, f'"{requested}" does not support tools (no device serving it can call tools)')
    except BadRequest as exc:
        _error(h, exc.status, str(exc))
        return
    if not h.admit(lambda status, message, headers: _error(h, status, message, headers)):
        return
    try:
        _answer(h, ask, chat=path == "/api/chat", stream=stream, shown=str(requested))
    finally:
        h.gateway.admission.leave()


def _pulled(h: _Handler, stream: bool) -> None:
    if not stream:
        _send(h, 200, {"status": "success"})
        return
    lines = b"".join(json.dumps(o).encode() + b"\n" for o in ({"status": "pulling manifest"}, {"status": "success"}))
    h.send_response(200)
    h.send_header("Content-Type", "application/x-ndjson")
    h.send_header("Content-Length", str(len(lines)))
    h.end_headers()
    h.wfile.write(lines)


def _answer(h: _Handler, ask: Prompt, *, chat: bool, stream: bool, shown: str) -> None:
    """Run one /api/chat or /api/generate request and write the answer in Ollama's shape."""
    stop = Stop()
    lock = threading.Lock()
    started = {"headers": False}

    def piece(text: str) -> dict[str, Any]:
        head_: dict[str, Any] = {"model": shown, "created_at": now_iso()}
        return {**head_, "message": {"role": "assistant", "content": text}} if chat else {**head_, "response": text}

    def line(obj: dict[str, Any]) -> None:
        try:
            h.wfile.write(json.dumps(obj, ensure_ascii=False).encode() + b"\n")
            h.wfile.flush()
        except OSError:
            stop.set()  # the client is gone: the backend cancels the job

    def headers(device: str | None) -> None:
        if started["headers"] or not stream:
            return
        started["headers"] = True
        h.begin_stream("application/x-ndjson", device)

    def on_decision(device: str, path: str | None) -> None:
        with lock:
            headers(device)

    def on_token(text: str) -> None:
        if not stream:
            return
        with lock:
            headers(None)
            line({**piece(text), "done": False})

    began = time.monotonic()
    answered, failure = h.run_backend(ask, on_decision, on_token, stop)
    with lock:
        if failure is not None:
            status, message, code = failure
            if code == "client_gone":
                return
            if status == 499:
                status = 500
            if started["headers"]:
                line({"error": message})
                h.close_connection = True
            else:
                _error(h, status, message)
            return
        assert answered is not None
        final = final_fields(answered, ask.max_new_tokens)
        extension = {"edge_agent": {"device": answered.winner, "path": answered.path, "rid": answered.rid,
                                    "total_ms": round(answered.total_ms, 1),
                                    "gateway_ms": round((time.monotonic() - began) * 1000, 1)}}
        calls = tool_calls_out(answered.tool_calls)
        if stream:
            headers(answered.winner)
            if calls:
                tool_piece = piece("")
                tool_piece["message"] = {"role": "assistant", "content": "", "tool_calls": calls}
                line({**tool_piece, "done": False})
            last = piece("")
            if not chat:
                last["context"] = []
            line({**last, **final, **extension})
            h.close_connection = True
            return
        whole = piece(answered.text)
        if chat and calls:
            whole["message"]["tool_calls"] = calls
        if not chat:
            whole["context"] = []
        _send(h, 200, {**whole, **final, **extension}, {"X-Edge-Agent-Device": answered.winner or ""})
