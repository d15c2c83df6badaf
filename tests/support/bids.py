"""Small bids for the auction and mailroom tests: a device's snapshot and its bid."""

from __future__ import annotations

from agent.messages import Bid, Snapshot


def snap(*, npu: bool = False, free: bool = False) -> Snapshot:
    return Snapshot(has_npu=npu, npu_free=free, cpu_slots=1, cpu_percent=0.0, mem_available_mb=1000.0, load1=0.0,
                    queue_depth=0)


def bid(device: str, *, rid: str = "r1", origin: str = "hub", npu: bool = False, free: bool = False) -> Bid:
    return Bid(rid=rid, device=device, origin=origin, claim=f"claim-{device}", snapshot=snap(npu=npu, free=free))
