"""Any OpenAI-compatible server (llama.cpp ``llama-server``, Ollama, vLLM), streamed.

``POST {base_url}/chat/completions`` with ``"stream": true``; the answer arrives as
server-sent events (``data: {json}`` lines, ended by ``data: [DONE]``), each carrying a
``choices[0].delta.content`` piece. Time to the first piece is reported as
``prefill_ms``, the rest as ``decode_ms``. The standard library's HTTP client is enough:
one request per job, read line by line, no connection pool to manage.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from agent.config import OpenAIExecutorConfig
from agent.errors import Cancelled, ExecutionTimeout, ExecutorError
from agent.executors import OnToken, Params, Result, estimate_tokens
from agent.messages import MAX_TOKENS, ChatMessage, Timings, ToolCall

_BODY_TAIL = 300


class OpenAIExecutor:
    def __init__(self, cfg: OpenAIExecutorConfig, *, name: str):
        self.cfg = cfg
        self.name = f"{name}:openai"
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"

    def check(self) -> str | None:
        try:
            self._api_key()
        except ExecutorError as exc:
            return exc.reason
        return None

    def probe(self, timeout_s: float = 3.0) -> str | None:
        """Whether the server answers ``GET {base_url}/models`` and serves the configured
        model (``check`` only: a node does not need the server up to start)."""
        problem = self.check()
        if problem is not None:
            return problem
        url = self.cfg.base_url.rstrip("/") + "/models"
        key = self._api_key()
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as resp:
                listing = json.loads(resp.read(1 << 20))
        except urllib.error.HTTPError as exc:
            exc.close()  # it holds the connection
            return f"{url} answered HTTP {exc.code} {exc.reason}"
        except (urllib.error.URLError, OSError) as exc:
            why = getattr(exc, "reason", exc)
            return f"cannot reach {url}: {getattr(why, 'strerror', None) or why} (is the model server running?)"
        except ValueError:
            return f"{url} did not answer JSON"
        data = listing.get("data") if isinstance(listing, dict) else None
        served = {m.get("id") for m in data if isinstance(m, dict)} if isinstance(data, list) else set()
        if served and self.cfg.model and self.cfg.model not in served:
            return f"{url} does not serve model {self.cfg.model!r} (it serves: {', '.join(sorted(map(str, served)))})"
        return None

    def _api_key(self) -> str | None:
        if self.cfg.api_key_file:
            try:
                with open(self.cfg.api_key_file, encoding="utf-8") as fh:
                    return fh.read().strip()
            except OSError as exc:
                raise ExecutorError(self.name, f"cannot read api_key_file {self.cfg.api_key_file}: "
                                               f"{exc.strerror or exc}") from None
        if self.cfg.api_key_env:
            key = os.environ.get(self.cfg.api_key_env)
            if not key:
                raise ExecutorError(self.name, f"environment variable {self.cfg.api_key_env} is not set")
            return key
        return None

    def run(self, prompt: str, params: Params, on_token: OnToken,
            cancel: threading.Event | None = None) -> Result:
        start = time.monotonic()
        deadline = start + min(params.timeout_s, self.cfg.timeout_s)
        body = request_body(self.cfg.model, prompt, params)
        calls = ToolCallDeltas() if "tools" in body else None
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        key = self._api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers,
                                         method="POST")
        parts: list[str] = []
        first_at: float | None = None
        usage: dict[str, Any] = {}
        finished = False
        try:
            with urllib.request.urlopen(request, timeout=max(0.1, deadline - time.monotonic())) as resp:
                while True:
                    if cancel is not None and cancel.is_set():
                        raise Cancelled(self.name, partial_text="".join(parts))
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise ExecutionTimeout(self.name, params.timeout_s, partial_text="".join(parts))
                    _set_read_timeout(resp, remaining)
                    line = resp.readline()
                    if not line:
                        break
                    line = line.strip()
                    if not line.startswith(b"data:"):
                        continue  # comments, event:/id: fields, keep-alives
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        finished = True
                        break
                    piece, chunk_usage = parse_event(data, parts, name=self.name, url=self.url)
                    if calls is not None:
                        calls.feed(data)
                    usage.update(chunk_usage)
                    if piece:
                        if first_at is None:
                            first_at = time.monotonic()
                        parts.append(piece)
                        on_token(piece)
        except urllib.error.HTTPError as exc:
            with exc:  # it holds the connection: a node that meets many errors must not run out of files
                detail = exc.read()[-_BODY_TAIL:].decode("utf-8", "replace").strip()
            raise ExecutorError(self.name, f"{self.url} answered HTTP {exc.code} {exc.reason}"
                                           + (f": {detail}" if detail else "")) from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, (socket.timeout, TimeoutError)):
                raise ExecutionTimeout(self.name, params.timeout_s, partial_text="".join(parts)) from None
            why = getattr(reason, "strerror", None) or reason
            raise ExecutorError(self.name, f"cannot reach {self.url}: {why}") from None
        except TimeoutError:
            raise ExecutionTimeout(self.name, params.timeout_s, partial_text="".join(parts)) from None
        except (http.client.HTTPException, ConnectionError, OSError) as exc:
            raise ExecutorError(self.name, f"connection to {self.url} dropped mid-stream ({exc or type(exc).__name__})",
                                partial_text="".join(parts)) from None
        if not finished:
            raise ExecutorError(self.name, f"{self.url} closed the stream before [DONE]",
                                partial_text="".join(parts))
        end = time.monotonic()
        text = "".join(parts)
        first = first_at or end
        prompt_tokens, generated = usage_counts(usage)
        return Result(text=text,
                      timings=Timings(prefill_ms=(first - start) * 1000, decode_ms=(end - first) * 1000,
                                      total_ms=(end - start) * 1000),
                      prompt_tokens=prompt_tokens if prompt_tokens is not None else estimate_tokens(prompt),
                      generated_tokens=generated if generated is not None else len(parts),
                      tool_calls=calls.calls() if calls is not None else ())


# ----------------------------------------------------------------------------- chat and tools

def request_body(model: str, prompt: str, params: Params) -> dict[str, Any]:
    """The chat completion request for one job: the conversation as it came (or the prompt
    as one user message), its tools and output format."""
    chat = params.chat
    messages = [{"role": "user", "content": prompt}] if chat is None else openai_messages(chat.messages)
    body: dict[str, Any] = {"model": model, "stream": True, "messages": messages,
                            "max_tokens": params.max_new_tokens}
    if params.temperature is not None:
        body["temperature"] = params.temperature
    if chat is not None and chat.tools:
        body["tools"] = [dict(t) for t in chat.tools]
    fmt = chat.format if chat is not None else None
    if isinstance(fmt, str):
        body["response_format"] = {"type": "json_object"}
    elif fmt is not None:
        schema = {"name": "output", "schema": dict(fmt)}
        body["response_format"] = {"type": "json_schema", "json_schema": schema}
    return body


def openai_messages(messages: tuple[ChatMessage, ...]) -> list[dict[str, Any]]:
    """The turns in OpenAI's shape: tool call arguments as a JSON string, and every call
    with an id that its tool result names (Ollama's clients send neither: a call gets one,
    and a result answers the earliest call not yet answered)."""
    out: list[dict[str, Any]] = []
    unanswered: list[str] = []
    for i, m in enumerate(messages):
        turn: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            ids = [c.id or f"call_{i}_{j}" for j, c in enumerate(m.tool_calls)]
            turn["tool_calls"] = [{"id": cid, "type": "function",
                                   "function": {"name": c.name, "arguments": json.dumps(dict(c.arguments))}}
                                  for cid, c in zip(ids, m.tool_calls, strict=True)]
            unanswered = ids
        if m.role == "tool":
            cid = m.tool_call_id or (unanswered[0] if unanswered else f"call_{i}")
            unanswered = [u for u in unanswered if u != cid]
            turn["tool_call_id"] = cid
            if m.name:
                turn["name"] = m.name
        out.append(turn)
    return out


class ToolCallDeltas:
    """Tool calls assembled from streamed ``delta.tool_calls`` pieces: each names its
    ``index``; the first piece of a call brings its id and name, the arguments arrive as
    string fragments to join."""

    def __init__(self) -> None:
        self._calls: dict[int, dict[str, str]] = {}

    def feed(self, data: bytes) -> None:
        try:
            event = json.loads(data)
            deltas = event["choices"][0]["delta"].get("tool_calls") or []
        except (ValueError, RecursionError, LookupError, TypeError, AttributeError):
            return
        if not isinstance(deltas, list):
            return
        for d in deltas:
            if not isinstance(d, dict):
                continue
            index = d.get("index", len(self._calls))
            call = self._calls.setdefault(index if type(index) is int else len(self._calls),
                                          {"id": "", "name": "", "arguments": ""})
            raw_fn = d.get("function")
            fn: dict[str, Any] = raw_fn if isinstance(raw_fn, dict) else {}
            if isinstance(d.get("id"), str):
                call["id"] = d["id"]
            if isinstance(fn.get("name"), str):
                call["name"] += fn["name"]
            if isinstance(fn.get("arguments"), str):
                call["arguments"] += fn["arguments"]
            elif isinstance(fn.get("arguments"), dict):
                call["arguments"] = json.dumps(fn["arguments"])

    def calls(self) -> tuple[ToolCall, ...]:
        out = []
        for _, call in sorted(self._calls.items()):
            if not call["name"]:
                continue
            try:
                arguments = json.loads(call["arguments"]) if call["arguments"].strip() else {}
            except (ValueError, RecursionError):
                arguments = {"_raw": call["arguments"]}  # what the model wrote, kept for the client to see
            if not isinstance(arguments, dict):
                arguments = {"_raw": arguments}
            out.append(ToolCall(name=call["name"], arguments=arguments, id=call["id"]))
        return tuple(out)

def parse_event(data: bytes, parts: list[str], *, name: str, url: str) -> tuple[str, dict[str, Any]]:
    """One SSE ``data:`` payload -> (the text piece, its usage object or {}); an error
    event, or one that is not JSON, is an ExecutorError carrying ``parts`` so far."""
    try:
        event = json.loads(data)
    except (ValueError, RecursionError):
        raise ExecutorError(name, f"{url} sent an event that is not JSON: {data[:120]!r}",
                            partial_text="".join(parts)) from None
    if not isinstance(event, dict):
        return "", {}
    if "error" in event:
        error = event["error"]
        message = error.get("message") if isinstance(error, dict) else error
        shown = message[:300] if isinstance(message, str) else f"(an error of type {type(message).__name__})"
        raise ExecutorError(name, f"{url} reported an error: {shown}", partial_text="".join(parts))
    raw_usage = event.get("usage")
    usage: dict[str, Any] = raw_usage if isinstance(raw_usage, dict) else {}
    choices = event.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return "", usage
    delta = choices[0].get("delta") or {}
    content = delta.get("content") if isinstance(delta, dict) else None
    return (content if isinstance(content, str) else ""), usage


def usage_counts(usage: dict[str, Any]) -> tuple[int | None, int | None]:
    """(prompt_tokens, completion_tokens) from a server's usage object, each None unless
    it is a sane non-negative integer."""
    def count(value: Any) -> int | None:
        return value if type(value) is int and 0 <= value <= MAX_TOKENS else None
    return count(usage.get("prompt_tokens")), count(usage.get("completion_tokens"))


def _set_read_timeout(resp: Any, seconds: float) -> None:
    """Bound the next read by what is left of the job's time."""
    sock = getattr(getattr(getattr(resp, "fp", None), "raw", None), "_sock", None)
    if sock is not None:
        sock.settimeout(max(0.05, seconds))
