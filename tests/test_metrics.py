"""What a device says about itself in every bid: its recent latencies and host sample."""

from __future__ import annotations

from agent.metrics import HostSampler, LatencyWindow, snapshot
from agent.presence import METRICS_MIN_GAP_S, metrics_due


def test_the_latency_window_summarises_the_last_jobs_per_mode_and_follows_each_new_one() -> None:
    window = LatencyWindow(size=3)
    assert window.summary() == {} and window.last_ms is None
    for ms, tokens in ((100.0, 10), (300.0, 10), (200.0, 20)):
        window.add("cpu", ms, tokens)
    first = window.summary()["cpu"]
    assert (first.n, first.p50_ms, first.ms_per_token) == (3, 200.0, 15.0)
    assert window.summary() is window.summary(), "one computation per change, not per bid"
    window.add("cpu", 1000.0, 0)  # the oldest (100 ms) leaves the window
    after = window.summary()["cpu"]
    assert (after.n, after.p50_ms, after.ms_per_token) == (3, 300.0, 50.0), "a cached summary never goes stale"
    window.add("npu", 50.0, 5)
    assert set(window.summary()) == {"cpu", "npu"} and window.last_ms == 50.0


def test_a_host_sample_is_reused_briefly_then_taken_again() -> None:
    now = [0.0]
    sampler = HostSampler(clock=lambda: now[0])
    first = sampler.sample()
    now[0] += 0.1
    assert sampler.sample() is first, "bids in a burst share one sample"
    now[0] += 1.0
    assert sampler.sample() is not first
    snap = snapshot(first, has_npu=False, npu_free=True, cpu_slots=2, queue_depth=1, recent={})
    assert not snap.npu_free, "no NPU is never a free one"


def test_metrics_follow_jobs_soon_but_once_per_gap_and_health_at_once() -> None:
    last, interval = 100.0, 10.0

    def due(now: float, *, urgent: bool = False, pending: bool = False) -> bool:
        return metrics_due(now, next_at=last + interval, urgent=urgent, pending=pending, published_at=last)

    assert not due(last + 0.01), "nothing changed: wait for the interval"
    assert due(last + interval)
    assert not due(last + METRICS_MIN_GAP_S / 2, pending=True), "a job changed state: not per change"
    assert due(last + METRICS_MIN_GAP_S, pending=True), "... but soon"
    assert due(last + 0.001, urgent=True), "health, presence or the NPU: at once"
