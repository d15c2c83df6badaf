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

from agent.config import BrokerConfig
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
RECONNECT_FIRST_S = (0.05, 0.3)   # first retry after a drop: uniformly in this range
SESSION_TAKEN_OVER = 142           # MQTT 5 DISCONNECT reason code
UNSUPPORTED_PROTOCOL = (132, 1)    # MQTT 5 CONNACK reason code; 3.1.1 return code
FLAP_WINDOW_S = 2.0                # dropped this soon after a connect ...
FLAP_LIMIT = 4                     # ... this many times in a row: someone else has our client id
PACKET_OVERHEAD = 4096             # topic, properties and headers on top of the payload limit
# Until the first connection a refused attempt costs nothing (the broker is simply not up
# yet: a board that boots before it, after a power cut), so try often: a broker that
# appears is in use within a second.
FIRST_CONNECT_MAX_S = 1.0
CONNECT_ATTEMPT_S = 5.0            # the background connector's wait for one CONNACK


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
        self._started = False
        self._last_error = "no connection attempt yet"
        self._refused = False
        self._address = 0
        self._failures_here = 0
        self._connected_at = 0.0
        self._established = False  # has held a connection for longer than a flap
        self._flaps = 0
        self._fatal: AgentError | None = None
        self._stopping = threading.Event()
        self._connector: threading.Thread | None = None
        self._reasons = ""
        self.protocol = "5" if broker.protocol in ("auto", "5") else "3.1.1"
        self._password = read_password(broker.password_file) if broker.username else None
        self._client = self._new_client()
        self._client_used = False  # paho cannot re-aim a client after a connect attempt
        self.subscribe(sync_topic, self._handle_sync)

    # client -------------------------------------------------------------------------
    def _new_client(self) -> mqtt.Client:
        v5 = self.protocol == "5"
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

    def _connect_args(self) -> dict[str, Any]:
        host, port = self.broker.addresses[self._address]
        args: dict[str, Any] = {"host": host, "port": port, "keepalive": self.broker.keepalive_s}
        if self.protocol == "5":
            props = Properties(PacketTypes.CONNECT)
            if self.persistent:
                props.SessionExpiryInterval = self.broker.session_expiry_s
            if self.max_packet_bytes:
                props.MaximumPacketSize = self.max_packet_bytes + PACKET_OVERHEAD
            args.update(clean_start=not self.persistent, properties=props)
        return args

    @property
    def address(self) -> str:
        host, port = self.broker.addresses[self._address]
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
        attempt = 0
        said = ""
        while not self._stopping.is_set():
            try:
                if self._connect_once(CONNECT_ATTEMPT_S):
                    return
            except Exception as exc:  # never let the connector die quietly: a node would look alive
                log.exception("%s: connect attempt failed unexpectedly; retrying", self.name)
                self._last_error = self._reasons = _describe(exc)
            if self._last_error != said:  # once per distinct reason, not once per retry
                said = self._last_error
                log.warning("%s: %s; retrying", self.name, self._reasons)
            if self._stopping.wait(first_connect_delay(attempt, random.random())):
                return
            attempt += 1

    def connect(self, timeout: float) -> None:
        """Connect and wait for CONNACK; BrokerUnavailable if that cannot be had (the
        trigger's way). Every address and, with protocol auto, both versions are tried."""
        self._start_dispatcher()
        if not self._connect_once(timeout):
            self._stop_dispatcher()
            host, port = self.broker.addresses[0]
            raise BrokerUnavailable(host, port, self._reasons, refused=self._refused)

    def _connect_once(self, timeout: float) -> bool:
        """One round over the addresses (and protocols); True once connected."""
        deadline = time.monotonic() + timeout
        reasons = []
        self._address = 0
        for _ in range(2 * len(self.broker.addresses)):
            left = deadline - time.monotonic()
            if left <= 0 or self._stopping.is_set():
                break
            if self._try_connect(left):
                return True
            reasons.append(f"{self.address}: {self._last_error}" if len(self.broker.addresses) > 1
                           else self._last_error)
            if self._unsupported_protocol() and self._fall_back_to_311():
                continue
            if self._address + 1 < len(self.broker.addresses):
                self._address += 1
                self._replace_client()
                continue
            break
        self._reasons = "; ".join(reasons) or f"no answer within {timeout:g} s"
        return False

    def _replace_client(self) -> None:
        _close_sockets(self._client)
        self._client = self._new_client()
        self._client_used = False

    def _try_connect(self, timeout: float) -> bool:
        self._connack.clear()
        self._refused = False
        if self._client_used:
            # A paho client that has tried once refuses a new connect timeout (and keeps
            # the failed attempt's state): each attempt gets a fresh one.
            self._replace_client()
        self._client_used = True
        self._client.connect_timeout = max(0.1, timeout)
        try:
            self._client.connect(**self._connect_args())
        except (OSError, ValueError) as exc:
            self._last_error = _describe(exc)
            return False
        self._client.loop_start()
        self._started = True
        if not self._connack.wait(timeout) and not self._last_error.startswith("disconnected"):
            self._last_error = f"no answer within {timeout:g} s"
        if self._connected.is_set():
            return True
        self._started = False
        self._client.disconnect()
        self._client.loop_stop()
        _close_sockets(self._client)
        return False

    def _unsupported_protocol(self) -> bool:
        return self.protocol == "5" and self.broker.protocol == "auto" and (
            "nsupported protocol" in self._last_error or "hung up" in self._last_error)

    def _fall_back_to_311(self) -> bool:
        if self.protocol != "5" or self.broker.protocol != "auto":
            return False
        log.warning("%s: the broker at %s does not take MQTT 5 (%s); using MQTT 3.1.1", self.name, self.address,
                    self._last_error)
        self.protocol = "3.1.1"
        self._replace_client()
        return True

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
        if self._started:
            self._started = False  # from here on a disconnect is ours, not a lost broker
            infos = []
            if self._connected.is_set():
                for topic, payload, retain in final:
                    infos.append(self._client.publish(topic, payload, qos=1, retain=retain))
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
            self._client.disconnect(properties=props)
            self._client.loop_stop()
        _close_sockets(self._client)
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
            self._client.subscribe(topic_filter, qos=qos)
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
            self._client.unsubscribe(sub.topic_filter)

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
        props = None
        if self.protocol == "5" and (expiry_s is not None or response_topic or correlation_data):
            props = Properties(PacketTypes.PUBLISH)
            if expiry_s is not None:
                props.MessageExpiryInterval = expiry_interval(expiry_s)
            if response_topic:
                props.ResponseTopic = response_topic
            if correlation_data:
                props.CorrelationData = correlation_data
        self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)

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
        if reason.is_failure:
            self._refused = True
            self._last_error = f"refused the connection: {reason}"
            if reason.value in UNSUPPORTED_PROTOCOL:
                self._last_error = f"refused the connection: unsupported protocol version ({reason})"
            self._connack.set()
            return
        with self._lock:
            filters = [(f, subs[0].qos) for f, subs in {**self._exact, **self._wild_filters}.items() if subs]
            listeners = list(self._link_listeners)
        if filters and not self.look_only:
            client.subscribe(filters)
        log.info("%s: connected to %s as %s (MQTT %s, session %s)", self.name, self.address, self.client_id,
                 self.protocol, "resumed" if flags.session_present else "new")
        self.epoch += 1
        self._failures_here = 0
        self._connected_at = time.monotonic()
        self._connected.set()
        self._connack.set()
        for listener in listeners:
            self._run_listener(listener, True, bool(flags.session_present))
        if self._on_connect_cb is not None:
            self._inbox.put((bool(flags.session_present), None))

    def _handle_connect_fail(self, client: mqtt.Client, userdata: object) -> None:
        self._last_error = "connection failed"
        self._failures_here += 1
        if self._failures_here == 1:
            log.warning("%s: cannot reach the broker at %s; retrying", self.name, self.address)
        self._next_address_if_stuck()

    def _handle_disconnect(self, client: mqtt.Client, userdata: object,
                           flags: mqtt.DisconnectFlags, reason: ReasonCode,
                           properties: Properties | None) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if not self._connack.is_set():
            # Reached, and it said no without saying why (RabbitMQ to an MQTT 5 CONNECT).
            self._last_error = (f"the broker hung up before answering the MQTT {self.protocol} CONNECT"
                                + (" (set broker.protocol: 3.1.1 if it only speaks that)"
                                   if self.protocol == "5" and self.broker.protocol == "5" else ""))
            self._refused = True
            self._connack.set()
        elif not (self._refused and not was):
            # (A refusal is followed by a disconnect of paho's own: its reason would
            # hide the broker's, which says why; keep the broker's.)
            self._last_error = f"disconnected: {reason}"
        if not (was and self._started):
            return
        with self._lock:
            listeners = list(self._link_listeners)
        for listener in listeners:
            self._run_listener(listener, False, False)
        taken_over = getattr(reason, "value", None) == SESSION_TAKEN_OVER
        held_s = time.monotonic() - self._connected_at
        verdict, self._flaps, self._established = identity_verdict(
            taken_over=taken_over, held_s=held_s, flaps=self._flaps, established=self._established)
        if verdict == "give_up":
            self._fail(DuplicateIdentity(self.client_id, "the broker gave our session to a new connection "
                                                         "with the same client id" if taken_over else
                                         f"the broker dropped us {self._flaps} times right after "
                                         "connecting, as it does when two clients share an id"))
            return
        if taken_over:
            log.warning("%s: another client connected as %s; this node has held that identity, so it takes "
                        "it back (the newcomer gives up)", self.name, self.client_id)
        else:
            log.warning("%s: lost the broker at %s (%s); reconnecting", self.name, self.address, reason)
        # A quick first retry with jitter, so a restarted broker is back in use at once
        # without every device of the fleet arriving in the same millisecond.
        client.reconnect_delay_set(min_delay=random.uniform(*RECONNECT_FIRST_S),  # type: ignore[arg-type]
                                   max_delay=self.reconnect_max_s)  # type: ignore[arg-type]

    def _next_address_if_stuck(self) -> None:
        if len(self.broker.addresses) > 1 and self._failures_here >= 2:
            self._address = (self._address + 1) % len(self.broker.addresses)
            self._failures_here = 0
            log.warning("%s: trying the next broker address, %s", self.name, self.address)
            self._client.connect_async(**self._connect_args())

    def _fail(self, error: AgentError) -> None:
        if self._fatal is not None:
            return
        self._fatal = error
        log.error("%s: %s", self.name, error)
        if self._on_fatal is not None:
            threading.Thread(target=self._on_fatal, args=(error,), name=f"{self.name}-fatal", daemon=True).start()

    @property
    def fatal(self) -> AgentError | None:
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


