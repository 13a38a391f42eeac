"""
What every listener shares: a connection limit, an idle timeout,
back-pressure, a graceful drain at shutdown, and in-order replies for the
protocols that answer in request order.

Socketmap, policy and SASL protocols differ only in framing and in the
decision they ask for; the connection discipline lives here, once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from prometheus_client import Counter, Gauge
from twisted.internet import defer
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

MAX_CONNECTIONS = 500

# A client that pipelines more requests than this without reading replies is
# paused until the replies drain; Postfix sends one request at a time.
MAX_PIPELINED = 64

# Refused connections are reported at most this often per listener, with the
# number refused since the last report: a flood of connections must not
# become a flood of log lines.
REFUSAL_REPORT_INTERVAL = 10.0

log = Logger()


class ReplyQueue:
    """
    Replies of one connection, written in request order however the
    answers complete.

    Each request reserves a slot; a slot is written once it and every slot
    before it have an answer.
    """

    def __init__(
        self,
        write: Callable[[bytes], None],
        on_change: Callable[[], None],
        on_broken: Callable[[], None] = lambda: None,
    ) -> None:
        self._write = write
        self._on_change = on_change
        self._on_broken = on_broken
        self._slots: deque[list[bytes | None]] = deque()
        self.closed = False

    def __len__(self) -> int:
        return len(self._slots)

    def add(self, reply: defer.Deferred[bytes] | bytes) -> None:
        """
        Queue C{reply}; a Deferred must not fail (protocols turn failures
        into their own safe answer before handing it here).
        """
        if isinstance(reply, bytes):
            if not self._slots:
                # The common case of a cached answer: nothing to wait for.
                if not self.closed:
                    self._write(reply)
                # A request was answered: the wait for the next one starts now.
                self._on_change()
                return
            self._slots.append([reply])
            self._on_change()
            return
        slot: list[bytes | None] = [None]
        self._slots.append(slot)
        self._on_change()

        def fill(data: bytes) -> None:
            slot[0] = data
            self._flush()

        reply.addCallback(fill)
        reply.addErrback(self._unexpected)

    def _unexpected(self, failure: Failure) -> None:
        # A reply that can never be written would hold back every later
        # one: the connection is unusable, so end it (Postfix reconnects).
        log.failure("Reply could not be produced", failure)
        self._on_broken()

    def _flush(self) -> None:
        written = False
        while self._slots and self._slots[0][0] is not None:
            data = self._slots.popleft()[0]
            written = True
            if not self.closed:
                assert data is not None
                self._write(data)
        if written:
            self._on_change()


class ConnectionMixin(TimeoutMixin):
    """
    Mixed into each listener's protocol, before its framing base class: the
    connection's life as every listener lives it.

    Subclasses say how many requests are waiting for their answer
    (L{pending}) and call L{pendingChanged} whenever that number changes;
    the mixin then applies back-pressure, stops the idle timer while
    anything is pending and restarts it when nothing is, closes the
    connection once a drain finds it with nothing outstanding, and tells
    the factory about the connection's life.
    """

    factory: LimitedFactory
    transport: Any

    # Pending requests at which the connection stops being read; reading
    # resumes below half of this.
    maxPending = MAX_PIPELINED

    def idleTimeout(self) -> float | None:
        """Seconds a connection may wait for a request while nothing is outstanding."""
        return self.factory.idle_timeout

    def connectionMade(self) -> None:
        self.callLater = self.factory.clock.callLater  # type: ignore[assignment]
        self.disconnected = False
        self._paused = False
        self.factory.connectionOpened(self)
        self.setTimeout(self.idleTimeout())  # type: ignore[no-untyped-call]
        super().connectionMade()  # type: ignore[misc]

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self.disconnected = True
        self.setTimeout(None)  # type: ignore[no-untyped-call]
        self.factory.connectionClosed(self)
        super().connectionLost(reason)  # type: ignore[misc]

    @property
    def pending(self) -> int:
        """Requests received whose answer is still to be written."""
        raise NotImplementedError

    @property
    def outstanding(self) -> int:
        """
        What a drain waits for before closing the connection: the pending
        requests, unless a protocol has more to finish.
        """
        return self.pending

    def pauseReading(self) -> None:
        """Stop reading from the client (back-pressure)."""
        self.transport.pauseProducing()

    def resumeReading(self) -> None:
        """Read from the client again."""
        self.transport.resumeProducing()

    def pendingChanged(self) -> None:
        """Apply the idle timer, back-pressure and drain to the number now pending."""
        if self.disconnected:
            # An answer that came after the client left: arming the idle
            # timer would keep this dead connection alive until it fires.
            return
        pending = self.pending
        if pending:
            # The idle timer runs on while requests are pending, and
            # L{timeoutConnection} spares such a connection: cheaper than
            # cancelling a timer and making a new one for every request.
            if pending >= self.maxPending and not self._paused:
                self._paused = True
                self.pauseReading()
        else:
            self.setTimeout(self.idleTimeout())  # type: ignore[no-untyped-call]
            if self.factory.draining:
                self.closeIfDrained()
        if self._paused and pending < self.maxPending // 2 and not self.disconnected:
            self._paused = False
            self.resumeReading()

    def closeIfDrained(self) -> None:
        """Close the connection if a drain has begun and nothing is outstanding."""
        if self.factory.draining and not self.disconnected and not self.outstanding:
            self.transport.loseConnection()

    def timeoutConnection(self) -> None:
        if self.outstanding:
            # Not idle: waiting for an answer.  The timer starts over with
            # the reply.
            self.setTimeout(self.idleTimeout())  # type: ignore[no-untyped-call]
            return
        log.debug("Closing idle connection")
        self.transport.loseConnection()


class ServingMixin(ConnectionMixin):
    """
    L{ConnectionMixin} for protocols whose replies leave in request order.

    Subclasses call L{reply} with the answer (or a Deferred of it) to each
    request; the mixin keeps replies in order and counts as pending every
    reply not yet written.
    """

    def connectionMade(self) -> None:
        self.replies = ReplyQueue(
            self._writeReply, self.pendingChanged, lambda: self.transport.loseConnection()
        )
        super().connectionMade()

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self.replies.closed = True
        super().connectionLost(reason)

    def _writeReply(self, data: bytes) -> None:
        self.transport.write(data)

    def reply(self, answer: defer.Deferred[bytes] | bytes) -> None:
        """Queue the answer to the request just parsed."""
        self.replies.add(answer)

    @property
    def pending(self) -> int:
        return len(self.replies)


class LimitedFactory(Factory[Protocol]):
    """
    A factory that refuses connections beyond a limit, keeps the gauges of
    open connections, and drains its connections at shutdown.
    """

    def __init__(
        self,
        clock: IReactorTime,
        idle_timeout: float,
        active: Gauge | None = None,
        usage: Gauge | None = None,
        refused: Counter | None = None,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.connections: set[ConnectionMixin] = set()
        self.draining = False
        self._active = active
        self._usage = usage
        self._refused = refused
        self._allClosed: list[defer.Deferred[None]] = []
        self._unreported = 0
        self._lastReport: float | None = None

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        if self.draining or len(self.connections) >= self.max_connections:
            # Returning None makes Twisted close the new connection at once.
            if self._refused is not None:
                self._refused.inc()
            self._reportRefusal()
            return None
        return super().buildProtocol(addr)

    def _reportRefusal(self) -> None:
        self._unreported += 1
        now = self.clock.seconds()
        if self._lastReport is not None and now - self._lastReport < REFUSAL_REPORT_INTERVAL:
            return
        log.warn(
            "Connection refused: {count} connections open (limit {limit}); "
            "{refused} refused since the last report",
            count=len(self.connections),
            limit=self.max_connections,
            refused=self._unreported,
        )
        self._lastReport = now
        self._unreported = 0

    def connectionOpened(self, protocol: ConnectionMixin) -> None:
        self.connections.add(protocol)
        self._updateGauges()

    def connectionClosed(self, protocol: ConnectionMixin) -> None:
        self.connections.discard(protocol)
        self._updateGauges()
        if not self.connections:
            waiting, self._allClosed = self._allClosed, []
            for d in waiting:
                d.callback(None)

    def _updateGauges(self) -> None:
        if self._active is not None:
            self._active.set(len(self.connections))
        if self._usage is not None:
            self._usage.set(len(self.connections))

    def drain(self, grace: float) -> defer.Deferred[None]:
        """
        Stop serving: close idle connections now, the others as soon as
        their outstanding replies are written, and abort whatever is left
        after C{grace} seconds.  Fires when every connection is gone.
        """
        self.draining = True
        if not self.connections:
            return defer.succeed(None)
        done: defer.Deferred[None] = defer.Deferred()
        self._allClosed.append(done)
        for protocol in list(self.connections):
            if not protocol.outstanding:
                protocol.transport.loseConnection()

        def abortRest() -> None:
            for protocol in list(self.connections):
                protocol.transport.abortConnection()

        timer = self.clock.callLater(grace, abortRest)

        def cancelTimer(result: None) -> None:
            if timer.active():
                timer.cancel()
            return result

        done.addBoth(cancelTimer)
        return done
