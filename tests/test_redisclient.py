"""
Tests for L{userli_postfix.redisclient}: every command answers within its deadline
whatever Redis does, through a fake connection and a L{Clock}.
"""

from __future__ import annotations

from typing import Any

import txredisapi
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from userli_postfix.config import RedisTarget
from userli_postfix.redisclient import (
    COMMAND_TIMEOUT,
    CONNECT_TIMEOUT,
    INVALIDATE_CHANNEL,
    SENTINEL_DISCOVERY_TIMEOUT,
    TRACKING_PING,
    TRACKING_RETRY,
    RedisClient,
    RedisUnavailable,
    _endpoint,
    _MasterEndpoint,
    _prepare,
    _Protocol,
    _ProtocolFactory,
    _Sentinels,
    _Tracker,
    _TrackingProtocol,
    usableMaster,
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
    """Stands in for L{userli_postfix.redisconnections.Pool}: its ready connections."""

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

    def trackingAlive(self, sent: float) -> None:
        self.events.append(("alive", sent))


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
        While tracking, the connection is asked for a PING four times a
        second; each answer tells the listener when its PING was sent
        (every change reported before then has arrived), so copies stop
        being served soon after the connection falls silent, and a
        connection that died silently is noticed (txredisapi's reply
        timeout closes it); none once it is gone.
        """
        self.assertEqual(TRACKING_PING, 0.25)
        self.establish()
        self.clock.advance(TRACKING_PING)
        self.assertEqual(self.conn.commands[-1], ("PING",))
        sent = self.clock.seconds()
        self.clock.advance(0.1)
        self.conn.answers[-1].callback(["pong", ""])
        self.assertEqual(self.listener.events[-1], ("alive", sent))
        self.clock.advance(TRACKING_PING)
        self.assertEqual(len(self.conn.commands), 5)
        self.conn.answers[-1].errback(txredisapi.TimeoutError("no reply"))
        self.assertNotEqual(self.listener.events[-1], ("alive", self.clock.seconds()))
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
            _endpoint(RedisTarget(host="redis", port=6379), MemoryReactorClock()), HostnameEndpoint
        )

    def test_unix(self) -> None:
        """A path is a UNIX endpoint."""
        self.assertIsInstance(
            _endpoint(RedisTarget(path="/run/redis.sock"), Clock()), UNIXClientEndpoint
        )

    def test_tls(self) -> None:
        """rediss:// wraps the TCP endpoint in TLS, checking the host name."""
        endpoint = _endpoint(RedisTarget(host="redis", port=6380, tls=True), MemoryReactorClock())
        self.assertNotIsInstance(endpoint, HostnameEndpoint)


def _connected(replyTimeout: float = 0) -> tuple[Any, StringTransport]:
    """
    txredisapi's protocol as the pool builds it (no reply timer: the
    deadlines under test are ours), connected to a transport in memory.
    """
    protocol = _ProtocolFactory(_Protocol, replyTimeout).buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def _receive(protocol: Any, *chunks: bytes) -> None:
    """
    Replies in the pieces txredisapi handles within one call: after a bulk
    string it hands the rest of a chunk to the next reactor turn.
    """
    for chunk in chunks:
        protocol.dataReceived(chunk)


class TxredisapiProtocolTests(SynchronousTestCase):
    """
    What the daemon relies on in txredisapi's protocol, pinned so that an
    upgrade that changes it fails here rather than in production: built
    with only the documented constructor arguments it is ready at once and
    never reaches into its factory; a command on a closed connection fails
    at once; a lost connection fails every command waiting for a reply and
    says it is gone.
    """

    def test_ready_at_once(self) -> None:
        """Without password and db the protocol sends nothing and is ready at once."""
        protocol, transport = _connected()
        self.assertEqual(transport.value(), b"")
        self.assertIs(self.successResultOf(protocol.whenConnected()), protocol)
        self.assertTrue(protocol.connected)

    def test_reply(self) -> None:
        """A command goes out in RESP and its reply comes back."""
        protocol, transport = _connected()
        d = protocol.execute_command("GET", "k")
        self.assertEqual(transport.value(), b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n")
        protocol.dataReceived(b"$4\r\nOK 1\r\n")
        self.assertEqual(self.successResultOf(d), "OK 1")

    def test_closed_fails_at_once(self) -> None:
        """A command on a closed connection raises at once (the client fails it)."""
        protocol, _transport = _connected()
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertRaises(txredisapi.ConnectionError, protocol.execute_command, "GET", "k")

    def test_loss_fails_waiting_commands(self) -> None:
        """Commands waiting for a reply fail when the connection goes, and its loss is said."""
        protocol, _transport = _connected()
        gone = protocol.whenDisconnected()
        d = protocol.execute_command("GET", "k")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(d, txredisapi.ConnectionError)
        self.assertIs(self.successResultOf(gone), protocol)

    def test_no_factory_reach_in(self) -> None:
        """
        The set-up never calls the factory (txredisapi's own AUTH failure
        path calls its factory's C{stopTrying}, which ours does not have).
        """
        factory = _ProtocolFactory(_Protocol, 0)
        self.assertFalse(hasattr(factory, "stopTrying"))
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        self.assertTrue(protocol.connected)


class TrackingProtocolTests(SynchronousTestCase):
    """
    txredisapi's subscriber protocol as the tracking connection uses it:
    an invalidation message reaches the tracker, and a PING on the
    subscribed connection gets its answer (RESP2 answers it as a list).
    """

    def setUp(self) -> None:
        self.listener = RecordingListener()
        self.tracker = _Tracker("userli:lookup:", self.listener, Clock())
        factory = _ProtocolFactory(_TrackingProtocol, 0, self.tracker)
        self.protocol = factory.buildProtocol(None)
        self.protocol.makeConnection(StringTransport())

    def test_message_reaches_tracker(self) -> None:
        """Key lists and a flush's null, as txredisapi parses them, reach the listener."""
        self.protocol.replyReceived(["message", INVALIDATE_CHANNEL, ["userli:lookup:a:b"]])
        self.protocol.replyReceived(["message", INVALIDATE_CHANNEL, None])
        self.assertEqual(
            self.listener.events,
            [("invalidated", ["userli:lookup:a:b"]), ("invalidated", None)],
        )

    def test_ping_answered_while_subscribed(self) -> None:
        """The PING that proves the connection alive gets its answer, not a message."""
        d = self.protocol.execute_command("PING")
        _receive(self.protocol, b"*2\r\n", b"$4\r\n", b"pong\r\n", b"$0\r\n", b"\r\n")
        self.assertEqual(self.successResultOf(d), ["pong", ""])
        self.assertEqual(self.listener.events, [])


class PrepareTests(SynchronousTestCase):
    """L{_prepare}: AUTH, SELECT and the role of a Sentinel's master, bounded."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.protocol, self.transport = _connected()

    def test_nothing_to_do(self) -> None:
        """Without password and database (a Sentinel), nothing is sent."""
        self.successResultOf(_prepare(self.protocol, self.clock))
        self.assertEqual(self.transport.value(), b"")

    def test_auth_and_select(self) -> None:
        """AUTH with the user name when there is one, then SELECT."""
        d = _prepare(self.protocol, self.clock, password="pw", username="u", db=2)
        self.assertEqual(self.transport.value(), b"*3\r\n$4\r\nAUTH\r\n$1\r\nu\r\n$2\r\npw\r\n")
        self.transport.clear()
        self.protocol.dataReceived(b"+OK\r\n")
        self.assertEqual(self.transport.value(), b"*2\r\n$6\r\nSELECT\r\n$1\r\n2\r\n")
        self.protocol.dataReceived(b"+OK\r\n")
        self.successResultOf(d)

    def test_select_zero(self) -> None:
        """Database 0 is selected too."""
        d = _prepare(self.protocol, self.clock, db=0)
        self.assertEqual(self.transport.value(), b"*2\r\n$6\r\nSELECT\r\n$1\r\n0\r\n")
        self.protocol.dataReceived(b"+OK\r\n")
        self.successResultOf(d)

    def test_refused(self) -> None:
        """An error answer to AUTH rejects the connection."""
        d = _prepare(self.protocol, self.clock, password="wrong")
        self.protocol.dataReceived(b"-WRONGPASS invalid username-password pair\r\n")
        self.failureResultOf(d, txredisapi.ResponseError)

    def test_hangs(self) -> None:
        """No answer within the connect timeout rejects it."""
        d = _prepare(self.protocol, self.clock, password="pw")
        self.clock.advance(CONNECT_TIMEOUT - 0.01)
        self.assertNoResult(d)
        self.clock.advance(0.01)
        self.failureResultOf(d, RedisUnavailable)

    def test_replica_rejected(self) -> None:
        """A server the Sentinels named that is no master (any more) is rejected."""
        d = _prepare(self.protocol, self.clock, master=True)
        self.assertEqual(self.transport.value(), b"*1\r\n$4\r\nROLE\r\n")
        _receive(self.protocol, b"*2\r\n", b"$5\r\n", b"slave\r\n", b"$9\r\n", b"127.0.0.1\r\n")
        self.assertIn("slave", str(self.failureResultOf(d, RedisUnavailable).value))

    def test_master_accepted(self) -> None:
        d = _prepare(self.protocol, self.clock, master=True)
        _receive(self.protocol, b"*3\r\n", b"$6\r\n", b"master\r\n", b":0\r\n*0\r\n")
        self.successResultOf(d)


class SentinelTests(SynchronousTestCase):
    """The master the Sentinels name."""

    def test_usable_master(self) -> None:
        """Only a master that no Sentinel thinks is down is used."""
        base = ["name", "mymaster", "ip", "10.0.0.5", "port", 6379]
        cases = [
            ([*base, "flags", "master"], ("10.0.0.5", 6379)),
            ([*base, "flags", b"master"], ("10.0.0.5", 6379)),
            ([*base, "flags", "master,s_down"], None),
            ([*base, "flags", "master,o_down"], None),
            ([*base, "flags", "slave"], None),
            (["flags", "master"], None),
            ("ERR No such master with that name", None),
            ([*base, "flags"], None),
        ]
        for state, expected in cases:
            self.assertEqual(usableMaster(state), expected, state)

    def sentinels(self, *connections: FakeConnection | None) -> tuple[_Sentinels, Clock]:
        clock = Clock()
        target = RedisTarget(sentinels=(("s1", 1), ("s2", 2)), master_name="m")
        sentinels = _Sentinels(target, MemoryReactorClock(), clock, 0)
        for pool, connection in zip(sentinels.pools, connections, strict=True):
            if connection is not None:
                pool.ready.append(connection)
        return sentinels, clock

    def test_first_usable_answer(self) -> None:
        """Every reachable Sentinel is asked; the first usable answer wins."""
        a, b = FakeConnection(), FakeConnection()
        sentinels, _clock = self.sentinels(a, b)
        d = sentinels.master("m")
        self.assertEqual(a.commands, [("SENTINEL", "MASTER", "m")])
        self.assertEqual(b.commands, [("SENTINEL", "MASTER", "m")])
        a.answers[0].callback(["ip", "10.0.0.5", "port", "6379", "flags", "master,s_down"])
        self.assertNoResult(d)
        b.answers[0].callback(["ip", "10.0.0.6", "port", "6379", "flags", "master"])
        self.assertEqual(self.successResultOf(d), ("10.0.0.6", 6379))

    def test_none_usable_fails_at_once(self) -> None:
        """When every Sentinel answered without a usable master, that is the answer at once."""
        a, b = FakeConnection(), FakeConnection()
        sentinels, _clock = self.sentinels(a, b)
        d = sentinels.master("m")
        a.answers[0].errback(txredisapi.ResponseError("ERR No such master"))
        b.answers[0].callback(["ip", "10.0.0.5", "port", "6379", "flags", "master,o_down"])
        self.failureResultOf(d, RedisUnavailable)

    def test_silent_sentinel_bounded(self) -> None:
        """A Sentinel that does not answer is waited for one second at most."""
        a = FakeConnection()
        sentinels, clock = self.sentinels(a, None)
        d = sentinels.master("m")
        clock.advance(SENTINEL_DISCOVERY_TIMEOUT)
        self.failureResultOf(d, RedisUnavailable)

    def test_no_sentinel_reachable(self) -> None:
        """No Sentinel connection ready: fails at once."""
        sentinels, _clock = self.sentinels(None, None)
        self.failureResultOf(sentinels.master("m"), RedisUnavailable)

    def test_new_master_closes_old_connections(self) -> None:
        """
        When the Sentinels name another master, connections to the old
        one are closed (they are replaced by connections to the new one).
        """
        changed: list[tuple[str, int]] = []
        a = FakeConnection()
        sentinels, _clock = self.sentinels(a, None)
        endpoint = _MasterEndpoint(sentinels, "m", MemoryReactorClock(), changed.append)
        endpoint.connect(_ProtocolFactory(_Protocol, 0))
        a.answers[-1].callback(["ip", "10.0.0.5", "port", "6379", "flags", "master"])
        self.assertEqual(endpoint.address, ("10.0.0.5", 6379))
        self.assertEqual(changed, [])
        endpoint.connect(_ProtocolFactory(_Protocol, 0))
        a.answers[-1].callback(["ip", "10.0.0.6", "port", "6379", "flags", "master"])
        self.assertEqual(changed, [("10.0.0.6", 6379)])
