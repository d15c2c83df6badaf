"""The MQTT bus: the only module that imports paho (with ``agent.mqtt5``, below it).

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

The parts, one job each (``Bus`` is a facade over them; ``agent.router`` holds the
paho-free half: subscriptions and matching, link listeners, the dispatcher, barriers):

- ``_Clients`` makes a paho client and its connect arguments from the settings (no I/O);
- ``_LinkState`` is what the threads share about the link (below);
- ``_Connector`` runs the rounds of attempts before the first connection and the clean stop;
- ``_Callbacks`` are paho's callbacks: decode, feed the policy, carry out its answer.

Threads, and who owns what:

- the connector (``{name}-connect``; ``connect()``'s caller instead for a trigger) runs
  ``_Connector``: it alone creates and replaces the paho client (a fresh one per attempt,
  another protocol, another address), and owns ``_client_used``, ``reasons`` and
  ``refused``;
- paho's network thread runs ``_Callbacks``: it owns ``epoch`` and sets ``connected`` and
  ``connack``; it runs inline handlers and link listeners and queues the rest;
- the dispatcher (``{name}-dispatch``) runs the other handlers and the connect callback;
- callers of ``publish``/``subscribe``/``unsubscribe``/``barrier`` (any thread) read the
  client through ``_LinkState.current()``;
- the owner's thread calls ``start``/``connect``/``stop``, which alone start and stop the
  connector and the dispatcher threads.

``_LinkState``'s lock guards the client handle (``_Handle``: the client, its protocol and
address, replaced whole), the policy state, the last attempt's outcome, ``started`` and
``fatal``. It is held only to read or replace those references, never across a paho call
or any network I/O, so a caller publishing on a client that is being replaced publishes on
the old or on the new one, with that one's protocol, and nothing waits on the network.
The router's locks guard the subscription tables, link listeners and barriers, again only
for the dict work.
"""

from __future__ import annotations

import logging
import random
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.matcher import MQTTMatcher
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent import connection, mqtt5
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
from agent.router import Barriers, Dispatcher, Handler, LinkListener, Router
from agent.router import Message as Message  # re-exported: every part imports it from here
from agent.router import Subscription as Subscription

mqtt5.install()  # paho reads PUBLISH properties at a tenth of the cost (agent/mqtt5.py)

log = logging.getLogger(__name__)


class _DropShutdownRace(logging.Filter):
    """paho 2.2's loop thread can log "Client is not connected" at ERROR right after a
    clean disconnect(); it is a harmless race, not an error of ours."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Client is not connected")


_paho_log = logging.getLogger("agent.bus.paho")
_paho_log.addFilter(_DropShutdownRace())

PACKET_OVERHEAD = 4096             # topic, properties and headers on top of the payload limit
CONNECT_ATTEMPT_S = 5.0            # the background connector's wait for one CONNACK


# What a part that only sends is given: Bus.publish, or a stand-in (topic, payload, *, qos, retain).
Publish = Callable[..., object]


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class _Handle:
    """The paho client in use, the protocol it speaks and the address it is aimed at:
    replaced whole under ``_LinkState``'s lock, so a reader never sees one client with the
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


class _Clients:
    """Makes paho clients and their connect arguments from the settings (no I/O)."""

    def __init__(self, client_id: str, broker: BrokerConfig, *, persistent: bool, will: Will | None,
                 reconnect_max_s: float, max_packet_bytes: int | None, look_only: bool):
        self.client_id = client_id
        self.broker = broker
        self.persistent = persistent
        self.will = will
        self.reconnect_max_s = reconnect_max_s
        self.max_packet_bytes = max_packet_bytes
        self.look_only = look_only
        self._password = read_password(broker.password_file) if broker.username else None

    def new(self, protocol: str) -> mqtt.Client:
        """A client for ``protocol``, its callbacks not yet set (``_Callbacks.attach``)."""
        v5 = protocol == "5"
        kwargs: dict[str, Any] = {} if v5 else {"clean_session": not self.persistent}
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311, reconnect_on_failure=True,
                             manual_ack=self.look_only, **kwargs)
        client.enable_logger(_paho_log)
        client.reconnect_delay_set(min_delay=RECONNECT_FIRST_S[1], max_delay=self.reconnect_max_s)  # type: ignore[arg-type]
        client.max_queued_messages_set(10_000)
        client.on_socket_open = set_nodelay
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

    def connect_args(self, handle: _Handle) -> dict[str, Any]:
        """``connect``/``connect_async`` keyword arguments for a handle's address and protocol."""
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

    def address(self, handle: _Handle) -> str:
        """``host:port`` of the address a handle is aimed at."""
        host, port = self.broker.addresses[handle.address]
        return f"{host}:{port}"


