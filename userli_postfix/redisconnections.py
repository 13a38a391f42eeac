"""
Connections kept up: one connection that reconnects by itself whatever
happens to it, and a pool of them.

The Redis client needs three things of its connections that txredisapi's
own pool gives only through private parts or not at all: to keep trying
after a connection failed its set-up (AUTH or SELECT timed out on a Redis
that was frozen or still starting), to retry often enough that the cache is
back within a second of Redis's return however long it was away, and to
know at once that no connection is up, so that a command fails at once
instead of queueing.  So the daemon owns this piece: each connection is
connected through a Twisted endpoint, prepared by a callable (which fails
to reject the connection), and replaced after a capped back-off.

Twisted's C{ClientService} does the same but logs every retry at info
level, which at a retry every half second would be ten lines a second
during a Redis outage; here an outage is said once, and its end once.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from twisted.application.internet import backoffPolicy
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

# The first retry follows at once-ish, later ones every half second at
# most: a dead server costs a refused connection twice a second, and a
# server that is back is used again within about half a second, however
# long it was away.
RETRY_INITIAL = 0.1
RETRY_MAX = 0.5

RETRY_DELAY: Callable[[int], float] = backoffPolicy(
    initialDelay=RETRY_INITIAL,
    maxDelay=RETRY_MAX,
    factor=2.0,
    # Spread the connections of a pool (and of several processes) a little.
    jitter=lambda: random.uniform(0, RETRY_INITIAL / 2),
)


def describe(failure: Failure) -> str:
    """A failure as one short line for the log."""
    return f"{type(failure.value).__name__}: {failure.value}"


class Supervisor:
    """
    Keeps one connection up, forever until L{stop}.

    @param connect: makes one connection attempt; fires with the protocol,
        which must offer C{whenDisconnected()} (as txredisapi's do).
    @param prepare: readies a new connection (AUTH, SELECT, ...); a failure
        rejects it: it is closed and the next attempt follows after the
        back-off, as after a failed attempt.
    @param ready: called with the protocol once it is prepared.
    @param lost: called with the protocol and why, when a prepared
        connection closes.
    @param failed: called with why, when an attempt or its preparation
        fails.
    """

    def __init__(
        self,
        connect: Callable[[], defer.Deferred[Any]],
        prepare: Callable[[Any], defer.Deferred[Any]],
        clock: IReactorTime,
        ready: Callable[[Any], None],
        lost: Callable[[Any], None],
        failed: Callable[[str], None],
        delay: Callable[[int], float] = RETRY_DELAY,
    ) -> None:
        self._connect = connect
        self._prepare = prepare
        self._clock = clock
        self._ready = ready
        self._lost = lost
        self._failed = failed
        self._delay = delay
        self._failures = 0
        self._stopped = True
        self._timer: IDelayedCall | None = None
        self._attempt: defer.Deferred[Any] | None = None
        # The connection being prepared or in use, and whether it is in use.
        self.current: Any = None
        self.protocol: Any = None

    def start(self) -> None:
        """Connect now, and again whenever the connection is lost."""
        if self._stopped:
            self._stopped = False
            self._try()

    def _try(self) -> None:
        self._timer = None
        if self._stopped:
            return
        try:
            attempt = self._connect()
        except Exception:
            attempt = defer.fail()
        self._attempt = attempt
        attempt.addCallbacks(self._connected, self._attemptFailed)

    def _connected(self, protocol: Any) -> None:
        self._attempt = None
        self.current = protocol
        protocol.whenDisconnected().addCallback(self._closed)
        if self._stopped:
            protocol.transport.loseConnection()
            return
        try:
            preparing = self._prepare(protocol)
        except Exception:
            preparing = defer.fail()
        preparing.addCallbacks(
            lambda _: self._prepared(protocol),
            lambda failure: self._rejected(failure, protocol),
        )

    def _prepared(self, protocol: Any) -> None:
        if protocol is not self.current or not protocol.connected:
            # Lost while it was being prepared: _closed has retried.
            return
        self._failures = 0
        self.protocol = protocol
        self._ready(protocol)

    def _rejected(self, failure: Failure, protocol: Any) -> None:
        if not self._stopped:
            self._failed(describe(failure))
        if protocol is self.current and protocol.connected:
            # Its loss (_closed) schedules the next attempt.
            protocol.transport.abortConnection()

    def _attemptFailed(self, failure: Failure) -> None:
        self._attempt = None
        if self._stopped:
            return
        self._failed(describe(failure))
        self._retryLater()

    def _closed(self, protocol: Any) -> None:
        if protocol is not self.current:
            return
        self.current = None
        if protocol is self.protocol:
            self.protocol = None
            self._lost(protocol)
            if not self._stopped:
                # A connection that was in use: the next one at once, as a
                # client that connects when a command needs it would.
                self._timer = self._clock.callLater(0, self._try)
            return
        self._retryLater()

    def _retryLater(self) -> None:
        if self._stopped or self._timer is not None:
            return
        self._failures += 1
        self._timer = self._clock.callLater(self._delay(self._failures), self._try)

    def stop(self) -> defer.Deferred[None]:
        """Stop trying and close the connection; fires once it is closed."""
        self._stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._attempt is not None:
            attempt, self._attempt = self._attempt, None
            attempt.addErrback(lambda _: None)
            attempt.cancel()
        protocol = self.current
        if protocol is None:
            return defer.succeed(None)
        closed: defer.Deferred[None] = protocol.whenDisconnected().addCallback(lambda _: None)
        protocol.transport.loseConnection()
        return closed


class Pool:
    """
    Several supervised connections to one server, and which of them are
    ready.  An outage is logged once when the last connection goes (or the
    first attempts fail) and once when one is back.

    @param name: what the log lines call the server, e.g. C{Redis}.
    @param ready: also told of every connection that becomes ready.
    @param lost: also told of every ready connection that closes.
    """

    def __init__(
        self,
        name: str,
        size: int,
        connect: Callable[[], defer.Deferred[Any]],
        prepare: Callable[[Any], defer.Deferred[Any]],
        clock: IReactorTime,
        ready: Callable[[Any], None] | None = None,
        lost: Callable[[Any], None] | None = None,
        quiet: bool = False,
    ) -> None:
        self.name = name
        self._clock = clock
        self._onReady = ready
        self._onLost = lost
        self._quiet = quiet
        self.ready: list[Any] = []
        self._next = 0
        # None: never up yet; the moment the last connection went otherwise.
        self._downSince: float | None = clock.seconds()
        self._said = False
        self.supervisors = [
            Supervisor(connect, prepare, clock, self._ready, self._lost, self._failed)
            for _ in range(size)
        ]

    def start(self) -> None:
        """Start connecting every connection of the pool."""
        for supervisor in self.supervisors:
            supervisor.start()

    def pick(self) -> Any:
        """A ready connection (in turn), or C{None} when none is."""
        ready = self.ready
        if not ready:
            return None
        self._next = (self._next + 1) % len(ready)
        return ready[self._next]

    def _ready(self, protocol: Any) -> None:
        self.ready.append(protocol)
        if self._downSince is not None:
            if self._said and not self._quiet:
                log.info(
                    "{name} reachable again after {seconds:.1f} s",
                    name=self.name,
                    seconds=self._clock.seconds() - self._downSince,
                )
            self._downSince = None
            self._said = False
        if self._onReady is not None:
            self._onReady(protocol)

    def _lost(self, protocol: Any) -> None:
        if protocol in self.ready:
            self.ready.remove(protocol)
        if not self.ready and self._downSince is None:
            self._downSince = self._clock.seconds()
        if self._onLost is not None:
            self._onLost(protocol)

    def _failed(self, why: str) -> None:
        if self.ready or self._said or self._quiet:
            return
        self._said = True
        log.warn(
            "{name} not reachable ({why}); commands fail at once, and the connections are "
            "retried every {retry:g} s at most",
            name=self.name,
            why=why,
            retry=RETRY_MAX,
        )

    def stop(self) -> defer.Deferred[None]:
        """Close every connection and stop reconnecting."""
        d = defer.DeferredList([s.stop() for s in self.supervisors], consumeErrors=True)
        return d.addCallback(lambda _: None)
