"""
The socketmap listener end to end: the daemon under twistd, asked by
Postfix's own C{postmap -q}, answering from a fake Userli and a real
C{redis-server}, and the same without C{REDIS_URL}.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fake_userli import (
    EMPTY,
    ERROR,
    GARBAGE,
    NORMAL,
    REDIRECT,
    REFUSED,
    SLOW,
    TOKEN,
    WRONG_TYPE,
    FakeUserliServer,
)
from tests.integration.conftest import DOMAIN, StartDaemon
from tests.integration.harness import Daemon, RedisServer, postmap, socketmap_query, wait_for

pytestmark = pytest.mark.integration

ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"


@pytest.fixture(params=["redis", "memory"])
def redis(request: pytest.FixtureRequest) -> Iterator[RedisServer | None]:
    """
    Each test runs twice: with C{REDIS_URL} (a private redis-server) and
    without it (the in-memory cache), which must behave the same.
    """
    if request.param == "memory":
        yield None
        return
    yield request.getfixturevalue("redis_server")


def found(daemon: Daemon, map_name: str, key: str) -> str:
    """postmap's answer for a key that must be found: the value."""
    status, stdout, stderr = postmap(key, daemon.socketmap_target(map_name))
    assert (status, stderr) == (0, ""), (map_name, key, stdout, stderr)
    return stdout.rstrip("\n")


def not_found(daemon: Daemon, map_name: str, key: str) -> None:
    """postmap says "not found": exit 1, no value and no error."""
    status, stdout, stderr = postmap(key, daemon.socketmap_target(map_name))
    assert (status, stdout, stderr) == (1, "", ""), (map_name, key)


def temporary_error(daemon: Daemon, map_name: str, key: str) -> None:
    """postmap reports the server's TEMP reply."""
    status, stdout, stderr = postmap(key, daemon.socketmap_target(map_name))
    assert (status, stdout) == (1, ""), (map_name, key)
    assert "socketmap server temporary error" in stderr, stderr


def api_keys(fake: FakeUserliServer, endpoint: str) -> list[str | None]:
    """The keys the daemon asked Userli on one endpoint, in order."""
    return [r.key for r in fake.requests(endpoint)]


