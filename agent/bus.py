"""The MQTT bus: the only module that imports paho.

Theory of operation. paho's network thread does as little as possible: it turns each
PUBLISH into our own ``Message`` and puts it on a queue. One dispatcher thread takes
messages off that queue and calls the handlers whose filters match (an exact-topic dict
first, then paho's ``MQTTMatcher`` for wildcards). Handlers must be quick: anything slow
(execution, orchestration) is handed to a worker thread by the handler itself. A handler
that raises is logged and the dispatcher carries on. The one exception is a handler
subscribed ``inline``: the auction's hot path (answer a call for bids; queue a bid) is a
few microseconds of non-blocking work, so it runs on the network thread itself rather
than paying two thread hand-offs per hop.

Connections. ``TCP_NODELAY`` on the socket (paho leaves Nagle on, which costs ~40 ms a
hop on loopback through delayed ACKs). MQTT 5 where the broker speaks it, 3.1.1 where it
does not: with ``protocol: auto`` a broker that refuses MQTT 5 (or hangs up on its
CONNECT) gets 3.1.1, said once. Everything MQTT 5 adds is an optimisation here: every
id and every duration also travels in the payload. A persistent client sends
``clean_start=False`` and a ``SessionExpiryInterval`` on *every* connect (MQTT 5; with
3.1.1, ``clean_session=False`` and the broker's own expiry), so the broker queues QoS 1
messages while it is away. A node tells the broker the largest packet it takes
(``MaximumPacketSize``), so an oversized message is dropped there, not after it has
been read into memory. Every subscription is re-sent after each connect. Reconnects
start quickly (a fraction of a second, with jitter so a fleet does not stampede a
restarted broker) and back off to a cap; with ``broker.failover`` they move on to the
next address. Link listeners hear every connect and disconnect (an orchestrator must
not conclude anything about its peers while its own link is down).

Another client taking our client id — MQTT 5 says so with reason code 142, with 3.1.1
it shows as connections dropped right after they are made — is fatal: two processes
must never share an identity (``on_fatal``).

What to try next, when to fall back, how long to wait and when to give up is decided
by ``agent.connection.step``, a pure state table; this module only reports to it what
happened (a typed ``Failure``, never its own error text) and carries out its answer.

Threads, and who owns what:

- the connector (``{name}-connect``; ``connect()``'s caller instead for a trigger) runs
  the rounds of attempts before the first connection: it alone creates and replaces the
  paho client (a fresh one per attempt, another protocol, another address), and owns
  ``_client_used``, ``_reasons`` and ``_refused``;
- paho's network thread runs the callbacks: it owns ``epoch`` and sets ``_connected``
  and ``_connack``;
- callers of ``publish``/``subscribe``/``unsubscribe``/``barrier`` (any thread) read the
  client through ``_current()``;
- the owner's thread calls ``start``/``connect``/``stop``, which alone set ``_connector``,
  ``_dispatcher`` and ``_stopping``; the dispatcher thread only runs handlers.

``_link_lock`` guards the client handle (``_handle``: the client, its protocol and
address, replaced whole), the policy state ``_link``, the last attempt's ``_outcome``,
``_started`` and ``_fatal``. It is held only to read or replace those references, never
across a paho call or any network I/O, so a caller publishing on a client that is being
replaced publishes on the old or on the new one, with that one's protocol, and nothing
waits on the network. ``_lock`` guards the subscription tables, link listeners and
barriers, again only for the dict work.
"""

from __future__ import annotations

import logging
import queue
import random
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.matcher import MQTTMatcher
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent import connection
from agent.config import BrokerConfig
from agent.connection import (
    FIRST_CONNECT_MAX_S as FIRST_CONNECT_MAX_S,  # re-exported: the policy's numbers, where callers look
)
from agent.connection import FLAP_LIMIT as FLAP_LIMIT
from agent.connection import FLAP_WINDOW_S as FLAP_WINDOW_S
from agent.connection import RECONNECT_FIRST_S, Failure, Link
from agent.connection import first_connect_delay as first_connect_delay
from agent.connection import identity_verdict as identity_verdict
from agent.credentials import read_password
from agent.errors import AgentError, BrokerUnavailable, ConfigError, DuplicateIdentity

