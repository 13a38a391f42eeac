"""
Tests for L{userli_postfix.redisconnections}: a connection that is kept up
whatever happens to it (a failed attempt, a set-up that fails or hangs, a
lost connection), with a back-off that never grows past half a second, and
a pool that says an outage once.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from userli_postfix.redisconnections import RETRY_DELAY, RETRY_INITIAL, RETRY_MAX, Pool, Supervisor


class FakeTransport:
    """Records how a connection was closed."""

    def __init__(self, protocol: FakeProtocol) -> None:
        self.protocol = protocol
        self.closed = ""

    def loseConnection(self) -> None:
        self.closed = "lost"
        self.protocol.lose()

    def abortConnection(self) -> None:
        self.closed = "aborted"
        self.protocol.lose()


class FakeProtocol:
    """A connection with txredisapi's C{whenDisconnected} and C{connected}."""

    def __init__(self) -> None:
        self.connected = 1
        self.transport = FakeTransport(self)
        self._waiting: list[defer.Deferred[Any]] = []

    def whenDisconnected(self) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self._waiting.append(d)
        return d

    def lose(self) -> None:
        if not self.connected:
            return
        self.connected = 0
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(self)


class Server:
    """
    The far end as the test wants it: each connection attempt is a
    Deferred the test fires (C{attempts}), each set-up too (C{setups}).
    """

    def __init__(self) -> None:
        self.attempts: list[defer.Deferred[Any]] = []
        self.setups: list[tuple[FakeProtocol, defer.Deferred[None]]] = []

    def connect(self) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.attempts.append(d)
        return d

    def prepare(self, protocol: Any) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self.setups.append((protocol, d))
        return d

    def accept(self) -> FakeProtocol:
        """Let the last attempt connect, and its set-up succeed."""
        protocol = FakeProtocol()
        self.attempts[-1].callback(protocol)
        self.setups[-1][1].callback(None)
        return protocol


