"""The openai executor against real inference engines — llama.cpp's llama-server and
llama-cpp-python's server, built by scripts/engines, serving a tiny random-weight model
(tests/support/tiny_gguf.py) — and against the stand-in (tests/support/fake_openai.py),
with the same tests, so the stand-in is shown faithful on each point.

An engine that is not built here makes its tests skip with the reason
(EDGE_AGENT_REQUIRE_ENGINES=1, as in CI, makes that a failure).
"""

from __future__ import annotations

import json
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import OpenAIExecutorConfig
from agent.errors import Cancelled, EngineUnavailable, ExecutorError
from agent.executors import Params, Result, build_executor
from agent.executors.openai import OpenAIExecutor
from agent.messages import Metrics
from tests.support.engines import KINDS, MODEL, Engine, engine
from tests.support.fake_openai import FakeOpenAI
from tests.support.fleet import Env
from tests.support.mosquitto import free_port
from tests.support.tiny_gguf import STOP_WORD, write_tiny_gguf

WAIT_S = 60.0
LONG = 1000          # tokens: a second or more of work for the tiny model on one thread


@pytest.fixture(scope="session")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("model") / "tiny.gguf")


@pytest.fixture(scope="module", params=KINDS)
def eng(request: pytest.FixtureRequest, model: Path) -> Iterator[Engine]:
    """Each engine, with two slots (llama-server --parallel 2; llama-cpp-python's server
    runs one request at a time, here with --interrupt_requests False)."""
    with engine(request.param, model, slots=2) as e:
        yield e


def executor(e: Engine, **kw: Any) -> OpenAIExecutor:
    return OpenAIExecutor(OpenAIExecutorConfig(base_url=e.base_url, model=MODEL, **kw), name="t")


def run(ex: OpenAIExecutor, prompt: str, cancel: threading.Event | None = None, **params: Any) -> Result:
    params.setdefault("temperature", 0.0)
    return ex.run(prompt, Params(**params), lambda piece: None, cancel)


def direct(e: Engine, prompt: str, max_tokens: int, path: str = "/chat/completions") -> dict[str, Any]:
    """The engine asked directly, not streamed: its own answer and counts."""
    body: dict[str, Any] = {"model": MODEL, "max_tokens": max_tokens, "temperature": 0.0}
    if path == "/chat/completions":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    request = urllib.request.Request(e.base_url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=WAIT_S) as resp:
        answer: dict[str, Any] = json.loads(resp.read())
    return answer


# ------------------------------------------------------------------ answers, finish reasons, counts
def test_max_tokens_ends_with_length_and_the_engines_counts(eng: Engine) -> None:
    result = run(executor(eng), "tell me a story about the fox", max_new_tokens=24)
    truth = direct(eng, "tell me a story about the fox", 24)
    assert result.finish_reason == "length" == truth["choices"][0]["finish_reason"]
    assert result.text == truth["choices"][0]["message"]["content"], "streamed as the engine answers it whole"
    assert result.text
    if eng.reports_stream_usage:
        assert result.generated_tokens == 24 == truth["usage"]["completion_tokens"]
        assert result.prompt_tokens == truth["usage"]["prompt_tokens"], "the engine's count, not a guess"
    else:  # llama-cpp-python's server sends no usage in a stream: one piece is one token
        assert result.generated_tokens <= 24


def test_end_of_sequence_ends_with_stop(eng: Engine) -> None:
    result = run(executor(eng), f"one two {STOP_WORD}", max_new_tokens=50)
    truth = direct(eng, f"one two {STOP_WORD}", 50)
    assert result.finish_reason == "stop" == truth["choices"][0]["finish_reason"]
    assert result.text == ""
    if eng.reports_stream_usage:  # llama-server counts the end-of-sequence token; the stand-in does not
        assert result.generated_tokens == truth["usage"]["completion_tokens"]


