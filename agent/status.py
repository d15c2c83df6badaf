"""The operator's view of the fleet: one row per device the broker knows of, what this
device has learnt of each, and the table ``status`` prints. Nothing here talks to the
broker or reads a file: the roster and the learnt arms are handed in (``cmd_status``, the
node's control socket); ``fleet.forget`` clears a retired device."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from agent.clock import ClockOffsets
from agent.messages import Metrics

if TYPE_CHECKING:
    from agent.linucb import Arm


class Known(Protocol):
    """What the operator's view reads of a roster (``roster.Roster``)."""

    offsets: ClockOffsets

    def known(self) -> dict[str, bool]: ...

    def metrics(self) -> dict[str, Metrics]: ...

# The reference job of the ESTIMATE column: a short prompt, a paragraph of answer.
REFERENCE_PROMPT_TOKENS, REFERENCE_NEW_TOKENS = 64, 256


def rows(roster: Known, now: float) -> list[dict[str, Any]]:
    """Every device, online or not, with what its last metrics said. Ages are corrected
    by the measured offset of the device's clock when there is one."""
    known, metrics = roster.known(), roster.metrics()
    out = []
    for dev in sorted(set(known) | set(metrics)):
        m = metrics.get(dev)
        s = m.snapshot if m else None
        offset = roster.offsets.offset(dev) or 0.0
        out.append({
            "device": dev, "online": known.get(dev, False),
            "npu": None if s is None or not s.has_npu else ("free" if s.npu_free else "busy"),
            "cpu_slots": s.cpu_slots if s else None, "cpu_percent": s.cpu_percent if s else None,
            "mem_available_mb": s.mem_available_mb if s else None,
            "queue_depth": s.queue_depth if s else None,
            "backlog_s": s.backlog_s if s else None,
            "last_latency_ms": m.last_latency_ms if m else None,
            "health": m.health if m else None,
            "models": {mode: {"name": i.name, "aliases": list(i.aliases), "warm": i.warm, "context": i.context,
                              "tools": i.tools}
                       for mode, i in s.models.items()} if s else {},
            "metrics_age_s": round(max(now - (m.ts + offset), 0.0), 1) if m else None,
        })
    return out


def estimates(devices: list[dict[str, Any]], arms: Mapping[str, Arm], lam: float) -> list[dict[str, Any]]:
    """Add what this device's LinUCB arms (``armstore.learnt``; ``lam``: their ridge) have
    learnt about each device's CPU for a reference job (``estimate_s``: how many seconds
    later (+) or sooner (−) than the device's own promise its answers reach this device) and
    how many jobs taught it (``learnt_jobs``); None when there is nothing learnt."""
    from agent.linucb import features  # numpy: only when the estimates are asked for
    from agent.messages import Snapshot

    out = []
    for row in devices:
        arm = arms.get(row["device"])
        estimate = None
        if arm is not None and arm.n:
            snap = Snapshot(has_npu=False, npu_free=False, cpu_slots=row["cpu_slots"] or 0,
                            cpu_percent=row["cpu_percent"] or 0.0, mem_available_mb=row["mem_available_mb"] or 0.0,
                            load1=0.0, queue_depth=row["queue_depth"] or 0)
            mean, _ = arm.predict(features(snap, REFERENCE_PROMPT_TOKENS, REFERENCE_NEW_TOKENS), lam)
            estimate = round(mean, 2)
        out.append({**row, "estimate_s": estimate, "learnt_jobs": arm.n if arm is not None else 0})
    return out


def table(devices: list[dict[str, Any]]) -> list[str]:
    """The rows as aligned text lines, a header first; offline devices marked with '!'."""
    lines = [f"{'DEVICE':<21} {'STATE':<8} {'NPU':<5} {'CPU%':>5} {'MEM MB':>8} {'QUEUE':>5} {'WAIT S':>6} "
             f"{'LAST MS':>8} {'EST S':>6} {'AGE S':>6}  {'HEALTH':<8} MODELS (* warm)"]

    def fmt(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    for r in devices:
        name = r["device"] if r["online"] else f"!{r['device']}"
        lines.append(f"{name:<21} {'online' if r['online'] else 'offline':<8} {r['npu'] or '-':<5} "
                     f"{fmt(r['cpu_percent'], '.0f'):>5} {fmt(r['mem_available_mb'], '.0f'):>8} "
                     f"{fmt(r['queue_depth'], 'd'):>5} {fmt(r['backlog_s'], '.1f'):>6} "
                     f"{fmt(r['last_latency_ms'], '.0f'):>8} {fmt(r.get('estimate_s'), '.2f'):>6} "
                     f"{fmt(r['metrics_age_s'], '.0f'):>6}  {r['health'] or '-':<8} {_models(r.get('models'))}")
    return lines


def _models(models: dict[str, Any] | None) -> str:
    if not models:
        return "-"
    return " ".join(f"{mode}:{m['name']}{'*' if m.get('warm') else ''}" for mode, m in sorted(models.items()))