class TestLookups:
    """Each of the four maps answers found, several results, and not found."""

    @pytest.mark.parametrize("socketmap", ["inet", "unix"])
    @pytest.mark.parametrize(
        ("map_name", "key", "value"),
        [
            ("alias", f"info@{DOMAIN}", ALICE),
            ("domain", DOMAIN, "1"),
            ("mailbox", ALICE, "1"),
            ("senders", ALICE, ALICE),
        ],
    )
    def test_found(
        self,
        start_daemon: StartDaemon,
        fake_userli: FakeUserliServer,
        redis: RedisServer | None,
        socketmap: str,
        map_name: str,
        key: str,
        value: str,
    ) -> None:
        """
        A key Userli knows is answered with its value over TCP and over a
        UNIX socket, after one API call on the map's endpoint.
        """
        daemon = start_daemon(redis=redis, socketmap=socketmap)
        assert found(daemon, map_name, key) == value
        assert api_keys(fake_userli, map_name) == [key]

    @pytest.mark.parametrize("map_name", ["alias", "senders"])
    def test_several(
        self,
        start_daemon: StartDaemon,
        fake_userli: FakeUserliServer,
        redis: RedisServer | None,
        map_name: str,
    ) -> None:
        """Several results are joined with commas, in Userli's order."""
        daemon = start_daemon(redis=redis)
        assert found(daemon, map_name, f"team@{DOMAIN}") == f"{ALICE},{BOB}"

    @pytest.mark.parametrize(
        ("map_name", "key"),
        [
            ("alias", f"nobody@{DOMAIN}"),
            ("alias", ALICE),
            ("domain", "example.net"),
            ("mailbox", f"nobody@{DOMAIN}"),
            ("mailbox", f"info@{DOMAIN}"),
            ("senders", f"nobody@{DOMAIN}"),
        ],
    )
    def test_not_found(
        self,
        start_daemon: StartDaemon,
        fake_userli: FakeUserliServer,
        redis: RedisServer | None,
        map_name: str,
        key: str,
    ) -> None:
        """An empty list or C{false} from Userli is "not found", not an error."""
        daemon = start_daemon(redis=redis)
        not_found(daemon, map_name, key)
        assert api_keys(fake_userli, map_name) == [key]

    def test_api_request(self, start_daemon: StartDaemon, fake_userli: FakeUserliServer) -> None:
        """The API call carries the token, asks for JSON and names the daemon."""
        daemon = start_daemon()
        found(daemon, "mailbox", ALICE)
        (request,) = fake_userli.requests()
        assert (request.method, request.raw_path) == ("GET", f"/api/postfix/mailbox/{ALICE}")
        assert request.headers["authorization"] == f"Bearer {TOKEN}"
        assert request.headers["accept"] == "application/json"
        assert request.headers["user-agent"].startswith("userli-postfix/")

    def test_unknown_map(self, start_daemon: StartDaemon, fake_userli: FakeUserliServer) -> None:
        """An unknown map name is a permanent error (a Postfix configuration mistake)."""
        daemon = start_daemon()
        status, stdout, stderr = postmap(ALICE, daemon.socketmap_target("users"))
        assert (status, stdout) == (1, "")
        assert "socketmap server permanent error" in stderr
        assert fake_userli.requests() == []

    def test_one_connection_many_requests(
        self, start_daemon: StartDaemon, fake_userli: FakeUserliServer
    ) -> None:
        """Requests pipelined on one connection are answered in order."""
        daemon = start_daemon()
        assert daemon.socketmap is not None
        replies = socketmap_query(
            daemon.socketmap,
            [
                f"alias team@{DOMAIN}".encode(),
                f"mailbox nobody@{DOMAIN}".encode(),
                f"domain {DOMAIN}".encode(),
                b"nosuchmap x",
                f"senders {ALICE}".encode(),
            ],
        )
        assert replies[0] == f"OK {ALICE},{BOB}".encode()
        assert replies[1].split(b" ")[0] == b"NOTFOUND"
        assert replies[2] == b"OK 1"
        assert replies[3].startswith(b"PERM ")
        assert replies[4] == f"OK {ALICE}".encode()


