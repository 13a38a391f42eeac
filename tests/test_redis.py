"""
Tests for L{userli_postfix.redis}: every command answers within its deadline
whatever Redis does, through a fake connection and a L{Clock}.
"""

from __future__ import annotations

from typing import Any

import txredisapi
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from userli_postfix.config import RedisTarget
from userli_postfix.redis import COMMAND_TIMEOUT, RedisClient, RedisUnavailable


class FakePoolFactory:
    """The part of txredisapi's pool factory the client looks at."""

    def __init__(self, size: int) -> None:
        self.size = size


class FakeConnection:
    """
    Stands in for a txredisapi connection pool: records commands and answers
    each with a Deferred the test controls.
    """

    def __init__(self, size: int = 1) -> None:
        self._factory = FakePoolFactory(size)
        self.commands: list[tuple[Any, ...]] = []
        self.answers: list[defer.Deferred[Any]] = []
        self.cancelled: list[defer.Deferred[Any]] = []
        self.disconnected = False
        self.raiseOnExecute: Exception | None = None
        self.disconnectError: Exception | None = None

    def execute_command(self, *args: Any) -> defer.Deferred[Any]:
        if self.raiseOnExecute is not None:
            raise self.raiseOnExecute
        self.commands.append(args)
        d: defer.Deferred[Any] = defer.Deferred(self.cancelled.append)
        self.answers.append(d)
        return d

    def disconnect(self) -> defer.Deferred[None]:
        self.disconnected = True
        if self.disconnectError is not None:
            return defer.fail(self.disconnectError)
        return defer.succeed(None)


class RedisClientTests(SynchronousTestCase):
    """L{RedisClient.execute} and friends."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.connection = FakeConnection()
        self.client = RedisClient(RedisTarget(), self.clock, connection=self.connection)

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
        client = RedisClient(
            RedisTarget(), self.clock, commandTimeout=2.0, connection=self.connection
        )
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
        """With no connection of the pool up, a command fails at once, without waiting."""
        self.connection._factory.size = 0
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
        """The client is connected while at least one pool connection is up."""
        self.assertTrue(self.client.connected)
        self.connection._factory.size = 3
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
        self.assertTrue(self.connection.disconnected)
        self.failureResultOf(self.client.execute("GET", "k"), RedisUnavailable)
        self.successResultOf(self.client.stop())

    def test_stop_error_swallowed(self) -> None:
        """A failing disconnect does not fail the shutdown."""
        self.connection.disconnectError = txredisapi.ConnectionError("gone")
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
