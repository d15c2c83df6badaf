"""Whom a large fleet's auction invites (agent.invite.choose): a pure function, seeded."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from agent.config import InviteConfig
from agent.invite import Invitation, Rows, choose, expected_s
from agent.messages import LatencySummary, ModelInfo, Snapshot


def snap(*, backlog: float = 0.0, p50_ms: float | None = 1000.0, npu: bool = False, npu_free: bool = False,
         slots: int = 1, queue: int = 0, model: str | None = None, npu_model: str | None = None) -> Snapshot:
    recent = {} if p50_ms is None else {"cpu": LatencySummary(5, p50_ms)}
    models = {}
    if model is not None:
        models["cpu"] = ModelInfo(model)
    if npu_model is not None:
        models["npu"] = ModelInfo(npu_model)
    return Snapshot(has_npu=npu, npu_free=npu_free, cpu_slots=slots, cpu_percent=10.0, mem_available_mb=1000.0,
                    load1=0.1, queue_depth=queue, recent=recent, backlog_s=backlog, models=models)


def fleet(n: int) -> dict[str, Snapshot | None]:
    # dev-000 is the fastest (its recent p50 the lowest), dev-{n-1} the slowest.
    return {f"dev-{i:03d}": snap(p50_ms=1000.0 + 100 * i) for i in range(n)}


def test_threshold() -> None:
    assert not InviteConfig(above=32).past(32)
    assert InviteConfig(above=32).past(33)
    assert InviteConfig(above=0).past(1)  # 0: always invite


def test_the_k_best_by_what_the_asker_knows_and_d_at_random() -> None:
    devices = fleet(100)
    inv = choose(devices, me="asker", best=8, explore=2, rng=np.random.default_rng(1), spread=1)
    assert inv.best == tuple(f"dev-{i:03d}" for i in range(8))
    assert len(inv.explore) == 2 and not set(inv.explore) & set(inv.best)
    assert inv.npu == () and not inv.own
    assert len(inv.devices) == len(set(inv.devices)) == 10


def test_backlog_counts_against_a_fast_device() -> None:
    devices = fleet(20)
    devices["dev-000"] = snap(p50_ms=1000.0, backlog=30.0)  # the fastest, but 30 s of work queued
    inv = choose(devices, me="asker", best=3, explore=0, rng=np.random.default_rng(0), spread=1)
    assert inv.best == ("dev-001", "dev-002", "dev-003")


def test_the_askers_own_estimates_come_first() -> None:
    devices = fleet(20)
    inv = choose(devices, me="asker", best=2, explore=0, rng=np.random.default_rng(0), spread=1,
                 known_s={"dev-019": 0.1, "dev-018": 0.2})
    assert inv.best == ("dev-019", "dev-018")


def test_the_best_are_drawn_among_the_spread_times_k_best_so_askers_do_not_herd() -> None:
    devices = fleet(100)
    picked: set[str] = set()
    for seed in range(50):
        inv = choose(devices, me="asker", best=4, explore=0, rng=np.random.default_rng(seed), spread=4)
        assert len(inv.best) == 4
        picked.update(inv.best)
    assert picked == {f"dev-{i:03d}" for i in range(16)}, "all of the 16 best, none beyond"


def test_a_device_with_no_record_counts_as_fast_as_the_fastest() -> None:
    devices = fleet(20)
    devices["fresh"] = snap(p50_ms=None)              # idle, never ran a job: worth a try
    devices["fresh-busy"] = snap(p50_ms=None, backlog=60.0)
    inv = choose(devices, me="asker", best=2, explore=0, rng=np.random.default_rng(0), spread=1)
    assert set(inv.best) == {"dev-000", "fresh"}


def test_deterministic_given_the_seed_whatever_the_order() -> None:
    devices = fleet(200)
    reordered = dict(reversed(list(devices.items())))
    a = choose(devices, me="asker", best=8, explore=4, rng=np.random.default_rng(7))
    b = choose(reordered, me="asker", best=8, explore=4, rng=np.random.default_rng(7))
    c = choose(devices, me="asker", best=8, explore=4, rng=np.random.default_rng(8))
    assert a == b
    assert a.explore != c.explore  # another seed, another draw


def test_a_view_kept_between_choices_chooses_as_a_fresh_one() -> None:
    """``Rows`` works a device's row out again only when its snapshot is a new one: as
    metrics come and go, devices join and leave, and jobs differ in kind, every choice
    from the kept view is the one a fresh view makes."""
    rng = np.random.default_rng(11)
    devices: dict[str, Snapshot | None] = dict(fleet(60))
    kept = Rows()
    jobs = [dict(), dict(model="m"), dict(need="npu"), dict(model="m", tools=True)]
    for step in range(300):
        for name in rng.choice(sorted(devices), 4, replace=False).tolist():  # new metrics from a few
            devices[name] = None if rng.random() < 0.1 else snap(
                backlog=float(rng.choice([0.0, 5.0, 30.0])), p50_ms=float(rng.choice([500.0, 1500.0, 3000.0])),
                npu=bool(rng.random() < 0.3), npu_free=bool(rng.random() < 0.5), slots=int(rng.choice([0, 1, 2])),
                queue=int(rng.choice([0, 3])), model=str(rng.choice(["m", "n"])), npu_model="m")
        if step % 25 == 0:  # one leaves, another joins
            del devices[sorted(devices)[int(rng.integers(len(devices)))]]
            devices[f"new-{step}"] = snap()
        job: dict[str, Any] = jobs[step % len(jobs)]
        known = {d: float(rng.random() * 5) for d in sorted(devices)[:10]}
        a = choose(devices, me="dev-000", best=5, explore=2, rng=np.random.default_rng(step), rows=kept,
                   known_s=known, **job)
        b = choose(devices, me="dev-000", best=5, explore=2, rng=np.random.default_rng(step), known_s=known, **job)
        assert a == b, f"step {step}"


def test_the_random_draw_reaches_every_device_in_time() -> None:
    devices: dict[str, Snapshot | None] = dict(fleet(30))
    devices.update({f"new-{i}": None for i in range(10)})  # never heard from: only the draw finds them
    rng = np.random.default_rng(3)
    seen: set[str] = set()
    for _ in range(200):
        seen.update(choose(devices, me="asker", best=4, explore=2, rng=rng).explore)
    assert {f"new-{i}" for i in range(10)} <= seen


def test_free_npus_that_serve_the_model_are_all_invited_but_bounded() -> None:
    devices: dict[str, Snapshot | None] = dict(fleet(50))
    for i in range(5):
        devices[f"npu-{i}"] = snap(npu=True, npu_free=True, slots=0, p50_ms=None, npu_model="llama")
    devices["npu-busy"] = snap(npu=True, npu_free=False, slots=0, npu_model="llama")
    devices["npu-other"] = snap(npu=True, npu_free=True, slots=0, npu_model="qwen")
    inv = choose(devices, me="asker", best=8, explore=0, rng=np.random.default_rng(0), model="llama")
    assert set(inv.npu) == {f"npu-{i}" for i in range(5)}
    assert "npu-busy" not in inv.npu and "npu-other" not in inv.devices
    capped = choose(devices, me="asker", best=3, explore=0, rng=np.random.default_rng(0), model="llama")
    assert len(capped.npu) == 3
    only_random = choose(devices, me="asker", best=0, explore=1, rng=np.random.default_rng(0), model="llama")
    assert len(only_random.npu) == 1, "a free NPU is invited even when no device is chosen by rank"
    ungranted = choose(devices, me="asker", best=8, explore=0, rng=np.random.default_rng(0), model="llama",
                       npu_granted=lambda d: d != "npu-0")
    assert "npu-0" not in ungranted.npu


def test_devices_that_cannot_take_the_job_are_not_invited() -> None:
    devices: dict[str, Snapshot | None] = {f"llama-{i}": snap(model="llama", p50_ms=5000.0) for i in range(3)}
    devices.update({f"qwen-{i}": snap(model="qwen", p50_ms=100.0) for i in range(30)})
    devices["no-slots"] = snap(slots=0, model="llama", p50_ms=10.0)
    inv = choose(devices, me="asker", best=8, explore=2, rng=np.random.default_rng(0), model="llama")
    assert set(inv.devices) == {"llama-0", "llama-1", "llama-2"}
    npu_only = choose(devices, me="asker", best=8, explore=2, rng=np.random.default_rng(0), need="npu")
    assert npu_only.devices == ()


def test_the_asker_is_invited_once_and_never_counted_as_k_or_d() -> None:
    devices = fleet(40)
    devices["asker"] = snap(p50_ms=1.0)  # its own daemon, the fastest of all
    for seed in range(50):
        inv = choose(devices, me="asker", best=3, explore=2, rng=np.random.default_rng(seed))
        assert inv.own and inv.devices[0] == "asker"
        assert inv.devices.count("asker") == 1
        assert len(inv.best) == 3 and len(inv.explore) == 2
    asker_cannot = choose({**devices, "asker": snap(slots=0)}, me="asker", best=3, explore=2,
                          rng=np.random.default_rng(0))
    assert "asker" not in asker_cannot.devices


def test_a_small_or_unknown_fleet_is_invited_whole() -> None:
    devices: dict[str, Snapshot | None] = {f"d{i}": None for i in range(3)}
    inv = choose(devices, me="asker", best=8, explore=2, rng=np.random.default_rng(0))
    assert len(inv.devices) == 2  # nothing known: the random draw alone
    inv = choose(devices, me="asker", best=8, explore=5, rng=np.random.default_rng(0))
    assert sorted(inv.devices) == ["d0", "d1", "d2"]


def test_nothing_known_and_no_random_draw_still_invites_someone() -> None:
    devices: dict[str, Snapshot | None] = {f"d{i}": None for i in range(5)}
    for best in (0, 3):
        inv = choose(devices, me="asker", best=best, explore=0, rng=np.random.default_rng(0))
        assert len(inv.explore) == max(best, 1) and inv.best == ()
    # the asker's own daemon does not count as someone: the job would never leave it
    inv = choose({**devices, "asker": snap()}, me="asker", best=2, explore=0, rng=np.random.default_rng(0))
    assert inv.own and len(inv.explore) == 2
    # once something is known, explore 0 means no random draw
    inv = choose({**devices, "known": snap()}, me="asker", best=2, explore=0, rng=np.random.default_rng(0))
    assert inv.best == ("known",) and inv.explore == ()


def test_expected_seconds_from_metrics() -> None:
    assert expected_s(snap(backlog=2.0, p50_ms=500.0)) == pytest.approx(2.5)
    assert expected_s(snap(p50_ms=None)) is None
    assert Invitation().devices == ()


def test_bad_counts() -> None:
    with pytest.raises(ValueError):
        choose({}, me="a", best=-1, explore=0, rng=np.random.default_rng(0))


def test_a_kept_view_keeps_a_bounded_number_of_job_kinds() -> None:
    from agent.invite import JOB_KINDS
    kept, devices = Rows(), fleet(5)
    for i in range(3 * JOB_KINDS):  # a model name is whatever a caller sent
        choose(devices, me="asker", best=1, explore=0, rng=np.random.default_rng(0), rows=kept, model=f"m{i}")
    table = kept.table(devices)
    assert len(table._able) == JOB_KINDS
    assert choose(devices, me="asker", best=1, explore=0, rng=np.random.default_rng(0), rows=kept,
                  spread=1).best == ("dev-000",)


def test_a_kept_view_whose_read_failed_reads_every_row_next_time() -> None:
    import threading

    from agent.feeds import Feeds

    class Source:
        def __init__(self) -> None:
            self.lock = threading.Lock()
            self.feeds = Feeds(self.lock)
            self.snaps: dict[str, Snapshot | None] = dict(fleet(4))
            self.fail = False
            self.read: list[str] = []

        def feed(self) -> Any:
            return self.feeds.open()

        def rows(self, devices: Any) -> list[tuple[Snapshot | None, float | None]]:
            if self.fail:
                raise RuntimeError("a decoder bug")
            self.read += list(devices)
            return [(self.snaps[d], None) for d in devices]

    source, view = Source(), Rows()
    view.sync(source, frozenset(source.snaps))
    source.snaps["dev-001"] = snap(backlog=30.0)
    with source.lock:
        source.feeds.touch("dev-001")
    source.fail = True
    with pytest.raises(RuntimeError):
        view.sync(source, frozenset(source.snaps))
    source.fail, source.read = False, []
    table = view.sync(source, frozenset(source.snaps))
    assert sorted(source.read) == sorted(source.snaps), "every row read again, the change taken before included"
    assert table.backlog[table.index["dev-001"]] == 30.0