def test_llama_server_timings_become_prefill_and_init(eng: Engine) -> None:
    result = run(executor(eng), "hello world " * 40, max_new_tokens=8)
    t = result.timings
    assert t.prefill_ms > 0 and t.decode_ms > 0
    assert t.init_ms + t.prefill_ms == pytest.approx(t.total_ms - t.decode_ms, abs=0.01)
    if eng.kind == "llama-cpp-python":
        assert t.init_ms == 0, "no engine timings: the time to the first piece is all prefill"
    else:
        assert t.init_ms > 0, "the engine's prompt_ms is the prefill; the rest of the wait is start-up"


# ------------------------------------------------------------------ concurrency
def test_two_jobs_on_two_slots_both_come_back_whole(eng: Engine) -> None:
    ex = executor(eng)
    results: dict[str, Result | BaseException] = {}

    def one(name: str) -> None:
        try:
            results[name] = run(ex, f"tell me about the {name}", max_new_tokens=200)
        except BaseException as exc:  # reported below
            results[name] = exc

    threads = [threading.Thread(target=one, args=(n,)) for n in ("fox", "dog")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    for name in ("fox", "dog"):
        r = results[name]
        assert isinstance(r, Result), f"{name}: {r}"
        assert r.finish_reason == "length"
        assert r.generated_tokens == 200 or not eng.reports_stream_usage


class _SeenWait(threading.Event):
    """A cancel event that tells when the executor's watch has started waiting on it:
    the connection to the engine is open and the request on its way."""

    def __init__(self) -> None:
        super().__init__()
        self.watched = threading.Event()
        self.waits = 0

    def wait(self, timeout: float | None = None) -> bool:
        self.waits += 1
        if self.waits >= 2:  # the request was written before the first wait timed out
            self.watched.set()
        return super().wait(timeout)


def test_cancel_is_noticed_while_queued_in_the_engine(eng: Engine) -> None:
    """Both slots busy with long answers: a third job waits in the engine, and the engine
    sends it nothing; cancelling it must end it while the other two still run."""
    ex = executor(eng)
    busy = [threading.Event() for _ in range(2)]
    finished = threading.Event()
    outcome: list[BaseException] = []

    def long(i: int) -> None:
        try:
            ex.run(f"tell me a long story {i}", Params(max_new_tokens=LONG, temperature=0.0),
                   lambda piece: busy[i].set())
        except ExecutorError:
            pass
        finally:
            busy[i].set()
            finished.set()

    runners = [threading.Thread(target=long, args=(i,)) for i in range(2)]
    runners[0].start()
    assert busy[0].wait(WAIT_S)
    if eng.kind != "llama-cpp-python":  # it serves one at a time: the first holds the only place
        runners[1].start()
        assert busy[1].wait(WAIT_S)
    cancel = _SeenWait()

    def queued() -> None:
        try:
            run(ex, "and a third one", cancel, max_new_tokens=5)
        except BaseException as exc:
            outcome.append(exc)

    third = threading.Thread(target=queued)
    third.start()
    assert cancel.watched.wait(WAIT_S)
    cancel.set()
    third.join(WAIT_S)
    assert not finished.is_set(), "the cancel was seen only after a slot came free"
    assert outcome and isinstance(outcome[0], Cancelled), outcome
    for r in runners:
        if r.is_alive() or r.ident is not None:
            r.join(WAIT_S)


# ------------------------------------------------------------------ failures
def test_oversized_prompt_gets_the_engines_message(eng: Engine) -> None:
    with pytest.raises(ExecutorError) as info:
        run(executor(eng), "hello " * 5000, max_new_tokens=8)
    reason = info.value.reason
    assert not isinstance(info.value, EngineUnavailable)
    if eng.kind == "llama-cpp-python":  # it starts the stream, then fails and closes it, saying nothing
        assert "closed the stream before the answer was complete" in reason
    else:
        assert "HTTP 400" in reason and "exceeds the available context size" in reason, reason


@pytest.mark.parametrize("kind", KINDS)
def test_bearer_key(kind: str, model: Path, tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    with engine(kind, model, api_key="s3cret") as e:
        assert run(executor(e, api_key_file=str(key)), "hello", max_new_tokens=4).finish_reason == "length"
        with pytest.raises(ExecutorError) as info:
            run(executor(e), "hello", max_new_tokens=4)
        assert "HTTP 401" in info.value.reason
        assert executor(e).probe() is not None and executor(e, api_key_file=str(key)).probe() is None


@pytest.mark.parametrize("kind", KINDS)
def test_engine_killed_mid_stream_keeps_the_partial_text(kind: str, model: Path) -> None:
    with engine(kind, model) as e:
        first = threading.Event()
        killed = threading.Event()

        def on_token(piece: str) -> None:
            first.set()
            killed.wait(WAIT_S)

        def kill() -> None:
            first.wait(WAIT_S)
            e.kill()
            killed.set()

        threading.Thread(target=kill).start()
        with pytest.raises(ExecutorError) as info:
            executor(e).run("tell me a story", Params(max_new_tokens=LONG, temperature=0.0), on_token)
        assert info.value.partial_text, "what came before the crash is kept"
        assert not isinstance(info.value, EngineUnavailable), "it ran: not a job to run elsewhere"


@pytest.mark.parametrize("kind", KINDS)
def test_engine_down_when_idle_marks_the_mode_down_until_it_returns(kind: str, model: Path) -> None:
    with engine(kind, model) as e:
        port = e.port
        served = build_executor(OpenAIExecutorConfig(base_url=e.base_url, model=MODEL), name="t")
        assert served.run("hello", Params(max_new_tokens=2), lambda p: None).text
        e.kill()
    with pytest.raises(EngineUnavailable) as info:
        served.run("hello", Params(max_new_tokens=2), lambda p: None)
    assert f"127.0.0.1:{port}" in info.value.reason and info.value.kind == "unavailable"
    assert served.down is not None and not served.back()
    with engine(kind, model, port=port):
        assert served.back() and served.down is None
        assert served.run("hello", Params(max_new_tokens=2), lambda p: None).finish_reason == "length"


@pytest.mark.parametrize("kind", ["stand-in", "llama-cpp-python"])
def test_a_cut_off_answer_is_an_error_not_a_success(kind: str, model: Path) -> None:
    """llama-cpp-python's default (--interrupt_requests True) ends a running answer with a
    bare [DONE] when any other request arrives — here the GET /v1/models of `check`."""
    with engine(kind, model, interrupt=True) as e:
        streaming = threading.Event()
        probed = threading.Event()

        def on_token(piece: str) -> None:
            streaming.set()

        def probe() -> None:
            streaming.wait(WAIT_S)
            executor(e).probe()
            probed.set()

        threading.Thread(target=probe).start()
        with pytest.raises(ExecutorError) as info:
            executor(e).run("tell me a story", Params(max_new_tokens=LONG, temperature=0.0), on_token)
        assert probed.wait(WAIT_S)
    assert "without a finish reason" in info.value.reason and "--interrupt_requests False" in info.value.reason
    assert info.value.partial_text


def test_probe_waits_for_an_engine_busy_with_an_answer(model: Path) -> None:
    """llama-cpp-python answers GET /v1/models only between requests: `check` waits."""
    with engine("llama-cpp-python", model) as e:
        streaming = threading.Event()
        done = threading.Event()
        problems: list[str | None] = []

        def on_token(piece: str) -> None:
            streaming.set()

        def probe() -> None:
            streaming.wait(WAIT_S)
            problems.append(executor(e).probe())
            done.set()

        threading.Thread(target=probe).start()
        result = executor(e).run("tell me a story", Params(max_new_tokens=300, temperature=0.0), on_token)
        assert done.wait(WAIT_S)
    assert result.finish_reason == "length", "the probe did not cut the answer off"
    assert problems[0] is None, problems


# ------------------------------------------------------------------ through the fleet
def openai_cpu(base_url: str, **extra: Any) -> dict[str, Any]:
    return {"kind": "openai", "base_url": base_url, "model": MODEL, "timeout_s": 120, **extra}


def test_the_fleet_answers_with_the_engines_finish_reason_and_counts(eng: Engine, env: Env) -> None:
    """`serve` and `trigger` through a node whose CPU mode is the engine (slots = its slots)."""
    openai = pytest.importorskip("openai")
    port = free_port()
    path = env.config("gw", cpu=openai_cpu(eng.base_url), slots=eng.slots,
                      serve={"enabled": True, "port": port, "max_concurrent": 8})
    prompt = "tell me about the quick brown fox"
    truth = direct(eng, prompt, 12)
    with env.node(path):
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=WAIT_S)
        chat = api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                           max_tokens=12, temperature=0.0)
        assert chat.choices[0].finish_reason == "length"
        assert chat.choices[0].message.content == truth["choices"][0]["message"]["content"]
        if eng.reports_stream_usage:
            assert chat.usage is not None
            assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (
                truth["usage"]["prompt_tokens"], truth["usage"]["completion_tokens"])
        pieces, finish = [], None
        for chunk in api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"a {STOP_WORD}"}],
                                                 max_tokens=12, stream=True):
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
        assert "".join(pieces) == "" and finish == "stop"
        done = api.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0.0)
        assert done.choices[0].finish_reason == "length" and done.choices[0].text
        code, out, _, err = env.trigger(path, prompt, "--max-new-tokens", "12")
        assert code == 0, err
        assert out is not None and out["finish_reason"] == "length" and out["text"]
        if eng.reports_stream_usage:
            assert out["usage"] == {"prompt_tokens": truth["usage"]["prompt_tokens"], "completion_tokens": 12}
        t = out["timings"]
        if eng.kind != "llama-cpp-python":  # the engine's timings: what the node's service record learns from
            assert t["init_ms"] > 0 and t["prefill_ms"] > 0 and t["decode_ms"] > 0, t


