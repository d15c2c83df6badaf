from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.broker import Broker, BrokerUnavailableForTests, start_broker
from tests.support.fleet import Env


@pytest.fixture(autouse=True)
def _no_view_keepers_left() -> Iterator[None]:
    """A test's invited auctions leave no keeper thread ticking in the next tests."""
    yield
    if "agent.viewkeeper" in sys.modules:
        sys.modules["agent.viewkeeper"].stop_all()


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


# ------------------------------------------------------------------ a suite that leaves nothing behind
# Every test process (and what it starts) gets a HOME and a TMPDIR of the session's own
# (so suites run side by side cannot meet in a shared HOME either); at the end, anything
# left in them but pytest's own temporary tree is a leak: the run fails naming it, and
# the directories are removed either way.
_HERMETIC: list[Path] = []


def pytest_configure(config: pytest.Config) -> None:
    root = Path(tempfile.mkdtemp(prefix="edge-agent-suite-"))
    root.chmod(0o711)  # traversable: a broker run as its own user (RabbitMQ) has its directory in TMPDIR
    for var in ("HOME", "TMPDIR"):
        (root / var).mkdir(mode=0o711)
        os.environ[var] = str(root / var)
    tempfile.tempdir = str(root / "TMPDIR")  # pytest's tmp_path too (it reads this lazily)
    _HERMETIC.append(root)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for root in _HERMETIC:
        left = sorted(str(p.relative_to(root)) for p in root.glob("*/*") if not p.name.startswith("pytest-of-"))
        shutil.rmtree(root, ignore_errors=True)
        if left:
            print(f"\nerror: the suite left files behind (in its own HOME/TMPDIR): {', '.join(left)}",
                  file=sys.stderr)
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
