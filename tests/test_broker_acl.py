"""The production ACL really stops one device from speaking for another.

A private Mosquitto is started with the ACL ``broker_acl`` generates (what
scripts/provision writes) and a password file made here; then device "alice" tries to
act as "bob" on every topic that carries identity. tests/test_security.py runs the whole
provisioned setup (TLS, client id = username) and the attacks on real work.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.bus import Bus
from agent.config import BrokerConfig
from agent.errors import BrokerUnavailable
from agent.topics import Topics, broker_acl
from tests.support.fleet import Spy
from tests.support.mosquitto import REPO, LocalMosquitto

pytestmark = pytest.mark.skipif(not shutil.which("mosquitto") or not shutil.which("mosquitto_passwd"),
                                reason="needs the mosquitto and mosquitto_passwd binaries")
USERS = {"alice": "a-secret", "bob": "b-secret", "homeassistant": "h-secret"}
T = Topics()


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMosquitto]:
    work = tmp_path_factory.mktemp("secured")
    passwd = work / "passwd"
    for i, (user, password) in enumerate(USERS.items()):
        subprocess.run(["mosquitto_passwd", *(["-c"] if i == 0 else []), "-b", str(passwd), user, password],
                       check=True, capture_output=True)
    passwd.chmod(0o600)
    acl = work / "acl"
    acl.write_text(broker_acl(T, ["alice", "bob"], ["homeassistant"]))
    broker = LocalMosquitto(work, extra_conf=(
        f"allow_anonymous false\npassword_file {passwd}\nacl_file {acl}\n"))
    broker.start()
    yield broker
    broker.stop()


def client(broker: LocalMosquitto, user: str, tmp: Path, *, password: str | None = None) -> Bus:
    pw = tmp / f"{user}.pw"
    pw.write_text(password if password is not None else USERS[user])
    pw.chmod(0o600)
    cfg = BrokerConfig(host=broker.host, port=broker.port, username=user, password_file=str(pw))
    bus = Bus(f"{user}-test", cfg, persistent=False, name=user, sync_topic=T.sync(user, "acl"))
    bus.connect(5)
    return bus


def test_anonymous_and_wrong_password_are_refused(secured: LocalMosquitto, tmp_path: Path) -> None:
    anon = Bus("anon", BrokerConfig(host=secured.host, port=secured.port), persistent=False,
               sync_topic=T.sync("anon", "acl"))
    with pytest.raises(BrokerUnavailable, match="refused|not authorized|disconnected"):
        anon.connect(3)
    with pytest.raises(BrokerUnavailable):
        client(secured, "alice", tmp_path, password="guess")


def test_a_device_cannot_speak_for_another(secured: LocalMosquitto, tmp_path: Path) -> None:
    alice = client(secured, "alice", tmp_path)
    bob = client(secured, "bob", tmp_path)
    ha = client(secured, "homeassistant", tmp_path)
    try:
        public = Spy(ha, "#")          # what Home Assistant may read
        private = Spy(bob, "#")        # what bob may read (his bids and results)
        spoofs = [T.bid_reply("bob", "r1", "bob"), T.result("bob", "r1", "bob"), T.availability("bob"),
                  T.metrics("bob"), T.ha_config("bob"), T.cancel("carol", "bob"),
                  T.bid_request("r2", "bob"), T.bid_request("r3"),  # calls: as yourself, naming yourself
                  T.capabilities("alice"), T.capabilities("bob")]  # what a device may claim: operators only
        for topic in spoofs:
            alice.publish(topic, b"spoof")
        honest = [(T.bid_reply("bob", "r1", "alice"), private), (T.result("bob", "r1", "alice"), private),
                  (T.availability("alice"), public), (T.bid_request("r4", "alice"), private)]
        for topic, _ in honest:
            alice.publish(topic, b"honest")
        assert alice.barrier(5)
        for topic, spy in honest:
            spy.wait_for(lambda m, t=topic: m.topic == t, what=topic)
        assert ha.barrier(5) and bob.barrier(5)
        got = {m.topic for m in public.seen + private.seen if m.payload == b"spoof"}
        assert got == set(), f"spoofed messages got through: {got}"
    finally:
        for bus in (alice, bob, ha):
            bus.stop()


def test_a_device_reads_only_its_own_jobs(secured: LocalMosquitto, tmp_path: Path) -> None:
    alice = client(secured, "alice", tmp_path)
    bob = client(secured, "bob", tmp_path)
    try:
        snoop = Spy(alice, T.exec("bob"))
        own = Spy(bob, T.exec("bob"))
        alice.publish(T.exec("bob"), b"job for bob")  # orchestrators may send to anyone
        own.wait_for(lambda m: m.payload == b"job for bob", what="bob's job")
        assert alice.barrier(5)
        assert not snoop.seen, "alice read bob's job queue"
    finally:
        alice.stop()
        bob.stop()


def test_invitations_are_sent_only_as_yourself_and_read_only_by_the_invitee(secured: LocalMosquitto,
                                                                            tmp_path: Path) -> None:
    alice = client(secured, "alice", tmp_path)
    bob = client(secured, "bob", tmp_path)
    try:
        snoop = Spy(alice, "bid/invite/#")             # alice tries to read every invitation
        own = Spy(bob, T.bid_invites("bob"))
        alice.publish(T.bid_invite("bob", "r1", "bob"), b"spoof")        # inviting as bob: refused
        alice.publish(T.bid_invite("bob", "r2", "alice"), b"honest")    # inviting bob as herself: delivered
        bob.publish(T.bid_invite("carol", "r3", "bob"), b"for carol")   # not alice's to read
        own.wait_for(lambda m: m.payload == b"honest", what="alice's invitation to bob")
        assert alice.barrier(5) and bob.barrier(5)
        assert [m.payload for m in own.seen] == [b"honest"], "an invitation in bob's name got through"
        assert [m.topic for m in snoop.seen] == [], "alice read invitations addressed to others"
    finally:
        alice.stop()
        bob.stop()


def test_the_shipped_example_acl_is_what_the_generator_writes() -> None:
    shipped = (REPO / "mosquitto" / "edge-agent.acl").read_text()
    generated = broker_acl(T, ["kitchen-pi", "laptop", "board-01"], ["homeassistant"])

    def rules(text: str) -> list[str]:
        return [line for line in text.splitlines() if line and not line.startswith("#")]
    assert rules(shipped) == rules(generated), "regenerate mosquitto/edge-agent.acl (agent.topics.broker_acl)"
