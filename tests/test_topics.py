from __future__ import annotations

import pytest

from agent.topics import ParsedTopic, Topics, is_id


@pytest.mark.parametrize("prefix", ["", "site-a/", "test/x-1/"])
def test_every_builder_parses_back(prefix: str) -> None:
    t = Topics(prefix)
    cases = {
        t.availability("dev"): ParsedTopic("availability", device="dev"),
        t.metrics("dev"): ParsedTopic("metrics", device="dev"),
        t.trigger("dev"): ParsedTopic("trigger", device="dev"),
        t.last_result("dev"): ParsedTopic("last_result", device="dev"),
        t.answer("dev", "a1"): ParsedTopic("answer", device="dev", nonce="a1"),
        t.sync("dev", "n1"): ParsedTopic("sync", device="dev", nonce="n1"),
        t.bid_request("r1"): ParsedTopic("bid_request", rid="r1"),
        t.bid_reply("hub", "r1", "dev"): ParsedTopic("bid_reply", device="dev", rid="r1", origin="hub"),
        t.bid_invite("dev", "r1", "hub"): ParsedTopic("bid_invite", device="dev", rid="r1", origin="hub"),
        t.exec("dev"): ParsedTopic("exec", device="dev"),
        t.cancel("dev", "hub"): ParsedTopic("cancel", device="dev", origin="hub"),
        t.result("hub", "r1", "dev"): ParsedTopic("result", device="dev", rid="r1", origin="hub"),
        t.ha_status(): ParsedTopic("ha_status"),
    }
    for topic, parsed in cases.items():
        assert t.parse(topic) == parsed, topic


def test_private_topics_name_who_may_read_and_write_them() -> None:
    """What the broker ACL relies on: the reader (origin) and the writer (device) are levels."""
    t = Topics("p/")
    assert t.bid_invite("d", "r", "hub") == "p/bid/invite/d/r/hub"
    assert t.bid_reply("hub", "r", "d") == "p/bid/reply/hub/r/d"
    assert t.all_bid_replies("hub") == "p/bid/reply/hub/+/+"
    assert t.result("hub", "r", "d") == "p/result/hub/r/d"
    assert t.all_results("hub") == "p/result/hub/+/+"
    assert t.cancel("d", "hub") == "p/exec/d/cancel/hub"
    assert t.cancels("d") == "p/exec/d/cancel/+"
    assert t.answer("d", "42") == "p/agent/d/answer/42"


def test_public_names_keep_the_seed_layout() -> None:
    t = Topics("p/")
    assert t.bid_request("r") == "p/bid/request/r", "still heard from orchestrators before calls named their caller"
    assert t.bid_request("r", "hub") == "p/bid/request/r/hub" and t.all_bid_requests() == "p/bid/request/#"
    assert t.parse("p/bid/request/r/hub") == ParsedTopic("bid_request", rid="r", origin="hub")
    assert t.exec("d") == "p/exec/d"
    assert t.ha_config("d") == "homeassistant/device/d/config", "HA discovery is not prefixed"


@pytest.mark.parametrize("topic", ["other/agent/d/metrics", "agent/d/unknown", "agent/d/metrics/extra",
                                   "bid/request/bad id", "result/hub/r", "exec/a/b/c", "", "agent//metrics",
                                   "bid/reply/r/d", "exec/d/cancel", "result/hub/r/d/x", "agent/d\n/metrics",
                                   "result/hub/r/bad id", "result/hub/bad id/d", "bid/reply/hub/r/bad id",
                                   "bid/request/r/bad id", "bid/request/r/hub/x"])
def test_foreign_or_malformed_topics_parse_to_none(topic: str) -> None:
    assert Topics().parse(topic) is None


@pytest.mark.parametrize("bad", ["a/b", "+", "#", "", "x" * 65, "sp ace", "dev\n", "a.b", "é"])
def test_builders_refuse_ids_that_would_break_the_layout(bad: str) -> None:
    assert not is_id(bad)
    with pytest.raises(ValueError):
        Topics().exec(bad)