def test_serve_passes_the_engines_finish_reason_when_it_stopped_short(env: Env) -> None:
    """The engine fitted the answer into its context and said "length" with fewer tokens
    than asked: `serve` used to guess "stop" from the count."""
    openai = pytest.importorskip("openai")
    port = free_port()
    with FakeOpenAI(answer=None, models=(MODEL,), context=40) as fake:
        path = env.config("gw", cpu=openai_cpu(fake.base_url), serve={"enabled": True, "port": port})
        with env.node(path):
            api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=WAIT_S)
            chat = api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 30}],
                                               max_tokens=50)
    assert chat.usage is not None and chat.usage.completion_tokens == 40 - 31 < 50
    assert chat.choices[0].finish_reason == "length"


def _metrics_of(device: str, env: Env, predicate: Any) -> Any:
    def match(msg: Any) -> bool:
        if msg.topic != env.topics.metrics(device):
            return False
        return bool(predicate(Metrics.from_payload(msg.payload)))
    return match


def test_a_node_whose_engine_is_down_passes_the_job_on_and_sits_out_until_it_returns(env: Env) -> None:
    dead = free_port()
    with FakeOpenAI(answer=None, models=(MODEL,)) as fake, env.spy(env.topics.all_metrics()) as spy:
        a = env.config("a", cpu=openai_cpu(f"http://127.0.0.1:{dead}/v1"))
        b = env.config("b", cpu=openai_cpu(fake.base_url))
        # The orchestrator asks a first (round robin, in device order).
        c = env.config("c", auction={"policy": "round_robin", "bid_timeout_s": 20})
        with env.node(a), env.node(b):
            code, out, _, err = env.trigger(c, "hello there", "--max-new-tokens", "4")
            assert code == 0, err
            assert out is not None and out["winner"] == "b"
            assert [x["device"] for x in out["attempts"]] == ["a", "b"]
            assert out["attempts"][0]["outcome"].startswith("unavailable:"), out["attempts"]
            down = spy.wait_for(_metrics_of("a", env, lambda m: m.health.startswith("model server down")),
                                what="a's metrics saying its engine is down")
            assert Metrics.from_payload(down.payload).snapshot.cpu_slots == 0
            code, out, _, err = env.trigger(c, "hello again", "--max-new-tokens", "4")
            assert code == 0 and out is not None and out["winner"] == "b" and len(out["bids"]) == 1, out
            with FakeOpenAI(answer=None, models=(MODEL,), port=dead):
                spy.wait_for(_metrics_of("a", env, lambda m: m.health == "ok"), after=down,
                             what="a's metrics saying it is back")
                code, out, _, err = env.trigger(c, "hello once more", "--max-new-tokens", "4")
                assert code == 0 and out is not None and len(out["bids"]) == 2, out


