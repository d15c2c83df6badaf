"""The operator's view of the fleet: one row per device the broker knows of."""

from __future__ import annotations

from typing import Any

from agent.roster import Roster


def rows(roster: Roster, now: float) -> list[dict[str, Any]]:
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
            "metrics_age_s": round(max(now - (m.ts + offset), 0.0), 1) if m else None,
        })
    return out


def table(devices: list[dict[str, Any]]) -> list[str]:
    """The rows as aligned text lines, a header first."""
    lines = [f"{'DEVICE':<20} {'STATE':<8} {'NPU':<5} {'CPU%':>5} {'MEM MB':>8} {'QUEUE':>5} {'WAIT S':>6} "
             f"{'LAST MS':>8} {'AGE S':>6}  HEALTH"]

    def fmt(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    for r in devices:
        lines.append(f"{r['device']:<20} {'online' if r['online'] else 'offline':<8} {r['npu'] or '-':<5} "
                     f"{fmt(r['cpu_percent'], '.0f'):>5} {fmt(r['mem_available_mb'], '.0f'):>8} "
                     f"{fmt(r['queue_depth'], 'd'):>5} {fmt(r['backlog_s'], '.1f'):>6} "
                     f"{fmt(r['last_latency_ms'], '.0f'):>8} {fmt(r['metrics_age_s'], '.0f'):>6}  "
                     f"{r['health'] or '-'}")
    return lines
