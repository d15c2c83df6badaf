"""Live device metrics from psutil, sampled cheaply enough to answer every bid.

``cpu_percent`` is the utilisation since the previous sample (psutil's non-blocking
form), so a bid never waits for a measurement window. Sensors that the platform lacks
(temperature, battery) come back as None / False rather than errors.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import psutil

from agent.messages import LatencySummary, ModelInfo, Snapshot

log = logging.getLogger(__name__)

# Sensors read sysfs files; re-read them at most this often.
_SENSOR_TTL_S = 5.0
_CPU_MIN_INTERVAL_S = 0.5
# A bid must be cheap (it is answered on the network thread); memory and load do not
# change meaningfully faster than this, so a sample is reused for this long.
_SAMPLE_TTL_S = 0.25


@dataclass(frozen=True)
class HostSample:
    cpu_percent: float
    mem_available_mb: float
    load1: float
    temperature_c: float | None
    on_battery: bool


class HostSampler:
    """Thread-safe, cached psutil sampling."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        psutil.cpu_percent(None)  # prime: the first non-blocking call has no baseline
        self._cpu = 0.0
        self._cpu_at = clock()
        self._sensors_at = -1e9
        self._temperature: float | None = None
        self._on_battery = False
        self._last: HostSample | None = None
        self._last_at = -1e9

    def sample(self) -> HostSample:
        now = self._clock()
        with self._lock:
            if self._last is not None and now - self._last_at < _SAMPLE_TTL_S:
                return self._last
            if now - self._cpu_at >= _CPU_MIN_INTERVAL_S:
                self._cpu = psutil.cpu_percent(None)
                self._cpu_at = now
            if now - self._sensors_at >= _SENSOR_TTL_S:
                self._temperature, self._on_battery = _read_sensors()
                self._sensors_at = now
            cpu, temperature, on_battery = self._cpu, self._temperature, self._on_battery
        try:
            load1 = os.getloadavg()[0]
        except OSError:
            load1 = 0.0
        sample = HostSample(cpu_percent=cpu, mem_available_mb=psutil.virtual_memory().available / 2**20,
                            load1=load1, temperature_c=temperature, on_battery=on_battery)
        with self._lock:
            self._last, self._last_at = sample, now
        return sample


def _read_sensors() -> tuple[float | None, bool]:
    temperature = None
    try:
        temps = psutil.sensors_temperatures() if hasattr(psutil, "sensors_temperatures") else {}
        readings = [t.current for entries in temps.values() for t in entries if t.current]
        temperature = max(readings) if readings else None
    except (OSError, RuntimeError):
        pass
    on_battery = False
    try:
        battery = psutil.sensors_battery() if hasattr(psutil, "sensors_battery") else None
        on_battery = battery is not None and battery.power_plugged is False
    except (OSError, RuntimeError):
        pass
    return temperature, on_battery


class LatencyWindow:
    """The last few latencies per mode, summarised for bids (p50, ms per token)."""

    def __init__(self, size: int = 32):
        self._lock = threading.Lock()
        self._by_mode: dict[str, deque[tuple[float, int]]] = {}
        self._size = size
        self._summary: Mapping[str, LatencySummary] | None = None  # until the next add
        self.last_ms: float | None = None

    def add(self, mode: str, total_ms: float, tokens: int) -> None:
        with self._lock:
            self._by_mode.setdefault(mode, deque(maxlen=self._size)).append((total_ms, tokens))
            self.last_ms = total_ms
            self._summary = None

    def summary(self) -> Mapping[str, LatencySummary]:
        """Per mode; computed once per change, since every bid carries it."""
        with self._lock:
            if self._summary is not None:
                return self._summary
            out = {}
            for mode, window in self._by_mode.items():
                totals = sorted(ms for ms, _ in window)
                tokens = sum(t for _, t in window)
                per_token = sum(ms for ms, _ in window) / tokens if tokens else None
                out[mode] = LatencySummary(n=len(window), p50_ms=round(totals[len(totals) // 2], 3),
                                           ms_per_token=round(per_token, 3) if per_token else None)
            self._summary = MappingProxyType(out)
            return self._summary


def snapshot(host: HostSample, *, has_npu: bool, npu_free: bool, cpu_slots: int,
             queue_depth: int, recent: Mapping[str, LatencySummary], backlog_s: float = 0.0,
             models: Mapping[str, ModelInfo] | None = None) -> Snapshot:
    return Snapshot(has_npu=has_npu, npu_free=has_npu and npu_free, cpu_slots=cpu_slots,
                    cpu_percent=round(host.cpu_percent, 1),
                    mem_available_mb=round(host.mem_available_mb, 1), load1=round(host.load1, 2),
                    queue_depth=queue_depth, temperature_c=host.temperature_c,
                    on_battery=host.on_battery, recent=dict(recent), backlog_s=round(backlog_s, 4),
                    models=dict(models or {}))
