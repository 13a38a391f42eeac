"""
The rate limiter against a real C{redis-server}: the window arithmetic of
the unit tests run by the real script, windows shared with the Go program
in both directions, Redis going away and coming back under a running
daemon, and two daemons enforcing one quota.
"""

from __future__ import annotations

import re
import shutil
import socket
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import txredisapi
from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from tests.fake_userli import FakeUserliServer
from tests.integration.conftest import StartDaemon
from tests.integration.harness import (
    STARTUP_DEADLINE,
    RedisReplyError,
    RedisServer,
    http_get,
    wait_for,
)
from tests.test_ratelimit import START, WindowArithmeticMixin
from userli_postfix.metrics import Metrics
from userli_postfix.ratelimit import (
    DAY_NS,
    HOUR_NS,
    MAX_KEPT,
    RateLimiter,
    RateLimitError,
    RedisRateLimiter,
    Verdict,
    window_key,
)
from userli_postfix.redisclient import POOL_SIZE
from userli_postfix.userli import Quota

pytestmark = pytest.mark.integration

LIMITED = "limited@example.org"
KEY = window_key(LIMITED)
MEMBER = re.compile(r"^([0-9]+):[0-9a-f]{8}$")


class BlockingRedis:
    """
    The L{RedisClient} interface over the harness's blocking Redis client:
    the limiter runs its real script on a real Redis, and the test stays
    synchronous (no reactor), with a fake clock for the window times.
    """

    def __init__(self, server: RedisServer) -> None:
        self.server = server
        self.commands: list[str] = []

    def execute(self, command: str, *args: Any) -> defer.Deferred[Any]:
        self.commands.append(command)
        try:
            return defer.succeed(self.server.command(command, *args))
        except RedisReplyError as error:
            return defer.fail(txredisapi.ResponseError(str(error)))


class RedisTestMixin:
    """A private C{redis-server} for each test."""

    def startRedis(self) -> RedisServer:
        directory = tempfile.mkdtemp(prefix="redis-")
        self.addCleanup(shutil.rmtree, directory, True)  # type: ignore[attr-defined]
        server = RedisServer(Path(directory))
        server.start()
        self.addCleanup(server.stop)  # type: ignore[attr-defined]
        return server


class RedisWindowArithmeticTests(RedisTestMixin, WindowArithmeticMixin, SynchronousTestCase):
    """The window arithmetic of the unit tests, computed by the script in Redis."""

    def makeLimiter(self, clock: task.Clock) -> RateLimiter:
        self.redis = BlockingRedis(self.startRedis())
        return RedisRateLimiter(self.redis, clock, Metrics(process=False))  # type: ignore[arg-type]

    def windowSize(self, identity: str = LIMITED) -> int:
        size = self.redis.server.command("ZCARD", window_key(identity))
        assert isinstance(size, int)
        return size

    def test_scriptRunsByHash(self) -> None:
        """The script travels once; later steps name it by its hash."""
        self.steps(3, Quota(per_hour=10, per_day=0))
        self.assertEqual(self.redis.commands, ["EVAL", "EVALSHA", "EVALSHA"])

    def test_scriptFlushed(self) -> None:
        """After Redis forgot the script, the next step sends it again and counts go on."""
        quota = Quota(per_hour=2, per_day=0)
        self.assertEqual(self.steps(2, quota), [True, True])
        self.redis.server.command("SCRIPT", "FLUSH")
        self.assertEqual(self.step(quota), Verdict(False, 3, 3))
        self.assertEqual(self.redis.commands, ["EVAL", "EVALSHA", "EVALSHA", "EVAL"])

    def test_oneTurn(self) -> None:
        """
        Steps of one turn of the reactor, run by one script call, are each
        atomic and run in order, whatever their keys.
        """
        quota = Quota(per_hour=3, per_day=0)
        identities = ["a@example.org", "b@example.org"] * 4 + ["a@example.org"]
        pending = [self.limiter.check(identity, quota) for identity in identities]
        self.clock.advance(0)
        verdicts = [self.successResultOf(d) for d in pending]  # type: ignore[arg-type]
        # a's fifth attempt reads 4: its window keeps limit + 1 members.
        self.assertEqual([v.hour_count for v in verdicts], [1, 1, 2, 2, 3, 3, 4, 4, 4])
        self.assertEqual([v.allowed for v in verdicts], [True] * 6 + [False] * 3)
        self.assertEqual(self.redis.commands, ["EVAL"])