_Held = tuple[str, bytes, int, bool, "Properties | None"]  # a publish held during a connect()


class _LinkState:
    """What the connector, paho's network thread and callers share: the client handle, the
    policy state, the last attempt's outcome, ``started`` and ``fatal`` under one lock held
    only to read or replace a reference (never across a paho call or I/O); the
    ``connected`` and CONNACK events; ``epoch``, written by paho's network thread only."""

    def __init__(self, name: str, handle: _Handle, link: Link):
        self.name = name
        self._lock = threading.Lock()
        self._handle = handle
        self._link = link
        self._outcome: _Outcome | None = None
        self._started = False                    # a client's loop runs, and a drop is not ours
        self._fatal: AgentError | None = None
        self.connected = threading.Event()
        self.connack = threading.Event()         # any CONNACK, success or refusal
        # Publishes against a client's (re)connect: paho sets the new socket before it queues
        # the CONNECT, so a publish from another thread in between went out ahead of the
        # CONNECT (seen in CI; the broker hangs up on that), whether the connector's
        # connect() or paho's own reconnect after a drop was making it. From paho's
        # pre-connect hook until the CONNECT is queued (its write hook, ``release``), what is
        # published to that client is held in ``held``, then published in order. The gate is
        # held only to read ``held`` and hand a message to paho, which then only queues.
        self.gate = threading.RLock()
        self.held: tuple[mqtt.Client, list[_Held]] | None = None
        self.epoch = 0  # successful connects so far: a change means we were cut off meanwhile

    def held_for(self, client: mqtt.Client) -> list[_Held] | None:
        """What is held for ``client`` while it connects, or None: nothing is (publish now)."""
        held = self.held
        return held[1] if held is not None and held[0] is client else None

    def hold(self, client: mqtt.Client) -> None:
        """Hold what is published to ``client`` until ``release``: it is about to connect."""
        with self.gate:
            if self.held_for(client) is None:
                self.held = (client, [])

    def release(self, client: mqtt.Client, name: str) -> None:
        """``client``'s CONNECT is queued (or it will not connect): publish what was held
        for it, in order, and hold no more."""
        if self.held_for(client) is None:
            return  # the usual case, read without the gate: nothing held for it
        with self.gate:
            held = self.held_for(client)
            if held is None:
                return
            self.held = None
            for topic, payload, qos, retain, props in held:
                try:
                    client.publish(topic, payload, qos=qos, retain=retain, properties=props)
                except Exception as exc:  # (as the caller's own publish would have raised) the rest still go
                    log.warning("%s: dropped a message to %s published while connecting: %s", name, topic, exc)

    def current(self) -> _Handle:
        """The client to use now (any thread)."""
        with self._lock:
            return self._handle

    def swap(self, handle: _Handle) -> _Handle:
        """Make ``handle`` current; returns the one it replaces (close it outside the lock)."""
        with self._lock:
            old, self._handle = self._handle, handle
        return old

    def retarget(self, address: int) -> _Handle:
        """Aim the current client at another address; returns the new handle."""
        with self._lock:
            self._handle = _Handle(self._handle.client, self._handle.protocol, address)
            return self._handle

    def step(self, event: connection.Event) -> tuple[Link, connection.Action]:
        """Feed the policy one event (any thread); the lock is held for the pure step only."""
        with self._lock:
            try:
                self._link, action = connection.step(self._link, event, time.monotonic())
            except connection.IllegalTransition as exc:
                # A bug of this shell, never worth killing paho's network thread over.
                log.error("%s: %s (ignored)", self.name, exc)
                return self._link, connection.Nothing()
            return self._link, action

    def begin_attempt(self) -> _Handle:
        """Forget the last attempt's outcome; returns the current handle."""
        with self._lock:
            self._outcome = None
            return self._handle

    def record(self, outcome: _Outcome) -> None:
        with self._lock:
            self._outcome = outcome

    def last_outcome(self) -> _Outcome | None:
        with self._lock:
            return self._outcome

    def set_started(self, started: bool) -> bool:
        """Set ``started``; returns what it was."""
        with self._lock:
            was, self._started = self._started, started
        return was

    def is_started(self) -> bool:
        with self._lock:
            return self._started

    def set_fatal(self, error: AgentError) -> bool:
        """Record the first fatal error; False when there was one already."""
        with self._lock:
            if self._fatal is not None:
                return False
            self._fatal = error
        return True

    @property
    def fatal(self) -> AgentError | None:
        with self._lock:
            return self._fatal


