"""Building blocks for tests against a real broker: configs, a spy client, nodes.

Everything synchronises on events and queues with timeouts; nothing sleeps.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.bus import Bus, Message, new_nonce
from agent.cli import main
from agent.config import BrokerConfig, Config, load_config
from agent.node import Node
from agent.topics import Topics
from tests.support.broker import REPO, Broker
from tests.support.launch import ArrivalWatch, NodeProcess, node_doc, start_all, stop_all, write_config

WAIT_S = 15.0


def sim(base_ms: float = 20, ms_per_token: float = 1, **extra: Any) -> dict[str, Any]:
    return {"kind": "sim", "base_ms": base_ms, "ms_per_token": ms_per_token, **extra}


@dataclass
class Env:
    """One test's world: its broker, topic prefix and scratch directory."""

    broker: Broker
    prefix: str
    tmp: Path
    _arrivals: ArrivalWatch | None = field(default=None, repr=False)

    @property
    def topics(self) -> Topics:
        return Topics(self.prefix)

    def config(self, device_id: str, *, npu: dict[str, Any] | None = None,
               cpu: dict[str, Any] | None = None, slots: int = 1, **extra: Any) -> Path:
        """Write a config file for a device and return its path."""
        doc = node_doc(device_id, host=self.broker.host, port=self.broker.port, prefix=self.prefix,
                       state_dir=self.tmp / "state" / device_id, npu=npu, cpu=cpu, slots=slots, **extra)
        return write_config(self.tmp / f"{device_id}.yaml", doc)

    def load(self, path: Path) -> Config:
        return load_config(path, env={})

    @property
    def arrivals(self) -> ArrivalWatch:
        if self._arrivals is None:
            self._arrivals = ArrivalWatch(self.broker.host, self.broker.port, self.prefix)
        return self._arrivals

    def close(self) -> None:
        if self._arrivals is not None:
            self._arrivals.close()

    # ------------------------------------------------------------------ spying
    @contextmanager
    def spy(self, topic_filter: str = "#") -> Iterator[Spy]:
        nonce = new_nonce()
        bus = Bus(f"spy-{nonce}", BrokerConfig(host=self.broker.host, port=self.broker.port, keepalive_s=5),
                  persistent=False, name="spy", sync_topic=f"{self.prefix}spy/{nonce}")
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
        self.arrivals.expect(cfg.device_id)
        node.start()
        assert self.arrivals.wait(cfg.device_id, WAIT_S), f"{cfg.device_id} did not come online"
        try:
            yield node
        finally:
            node.stop()

    def node_process(self, path: Path) -> NodeProcess:
        """``python -m agent --role node`` for this config, as a child process."""
        device = self.load(path).device_id
        return NodeProcess(path, device, arrivals=self.arrivals, log=self.tmp / f"{device}.log")

    @contextmanager
    def node_processes(self, *paths: Path) -> Iterator[list[NodeProcess]]:
        """Node daemons as child processes, started at once and online before the block
        runs; stopped side by side after it."""
        nodes = [self.node_process(path) for path in paths]
        start_all(nodes)
        try:
            yield nodes
        finally:
            stop_all(nodes)

    # ------------------------------------------------------------------ trigger
    def trigger(self, path: Path, prompt: str, *args: str) -> tuple[int, dict[str, Any] | None, str, str]:
        """Run ``trigger --json`` in this process: (exit code, parsed JSON, stdout, stderr)."""
        out, err = io.StringIO(), io.StringIO()
        code = main(["trigger", "--config", str(path), "--json", "-q", *args, prompt],
                    stdout=out, stderr=err)
        text = out.getvalue()
        return code, (json.loads(text) if text.strip() else None), text, err.getvalue()


    def run(self, *argv: str) -> tuple[int, str, str, str]:
        """Any CLI command in this process: (exit code, stdout, "", stderr)."""
        out, err = io.StringIO(), io.StringIO()
        code = main(list(argv), stdout=out, stderr=err)
        return code, out.getvalue(), "", err.getvalue()

    def status(self, path: Path) -> tuple[int, dict[str, Any] | None, str, str]:
        """Run ``status --json`` in this process: (exit code, parsed JSON, stdout, stderr)."""
        out, err = io.StringIO(), io.StringIO()
        code = main(["status", "--config", str(path), "--json"], stdout=out, stderr=err)
        text = out.getvalue()
        return code, (json.loads(text) if text.strip() else None), text, err.getvalue()


class Spy:
    """Records every message a connected bus receives on a filter."""

    def __init__(self, bus: Bus, topic_filter: str):
        self.seen: list[Message] = []
        self._arrived = threading.Condition()
        self.bus = bus
        bus.subscribe(topic_filter, self._record)
        assert bus.barrier(WAIT_S), "the broker did not answer"

    def _record(self, msg: Message) -> None:
        if msg.topic == self.bus.sync_topic:
            return  # our own barrier round trips
        with self._arrived:
            self.seen.append(msg)
            self._arrived.notify_all()

    def publish(self, topic: str, payload: bytes, **kw: Any) -> None:
        self.bus.publish(topic, payload, **kw)
        assert self.bus.barrier(WAIT_S), "broker did not confirm"

    def wait_for(self, predicate: Callable[[Message], bool], *, timeout: float = WAIT_S,
                 what: str = "message", after: Message | None = None) -> Message:
        """The first message (since the spy started, or received after ``after``) that
        satisfies ``predicate``; AssertionError after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            i = 0 if after is None else next(n for n, m in enumerate(self.seen) if m is after) + 1
            while True:
                for msg in self.seen[i:]:
                    if predicate(msg):
                        return msg
                i = len(self.seen)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
                self._arrived.wait(remaining)

    def topics_seen(self) -> list[str]:
        self.bus.barrier(WAIT_S)
        with self._arrived:
            return [m.topic for m in self.seen]


JOB = Path(__file__).parent / "job.py"


class Gate:
    """A FIFO a stand-in model blocks on until the test releases it (no polling)."""

    def __init__(self, path: Path):
        self.path = path
        os.mkfifo(path)
        self._fd: int | None = None

    def release(self, runs: int = 1) -> None:
        """Let ``runs`` held models go (one byte each)."""
        # Opened read-write, a FIFO never blocks; the bytes wait there for the models.
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR)
        os.write(self._fd, b"g" * runs)

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
    code = ("import sys; from pathlib import Path; from agent.locks import NpuLock;"
            f"c = NpuLock(Path({str(state_dir)!r})).try_acquire('test-holder');"
            "print('held' if c else 'busy', flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line == "held", f"could not take the NPU lock: {line!r}"
    return proc
