"""The bus's paho-free half: who hears what, and the thread that tells them.

Theory of operation. ``Router`` keeps the subscriptions (an exact-topic dict first, then a
wildcard matcher the bus hands in, paho's ``MQTTMatcher``: only ``agent.bus`` imports
paho) and the link listeners. ``Dispatcher`` runs the handlers: an ``inline`` one at once
on the caller's thread (paho's network thread: the auction's few-microsecond hot path),
the rest on its own thread (``{name}-dispatch``) in arrival order, so paho's thread only
decodes and queues. A handler or listener that raises is logged and the loop carries on.
``Barriers`` are the tokens ``Bus.barrier`` waits to see come back on the sync topic.

Each class's lock guards its dicts only and is never held while a handler, a listener or
anything else outside runs, so a handler may subscribe, unsubscribe or publish.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

log = logging.getLogger("agent.bus")  # the bus's own lines, wherever the code lives

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
    expiry_left: int | None = None   # MQTT 5: the message expiry the broker had left for it


Handler = Callable[[Message], None]
LinkListener = Callable[[bool, bool], None]  # (up, session_present): network thread, queue only
L = TypeVar("L")


class Listeners(Generic[L]):
    """Callbacks added and removed from any thread; the owner calls a copy, outside any lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[L] = []

    def add(self, listener: L) -> Callable[[], None]:
        """Add ``listener``; returns a function that removes it (twice is harmless)."""
        with self._lock:
            self._items.append(listener)

        def remove() -> None:
            with self._lock:
                if listener in self._items:
                    self._items.remove(listener)
        return remove

    def now(self) -> list[L]:
        with self._lock:
            return list(self._items)


class Subscription:
    """A handle returned by ``Bus.subscribe``; pass it to ``Bus.unsubscribe``."""

    def __init__(self, topic_filter: str, handler: Handler, qos: int, inline: bool = False):
        self.topic_filter = topic_filter
        self.handler = handler
        self.qos = qos
        self.inline = inline


class Matcher(Protocol):
    """Wildcard topic filters to values (paho's ``MQTTMatcher``)."""

    def __setitem__(self, key: str, value: list[Subscription]) -> None: ...
    def __delitem__(self, key: str) -> None: ...
    def iter_match(self, topic: str) -> Iterator[list[Subscription]]: ...


def is_wild(topic_filter: str) -> bool:
    """Whether a filter has an MQTT wildcard (``+`` or ``#``)."""
    return "+" in topic_filter or "#" in topic_filter


class Router:
    """Topic filters to subscriptions, and the link listeners (any thread)."""

    def __init__(self, wild: Matcher):
        self._lock = threading.Lock()
        self._exact: dict[str, list[Subscription]] = {}
        self._wild = wild
        self._wild_filters: dict[str, list[Subscription]] = {}
        self._listeners: Listeners[LinkListener] = Listeners()

    def add(self, sub: Subscription) -> bool:
        """Route ``sub``'s filter to it; True when the filter is new (the broker must hear of it)."""
        wild = is_wild(sub.topic_filter)
        with self._lock:
            table = self._wild_filters if wild else self._exact
            first = sub.topic_filter not in table
            table.setdefault(sub.topic_filter, []).append(sub)
            if wild:
                self._wild[sub.topic_filter] = table[sub.topic_filter]
        return first

    def remove(self, sub: Subscription) -> bool:
        """Stop routing to ``sub``; True when it was its filter's last (the broker may drop it)."""
        wild = is_wild(sub.topic_filter)
        with self._lock:
            table = self._wild_filters if wild else self._exact
            subs = table.get(sub.topic_filter, [])
            if sub in subs:
                subs.remove(sub)
            last = not subs and sub.topic_filter in table
            if last:
                del table[sub.topic_filter]
                if wild:
                    del self._wild[sub.topic_filter]
        return last

    def filters(self) -> list[tuple[str, int]]:
        """Every filter with the QoS of its first subscription: what to re-subscribe on a connect."""
        with self._lock:
            return [(f, subs[0].qos) for f, subs in {**self._exact, **self._wild_filters}.items() if subs]

    def matching(self, topic: str) -> list[Subscription]:
        """The subscriptions a message on ``topic`` goes to, exact filters first."""
        with self._lock:
            subs = list(self._exact.get(topic, ()))
            for matched in self._wild.iter_match(topic):
                subs.extend(matched)
        return subs

    def on_link(self, listener: LinkListener) -> Callable[[], None]:
        """Add a link listener; returns a function that removes it."""
        return self._listeners.add(listener)

    def listeners(self) -> list[LinkListener]:
        """The link listeners now (call them outside the lock)."""
        return self._listeners.now()


