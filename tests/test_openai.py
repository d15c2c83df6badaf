"""The openai executor against a local OpenAI-compatible SSE server."""

from __future__ import annotations

import pytest

from agent.config import OpenAIExecutorConfig
from agent.errors import ExecutionTimeout, ExecutorError
from agent.executors import Params
from agent.executors.openai import OpenAIExecutor, StreamState
from tests.support.fake_openai import FakeOpenAI
from tests.support.mosquitto import free_port


def executor(base_url: str, **kw: object) -> OpenAIExecutor:
    return OpenAIExecutor(OpenAIExecutorConfig(base_url=base_url, model="llama3.2:1b", **kw), name="lap")


def run(ex: OpenAIExecutor, prompt: str = "hi", **params: object):
    parts: list[str] = []
    return ex.run(prompt, Params(**params), parts.append), parts  # type: ignore[arg-type]


def test_streams_the_answer_and_measures_ttft() -> None:
    with FakeOpenAI(answer="The quick brown fox jumps.", delay_ms=5) as server:
        result, parts = run(executor(server.base_url), "say it", max_new_tokens=50, temperature=0.3)
    assert result.text == "The quick brown fox jumps." == "".join(parts)
    assert len(parts) == 5
    assert result.timings.prefill_ms >= 5 and result.timings.decode_ms >= 4 * 5
    assert (result.prompt_tokens, result.generated_tokens) == (3, 5)  # the server's counts: 1 + a word each
    assert result.finish_reason == "stop"
    body = server.requests[0]["body"]
    assert body["stream"] is True and body["max_tokens"] == 50 and body["temperature"] == 0.3
    assert body["stream_options"] == {"include_usage": True}
    assert body["messages"] == [{"role": "user", "content": "say it"}]
    assert body["model"] == "llama3.2:1b"


def test_api_key_from_file_and_environment(tmp_path, monkeypatch) -> None:
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    with FakeOpenAI(api_key="s3cret") as server:
        result, _ = run(executor(server.base_url, api_key_file=str(key)))
        assert result.text
        monkeypatch.setenv("LLM_KEY", "s3cret")
        assert run(executor(server.base_url, api_key_env="LLM_KEY"))[0].text
        with pytest.raises(ExecutorError, match="HTTP 401"):
            run(executor(server.base_url))
    missing = executor("http://x", api_key_env="NOT_SET_ANYWHERE")
    assert "NOT_SET_ANYWHERE" in (missing.check() or "")


def test_http_error_names_the_url_and_status() -> None:
    with FakeOpenAI(mode="http500") as server:
        with pytest.raises(ExecutorError) as info:
            run(executor(server.base_url))
    assert "HTTP 500" in info.value.reason and server.base_url in info.value.reason
    assert "model failed to load" in info.value.reason


def test_refused_connection_names_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(ExecutorError, match=f"cannot reach {url}"):
        run(executor(url))


@pytest.mark.parametrize("mode", ["drop", "error_event"])
def test_broken_stream_keeps_the_partial_text(mode: str) -> None:
    with FakeOpenAI(mode=mode, answer="one two three four five six") as server:
        with pytest.raises(ExecutorError) as info:
            run(executor(server.base_url))
    assert info.value.partial_text.startswith("one")
    assert ("out of memory" in info.value.reason) if mode == "error_event" else True


def test_slow_server_hits_the_wall_clock_limit() -> None:
    with FakeOpenAI(mode="slow", answer=" ".join(["tok"] * 50), delay_ms=50) as server:
        with pytest.raises(ExecutionTimeout) as info:
            run(executor(server.base_url), timeout_s=0.3)
    assert info.value.partial_text.startswith("tok")


def test_an_engines_error_message_comes_through() -> None:
    """Ollama and OpenAI refuse a model they do not serve (llama.cpp's servers take any
    name: `check` compares the name with their /v1/models)."""
    with FakeOpenAI(strict_models=True, models=("other",)) as server:
        ex = executor(server.base_url)
        with pytest.raises(ExecutorError) as info:
            run(ex)
        assert "HTTP 404" in info.value.reason and "model 'llama3.2:1b' not found" in info.value.reason
        assert "does not serve model 'llama3.2:1b'" in (ex.probe() or "")


def test_probe_of_a_server_that_is_not_there_answers_at_once() -> None:
    problem = executor(f"http://127.0.0.1:{free_port()}/v1").probe()
    assert problem is not None and "nothing accepts connections" in problem


def test_only_a_finish_reason_completes_an_answer_and_timings_count() -> None:
    state = StreamState()
    state.feed(b'{"choices": [{"delta": {"content": "a"}, "finish_reason": null}]}', name="n", url="u")
    with pytest.raises(ExecutorError, match="closed the stream before the answer was complete"):
        state.result("n", "u", 0.0, 1.0, 3)
    state.feed(b'{"choices": [{"delta": {}, "finish_reason": "length"}], '
               b'"timings": {"prompt_n": 5, "cache_n": 2, "prompt_ms": 40.0, "predicted_n": 9}}', name="n", url="u")
    result = state.result("n", "u", 10.0, 10.5, 3)
    assert (result.prompt_tokens, result.generated_tokens, result.finish_reason) == (7, 9, "length")
    assert result.timings.prefill_ms == 40.0 and result.timings.total_ms == 500.0