class _Connector:
    """The rounds of attempts before the first connection, on ``{name}-connect`` (or the
    caller of ``connect()``), and the clean stop: the only code that creates or replaces
    the paho client. It alone owns ``_client_used``, ``reasons`` and ``refused``."""

    def __init__(self, name: str, clients: _Clients, state: _LinkState, callbacks: _Callbacks):
        self.name = name
        self._clients = clients
        self._state = state
        self._callbacks = callbacks
        self.reasons = ""                        # the last round's failures, for the operator
        self.refused = False                     # the last round's last attempt reached a broker that said no
        self._client_used = False                # paho cannot re-aim a client after a connect attempt
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None  # set by the owner's thread only

    def start(self) -> None:
        """Run the rounds on a thread of their own until connected, stopped or given up."""
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, name=f"{self.name}-connect", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        said = ""
        while not self._stopping.is_set():
            try:
                action = self.connect_once(CONNECT_ATTEMPT_S)
            except Exception as exc:  # never let the connector die quietly: a node would look alive
                log.exception("%s: connect attempt failed unexpectedly; retrying", self.name)
                self.reasons = _describe(exc)
                action = connection.Wait(FIRST_CONNECT_MAX_S)
            if not isinstance(action, connection.Wait):  # connected, stopped, or gave up
                return
            if self.reasons != said:  # once per distinct reason, not once per retry
                said = self.reasons
                log.warning("%s: %s; retrying", self.name, self.reasons)
            if self._stopping.wait(action.seconds):
                return

    def connect_once(self, timeout: float) -> connection.Action | None:
        """One round over the addresses (and protocols), as the policy orders it: None
        once connected, else the policy's last word (a Wait, or Stop)."""
        deadline = time.monotonic() + timeout
        reasons: list[str] = []
        _, action = self._state.step(connection.Begin(deadline))
        outcome: _Outcome | None = None
        while isinstance(action, connection.Try) and not self._stopping.is_set():
            if action.fell_back and outcome is not None:
                log.warning("%s: the broker at %s does not take MQTT 5 (%s); using MQTT 3.1.1", self.name,
                            self._address(), outcome.text)
            outcome = self._try(action, deadline - time.monotonic())
            if outcome is None:
                return None
            reasons.append(f"{self._address()}: {outcome.text}" if len(self._clients.broker.addresses) > 1
                           else outcome.text)
            _, action = self._state.step(connection.AttemptFailed(outcome.failure, random.random()))
        self.reasons = "; ".join(reasons) or f"no answer within {timeout:g} s"
        self.refused = outcome is not None and outcome.failure.refused
        return action

    def _address(self) -> str:
        return self._clients.address(self._state.current())

    def _try(self, attempt: connection.Try, timeout: float) -> _Outcome | None:
        """One attempt; None once connected, else why not."""
        state = self._state
        state.connack.clear()
        current = state.begin_attempt()
        if self._client_used or (current.protocol, current.address) != (attempt.protocol, attempt.address):
            # A paho client that has tried once refuses a new connect timeout (and keeps
            # the failed attempt's state): each attempt gets a fresh one.
            fresh = self._callbacks.attach(self._clients.new(attempt.protocol))
            _close_sockets(state.swap(_Handle(fresh, attempt.protocol, attempt.address)).client)
        handle = state.current()
        client = handle.client
        self._client_used = True
        client.connect_timeout = max(0.1, timeout)
        state.hold(client)  # (paho's pre-connect hook does too; its write hook releases)
        try:
            client.connect(**self._clients.connect_args(handle))
        except (OSError, ValueError) as exc:
            return _Outcome(Failure.UNREACHABLE, _describe(exc))
        finally:
            state.release(client, self.name)  # the CONNECT is queued (or there is no socket): they follow it
        client.loop_start()
        state.set_started(True)
        answered = state.connack.wait(timeout)
        if state.connected.is_set():
            return None
        outcome = state.last_outcome()
        if outcome is None or not answered and outcome.failure is not Failure.DROPPED:
            # rounded: the time left of the round, which differs by microseconds each round,
            # would make each round's reason new to the log that says each reason once
            outcome = _Outcome(Failure.NO_ANSWER, f"no answer within {round(timeout, 1):g} s")
        state.set_started(False)
        client.disconnect()
        client.loop_stop()
        _close_sockets(client)
        return outcome

    def stop(self, final: Iterable[tuple[str, bytes, bool]], timeout: float, end_session: bool) -> None:
        """End the rounds, publish ``final`` if connected, disconnect cleanly (see ``Bus.stop``)."""
        state = self._state
        self._stopping.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=CONNECT_ATTEMPT_S + 1)
        handle = state.current()
        client = handle.client
        if state.set_started(False):  # from here on a disconnect is ours, not a lost broker
            infos = []
            if state.connected.is_set():
                for topic, payload, retain in final:
                    infos.append(client.publish(topic, payload, qos=1, retain=retain))
            deadline = time.monotonic() + timeout
            for info in infos:
                try:
                    info.wait_for_publish(max(0.0, deadline - time.monotonic()))
                except (RuntimeError, ValueError):
                    pass
            props = None
            if end_session and self._clients.persistent and state.current().protocol == "5":
                props = Properties(PacketTypes.DISCONNECT)
                props.SessionExpiryInterval = 0
            client.disconnect(properties=props)
            client.loop_stop()
        _close_sockets(client)
        state.connected.clear()