class TestKeys:
    """Keys are normalised before Userli sees them; hopeless keys never reach it."""

    @pytest.mark.parametrize("map_name", ["alias", "mailbox", "senders"])
    def test_recipient_delimiter(
        self,
        start_daemon: StartDaemon,
        fake_userli: FakeUserliServer,
        redis: RedisServer | None,
        map_name: str,
    ) -> None:
        """With a delimiter, C{user+tag@x} is looked up as C{user@x}."""
        daemon = start_daemon(redis=redis, env={"POSTFIX_RECIPIENT_DELIMITER": "+"})
        key = f"info+news@{DOMAIN}" if map_name == "alias" else f"alice+news@{DOMAIN}"
        assert found(daemon, map_name, key) == ("1" if map_name == "mailbox" else ALICE)
        assert api_keys(fake_userli, map_name) == [key.replace("+news", "")]

    def test_several_delimiters(
        self, start_daemon: StartDaemon, fake_userli: FakeUserliServer
    ) -> None:
        """Every character of the delimiter setting is a delimiter, as in Postfix."""
        daemon = start_daemon(env={"POSTFIX_RECIPIENT_DELIMITER": "+-"})
        assert found(daemon, "mailbox", f"alice-news@{DOMAIN}") == "1"
        assert found(daemon, "mailbox", f"bob+x-y@{DOMAIN}") == "1"
        assert api_keys(fake_userli, "mailbox") == [ALICE, BOB]

    def test_no_delimiter(self, start_daemon: StartDaemon, fake_userli: FakeUserliServer) -> None:
        """Without a delimiter, C{+} is not a local-part character: no API call."""
        daemon = start_daemon()
        not_found(daemon, "mailbox", f"alice+news@{DOMAIN}")
        assert fake_userli.requests() == []

    @pytest.mark.parametrize(
        ("map_name", "key", "value", "asked"),
        [
            ("alias", f"TEAM@{DOMAIN.upper()}", f"{ALICE},{BOB}", f"team@{DOMAIN}"),
            ("domain", "Example.ORG", "1", DOMAIN),
            ("mailbox", "Alice@Example.Org", "1", ALICE),
            ("senders", "ALICE@EXAMPLE.ORG", ALICE, ALICE),
        ],
    )
    def test_upper_case(
        self,
        start_daemon: StartDaemon,
        fake_userli: FakeUserliServer,
        redis: RedisServer | None,
        map_name: str,
        key: str,
        value: str,
        asked: str,
    ) -> None:
        """
        postmap sends the key as typed; the daemon lower-cases it, through
        postmap and through raw netstrings alike (smtpd may fold case first,
        so only a raw client proves the daemon does it).
        """
        daemon = start_daemon(redis=redis, env={"LOOKUP_CACHE_TTL": "0"})
        assert found(daemon, map_name, key) == value
        assert daemon.socketmap is not None
        (reply,) = socketmap_query(daemon.socketmap, f"{map_name} {key}".encode())
        assert reply == f"OK {value}".encode()
        assert api_keys(fake_userli, map_name) == [asked, asked]

    @pytest.mark.parametrize(
        ("map_name", "key"),
        [
            ("alias", f"bad*char@{DOMAIN}"),
            ("alias", f"a&b@{DOMAIN}"),
            ("mailbox", f"two@at@{DOMAIN}"),
            ("mailbox", f"@{DOMAIN}"),
            ("mailbox", "no-at-sign"),
            ("senders", f"quote'd@{DOMAIN}"),
            ("senders", f"sla/sh@{DOMAIN}"),
            ("mailbox", f"../alias/info@{DOMAIN}"),
            ("domain", "exa/mple.org"),
            ("domain", "example.org?x"),
            ("domain", ".."),
        ],
    )
    def test_invalid_key(
        self,
        start_daemon: StartDaemon,
        fake_userli: FakeUserliServer,
        redis: RedisServer | None,
        map_name: str,
        key: str,
    ) -> None:
        """A key that cannot be a Userli address or domain is not found, without an API call."""
        daemon = start_daemon(redis=redis)
        not_found(daemon, map_name, key)
        assert fake_userli.requests() == []


class TestApiFailures:
    """When Userli gives no usable answer, Postfix is told to try again later."""

    @pytest.mark.parametrize("mode", [ERROR, REFUSED, GARBAGE, WRONG_TYPE, EMPTY, REDIRECT])
    def test_temporary_error(
        self, start_daemon: StartDaemon, fake_userli: FakeUserliServer, mode: str
    ) -> None:
        """
        A refused connection, a 500, an HTML page, JSON of the wrong type, an
        empty body or a redirect is a temporary error on every map, never
        data or "not found".
        """
        daemon = start_daemon()
        fake_userli.set_mode(mode)
        temporary_error(daemon, "alias", f"info@{DOMAIN}")
        temporary_error(daemon, "domain", DOMAIN)
        temporary_error(daemon, "mailbox", ALICE)
        temporary_error(daemon, "senders", ALICE)

    def test_slow_api(self, start_daemon: StartDaemon, fake_userli: FakeUserliServer) -> None:
        """An API that does not answer within the lookup's bound is a temporary error."""
        daemon = start_daemon()
        fake_userli.set_mode(SLOW, delay=60)
        temporary_error(daemon, "mailbox", ALICE)
        assert api_keys(fake_userli, "mailbox") == [ALICE]

    def test_recovers(
        self, start_daemon: StartDaemon, fake_userli: FakeUserliServer, redis: RedisServer | None
    ) -> None:
        """
        A failure is not cached: once Userli is back, the next lookup is
        answered, and so is a key that failed.
        """
        daemon = start_daemon(redis=redis)
        fake_userli.set_mode(REFUSED)
        temporary_error(daemon, "alias", f"team@{DOMAIN}")
        fake_userli.set_mode(NORMAL)
        assert found(daemon, "alias", f"team@{DOMAIN}") == f"{ALICE},{BOB}"

    def test_bad_token(self, start_daemon: StartDaemon, fake_userli: FakeUserliServer) -> None:
        """A token Userli refuses (401) is a temporary error, never "not found"."""
        daemon = start_daemon(env={"USERLI_TOKEN": "wrong-token"})
        temporary_error(daemon, "mailbox", ALICE)
        temporary_error(daemon, "alias", f"nobody@{DOMAIN}")


