"""The asker's own memory of bids and jobs sent (agent.invite.AskerMemory), and the price of
a cold model in ``choose``: pure, a fake clock (times passed in), a seeded rng."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.invite import COLD_S, AskerMemory, choose
from agent.messages import LatencySummary, ModelInfo, Snapshot
from agent.topics import Topics

T = Topics("")


def snap(p50_ms: float = 1000.0, *, warm: bool | None = None, backlog: float = 0.0) -> Snapshot:
    models = {} if warm is None else {"cpu": ModelInfo("m", warm=warm)}
    return Snapshot(has_npu=False, npu_free=False, cpu_slots=1, cpu_percent=10.0, mem_available_mb=1000.0,
                    load1=0.1, queue_depth=0, recent={"cpu": LatencySummary(5, p50_ms)}, backlog_s=backlog,
                    models=models)


def test_a_bid_ages_with_the_clock_and_grows_with_what_was_sent() -> None:
    mem = AskerMemory(max_age_s=30.0)
    mem.heard("a", 100.0, backlog_s=10.0, service_s=2.0, init_s=0.0, slots=2)
    assert mem.known_s(100.0) == {"a": 12.0}
    assert mem.known_s(104.0) == {"a": 8.0}          # 4 s of its backlog gone by
    mem.sent("a", 104.0, 8.0)                          # 8 s of work over 2 slots: 4 s more wait
    assert mem.known_s(104.0) == {"a": 12.0}
    assert mem.known_s(125.0) == {"a": 2.0}          # all of it done: the service alone
    assert mem.known_s(130.0) == {}                  # 30 s after the bid: forgotten (metrics again)


def test_a_cold_bid_prices_its_start_up_until_a_job_was_sent() -> None:
    mem = AskerMemory()
    mem.heard("a", 0.0, backlog_s=0.0, service_s=2.0, init_s=6.0, slots=1)
    assert mem.known_s(0.0) == {"a": 8.0}
    assert mem.startup_s() == {"a": 6.0}
    mem.sent("a", 0.0, 8.0)                            # its model is loaded by the next job
    assert mem.known_s(0.0) == {"a": 10.0}           # 8 s queued + 2 s service, no start-up
    mem.heard("a", 20.0, backlog_s=0.0, service_s=2.0, init_s=0.0, slots=1)
    assert mem.startup_s() == {"a": 6.0}             # a warm bid does not forget the start-up


def test_no_service_estimate_leaves_the_device_to_the_metrics_and_a_sent_job_to_an_unknown_is_ignored() -> None:
    mem = AskerMemory()
    mem.heard("a", 0.0, backlog_s=0.0, service_s=None, init_s=0.0, slots=1)
    mem.sent("b", 0.0, 5.0)
    assert mem.known_s(0.0) == {}


def test_each_device_is_priced_for_the_job_at_hand_from_the_shape_of_its_bids() -> None:
    # Two devices whose bids are a + b·prompt + c·budget (seconds, thousands of tokens):
    # "prefill" reads prompts fast and writes slowly, "decode" the other way round.
    shapes = {"prefill": (0.5, 0.3, 70.0), "decode": (0.5, 4.0, 40.0)}

    def bid(d: str, p: int, m: int) -> float:
        a, b, c = shapes[d]
        return a + (b * p + c * m) / 1000

    mem = AskerMemory()
    sizes = [(200, 100), (1500, 60), (400, 300)]
    for t, (p, m) in enumerate(sizes[:2]):
        for d in shapes:
            mem.heard(d, float(t), backlog_s=0.0, service_s=bid(d, p, m), init_s=0.0, slots=1, prompt_tokens=p,
                      max_new_tokens=m)
    # two bids: not enough to tell the shape, so the last bid's figure, whatever the job
    assert mem.known_s(2.0, 3000, 20) == {d: pytest.approx(bid(d, 1500, 60)) for d in shapes}
    for d in shapes:
        mem.heard(d, 2.0, backlog_s=0.0, service_s=bid(d, 400, 300), init_s=0.0, slots=1, prompt_tokens=400,
                  max_new_tokens=300)
    long_prompt, long_answer = mem.known_s(2.0, 3000, 20), mem.known_s(2.0, 50, 800)
    for d in shapes:
        assert long_prompt[d] == pytest.approx(bid(d, 3000, 20), rel=0.02)
        assert long_answer[d] == pytest.approx(bid(d, 50, 800), rel=0.02)
    assert long_prompt["prefill"] < long_prompt["decode"] and long_answer["decode"] < long_answer["prefill"]
    assert mem.known_s(2.0) == {d: pytest.approx(bid(d, 400, 300)) for d in shapes}   # no size: the last bid's
    # a bid without its job's size teaches no shape; a device's shape is dropped with the bound
    mem.heard("plain", 3.0, backlog_s=0.0, service_s=9.0, init_s=0.0, slots=1)
    assert mem.known_s(3.0, 3000, 20)["plain"] == 9.0


def test_settle_fits_the_shapes_new_bids_moved_so_pricing_fits_none(monkeypatch: pytest.MonkeyPatch) -> None:
    import agent.invite as invite
    fits: list[int] = []
    real = invite._fit_nonneg
    monkeypatch.setattr(invite, "_fit_nonneg", lambda G, h: fits.append(1) or real(G, h))
    mem = AskerMemory()
    for t, (p, m) in enumerate([(200, 100), (1500, 60), (400, 300)]):
        for d in ("a", "b"):
            mem.heard(d, float(t), backlog_s=0.0, service_s=1.0 + p / 1000 + m / 100, init_s=0.0, slots=1,
                      prompt_tokens=p, max_new_tokens=m)
    mem.settle()
    assert len(fits) == 2, "one fit per device whose shape moved"
    mem.settle()
    priced = mem.known_s(3.0, 50, 800)
    assert len(fits) == 2 and set(priced) == {"a", "b"}, "nothing left to fit: neither settling nor pricing fits"
    mem.heard("a", 3.0, backlog_s=0.0, service_s=2.0, init_s=0.0, slots=1, prompt_tokens=9, max_new_tokens=9)
    mem.settle()
    assert len(fits) == 3, "a moved again: a alone"


def test_bounded_the_least_recently_heard_dropped() -> None:
    mem = AskerMemory(limit=2)
    for i, d in enumerate("abc"):
        mem.heard(d, float(i), backlog_s=0.0, service_s=1.0, init_s=3.0, slots=1)
    mem.heard("b", 5.0, backlog_s=0.0, service_s=1.0, init_s=3.0, slots=1)
    assert set(mem.known_s(5.0)) == {"b", "c"} and set(mem.startup_s()) == {"b", "c"}
    with pytest.raises(ValueError):
        AskerMemory(max_age_s=0)


def test_a_cold_model_costs_its_start_up_in_the_ranking() -> None:
    # "fast" is the fastest by its record, but its model is not loaded: 5 s to load it.
    devices: dict[str, Snapshot | None] = {"fast": snap(1000.0, warm=False), "warm": snap(3000.0, warm=True),
                                           "unsaid": snap(2000.0)}
    inv = choose(devices, me="asker", best=2, explore=0, rng=np.random.default_rng(0), spread=1)
    assert inv.best == ("unsaid", "warm")                 # 1 + COLD_S > 3
    assert COLD_S > 2.0
    # a start-up this asker heard replaces the default; others' median stands in for the rest
    inv = choose(devices, me="asker", best=1, explore=0, rng=np.random.default_rng(0), spread=1,
                 startup_s={"fast": 0.5})
    assert inv.best == ("fast",)
    devices["other"] = snap(500.0, warm=False)
    inv = choose(devices, me="asker", best=1, explore=0, rng=np.random.default_rng(0), spread=1,
                 startup_s={"fast": 0.5, "x": 0.5})
    assert inv.best == ("other",)                        # 0.5 + median 0.5 = 1.0 < fast's 1.5


def test_old_metrics_backlog_has_run_down_by_their_age() -> None:
    devices: dict[str, Snapshot | None] = {"queued": snap(1000.0, backlog=9.0), "slow": snap(4000.0)}
    inv = choose(devices, me="asker", best=1, explore=0, rng=np.random.default_rng(0), spread=1)
    assert inv.best == ("slow",)                          # 10 s against 4 s
    inv = choose(devices, me="asker", best=1, explore=0, rng=np.random.default_rng(0), spread=1,
                 sent_s={"queued": 92.0, "slow": 92.0}, now=100.0)
    assert inv.best == ("queued",)                        # 8 s later: 1 s of it left, 2 s in all


def test_one_memory_per_state_dir_for_the_process() -> None:
    from agent.invite import shared_memory
    assert shared_memory("/tmp/a-state") is shared_memory("/tmp/a-state")
    assert shared_memory("/tmp/a-state") is not shared_memory("/tmp/b-state")


def test_a_view_per_state_dir_and_job_kind_for_the_process_bounded() -> None:
    from agent.invite import SHARED_VIEWS, shared_rows
    chat, code = ("chat-model", "any", False), ("code-model", "any", True)
    assert shared_rows("/tmp/a-state", chat) is shared_rows("/tmp/a-state", chat)
    assert shared_rows("/tmp/a-state", chat) is not shared_rows("/tmp/a-state", code), \
        "two kinds in turn do not rebuild one view: their bidders differ"
    assert shared_rows("/tmp/a-state", chat) is not shared_rows("/tmp/b-state", chat)
    first = shared_rows("/tmp/a-state", chat)
    for i in range(SHARED_VIEWS):
        shared_rows("/tmp/a-state", ("model", str(i), False))
    assert shared_rows("/tmp/a-state", chat) is not first, "the least recently used dropped"


def test_an_invited_auction_leaves_its_bids_and_the_job_sent_in_the_devices_memory(tmp_path: Path) -> None:
    """The orchestrator's wiring, against the scripted fleet of tests/test_orchestrator.py:
    past the threshold the bids heard and the job sent land in the memory that the next
    orchestrator of this state directory (the daemon's next trigger) invites from."""
    from agent.invite import shared_memory
    from agent.orchestrator import Orchestrator
    from tests.test_orchestrator import PROMISE_S, RecordingArms, ScriptedFleet, config, done

    class Invited(ScriptedFleet):
        def publish(self, topic: str, payload: bytes, **kw: Any) -> None:
            parsed = T.parse(topic)
            if parsed is not None and parsed.kind == "bid_invite":  # answered as a call, by the invited alone
                everyone, self.peers = self.peers, {parsed.device: self.peers[parsed.device or ""]}
                try:
                    super().publish(T.bid_request(parsed.rid or "", "hub"), payload, **kw)
                finally:
                    self.peers = everyone
                return
            super().publish(topic, payload, **kw)

    fleet = Invited({f"p{i}": done for i in range(4)})
    cfg = config(tmp_path)
    cfg = replace(cfg, auction=replace(cfg.auction, invite=replace(cfg.auction.invite, above=0, best=0, explore=4)))
    idle = Snapshot(has_npu=False, npu_free=False, cpu_slots=0, cpu_percent=0.0, mem_available_mb=1e3, load1=0.0,
                    queue_depth=0)
    connect: Any = lambda: fleet  # noqa: E731
    orch = Orchestrator(cfg, connect=connect, npu_exec=None, cpu_exec=None, arms=RecordingArms,
                        local_snapshot=lambda: idle, clock=lambda: 100.0)
    out = orch.run("a prompt", max_new_tokens=8)
    assert out.ok and out.winner is not None
    memory = shared_memory(str(cfg.state_dir))
    known = memory.known_s(100.0)
    assert set(known) == {f"p{i}" for i in range(4)}
    assert not memory._unfitted, "the run's end fitted what its bids moved (Auctioneer.closed)"
    assert known[out.winner] == PROMISE_S * 2          # the job sent, then its service
    assert all(s == PROMISE_S for d, s in known.items() if d != out.winner)
    # ... and the view the next invitation is chosen from reads them before it (its keeper,
    # nudged at the run's end): its rows become the memory's, the job sent included.
    from agent.invite import shared_rows
    from agent.viewkeeper import ViewKeeper
    rows = shared_rows(str(cfg.state_dir), (None, "any", False))
    devices = sorted(known)

    def read(_: Any) -> bool:
        t = rows.current()
        return np.array_equal(t.m_values[[t.index[d] for d in devices]], np.array(memory.rows(devices)),
                              equal_nan=True)
    assert isinstance(rows.keeper, ViewKeeper) and rows.keeper.wait(read, 5.0)


def test_a_view_kept_in_step_with_the_roster_and_the_memory_chooses_as_choose_does() -> None:
    """``Rows.sync`` and ``Rows.known`` read again only the devices their sources say
    changed. Driven at random (metrics live and retained, clocks off, devices coming,
    going and retired, bids of every size heard, jobs sent, a memory smaller than the
    fleet), every invitation ``choose_kept`` makes is the one ``choose`` makes from the
    roster's and the memory's whole state."""
    from agent.bus import Message
    from agent.invite import Rows, choose_kept
    from agent.messages import Metrics
    from agent.roster import Roster

    rng = np.random.default_rng(5)
    wall, mono = [1000.0], [50.0]
    roster = Roster(T, "hub", wall=lambda: wall[0])
    memory = AskerMemory(max_age_s=3.0, limit=12)
    view = Rows()
    names = [f"d{i:02d}" for i in range(60)]
    kinds = [{}, {"model": "m"}, {"need": "npu"}, {"model": "m", "tools": True}]
    for step in range(400):
        wall[0] += float(rng.random())
        mono[0] += float(rng.random())
        for d in rng.choice(names, 5, replace=False).tolist():
            r = rng.random()
            if r < 0.08:
                roster.handle(Message(T.availability(d), b"offline" if rng.random() < 0.7 else b"", retain=True))
            elif r < 0.12:
                roster.handle_metrics(Message(T.metrics(d), b"", retain=True))
            else:
                roster.handle(Message(T.availability(d), b"online", retain=True))
                s = Snapshot(has_npu=bool(rng.random() < 0.3), npu_free=bool(rng.random() < 0.5),
                             cpu_slots=int(rng.choice([0, 1, 2])), cpu_percent=0.0, mem_available_mb=1.0, load1=0.0,
                             queue_depth=int(rng.choice([0, 3])), backlog_s=float(rng.choice([0.0, 4.0])),
                             recent={"cpu": LatencySummary(5, float(rng.choice([400.0, 900.0])))},
                             models={"cpu": ModelInfo(str(rng.choice(["m", "n"])), warm=bool(rng.random() < 0.7))})
                ts = wall[0] - float(rng.choice([0.0, 2.0, 40.0]))  # a clock behind ours, sometimes
                payload = Metrics(device=d, ts=ts, snapshot=s).to_payload()
                roster.handle_metrics(Message(T.metrics(d), payload, retain=bool(rng.random() < 0.3)))
        for d in rng.choice(names, 4, replace=False).tolist():
            memory.heard(d, mono[0], backlog_s=float(rng.random()), service_s=None if rng.random() < 0.1 else
                         float(rng.random() * 3), init_s=float(rng.choice([0.0, 2.0])), slots=2,
                         prompt_tokens=int(rng.choice([10, 300, 2000])), max_new_tokens=int(rng.choice([8, 256])))
        if rng.random() < 0.5:
            memory.sent(str(rng.choice(names)), mono[0], float(rng.random() * 4))
        if step % 7 == 0:
            memory.settle()
        job: dict[str, Any] = kinds[step % len(kinds)]
        prompt, budget = int(rng.choice([20, 900])), int(rng.choice([16, 400]))
        bidders = roster.bidders(**job)
        rows = dict(zip(sorted(bidders), roster.rows(sorted(bidders)), strict=True))
        with view.lock:
            if step % 5 == 0:  # another job kind's rows synced first, its memory never read
                view.sync(roster, roster.bidders(**kinds[(step + 1) % len(kinds)]))
            view.sync(roster, bidders)
            known = view.known(memory, mono[0], prompt, budget)
            a = choose_kept(view, known, me="d00", best=4, explore=2, rng=np.random.default_rng(step),
                            startup_s=memory.startup_s(), now=wall[0], **job)
        b = choose({d: s for d, (s, _) in rows.items()}, me="d00", best=4, explore=2,
                   rng=np.random.default_rng(step), known_s=memory.known_s(mono[0], prompt, budget),
                   startup_s=memory.startup_s(), sent_s={d: t for d, (_, t) in rows.items() if t is not None},
                   now=wall[0], **job)
        assert a == b, f"step {step}"
