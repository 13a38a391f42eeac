"""
Tests for L{userli_postfix.serving}: the connection discipline every
listener shares (in-order replies, connection limit, idle timeout,
back-pressure, drain at shutdown), through a minimal line protocol over
C{StringTransport} and a L{Clock}.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from userli_postfix.metrics import Metrics
from userli_postfix.serving import (
    MAX_CONNECTIONS,
    MAX_PIPELINED,
    REFUSAL_REPORT_INTERVAL,
    ConnectionMixin,
    LimitedFactory,
    ReplyQueue,
    ServingMixin,
)

ADDRESS = IPv4Address("TCP", "127.0.0.1", 40000)


class LineServer(ServingMixin, LineReceiver):
    """
    Answers C{now X} at once with C{X}, and any other line with a Deferred
    the test fires through the factory.
    """

    delimiter = b"\n"

    def lineReceived(self, line: bytes) -> None:
        if line.startswith(b"now "):
            self.reply(line[4:] + b"\n")
            return
        answer: defer.Deferred[bytes] = defer.Deferred()
        self.factory.pending.append((line, answer))  # type: ignore[attr-defined]
        self.reply(answer)


class LineFactory(LimitedFactory):
    """A L{LimitedFactory} that keeps the answers still to be given."""

    protocol = LineServer

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.pending: list[tuple[bytes, defer.Deferred[bytes]]] = []

    def answer(self, line: bytes) -> None:
        """Fire the answer to C{line} with C{line} itself, upper-cased."""
        for index, (pending, d) in enumerate(self.pending):
            if pending == line:
                del self.pending[index]
                d.callback(line.upper() + b"\n")
                return
        raise AssertionError(f"no request {line!r} pending")


class ListenerTestCase(SynchronousTestCase):
    """A factory over a L{Clock}, with real gauges to read."""

    idle = 10.0

    def setUp(self) -> None:
        self.clock = Clock()
        self.metrics = Metrics(process=False)
        self.factory = self.makeFactory()

    def makeFactory(self, **kwargs: object) -> LineFactory:
        return LineFactory(
            self.clock,
            self.idle,
            active=self.metrics.active_connections,
            usage=self.metrics.connection_pool_usage,
            refused=self.metrics.policy_connection_pool_full,
            **kwargs,
        )

    def connect(self, factory: LineFactory | None = None) -> tuple[LineServer, StringTransport]:
        protocol = (factory or self.factory).buildProtocol(ADDRESS)
        assert isinstance(protocol, LineServer)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def closed(self, protocol: LineServer, transport: StringTransport) -> None:
        """Finish a close the server asked for, as the reactor would."""
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(Failure(ConnectionDone()))

    def sample(self, name: str) -> float | None:
        return self.metrics.registry.get_sample_value(name)


class ReplyQueueTests(SynchronousTestCase):
    """L{ReplyQueue} on its own."""

    def setUp(self) -> None:
        self.written: list[bytes] = []
        self.changes = 0
        self.queue = ReplyQueue(self.written.append, self.changed)

    def changed(self) -> None:
        self.changes += 1

    def test_immediate(self) -> None:
        """A ready answer with nothing queued is written at once."""
        self.queue.add(b"a")
        self.assertEqual(self.written, [b"a"])
        self.assertEqual(len(self.queue), 0)

    def test_out_of_order(self) -> None:
        """Answers completing out of order are written in request order."""
        first: defer.Deferred[bytes] = defer.Deferred()
        second: defer.Deferred[bytes] = defer.Deferred()
        third: defer.Deferred[bytes] = defer.Deferred()
        for d in (first, second, third):
            self.queue.add(d)
        self.assertEqual(len(self.queue), 3)
        third.callback(b"3")
        second.callback(b"2")
        self.assertEqual(self.written, [])
        first.callback(b"1")
        self.assertEqual(self.written, [b"1", b"2", b"3"])
        self.assertEqual(len(self.queue), 0)

    def test_ready_answer_waits_its_turn(self) -> None:
        """A ready answer behind a pending one waits for it."""
        pending: defer.Deferred[bytes] = defer.Deferred()
        self.queue.add(pending)
        self.queue.add(b"2")
        self.assertEqual(self.written, [])
        pending.callback(b"1")
        self.assertEqual(self.written, [b"1", b"2"])

    def test_partial_flush(self) -> None:
        """Only the answered head of the queue is written; the rest keeps waiting."""
        ds: list[defer.Deferred[bytes]] = [defer.Deferred() for _ in range(3)]
        for d in ds:
            self.queue.add(d)
        ds[0].callback(b"1")
        self.assertEqual(self.written, [b"1"])
        self.assertEqual(len(self.queue), 2)
        ds[2].callback(b"3")
        self.assertEqual(self.written, [b"1"])
        ds[1].callback(b"2")
        self.assertEqual(self.written, [b"1", b"2", b"3"])

    def test_closed(self) -> None:
        """Once the connection is gone, answers are dropped, not written."""
        pending: defer.Deferred[bytes] = defer.Deferred()
        self.queue.add(pending)
        self.queue.closed = True
        pending.callback(b"1")
        self.queue.add(b"2")
        self.assertEqual(self.written, [])

    def test_failed_answer_logged(self) -> None:
        """A Deferred that fails against the contract is logged, not left unhandled."""
        failing: defer.Deferred[bytes] = defer.Deferred()
        self.queue.add(failing)
        failing.errback(RuntimeError("bug"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_changes_reported(self) -> None:
        """The owner hears when the number of outstanding answers changes."""
        pending: defer.Deferred[bytes] = defer.Deferred()
        self.queue.add(pending)
        self.assertEqual(self.changes, 1)
        pending.callback(b"1")
        self.assertEqual(self.changes, 2)

    def test_immediate_answer_reported(self) -> None:
        """
        An answer written at once is reported too, so the owner restarts its
        idle timer (and closes a draining connection) after it.
        """
        self.queue.add(b"a")
        self.assertEqual(self.changes, 1)


class OrderingTests(ListenerTestCase):
    """Replies on a connection leave in request order."""

    def test_out_of_order_answers(self) -> None:
        """Lookups finishing out of order are still answered in order."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"a\nb\nnow c\nd\n")
        self.factory.answer(b"d")
        self.factory.answer(b"b")
        self.assertEqual(transport.value(), b"")
        self.factory.answer(b"a")
        self.assertEqual(transport.value(), b"A\nB\nc\nD\n")
        self.assertEqual(protocol.outstanding, 0)

    def test_connections_independent(self) -> None:
        """A slow answer on one connection does not hold up another."""
        slow, slowTransport = self.connect()
        fast, fastTransport = self.connect()
        slow.dataReceived(b"a\n")
        fast.dataReceived(b"now b\n")
        self.assertEqual(fastTransport.value(), b"b\n")
        self.assertEqual(slowTransport.value(), b"")

    def test_failed_answer_closes_connection(self) -> None:
        """
        An answer that fails against the contract would block every later
        reply; the connection is closed instead of stalling.
        """
        protocol, transport = self.connect()
        protocol.dataReceived(b"a\nb\n")
        self.factory.pending[0][1].errback(RuntimeError("bug"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertTrue(transport.disconnecting)

    def test_answer_after_close(self) -> None:
        """An answer that completes after the client left is dropped quietly."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"a\n")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.factory.answer(b"a")
        self.assertEqual(transport.value(), b"")

    def test_answer_after_close_holds_nothing(self) -> None:
        """
        No timer is armed for a connection that is gone: the idle timer
        would keep the dead connection (and all it holds) in memory for the
        whole idle timeout, 5.5 minutes for the policy server.
        """
        protocol, _ = self.connect()
        protocol.dataReceived(b"a\n")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.factory.answer(b"a")
        self.assertEqual(self.clock.getDelayedCalls(), [])


class LimitTests(ListenerTestCase):
    """At most 500 connections per listener, like the Go program."""

    def test_limit(self) -> None:
        """
        The 501st connection is refused (no protocol: Twisted closes it at
        once), counted, and the gauges show 500.
        """
        self.assertEqual(MAX_CONNECTIONS, 500)
        for _ in range(500):
            self.connect()
        self.assertIsNone(self.factory.buildProtocol(ADDRESS))
        self.assertEqual(
            self.sample("userli_postfix_adapter_policy_connection_pool_full_total"), 1.0
        )
        self.assertEqual(self.sample("userli_postfix_adapter_active_connections"), 500.0)
        self.assertEqual(self.sample("userli_postfix_adapter_connection_pool_usage"), 500.0)

    def test_refusals_reported_sparingly(self) -> None:
        """
        A flood of refused connections is one warning per
        L{REFUSAL_REPORT_INTERVAL}, carrying the number refused since the
        last one, not one warning per connection.
        """
        factory = self.makeFactory(max_connections=1)
        self.connect(factory)
        events: list[dict[str, object]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)

        def reports() -> list[object]:
            return [e.get("refused") for e in events if "refused" in e]

        for _ in range(1000):
            self.assertIsNone(factory.buildProtocol(ADDRESS))
        self.assertEqual(reports(), [1])
        self.clock.advance(REFUSAL_REPORT_INTERVAL - 1)
        factory.buildProtocol(ADDRESS)
        self.assertEqual(reports(), [1])
        self.clock.advance(1)
        factory.buildProtocol(ADDRESS)
        self.assertEqual(reports(), [1, 1001])

    def test_room_after_close(self) -> None:
        """When a connection closes, its place is free again."""
        factory = self.makeFactory(max_connections=2)
        first = self.connect(factory)
        self.connect(factory)
        self.assertIsNone(factory.buildProtocol(ADDRESS))
        first[0].connectionLost(Failure(ConnectionDone()))
        self.assertIsInstance(factory.buildProtocol(ADDRESS), LineServer)

    def test_gauges_follow_connections(self) -> None:
        """The active-connection gauges go up and down with the connections."""
        protocol, _ = self.connect()
        self.connect()
        self.assertEqual(self.sample("userli_postfix_adapter_active_connections"), 2.0)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.sample("userli_postfix_adapter_active_connections"), 1.0)
        self.assertEqual(self.sample("userli_postfix_adapter_connection_pool_usage"), 1.0)

    def test_without_metrics(self) -> None:
        """A factory without gauges and counter works the same."""
        factory = LineFactory(self.clock, self.idle, max_connections=1)
        protocol, _ = self.connect(factory)
        self.assertIsNone(factory.buildProtocol(ADDRESS))
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(factory.connections, set())


class IdleTimeoutTests(ListenerTestCase):
    """A connection waits at most C{idle_timeout} for its next request."""

    def test_idle_closed(self) -> None:
        """A connection that sends nothing is closed after the idle timeout."""
        protocol, transport = self.connect()
        self.clock.advance(self.idle - 0.001)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.001)
        self.closed(protocol, transport)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_outstanding_not_cut(self) -> None:
        """
        While a request is outstanding the connection is not idle, however long
        the answer takes; the timer starts again once it is written.
        """
        protocol, transport = self.connect()
        protocol.dataReceived(b"a\n")
        self.clock.advance(self.idle * 10)
        self.assertFalse(transport.disconnecting)
        self.factory.answer(b"a")
        self.clock.advance(self.idle - 0.001)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.001)
        self.assertTrue(transport.disconnecting)

    def test_immediate_answer_restarts_timer(self) -> None:
        """
        A request answered at once (a cache hit) also starts the wait for the
        next request afresh: an active client is not cut.
        """
        protocol, transport = self.connect()
        for _ in range(5):
            self.clock.advance(self.idle - 1)
            protocol.dataReceived(b"now x\n")
        self.assertFalse(transport.disconnecting)
        self.clock.advance(self.idle)
        self.assertTrue(transport.disconnecting)

    def test_trickling_client_cut(self) -> None:
        """
        Bytes that never make up a request do not keep a connection alive: a
        client trickling one byte a second is cut at the idle timeout.
        """
        protocol, transport = self.connect()
        for _ in range(int(self.idle) - 1):
            protocol.dataReceived(b"x")
            self.clock.advance(1)
            self.assertFalse(transport.disconnecting)
        protocol.dataReceived(b"x")
        self.clock.advance(1)
        self.assertTrue(transport.disconnecting)

    def test_per_protocol_timeout(self) -> None:
        """A protocol may choose its own idle timeout (SASL waits 360 s)."""

        class Patient(LineServer):
            def idleTimeout(self) -> float | None:
                return 360.0

        factory = self.makeFactory()
        factory.protocol = Patient
        _, transport = self.connect(factory)
        self.clock.advance(359)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(transport.disconnecting)


class BackPressureTests(ListenerTestCase):
    """A client that pipelines without reading is paused until the replies drain."""

    def test_pause_and_resume(self) -> None:
        """
        Reading stops at L{MAX_PIPELINED} outstanding requests and resumes once
        fewer than half of that are left.
        """
        protocol, transport = self.connect()
        lines = [b"r%d" % i for i in range(MAX_PIPELINED)]
        protocol.dataReceived(b"".join(line + b"\n" for line in lines[:-1]))
        self.assertEqual(transport.producerState, "producing")
        protocol.dataReceived(lines[-1] + b"\n")
        self.assertEqual(transport.producerState, "paused")
        half = MAX_PIPELINED // 2
        for line in lines[:half]:
            self.factory.answer(line)
        self.assertEqual(protocol.outstanding, half)
        self.assertEqual(transport.producerState, "paused")
        self.factory.answer(lines[half])
        self.assertEqual(transport.producerState, "producing")

    def test_no_resume_after_close(self) -> None:
        """A connection that went away while paused is not resumed."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"".join(b"r%d\n" % i for i in range(MAX_PIPELINED)))
        self.assertEqual(transport.producerState, "paused")
        protocol.connectionLost(Failure(ConnectionDone()))
        for i in range(MAX_PIPELINED):
            self.factory.answer(b"r%d" % i)
        self.assertEqual(transport.producerState, "paused")


class DrainTests(ListenerTestCase):
    """Shutdown: finish what was asked, then go."""

    def test_nothing_open(self) -> None:
        """With no connections, draining is done at once."""
        self.successResultOf(self.factory.drain(5.0))

    def test_idle_closed_busy_after_reply(self) -> None:
        """
        Idle connections are closed at once; a busy one gets its reply first
        and is closed right after it.
        """
        idle, idleTransport = self.connect()
        busy, busyTransport = self.connect()
        busy.dataReceived(b"a\n")
        done = self.factory.drain(5.0)
        self.closed(idle, idleTransport)
        self.assertFalse(busyTransport.disconnecting)
        self.assertNoResult(done)
        self.factory.answer(b"a")
        self.assertEqual(busyTransport.value(), b"A\n")
        self.closed(busy, busyTransport)
        self.successResultOf(done)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_refused_while_draining(self) -> None:
        """No new connection is accepted once draining started."""
        self.connect()
        self.factory.drain(5.0)
        self.assertIsNone(self.factory.buildProtocol(ADDRESS))

    def test_abort_after_grace(self) -> None:
        """A connection still busy when the grace period ends is aborted."""
        busy, transport = self.connect()
        busy.dataReceived(b"a\n")
        done = self.factory.drain(5.0)
        self.clock.advance(4.999)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.001)
        self.assertTrue(transport.disconnected)
        busy.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(done)

    def test_request_answered_at_once_while_draining(self) -> None:
        """
        A request that arrives on a draining connection and is answered at
        once gets its answer, and then the connection is closed.
        """
        busy, transport = self.connect()
        busy.dataReceived(b"a\n")
        self.factory.drain(5.0)
        busy.dataReceived(b"now b\n")
        self.factory.answer(b"a")
        self.assertEqual(transport.value(), b"A\nb\n")
        self.assertTrue(transport.disconnecting)


class CountingServer(ConnectionMixin, LineReceiver):
    """
    A protocol that answers out of order, as SASL does, on the bare
    L{ConnectionMixin}: C{begin} and C{end} open and finish a pending
    request, C{hold} and C{release} something a drain must also wait for.
    It pauses at 4 pending requests, with LineReceiver's own pause.
    """

    delimiter = b"\n"
    maxPending = 4

    def connectionMade(self) -> None:
        self.count = 0
        self.held = 0
        super().connectionMade()

    @property
    def pending(self) -> int:
        return self.count

    @property
    def outstanding(self) -> int:
        return self.count + self.held

    def pauseReading(self) -> None:
        self.pauseProducing()  # type: ignore[no-untyped-call]

    def resumeReading(self) -> None:
        self.resumeProducing()  # type: ignore[no-untyped-call]

    def lineReceived(self, line: bytes) -> None:
        if line == b"begin":
            self.count += 1
            self.pendingChanged()
        elif line == b"hold":
            self.held += 1
        elif line == b"release":
            self.held -= 1
            self.closeIfDrained()
        self.transport.write(line + b"\n")

    def end(self) -> None:
        """Finish one pending request, as an answer arriving later would."""
        self.count -= 1
        self.pendingChanged()


class ConnectionMixinTests(ListenerTestCase):
    """
    L{ConnectionMixin} serves a protocol that counts its own pending
    requests, its own threshold, pause and outstanding work.
    """

    def connectCounting(self) -> tuple[CountingServer, StringTransport]:
        factory = self.makeFactory()
        factory.protocol = CountingServer
        self.factory = factory
        protocol = factory.buildProtocol(ADDRESS)
        assert isinstance(protocol, CountingServer)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def test_pending_stops_idle_timer(self) -> None:
        """
        While a request is pending the connection is never idle; once none
        is, the idle timer starts afresh.
        """
        protocol, transport = self.connectCounting()
        protocol.dataReceived(b"begin\n")
        self.clock.advance(self.idle * 10)
        self.assertFalse(transport.disconnecting)
        protocol.end()
        self.clock.advance(self.idle - 0.001)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.001)
        self.assertTrue(transport.disconnecting)

    def test_own_threshold_and_pause(self) -> None:
        """
        Reading stops at the protocol's C{maxPending}, through its own pause
        (lines already received wait too), and resumes below half of it,
        parsing what was received meanwhile.
        """
        protocol, transport = self.connectCounting()
        protocol.dataReceived(b"begin\n" * 4 + b"hold\n")
        self.assertTrue(protocol.paused)
        self.assertEqual(transport.producerState, "paused")
        self.assertEqual(transport.value(), b"begin\n" * 4)
        protocol.end()
        protocol.end()
        self.assertTrue(protocol.paused)
        protocol.end()
        self.assertFalse(protocol.paused)
        self.assertEqual(transport.value(), b"begin\n" * 4 + b"hold\n")
        self.assertEqual(protocol.held, 1)

    def test_drain_waits_for_outstanding(self) -> None:
        """
        A drain closes a connection only when nothing is outstanding, which
        may be more than the pending requests.
        """
        protocol, transport = self.connectCounting()
        protocol.dataReceived(b"hold\nbegin\n")
        self.factory.drain(5.0)
        self.assertFalse(transport.disconnecting)
        protocol.end()
        self.assertFalse(transport.disconnecting)
        protocol.dataReceived(b"release\n")
        self.assertTrue(transport.disconnecting)

    def test_nothing_after_close(self) -> None:
        """A change reported after the connection went away arms no timer."""
        protocol, _transport = self.connectCounting()
        protocol.dataReceived(b"begin\n")
        protocol.connectionLost(Failure(ConnectionDone()))
        protocol.end()
        self.assertEqual(self.clock.getDelayedCalls(), [])
