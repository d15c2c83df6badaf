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

Connections are MQTT 5 with ``TCP_NODELAY`` on the socket (paho leaves Nagle on, which
costs ~40 ms a hop on loopback through delayed ACKs). A persistent client sends
``clean_start=False`` and a ``SessionExpiryInterval`` on *every* connect, so the broker
queues QoS 1 messages while it is away. Every subscription is re-sent after each
connect; paho reconnects by itself with exponential backoff.
"""

from __future__ import annotations

import logging
import queue
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
from agent.errors import BrokerUnavailable, ConfigError

log = logging.getLogger(__name__)


class _DropShutdownRace(logging.Filter):
    """paho 2.2's loop thread can log "Client is not connected" at ERROR right after a
    clean disconnect(); it is a harmless race, not an error of ours."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Client is not connected")


_paho_log = logging.getLogger("agent.bus.paho")
_paho_log.addFilter(_DropShutdownRace())

_STOP = None  # on the dispatcher's queue: the dispatcher exits


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


Handler = Callable[[Message], None]
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
                 reconnect_max_s: int = 30):
        self.client_id = client_id
        self.broker = broker
        self.persistent = persistent
        self.name = name
        self._on_connect_cb = on_connect
        self._connected = threading.Event()
        self._connack = threading.Event()  # any CONNACK, success or refusal
        self.epoch = 0  # successful connects so far: a change means we were cut off meanwhile
        self._lock = threading.Lock()
        self._exact: dict[str, list[Subscription]] = {}
        self._wild = MQTTMatcher()
        self._wild_filters: dict[str, list[Subscription]] = {}
        self._inbox: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._barriers: dict[bytes, threading.Event] = {}
        self.sync_topic = sync_topic  # only this client reads it: barrier() round trips
        self._dispatcher: threading.Thread | None = None
        self._started = False
        self._last_error = "no connection attempt yet"

        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=mqtt.MQTTv5, reconnect_on_failure=True)
        client.enable_logger(_paho_log)
        client.reconnect_delay_set(min_delay=1, max_delay=reconnect_max_s)
        client.max_queued_messages_set(10_000)
        client.on_socket_open = set_nodelay
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_connect_fail = self._handle_connect_fail
        client.on_message = self._handle_message
        if broker.username:
            client.username_pw_set(broker.username, read_password(broker.password_file))
        if broker.tls.enabled:
            try:
                client.tls_set(ca_certs=broker.tls.ca_file, certfile=broker.tls.cert_file,
                               keyfile=broker.tls.key_file)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                raise ConfigError("broker.tls", [f"broker.tls: cannot load the TLS files: {exc}"]) from None
        if will is not None:
            client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        self._client = client
        self.subscribe(sync_topic, self._handle_sync)

    # lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Start connecting in the background; returns at once (the node's way)."""
        self._start_dispatcher()
        props = Properties(PacketTypes.CONNECT)
        if self.persistent:
            props.SessionExpiryInterval = self.broker.session_expiry_s
        self._client.connect_async(self.broker.host, self.broker.port, self.broker.keepalive_s,
                                   clean_start=not self.persistent, properties=props)
        self._client.loop_start()
        self._started = True

    def connect(self, timeout: float) -> None:
        """Connect and wait for CONNACK; raise BrokerUnavailable (the trigger's way)."""
        self._start_dispatcher()
        self._client.connect_timeout = max(0.1, timeout)
        props = Properties(PacketTypes.CONNECT)
        if self.persistent:
            props.SessionExpiryInterval = self.broker.session_expiry_s
        try:
            self._client.connect(self.broker.host, self.broker.port, self.broker.keepalive_s,
                                 clean_start=not self.persistent, properties=props)
        except (OSError, ValueError) as exc:
            self._stop_dispatcher()
            raise BrokerUnavailable(self.broker.host, self.broker.port, _describe(exc)) from None
        self._client.loop_start()
        self._started = True
        self._connack.wait(timeout)
        if not self._connected.is_set():
            reason = self._last_error if self._connack.is_set() else f"no answer within {timeout:g} s"
            self.stop()
            raise BrokerUnavailable(self.broker.host, self.broker.port, reason)

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def stop(self, final: Iterable[tuple[str, bytes, bool]] = (), timeout: float = 2.0, *,
             end_session: bool = False) -> None:
        """Publish ``final`` messages (topic, payload, retain), then disconnect cleanly.

        ``end_session`` tells the broker to drop our persistent session now rather than keep
        it for its expiry interval (a finished trigger has nothing more to receive)."""
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
            if end_session and self.persistent:
                props = Properties(PacketTypes.DISCONNECT)
                props.SessionExpiryInterval = 0
            self._client.disconnect(properties=props)
            self._client.loop_stop()
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

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                expiry_s: float | None = None, response_topic: str | None = None,
                correlation_data: bytes | None = None) -> None:
        """Queue a message; with QoS 1 paho keeps it and resends it after a reconnect."""
        props = None
        if expiry_s is not None or response_topic or correlation_data:
            props = Properties(PacketTypes.PUBLISH)
            if expiry_s is not None:
                props.MessageExpiryInterval = max(1, int(expiry_s + 0.999))
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
            self._last_error = f"broker refused the connection: {reason}"
            log.warning("%s: %s", self.name, self._last_error)
            self._connack.set()
            return
        with self._lock:
            filters = [(f, subs[0].qos) for f, subs in {**self._exact, **self._wild_filters}.items() if subs]
        if filters:
            client.subscribe(filters)
        log.info("%s: connected to %s:%d as %s (session %s)", self.name, self.broker.host,
                 self.broker.port, self.client_id, "resumed" if flags.session_present else "new")
        self.epoch += 1
        self._connected.set()
        self._connack.set()
        if self._on_connect_cb is not None:
            self._inbox.put((bool(flags.session_present), None))

    def _handle_connect_fail(self, client: mqtt.Client, userdata: object) -> None:
        # paho retries with exponential backoff (1 s up to reconnect_max_s): one line each.
        self._last_error = "connection failed"
        log.warning("%s: cannot reach the broker at %s:%d; retrying", self.name, self.broker.host,
                    self.broker.port)

    def _handle_disconnect(self, client: mqtt.Client, userdata: object,
                           flags: mqtt.DisconnectFlags, reason: ReasonCode,
                           properties: Properties | None) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        self._last_error = f"disconnected: {reason}"
        if was and self._started:
            log.warning("%s: lost the broker (%s); reconnecting", self.name, reason)

    def _handle_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        message = Message(
            topic=msg.topic, payload=bytes(msg.payload), qos=msg.qos, retain=bool(msg.retain),
            dup=bool(msg.dup),
            response_topic=getattr(props, "ResponseTopic", None) if props else None,
            correlation_data=getattr(props, "CorrelationData", None) if props else None,
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