class TestCache:
    """OK answers are cached; the cache carries lookups through an API outage."""

    @pytest.mark.parametrize(
        ("map_name", "key", "value"),
        [
            ("alias", f"team@{DOMAIN}", f"{ALICE},{BOB}"),
            ("domain", DOMAIN, "1"),
            ("mailbox", ALICE, "1"),
            ("senders", ALICE, ALICE),
        ],
    )
    def test_served_while_api_down(
        self,
        start_daemon: StartDaemon,
        fake_userli: FakeUserliServer,
        redis: RedisServer | None,
        map_name: str,
        key: str,
        value: str,
    ) -> None:
        """A cached answer is served while Userli is down, without asking it."""
        daemon = start_daemon(redis=redis)
        assert found(daemon, map_name, key) == value
        fake_userli.set_mode(REFUSED)
        assert found(daemon, map_name, key) == value
        assert api_keys(fake_userli, map_name) == [key]

    def test_not_found_not_cached(
        self, start_daemon: StartDaemon, fake_userli: FakeUserliServer, redis: RedisServer | None
    ) -> None:
        """A NOTFOUND is not cached: a mailbox created a moment later works at once."""
        daemon = start_daemon(redis=redis)
        key = f"carol@{DOMAIN}"
        not_found(daemon, "mailbox", key)
        data = fake_userli.data
        data.users = {**data.users, key: "carol-password"}
        assert found(daemon, "mailbox", key) == "1"
        assert api_keys(fake_userli, "mailbox") == [key, key]

    def test_ttl_zero(
        self, start_daemon: StartDaemon, fake_userli: FakeUserliServer, redis: RedisServer | None
    ) -> None:
        """C{LOOKUP_CACHE_TTL=0} turns the cache off: every lookup asks Userli."""
        daemon = start_daemon(redis=redis, env={"LOOKUP_CACHE_TTL": "0"})
        assert found(daemon, "mailbox", ALICE) == "1"
        assert found(daemon, "mailbox", ALICE) == "1"
        assert api_keys(fake_userli, "mailbox") == [ALICE, ALICE]
        fake_userli.set_mode(REFUSED)
        temporary_error(daemon, "mailbox", ALICE)
        if redis is not None:
            assert redis.command("KEYS", "userli:lookup:*") == []


