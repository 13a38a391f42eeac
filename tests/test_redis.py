"""
Tests for L{userli_postfix.redis}: every command answers within its deadline
whatever Redis does, through a fake connection and a L{Clock}.
"""

from __future__ import annotations

from typing import Any

import txredisapi
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from userli_postfix.config import RedisTarget
from userli_postfix.redis import (
    COMMAND_TIMEOUT,
    INVALIDATE_CHANNEL,
    TRACKING_PING,
    TRACKING_RETRY,
    RedisClient,
    RedisUnavailable,
    _endpoint,
    _Tracker,
)


class FakeConnection:
    """
    Stands in for a ready txredisapi connection: records commands and
    answers each with a Deferred the test controls.
    """

    def __init__(self) -> None:
        self.commands: list[tuple[Any, ...]] = []
        self.answers: list[defer.Deferred[Any]] = []
        self.cancelled: list[defer.Deferred[Any]] = []
        self.raiseOnExecute: Exception | None = None

    def execute_command(self, *args: Any) -> defer.Deferred[Any]:
        if self.raiseOnExecute is not None:
            raise self.raiseOnExecute
        self.commands.append(args)
        d: defer.Deferred[Any] = defer.Deferred(self.cancelled.append)
        self.answers.append(d)
        return d


class FakePool:
    """Stands in for L{userli_postfix.connections.Pool}: its ready connections."""

    def __init__(self, *ready: FakeConnection) -> None:
        self.ready = list(ready)
        self.stopped = False
        self.stopError: Exception | None = None

    def pick(self) -> FakeConnection | None:
        return self.ready[0] if self.ready else None

    def stop(self) -> defer.Deferred[None]:
        self.stopped = True
        if self.stopError is not None:
            return defer.fail(self.stopError)
        return defer.succeed(None)


