"""A virtual fleet: hundreds to thousands of light devices from one process.

    scripts/fleet --count 1000 --broker 127.0.0.1:18830 [--prefix P] [--mqtt 5|3.1.1]
                  [--speed 5:40] [--seed 1] [--workers 2]

Each device has its own MQTT connection and device id and speaks the real protocol with
the project's own encoders (agent/messages.py, agent/topics.py):

* retained ``online`` availability (its Will says ``offline``) and retained metrics,
  republished every ``--metrics-interval`` seconds (a random phase each) and when asked
  on ``agent/+/presence``;
* a bid for every call on ``bid/request/+/+`` and for every invitation on its own
  ``bid/invite/<dev>/+/+`` (CPU only, one model, ``--slots`` jobs at once; its service
  estimate is its speed);
* a job on ``exec/<dev>`` that carries the claim of one of its bids is accepted, and the
  prompt streamed back word by word (``--base-ms`` first, then its ms per token), then
  ``done``; any other job is declined; a cancel with the job's key stops it;
* a raw floor responder: ``floor/req/<rid>`` under the prefix is answered on
  ``floor/rep/<rid>/<dev>`` with a bid-sized payload at QoS 0, as a bid, straight from
  the network callback (``scripts/bench --scale`` measures the broadcast floor with it).

A device costs about what a node's network side does per message: PUBLISH packets are
read with the node's decoder (``agent.mqtt5``), and a bid reuses its snapshot's JSON
until a job starts or ends, as a node's does.

There is no paho thread per device: each worker drives its share of the clients from one
thread with paho's external-loop API (``socket()``, ``loop_read``/``loop_write``/
``loop_misc``) and a selector. ``--workers`` spreads the devices over that many
processes (one core each, at most). The process raises its own open-file limit to what
the connections need, and says so when the hard limit is too low.

On a terminal it prints progress while connecting and then runs until Ctrl-C. Driven by
a program (``scripts/bench``), it prints ``ready <count>`` once every device is online,
then answers ``stats`` on stdin with one JSON line of counters, and stops cleanly (every
device publishes ``offline``) at end of input.
"""

from __future__ import annotations

import argparse
import functools
import heapq
import itertools
import json
import logging
import math
import multiprocessing
import multiprocessing.connection
import random
import resource
import selectors
import socket
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent import mqtt5
from agent.errors import MessageError
from agent.messages import (
    Accepted,
    Bid,
    BidRequest,
    Cancel,
    Declined,
    Done,
    Error,
    Job,
    LatencySummary,
    Metrics,
    ModelInfo,
    Snapshot,
    Timings,
    Token,
    cancel_check,
    encode_result,
    snapshot_members,
)
from agent.topics import Topics

log = logging.getLogger("fleet")
mqtt5.install()  # as in every node's process (agent.bus installs it): PUBLISH read as a node reads it

MODEL = "virtual"           # the one model every virtual device serves
KEEPALIVE_S = 60
MISC_EVERY_S = 1.0          # loop_misc (keepalive pings) for every client, this often
CONNACK_TIMEOUT_S = 30.0
CONNECT_TRIES = 5
DROPPED = "; dropped"
OFFERS_KEPT = 64            # per device: the claims of its latest bids (a job must carry one)
FLOOR_REPLY = b"x" * 420    # the size of a real bid
FD_SPARE = 64               # files beyond one socket per device: pipes, logs, the interpreter


class FleetError(Exception):
    """The fleet could not be brought up (the broker refused, the fd limit is too low, …)."""


@dataclass(frozen=True)
class Spec:
    count: int
    brokers: tuple[tuple[str, int], ...]
    prefix: str = ""
    protocol: str = "5"                   # "5" or "3.1.1"
    speed: tuple[float, float] = (5.0, 40.0)  # ms per token, uniform in this range per device
    base_ms: float = 5.0                  # before the first token
    seed: int = 1
    name: str = "vdev-"
    slots: int = 2
    metrics_interval_s: float = 10.0      # 0: once at connect (and on presence queries)
    connect_batch: int = 50               # connections opened before waiting for them to be subscribed

    def device_id(self, i: int) -> str:
        return f"{self.name}{i:04d}"