def identity_verdict(*, taken_over: bool, held_s: float, flaps: int, established: bool) -> tuple[str, int, bool]:
    """After a disconnect: ``give_up`` (another live node is this device) or ``reconnect``;
    then the count of quick drops in a row and whether this node is established.

    Two processes with one client id see the same disconnects, so a symmetric rule lets
    either lose, and the one that loses may be the device that had run for weeks (its unit
    does not restart on exit 2). So only a newcomer gives up: a node that has never held a
    connection longer than FLAP_WINDOW_S. An established node reconnects, which takes the
    identity back, and the newcomer is then the one dropped. ``taken_over``: the broker
    said another connection took our session (MQTT 5); with MQTT 3.1.1 the only sign is
    being dropped right after connecting, FLAP_LIMIT times in a row.
    """
    quick = held_s < FLAP_WINDOW_S
    established = established or not quick
    flaps = flaps + 1 if quick else 0
    if not established and (taken_over or flaps >= FLAP_LIMIT):
        return "give_up", flaps, established
    return "reconnect", flaps, established


def first_connect_delay(attempt: int, u: float) -> float:
    """Wait before connect attempt ``attempt + 1`` when none has succeeded yet: doubling
    from the first reconnect delay up to FIRST_CONNECT_MAX_S, jittered by ``u`` in [0, 1)
    so that a fleet powered on together does not knock in step."""
    ceiling: float = min(RECONNECT_FIRST_S[1] * 2.0 ** min(attempt, 16), FIRST_CONNECT_MAX_S)
    return (0.5 + 0.5 * u) * ceiling


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
