from __future__ import annotations

import pytest

from agent.topics import ParsedTopic, Topics


@pytest.mark.parametrize("prefix", ["", "site-a/", "test/x-1/"])
def test_every_builder_parses_back(prefix: str) -> None:
    t = Topics(prefix)
    cases = {
        t.availability("dev"): ParsedTopic("availability", device="dev"),
        t.metrics("dev"): ParsedTopic("metrics", device="dev"),
        t.trigger("dev"): ParsedTopic("trigger", device="dev"),
        t.last_result("dev"): ParsedTopic("last_result", device="dev"),
        t.sync("dev", "n1"): ParsedTopic("sync", device="dev"),
        t.bid_request("r1"): ParsedTopic("bid_request", rid="r1"),
        t.bid_reply("r1", "dev"): ParsedTopic("bid_reply", device="dev", rid="r1"),
        t.exec("dev"): ParsedTopic("exec", device="dev"),
        t.exec_result("r1", "dev"): ParsedTopic("exec_result", device="dev", rid="r1"),
        t.ha_status(): ParsedTopic("ha_status"),
    }
    for topic, parsed in cases.items():
        assert t.parse(topic) == parsed, topic


def test_layout_matches_the_design() -> None:
    t = Topics("p/")
    assert t.bid_reply("r", "d") == "p/bid/reply/r/d"
    assert t.exec_result("r", "d") == "p/exec/result/r/d"
    assert t.ha_config("d") == "homeassistant/device/d/config", "HA discovery is not prefixed"
    assert t.all_bid_requests() == "p/bid/request/+"


@pytest.mark.parametrize("topic", ["other/agent/d/metrics", "agent/d/unknown", "agent/d/metrics/extra",
                                   "bid/request/bad id", "exec/result/r", "exec/a/b/c", "", "agent//metrics"])
def test_foreign_or_malformed_topics_parse_to_none(topic: str) -> None:
    assert Topics().parse(topic) is None


@pytest.mark.parametrize("bad", ["a/b", "+", "#", "", "x" * 65, "sp ace"])
def test_builders_refuse_ids_that_would_break_the_layout(bad: str) -> None:
    with pytest.raises(ValueError):
        Topics().exec(bad)
