"""The control protocol's types (agent/control.py) and the one prompt validation every
front shares (messages.Prompt): no daemon, no broker."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from agent import control
from agent.errors import BadPrompt, ExitCode, MessageError, UsageError
from agent.messages import MAX_TEMPERATURE, MAX_TOKENS, Prompt, TriggerRequest


def roundtrip_request(req: control.Request) -> control.Request:
    line = (json.dumps(req.to_obj()) + "\n").encode()
    return control.decode_request(control.parse_request(line))


def test_every_request_survives_the_wire() -> None:
    ask = Prompt("hi", 8, "npu", True, 2.5, "qwen", 0.7)
    for req in (control.StatusRequest(), control.ForgetRequest("old-pi", True), control.PromptRequest(ask)):
        assert roundtrip_request(req) == req


def test_every_event_survives_the_wire() -> None:
    events: list[control.Event] = [
        control.Decision("w", "peer-cpu", 0.5), control.Progress("waiting"), control.Text("tok"),
        control.Outcome({"ok": True, "text": "x"}, "model_not_served"), control.Status([{"device": "a"}]),
        control.Forgot(["p/agent/a/metrics"]), control.Failure("no", ExitCode.NO_DEVICE)]
    for event in events:
        assert control.decode_event(json.loads(json.dumps(event.to_obj()))) == event


@pytest.mark.parametrize("obj", [{"type": "token"}, {"type": "token", "text": 5}, {"type": "nonsense"},
                                 {"type": "decision", "path": "x"}, {"type": "outcome", "outcome": []}])
def test_an_event_that_does_not_fit_is_a_value_error(obj: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        control.decode_event(obj)


def test_an_error_with_a_strange_exit_code_is_a_failure() -> None:
    assert control.decode_event({"type": "error", "error": "x", "exit_code": 99}).exit_code == ExitCode.FAILED
    assert control.decode_event({"type": "error", "error": "x", "exit_code": True}).exit_code == ExitCode.FAILED


@pytest.mark.parametrize("obj", [{"op": "launch"}, {"op": "forget", "device": "not an id!"}, {}])
def test_an_unknown_or_wrong_request_is_a_usage_error(obj: dict[str, Any]) -> None:
    with pytest.raises(UsageError):
        control.decode_request(obj)


# ---------------------------------------------------------------- the one set of bounds
@pytest.mark.parametrize(("fields", "field"), [
    ({"prompt": "  "}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": MAX_TOKENS + 1}, "max_new_tokens"),
    ({"max_new_tokens": True}, "max_new_tokens"),
    ({"max_new_tokens": 8.0}, "max_new_tokens"),
    ({"need": "gpu"}, "need"),
    ({"dry_run": "yes"}, "dry_run"),
    ({"bid_timeout_s": 0}, "bid_timeout_s"),
    ({"bid_timeout_s": math.nan}, "bid_timeout_s"),
    ({"bid_timeout_s": 86400}, "bid_timeout_s"),
    ({"model": ""}, "model"),
    ({"model": "m" * 129}, "model"),
    ({"temperature": MAX_TEMPERATURE + 0.01}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"temperature": math.inf}, "temperature"),
    ({"chat": {"messages": "no"}}, "chat"),
])
def test_a_prompt_out_of_bounds_names_its_field(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(BadPrompt) as caught:
        Prompt.from_obj({"prompt": "hi", **fields})
    assert caught.value.field == field and caught.value.exit_code == ExitCode.USAGE


def test_the_edges_of_the_bounds_are_inside() -> None:
    ask = Prompt.from_obj({"prompt": "hi", "max_new_tokens": MAX_TOKENS, "temperature": MAX_TEMPERATURE,
                           "model": "m" * 128, "bid_timeout_s": 1})
    assert ask.temperature == 2.0 and isinstance(ask.bid_timeout_s, float)
    assert Prompt.from_obj({"prompt": "hi", "max_new_tokens": 1, "temperature": 0}).temperature == 0.0


def test_the_mqtt_trigger_uses_the_same_bounds() -> None:
    with pytest.raises(MessageError) as caught:
        TriggerRequest.from_payload(json.dumps({"prompt": "hi", "max_new_tokens": MAX_TOKENS + 1}).encode())
    assert caught.value.field == "max_new_tokens"
    biggest = TriggerRequest.from_payload(b'{"prompt": "hi", "max_new_tokens": 1000000}')
    assert biggest.ask().max_new_tokens == MAX_TOKENS
    assert TriggerRequest.from_payload(b'{"prompt": "hi", "model": ""}').model is None, "no preference, as before"
    assert TriggerRequest.from_payload(b"plain").ask() == Prompt("plain")


def test_the_http_fronts_name_the_field_in_their_own_terms() -> None:
    from agent.ollama import OLLAMA_NAMES
    from agent.openai_api import OPENAI_NAMES, BadRequest, prompt_of

    with pytest.raises(BadRequest) as openai:
        prompt_of("hi", 0, None, None, None, names=OPENAI_NAMES)
    assert openai.value.status == 400 and openai.value.param == "max_tokens"
    assert str(openai.value).startswith("max_tokens must be")
    with pytest.raises(BadRequest) as ollama:
        prompt_of("hi", 8, None, 2.5, None, names=OLLAMA_NAMES)
    assert str(ollama.value) == "options.temperature must be a number from 0 to 2"


def test_a_second_daemon_on_a_state_dir_warns_and_its_commands_reach_the_first(tmp_path, caplog) -> None:
    """The control socket is named after the state_dir: a second server there logs that it is
    taken and listens nowhere; a command sent to that state_dir is answered by the first."""
    def answer(who: str) -> control.Handler:
        return lambda request, channel: channel.send(control.Status([{"device": who}]))

    first, second = control.ControlServer(tmp_path, answer("first")), control.ControlServer(tmp_path, answer("second"))
    first.start()
    try:
        with caplog.at_level("WARNING", logger="agent.control"):
            second.start()
        assert any("is taken" in r.getMessage() for r in caplog.records), caplog.text
        sock = control.connect(tmp_path)
        assert sock is not None
        with sock:
            assert list(control.request(sock, control.StatusRequest())) == [control.Status([{"device": "first"}])]
    finally:
        second.stop()
        first.stop()
    assert not control.running(tmp_path), "stopped: nobody listens there any more"
