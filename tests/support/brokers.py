"""Other MQTT brokers, started privately on free ports: NATS (one server or a cluster) and
RabbitMQ (its MQTT plugin). Never the system services on their standard ports.

Each waits for the broker to say it is ready in its own log (no connection polling),
and raises BrokerMissing, with the reason, when the binary is not installed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path

import psutil

from tests.support.mosquitto import free_port


class BrokerMissing(Exception):
    """The broker's binary is not installed, or it would not start (with its log)."""


class _Logged:
    """A child process whose output is read line by line until a ready marker."""

    def __init__(self, argv: list[str], ready: str, log: Path, *, env: dict[str, str] | None = None,
                 user: str | None = None):
        self.argv, self.ready, self.log, self.env, self.user = argv, ready, log, env, user
        self.proc: subprocess.Popen[bytes] | None = None
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.ended = False
        self.reader: threading.Thread | None = None

    def start(self, timeout: float) -> None:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(self.env or {})}, start_new_session=True)
        proc = self.proc

        def read() -> None:
            assert proc.stdout is not None
            with proc.stdout, open(self.log, "a") as out:
                for raw in proc.stdout:
                    line = raw.decode(errors="replace").rstrip()
                    out.write(line + "\n")
                    with self.changed:
                        self.lines.append(line)
                        self.changed.notify_all()
            with self.changed:
                self.ended = True
                self.changed.notify_all()

        self.reader = threading.Thread(target=read, daemon=True, name=f"log-{self.argv[0]}")
        self.reader.start()
        if not self.wait_for(self.ready, timeout) or proc.poll() is not None:
            self.stop()
            raise BrokerMissing(f"{self.argv[0]} did not start:\n" + "\n".join(self.lines[-15:]))

    def wait_for(self, marker: str, timeout: float) -> bool:
        """Whether ``marker`` appears in the log within ``timeout`` (False if it exits)."""
        with self.changed:
            return self.changed.wait_for(lambda: self.ended or any(marker in line for line in self.lines),
                                         timeout) and not self.ended

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)  # its whole group: rabbitmq-server runs beam under a wrapper
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self.reader is not None:
            self.reader.join(10)  # it closes the pipe when the output ends


class LocalNats:
    """``nats-server`` with JetStream and an MQTT listener; ``size`` > 1 makes a cluster
    of that many servers routed to each other on loopback (``ports`` lists their MQTT
    ports, in order)."""

    def __init__(self, workdir: Path, *, size: int = 1):
        if shutil.which("nats-server") is None:
            raise BrokerMissing("nats-server is not installed (apt-get install -y nats-server)")
        self.workdir = Path(workdir)
        self.host = "127.0.0.1"
        self.ports = [free_port() for _ in range(size)]
        self.cluster_ports = [free_port() for _ in range(size)] if size > 1 else []
        self.servers: list[_Logged] = []

    @property
    def port(self) -> int:
        return self.ports[0]

    def _conf(self, i: int) -> Path:
        d = self.workdir / f"n{i}"
        d.mkdir(parents=True, exist_ok=True)
        lines = [f"listen: 127.0.0.1:{free_port()}", f"server_name: n{i}",
                 f'jetstream {{ store_dir: "{d / "js"}" }}']
        # In a cluster, MQTT sessions and retained messages must live on every server (R3):
        # NATS picks fewer replicas by itself, and then one lost server stalls them all.
        replicas = f", stream_replicas: {len(self.ports)}" if len(self.ports) > 1 else ""
        lines.append(f"mqtt {{ listen: 127.0.0.1:{self.ports[i]}{replicas} }}")
        if self.cluster_ports:
            routes = ", ".join(f"nats://127.0.0.1:{p}" for j, p in enumerate(self.cluster_ports) if j != i)
            lines.append(f"cluster {{ name: edge, listen: 127.0.0.1:{self.cluster_ports[i]}, routes: [{routes}] }}")
        conf = d / "nats.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def start(self, timeout: float = 30.0) -> None:
        self.servers = [_Logged(["nats-server", "-c", str(self._conf(i))], "Server is ready",
                                self.workdir / f"n{i}.log") for i in range(len(self.ports))]
        for server in self.servers:
            server.start(timeout)
        if self.cluster_ports:
            # JetStream (which keeps MQTT sessions and retained messages) needs its
            # meta leader before the first MQTT client; every server logs it.
            self.wait_for_log("JetStream cluster new metadata leader", timeout)

    def wait_for_log(self, marker: str, timeout: float) -> None:
        """Until one of the servers logs ``marker`` (each is asked in turn, with what is
        left of ``timeout``: the marker appears on one of them)."""
        import time
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for server in self.servers:
                if server.wait_for(marker, min(0.2, max(0.0, deadline - time.monotonic()))):
                    return
        raise BrokerMissing(f"NATS never logged {marker!r}")

    def kill(self, i: int) -> None:
        self.servers[i].stop(signal.SIGKILL)

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


class LocalRabbit:
    """A RabbitMQ node of our own (its own node name, ports and data directory) with only
    the MQTT plugin, anonymous MQTT allowed."""

    def __init__(self, workdir: Path):
        if shutil.which("rabbitmq-server") is None:
            raise BrokerMissing("rabbitmq-server is not installed (apt-get install -y rabbitmq-server)")
        # Debian's wrapper runs the node as the rabbitmq user, which cannot enter pytest's
        # (0700) temporary directories: its data lives in a directory of its own.
        self.log_dir = Path(workdir)
        self.workdir = Path(tempfile.mkdtemp(prefix="edge-agent-rabbit-"))
        self.host = "127.0.0.1"
        self.port = free_port()
        self.server: _Logged | None = None

    def start(self, timeout: float = 90.0) -> None:
        d = self.workdir
        d.mkdir(parents=True, exist_ok=True)
        amqp = free_port()
        (d / "rabbitmq.conf").write_text("\n".join([
            f"listeners.tcp.default = 127.0.0.1:{amqp}", f"mqtt.listeners.tcp.default = 127.0.0.1:{self.port}",
            "mqtt.allow_anonymous = true", "loopback_users = none", "log.console = true",
            "log.console.level = info", "log.file = false"]) + "\n")
        (d / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        if os.geteuid() == 0:
            shutil.chown(d, "rabbitmq", "rabbitmq")  # Debian's wrapper runs the node as rabbitmq
            for f in d.iterdir():
                shutil.chown(f, "rabbitmq", "rabbitmq")
        env = {"RABBITMQ_NODENAME": f"edge{self.port}@localhost", "RABBITMQ_NODE_PORT": str(amqp),
               "RABBITMQ_DIST_PORT": str(free_port()), "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
               "RABBITMQ_LOG_BASE": str(d / "log"), "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
               "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"), "RABBITMQ_PID_FILE": str(d / "pid")}
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.server = _Logged(["rabbitmq-server"], "Server startup complete", self.log_dir / "rabbit.log", env=env)
        self.server.start(timeout)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        # Debian's wrapper starts the node as the rabbitmq user in a session of its own, so
        # stopping the wrapper's process group can leave the Erlang VM running (a suite
        # left one idle node per run): end every process that is our node.
        node = f"RABBITMQ_NODENAME=edge{self.port}@localhost"
        ours = []
        for proc in psutil.process_iter():
            try:
                if node in (f"{k}={v}" for k, v in proc.environ().items()):
                    ours.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        for proc in ours:
            proc.terminate()
        _, alive = psutil.wait_procs(ours, timeout=15)
        for proc in alive:
            proc.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)
