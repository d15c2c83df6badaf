"""Home Assistant device discovery: one retained message announces a node and its entities.

Entities: CPU %, available memory, queue depth, last latency and the models served
(sensors, read from the retained metrics JSON), NPU busy (binary sensor), the last
answer (sensor), and a text
entity whose command topic is the node's trigger topic, so a prompt can be typed in HA.
Availability follows the node's own availability topic (its MQTT Will).
"""

from __future__ import annotations

import json
from typing import Any

from agent import __version__
from agent.config import Config
from agent.topics import Topics

ANSWER_ATTRIBUTES = ("{{ {'rid': value_json.rid, 'id': value_json.id, 'ok': value_json.ok, "
                     "'winner': value_json.winner, 'path': value_json.path, 'total_ms': value_json.total_ms, "
                     "'error': value_json.error, 'length': value_json.text | length} | tojson }}")


def discovery_payload(cfg: Config, topics: Topics, *, simulated: bool) -> bytes:
    dev = cfg.device_id
    metrics = topics.metrics(dev)

    def sensor(key: str, name: str, template: str, **extra: Any) -> dict[str, Any]:
        return {"p": "sensor", "name": name, "unique_id": f"edge_agent_{dev}_{key}",
                "state_topic": metrics, "value_template": template, **extra}

    components = {
        "cpu": sensor("cpu", "CPU", "{{ value_json.cpu_percent }}", unit_of_measurement="%",
                      state_class="measurement"),
        "memory": sensor("memory", "Memory available", "{{ value_json.mem_available_mb }}",
                         unit_of_measurement="MB", device_class="data_size", state_class="measurement"),
        "queue": sensor("queue", "Queue depth", "{{ value_json.queue_depth }}", state_class="measurement"),
        "latency": sensor("latency", "Last latency", "{{ value_json.last_latency_ms }}",
                          unit_of_measurement="ms", device_class="duration", state_class="measurement"),
        "models": sensor("models", "Models", "{{ value_json.models.values() | map(attribute='name') | join(', ') "
                                             "if value_json.models else 'none' }}"),
        "npu_busy": {"p": "binary_sensor", "name": "NPU busy", "unique_id": f"edge_agent_{dev}_npu_busy",
                     "state_topic": metrics,
                     "value_template": "{{ 'ON' if value_json.has_npu and not value_json.npu_free else 'OFF' }}",
                     "device_class": "running"},
        "last_result": {"p": "sensor", "name": "Last answer", "unique_id": f"edge_agent_{dev}_last_result",
                        "state_topic": topics.last_result(dev),
                        "value_template": "{{ value_json.text[:250] }}",
                        # The answer's facts, not its text: HA's recorder drops attributes
                        # over 16 KB, and the state already shows the answer's start.
                        "json_attributes_topic": topics.last_result(dev),
                        "json_attributes_template": ANSWER_ATTRIBUTES},
        "prompt": {"p": "text", "name": "Prompt", "unique_id": f"edge_agent_{dev}_prompt",
                   "command_topic": topics.trigger(dev), "max": 255, "mode": "text"},
    }
    payload = {
        "dev": {"ids": [f"edge_agent_{dev}"], "name": dev, "mf": "edge-agent",
                "mdl": "simulated device" if simulated else ("NPU device" if cfg.npu.enabled else "CPU device"),
                "sw": __version__},
        "o": {"name": "edge-agent", "sw": __version__,
              **({"url": cfg.homeassistant.support_url} if cfg.homeassistant.support_url else {})},
        "cmps": components,
        "availability_topic": topics.availability(dev),
        "payload_available": "online",
        "payload_not_available": "offline",
        "qos": 1,
    }
    return json.dumps(payload, separators=(",", ":")).encode("utf-8")
