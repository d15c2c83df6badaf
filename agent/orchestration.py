"""What the parts of one orchestration share: the request, the wire it runs over, the hooks.

``agent.orchestrator`` composes the parts — ``auctioneer`` (the call and the bids),
``delivery`` (the walk down the ranking: a peer or this process), ``learner`` (the arms) —
and hands each what it needs of these; none of them knows the orchestrator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from agent.executors import estimate_tokens
from agent.messages import BidRequest, Chat
from agent.outcome import Decided

if TYPE_CHECKING:  # the bus (and paho) only when an auction connects: not on the local NPU path
    from agent.fleet import Fleet
    from agent.mailroom import Inbox

PROGRESS_EVERY_S = 1.0
STEADY_CHECK_S = 0.5  # one broker round trip takes < 1 ms; a broker going away, no answer


@dataclass(frozen=True)
class Request:
    rid: str
    prompt: str
    max_new_tokens: int
    need: str
    dry_run: bool
    model: str | None = None
    temperature: float | None = None
    chat: Chat | None = None   # a conversation; ``prompt`` is then its transcript

    @property
    def tools(self) -> bool:
        return self.chat is not None and bool(self.chat.tools)

    def call(self, origin: str, window_s: float, sent_at: float) -> BidRequest:
        """The call for bids on this prompt (to everyone, an invitee, or a device asked again)."""
        return BidRequest(rid=self.rid, origin=origin, window_s=window_s, sent_at=round(sent_at, 3),
                          prompt_tokens=estimate_tokens(self.prompt), max_new_tokens=self.max_new_tokens,
                          need=self.need, model=self.model, tools=self.tools)


class Hooks(Protocol):
    """What the caller hears while a prompt runs, read at each call: ``serve`` swaps them
    on a warm orchestrator between requests."""

    on_token: Callable[[str], None]
    on_decision: Callable[[Decided], None]
    on_progress: Callable[[str], None]


@dataclass(frozen=True)
class Wire:
    """The connection one run dispatches over."""

    fleet: Fleet
    inbox: Inbox
    epoch: int  # the bus's connection count when the run began (see steady)

    def steady(self) -> bool:
        """Is our own link to the broker sound, as it was when this run began?

        A Will alone is ambiguous: on shutdown Mosquitto delivers every client's Will to the
        clients still connected. One round trip on the same connection tells a dead peer
        (act now) from a broker that is going away (every node will come back)."""
        bus = self.fleet.bus
        return (bus.connected and bus.epoch == self.epoch
                and bus.barrier(STEADY_CHECK_S) and bus.epoch == self.epoch)

    def offline(self, device: str) -> bool:
        """Has ``device``'s Will fired (and our own link is sound, so it is not a broker
        going away)? Its modes are not tried while it is offline."""
        return self.fleet.roster.known().get(device) is False and self.steady()

    def models(self) -> set[str]:
        """Every model name an online device announces."""
        online = self.fleet.roster.online()
        return {info.name for device, m in self.fleet.roster.metrics().items() if device in online
                for info in m.snapshot.models.values()}
