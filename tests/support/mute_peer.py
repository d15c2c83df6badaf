"""A peer that joins the roster, then dies (SIGKILL) when a call for bids arrives.

    python -m tests.support.mute_peer HOST PORT PREFIX DEVICE_ID

It prints "ready" once it is online and subscribed. Its Will marks it offline when the
kernel closes its socket, which is what an orchestrator must notice mid-auction.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from agent.bus import Bus, Message, Will
from agent.config import BrokerConfig
from agent.topics import Topics


def main() -> None:
    host, port, prefix, dev = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    topics = Topics(prefix)
    bus = Bus(dev, BrokerConfig(host=host, port=port, keepalive_s=5), persistent=False,
              sync_topic=topics.sync(dev, "mute"), will=Will(topics.availability(dev), b"offline"),
              name="mute-peer")

    def die(msg: Message) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    bus.subscribe(topics.all_bid_requests(), die)
    bus.connect(10)
    bus.publish(topics.availability(dev), b"online", retain=True)
    bus.barrier(10)
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
