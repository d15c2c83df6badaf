from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.broker import Broker, BrokerUnavailableForTests, start_broker
from tests.support.fleet import Env


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """One real broker for the session (see tests/support/broker.py for the order)."""
    try:
        b = start_broker(tmp_path_factory.mktemp("mosquitto"))
    except BrokerUnavailableForTests as exc:
        pytest.skip(str(exc))
    yield b
    b.stop()


@pytest.fixture
def env(broker: Broker, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Env]:
    """A private corner of the broker: every topic of this test is under its own prefix."""
    name = re.sub(r"[^A-Za-z0-9_-]", "-", request.node.name)[:40]
    world = Env(broker=broker, prefix=f"test/{name}-{uuid.uuid4().hex[:8]}/", tmp=tmp_path)
    yield world
    world.close()
