"""A real MQTT broker for the tests, in this order of preference:

1. an external broker named by ``EDGE_AGENT_TEST_BROKER=host:port``;
2. a local ``mosquitto`` binary started on a free port from ``mosquitto/dev.conf``
   (with its own persistence directory, so it can be restarted with sessions intact);
3. testcontainers' Mosquitto container, where a Docker engine is available;
4. otherwise the broker tests are skipped with the reason.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.mosquitto import (
    REPO,
    LocalMosquitto,
    MosquittoNotAvailable,
    free_port,
)

__all__ = ["REPO", "Broker", "BrokerUnavailableForTests", "free_port", "start_broker"]
ENV_VAR = "EDGE_AGENT_TEST_BROKER"


class BrokerUnavailableForTests(Exception):
    pass


@dataclass
class Broker:
    host: str
    port: int
    kind: str                           # external | mosquitto | container
    local: LocalMosquitto | None = None
    _container: object = None
    _no_log: list[str] = field(default_factory=list)

    @property
    def log_lines(self) -> list[str]:
        return self.local.log_lines if self.local else self._no_log

    @property
    def restartable(self) -> bool:
        return self.local is not None

    def restart(self) -> None:
        assert self.local is not None, "only a local mosquitto can be restarted"
        self.local.restart()

    def stop(self) -> None:
        if self.local is not None:
            self.local.stop()
        if self._container is not None:
            self._container.stop()  # type: ignore[attr-defined]
            self._container = None


def start_broker(workdir: Path) -> Broker:
    """The best broker this machine offers; BrokerUnavailableForTests says why there is none."""
    external = os.environ.get(ENV_VAR)
    if external:
        host, _, port = external.rpartition(":")
        return Broker(host=host or "127.0.0.1", port=int(port), kind="external")
    if shutil.which("mosquitto"):
        local = LocalMosquitto(workdir)
        try:
            local.start()
        except MosquittoNotAvailable as exc:
            raise BrokerUnavailableForTests(str(exc)) from None
        return Broker(host=local.host, port=local.port, kind="mosquitto", local=local)
    try:
        from testcontainers.mqtt import MosquittoContainer
        container = MosquittoContainer()
        container.start()
        return Broker(host=container.get_container_host_ip(),
                      port=int(container.get_exposed_port(getattr(container, "port", 1883))), kind="container",
                      _container=container)
    except Exception as exc:  # no Docker engine, no image: say so
        raise BrokerUnavailableForTests(
            f"no MQTT broker: set {ENV_VAR}=host:port, install mosquitto "
            f"(apt-get install -y mosquitto), or provide a Docker engine ({exc})") from None