def _two_at_once(port: int, max_tokens: int) -> list[Any]:
    """Two chat requests to `serve` at the same time: each answer, or the error it raised."""
    openai = pytest.importorskip("openai")
    api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=WAIT_S)
    out: list[Any] = [None, None]

    def one(i: int) -> None:
        try:
            out[i] = api.chat.completions.create(model=MODEL, max_tokens=max_tokens,
                                                 messages=[{"role": "user", "content": f"tell me story {i}"}])
        except Exception as exc:  # reported by the caller
            out[i] = exc
    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    return out


def test_two_jobs_on_a_node_with_two_slots_come_back_whole(eng: Engine, env: Env) -> None:
    port = free_port()
    path = env.config("gw", cpu=openai_cpu(eng.base_url), slots=2, serve={"enabled": True, "port": port})
    with env.node(path):
        answers = _two_at_once(port, 200)
    for a in answers:
        assert not isinstance(a, BaseException), a
        assert a.choices[0].finish_reason == "length"
        assert a.usage.completion_tokens == 200 or not eng.reports_stream_usage


@pytest.mark.parametrize("kind", ["stand-in", "llama-cpp-python"])
def test_a_job_cut_off_by_the_engine_fails_through_the_fleet(kind: str, model: Path, env: Env) -> None:
    """llama-cpp-python's server at its default: with two jobs at once on a node with two
    slots, the engine cuts one off — which used to come back ok, with a third of its answer."""
    openai = pytest.importorskip("openai")
    port = free_port()
    with engine(kind, model, interrupt=True) as e:
        path = env.config("gw", cpu=openai_cpu(e.base_url), slots=2, serve={"enabled": True, "port": port})
        with env.node(path):
            answers = _two_at_once(port, 200)
    failed = [a for a in answers if isinstance(a, openai.APIStatusError)]
    assert failed, answers
    assert all("without a finish reason" in str(a) for a in failed), failed
    for a in answers:
        if not isinstance(a, BaseException):
            assert a.choices[0].finish_reason == "length"


def test_a_trigger_whose_own_engine_is_down_passes_the_job_on(env: Env) -> None:
    """No node daemon on the device: `trigger` runs its own CPU share in-process."""
    with FakeOpenAI(answer=None, models=(MODEL,)) as fake:
        a = env.config("a", cpu=openai_cpu(f"http://127.0.0.1:{free_port()}/v1"),
                       auction={"policy": "round_robin", "bid_timeout_s": 20})  # a (itself) first
        b = env.config("b", cpu=openai_cpu(fake.base_url))
        with env.node(b):
            code, out, _, err = env.trigger(a, "hello there", "--max-new-tokens", "4")
    assert code == 0, err
    assert out is not None and out["winner"] == "b" and out["finish_reason"] == "length"
    assert [x["device"] for x in out["attempts"]] == ["a", "b"]
    assert out["attempts"][0]["outcome"].startswith("unavailable:"), out["attempts"]
