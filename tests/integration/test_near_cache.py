"""
The near-cache against a real C{redis-server}: Redis's client tracking
tells the daemon of every change to a cached answer (a C{DEL}, an overwrite
by another client, a C{PEXPIRE}, a C{FLUSHALL}); while tracking is lost
(the subscriber connection killed, Redis restarted, C{CLIENT} renamed away)
no copy is served; while it holds, a hot key costs no Redis command at all.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from tests.fake_userli import FakeUserliServer
from tests.integration.conftest import DOMAIN, StartDaemon, userli_data
from tests.integration.harness import (
    Daemon,
    RedisServer,
    http_get,
    socketmap_query,
    wait_for,
)
from userli_postfix.cache import TRACKING_SILENCE, cache_key

pytestmark = pytest.mark.integration

ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"
ALIAS = f"info@{DOMAIN}"
KEY = cache_key("alias", ALIAS)


def lookup(daemon: Daemon, key: str = ALIAS) -> bytes:
    """One alias lookup on a connection of its own."""
    assert daemon.socketmap is not None
    return socketmap_query(daemon.socketmap, b"alias " + key.encode())[0]


def coherent(daemon: Daemon) -> bool:
    """What the daemon's near-cache gauge says."""
    status, body = http_get(daemon.metrics_url + "/metrics")
    assert status == 200
    match = re.search(rb"^userli_postfix_adapter_near_cache_coherent (\S+)$", body, re.M)
    assert match is not None, "no near-cache gauge"
    return float(match.group(1)) == 1.0


def api_calls(fake: FakeUserliServer) -> int:
    """Alias lookups the fake Userli has answered."""
    return len(fake.fake.requests("alias"))


def get_count(redis: RedisServer) -> int:
    """How many GET and MGET commands Redis has run (C{INFO commandstats})."""
    stats = str(redis.command("INFO", "commandstats"))
    total = 0
    for name in ("get", "mget", "eval"):
        match = re.search(rf"^cmdstat_{name}:calls=(\d+)", stats, re.M)
        if match is not None:
            total += int(match.group(1))
    return total


def warm(daemon: Daemon, fake: FakeUserliServer, redis: RedisServer) -> None:
    """Tracking established and the alias copied into the near-cache."""
    wait_for(lambda: coherent(daemon), "the near-cache to become coherent")
    assert lookup(daemon) == b"OK " + ALICE.encode()
    wait_for(lambda: redis.command("GET", KEY) is not None, "the answer to reach Redis")

    def copied() -> bool:
        # Our own write is reported back by Redis once; after that the
        # copy read from Redis stays until something changes.
        before = get_count(redis)
        assert lookup(daemon) == b"OK " + ALICE.encode()
        return get_count(redis) == before

    wait_for(copied, "a near-cache copy")


@pytest.fixture
def daemon(start_daemon: StartDaemon, redis_server: RedisServer) -> Daemon:
    """The daemon with a Redis lookup cache (and its near-cache)."""
    return start_daemon(redis=redis_server, env={"LOOKUP_CACHE_TTL": "300s"})


class TestCoherent:
    """While tracking holds."""

    def test_hot_key_costs_no_redis_command(
        self, daemon: Daemon, fake_userli: FakeUserliServer, redis_server: RedisServer
    ) -> None:
        """Repeated lookups of a copied key send no command to Redis at all."""
        warm(daemon, fake_userli, redis_server)
        before = str(redis_server.command("INFO", "commandstats"))
        calls = api_calls(fake_userli)
        for _ in range(20):
            assert lookup(daemon) == b"OK " + ALICE.encode()
        after = str(redis_server.command("INFO", "commandstats"))
        # Only our own INFO question was added.
        strip = re.compile(r"^cmdstat_info:.*$", re.M)
        assert strip.sub("", before) == strip.sub("", after)
        assert api_calls(fake_userli) == calls

    @pytest.mark.parametrize(
        "change",
        [
            ["DEL", KEY],
            ["PEXPIRE", KEY, "1"],
            ["FLUSHALL"],
        ],
        ids=["del", "pexpire", "flushall"],
    )
    def test_change_seen(
        self,
        daemon: Daemon,
        fake_userli: FakeUserliServer,
        redis_server: RedisServer,
        change: list[str],
    ) -> None:
        """A key dropped in Redis by anyone is asked of Userli again by the next lookup."""
        warm(daemon, fake_userli, redis_server)
        calls = api_calls(fake_userli)
        redis_server.command(*change)

        def asked() -> bool:
            assert lookup(daemon) == b"OK " + ALICE.encode()
            return api_calls(fake_userli) > calls

        wait_for(asked, "the next lookup to ask Userli", deadline=5.0)

    def test_overwrite_seen(
        self, daemon: Daemon, fake_userli: FakeUserliServer, redis_server: RedisServer
    ) -> None:
        """An entry rewritten by another client (the Go program) is served as rewritten."""
        warm(daemon, fake_userli, redis_server)
        redis_server.command("SET", KEY, f"OK {BOB}", "EX", "300")
        wait_for(lambda: lookup(daemon) == b"OK " + BOB.encode(), "the new value", deadline=5.0)

    def test_flushall_during_outage_is_temp(
        self, daemon: Daemon, fake_userli: FakeUserliServer, redis_server: RedisServer
    ) -> None:
        """After a FLUSHALL, an API outage is answered TEMP, as by the Go program."""
        warm(daemon, fake_userli, redis_server)
        fake_userli.set_mode("error")
        redis_server.command("FLUSHALL")
        wait_for(lambda: lookup(daemon).startswith(b"TEMP"), "TEMP", deadline=5.0)