log = logging.getLogger(__name__)


class _DropShutdownRace(logging.Filter):
    """paho 2.2's loop thread can log "Client is not connected" at ERROR right after a
    clean disconnect(); it is a harmless race, not an error of ours."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Client is not connected")


_paho_log = logging.getLogger("agent.bus.paho")
_paho_log.addFilter(_DropShutdownRace())

_STOP = None  # on the dispatcher's queue: the dispatcher exits
PACKET_OVERHEAD = 4096             # topic, properties and headers on top of the payload limit
CONNECT_ATTEMPT_S = 5.0            # the background connector's wait for one CONNACK


# What a part that only sends is given: Bus.publish, or a stand-in (topic, payload, *, qos, retain).
Publish = Callable[..., object]


@dataclass(frozen=True)
class Message:
    """A received PUBLISH, independent of paho."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    dup: bool = False
    response_topic: str | None = None
    correlation_data: bytes | None = None
    expiry_left: int | None = None   # MQTT 5: the message expiry the broker had left for it


Handler = Callable[[Message], None]
LinkListener = Callable[[bool, bool], None]  # (up, session_present): network thread, queue only
# The dispatcher's queue: a message and the handlers it matched, a (re)connect (with
# session_present), or _STOP.
_Item = tuple[Message, list[Handler]] | tuple[bool, None] | None


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class _Handle:
    """The paho client in use, the protocol it speaks and the address it is aimed at:
    replaced whole under ``Bus._link_lock``, so a reader never sees one client with the
    other's protocol."""

    client: mqtt.Client
    protocol: str
    address: int


@dataclass(frozen=True)
class _Outcome:
    """Why the current attempt failed: the typed reason the policy decides on, and the
    words the operator reads."""

    failure: Failure
    text: str


class Subscription:
    """A handle returned by ``Bus.subscribe``; pass it to ``Bus.unsubscribe``."""

    def __init__(self, topic_filter: str, handler: Handler, qos: int, inline: bool = False):
        self.topic_filter = topic_filter
        self.handler = handler
        self.qos = qos
        self.inline = inline


