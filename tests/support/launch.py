"""Starting real node daemons: one way, for the demo, the benchmarks, the soak and the tests.

``node_doc`` writes the config a launched device needs, ``ArrivalWatch`` knows when a
device has come online (live, not a retained value from an earlier run), and
``NodeProcess`` runs ``python -m agent --role node`` and can kill, freeze, thaw and
restart it. Nothing here sleeps: waits are on events with timeouts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from agent.bus import Bus, Message, new_nonce
from agent.config import BrokerConfig
from agent.topics import Topics
from tests.support.mosquitto import REPO

ONLINE_TIMEOUT_S = 30.0


def node_doc(device_id: str, *, port: int, prefix: str, state_dir: Path, host: str = "127.0.0.1",
             npu: Mapping[str, Any] | None = None, cpu: Mapping[str, Any] | None = None,
             slots: int = 1, **overrides: Any) -> dict[str, Any]:
    """A device's config: NPU/CPU executors given are enabled, the rest off; mapping
    overrides merge into their section, anything else replaces it."""
    doc: dict[str, Any] = {
        "device_id": device_id,
        "broker": {"host": host, "port": port, "keepalive_s": 2},
        "topic_prefix": prefix,
        "state_dir": str(state_dir),
        "metrics_interval_s": 30,
        "homeassistant": {"enabled": False},
        "npu": {"enabled": npu is not None, **({"executor": dict(npu)} if npu else {})},
        "cpu": {"enabled": cpu is not None, "slots": slots, **({"executor": dict(cpu)} if cpu else {})},
    }
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(doc.get(key), dict):
            doc[key] = {**doc[key], **value}
        else:
            doc[key] = value
    return doc


def write_config(path: Path, doc: Mapping[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(dict(doc)))
    return path


class ArrivalWatch:
    """Knows when a device announces ``online`` live (a retained value may be stale)."""

    def __init__(self, host: str, port: int, prefix: str = "", *, broker: BrokerConfig | None = None):
        """``broker``: connect with these settings (credentials, TLS) instead of anonymously."""
        self._topics = Topics(prefix)
        self._lock = threading.Lock()
        self._events: dict[str, threading.Event] = {}
        nonce = new_nonce()
        self._bus = Bus(f"arrivals-{nonce}", broker or BrokerConfig(host=host, port=port), persistent=False,
                        name="arrivals", sync_topic=self._topics.sync("arrivals", nonce))
        self._bus.subscribe(self._topics.all_availability(), self._handle)
        self._bus.connect(10)

    def _event(self, device: str) -> threading.Event:
        with self._lock:
            return self._events.setdefault(device, threading.Event())

    def _handle(self, msg: Message) -> None:
        parsed = self._topics.parse(msg.topic)
        if parsed and parsed.device and msg.payload == b"online" and not msg.retain:
            self._event(parsed.device).set()

    def expect(self, device: str) -> None:
        """Call before starting the device: forget any earlier arrival."""
        self._event(device).clear()

    def wait(self, device: str, timeout: float = ONLINE_TIMEOUT_S) -> bool:
        return self._event(device).wait(timeout)

    def close(self) -> None:
        self._bus.stop()


class NodeProcess:
    """``python -m agent --role node`` as a child process, for kills, freezes and Wills."""

    def __init__(self, config: Path, device: str, *, arrivals: ArrivalWatch, log: Path,
                 env: Mapping[str, str] | None = None):
        self.config = config
        self.device = device
        self.arrivals = arrivals
        self.log = log
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self._said = threading.Condition()
        self._lines: list[str] = []

    def __enter__(self) -> NodeProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def launch(self) -> None:
        """Start it and return at once; its output goes to the log (and to wait_log)."""
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "--role", "node", "--config", str(self.config)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env)
        self.proc = proc

        def copy() -> None:
            assert proc.stdout is not None
            with open(self.log, "ab") as out:
                for raw in proc.stdout:
                    out.write(raw)
                    out.flush()
                    with self._said:
                        self._lines.append(raw.decode(errors="replace"))
                        self._said.notify_all()
            proc.stdout.close()

        threading.Thread(target=copy, name=f"log-{self.device}", daemon=True).start()

    def wait_log(self, text: str, timeout: float) -> bool:
        """Wait until the process has printed a line containing ``text``."""
        with self._said:
            return self._said.wait_for(lambda: any(text in line for line in self._lines), timeout)

    def start(self, timeout: float = ONLINE_TIMEOUT_S) -> None:
        """Start it and return once it has announced itself online."""
        self.arrivals.expect(self.device)
        self.launch()
        if not self.arrivals.wait(self.device, timeout):
            self.stop()
            raise RuntimeError(f"node {self.device} did not come online within {timeout:g} s:\n"
                               + self.log_text()[-2000:])

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL: the OS closes the socket, the broker publishes the Will."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def pause(self) -> None:
        """SIGSTOP: frozen, its connection stays open (a node that is away)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def restart(self) -> None:
        """Stop (SIGTERM) and start again with the same config and state_dir."""
        self.stop()
        self.start()

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self, timeout: float = 30.0) -> None:
        stop_all([self], timeout)

    def _terminate(self) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGCONT)  # a frozen process cannot act on SIGTERM
            self.proc.send_signal(signal.SIGTERM)

    def _reap(self, timeout: float) -> None:
        if self.proc is not None and self.proc.returncode is None:
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def start_all(nodes: Sequence[NodeProcess], timeout: float = ONLINE_TIMEOUT_S) -> None:
    """Start every node at once and return when each has announced itself online: the fleet
    comes up in the time of its slowest node, not in the sum of them all. If one does not
    come up, every one is stopped."""
    for node in nodes:
        node.arrivals.expect(node.device)
        node.launch()
    late = next((node for node in nodes if not node.arrivals.wait(node.device, timeout)), None)
    if late is not None:
        stop_all(nodes)
        raise RuntimeError(f"node {late.device} did not come online within {timeout:g} s:\n"
                           + late.log_text()[-2000:])


def stop_all(nodes: Sequence[NodeProcess], timeout: float = 30.0) -> None:
    """SIGTERM every node first, then wait for each (SIGKILL after ``timeout``): they shut
    down side by side."""
    for node in nodes:
        node._terminate()
    for node in nodes:
        node._reap(timeout)
