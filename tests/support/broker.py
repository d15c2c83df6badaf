"""A real MQTT broker for the tests, in this order of preference:

1. an external broker named by ``EDGE_AGENT_TEST_BROKER=host:port``;
2. a local ``mosquitto`` binary started on a free port from ``mosquitto/dev.conf``
   (with its own persistence directory, so it can be restarted with sessions intact);
3. testcontainers' Mosquitto container, where a Docker engine is available;
4. otherwise the broker tests are skipped with the reason.
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import socket
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEV_CONF = REPO / "mosquitto" / "dev.conf"
ENV_VAR = "EDGE_AGENT_TEST_BROKER"


class BrokerUnavailableForTests(Exception):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Broker:
    host: str
    port: int
    kind: str                    # external | mosquitto | container
    workdir: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    extra_conf: str = ""
    log_lines: list[str] = field(default_factory=list)
    _container: object = None

    @property
    def restartable(self) -> bool:
        return self.kind == "mosquitto"

    def start(self, timeout: float = 10.0) -> None:
        """Start (or restart) the local mosquitto on the same port and persistence dir."""
        assert self.workdir is not None
        conf = self.workdir / "mosquitto.conf"
        text = DEV_CONF.read_text()
        text = re.sub(r"^listener .*$", f"listener {self.port} 127.0.0.1", text, flags=re.M)
        text = re.sub(r"^persistence_location .*$", f"persistence_location {self.workdir}/", text, flags=re.M)
        text = text.replace("log_type notice", "log_type notice\nlog_type information")
        # Started as root, mosquitto would switch to the "mosquitto" user and could not
        # write its persistence file into our directory.
        conf.write_text(f"{text}\nuser {getpass.getuser()}\n{self.extra_conf}")
        self.proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        ready = threading.Event()

        def read_log(proc: subprocess.Popen[bytes]) -> None:
            assert proc.stderr is not None
            for raw in proc.stderr:
                line = raw.decode(errors="replace").rstrip()
                self.log_lines.append(line)
                if " running" in line and "mosquitto version" in line:
                    ready.set()
            ready.set()  # exited: let start() report it

        threading.Thread(target=read_log, args=(self.proc,), daemon=True, name="mosquitto-log").start()
        if not ready.wait(timeout) or self.proc.poll() is not None:
            tail = "\n".join(self.log_lines[-10:])
            self.stop()
            raise BrokerUnavailableForTests(f"mosquitto did not start on port {self.port}:\n{tail}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None
        if self._container is not None:
            self._container.stop()  # type: ignore[attr-defined]
            self._container = None

    def restart(self) -> None:
        self.stop()
        self.start()


def start_broker(workdir: Path, extra_conf: str = "") -> Broker:
    """The best broker this machine offers; BrokerUnavailableForTests says why there is none."""
    external = os.environ.get(ENV_VAR)
    if external:
        host, _, port = external.rpartition(":")
        return Broker(host=host or "127.0.0.1", port=int(port), kind="external")
    if shutil.which("mosquitto"):
        broker = Broker(host="127.0.0.1", port=free_port(), kind="mosquitto", workdir=workdir,
                        extra_conf=extra_conf)
        broker.start()
        return broker
    try:
        from testcontainers.mqtt import MosquittoContainer
        container = MosquittoContainer()
        container.start()
        return Broker(host=container.get_container_host_ip(),
                      port=int(container.get_exposed_port(container.port)), kind="container",
                      _container=container)
    except Exception as exc:  # no docker engine, no image: say so
        raise BrokerUnavailableForTests(
            f"no MQTT broker: set {ENV_VAR}=host:port, install mosquitto "
            f"(apt-get install -y mosquitto), or provide a Docker engine ({exc})") from None