def raise_fd_limit(needed: int) -> str:
    """Raise this process's soft RLIMIT_NOFILE to ``needed`` if it is lower; a sentence
    saying what was done. FleetError if the hard limit is below ``needed``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed or soft == resource.RLIM_INFINITY:
        return f"open-file limit {soft} (enough for {needed})"
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise FleetError(f"{needed} open files needed, but the hard limit is {hard}: raise it (ulimit -Hn, "
                         f"or LimitNOFILE= for a service) or run fewer devices")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    return f"raised the open-file limit from {soft} to {needed}"


# ----------------------------------------------------------------------------- one device

@dataclass
class Running:
    job: Job
    words: list[str]
    started: float
    timers: list[list[Any]] = field(default_factory=list)   # heap entries, cancelled by emptying


class Device:
    """One virtual device: its client, speed and the claims of its bids."""

    def __init__(self, spec: Spec, index: int, rng: random.Random):
        self.spec = spec
        self.id = spec.device_id(index)
        self.host, self.port = spec.brokers[index % len(spec.brokers)]
        self.ms_per_token = rng.uniform(*spec.speed)
        self.metrics_phase = rng.random()
        self.offers: OrderedDict[tuple[str, str], str] = OrderedDict()
        self.running: dict[str, Running] = {}
        self.connected = False
        self.subscribes = 0      # SUBSCRIBEs sent (a refused one is sent again)
        self.failed: str | None = None
        self.client: mqtt.Client | None = None
        self._snapshot: tuple[int, Snapshot, bytes] | None = None   # (busy, snapshot, its JSON members)

    def bid_snapshot(self) -> tuple[Snapshot, bytes]:
        """The snapshot a bid carries and its JSON, kept while nothing runs or ends, as a
        node keeps its own (``presence``): a bid does not encode it again."""
        busy = len(self.running)
        if self._snapshot is None or self._snapshot[0] != busy:
            snap = self.snapshot()
            self._snapshot = (busy, snap, snapshot_members(snap))
        return self._snapshot[1], self._snapshot[2]

    def snapshot(self) -> Snapshot:
        busy = len(self.running)
        p50 = self.spec.base_ms + 16 * self.ms_per_token
        return Snapshot(has_npu=False, npu_free=False, cpu_slots=self.spec.slots, cpu_percent=busy * 50.0,
                        mem_available_mb=4000.0, load1=float(busy), queue_depth=busy,
                        recent={"cpu": LatencySummary(n=20, p50_ms=round(p50, 3),
                                                      ms_per_token=round(self.ms_per_token, 3))},
                        backlog_s=round(busy * p50 / 1000, 4),
                        models={"cpu": ModelInfo(MODEL, warm=True)})

    def service_s(self, max_new_tokens: int) -> float:
        return (self.spec.base_ms + max_new_tokens * self.ms_per_token) / 1000

    def offer(self, rid: str, origin: str, claim: str) -> None:
        self.offers[(rid, origin)] = claim
        while len(self.offers) > OFFERS_KEPT:
            self.offers.popitem(last=False)


# ----------------------------------------------------------------------------- one worker

class Shard:
    """Drives a share of the devices from one thread: a selector over their sockets, a
    timer heap, and a command pipe (``stats``, ``stop``) from whoever started it."""

    def __init__(self, spec: Spec, indices: Sequence[int], conn: multiprocessing.connection.Connection):
        self.spec = spec
        self.topics = Topics(spec.prefix)
        self.conn = conn
        # Each device's draw depends on the seed and its index only, not on the workers.
        self.devices = [Device(spec, i, random.Random(f"{spec.seed}-{i}")) for i in indices]
        self.sel = selectors.DefaultSelector()
        self.timers: list[list[Any]] = []
        self._seq = itertools.count()
        self.stats = {"devices": len(self.devices), "calls": 0, "invites": 0, "bids": 0, "jobs": 0, "done": 0,
                      "declined": 0, "cancelled": 0, "floor": 0, "metrics": 0, "dropped": 0, "disconnects": 0}
        self.bidders: set[str] = set()
        self._writing: set[Device] = set()   # devices whose socket the selector watches for writing
        self._reading = False
        self._misc_at = 0.0
        self._stop = False
        self.floor_req = f"{spec.prefix}floor/req/"

    # timers ------------------------------------------------------------------------
    def at(self, when: float, fn: Callable[[], None]) -> list[Any]:
        entry = [when, next(self._seq), fn]
        heapq.heappush(self.timers, entry)
        return entry

    def _run_timers(self, now: float) -> float:
        while self.timers and self.timers[0][0] <= now:
            _, _, fn = heapq.heappop(self.timers)
            if fn is not None:
                fn()
        return self.timers[0][0] - now if self.timers else MISC_EVERY_S

    # clients -----------------------------------------------------------------------
    def _client(self, dev: Device) -> mqtt.Client:
        v5 = self.spec.protocol == "5"
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=dev.id, userdata=dev,
                        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311, clean_session=None if v5 else True)
        c.will_set(self.topics.availability(dev.id), b"offline", qos=1, retain=True)
        c.on_socket_open = self._socket_open
        c.on_socket_close = self._socket_close
        c.on_connect = self._on_connect
        c.on_subscribe = self._on_subscribe
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        return c

    def _socket_open(self, c: mqtt.Client, dev: Device, sock: Any) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sel.register(sock, selectors.EVENT_READ, dev)

    def _socket_close(self, c: mqtt.Client, dev: Device, sock: Any) -> None:
        try:
            self.sel.unregister(sock)
        except (KeyError, ValueError):
            pass

    def _flush(self, dev: Device) -> None:
        """Write what paho has queued for ``dev`` now; what the socket will not take yet is
        left to the selector (interest in writing only while something waits: no system
        call per message to switch it on and off)."""
        c = dev.client
        assert c is not None
        if c.want_write():
            c.loop_write()
        waiting = c.want_write()
        if waiting != (dev in self._writing):
            sock = c.socket()
            if sock is None:
                return
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if waiting else 0)
            try:
                self.sel.modify(sock, events, dev)
            except (KeyError, ValueError):
                return
            (self._writing.add if waiting else self._writing.discard)(dev)

    def _on_connect(self, c: mqtt.Client, dev: Device, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            dev.failed = f"the broker refused {dev.id}: {rc}"
            return
        self._subscribe(dev)

    def _subscribe(self, dev: Device) -> None:
        t = self.topics
        assert dev.client is not None
        dev.subscribes += 1
        # At the node's QoS (agent/node.py): invitations and presence queries at 0 (on
        # NATS every QoS 1 subscription is a JetStream consumer, replicated in a cluster).
        dev.client.subscribe([(t.all_bid_requests(), 1), (t.bid_invites(dev.id), 0), (t.exec(dev.id), 1),
                              (t.cancels(dev.id), 1), (t.all_presence(), 0), (f"{self.floor_req}+", 1)])

    def _on_subscribe(self, c: mqtt.Client, dev: Device, mid: int, codes: Any, props: Any) -> None:
        """Online once subscribed (a broker may take a while: NATS keeps QoS 1 interest in
        JetStream), so that nobody asks it before it can hear. A refusal is tried again a
        few times (a busy NATS cluster times out creating its consumers)."""
        refused = [rc for rc in codes if rc.is_failure]
        if refused and dev.subscribes < CONNECT_TRIES:
            log.info("%s: subscriptions refused (%s), trying again", dev.id, refused[0])
            self.at(time.monotonic() + dev.subscribes, functools.partial(self._subscribe, dev))
            return
        if refused:
            dev.failed = f"the broker refused the subscriptions of {dev.id} {dev.subscribes} times: {refused[0]}"
            return
        self._publish_metrics(dev)
        c.publish(self.topics.availability(dev.id), b"online", qos=1, retain=True)
        dev.connected = True

    def _on_disconnect(self, c: mqtt.Client, dev: Device, flags: Any, rc: Any, props: Any) -> None:
        if dev.connected and not self._stop:
            self.stats["disconnects"] += 1
            log.warning("%s lost its connection (%s)", dev.id, rc)
        dev.connected = False
        if not self._stop and dev.failed is None:
            dev.failed = f"{dev.id} was disconnected by the broker ({rc}){DROPPED}"

    def _publish_metrics(self, dev: Device) -> None:
        assert dev.client is not None
        m = Metrics(device=dev.id, ts=round(time.time(), 3), snapshot=dev.snapshot())
        dev.client.publish(self.topics.metrics(dev.id), m.to_payload(), qos=1, retain=True)
        self.stats["metrics"] += 1
        if not self._reading and dev.client.want_write():
            self._flush(dev)

    def _metrics_tick(self, dev: Device) -> None:
        if dev.connected:
            self._publish_metrics(dev)
        self.at(time.monotonic() + self.spec.metrics_interval_s, functools.partial(self._metrics_tick, dev))

    def connect_all(self, progress: Callable[[int], None]) -> None:
        """Connect every device, a batch at a time; FleetError at the first refusal."""
        done = 0
        for start in range(0, len(self.devices), self.spec.connect_batch):
            batch = self.devices[start:start + self.spec.connect_batch]
            for dev in batch:
                dev.client = self._client(dev)
                try:
                    dev.client.connect(dev.host, dev.port, KEEPALIVE_S)
                except OSError as exc:
                    raise FleetError(f"could not connect {dev.id} to {dev.host}:{dev.port} after {done} "
                                     f"devices: {exc}{_fd_hint(exc)}") from None
            deadline = time.monotonic() + CONNACK_TIMEOUT_S
            tries = dict.fromkeys((d.id for d in batch), 1)
            while not all(d.connected or d.failed for d in batch):
                if time.monotonic() > deadline:
                    raise FleetError(f"the broker accepted no CONNACK within {CONNACK_TIMEOUT_S:.0f} s after "
                                     f"{done} devices (is it out of connections or open files?)")
                self.pump(0.2)
                self._keepalive()  # connecting a thousand to a NATS cluster outlasts the first ones' keepalive
                for dev in batch:
                    # A connection dropped while it starts (a NATS cluster still setting up
                    # its MQTT streams) is tried again, a few times; a refusal is final.
                    if dev.failed and dev.failed.endswith(DROPPED) and tries[dev.id] < CONNECT_TRIES:
                        tries[dev.id] += 1
                        dev.failed = None
                        log.info("%s: dropped while connecting, trying again", dev.id)
                        assert dev.client is not None
                        self.at(time.monotonic() + 0.5 * tries[dev.id], functools.partial(self._retry, dev))
                self._run_timers(time.monotonic())
            failed = [d.failed for d in batch if d.failed]
            if failed:
                raise FleetError(f"after {done} devices: {failed[0]} (a broker's max_connections or its "
                                 f"open-file limit, ulimit -n, may be too low)")
            done += len(batch)
            progress(done)
        now = time.monotonic()
        if self.spec.metrics_interval_s > 0:
            for dev in self.devices:
                first = now + dev.metrics_phase * self.spec.metrics_interval_s
                self.at(first, functools.partial(self._metrics_tick, dev))

    def _keepalive(self) -> None:
        """paho's housekeeping (pings within the keepalive) for every client, at most once
        every MISC_EVERY_S."""
        now = time.monotonic()
        if now < self._misc_at:
            return
        self._misc_at = now + MISC_EVERY_S
        for dev in self.devices:
            if dev.client is not None:
                dev.client.loop_misc()

    def _retry(self, dev: Device) -> None:
        assert dev.client is not None
        try:
            dev.client.reconnect()
        except OSError as exc:
            dev.failed = f"could not connect {dev.id} to {dev.host}:{dev.port}: {exc}{_fd_hint(exc)}"

    # the loop ----------------------------------------------------------------------
    def pump(self, timeout: float) -> None:
        for key, events in self.sel.select(timeout):
            dev = key.data
            if dev is None:
                self._command()
                continue
            if events & selectors.EVENT_READ:
                self._reading = True   # in paho's callbacks: it only queues, we write after
                try:
                    dev.client.loop_read()
                finally:
                    self._reading = False
            # What the callbacks published (paho queues it inside a callback), or the
            # rest of what the socket would not take before.
            self._flush(dev)

    def run(self) -> None:
        """Serve until ``stop`` comes on the command pipe."""
        self.sel.register(self.conn.fileno(), selectors.EVENT_READ, None)
        next_misc = time.monotonic() + MISC_EVERY_S
        while not self._stop:
            now = time.monotonic()
            wait = self._run_timers(now)
            if now >= next_misc:
                self._keepalive()
                next_misc = now + MISC_EVERY_S
            self.pump(max(0.0, min(wait, next_misc - now)))
        self._shutdown()

    def _command(self) -> None:
        try:
            cmd = self.conn.recv()
        except EOFError:
            cmd = "stop"
        if cmd == "stats":
            self.conn.send({**self.stats, "bidders": sorted(self.bidders)})
        elif cmd == "stop":
            self._stop = True

    def _shutdown(self) -> None:
        for dev in self.devices:
            if dev.client is not None and dev.connected:
                dev.client.publish(self.topics.availability(dev.id), b"offline", qos=1, retain=True)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and any(d.client is not None and d.client.want_write()
                                                  for d in self.devices):
            self.pump(0.05)
        for dev in self.devices:
            if dev.client is not None:
                dev.client.disconnect()
                if dev.client.want_write():
                    dev.client.loop_write()
                sock = dev.client.socket()
                if sock is not None:
                    self._socket_close(dev.client, dev, sock)
                    sock.close()
        self.sel.close()

    # messages ----------------------------------------------------------------------
    def _on_message(self, c: mqtt.Client, dev: Device, msg: mqtt.MQTTMessage) -> None:
        topic = msg.topic
        if topic.startswith(self.floor_req):  # the floor: no decoding, no agent logic
            c.publish(f"{self.spec.prefix}floor/rep/{topic[len(self.floor_req):]}/{dev.id}", FLOOR_REPLY, qos=0)
            self.stats["floor"] += 1
            return
        parsed = self.topics.parse(topic)
        if parsed is None or msg.retain:
            return
        payload = bytes(msg.payload)
        try:
            if parsed.kind in ("bid_request", "bid_invite"):
                self._on_call(c, dev, parsed.kind, parsed.rid, parsed.origin, payload)
            elif parsed.kind == "exec":
                self._on_job(c, dev, Job.from_payload(payload))
            elif parsed.kind == "cancel":
                self._on_cancel(dev, Cancel.from_payload(payload), parsed.origin)
            elif parsed.kind == "presence" and parsed.device != dev.id:
                self._publish_metrics(dev)
                c.publish(self.topics.availability(dev.id), b"online", qos=1, retain=True)
        except MessageError as exc:
            self.stats["dropped"] += 1
            log.debug("%s dropped a message on %s: %s", dev.id, topic, exc)

    def _on_call(self, c: mqtt.Client, dev: Device, kind: str, rid: str | None, origin: str | None,
                 payload: bytes) -> None:
        self.stats["calls" if kind == "bid_request" else "invites"] += 1
        req = BidRequest.from_payload(payload)
        if req.rid != rid or origin not in (None, req.origin):
            self.stats["dropped"] += 1
            return
        if req.need == "npu" or req.tools or req.model not in (None, MODEL):
            return  # nothing here could take it: no bid (as a node)
        claim = f"{dev.id}-{next(self._seq)}"
        dev.offer(req.rid, req.origin, claim)
        snap, members = dev.bid_snapshot()
        bid = Bid(rid=req.rid, device=dev.id, origin=req.origin, claim=claim, snapshot=snap,
                  service_s=round(dev.service_s(req.max_new_tokens), 4), service_n=20.0)
        c.publish(self.topics.bid_reply(req.origin, req.rid, dev.id), bid.to_payload(members), qos=0)  # as a node
        self.stats["bids"] += 1
        self.bidders.add(dev.id)

    def _send(self, c: mqtt.Client, job: Job, event: Any) -> None:
        c.publish(self.topics.result(job.origin, job.rid, event.device), encode_result(event), qos=1)
        dev: Device = c.user_data_get()
        if not self._reading and c.want_write():  # from a timer paho writes at once, maybe not all
            self._flush(dev)

    def _on_job(self, c: mqtt.Client, dev: Device, job: Job) -> None:
        self.stats["jobs"] += 1
        claim = dev.offers.pop((job.rid, job.origin), None)
        if claim is None or claim != job.claim or job.mode != "cpu" or len(dev.running) >= self.spec.slots:
            why = "no bid of mine carries that claim" if claim != job.claim else "not a job I can take"
            self.stats["declined"] += 1
            self._send(c, job, Declined(job.rid, dev.id, why, job.digest))
            return
        self._send(c, job, Accepted(job.rid, dev.id, "cpu", 0, job.digest))
        words = job.text_prompt.split()[:job.max_new_tokens] or ["ok"]
        run = Running(job, words, time.monotonic())
        dev.running[job.rid] = run
        t = run.started + self.spec.base_ms / 1000
        for seq, word in enumerate(words):
            t += dev.ms_per_token / 1000
            text = word if seq == 0 else " " + word
            run.timers.append(self.at(t, functools.partial(self._send, c, job, Token(job.rid, dev.id, seq, text,
                                                                                     job.digest))))
        run.timers.append(self.at(t, lambda: self._finish(c, dev, run)))

    def _finish(self, c: mqtt.Client, dev: Device, run: Running) -> None:
        dev.running.pop(run.job.rid, None)
        total = (time.monotonic() - run.started) * 1000
        prefill = min(total, self.spec.base_ms)
        self._send(c, run.job, Done(run.job.rid, dev.id, " ".join(run.words),
                                    Timings(prefill_ms=round(prefill, 3), decode_ms=round(total - prefill, 3),
                                            total_ms=round(total, 3)),
                                    prompt_tokens=len(run.job.text_prompt.split()), generated_tokens=len(run.words),
                                    digest=run.job.digest, finish_reason="stop"))
        self.stats["done"] += 1

    def _on_cancel(self, dev: Device, cancel: Cancel, origin: str | None) -> None:
        run = dev.running.get(cancel.rid)
        if run is None or origin != cancel.origin or run.job.origin != cancel.origin \
                or cancel_check(cancel.key) != run.job.cancel_check:
            return  # not a job of theirs, or the key does not fit
        dev.running.pop(cancel.rid)
        for entry in run.timers:
            entry[2] = None
        self.stats["cancelled"] += 1
        assert dev.client is not None
        self._send(dev.client, run.job, Error(run.job.rid, dev.id, f"cancelled: {cancel.reason or 'no reason'}",
                                              "cancelled", digest=run.job.digest))


def _fd_hint(exc: OSError) -> str:
    return " (out of open files: raise ulimit -n)" if exc.errno == 24 else ""


# ----------------------------------------------------------------------------- the fleet

def _serve_shard(spec: Spec, indices: Sequence[int], conn: multiprocessing.connection.Connection) -> None:
    """A worker: connect its devices (reporting progress), say ready, serve."""
    shard = Shard(spec, indices, conn)
    try:
        shard.connect_all(lambda n: conn.send(("connected", n)))
    except FleetError as exc:
        conn.send(("error", str(exc)))
        return
    conn.send(("ready", len(indices)))
    shard.run()


class VirtualFleet:
    """``spec.count`` devices over ``workers`` shards: one thread here if 1, else that
    many processes."""

    def __init__(self, spec: Spec, workers: int = 1):
        self.spec = spec
        self.workers = max(1, min(workers, spec.count))
        self._conns: list[multiprocessing.connection.Connection] = []
        self._runners: list[Any] = []

    def start(self, progress: Callable[[int, int], None] = lambda done, total: None) -> str:
        """Bring every device online; a sentence about the open-file limit. FleetError if
        any device could not connect (the fleet is stopped again)."""
        note = raise_fd_limit(self.spec.count + FD_SPARE)
        shares = [list(range(self.spec.count))[w::self.workers] for w in range(self.workers)]
        ctx = multiprocessing.get_context("fork")
        for share in shares:
            mine, theirs = multiprocessing.Pipe()
            self._conns.append(mine)
            if self.workers == 1:
                runner: Any = threading.Thread(target=_serve_shard, args=(self.spec, share, theirs), daemon=True,
                                               name="virtual-fleet")
            else:
                runner = ctx.Process(target=_serve_shard, args=(self.spec, share, theirs), daemon=True,
                                     name="virtual-fleet")
            runner.start()
            self._runners.append(runner)
        counts = [0] * len(shares)
        waiting = set(range(len(shares)))
        try:
            while waiting:
                ready = multiprocessing.connection.wait([self._conns[i] for i in waiting], timeout=120)
                if not ready:
                    raise FleetError("no progress from the fleet's workers in 120 s")
                for ready_one in ready:
                    i = [id(c) for c in self._conns].index(id(ready_one))
                    try:
                        kind, value = self._conns[i].recv()
                    except EOFError:
                        raise FleetError("a worker of the fleet died while connecting") from None
                    if kind == "error":
                        raise FleetError(value)
                    counts[i] = value
                    if kind == "ready":
                        waiting.discard(i)
                    progress(sum(counts), self.spec.count)
        except BaseException:
            self.stop()
            raise
        return note

    def stats(self) -> dict[str, Any]:
        """The counters of every shard, summed (``bidders``: how many devices bid at least once)."""
        total: dict[str, Any] = {}
        bidders: set[str] = set()
        for conn in self._conns:
            conn.send("stats")
            part = conn.recv()
            bidders.update(part.pop("bidders"))
            for k, v in part.items():
                total[k] = total.get(k, 0) + v
        total["bidders"] = len(bidders)
        return total

    def stop(self) -> None:
        for conn in self._conns:
            try:
                conn.send("stop")
            except (OSError, ValueError):
                pass
        for runner in self._runners:
            runner.join(15)
            if isinstance(runner, multiprocessing.process.BaseProcess) and runner.is_alive():
                runner.terminate()
        for conn in self._conns:
            conn.close()
        self._conns, self._runners = [], []

    def __enter__(self) -> VirtualFleet:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ----------------------------------------------------------------------------- command line

def _broker(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: want HOST:PORT")
    return host, int(port)


def _speed(text: str) -> tuple[float, float]:
    lo, sep, hi = text.partition(":")
    try:
        a, b = float(lo), float(hi if sep else lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: want MS or LO:HI (ms per token)") from None
    if not (0 <= a <= b and math.isfinite(b)):
        raise argparse.ArgumentTypeError(f"{text!r}: want 0 <= LO <= HI")
    return a, b


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="scripts/fleet", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", "-n", type=int, default=100, help="how many devices (default %(default)s)")
    ap.add_argument("--broker", type=_broker, action="append", metavar="HOST:PORT",
                    help="a broker to connect to; repeat it for a cluster, devices go round-robin "
                         "(default 127.0.0.1:18830, scripts/broker's)")
    ap.add_argument("--mqtt", choices=["5", "3.1.1"], default="5",
                    help="MQTT version (default 5; NATS speaks 3.1.1)")
    ap.add_argument("--prefix", default="", help="topic_prefix, as in the nodes' config (default none)")
    ap.add_argument("--name", default="vdev-", help="device ids are NAME0000, NAME0001, … (default %(default)s)")
    ap.add_argument("--speed", type=_speed, default=(5.0, 40.0), metavar="LO:HI",
                    help="ms per token, drawn uniformly per device (default 5:40)")
    ap.add_argument("--base-ms", type=float, default=5.0, help="ms before the first token (default %(default)s)")
    ap.add_argument("--slots", type=int, default=2, help="jobs each device runs at once (default %(default)s)")
    ap.add_argument("--metrics-interval", type=float, default=10.0, metavar="S",
                    help="seconds between each device's metrics; 0: only at connect (default %(default)s)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the speeds and phases (default %(default)s)")
    ap.add_argument("--workers", type=int, default=1,
                    help="processes to spread the devices over, one selector thread each (default %(default)s)")
    ap.add_argument("--connect-batch", type=int, default=50, metavar="K",
                    help="connections opened at once, before waiting for them (default %(default)s; "
                         "fewer for a NATS cluster)")
    ap.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="warning")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.count < 1 or args.workers < 1 or args.slots < 1:
        print("scripts/fleet: --count, --workers and --slots must be at least 1", file=sys.stderr)
        return 2
    spec = Spec(count=args.count, brokers=tuple(args.broker or [("127.0.0.1", 18830)]), prefix=args.prefix,
                protocol=args.mqtt, speed=args.speed, base_ms=args.base_ms, seed=args.seed, name=args.name,
                slots=args.slots, metrics_interval_s=args.metrics_interval,
                connect_batch=max(1, args.connect_batch))
    fleet = VirtualFleet(spec, args.workers)
    interactive = sys.stdin.isatty()
    last = [0.0, 0.0]  # when, and how many, last printed

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if done != last[1] and (done == total or now - last[0] >= 1.0):
            last[:] = [now, done]
            print(f"connected {done}/{total}", file=sys.stderr, flush=True)

    t0 = time.monotonic()
    try:
        note = fleet.start(progress)
    except FleetError as exc:
        print(f"scripts/fleet: {exc}", file=sys.stderr)
        return 1
    print(f"{spec.count} virtual devices online in {time.monotonic() - t0:.1f} s over {fleet.workers} "
          f"worker(s); {note}", file=sys.stderr, flush=True)
    print(f"ready {spec.count}", flush=True)
    try:
        if interactive:
            print("Ctrl-C stops them", file=sys.stderr, flush=True)
            threading.Event().wait()
        for line in sys.stdin:
            if line.strip() == "stats":
                print(json.dumps(fleet.stats()), flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        fleet.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