# The dispatcher's queue: a message and the handlers it matched, a (re)connect (with
# session_present), or _STOP.
_Item = tuple[Message, list[Handler]] | tuple[bool, None] | None


class Dispatcher:
    """Runs handlers: inline ones on the caller's thread, the rest on ``{name}-dispatch``."""

    def __init__(self, name: str, on_connect: Callable[[bool], None] | None = None):
        """``on_connect(session_present)`` runs on the dispatcher after every connect."""
        self.name = name
        self._on_connect = on_connect
        self._inbox: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None  # set by the owner's thread only

    def start(self) -> None:
        """Start the thread, unless it runs already."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, daemon=True, name=f"{self.name}-dispatch")
            self._thread.start()

    def stop(self) -> None:
        """End the thread once what is queued has run (a handler may call this too)."""
        if self._thread is not None and self._thread.is_alive():
            self._inbox.put(_STOP)
            if threading.current_thread() is not self._thread:
                self._thread.join(timeout=5)
        self._thread = None

    def deliver(self, message: Message, subs: list[Subscription]) -> None:
        """Run the inline handlers now and queue the others, as matched when it arrived."""
        queued = []
        for sub in subs:
            if sub.inline:
                self.run(sub.handler, message)
            else:
                queued.append(sub.handler)
        if queued:
            self._inbox.put((message, queued))

    def connected(self, session_present: bool) -> None:
        """Queue the connect callback (after the messages that arrived before the connect)."""
        if self._on_connect is not None:
            self._inbox.put((session_present, None))

    def tell(self, listeners: list[LinkListener], up: bool, session_present: bool) -> None:
        """Call each link listener now (it must only queue); one that raises is logged."""
        for listener in listeners:
            try:
                listener(up, session_present)
            except Exception:
                log.exception("%s: link listener failed", self.name)

    def _loop(self) -> None:
        while True:
            item = self._inbox.get()
            if item is _STOP:
                return
            what, handlers = item
            if handlers is None:
                self.run(self._on_connect, what)  # a connect: what is session_present
                continue
            for handler in handlers:
                self.run(handler, what)

    def run(self, fn: Callable[..., None] | None, arg: object) -> None:
        """Call ``fn(arg)``; a handler's exception is logged, never raised."""
        if fn is None:
            return
        try:
            fn(arg)
        except Exception:  # a handler's bug must not stop the dispatcher
            log.exception("%s: handler %r failed on %r", self.name, fn, getattr(arg, "topic", arg))


class Barriers:
    """The tokens ``Bus.barrier`` has sent to its sync topic and waits to see come back."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[bytes, threading.Event] = {}

    def open(self) -> tuple[bytes, threading.Event]:
        """A new token, and the event set when it comes back."""
        token, done = secrets.token_bytes(8), threading.Event()
        with self._lock:
            self._waiting[token] = done
        return token, done

    def close(self, token: bytes) -> None:
        """Forget a token (it came back, or the wait timed out)."""
        with self._lock:
            self._waiting.pop(token, None)

    def on_sync(self, msg: Message) -> None:
        """The sync topic's handler: a token came back."""
        with self._lock:
            event = self._waiting.get(msg.payload)
        if event is not None:
            event.set()