class GoLayoutTests(RedisTestMixin, SynchronousTestCase):
    """
    The Go program and this daemon share the windows in Redis: each
    continues what the other wrote.
    """

    def setUp(self) -> None:
        self.server = self.startRedis()
        self.clock = task.Clock()
        self.clock.advance(START)
        self.limiter = RedisRateLimiter(
            BlockingRedis(self.server),  # type: ignore[arg-type]
            self.clock,
            Metrics(process=False),
        )

    def now(self) -> int:
        return int(self.clock.seconds() * 1_000_000_000)

    def goStep(self, quota: Quota, suffix: str, key: str = KEY) -> bool:
        """
        One step as the Go program takes it, spelt out as the plain commands
        its script runs: the same key, member, score, expiry and bounds.
        """
        now = self.now()
        command = self.server.command
        command("ZREMRANGEBYSCORE", key, "-inf", f"({now - DAY_NS}")
        command("ZADD", key, now, f"{now}:{suffix}")
        command("EXPIRE", key, 25 * 3600)
        day = command("ZCARD", key)
        hour = command("ZCOUNT", key, f"({now - HOUR_NS}", "+inf")
        assert isinstance(day, int) and isinstance(hour, int)
        return not (0 < quota.per_hour < hour or 0 < quota.per_day < day)

    def step(self, quota: Quota) -> Verdict:
        d = self.limiter.check(LIMITED, quota)
        self.clock.advance(0)
        verdict: Verdict = self.successResultOf(d)
        return verdict

    def test_goWindowContinued(self) -> None:
        """
        A window the Go program wrote counts here: its members of the last
        hour for the hour, those of the last day for the day, older ones
        dropped.
        """
        now = self.now()
        written = {
            f"{now - 25 * HOUR_NS}:00000001": now - 25 * HOUR_NS,
            f"{now - 5 * HOUR_NS}:00000002": now - 5 * HOUR_NS,
            f"{now - 30 * 60 * 10**9}:00000003": now - 30 * 60 * 10**9,
            f"{now - 60 * 10**9}:00000004": now - 60 * 10**9,
        }
        for member, score in written.items():
            self.server.command("ZADD", KEY, score, member)
        self.server.command("EXPIRE", KEY, 25 * 3600)
        quota = Quota(per_hour=3, per_day=4)
        self.assertEqual(self.step(quota), Verdict(True, 3, 4))
        self.assertEqual(self.step(quota), Verdict(False, 4, 5))
        members = self.server.command("ZRANGE", KEY, 0, -1)
        assert isinstance(members, list)
        self.assertNotIn(f"{now - 25 * HOUR_NS}:00000001", members)

    def test_ourWindowInGoLayout(self) -> None:
        """
        Ours is the Go layout: the key, C{<unix ns>:<8 hex>} members scored
        with their unix nanoseconds, a 25 h expiry.
        """
        quota = Quota(per_hour=10, per_day=0)
        self.step(quota)
        self.clock.advance(1.5)
        self.step(quota)
        raw = self.server.command("ZRANGE", KEY, 0, -1, "WITHSCORES")
        assert isinstance(raw, list)
        pairs = list(zip(raw[::2], raw[1::2], strict=True))
        self.assertEqual(len(pairs), 2)
        for (member, score), expected in zip(pairs, (START, START + 1.5), strict=True):
            match = MEMBER.match(member)
            assert match is not None, member
            self.assertEqual(int(match.group(1)), int(expected * 10**9))
            self.assertEqual(float(score), float(match.group(1)))
        ttl = self.server.command("TTL", KEY)
        assert isinstance(ttl, int)
        self.assertTrue(25 * 3600 - 60 < ttl <= 25 * 3600, ttl)
        self.assertEqual(self.server.command("TYPE", KEY), "zset")

    def test_hammeringSender(self) -> None:
        """
        500 attempts of a sender with a quota of 3 per hour, at 100 a
        second: every decision is the one the Go program takes on a whole
        window (run beside it, on a key of its own), yet the sorted set
        holds 4 members where the Go program's holds 500; and it is still
        the Go layout, which the Go program carries on with.
        """
        quota = Quota(per_hour=3, per_day=0)
        go_key = window_key("go-reference@example.org")
        for n in range(500):
            ours = self.step(quota)
            expected = self.goStep(quota, f"{n:08x}", key=go_key)
            self.assertEqual(ours.allowed, expected, n)
            self.clock.advance(0.01)
        self.assertEqual(self.server.command("ZCARD", go_key), 500)
        self.assertEqual(self.server.command("ZCARD", KEY), 4)
        raw = self.server.command("ZRANGE", KEY, 0, -1, "WITHSCORES")
        assert isinstance(raw, list)
        # The newest four attempts (10 ms apart, the last 10 ms ago) are the
        # ones kept.
        newest = self.now() - 10**7
        scores = [float(score) for score in raw[1::2]]
        self.assertEqual(scores, sorted(scores))
        self.assertGreater(scores[0], newest - 3.5 * 10**7)
        self.assertLessEqual(scores[-1], newest + 10**6)
        for member in raw[::2]:
            self.assertRegex(member, MEMBER)
        ttl = self.server.command("TTL", KEY)
        assert isinstance(ttl, int)
        self.assertTrue(25 * 3600 - 60 < ttl <= 25 * 3600, ttl)
        # The Go program, on our window: still refused, as on its own.
        self.assertFalse(self.goStep(quota, "ffffffff"))
        self.clock.advance(3600)
        self.assertTrue(self.goStep(quota, "eeeeeeee"))
        self.assertTrue(self.step(quota).allowed)
        self.assertTrue(self.goStep(quota, "dddddddd"))
        self.assertFalse(self.step(quota).allowed)

    def test_goWindowCutDown(self) -> None:
        """
        A large window the Go program wrote is cut to the newest members at
        our first step, and the decision is the one the whole window gives.
        """
        quota = Quota(per_hour=0, per_day=10)
        for n in range(200):
            self.goStep(quota, f"{n:08x}")
            self.clock.advance(1)
        self.assertEqual(self.server.command("ZCARD", KEY), 200)
        self.assertEqual(self.step(quota), Verdict(False, 11, 11))
        self.assertEqual(self.server.command("ZCARD", KEY), 11)
        self.assertFalse(self.goStep(quota, "ffffffff"))

    def test_largeLimits(self) -> None:
        """
        The largest limits are counted right too: one just below
        L{MAX_KEPT} (the script trims to a rank of a billion) and one beyond
        it (the window is kept whole).
        """
        for quota in (Quota(per_hour=MAX_KEPT - 1, per_day=0), Quota(0, 10**15)):
            self.assertEqual(self.step(quota).allowed, True)
        self.assertEqual(self.step(Quota(per_hour=2, per_day=0)), Verdict(False, 3, 3))

    def test_alternating(self) -> None:
        """
        A quota of 3 with steps taken alternately by the Go program and by
        us: three pass, the fourth is refused whoever takes it.
        """
        quota = Quota(per_hour=3, per_day=0)
        self.assertTrue(self.goStep(quota, "aaaaaaaa"))
        self.assertTrue(self.step(quota).allowed)
        self.assertTrue(self.goStep(quota, "bbbbbbbb"))
        self.assertFalse(self.step(quota).allowed)
        self.assertFalse(self.goStep(quota, "cccccccc"))
        self.clock.advance(3600)
        # Only the attempts of the last hour count, on both sides.
        self.assertTrue(self.goStep(quota, "dddddddd"))
        # Seven attempts today, read up to limit + 1 (no daily limit to judge).
        self.assertEqual(self.step(quota), Verdict(True, 2, 4))