class TestRedisLayout:
    """The Redis cache uses the Go program's layout, so both can share one Redis."""

    @pytest.mark.parametrize(
        ("map_name", "key", "value"),
        [
            ("alias", f"Team+x@{DOMAIN}", f"OK {ALICE},{BOB}"),
            ("domain", DOMAIN, "OK 1"),
            ("mailbox", ALICE, "OK 1"),
            ("senders", ALICE, f"OK {ALICE}"),
        ],
    )
    def test_written(
        self,
        start_daemon: StartDaemon,
        redis_server: RedisServer,
        map_name: str,
        key: str,
        value: str,
    ) -> None:
        """
        An OK answer is stored under C{userli:lookup:<map>:<key as sent>},
        its value the reply text, expiring after C{LOOKUP_CACHE_TTL}.
        """
        daemon = start_daemon(
            redis=redis_server,
            env={"LOOKUP_CACHE_TTL": "2m", "POSTFIX_RECIPIENT_DELIMITER": "+"},
        )
        found(daemon, map_name, key)
        redis_key = f"userli:lookup:{map_name}:{key}"
        # The answer leaves before its write to Redis lands: wait for it.
        wait_for(
            lambda: redis_server.command("GET", redis_key) is not None,
            "the answer to be written to Redis",
        )
        assert redis_server.command("GET", redis_key) == value
        ttl = redis_server.command("TTL", redis_key)
        assert isinstance(ttl, int) and 0 < ttl <= 120

    def test_read(
        self, start_daemon: StartDaemon, fake_userli: FakeUserliServer, redis_server: RedisServer
    ) -> None:
        """An entry the Go program wrote is served as it is, without an API call."""
        redis_server.command("SET", f"userli:lookup:alias:legacy@{DOMAIN}", "OK old@example.net")
        redis_server.command("SET", f"userli:lookup:mailbox:legacy@{DOMAIN}", "OK 1")
        daemon = start_daemon(redis=redis_server)
        assert found(daemon, "alias", f"legacy@{DOMAIN}") == "old@example.net"
        assert found(daemon, "mailbox", f"legacy@{DOMAIN}") == "1"
        assert fake_userli.requests() == []

    def test_shared_across_restarts(
        self, start_daemon: StartDaemon, fake_userli: FakeUserliServer, redis_server: RedisServer
    ) -> None:
        """
        What one daemon cached in Redis, the next one serves while Userli is
        down: the cache outlives the process, as with the Go program.
        """
        first = start_daemon(redis=redis_server)
        assert found(first, "alias", f"team@{DOMAIN}") == f"{ALICE},{BOB}"
        # The answer leaves before its write to Redis lands, and SIGKILL
        # would lose a write still on its way: wait for it.
        wait_for(
            lambda: redis_server.command("EXISTS", f"userli:lookup:alias:team@{DOMAIN}") == 1,
            "the answer to be written to Redis",
        )
        first.kill()
        fake_userli.set_mode(REFUSED)
        second = start_daemon(redis=redis_server)
        assert found(second, "alias", f"team@{DOMAIN}") == f"{ALICE},{BOB}"
        assert api_keys(fake_userli, "alias") == [f"team@{DOMAIN}"]

    def test_failures_not_written(
        self, start_daemon: StartDaemon, fake_userli: FakeUserliServer, redis_server: RedisServer
    ) -> None:
        """NOTFOUND, TEMP and PERM answers leave nothing in Redis."""
        daemon = start_daemon(redis=redis_server)
        not_found(daemon, "mailbox", f"nobody@{DOMAIN}")
        not_found(daemon, "alias", f"bad*char@{DOMAIN}")
        postmap(ALICE, daemon.socketmap_target("nosuchmap"))
        fake_userli.set_mode(ERROR)
        temporary_error(daemon, "mailbox", ALICE)
        assert redis_server.command("KEYS", "*") == []

    def test_redis_down(
        self, start_daemon: StartDaemon, fake_userli: FakeUserliServer, redis_server: RedisServer
    ) -> None:
        """
        With Redis gone, lookups are answered from the API (a Redis error is a
        cache miss); once Redis is back, answers are cached there again.
        """
        daemon = start_daemon(redis=redis_server)
        redis_server.stop()
        assert found(daemon, "alias", f"team@{DOMAIN}") == f"{ALICE},{BOB}"
        assert found(daemon, "mailbox", ALICE) == "1"
        redis_server.start()
        fresh = iter(range(1_000_000))

        def cached() -> bool:
            # A new mailbox each time: an answer the daemon already holds in
            # memory would never be written to Redis again.
            key = f"new{next(fresh)}@{DOMAIN}"
            data = fake_userli.data
            data.users = {**data.users, key: "password"}
            found(daemon, "mailbox", key)
            return redis_server.command("GET", f"userli:lookup:mailbox:{key}") == "OK 1"

        wait_for(cached, "the daemon to write to Redis again after it came back")