class _Callbacks:
    """paho's callbacks, on its network thread: decode, feed the policy, carry out its
    answer, queue the rest; callbacks from a client already replaced are ignored."""

    def __init__(self, name: str, clients: _Clients, state: _LinkState, router: Router,
                 dispatcher: Dispatcher, on_fatal: Callable[[AgentError], None] | None):
        self.name = name
        self._clients = clients
        self._state = state
        self._router = router
        self._dispatcher = dispatcher
        self._on_fatal = on_fatal

    def attach(self, client: mqtt.Client) -> mqtt.Client:
        """Point a new client's callbacks here; returns it."""
        client.on_connect = self.on_connect
        client.on_disconnect = self.on_disconnect
        client.on_connect_fail = self.on_connect_fail
        client.on_message = self.on_message
        client.on_pre_connect = self.on_pre_connect
        client.on_socket_register_write = self.on_register_write
        return client

    def on_pre_connect(self, client: mqtt.Client, userdata: object) -> None:
        """paho is about to open a new socket (the connector's connect, or its own
        reconnect after a drop): publishes wait until the CONNECT is queued."""
        self._state.hold(client)

    def on_register_write(self, client: mqtt.Client, userdata: object, sock: object) -> None:
        """paho queued a packet on an idle socket, which on a new one is the CONNECT: what
        was held follows it. (With this hook set, paho no longer writes from a publisher's
        thread before the network thread runs: that thread writes everything.)"""
        self._state.release(client, self.name)

    def _address(self) -> str:
        return self._clients.address(self._state.current())

    def on_connect(self, client: mqtt.Client, userdata: object, flags: mqtt.ConnectFlags,
                   reason: ReasonCode, properties: Properties | None) -> None:
        state = self._state
        handle = state.current()
        if client is not handle.client:
            return  # a client already replaced: what it says is no longer about us
        if reason.is_failure:
            failure = connection.connack_failure(reason.value)
            state.record(_Outcome(failure, "refused the connection: unsupported protocol version "
                                           f"({reason})" if failure is Failure.OLD_PROTOCOL
                                  else f"refused the connection: {reason}"))
            state.connack.set()
            return
        filters = self._router.filters()
        listeners = self._router.listeners()
        if filters and not self._clients.look_only:
            client.subscribe(filters)
        log.info("%s: connected to %s as %s (MQTT %s, session %s)", self.name, self._address(),
                 self._clients.client_id, handle.protocol, "resumed" if flags.session_present else "new")
        state.step(connection.Connected())
        state.epoch += 1
        state.connected.set()
        state.connack.set()
        self._dispatcher.tell(listeners, True, bool(flags.session_present))
        self._dispatcher.connected(bool(flags.session_present))

    def on_connect_fail(self, client: mqtt.Client, userdata: object) -> None:
        self._state.release(client, self.name)  # no CONNECT went out: held as paho would have them
        if client is not self._state.current().client:
            return
        self._reconnect_failed(client, _Outcome(Failure.UNREACHABLE, "connection failed"))

    def _reconnect_failed(self, client: mqtt.Client, outcome: _Outcome | None) -> None:
        """paho's own reconnect after a drop did not give a connection."""
        link, action = self._state.step(connection.ReconnectFailed())
        if link.phase is not connection.Phase.DOWN:
            return  # paho retrying a client the current round is about to replace
        if outcome is not None:
            self._state.record(outcome)
        if link.failures_here == 1:
            log.warning("%s: cannot reach the broker at %s; retrying", self.name, self._address())
        if isinstance(action, connection.Retarget):
            handle = self._state.retarget(action.address)
            log.warning("%s: trying the next broker address, %s", self.name, self._address())
            client.connect_async(**self._clients.connect_args(handle))

    def on_disconnect(self, client: mqtt.Client, userdata: object, flags: mqtt.DisconnectFlags,
                      reason: ReasonCode, properties: Properties | None) -> None:
        state = self._state
        state.release(client, self.name)
        handle = state.current()
        if client is not handle.client:
            return
        was = state.connected.is_set()
        state.connected.clear()
        if not state.connack.is_set():
            # Reached, and it said no without saying why (RabbitMQ to an MQTT 5 CONNECT).
            state.record(_Outcome(Failure.HUNG_UP, f"the broker hung up before answering the MQTT "
                                  f"{handle.protocol} CONNECT"
                                  + (" (set broker.protocol: 3.1.1 if it only speaks that)"
                                     if handle.protocol == "5" and self._clients.broker.protocol == "5" else "")))
            state.connack.set()
        else:
            # (A refusal is followed by a disconnect of paho's own: its reason would
            # hide the broker's, which says why; keep the broker's.)
            last = state.last_outcome()
            if was or last is None or not last.failure.refused:
                state.record(_Outcome(Failure.DROPPED, f"disconnected: {reason}"))
        if not was:
            if state.is_started():
                # paho's own reconnect reached an address that turned it away (hung up,
                # refused): as much a failed reconnect as finding nobody listening.
                self._reconnect_failed(client, None)
            return
        if not state.is_started():
            return
        self._dispatcher.tell(self._router.listeners(), False, False)
        self._dropped(client, reason)

    def _dropped(self, client: mqtt.Client, reason: ReasonCode) -> None:
        """A connection we had is gone, and not by our own stop."""
        taken_over = getattr(reason, "value", None) == connection.SESSION_TAKEN_OVER
        _, action = self._state.step(connection.Dropped(taken_over, random.random()))
        client_id = self._clients.client_id
        if isinstance(action, connection.GiveUp):
            self._fail(DuplicateIdentity(client_id, "the broker gave our session to a new connection "
                                                    "with the same client id" if action.taken_over else
                                         f"the broker dropped us {action.flaps} times right after "
                                         "connecting, as it does when two clients share an id"))
            return
        if taken_over:
            log.warning("%s: another client connected as %s; this node has held that identity, so it takes "
                        "it back (the newcomer gives up)", self.name, client_id)
        else:
            log.warning("%s: lost the broker at %s (%s); reconnecting", self.name, self._address(), reason)
        if isinstance(action, connection.Reconnect):
            # A quick first retry with jitter, so a restarted broker is back in use at once
            # without every device of the fleet arriving in the same millisecond.
            client.reconnect_delay_set(min_delay=action.first_s, max_delay=action.max_s)  # type: ignore[arg-type]

    def _fail(self, error: AgentError) -> None:
        if not self._state.set_fatal(error):
            return
        log.error("%s: %s", self.name, error)
        if self._on_fatal is not None:
            threading.Thread(target=self._on_fatal, args=(error,), name=f"{self.name}-fatal", daemon=True).start()

    def on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        message = Message(
            topic=msg.topic, payload=bytes(msg.payload), qos=msg.qos, retain=bool(msg.retain),
            dup=bool(msg.dup),
            response_topic=getattr(props, "ResponseTopic", None) if props else None,
            correlation_data=getattr(props, "CorrelationData", None) if props else None,
            expiry_left=getattr(props, "MessageExpiryInterval", None) if props else None,
        )
        # Matched once, here: the dispatcher runs the handlers subscribed when it arrived.
        self._dispatcher.deliver(message, self._router.matching(message.topic))