class RedisClientTests(SynchronousTestCase):
    """L{RedisClient.execute} and friends."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.connection = FakeConnection()
        self.pool = FakePool(self.connection)
        self.client = RedisClient(RedisTarget(), self.clock, pool=self.pool)

    def test_reply(self) -> None:
        """A command goes to Redis as given, and its reply is the result."""
        d = self.client.execute("SET", "k", "OK 1", "EX", 300)
        self.assertEqual(self.connection.commands, [("SET", "k", "OK 1", "EX", 300)])
        self.connection.answers[0].callback("OK")
        self.assertEqual(self.successResultOf(d), "OK")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_default_deadline(self) -> None:
        """The deadline is half a second unless told otherwise."""
        self.assertEqual(COMMAND_TIMEOUT, 0.5)
        self.assertEqual(self.client.commandTimeout, 0.5)

    def test_deadline(self) -> None:
        """A command without a reply fails with L{RedisUnavailable} at the deadline."""
        d = self.client.execute("GET", "k")
        self.clock.advance(COMMAND_TIMEOUT - 0.001)
        self.assertNoResult(d)
        self.clock.advance(0.001)
        self.failureResultOf(d, RedisUnavailable)

    def test_custom_deadline(self) -> None:
        """The deadline given to the constructor is used."""
        client = RedisClient(RedisTarget(), self.clock, commandTimeout=2.0, pool=self.pool)
        d = client.execute("GET", "k")
        self.clock.advance(1.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.failureResultOf(d, RedisUnavailable)

    def test_inner_not_cancelled(self) -> None:
        """
        The command itself is not cancelled at the deadline: txredisapi
        matches replies by position, so cancelling would hand this reply to
        the next command.
        """
        d = self.client.execute("GET", "k")
        self.clock.advance(COMMAND_TIMEOUT)
        self.failureResultOf(d, RedisUnavailable)
        self.assertEqual(self.connection.cancelled, [])
        self.assertFalse(self.connection.answers[0].called)

    def test_late_reply_ignored(self) -> None:
        """A reply after the deadline is consumed quietly, not delivered twice."""
        d = self.client.execute("GET", "k")
        self.clock.advance(COMMAND_TIMEOUT)
        self.failureResultOf(d, RedisUnavailable)
        inner = self.connection.answers[0]
        inner.callback("late")
        self.assertIsNone(self.successResultOf(inner))

    def test_late_failure_handled(self) -> None:
        """A failure after the deadline is consumed too, never an unhandled error."""
        d = self.client.execute("GET", "k")
        self.clock.advance(COMMAND_TIMEOUT)
        self.failureResultOf(d, RedisUnavailable)
        inner = self.connection.answers[0]
        inner.errback(txredisapi.ConnectionError("lost"))
        self.assertIsNone(self.successResultOf(inner))

    def test_not_connected(self) -> None:
        """With no connection of the pool ready, a command fails at once, without waiting."""
        self.pool.ready.clear()
        d = self.client.execute("GET", "k")
        self.failureResultOf(d, RedisUnavailable)
        self.assertEqual(self.connection.commands, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertFalse(self.client.connected)

    def test_not_started(self) -> None:
        """Before L{RedisClient.start} there is no connection: commands fail at once."""
        client = RedisClient(RedisTarget(), self.clock)
        self.assertFalse(client.connected)
        self.failureResultOf(client.execute("GET", "k"), RedisUnavailable)

    def test_connected(self) -> None:
        """The client is connected while at least one pool connection is ready."""
        self.assertTrue(self.client.connected)
        self.pool.ready.append(FakeConnection())
        self.assertTrue(self.client.connected)

    def test_response_error_passed_through(self) -> None:
        """
        An error answer from Redis is passed on as txredisapi's own error,
        so a caller can tell C{NOSCRIPT} from an outage.
        """
        d = self.client.execute("EVALSHA", "0" * 40, 1, "k")
        self.connection.answers[0].errback(txredisapi.ScriptDoesNotExist("NOSCRIPT No matching"))
        self.failureResultOf(d, txredisapi.ScriptDoesNotExist)
        d = self.client.execute("INCR", "k")
        self.connection.answers[1].errback(txredisapi.ResponseError("WRONGTYPE"))
        failure = self.failureResultOf(d, txredisapi.ResponseError)
        self.assertNotIsInstance(failure.value, RedisUnavailable)

    def test_connection_errors_translated(self) -> None:
        """A broken connection or txredisapi's own timeout becomes L{RedisUnavailable}."""
        for error in [
            txredisapi.ConnectionError("Lost connection"),
            txredisapi.TimeoutError("Not received Redis response"),
            RuntimeError("unexpected"),
        ]:
            d = self.client.execute("GET", "k")
            self.connection.answers[-1].errback(error)
            self.failureResultOf(d, RedisUnavailable)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_synchronous_error(self) -> None:
        """A pool that raises instead of returning a Deferred still gives a failed Deferred."""
        self.connection.raiseOnExecute = txredisapi.ConnectionError("Not connected")
        self.failureResultOf(self.client.execute("GET", "k"), RedisUnavailable)

    def test_stop(self) -> None:
        """Stopping disconnects the pool; later commands fail at once."""
        self.successResultOf(self.client.stop())
        self.assertTrue(self.pool.stopped)
        self.failureResultOf(self.client.execute("GET", "k"), RedisUnavailable)
        self.successResultOf(self.client.stop())

    def test_stop_error_swallowed(self) -> None:
        """A failing disconnect does not fail the shutdown."""
        self.pool.stopError = txredisapi.ConnectionError("gone")
        self.assertIsNone(self.successResultOf(self.client.stop()))

    def test_start_with_connection(self) -> None:
        """A client given its connection does not open another."""
        self.client.start()
        self.client.execute("PING")
        self.assertEqual(self.connection.commands, [("PING",)])

    def test_repr_without_password(self) -> None:
        """The repr says where Redis is, never its passwords."""
        target = RedisTarget(host="redis", port=6380, db=2, password="hunter2")
        self.assertEqual(repr(RedisClient(target, self.clock)), "<RedisClient redis:6380 db=2>")
        target = RedisTarget(path="/run/redis.sock", password="hunter2")
        self.assertEqual(
            repr(RedisClient(target, self.clock)), "<RedisClient /run/redis.sock db=0>"
        )
        target = RedisTarget(
            sentinels=(("s1", 26379), ("s2", 26380)),
            master_name="mymaster",
            password="hunter2",
            sentinel_password="sentinel-secret",
        )
        text = repr(RedisClient(target, self.clock))
        self.assertIn("s1:26379,s2:26380", text)
        self.assertIn("mymaster", text)
        self.assertNotIn("hunter2", text)
        self.assertNotIn("sentinel-secret", text)