class SupervisorTests(SynchronousTestCase):
    """L{Supervisor}: one connection, kept up."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.server = Server()
        self.events: list[tuple[str, Any]] = []
        self.supervisor = Supervisor(
            self.server.connect,
            self.server.prepare,
            self.clock,
            lambda p: self.events.append(("ready", p)),
            lambda p: self.events.append(("lost", p)),
            lambda why: self.events.append(("failed", why)),
        )
        self.supervisor.start()

    def test_ready_after_setup(self) -> None:
        """A connection is ready only once its set-up is done."""
        protocol = FakeProtocol()
        self.server.attempts[0].callback(protocol)
        self.assertIsNone(self.supervisor.protocol)
        self.assertEqual(self.events, [])
        self.server.setups[0][1].callback(None)
        self.assertIs(self.supervisor.protocol, protocol)
        self.assertEqual(self.events, [("ready", protocol)])

    def test_backoff_capped(self) -> None:
        """
        Failed attempts are retried forever, the delay growing from a
        fraction of a second but never past half a second (plus a little jitter), however long
        the server is away: it is used again within about half a second of
        its return.
        """
        delays = [RETRY_DELAY(n) for n in range(1, 200)]
        self.assertLess(delays[0], RETRY_MAX / 2)
        self.assertLessEqual(max(delays), RETRY_MAX + RETRY_INITIAL / 2)
        self.assertGreaterEqual(min(delays[10:]), RETRY_MAX)
        for n in range(100):
            self.assertEqual(len(self.server.attempts), n + 1)
            self.server.attempts[-1].errback(ConnectionRefusedError())
            self.clock.advance(RETRY_MAX + RETRY_INITIAL / 2)
        self.server.accept()
        self.assertIsNotNone(self.supervisor.protocol)

    def test_setup_failure_retried(self) -> None:
        """
        A connection whose set-up fails (AUTH or SELECT refused or timed
        out: a Redis frozen or still starting) is closed and replaced after
        the back-off: never given up, as txredisapi's own pool did.
        """
        for _ in range(20):
            protocol = FakeProtocol()
            self.server.attempts[-1].callback(protocol)
            self.server.setups[-1][1].errback(TimeoutError("no answer to AUTH"))
            self.assertEqual(protocol.transport.closed, "aborted")
            self.assertIsNone(self.supervisor.protocol)
            self.clock.advance(RETRY_MAX + RETRY_INITIAL / 2)
        self.assertEqual(len(self.server.attempts), 21)
        protocol = self.server.accept()
        self.assertIs(self.supervisor.protocol, protocol)
        self.assertIn(("failed", "TimeoutError: no answer to AUTH"), self.events)

    def test_lost_replaced_at_once(self) -> None:
        """A ready connection that closes is replaced at once, not after a back-off."""
        protocol = self.server.accept()
        protocol.lose()
        self.assertIsNone(self.supervisor.protocol)
        self.assertEqual(self.events[-1], ("lost", protocol))
        self.clock.advance(0)
        self.assertEqual(len(self.server.attempts), 2)

    def test_lost_during_setup(self) -> None:
        """A connection lost while it is set up is retried once, after the back-off."""
        protocol = FakeProtocol()
        self.server.attempts[0].callback(protocol)
        protocol.lose()
        self.server.setups[0][1].errback(ConnectionError("Lost connection"))
        self.assertIsNone(self.supervisor.protocol)
        self.clock.advance(RETRY_MAX + RETRY_INITIAL / 2)
        self.assertEqual(len(self.server.attempts), 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_closes(self) -> None:
        """Stopping closes the connection and tries no more."""
        protocol = self.server.accept()
        d = self.supervisor.stop()
        self.assertEqual(protocol.transport.closed, "lost")
        self.successResultOf(d)
        self.clock.advance(10)
        self.assertEqual(len(self.server.attempts), 1)

    def test_stop_while_waiting(self) -> None:
        """Stopping between attempts cancels the next one."""
        self.server.attempts[0].errback(ConnectionRefusedError())
        self.successResultOf(self.supervisor.stop())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_while_connecting(self) -> None:
        """Stopping during an attempt cancels it."""
        self.successResultOf(self.supervisor.stop())
        self.assertTrue(self.server.attempts[0].called)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class PoolTests(SynchronousTestCase):
    """L{Pool}: several connections, a ready one picked in turn, an outage said once."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.server = Server()
        self.logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)
        self.pool = Pool("Redis", 2, self.server.connect, self.server.prepare, self.clock)
        self.pool.start()

    def warnings(self) -> list[dict[str, Any]]:
        return [e for e in self.logged if e.get("log_level") in (LogLevel.warn, LogLevel.info)]

    def test_pick(self) -> None:
        """No ready connection: None; otherwise each ready one in turn."""
        self.assertIsNone(self.pool.pick())
        first = FakeProtocol()
        self.server.attempts[0].callback(first)
        self.assertIsNone(self.pool.pick())
        self.server.setups[0][1].callback(None)
        self.assertIs(self.pool.pick(), first)
        second = self.server.accept()
        self.assertEqual({self.pool.pick(), self.pool.pick()}, {first, second})
        first.lose()
        self.assertIs(self.pool.pick(), second)

    def test_outage_said_once(self) -> None:
        """However many attempts fail, one line says so, and one says when it is back."""
        for _ in range(50):
            for attempt in self.server.attempts:
                if not attempt.called:
                    attempt.errback(ConnectionRefusedError())
            self.clock.advance(RETRY_MAX + RETRY_INITIAL / 2)
        self.assertEqual(len(self.warnings()), 1)
        self.assertIn("not reachable", self.warnings()[0]["log_format"])
        self.server.accept()
        self.assertEqual(len(self.warnings()), 2)
        self.assertIn("reachable again", self.warnings()[1]["log_format"])

    def test_stop(self) -> None:
        """Stopping closes every connection."""
        protocol = self.server.accept()
        self.successResultOf(self.pool.stop())
        self.assertEqual(protocol.transport.closed, "lost")
        self.assertEqual(self.clock.getDelayedCalls(), [])
