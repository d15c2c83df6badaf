"""When an auction's bid window closes, and how long each peer is waited for: pure rules.

Theory of operation. The roster (retained availability, synchronised with a broker round
trip) is the set of peers that must bid; in a fleet past ``auction.invite.above``, only
the devices invited (``agent.invite``). ``agent.mailroom`` gathers their bids and asks
``should_close`` (a pure function of the bids so far, the time and what is known of each
peer) whether the window closes. It closes at the first of:

- ``roster_complete``: every peer still online has bid (a Will that fires shrinks the
  set, if our own link is steady);
- ``decided``: a free NPU has bid and no peer still missing could offer one (pass 1
  picks a free NPU whatever the CPUs say), and a short grace has passed for the CPU
  bids that make the runner-ups (twice as long as it took, between 50 ms and 1 s);
- ``stragglers``: the only peers missing are ones that missed recent calls for bids (a
  frozen peer: online by keepalive, never bidding), and the others have been in for the
  same short grace — their late bids are still welcome until then; at once, without the
  grace, when every one of them has missed ``ABSENT_AFTER`` calls in a row (``absent``)
  and some bid is in: a peer frozen for good then costs later auctions nothing, where the
  grace cost each one 50 ms (bench --frozen: p50 12.6x the healthy fleet's). Its next
  bid, even a late one, makes it punctual again; with no bid in at all, the grace stays
  (the only chance a peer back from a reboot has to be heard);
- ``overdue``: at least one bid is in and every peer still missing is well past what its
  bids usually take (``patience``: its usual latency times 4, at least 1 s; 1 s for a
  peer never heard from), so a peer frozen since its last bid costs its first auction
  about a second, not the window, while a slow-but-alive peer on a bad link is waited
  for as long as it usually needs. With no bid in at all there is nothing to run, so
  the window stays open for whoever bids first;
- ``timeout``: ``bid_timeout_s``, the seed's upper bound (the waiting loop's, as is
  ``interrupted``: Ctrl-C).

What is known of each peer is learnt here too, as pure updates: ``missed`` counts the
calls in a row a device has missed (a bid clears its record), so a frozen peer costs one
auction, not every auction; ``averaged`` moves a device's usual bid latency (late bids
included: a peer on a slow link that missed one window gets a longer patience next
time). ``agent.bidtimes`` keeps both in ``state_dir``, shared by the device's processes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Set
from dataclasses import dataclass

from agent.messages import Bid

GRACE_MIN_S, GRACE_MAX_S = 0.05, 1.0
ABSENT_AFTER = 3  # calls missed in a row after which a suspect is not given the grace
# Patience with a missing peer, counted from the call. A frozen peer with no history costs
# PATIENCE_NEW_S; a peer on a slow link is waited for PATIENCE_FACTOR times its usual
# bid latency (a bad moment on a slow link is a few times its usual, not ten), never less
# than PATIENCE_FLOOR_S (a healthy peer on a loaded 2-core board can stall that long) and
# never more than PATIENCE_MAX_S (one outlier does not make a frozen peer cost the window).
PATIENCE_NEW_S, PATIENCE_FLOOR_S, PATIENCE_FACTOR, PATIENCE_MAX_S = 1.0, 1.0, 4.0, 10.0
LATENCY_WEIGHT = 0.3  # of the newest bid in the moving average: after one slower bid, 4 x 0.3 of it is waited for


def decided(*, expected: set[str], bids: Mapping[str, Bid], may_have_free_npu: Callable[[str], bool],
            need: str) -> bool:
    """Whether the winner is known whatever the missing peers say: a free NPU is in and
    none of them could offer one (or, for an NPU-only job, none of them could run it)."""
    missing = expected - bids.keys()
    if any(may_have_free_npu(d) for d in missing):
        return False
    return need == "npu" or any(b.snapshot.has_npu and b.snapshot.npu_free for b in bids.values())


def should_close(*, expected: set[str], suspects: set[str], bids: Mapping[str, Bid], now: float, opened: float,
                 punctual_at: float | None, decided_at: float | None,
                 patience: Mapping[str, float] | None = None, absent: Set[str] = frozenset()) -> str | None:
    """Why the bid window closes now, or None to keep waiting (see the module docstring).
    ``punctual_at``: when every expected peer but the suspects had bid; ``decided_at``:
    when the winner became known (``decided``); ``patience``: how long after the call
    each peer is waited for (``patience()`` of its usual latency; absent: a newcomer's),
    None for no such limit; ``absent``: the suspects that missed ``ABSENT_AFTER`` calls or
    more in a row (``absent()``)."""
    missing = expected - bids.keys()
    if not missing:
        return "roster_complete"
    if decided_at is not None and now >= decided_at + grace(decided_at - opened):
        return "decided"
    # Without the grace only once someone has bid: with every expected peer absent, that
    # grace is the only chance a peer back from a reboot has to bid and be punctual again.
    if missing <= suspects and punctual_at is not None \
            and ((bids and missing <= absent) or now >= punctual_at + grace(punctual_at - opened)):
        return "stragglers"
    if patience is not None and bids and now >= overdue_at(missing, opened, patience):
        return "overdue"
    return None


def first_overdue(expected: Iterable[str], opened: float, patience: Mapping[str, float]) -> float:
    """The earliest the ``overdue`` rule could close: when the least patience among the
    expected peers runs out (no set of missing peers is overdue sooner)."""
    return opened + min((patience.get(d, PATIENCE_NEW_S) for d in expected), default=PATIENCE_NEW_S)


def wake_at(*, now: float, opened: float, until: float, punctual_at: float | None, decided_at: float | None,
            missing: Set[str], any_bid: bool, patience: Mapping[str, float] | None) -> float:
    """When the waiting loop must look again by itself (``until``: its own deadline or next
    progress line): a grace running out, or the ``overdue`` rule becoming possible. The
    bids that could close the window wake it apart from this (``mailroom.BidBook``); the
    first bid only once ``first_overdue`` has passed, so a burst of bids wakes it once."""
    at = until
    for since in (punctual_at, decided_at):
        if since is not None:
            at = min(at, since + grace(since - opened))
    if patience is not None:
        if any_bid:
            at = min(at, overdue_at(missing, opened, patience))
        else:
            first = first_overdue(missing, opened, patience)
            if now < first:  # a bid before then may have come without waking us
                at = min(at, first)
    return at


def overdue_at(missing: Iterable[str], opened: float, patience: Mapping[str, float]) -> float:
    """When every one of ``missing`` is past its patience (the ``overdue`` rule)."""
    return opened + max((patience.get(d, PATIENCE_NEW_S) for d in missing), default=0.0)


def patience(usual_s: float | None) -> float:
    """How long after the call a peer whose bids usually take ``usual_s`` is waited for
    (None: never heard from)."""
    if usual_s is None:
        return PATIENCE_NEW_S
    return min(max(PATIENCE_FACTOR * usual_s, PATIENCE_FLOOR_S), PATIENCE_MAX_S)


def grace(punctual_took: float) -> float:
    """How long late bids from suspects are awaited once the punctual peers are in."""
    return min(max(2 * punctual_took, GRACE_MIN_S), GRACE_MAX_S)


def absent(missed_in_a_row: Mapping[str, int]) -> set[str]:
    """The peers not given the stragglers' grace: ``ABSENT_AFTER`` calls or more missed in a row."""
    return {d for d, n in missed_in_a_row.items() if n >= ABSENT_AFTER}


def missed(before: Mapping[str, int], expected: Iterable[str], bidders: Iterable[str]) -> dict[str, int]:
    """After an auction: how many calls in a row each device has missed, up to
    ``ABSENT_AFTER`` (no rule tells more from more, and a count that no longer moves is not
    rewritten after every auction while a peer stays frozen). Those who bid are punctual
    again, the expected ones that did not missed one more."""
    bid = set(bidders)
    after = {d: n for d, n in before.items() if d not in bid}
    for device in set(expected) - bid:
        after[device] = min(before.get(device, 0) + 1, ABSENT_AFTER)
    return after


def averaged(usual_s: float | None, seconds: float) -> float:
    """A device's usual bid latency after one more bid took ``seconds`` (None: its first)."""
    return round(seconds if usual_s is None else usual_s + LATENCY_WEIGHT * (seconds - usual_s), 4)


@dataclass(frozen=True)
class AuctionResult:
    bids: dict[str, Bid]
    roster: tuple[str, ...]
    auction_ms: float
    closing: str                   # roster_complete | decided | stragglers | overdue | timeout | interrupted
    missing: tuple[str, ...] = ()  # expected peers that did not bid
    invited: tuple[str, ...] | None = None  # the devices invited (agent.invite); None: everyone was called