class RecordingListener:
    """An L{InvalidationListener} that records what it is told."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def trackingStarted(self) -> None:
        self.events.append(("started", None))

    def trackingLost(self, reason: str) -> None:
        self.events.append(("lost", reason))

    def invalidated(self, keys: list[str] | None) -> None:
        self.events.append(("invalidated", keys))


class FakeSubscriber:
    """A subscriber connection whose replies the test gives."""

    def __init__(self) -> None:
        self.connected = 1
        self.commands: list[tuple[Any, ...]] = []
        self.answers: list[defer.Deferred[Any]] = []

    def execute_command(self, *args: Any) -> defer.Deferred[Any]:
        self.commands.append(args)
        d: defer.Deferred[Any] = defer.Deferred()
        self.answers.append(d)
        return d

    def subscribe(self, channel: str) -> defer.Deferred[Any]:
        return self.execute_command("SUBSCRIBE", channel)


class TrackerTests(SynchronousTestCase):
    """L{_Tracker}: turning client tracking on over one subscriber connection."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.listener = RecordingListener()
        self.tracker = _Tracker("userli:lookup:", self.listener, self.clock)
        self.conn = FakeSubscriber()

    def establish(self) -> None:
        """Answer CLIENT ID, CLIENT TRACKING and SUBSCRIBE as Redis 6+ does."""
        self.tracker.connectionReady(self.conn)
        self.conn.answers[0].callback(7)
        self.conn.answers[1].callback("OK")
        self.conn.answers[2].callback(["subscribe", INVALIDATE_CHANNEL, 1])

    def test_commands(self) -> None:
        """Tracking is redirected to the connection itself, in broadcast mode on the prefix."""
        self.establish()
        self.assertEqual(
            self.conn.commands,
            [
                ("CLIENT", "ID"),
                ("CLIENT", "TRACKING", "on", "REDIRECT", "7", "BCAST", "PREFIX", "userli:lookup:"),
                ("SUBSCRIBE", INVALIDATE_CHANNEL),
            ],
        )
        self.assertEqual(self.listener.events, [("started", None)])

    def test_ping(self) -> None:
        """
        While tracking, the connection is asked for a PING every second,
        so a connection that died silently is noticed (txredisapi's reply
        timeout closes it); none once it is gone.
        """
        self.establish()
        self.clock.advance(TRACKING_PING)
        self.assertEqual(self.conn.commands[-1], ("PING",))
        self.conn.answers[-1].callback(["pong", ""])
        self.clock.advance(TRACKING_PING)
        self.assertEqual(len(self.conn.commands), 5)
        self.conn.answers[-1].errback(txredisapi.TimeoutError("no reply"))
        self.conn.connected = 0
        self.tracker.connectionLost(self.conn)
        self.clock.advance(TRACKING_PING * 3)
        self.assertEqual(len(self.conn.commands), 5)

    def test_not_started_before_subscribed(self) -> None:
        """Until SUBSCRIBE is answered, nothing is said to be tracked."""
        self.tracker.connectionReady(self.conn)
        self.conn.answers[0].callback(7)
        self.conn.answers[1].callback("OK")
        self.assertEqual(self.listener.events, [])

    def test_messages(self) -> None:
        """Key lists are passed on as text; a null list (a flush) as None; other channels not."""
        self.establish()
        self.tracker.message(INVALIDATE_CHANNEL, ["userli:lookup:a:b", b"userli:lookup:c:d"])
        self.tracker.message(INVALIDATE_CHANNEL, None)
        self.tracker.message("other", ["x"])
        self.assertEqual(
            self.listener.events[1:],
            [
                ("invalidated", ["userli:lookup:a:b", "userli:lookup:c:d"]),
                ("invalidated", None),
            ],
        )

    def test_lost(self) -> None:
        """The loss of the connection is the loss of tracking; another connection's is not."""
        self.establish()
        self.tracker.connectionLost(FakeSubscriber())
        self.assertEqual(len(self.listener.events), 1)
        self.tracker.connectionLost(self.conn)
        self.assertEqual(self.listener.events[-1][0], "lost")

    def test_refused_retried(self) -> None:
        """
        A Redis that refuses (CLIENT renamed away, Redis 5) leaves tracking
        lost and is asked again later on the same connection.
        """
        self.tracker.connectionReady(self.conn)
        self.conn.answers[0].errback(txredisapi.ResponseError("ERR unknown command 'CLIENT'"))
        self.assertEqual(self.listener.events[0][0], "lost")
        self.assertIn("unknown command", self.listener.events[0][1])
        self.clock.advance(TRACKING_RETRY)
        self.assertEqual(self.conn.commands[-1], ("CLIENT", "ID"))
        self.conn.answers[-1].callback(7)
        self.conn.answers[-1].callback("OK")
        self.conn.answers[-1].callback(["subscribe", INVALIDATE_CHANNEL, 1])
        self.assertEqual(self.listener.events[-1], ("started", None))

    def test_refusal_after_close_ignored(self) -> None:
        """A refusal arriving for a connection already closed is not retried."""
        self.tracker.connectionReady(self.conn)
        self.conn.connected = 0
        self.conn.answers[0].errback(txredisapi.ResponseError("ERR"))
        self.assertEqual(self.listener.events, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class EndpointTests(SynchronousTestCase):
    """L{_endpoint}: Redis endpoints from Twisted's public API."""

    def test_tcp(self) -> None:
        """A host and port is a HostnameEndpoint (IPv4 and IPv6)."""
        self.assertIsInstance(
            _endpoint(RedisTarget(host="redis", port=6379), Clock()), HostnameEndpoint
        )

    def test_unix(self) -> None:
        """A path is a UNIX endpoint."""
        self.assertIsInstance(
            _endpoint(RedisTarget(path="/run/redis.sock"), Clock()), UNIXClientEndpoint
        )

    def test_tls(self) -> None:
        """rediss:// wraps the TCP endpoint in TLS, checking the host name."""
        endpoint = _endpoint(RedisTarget(host="redis", port=6380, tls=True), Clock())
        self.assertNotIsInstance(endpoint, HostnameEndpoint)
