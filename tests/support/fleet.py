"""Building blocks for tests against a real broker: configs, a spy client, nodes.

Everything synchronises on events and queues with timeouts; nothing sleeps.
"""

from __future__ import annotations

import io
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from agent.bus import Bus, Message, new_nonce
from agent.cli import main
from agent.config import Config, load_config
from agent.node import Node
from agent.topics import Topics
from tests.support.broker import REPO, Broker

WAIT_S = 15.0


def sim(base_ms: float = 20, ms_per_token: float = 1, **extra: Any) -> dict[str, Any]:
    return {"kind": "sim", "base_ms": base_ms, "ms_per_token": ms_per_token, **extra}


@dataclass
class Env:
    """One test's world: its broker, topic prefix and scratch directory."""

    broker: Broker
    prefix: str
    tmp: Path

    @property
    def topics(self) -> Topics:
        return Topics(self.prefix)

    def config(self, device_id: str, *, npu: dict[str, Any] | None = None,
               cpu: dict[str, Any] | None = None, slots: int = 1, **extra: Any) -> Path:
        """Write a config file for a device and return its path."""
        doc: dict[str, Any] = {
            "device_id": device_id,
            "broker": {"host": self.broker.host, "port": self.broker.port, "keepalive_s": 2},
            "topic_prefix": self.prefix,
            "state_dir": str(self.tmp / "state" / device_id),
            "metrics_interval_s": 30,
            "homeassistant": {"enabled": False},
            "npu": {"enabled": npu is not None, **({"executor": npu} if npu else {})},
            "cpu": {"enabled": cpu is not None, "slots": slots, **({"executor": cpu} if cpu else {})},
        }
        for key, value in extra.items():
            if isinstance(value, dict) and isinstance(doc.get(key), dict):
                doc[key] = {**doc[key], **value}
            else:
                doc[key] = value
        path = self.tmp / f"{device_id}.yaml"
        path.write_text(yaml.safe_dump(doc))
        return path

    def load(self, path: Path) -> Config:
        return load_config(path, env={})

    # ------------------------------------------------------------------ spying
    @contextmanager
    def spy(self, topic_filter: str = "#") -> Iterator[Spy]:
        nonce = new_nonce()
        bus = Bus(f"spy-{nonce}", _broker_cfg(self), persistent=False, name="spy")
        bus.set_sync_topic(f"{self.prefix}spy/{nonce}")
        bus.connect(WAIT_S)
        spy = Spy(bus, topic_filter)
        try:
            yield spy
        finally:
            bus.stop()

    # ------------------------------------------------------------------ nodes
    @contextmanager
    def node(self, path: Path) -> Iterator[Node]:
        """A node daemon in this process, online before the block runs."""
        cfg = self.load(path)
        node = Node(cfg)
        with self.spy(self.topics.availability(cfg.device_id)) as spy:
            node.start()
            spy.wait_for(_live_online, what=f"{cfg.device_id} online")
        try:
            yield node
        finally:
            node.stop()

    def node_process(self, path: Path) -> NodeProcess:
        return NodeProcess(self, path)

    # ------------------------------------------------------------------ trigger
    def trigger(self, path: Path, prompt: str, *args: str) -> tuple[int, dict[str, Any] | None, str, str]:
        """Run ``trigger --json`` in this process: (exit code, parsed JSON, stdout, stderr)."""
        out, err = io.StringIO(), io.StringIO()
        code = main(["trigger", "--config", str(path), "--json", "-q", *args, prompt],
                    stdout=out, stderr=err)
        text = out.getvalue()
        return code, (json.loads(text) if text.strip() else None), text, err.getvalue()