class Bus:
    """One MQTT connection with topic dispatch, owned by a node or an orchestrator."""

    def __init__(self, client_id: str, broker: BrokerConfig, *, persistent: bool, sync_topic: str,
                 will: Will | None = None, name: str = "bus",
                 on_connect: Callable[[bool], None] | None = None,
                 on_fatal: Callable[[AgentError], None] | None = None,
                 reconnect_max_s: float = 5.0, max_packet_bytes: int | None = None, look_only: bool = False):
        """``look_only``: subscribe to nothing and acknowledge nothing, so a look at a
        device's session (``check``) leaves it as it was, every queued message included."""
        self.client_id = client_id
        self.look_only = look_only
        self.broker = broker
        self.persistent = persistent
        self.name = name
        self.will = will
        self.reconnect_max_s = reconnect_max_s
        self.max_packet_bytes = max_packet_bytes
        self._on_connect_cb = on_connect
        self._on_fatal = on_fatal
        self._connected = threading.Event()
        self._connack = threading.Event()  # any CONNACK, success or refusal
        self.epoch = 0  # successful connects so far: a change means we were cut off meanwhile
        self._lock = threading.Lock()
        self._exact: dict[str, list[Subscription]] = {}
        self._wild = MQTTMatcher()
        self._wild_filters: dict[str, list[Subscription]] = {}
        self._link_listeners: list[LinkListener] = []
        self._inbox: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._barriers: dict[bytes, threading.Event] = {}
        self.sync_topic = sync_topic  # only this client reads it: barrier() round trips
        self._dispatcher: threading.Thread | None = None
        self._stopping = threading.Event()
        self._connector: threading.Thread | None = None
        self._reasons = ""                       # the last round's failures, for the operator
        self._refused = False                    # the last round's last attempt reached a broker that said no
        self._password = read_password(broker.password_file) if broker.username else None
        self._link_lock = threading.Lock()       # see the module docstring: never held across I/O
        self._link = Link.initial(len(broker.addresses), broker.protocol, reconnect_max_s)
        self._outcome: _Outcome | None = None
        self._started = False                    # a client's loop runs, and a drop is not ours
        self._fatal: AgentError | None = None
        self._handle = _Handle(self._new_client(self._link.protocol), self._link.protocol, 0)
        self._client_used = False  # paho cannot re-aim a client after a connect attempt
        self.subscribe(sync_topic, self._handle_sync)

    # client -------------------------------------------------------------------------
    def _new_client(self, protocol: str) -> mqtt.Client:
        v5 = protocol == "5"
        kwargs: dict[str, Any] = {} if v5 else {"clean_session": not self.persistent}
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311, reconnect_on_failure=True,
                             manual_ack=self.look_only, **kwargs)
        client.enable_logger(_paho_log)
        client.reconnect_delay_set(min_delay=RECONNECT_FIRST_S[1], max_delay=self.reconnect_max_s)  # type: ignore[arg-type]
        client.max_queued_messages_set(10_000)
        client.on_socket_open = set_nodelay
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_connect_fail = self._handle_connect_fail
        client.on_message = self._handle_message
        if self.broker.username:
            client.username_pw_set(self.broker.username, self._password)
        if self.broker.tls.enabled:
            try:
                client.tls_set(ca_certs=self.broker.tls.ca_file, certfile=self.broker.tls.cert_file,
                               keyfile=self.broker.tls.key_file)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                raise ConfigError("broker.tls", [f"broker.tls: cannot load the TLS files: {exc}"]) from None
        if self.will is not None:
            client.will_set(self.will.topic, self.will.payload, qos=self.will.qos, retain=self.will.retain)
        return client

    def _connect_args(self, handle: _Handle) -> dict[str, Any]:
        host, port = self.broker.addresses[handle.address]
        args: dict[str, Any] = {"host": host, "port": port, "keepalive": self.broker.keepalive_s}
        if handle.protocol == "5":
            props = Properties(PacketTypes.CONNECT)
            if self.persistent:
                props.SessionExpiryInterval = self.broker.session_expiry_s
            if self.max_packet_bytes:
                props.MaximumPacketSize = self.max_packet_bytes + PACKET_OVERHEAD
            args.update(clean_start=not self.persistent, properties=props)
        return args

    def _current(self) -> _Handle:
        """The client to use now (any thread)."""
        with self._link_lock:
            return self._handle

    def _swap(self, handle: _Handle) -> _Handle:
        """Make ``handle`` current; returns the one it replaces (close it outside the lock)."""
        with self._link_lock:
            old, self._handle = self._handle, handle
        return old

    def _step(self, event: connection.Event) -> tuple[Link, connection.Action]:
        """Feed the policy one event (any thread); the lock is held for the pure step only."""
        with self._link_lock:
            try:
                self._link, action = connection.step(self._link, event, time.monotonic())
            except connection.IllegalTransition as exc:
                # A bug of this shell, never worth killing paho's network thread over.
                log.error("%s: %s (ignored)", self.name, exc)
                return self._link, connection.Nothing()
            return self._link, action

    def _record(self, outcome: _Outcome) -> None:
        with self._link_lock:
            self._outcome = outcome

    def _last_outcome(self) -> _Outcome | None:
        with self._link_lock:
            return self._outcome

    def _set_started(self, started: bool) -> bool:
        """Set ``_started``; returns what it was."""
        with self._link_lock:
            was, self._started = self._started, started
        return was

    def _is_started(self) -> bool:
        with self._link_lock:
            return self._started

    @property
    def protocol(self) -> str:
        """The MQTT version of the client in use: "5" or "3.1.1"."""
        return self._current().protocol

    @property
    def address(self) -> str:
        host, port = self.broker.addresses[self._current().address]
        return f"{host}:{port}"

    # lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Start connecting in the background; returns at once (the node's way). Until the
        first connection, every address (and both protocols, with auto) is tried in turn,
        at least once a second (first_connect_delay); after it, paho reconnects by itself."""
        self._start_dispatcher()
        self._stopping.clear()
        self._connector = threading.Thread(target=self._connect_loop, name=f"{self.name}-connect", daemon=True)
        self._connector.start()

    def _connect_loop(self) -> None:
        said = ""
        while not self._stopping.is_set():
            try:
                action = self._connect_once(CONNECT_ATTEMPT_S)
            except Exception as exc:  # never let the connector die quietly: a node would look alive
                log.exception("%s: connect attempt failed unexpectedly; retrying", self.name)
                self._reasons = _describe(exc)
                action = connection.Wait(FIRST_CONNECT_MAX_S)
            if not isinstance(action, connection.Wait):  # connected, stopped, or gave up
                return
            if self._reasons != said:  # once per distinct reason, not once per retry
                said = self._reasons
                log.warning("%s: %s; retrying", self.name, self._reasons)
            if self._stopping.wait(action.seconds):
                return

    def connect(self, timeout: float) -> None:
        """Connect and wait for CONNACK; BrokerUnavailable if that cannot be had (the
        trigger's way). Every address and, with protocol auto, both versions are tried."""
        self._start_dispatcher()
        if self._connect_once(timeout) is not None:
            self._stop_dispatcher()
            host, port = self.broker.addresses[0]
            raise BrokerUnavailable(host, port, self._reasons, refused=self._refused)

    def _connect_once(self, timeout: float) -> connection.Action | None:
        """One round over the addresses (and protocols), as the policy orders it: None
        once connected, else the policy's last word (a Wait, or Stop)."""
        deadline = time.monotonic() + timeout
        reasons: list[str] = []
        _, action = self._step(connection.Begin(deadline))
        outcome: _Outcome | None = None
        while isinstance(action, connection.Try) and not self._stopping.is_set():
            if action.fell_back and outcome is not None:
                log.warning("%s: the broker at %s does not take MQTT 5 (%s); using MQTT 3.1.1", self.name,
                            self.address, outcome.text)
            outcome = self._try_connect(action, deadline - time.monotonic())
            if outcome is None:
                return None
            reasons.append(f"{self.address}: {outcome.text}" if len(self.broker.addresses) > 1 else outcome.text)
            _, action = self._step(connection.AttemptFailed(outcome.failure, random.random()))
        self._reasons = "; ".join(reasons) or f"no answer within {timeout:g} s"
        self._refused = outcome is not None and outcome.failure.refused
        return action

    def _try_connect(self, attempt: connection.Try, timeout: float) -> _Outcome | None:
        """One attempt; None once connected, else why not."""
        self._connack.clear()
        with self._link_lock:
            self._outcome = None
            current = self._handle
        if self._client_used or (current.protocol, current.address) != (attempt.protocol, attempt.address):
            # A paho client that has tried once refuses a new connect timeout (and keeps
            # the failed attempt's state): each attempt gets a fresh one.
            _close_sockets(self._swap(_Handle(self._new_client(attempt.protocol), attempt.protocol,
                                              attempt.address)).client)
        handle = self._current()
        client = handle.client
        self._client_used = True
        client.connect_timeout = max(0.1, timeout)
        try:
            client.connect(**self._connect_args(handle))
        except (OSError, ValueError) as exc:
            return _Outcome(Failure.UNREACHABLE, _describe(exc))
        client.loop_start()
        self._set_started(True)
        answered = self._connack.wait(timeout)
        if self._connected.is_set():
            return None
        outcome = self._last_outcome()
        if outcome is None or not answered and outcome.failure is not Failure.DROPPED:
            outcome = _Outcome(Failure.NO_ANSWER, f"no answer within {timeout:g} s")
        self._set_started(False)
        client.disconnect()
        client.loop_stop()
        _close_sockets(client)
        return outcome

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def stop(self, final: Iterable[tuple[str, bytes, bool]] = (), timeout: float = 2.0, *,
             end_session: bool = False) -> None:
        """Publish ``final`` messages (topic, payload, retain), then disconnect cleanly.

        ``end_session`` tells the broker to drop our persistent session now rather than keep
        it for its expiry interval (a finished trigger has nothing more to receive)."""
        self._stopping.set()
        if self._connector is not None and self._connector is not threading.current_thread():
            self._connector.join(timeout=CONNECT_ATTEMPT_S + 1)
        client = self._current().client
        if self._set_started(False):  # from here on a disconnect is ours, not a lost broker
            infos = []
            if self._connected.is_set():
                for topic, payload, retain in final:
                    infos.append(client.publish(topic, payload, qos=1, retain=retain))
            deadline = time.monotonic() + timeout
            for info in infos:
                try:
                    info.wait_for_publish(max(0.0, deadline - time.monotonic()))
                except (RuntimeError, ValueError):
                    pass
            props = None
            if end_session and self.persistent and self.protocol == "5":
                props = Properties(PacketTypes.DISCONNECT)
                props.SessionExpiryInterval = 0
            client.disconnect(properties=props)
            client.loop_stop()
        _close_sockets(client)
        self._connected.clear()
        self._stop_dispatcher()

    # pub/sub --------------------------------------------------------------------------
    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1, *,
                  inline: bool = False) -> Subscription:
        """Route messages matching ``topic_filter`` to ``handler`` (kept across reconnects).

        ``inline=True`` runs the handler on paho's network thread instead of the dispatcher:
        only for handlers that do a few microseconds of non-blocking work (decode, reply,
        enqueue), where two thread hand-offs would cost more than the work itself.
        """
        sub = Subscription(topic_filter, handler, qos, inline)
        with self._lock:
            table = self._wild_filters if _is_wild(topic_filter) else self._exact
            first = topic_filter not in table
            table.setdefault(topic_filter, []).append(sub)
            if _is_wild(topic_filter):
                self._wild[topic_filter] = table[topic_filter]
        if first and self._connected.is_set():
            self._current().client.subscribe(topic_filter, qos=qos)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            table = self._wild_filters if _is_wild(sub.topic_filter) else self._exact
            subs = table.get(sub.topic_filter, [])
            if sub in subs:
                subs.remove(sub)
            last = not subs and sub.topic_filter in table
            if last:
                del table[sub.topic_filter]
                if _is_wild(sub.topic_filter):
                    del self._wild[sub.topic_filter]
        if last and self._connected.is_set():
            self._current().client.unsubscribe(sub.topic_filter)

    def on_link(self, listener: LinkListener) -> Callable[[], None]:
        """Call ``listener(up, session_present)`` on every connect and disconnect (on the
        network thread: it must only queue). Returns a function that removes it."""
        with self._lock:
            self._link_listeners.append(listener)

        def remove() -> None:
            with self._lock:
                if listener in self._link_listeners:
                    self._link_listeners.remove(listener)
        return remove

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                expiry_s: float | None = None, response_topic: str | None = None,
                correlation_data: bytes | None = None) -> None:
        """Queue a message; with QoS 1 paho keeps it and resends it after a reconnect.
        The MQTT 5 properties are dropped on a 3.1.1 connection (their meaning is in the
        payload too)."""
        handle = self._current()  # one client and its protocol, even while it is being replaced
        props = None
        if handle.protocol == "5" and (expiry_s is not None or response_topic or correlation_data):
            props = Properties(PacketTypes.PUBLISH)
            if expiry_s is not None:
                props.MessageExpiryInterval = expiry_interval(expiry_s)
            if response_topic:
                props.ResponseTopic = response_topic
            if correlation_data:
                props.CorrelationData = correlation_data
        handle.client.publish(topic, payload, qos=qos, retain=retain, properties=props)

    def barrier(self, timeout: float) -> bool:
        """Round-trip one QoS 1 message through the broker.

        The broker sends a client its messages in order, so once this returns True every
        retained message of the subscriptions made before the call has been dispatched.
        """
        token = secrets.token_bytes(8)
        done = threading.Event()
        with self._lock:
            self._barriers[token] = done
        self.publish(self.sync_topic, token, qos=1)
        ok = done.wait(timeout)
        with self._lock:
            self._barriers.pop(token, None)
        return ok

    # paho callbacks (network thread: decode and queue only) ----------------------------
    def _handle_connect(self, client: mqtt.Client, userdata: object, flags: mqtt.ConnectFlags,
                        reason: ReasonCode, properties: Properties | None) -> None:
        handle = self._current()
        if client is not handle.client:
            return  # a client already replaced: what it says is no longer about us
        if reason.is_failure:
            failure = connection.connack_failure(reason.value)
            self._record(_Outcome(failure, "refused the connection: unsupported protocol version "
                                           f"({reason})" if failure is Failure.OLD_PROTOCOL
                                  else f"refused the connection: {reason}"))
            self._connack.set()
            return
        with self._lock:
            filters = [(f, subs[0].qos) for f, subs in {**self._exact, **self._wild_filters}.items() if subs]
            listeners = list(self._link_listeners)
        if filters and not self.look_only:
            client.subscribe(filters)
        log.info("%s: connected to %s as %s (MQTT %s, session %s)", self.name, self.address, self.client_id,
                 handle.protocol, "resumed" if flags.session_present else "new")
        self._step(connection.Connected())
        self.epoch += 1
        self._connected.set()
        self._connack.set()
        for listener in listeners:
            self._run_listener(listener, True, bool(flags.session_present))
        if self._on_connect_cb is not None:
            self._inbox.put((bool(flags.session_present), None))

    def _handle_connect_fail(self, client: mqtt.Client, userdata: object) -> None:
        if client is not self._current().client:
            return
        self._reconnect_failed(client, _Outcome(Failure.UNREACHABLE, "connection failed"))

    def _reconnect_failed(self, client: mqtt.Client, outcome: _Outcome | None) -> None:
        """paho's own reconnect after a drop did not give a connection (network thread)."""
        link, action = self._step(connection.ReconnectFailed())
        if link.phase is not connection.Phase.DOWN:
            return  # paho retrying a client the current round is about to replace
        if outcome is not None:
            self._record(outcome)
        if link.failures_here == 1:
            log.warning("%s: cannot reach the broker at %s; retrying", self.name, self.address)
        if isinstance(action, connection.Retarget):
            with self._link_lock:
                self._handle = handle = _Handle(self._handle.client, self._handle.protocol, action.address)
            log.warning("%s: trying the next broker address, %s", self.name, self.address)
            client.connect_async(**self._connect_args(handle))

    def _handle_disconnect(self, client: mqtt.Client, userdata: object,
                           flags: mqtt.DisconnectFlags, reason: ReasonCode,
                           properties: Properties | None) -> None:
        handle = self._current()
        if client is not handle.client:
            return
        was = self._connected.is_set()
        self._connected.clear()
        if not self._connack.is_set():
            # Reached, and it said no without saying why (RabbitMQ to an MQTT 5 CONNECT).
            self._record(_Outcome(Failure.HUNG_UP, f"the broker hung up before answering the MQTT "
                                  f"{handle.protocol} CONNECT"
                                  + (" (set broker.protocol: 3.1.1 if it only speaks that)"
                                     if handle.protocol == "5" and self.broker.protocol == "5" else "")))
            self._connack.set()
        else:
            # (A refusal is followed by a disconnect of paho's own: its reason would
            # hide the broker's, which says why; keep the broker's.)
            last = self._last_outcome()
            if was or last is None or not last.failure.refused:
                self._record(_Outcome(Failure.DROPPED, f"disconnected: {reason}"))
        if not was:
            if self._is_started():
                # paho's own reconnect reached an address that turned it away (hung up,
                # refused): as much a failed reconnect as finding nobody listening.
                self._reconnect_failed(client, None)
            return
        if not self._is_started():
            return
        with self._lock:
            listeners = list(self._link_listeners)
        for listener in listeners:
            self._run_listener(listener, False, False)
        taken_over = getattr(reason, "value", None) == connection.SESSION_TAKEN_OVER
        _, action = self._step(connection.Dropped(taken_over, random.random()))
        if isinstance(action, connection.GiveUp):
            self._fail(DuplicateIdentity(self.client_id, "the broker gave our session to a new connection "
                                                         "with the same client id" if action.taken_over else
                                         f"the broker dropped us {action.flaps} times right after "
                                         "connecting, as it does when two clients share an id"))
            return
        if taken_over:
            log.warning("%s: another client connected as %s; this node has held that identity, so it takes "
                        "it back (the newcomer gives up)", self.name, self.client_id)
        else:
            log.warning("%s: lost the broker at %s (%s); reconnecting", self.name, self.address, reason)
        if isinstance(action, connection.Reconnect):
            # A quick first retry with jitter, so a restarted broker is back in use at once
            # without every device of the fleet arriving in the same millisecond.
            client.reconnect_delay_set(min_delay=action.first_s, max_delay=action.max_s)  # type: ignore[arg-type]

    def _fail(self, error: AgentError) -> None:
        with self._link_lock:
            if self._fatal is not None:
                return
            self._fatal = error
        log.error("%s: %s", self.name, error)
        if self._on_fatal is not None:
            threading.Thread(target=self._on_fatal, args=(error,), name=f"{self.name}-fatal", daemon=True).start()

    @property
    def fatal(self) -> AgentError | None:
        with self._link_lock:
            return self._fatal

    def _run_listener(self, listener: LinkListener, up: bool, session_present: bool) -> None:
        try:
            listener(up, session_present)
        except Exception:
            log.exception("%s: link listener failed", self.name)

    def _handle_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        message = Message(
            topic=msg.topic, payload=bytes(msg.payload), qos=msg.qos, retain=bool(msg.retain),
            dup=bool(msg.dup),
            response_topic=getattr(props, "ResponseTopic", None) if props else None,
            correlation_data=getattr(props, "CorrelationData", None) if props else None,
            expiry_left=getattr(props, "MessageExpiryInterval", None) if props else None,
        )
        # Matched once, here: the dispatcher runs the handlers subscribed when it arrived.
        queued = []
        for sub in self._matching(message.topic):
            if sub.inline:
                self._run(sub.handler, message)
            else:
                queued.append(sub.handler)
        if queued:
            self._inbox.put((message, queued))

    def _matching(self, topic: str) -> list[Subscription]:
        with self._lock:
            subs = list(self._exact.get(topic, ()))
            for matched in self._wild.iter_match(topic):
                subs.extend(matched)
        return subs

    def _handle_sync(self, msg: Message) -> None:
        with self._lock:
            event = self._barriers.get(msg.payload)
        if event is not None:
            event.set()

    # dispatcher thread ----------------------------------------------------------------
    def _start_dispatcher(self) -> None:
        if self._dispatcher is None or not self._dispatcher.is_alive():
            self._dispatcher = threading.Thread(target=self._dispatch_loop, daemon=True,
                                                name=f"{self.name}-dispatch")
            self._dispatcher.start()

    def _stop_dispatcher(self) -> None:
        if self._dispatcher is not None and self._dispatcher.is_alive():
            self._inbox.put(_STOP)
            if threading.current_thread() is not self._dispatcher:
                self._dispatcher.join(timeout=5)
        self._dispatcher = None

    def _dispatch_loop(self) -> None:
        while True:
            item = self._inbox.get()
            if item is _STOP:
                return
            what, handlers = item
            if handlers is None:
                self._run(self._on_connect_cb, what)  # a connect: what is session_present
                continue
            for handler in handlers:
                self._run(handler, what)

    def _run(self, fn: Callable[..., None] | None, arg: object) -> None:
        if fn is None:
            return
        try:
            fn(arg)
        except Exception:  # a handler's bug must not stop the dispatcher
            log.exception("%s: handler %r failed on %r", self.name, fn, getattr(arg, "topic", arg))