class Bus:
    """One MQTT connection with topic dispatch, owned by a node or an orchestrator: a
    facade over the link (``_Clients``, ``_LinkState``, ``_Connector``, ``_Callbacks``)
    and the router (``agent.router``)."""

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
        self.sync_topic = sync_topic  # only this client reads it: barrier() round trips
        self._router = Router(MQTTMatcher())
        self._dispatcher = Dispatcher(name, on_connect)
        self._barriers = Barriers()
        self._clients = _Clients(client_id, broker, persistent=persistent, will=will,
                                 reconnect_max_s=reconnect_max_s, max_packet_bytes=max_packet_bytes,
                                 look_only=look_only)
        link = Link.initial(len(broker.addresses), broker.protocol, reconnect_max_s)
        client = self._clients.new(link.protocol)
        self._state = _LinkState(name, _Handle(client, link.protocol, 0), link)
        callbacks = _Callbacks(name, self._clients, self._state, self._router, self._dispatcher, on_fatal)
        callbacks.attach(client)
        self._connector = _Connector(name, self._clients, self._state, callbacks)
        self.subscribe(sync_topic, self._barriers.on_sync)

    @property
    def epoch(self) -> int:
        """Successful connects so far: a change means we were cut off meanwhile."""
        return self._state.epoch

    @property
    def protocol(self) -> str:
        """The MQTT version of the client in use: "5" or "3.1.1"."""
        return self._state.current().protocol

    @property
    def address(self) -> str:
        return self._clients.address(self._state.current())

    @property
    def connected(self) -> bool:
        return self._state.connected.is_set()

    @property
    def fatal(self) -> AgentError | None:
        return self._state.fatal

    # lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Start connecting in the background; returns at once (the node's way). Until the
        first connection, every address (and both protocols, with auto) is tried in turn,
        at least once a second (first_connect_delay); after it, paho reconnects by itself."""
        self._dispatcher.start()
        self._connector.start()

    def connect(self, timeout: float) -> None:
        """Connect and wait for CONNACK; BrokerUnavailable if that cannot be had (the
        trigger's way). Every address and, with protocol auto, both versions are tried."""
        self._dispatcher.start()
        if self._connector.connect_once(timeout) is not None:
            self._dispatcher.stop()
            host, port = self.broker.addresses[0]
            raise BrokerUnavailable(host, port, self._connector.reasons, refused=self._connector.refused)

    def stop(self, final: Iterable[tuple[str, bytes, bool]] = (), timeout: float = 2.0, *,
             end_session: bool = False) -> None:
        """Publish ``final`` messages (topic, payload, retain), then disconnect cleanly.

        ``end_session`` tells the broker to drop our persistent session now rather than keep
        it for its expiry interval (a finished trigger has nothing more to receive)."""
        self._connector.stop(final, timeout, end_session)
        self._dispatcher.stop()

    # pub/sub --------------------------------------------------------------------------
    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1, *,
                  inline: bool = False) -> Subscription:
        """Route messages matching ``topic_filter`` to ``handler`` (kept across reconnects).

        ``inline=True`` runs the handler on paho's network thread instead of the dispatcher:
        only for handlers that do a few microseconds of non-blocking work (decode, reply,
        enqueue), where two thread hand-offs would cost more than the work itself.
        """
        sub = Subscription(topic_filter, handler, qos, inline)
        if self._router.add(sub) and self._state.connected.is_set():
            self._state.current().client.subscribe(topic_filter, qos=qos)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if self._router.remove(sub) and self._state.connected.is_set():
            self._state.current().client.unsubscribe(sub.topic_filter)

    def on_link(self, listener: LinkListener) -> Callable[[], None]:
        """Call ``listener(up, session_present)`` on every connect and disconnect (on the
        network thread: it must only queue). Returns a function that removes it."""
        return self._router.on_link(listener)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                expiry_s: float | None = None, response_topic: str | None = None,
                correlation_data: bytes | None = None) -> None:
        """Queue a message; with QoS 1 paho keeps it and resends it after a reconnect.
        The MQTT 5 properties are dropped on a 3.1.1 connection (their meaning is in the
        payload too)."""
        handle = self._state.current()  # one client and its protocol, even while it is being replaced
        props = None
        if handle.protocol == "5" and (expiry_s is not None or response_topic or correlation_data):
            props = mqtt5.publish_properties(None if expiry_s is None else expiry_interval(expiry_s),
                                             response_topic or None, correlation_data or None)
        state = self._state
        with state.gate:
            held = state.held_for(handle.client)
            if held is not None:  # it is connecting: after the CONNECT
                held.append((topic, payload, qos, retain, props))
                return
            handle.client.publish(topic, payload, qos=qos, retain=retain, properties=props)

    def publish_many(self, messages: Sequence[tuple[str, bytes]]) -> None:
        """Queue several messages, each at QoS 0, not retained and without properties (an
        auction's invitations): one write for all of them and one wake-up of paho's network
        thread (``mqtt5.queue_batch``), where ``publish`` each costs a wake-up, a hand-over of
        the interpreter between the threads and a write. Lost with the connection, as any
        QoS 0 message paho holds."""
        handle = self._state.current()
        packets = mqtt5.qos0_batch(messages, handle.protocol == "5") if len(messages) > 1 and mqtt5.BATCHABLE else None
        state = self._state
        with state.gate:
            held = state.held_for(handle.client)
            if held is not None:  # it is connecting: after the CONNECT
                held.extend((topic, payload, 0, False, None) for topic, payload in messages)
                return
            if packets is not None and mqtt5.queue_batch(handle.client, packets):
                return
            for topic, payload in messages:  # one, or a paho that takes them one at a time
                handle.client.publish(topic, payload, qos=0)

    def barrier(self, timeout: float) -> bool:
        """Round-trip one QoS 1 message through the broker.

        The broker sends a client its messages in order, so once this returns True every
        retained message of the subscriptions made before the call has been dispatched.
        """
        token, done = self._barriers.open()
        self.publish(self.sync_topic, token, qos=1)
        ok = done.wait(timeout)
        self._barriers.close(token)
        return ok


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
