"""How old a message is, without trusting anyone's wall clock.

Edge boards without a real-time clock boot with the wrong time, so no deadline compares
two devices' clocks. A message's age comes from, in order:

1. the MQTT 5 message expiry the broker hands over with it: the broker counts down the
   interval the sender set, so ``set − remaining`` is the time it spent queued (to the
   second; MQTT brokers count in whole seconds);
2. the sender's wall clock in the payload, corrected by the offset between the two
   clocks as measured from the sender's live metrics (``local time on receipt − its
   timestamp``, the smallest of the recent samples, since network delay only adds);
3. neither: a live message is taken as fresh; a retained one (it may have waited on the
   broker for any time) as infinitely old.

``ClockOffsets`` also says when a device's clock is off by more than ``SKEW_WARN_S``,
once per device and only after a few samples agree, so the log shows it.
"""

from __future__ import annotations

import math
import threading
from collections import deque

SKEW_WARN_S = 2.0
SAMPLES = 8
WARN_AFTER = 3  # samples: one message held up in a broker looks like skew (NATS clusters: seconds)


class ClockOffsets:
    """Per device: how far its wall clock is behind ours (positive: it is behind)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._samples: dict[str, deque[float]] = {}
        self._warned: set[str] = set()

    def observe(self, device: str, sent_wall: float, local_wall: float) -> float | None:
        """Record one live message's timestamp; returns the offset if it is worth a
        warning (more than SKEW_WARN_S, first time for this device), else None."""
        if not (math.isfinite(sent_wall) and sent_wall > 0):
            return None
        with self._lock:
            samples = self._samples.setdefault(device, deque(maxlen=SAMPLES))
            samples.append(local_wall - sent_wall)
            offset = min(samples)
            if abs(offset) > SKEW_WARN_S and device not in self._warned and len(samples) >= WARN_AFTER:
                self._warned.add(device)
                return offset
            if abs(offset) <= SKEW_WARN_S:
                self._warned.discard(device)
        return None

    def offset(self, device: str) -> float | None:
        with self._lock:
            samples = self._samples.get(device)
            return min(samples) if samples else None

    def age(self, device: str, sent_wall: float, local_wall: float, *, expiry_set: float | None = None,
            expiry_left: int | None = None, retained: bool = False) -> float:
        """Seconds since ``device`` sent a message stamped ``sent_wall``, as well as can be
        told (see the module docstring); never negative, infinite for a retained message
        whose age cannot be told."""
        if expiry_set is not None and expiry_left is not None:
            return max(0.0, math.ceil(expiry_set) - expiry_left)
        offset = self.offset(device)
        if offset is None or not sent_wall:
            return math.inf if retained else 0.0
        return max(0.0, local_wall - (sent_wall + offset))