class OddKeyTests(RedisTestMixin, SynchronousTestCase):
    """
    A window key of another type (written by hand, or by another program)
    in a script call of several senders: that sender fails open, the
    others of the call are judged and recorded as if it were not there.
    """

    def setUp(self) -> None:
        self.server = self.startRedis()
        self.clock = task.Clock()
        self.clock.advance(START)
        self.metrics = Metrics(process=False)
        self.limiter = RedisRateLimiter(
            BlockingRedis(self.server),  # type: ignore[arg-type]
            self.clock,
            self.metrics,
        )

    def errors(self) -> float:
        value = self.metrics.registry.get_sample_value(
            "userli_postfix_adapter_ratelimit_backend_errors_total", {"operation": "check"}
        )
        return value or 0.0

    def test_wrongTypeInBatch(self) -> None:
        """
        With a string at the second sender's key, the first and third
        senders get their verdicts and their windows, the second a
        L{RateLimitError} (counted once), and the string is left alone.
        """
        odd = window_key("odd@example.org")
        self.server.command("SET", odd, "not a window")
        quota = Quota(per_hour=1, per_day=0)
        identities = ["a@example.org", "odd@example.org", "b@example.org", "a@example.org"]
        pending = [self.limiter.check(identity, quota) for identity in identities]
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(pending[0]), Verdict(True, 1, 1))
        failure = self.failureResultOf(pending[1], RateLimitError)
        self.assertIn("WRONGTYPE", str(failure.value))
        self.assertEqual(self.successResultOf(pending[2]), Verdict(True, 1, 1))
        self.assertEqual(self.successResultOf(pending[3]), Verdict(False, 2, 2))
        self.assertEqual(self.errors(), 1)
        self.assertEqual(self.server.command("GET", odd), "not a window")
        self.assertEqual(self.server.command("TTL", odd), -1)
        self.assertEqual(self.server.command("ZCARD", window_key("a@example.org")), 2)
        self.assertEqual(self.server.command("ZCARD", window_key("b@example.org")), 1)
        # The next call goes on as usual.
        d = self.limiter.check("b@example.org", quota)
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(d), Verdict(False, 2, 2))


