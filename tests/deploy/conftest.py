"""
Fixtures for the deployment tests: the Docker engine (started here when none
runs, skipped with the reason when none can), and a fake Userli for the
daemons and containers these tests start.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy.engine import Engine, Unavailable, start_engine
from tests.fake_userli import FakeUserliServer
from tests.integration.conftest import userli_data


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[Engine]:
    """A running Docker engine; the test is skipped (with why) when none can run."""
    try:
        engine = start_engine()
    except Unavailable as reason:
        pytest.skip(f"no Docker engine can run here: {reason}")
    try:
        yield engine
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def module_userli() -> Iterator[FakeUserliServer]:
    """A fake Userli (the integration tests' data) for a whole module."""
    server = FakeUserliServer(userli_data())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def module_tmp() -> Iterator[Path]:
    """A scratch directory for a whole module."""
    with tempfile.TemporaryDirectory(prefix="deploy-") as name:
        yield Path(name)
