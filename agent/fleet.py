"""A connection to the fleet: one bus, the live roster on it, and a sync round trip;
``forget``, the clean-up of a retired device's retained topics, made over one.

The node daemon wraps its own long-lived bus (``Fleet(bus, ...)``); a short-lived
process (``trigger``, ``status``, the benchmarks) opens one with ``Fleet.open(cfg)``.
This is the only place a fleet connection is put together.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from agent.bus import Bus, new_nonce
from agent.config import BrokerConfig, Config
from agent.control import Failure, Forgot
from agent.errors import DeviceBusy, ExitCode, StateError
from agent.locks import HeldLock, IdentityLock
from agent.mailroom import Mailroom
from agent.roster import Roster
from agent.statefiles import atomic_write, read_json_object
from agent.topics import Topics

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 3.0
SYNC_TIMEOUT_S = 3.0
# A trigger keeps its session at the broker this much longer than its job can live, so a
# broker restart mid-job keeps its results queued while it reconnects.
SESSION_SLACK_S = 60
# A short-lived client waiting on an answer retries the broker at least this often.
TRIGGER_RECONNECT_MAX_S = 2.0
# No retained presence came back: ask, and wait until answers stop (or the longest wait).
PRESENCE_QUIET_S = 0.1
PRESENCE_WAIT_S = 1.0
# How long status and check wait for another process of the device to let go of its
# broker identity (trigger passes its own, longer, wait).
IDENTITY_WAIT_S = 10.0


class Fleet:
    """What an orchestration needs from the broker: publish, subscribe, the live roster."""

    def __init__(self, bus: Bus, topics: Topics, me: str, *, max_bytes: int = 256 * 1024):
        self.bus = bus
        self.topics = topics
        self.me = me
        self.roster = Roster(topics, me, max_bytes=max_bytes)
        bus.subscribe(topics.all_availability(), self.roster.handle)
        # QoS 0: a device's metrics are retained and sent again every interval, so a lost
        # one is replaced by the next; at QoS 1 every node acknowledged every device's
        # metrics (a thousand devices: a hundred acknowledgements a second, each a write).
        bus.subscribe(topics.all_metrics(), self.roster.handle_metrics, qos=0)
        bus.subscribe(topics.all_capabilities(), self.roster.handle_capabilities)
        self.mail = Mailroom(bus, topics, me)  # the bids and results of our orchestrations
        self._synced = False
        self._lock = threading.Lock()
        self._identity: HeldLock | None = None

    @classmethod
    def open(cls, cfg: Config, *, role: str = "trigger", timeout: float = CONNECT_TIMEOUT_S,
             wait_identity_s: float = IDENTITY_WAIT_S, on_wait: Callable[[float], None] = lambda waited: None
             ) -> Fleet:
        """Connect a short-lived client for ``cfg``'s device; BrokerUnavailable if it cannot.

        Its session lasts as long as a job can (``close()`` ends it), so results published
        while it is cut off from the broker wait for it there. With a ``username`` the
        broker is taken to enforce client id = username (mosquitto/prod.conf): the client
        connects as the device itself, once the device's ``IdentityLock`` is free
        (DeviceBusy after ``wait_identity_s``), so that no two processes of the device
        take the connection from each other."""
        topics = Topics(cfg.topic_prefix, cfg.homeassistant.discovery_prefix)
        nonce = new_nonce()
        lifetime = int(cfg.auction.bid_timeout_s + cfg.auction.job_timeout_s) + SESSION_SLACK_S
        identity = None
        if cfg.broker.username is not None:
            lock = IdentityLock(cfg.state_dir)
            identity = lock.wait_acquire(role, wait_identity_s, on_wait=on_wait)
            if identity is None:
                raise DeviceBusy(lock.holder(), wait_identity_s)
        client_id = cfg.device_id if identity is not None else f"{cfg.device_id}-{role}-{nonce}"
        remembered = ProtocolMemory(cfg.state_dir)
        broker = remembered.apply(cfg.broker)
        bus = Bus(client_id, replace(broker, session_expiry_s=lifetime),
                  persistent=True, name=role, sync_topic=topics.sync(cfg.device_id, nonce),
                  reconnect_max_s=TRIGGER_RECONNECT_MAX_S)
        fleet = cls(bus, topics, cfg.device_id, max_bytes=cfg.max_payload_bytes)
        fleet._identity = identity
        try:
            bus.connect(timeout)
        except BaseException:
            fleet._release()
            raise
        if cfg.broker.protocol == "auto":
            remembered.record(cfg.broker, bus.protocol)
        return fleet  # the orchestrator syncs once its own subscriptions are in place

    def sync(self) -> None:
        """Once: a broker round trip, after which the retained roster and every subscription
        made so far are in place. If the broker delivered no retained presence at all (it
        does not on wildcards, or the fleet is empty), ask: live nodes announce themselves
        again, and the roster is whoever did until PRESENCE_QUIET_S passes without news."""
        with self._lock:
            if self._synced:
                return
            if not self.bus.barrier(SYNC_TIMEOUT_S):
                log.warning("the broker did not echo our sync message; the roster may be incomplete")
            if not self.roster.known().keys() - {self.me}:
                asked = time.monotonic()
                self.bus.publish(self.topics.presence(self.me), b"?", qos=1)
                heard = self.roster.wait_quiet(asked, quiet_s=PRESENCE_QUIET_S, timeout_s=PRESENCE_WAIT_S)
                log.debug("presence query: %d device(s) answered in %.0f ms", len(heard),
                          (time.monotonic() - asked) * 1000)
            self._synced = True

    def close(self) -> None:
        """Disconnect and drop the session (nothing more is coming for a finished client)."""
        try:
            self.bus.stop(end_session=True)
        finally:
            self._release()

    def _release(self) -> None:
        if self._identity is not None:
            self._identity.release()
            self._identity = None


def probe_broker(cfg: Config, timeout: float = CONNECT_TIMEOUT_S) -> str:
    """Connect once and leave, changing nothing (``check``): the MQTT version the broker
    took; BrokerUnavailable if it cannot be had. With a username the broker makes the
    client id the device's own, so the look resumes the device's session, keeps its
    expiry, subscribes to nothing and acknowledges nothing: what is queued there stays for
    the node. No lock is taken and no file written."""
    nonce = new_nonce()
    as_device = cfg.broker.username is not None
    bus = Bus(cfg.device_id if as_device else f"{cfg.device_id}-check-{nonce}",
              ProtocolMemory(cfg.state_dir).apply(cfg.broker), persistent=as_device, name="check",
              sync_topic=Topics(cfg.topic_prefix).sync(cfg.device_id, nonce), look_only=True)
    bus.connect(timeout)
    protocol = bus.protocol
    bus.stop()
    return protocol


def forget(fleet: Fleet, device: str, *, force: bool) -> Forgot | Failure:
    """Clear a retired device's retained topics (an empty retained message deletes one,
    and an empty discovery config makes Home Assistant drop the device): what was
    cleared, or why not (the control socket's events)."""
    topics = fleet.topics
    if device not in fleet.roster.known() and device not in fleet.roster.metrics():
        return Failure(f"the broker knows no device {device!r} (nothing retained under its id); "
                       "`status` lists the devices there are", ExitCode.USAGE)
    if fleet.roster.known().get(device) and not force:
        return Failure(f"{device} is online: stop its node first (it would announce itself again), or --force",
                       ExitCode.USAGE)
    cleared = [topics.availability(device), topics.metrics(device), topics.last_result(device),
               topics.ha_config(device)]
    for topic in cleared:
        fleet.bus.publish(topic, b"", retain=True)
    if not fleet.bus.barrier(5.0):
        return Failure("the broker did not confirm", ExitCode.BROKER)
    # Look again: a broker with the ACL drops what we may not clear, without telling.
    kept: list[str] = []
    subs = [fleet.bus.subscribe(t, lambda m: kept.append(m.topic) if m.retain and m.payload else None)
            for t in cleared]
    fleet.bus.barrier(5.0)
    for sub in subs:
        fleet.bus.unsubscribe(sub)
    if kept:
        return Failure(f"the broker kept {', '.join(sorted(set(kept)))}: this device may not clear them "
                       "(with the production ACL, run forget with an operator's config)", ExitCode.FAILED)
    return Forgot(cleared)


class ProtocolMemory:
    """With ``protocol: auto``, the MQTT version a broker took, remembered per broker in
    ``state_dir/broker-protocol.json`` for a week: a short-lived trigger does not pay a
    refused MQTT 5 connect (and print its warning) every time. Best effort."""

    KEEP_S = 7 * 24 * 3600

    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / "broker-protocol.json"

    def _load(self) -> dict[str, Any]:
        return read_json_object(self.path)

    @staticmethod
    def _key(broker: BrokerConfig) -> str:
        return ",".join(f"{h}:{p}" for h, p in broker.addresses)

    def apply(self, broker: BrokerConfig) -> BrokerConfig:
        if broker.protocol != "auto":
            return broker
        entry = self._load().get(self._key(broker))
        if (isinstance(entry, dict) and entry.get("protocol") == "3.1.1" and isinstance(entry.get("at"), (int, float))
                and time.time() - entry["at"] < self.KEEP_S):
            log.debug("using MQTT 3.1.1 with %s, as it took last time", self._key(broker))
            return replace(broker, protocol="3.1.1")
        return broker

    def record(self, broker: BrokerConfig, protocol: str) -> None:
        memory, key = self._load(), self._key(broker)
        entry = memory.get(key)
        if protocol == "3.1.1":
            if isinstance(entry, dict) and isinstance(entry.get("at"), (int, float)) \
                    and time.time() - entry["at"] < self.KEEP_S / 7:
                return  # remembered within the day
            memory[key] = {"protocol": "3.1.1", "at": round(time.time())}
        elif key in memory:
            del memory[key]  # it takes MQTT 5 now
        else:
            return
        try:
            atomic_write(self.path, json.dumps(memory, sort_keys=True).encode())
        except StateError as exc:
            log.debug("could not remember the broker's protocol: %s", exc)