class TestLost:
    """While tracking is lost, every lookup reads Redis."""

    def test_subscriber_killed(
        self, daemon: Daemon, fake_userli: FakeUserliServer, redis_server: RedisServer
    ) -> None:
        """
        With the subscriber connection killed the copies are dropped (a
        change then is still seen), and tracking comes back by itself.
        """
        warm(daemon, fake_userli, redis_server)
        redis_server.command("CLIENT", "KILL", "TYPE", "pubsub")
        # Nobody reports this change: only dropping the copies shows it.
        redis_server.command("SET", KEY, f"OK {BOB}", "EX", "300")
        wait_for(lambda: lookup(daemon) == b"OK " + BOB.encode(), "the new value", deadline=5.0)
        wait_for(lambda: "Near-cache off" in daemon.output(), "the log line")
        wait_for(lambda: coherent(daemon), "tracking to come back", deadline=10.0)
        redis_server.command("SET", KEY, f"OK {ALICE}", "EX", "300")
        wait_for(lambda: lookup(daemon) == b"OK " + ALICE.encode(), "the change", deadline=5.0)

    def test_silent_tracking_connection(
        self, daemon: Daemon, fake_userli: FakeUserliServer, redis_server: RedisServer
    ) -> None:
        """
        Redis falls silent without closing anything (frozen, as behind a
        partition): a little over a second later no copy is served any
        more, long before the silent connection is given up (its PING
        times out after 2 s).  The lookup reads Redis, which does not
        answer, and asks Userli, which has changed the alias meanwhile.
        """
        warm(daemon, fake_userli, redis_server)
        data = userli_data()
        data.aliases[ALIAS] = [BOB]
        fake_userli.set_data(data)
        os.kill(redis_server.pid, signal.SIGSTOP)
        try:
            time.sleep(TRACKING_SILENCE + 0.15)
            assert lookup(daemon) == b"OK " + BOB.encode()
        finally:
            os.kill(redis_server.pid, signal.SIGCONT)

    def test_redis_restart(
        self, daemon: Daemon, fake_userli: FakeUserliServer, redis_server: RedisServer
    ) -> None:
        """A restarted (empty) Redis: nothing stale is served, and tracking comes back."""
        warm(daemon, fake_userli, redis_server)
        redis_server.restart()
        fake_userli.set_mode("error")
        wait_for(lambda: lookup(daemon).startswith(b"TEMP"), "TEMP", deadline=10.0)
        fake_userli.set_mode("normal")
        wait_for(lambda: coherent(daemon), "tracking to come back", deadline=15.0)
        assert lookup(daemon) == b"OK " + ALICE.encode()

    def test_client_renamed_away(
        self, start_daemon: StartDaemon, fake_userli: FakeUserliServer, tmp_path: Path
    ) -> None:
        """
        A Redis where C{CLIENT} is renamed away cannot track: lookups are
        still right, from Redis, without copies.
        """
        config = tmp_path / "redis.conf"
        config.write_text('rename-command CLIENT ""\n')
        redis = RedisServer(tmp_path / "norename", config=config)
        redis.start()
        try:
            # Not redis=: the fixture would count clients with CLIENT LIST.
            daemon = start_daemon(env={"REDIS_URL": redis.url, "LOOKUP_CACHE_TTL": "300s"})
            assert lookup(daemon) == b"OK " + ALICE.encode()
            wait_for(lambda: redis.command("GET", KEY) is not None, "the answer in Redis")
            before = get_count(redis)
            assert lookup(daemon) == b"OK " + ALICE.encode()
            assert get_count(redis) > before
            assert not coherent(daemon)
            redis.command("SET", KEY, f"OK {BOB}", "EX", "300")
            assert lookup(daemon) == b"OK " + BOB.encode()
            assert "Redis refused client tracking" in daemon.output()
        finally:
            redis.stop()
