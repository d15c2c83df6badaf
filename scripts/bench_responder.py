"""A raw paho responder for the benchmark's floor: the least work an MQTT peer can do.

    python scripts/bench_responder.py HOST PORT PREFIX NAME

Same client settings as a node (MQTT 5, QoS 1, TCP_NODELAY), but it answers each request
straight from paho's network thread with a payload the size of a real bid, and does
nothing else. Prints "ready" once subscribed.
"""

from __future__ import annotations

import sys
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.bus import set_nodelay

BID_SIZED = b"x" * 420  # a real bid is ~400-450 bytes of JSON


def main() -> None:
    host, port, prefix, name = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    ready = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"floor-{name}", protocol=mqtt.MQTTv5)
    client.on_socket_open = set_nodelay

    def on_connect(c: mqtt.Client, u: object, f: object, rc: object, p: object) -> None:
        c.subscribe(f"{prefix}req/+", qos=1)

    def on_subscribe(*args: object) -> None:
        ready.set()

    def on_message(c: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
        rid = msg.topic.rsplit("/", 1)[1]
        c.publish(f"{prefix}rep/{rid}/{name}", BID_SIZED, qos=1)

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect(host, port, 30)
    client.loop_start()
    if not ready.wait(10):
        raise SystemExit("not subscribed")
    print("ready", flush=True)
    sys.stdin.read()  # until the benchmark closes our stdin
    client.disconnect()
    client.loop_stop()


if __name__ == "__main__":
    main()