def policy_query(
    address: tuple[str, int], requests: Sequence[Mapping[str, str]], timeout: float = 30.0
) -> list[str]:
    """
    Send policy requests on one connection, one after the other as Postfix
    does, and return the actions (without C{action=}).
    """
    actions: list[str] = []
    with socket.create_connection(address, timeout=timeout) as s:
        buffer = b""
        for attributes in requests:
            s.sendall(b"".join(f"{k}={v}\n".encode() for k, v in attributes.items()) + b"\n")
            while b"\n\n" not in buffer:
                chunk = s.recv(65536)
                if not chunk:
                    raise ConnectionError(f"connection closed after {actions!r}")
                buffer += chunk
            reply, buffer = buffer.split(b"\n\n", 1)
            assert reply.startswith(b"action="), reply
            actions.append(reply[len(b"action=") :].decode("utf-8"))
    return actions


def message(identity: str = LIMITED) -> dict[str, str]:
    """The END-OF-MESSAGE request of one message sent by C{identity}."""
    return {
        "request": "smtpd_access_policy",
        "protocol_state": "END-OF-MESSAGE",
        "protocol_name": "ESMTP",
        "client_address": "127.0.0.1",
        "sasl_method": "PLAIN",
        "sasl_username": identity,
        "sender": identity,
        "recipient": "",
        "recipient_count": "1",
        "size": "300",
    }


def metric(daemon_metrics_url: str, name: str, labels: str = "") -> float:
    """One sample of the daemon's C{/metrics}, 0 when absent."""
    status, body = http_get(daemon_metrics_url + "/metrics")
    assert status == 200
    pattern = re.compile(
        rf"^userli_postfix_adapter_{re.escape(name)}{re.escape(labels)} (\S+)$", re.M
    )
    match = pattern.search(body.decode("utf-8"))
    return float(match.group(1)) if match else 0.0


REJECT = "REJECT Rate limit exceeded, please try again later"


def wait_for_daemons(redis: RedisServer, daemons: int) -> None:
    """
    Wait until C{daemons} daemons have their whole Redis connection pool
    up: before that a message may pass unrecorded (fail-open), which would
    make the counts of a test depend on timing.  (L{start_daemon} waits for
    this itself, more precisely; this is for a daemon restarted by hand.)
    """
    wait_for(
        lambda: redis.pool_connections() >= POOL_SIZE * daemons,
        f"{daemons} daemon(s) to connect to Redis",
    )