class Spy:
    """Records every message a connected bus receives on a filter."""

    def __init__(self, bus: Bus, topic_filter: str):
        self.messages: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self.seen: list[Message] = []
        self._lock = threading.Lock()
        self.bus = bus
        bus.subscribe(topic_filter, self._record)
        assert bus.barrier(WAIT_S), "the broker did not answer"

    def _record(self, msg: Message) -> None:
        if msg.topic == self.bus.sync_topic:
            return  # our own barrier round trips
        with self._lock:
            self.seen.append(msg)
        self.messages.put(msg)

    def publish(self, topic: str, payload: bytes, **kw: Any) -> None:
        self.bus.publish(topic, payload, **kw)
        assert self.bus.barrier(WAIT_S), "broker did not confirm"

    def wait_for(self, predicate: Callable[[Message], bool], *, timeout: float = WAIT_S,
                 what: str = "message") -> Message:
        deadline = time.monotonic() + timeout
        with self._lock:
            for msg in self.seen:
                if predicate(msg):
                    return msg
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
            try:
                msg = self.messages.get(timeout=remaining)
            except queue.Empty:
                continue
            if predicate(msg):
                return msg

    def topics_seen(self) -> list[str]:
        self.bus.barrier(WAIT_S)
        with self._lock:
            return [m.topic for m in self.seen]


class NodeProcess:
    """``python -m agent --role node`` as a child process, for kills and Wills."""

    def __init__(self, env: Env, path: Path):
        self.env = env
        self.path = path
        self.cfg = env.load(path)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = env.tmp / f"{self.cfg.device_id}.log"

    def __enter__(self) -> NodeProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        topic = self.env.topics.availability(self.cfg.device_id)
        with self.env.spy(topic) as spy:
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "agent", "--role", "node", "--config", str(self.path)],
                    cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
            try:
                spy.wait_for(_live_online, what=f"{self.cfg.device_id} process online")
            except AssertionError:
                self.stop()
                raise AssertionError(f"node {self.cfg.device_id} did not come online:\n"
                                     + self.log.read_text(errors="replace")[-2000:]) from None

    def kill(self) -> None:
        """SIGKILL: the OS closes the socket, the broker publishes the Will."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=WAIT_S)

    def pause(self) -> None:
        """SIGSTOP: the process is frozen, its connection stays open (a node that is away)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        """Stop (SIGTERM) and start again with the same config and state_dir."""
        self.stop()
        self.start()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=WAIT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _live_online(msg: Message) -> bool:
    """An "online" published while we listened (a retained one may be from an earlier run)."""
    return msg.payload == b"online" and not msg.retain


def _broker_cfg(env: Env) -> Any:
    from agent.config import BrokerConfig
    return BrokerConfig(host=env.broker.host, port=env.broker.port, keepalive_s=5)


JOB = Path(__file__).parent / "job.py"


class Gate:
    """A FIFO a stand-in model blocks on until the test releases it (no polling)."""

    def __init__(self, path: Path):
        self.path = path
        os.mkfifo(path)
        self._fd: int | None = None

    def release(self) -> None:
        # Opened read-write, a FIFO never blocks; the byte waits there for the model.
        self._fd = os.open(self.path, os.O_RDWR)
        os.write(self._fd, b"go")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def job(log: Path, mode: str = "quick", gate: Gate | None = None) -> dict[str, Any]:
    """A `command` executor running the stand-in model tests/support/job.py."""
    argv = [sys.executable, str(JOB), str(log), mode]
    if gate is not None:
        argv.append(str(gate.path))
    return {"kind": "command", "argv": [*argv, "{prompt}"]}


def executions(log: Path) -> dict[str, dict[str, int]]:
    """{rid: {"start": n, "done": n}} from a job.py log."""
    counts: dict[str, dict[str, int]] = {}
    if log.exists():
        for line in log.read_text().splitlines():
            what, rid, *_ = line.split()
            counts.setdefault(rid, {"start": 0, "done": 0})[what] += 1
    return counts


def hold_npu_in_other_process(state_dir: Path) -> subprocess.Popen[str]:
    """A separate process that holds the device's NPU lock until its stdin closes."""
    code = ("import sys; from pathlib import Path; from agent.npulock import NpuLock;"
            f"c = NpuLock(Path({str(state_dir)!r})).try_claim('test-holder');"
            "print('held' if c else 'busy', flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line == "held", f"could not take the NPU lock: {line!r}"
    return proc
