"""
Fixtures for the integration tests: a fake Userli in a thread, a private
C{redis-server}, and a factory that starts the daemon under C{twistd}.

Every test here starts real processes; they are marked C{integration} and
skipped, with the reason, where C{redis-server} or C{postmap} is missing.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from tests.fake_userli import FakeUserliServer, UserliData
from tests.integration.harness import Daemon, RedisServer, wait_for_redis

DOMAIN = "example.org"


def userli_data() -> UserliData:
    """
    The Userli every integration test starts from: one domain, a few
    mailboxes, an alias with one and one with several destinations, quotas,
    and the users whose logins Userli refuses.
    """
    return UserliData(
        users={
            f"alice@{DOMAIN}": "alice-password",
            f"bob@{DOMAIN}": "bob-password",
            f"limited@{DOMAIN}": "limited-password",
            f"spammer@{DOMAIN}": "spammer-password",
            f"stale@{DOMAIN}": "stale-password",
        },
        aliases={
            f"info@{DOMAIN}": [f"alice@{DOMAIN}"],
            f"team@{DOMAIN}": [f"alice@{DOMAIN}", f"bob@{DOMAIN}"],
        },
        domains={DOMAIN},
        quotas={f"limited@{DOMAIN}": (2, 3)},
        spam_users={f"spammer@{DOMAIN}"},
        password_change_users={f"stale@{DOMAIN}"},
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Skip what cannot run here instead of failing on a missing program."""
    missing = [p for p in ("redis-server", "postmap") if shutil.which(p) is None]
    if not missing:
        return
    skip = pytest.mark.skip(reason=f"not installed: {', '.join(missing)}")
    for item in items:
        if item.get_closest_marker("integration") is not None:
            item.add_marker(skip)


@pytest.fixture
def fake_userli() -> Iterator[FakeUserliServer]:
    """A fake Userli with L{userli_data}, on a free port, in a thread."""
    server = FakeUserliServer(userli_data())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private, empty C{redis-server} on a free port."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


StartDaemon = Callable[..., Daemon]


@pytest.fixture
def start_daemon(tmp_path: Path, fake_userli: FakeUserliServer) -> Iterator[StartDaemon]:
    """
    A factory: C{start_daemon(env={...}, redis=None, socketmap="inet",
    sasl=False)} starts the daemon against C{fake_userli} (and C{redis}, a
    L{RedisServer}, when given) and returns the running L{Daemon}.  Every
    daemon started is killed at the end of the test.
    """
    daemons: list[Daemon] = []

    def start(
        env: Mapping[str, str | None] | None = None,
        redis: RedisServer | None = None,
        socketmap: str = "inet",
        sasl: bool = False,
    ) -> Daemon:
        settings: dict[str, str | None] = {"USERLI_BASE_URL": fake_userli.url}
        if redis is not None:
            settings["REDIS_URL"] = redis.url
        settings.update(env or {})
        daemon = Daemon(
            settings, tmp_path / f"daemon-{len(daemons)}", socketmap=socketmap, sasl=sasl
        )
        daemons.append(daemon)
        connected = redis is not None and redis.running and settings.get("REDIS_URL") == redis.url
        before = redis.last_client_id() if connected and redis is not None else 0
        daemon.start()
        if connected and redis is not None:
            # The daemon connects to Redis in the background; until then the
            # policy server fails open and lookups miss the cache, which is
            # right for the daemon but not what a test asking at once means.
            try:
                wait_for_redis(redis, daemon, after=before)
            except OSError as error:
                # Say what the daemon was doing when its /metrics failed.
                state = "runs" if daemon.running else f"exited with status {daemon.wait()}"
                raise AssertionError(
                    f"{error!r} while waiting for the daemon to use Redis; the daemon "
                    f"{state}; its log:\n{daemon.output()[-4000:]}"
                ) from error
        return daemon

    try:
        yield start
    finally:
        for daemon in daemons:
            daemon.kill()