def test_redis_outage(start_daemon: StartDaemon, redis_server: RedisServer) -> None:
    """
    Redis stopped under a running daemon: mail passes (DUNNO) and the
    backend error counter grows; Redis back (empty, script cache empty):
    the quota is enforced again without a restart of the daemon.
    """
    daemon = start_daemon(redis=redis_server)
    assert daemon.policy is not None
    wait_for_daemons(redis_server, 1)
    # limited@example.org: 2 per hour.
    assert policy_query(daemon.policy, [message()] * 3) == ["DUNNO", "DUNNO", REJECT]
    assert redis_server.command("ZCARD", KEY) == 3

    redis_server.stop()
    assert policy_query(daemon.policy, [message()] * 3) == ["DUNNO"] * 3
    errors = metric(daemon.metrics_url, "ratelimit_backend_errors_total", '{operation="check"}')
    assert errors >= 3
    assert (
        metric(daemon.metrics_url, "policy_requests_total", '{action="error",stage="check"}') >= 3
    )

    redis_server.start()
    assert redis_server.command("EXISTS", KEY) == 0

    def enforcing() -> bool:
        # Each message passes until one is recorded in the new Redis.
        assert policy_query(daemon.policy, [message()]) == ["DUNNO"]
        return redis_server.command("EXISTS", KEY) == 1

    wait_for(enforcing, "the daemon to use Redis again", deadline=STARTUP_DEADLINE)
    assert policy_query(daemon.policy, [message()] * 2) == ["DUNNO", REJECT]


def test_two_daemons_one_quota(start_daemon: StartDaemon, redis_server: RedisServer) -> None:
    """
    Two daemons on one Redis enforce one quota: with a quota of 2 per hour,
    messages sent alternately through both, the third is refused, and so is
    every later one on either daemon.
    """
    first = start_daemon(redis=redis_server)
    second = start_daemon(redis=redis_server)
    assert first.policy is not None and second.policy is not None
    wait_for_daemons(redis_server, 2)
    actions = []
    for n in range(4):
        daemon = first if n % 2 == 0 else second
        assert daemon.policy is not None
        actions += policy_query(daemon.policy, [message()])
    assert actions == ["DUNNO", "DUNNO", REJECT, REJECT]
    members = redis_server.command("ZRANGE", KEY, 0, -1)
    assert isinstance(members, list) and len(members) == 4
    assert all(MEMBER.match(m) for m in members)


def test_daemon_without_redis(start_daemon: StartDaemon, fake_userli: FakeUserliServer) -> None:
    """
    Without C{REDIS_URL} the windows are kept in memory with the same
    semantics, and one mailbox has one quota however the login is spelt.
    """
    daemon = start_daemon(env={"POSTFIX_RECIPIENT_DELIMITER": "+"})
    assert daemon.policy is not None
    spellings = ["LIMITED@example.org", "limited+x@example.org", "limited@example.org"]
    actions = policy_query(daemon.policy, [message(s) for s in spellings])
    assert actions == ["DUNNO", "DUNNO", REJECT]
    # Only the normalised address reached the API (once per message, or
    # fewer where identical questions were in flight together).
    keys = [r.key for r in fake_userli.fake.requests("smtp_quota")]
    assert set(keys) == {LIMITED} and 1 <= len(keys) <= 3


def test_restart_keeps_count(start_daemon: StartDaemon, redis_server: RedisServer) -> None:
    """The count lives in Redis: a restarted daemon carries on with it."""
    first = start_daemon(redis=redis_server)
    assert first.policy is not None
    wait_for_daemons(redis_server, 1)
    assert policy_query(first.policy, [message()] * 2) == ["DUNNO", "DUNNO"]
    first.stop()
    wait_for_daemons(redis_server, 0)
    second = start_daemon(redis=redis_server)
    assert second.policy is not None
    wait_for_daemons(redis_server, 1)
    assert policy_query(second.policy, [message()]) == [REJECT]


def test_odd_key_fails_open(start_daemon: StartDaemon, redis_server: RedisServer) -> None:
    """
    A sender whose window key holds another type: each of its messages is
    let through (DUNNO) and counted as a backend error; once the key is
    gone, its quota is enforced again.
    """
    daemon = start_daemon(redis=redis_server)
    assert daemon.policy is not None
    wait_for_daemons(redis_server, 1)
    redis_server.command("SET", KEY, "not a window")
    # limited@example.org: 2 per hour.
    assert policy_query(daemon.policy, [message()] * 3) == ["DUNNO"] * 3
    errors = metric(daemon.metrics_url, "ratelimit_backend_errors_total", '{operation="check"}')
    assert errors == 3
    assert redis_server.command("GET", KEY) == "not a window"
    redis_server.command("DEL", KEY)
    assert policy_query(daemon.policy, [message()] * 3) == ["DUNNO", "DUNNO", REJECT]
    assert redis_server.command("ZCARD", KEY) == 3