def _close_sockets(client: mqtt.Client) -> None:
    """Close what a client we are done with still holds. paho keeps its wake-up socket pair
    (two loopback TCP sockets) after ``loop_stop`` until the client object is collected, and
    a client in a reference cycle is collected late, or warns that its sockets were left
    open: every stopped bus kept two descriptors, and a suite run failed on the warning."""
    reset = getattr(client, "_reset_sockets", None)  # paho's own cleanup, also run by its __del__
    if reset is not None:
        reset()


def expiry_interval(seconds: float) -> int:
    """The MQTT 5 message expiry (whole seconds, at least one) for a lifetime in seconds."""
    return max(1, int(seconds + 0.999))


def set_nodelay(client: mqtt.Client, userdata: object, sock: Any) -> None:
    """paho on_socket_open hook: Nagle off (see the module docstring)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):  # not a TCP socket (e.g. a unix socket)
        pass


def _is_wild(topic_filter: str) -> bool:
    return "+" in topic_filter or "#" in topic_filter


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is the broker running?)"
    if isinstance(exc, socket.timeout):
        return "connection timed out"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host ({exc.strerror})"
    return str(exc) or type(exc).__name__


def new_nonce() -> str:
    """A short random id usable in topics and client ids."""
    return secrets.token_hex(6)
