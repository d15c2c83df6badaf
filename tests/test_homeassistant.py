"""Home Assistant: discovery, re-announce on HA's birth, prompts on the trigger topic."""

from __future__ import annotations

import json

from tests.support.fleet import Env, sim


def test_node_announces_itself_and_reannounces_when_ha_comes_online(env: Env) -> None:
    dev = f"ha-{env.prefix.split('/')[1][-8:]}"
    node = env.config(dev, npu=sim(base_ms=1), homeassistant={"enabled": True})
    topic = f"homeassistant/device/{dev}/config"
    with env.spy(topic) as spy, env.node(node):
        first = spy.wait_for(lambda m: not m.retain, what="discovery")
        doc = json.loads(first.payload)
        assert doc["availability_topic"] == env.topics.availability(dev)
        cmps = doc["cmps"]
        assert cmps["npu_busy"]["p"] == "binary_sensor"
        assert cmps["prompt"]["command_topic"] == env.topics.trigger(dev)
        assert {c["p"] for c in cmps.values()} == {"sensor", "binary_sensor", "text"}
        assert len({c["unique_id"] for c in cmps.values()}) == len(cmps)
        assert doc["dev"]["mdl"] == "simulated device"
        count = len([m for m in spy.seen if not m.retain])
        spy.publish("homeassistant/status", b"online")
        spy.wait_for(lambda m: len([x for x in spy.seen if not x.retain]) > count, what="re-announce")
    # Clean up the retained discovery so the shared test broker does not keep it.
    with env.spy("nothing") as spy:
        spy.publish(topic, b"", retain=True)


def test_prompt_on_the_trigger_topic_lands_on_last_result(env: Env) -> None:
    hub = env.config("hub")
    worker = env.config("worker", cpu=sim(base_ms=1))
    with env.node(worker), env.node(hub), env.spy(env.topics.last_result("hub")) as spy:
        spy.publish(env.topics.trigger("hub"), b'{"prompt": "lights on please", "max_new_tokens": 2}')
        msg = spy.wait_for(lambda m: True, what="last_result")
        result = json.loads(msg.payload)
        assert result["ok"] and result["winner"] == "worker" and result["path"] == "peer-cpu"
        assert result["text"] == "lights on please"[:len("lights on")]


def test_garbage_on_the_trigger_topic_is_dropped(env: Env, caplog) -> None:
    caplog.set_level("WARNING", logger="agent.node")
    hub = env.config("hub", cpu=sim(base_ms=1))
    with env.node(hub), env.spy(env.topics.last_result("hub")) as spy:
        spy.publish(env.topics.trigger("hub"), b"\xff\xfe")
        spy.publish(env.topics.trigger("hub"), b"plain text prompt")
        msg = spy.wait_for(lambda m: True, what="last_result")
        assert json.loads(msg.payload)["text"] == "plain text prompt"
    assert "dropped trigger" in caplog.text


def test_discovery_fits_home_assistants_rules() -> None:
    """What HA's MQTT discovery takes as-is (checked by a real HA 2026.11): units with
    their device classes, the origin, and answer attributes that stay under the
    recorder's 16 KB (the facts of the answer, never its text)."""
    from agent.config import parse_config
    from agent.homeassistant import discovery_payload
    from agent.topics import Topics

    plain = json.loads(discovery_payload(parse_config({"device_id": "d"}), Topics(), simulated=False))
    cmps = plain["cmps"]
    assert (cmps["memory"]["device_class"], cmps["memory"]["unit_of_measurement"]) == ("data_size", "MB")
    assert (cmps["latency"]["device_class"], cmps["latency"]["unit_of_measurement"]) == ("duration", "ms")
    template = cmps["last_result"]["json_attributes_template"]
    assert "value_json.text |" in template and "value_json.text," not in template and "'text'" not in template
    assert "url" not in plain["o"]
    assert "models" in cmps["models"]["value_template"] and cmps["models"]["state_topic"].endswith("/metrics")
    linked = json.loads(discovery_payload(parse_config({"device_id": "d", "homeassistant": {
        "support_url": "https://wiki.example/edge-agent"}}), Topics(), simulated=False))
    assert linked["o"]["url"] == "https://wiki.example/edge-agent"
