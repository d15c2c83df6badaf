"""Past ``auction.invite.above`` the call goes only to the invited devices (a real broker)."""

from __future__ import annotations

from tests.support.fleet import Env, sim


def test_only_the_invited_are_called_and_waited_for(env: Env) -> None:
    invite = {"invite": {"above": 2, "best": 1, "explore": 1}}
    asker = env.config("asker", auction={"bid_timeout_s": 20, **invite})
    npu = env.config("npu-1", npu=sim(base_ms=1))
    cpus = [env.config(f"cpu-{c}", cpu=sim(base_ms=1)) for c in "abc"]
    t = env.topics
    with env.node(npu), env.node(cpus[0]), env.node(cpus[1]), env.node(cpus[2]), \
            env.spy(f"{env.prefix}bid/#") as spy:
        code, out, _, err = env.trigger(asker, "lights on")
        assert code == 0, err
        assert out is not None
        rid = out["rid"]

        def of_rid(kind: str) -> list[str]:
            """The device level of every ``kind`` topic of this rid the spy saw."""
            return sorted(str(p.device) for m in spy.seen
                          if (p := t.parse(m.topic)) is not None and p.kind == kind and p.rid == rid)

        spy.bus.barrier(5)
        invited, bidders = of_rid("bid_invite"), of_rid("bid_reply")
        called = of_rid("bid_request")
    # the free NPU (it serves any model), one CPU by what the metrics say (none has run a job:
    # all as good) and one at random; the third CPU never heard of it
    assert len(invited) == 3 and invited[2] == "npu-1" and len({"cpu-a", "cpu-b", "cpu-c"} - set(invited)) == 1
    assert called == [], "no call to everyone"
    assert bidders == invited, "only the invited bid"
    assert out["invited"] == 3 and out["roster"] == invited
    assert out["warnings"] == [], "closed when the invited had bid, not by the overdue rule or the window"
    assert out["winner"] == "npu-1" and out["path"] == "peer-npu" and out["text"] == "lights on"


def test_below_the_threshold_everyone_is_called(env: Env) -> None:
    asker = env.config("asker", auction={"bid_timeout_s": 20, "invite": {"above": 2}})
    peers = [env.config(f"cpu-{c}", cpu=sim(base_ms=1)) for c in "ab"]
    with env.node(peers[0]), env.node(peers[1]), env.spy(f"{env.prefix}bid/#") as spy:
        code, out, _, err = env.trigger(asker, "lights on")
        assert code == 0 and out is not None, err
        spy.bus.barrier(5)
        kinds = {(p.kind, p.device) for m in spy.seen if (p := env.topics.parse(m.topic)) and p.rid == out["rid"]}
    assert ("bid_request", None) in kinds and not any(k == "bid_invite" for k, _ in kinds)
    assert out["invited"] is None and out["roster"] == ["cpu-a", "cpu-b"] and out["text"] == "lights on"
