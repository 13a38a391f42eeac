"""
A Redis connection from C{REDIS_URL}, every command bounded by a deadline.

txredisapi queues commands while it reconnects and waits for replies
forever unless told otherwise.  The cache and the rate limiter must answer
within a fraction of Postfix's patience whatever Redis does, so here a
command either gets its reply within the deadline or fails: at once when no
connection is up, with L{RedisUnavailable} after the deadline otherwise.
txredisapi keeps reconnecting in the background, so service resumes by
itself when Redis is back.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Protocol

import txredisapi
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from userli_postfix.config import RedisTarget
from userli_postfix.deadlines import answerWithin

log = Logger()

# A healthy Redis answers in well under a millisecond on a LAN.
COMMAND_TIMEOUT = 0.5
CONNECT_TIMEOUT = 2.0
POOL_SIZE = 4

# While a master is down, Sentinels answer at once but name no usable
# master; txredisapi waits for a better answer for 10 s by default, and its
# reconnection backoff grows to 10 s.  Either keeps the daemon off the new
# master for seconds after a failover.  Asking the Sentinels again every
# second costs them nothing.
SENTINEL_DISCOVERY_TIMEOUT = 1.0
SENTINEL_RETRY_MAX_DELAY = 1.0

# Where Redis publishes the keys a tracking client must forget (RESP2).
INVALIDATE_CHANNEL = "__redis__:invalidate"

# How often a tracking connection on which Redis refused tracking (Redis
# older than 6, CLIENT renamed away) asks again: an upgrade or a changed
# configuration is then noticed without a restart, at the cost of three
# tiny commands.
TRACKING_RETRY = 30.0

# How often the subscriber connection is asked for a PING.  Nothing else is
# ever sent on it, so without this a connection that died silently (a
# network partition) would go unnoticed, and with it the invalidations it
# no longer receives; txredisapi's reply timeout closes a connection whose
# PING is not answered, which ends tracking here.
TRACKING_PING = 1.0


class RedisUnavailable(Exception):
    """Redis did not answer: not connected, timed out, or the connection broke."""


class _KeepTrying:
    """
    Keeps a connection pool reconnecting whatever happens to a connection.

    txredisapi stops reconnecting for good when AUTH or SELECT fails on a
    new connection, a reply timeout included: a Redis that is frozen,
    overloaded or still starting at that moment would leave the daemon
    without Redis until it is restarted.  txredisapi closes that connection
    anyway; here its slot then tries again, with the usual backoff.
    """

    def stopTrying(self) -> defer.Deferred[None]:
        return defer.succeed(None)


class _Factory(_KeepTrying, txredisapi.RedisFactory):  # type: ignore[misc]
    """A pool of connections to one Redis server."""


class _MasterFactory(_KeepTrying, txredisapi.SentinelConnectionFactory):  # type: ignore[misc]
    """Connections to the master a Sentinel names, retried at least every second."""

    def retryDelay(self, attempt: int) -> float:
        # Not maxDelay: txredisapi also uses that as the connect timeout.
        return min(float(super().retryDelay(attempt)), SENTINEL_RETRY_MAX_DELAY)


class InvalidationListener(Protocol):
    """
    Who learns what Redis's client tracking says: L{trackingStarted} once
    the subscriber connection is tracking (every change from then on is
    reported), L{trackingLost} whenever that may no longer hold, and
    L{invalidated} with the changed keys (C{None}: everything, after a
    flush).
    """

    def trackingStarted(self) -> None: ...

    def trackingLost(self, reason: str) -> None: ...

    def invalidated(self, keys: list[str] | None) -> None: ...


class _TrackingProtocol(txredisapi.SubscriberProtocol):  # type: ignore[misc]
    """A subscriber connection that hands invalidation messages to its factory."""

    factory: Any

    def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
        self.factory.tracker.message(channel, message)


class _SentinelTrackingProtocol(_TrackingProtocol, txredisapi.SentinelRedisProtocol):  # type: ignore[misc]
    """The same, on the master a Sentinel names (its role checked first)."""


class _Tracker:
    """
    Turns client tracking on over one subscriber connection:
    C{CLIENT ID}, C{CLIENT TRACKING on REDIRECT <that id> BCAST PREFIX
    <prefix>}, C{SUBSCRIBE __redis__:invalidate}, all on the same
    connection, so its loss is also the end of the tracking it asked for.
    """

    def __init__(self, prefix: str, listener: InvalidationListener, clock: IReactorTime) -> None:
        self.prefix = prefix
        self.listener = listener
        self.clock = clock
        self._current: Any = None
        self._refused: str | None = None

    def connectionReady(self, connection: Any) -> None:
        """A new subscriber connection is up (AUTH and SELECT done)."""
        self._current = connection

        def track(clientId: object) -> defer.Deferred[Any]:
            d: defer.Deferred[Any] = connection.execute_command(
                "CLIENT",
                "TRACKING",
                "on",
                "REDIRECT",
                str(clientId),
                "BCAST",
                "PREFIX",
                self.prefix,
            )
            return d

        def subscribe(_: object) -> defer.Deferred[Any]:
            d: defer.Deferred[Any] = connection.subscribe(INVALIDATE_CHANNEL)
            return d

        def started(_: object) -> None:
            if self._current is not connection or not connection.connected:
                return
            self._refused = None
            self.listener.trackingStarted()
            self.clock.callLater(TRACKING_PING, self._ping, connection)

        def refused(failure: Failure) -> None:
            if self._current is not connection or not connection.connected:
                return
            reason = f"{type(failure.value).__name__}: {failure.value}"
            if reason != self._refused:
                self._refused = reason
                log.warn(
                    "Redis refused client tracking ({reason}); the near-cache stays off "
                    "and every lookup reads Redis (asking again every {retry:g} s)",
                    reason=reason,
                    retry=TRACKING_RETRY,
                )
            self.listener.trackingLost(reason)
            self.clock.callLater(TRACKING_RETRY, self._retry, connection)

        d = connection.execute_command("CLIENT", "ID")
        d.addCallback(track).addCallback(subscribe).addCallbacks(started, refused)

    def _retry(self, connection: Any) -> None:
        if self._current is connection and connection.connected:
            self.connectionReady(connection)

    def _ping(self, connection: Any) -> None:
        if self._current is not connection or not connection.connected:
            return

        def again(result: object) -> None:
            # A failed PING has closed the connection (its loss is reported
            # through connectionLost); the next one is for a live one.
            self.clock.callLater(TRACKING_PING, self._ping, connection)

        connection.execute_command("PING").addBoth(again)

    def connectionLost(self, connection: Any) -> None:
        """A subscriber connection closed: what it tracked is no longer reported."""
        if connection is self._current:
            self._current = None
            self.listener.trackingLost("the subscriber connection to Redis closed")

    def message(self, channel: object, keys: object) -> None:
        """An invalidation message: a list of keys, or nothing for a flush."""
        if channel not in (INVALIDATE_CHANNEL, INVALIDATE_CHANNEL.encode("ascii")):
            return
        if isinstance(keys, list):
            names = [k.decode("utf-8", "replace") if isinstance(k, bytes) else str(k) for k in keys]
            self.listener.invalidated(names)
        else:
            self.listener.invalidated(None)


class _TrackingMixin:
    """
    A pool of one subscriber connection whose new connections turn tracking
    on and whose lost ones say so.  C{addConnection} and C{delConnection}
    are txredisapi's public hooks for a connection joining and leaving.
    """

    def __init__(self, *args: Any, tracker: _Tracker, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tracker = tracker

    def addConnection(self, conn: Any) -> None:
        super().addConnection(conn)  # type: ignore[misc]
        if conn in self.pool:  # type: ignore[attr-defined]
            self.tracker.connectionReady(conn)

    def delConnection(self, conn: Any) -> None:
        super().delConnection(conn)  # type: ignore[misc]
        self.tracker.connectionLost(conn)


class _TrackingFactory(_TrackingMixin, _Factory):
    protocol = _TrackingProtocol


class _TrackingMasterFactory(_TrackingMixin, _MasterFactory):
    protocol = _SentinelTrackingProtocol


def _endpoint(target: RedisTarget) -> Any:
    """
    The client endpoint of a Redis server given by address or path.

    txredisapi works on the global reactor whatever clock we have, so this
    does too.  rediss:// checks the server's certificate and host name
    against the system's trust store, as go-redis does.
    """
    from twisted.internet import reactor

    if target.path is not None:
        return UNIXClientEndpoint(reactor, target.path, timeout=CONNECT_TIMEOUT)
    endpoint: Any = HostnameEndpoint(reactor, target.host, target.port, timeout=CONNECT_TIMEOUT)
    if target.tls:
        from twisted.internet.ssl import optionsForClientTLS

        endpoint = wrapClientTLS(optionsForClientTLS(target.host), endpoint)
    return endpoint


class RedisClient:
    """
    The daemon's Redis connection pool.

    @ivar commandTimeout: seconds a command may take before it fails.
    """

    def __init__(
        self,
        target: RedisTarget,
        clock: IReactorTime,
        commandTimeout: float = COMMAND_TIMEOUT,
        connection: Any = None,
        poolSize: int = POOL_SIZE,
    ) -> None:
        self.target = target
        self.clock = clock
        self.commandTimeout = commandTimeout
        # One connection when every command must reach the same one (a
        # per-connection setting such as CLIENT TRACKING).
        self.poolSize = poolSize
        self._connection = connection
        self._sentinel: Any = None
        self._tracker: _Tracker | None = None
        self._tracking: Any = None

    def __repr__(self) -> str:
        t = self.target
        if t.sentinels:
            where = f"master {t.master_name!r} via Sentinels " + ",".join(
                f"{host}:{port}" for host, port in t.sentinels
            )
        else:
            where = t.path or f"{t.host}:{t.port}"
        return f"<RedisClient {where} db={self.target.db}>"

    def track(self, prefix: str, listener: InvalidationListener) -> None:
        """
        Before L{start}: also keep one subscriber connection that has Redis
        report every change to a key starting with C{prefix} to
        C{listener} (server-assisted client-side caching, Redis 6 or later).
        """
        self._tracker = _Tracker(prefix, listener, self.clock)

    def start(self) -> None:
        """Start connecting (in the background; commands fail fast until connected)."""
        if self._connection is not None:
            return
        t = self.target
        # Lets txredisapi drop a connection that stopped answering, so the
        # reconnect logic replaces it.
        reply_timeout = max(2.0, self.commandTimeout * 4)
        tracker = self._tracker
        if t.sentinels:
            self._sentinel = txredisapi.Sentinel(
                list(t.sentinels),
                password=t.sentinel_password,
                connectTimeout=CONNECT_TIMEOUT,
                replyTimeout=CONNECT_TIMEOUT,
            )
            self._sentinel.discovery_timeout = SENTINEL_DISCOVERY_TIMEOUT
            self._connection = self._sentinel.master_for(
                t.master_name,
                factory_class=_MasterFactory,
                dbid=t.db,
                poolsize=self.poolSize,
                password=t.password,
                username=t.username,
                replyTimeout=reply_timeout,
            )
            if tracker is not None:
                self._tracking = self._sentinel.master_for(
                    t.master_name,
                    factory_class=partial(_TrackingMasterFactory, tracker=tracker),
                    dbid=t.db,
                    poolsize=1,
                    password=t.password,
                    username=t.username,
                    replyTimeout=reply_timeout,
                )
        else:
            # txredisapi's lazyConnectionPool and lazyUnixConnectionPool, with
            # the factory that keeps trying.
            handler: Any = txredisapi.ConnectionHandler
            uuid = f"{t.host}:{t.port}"
            if t.path is not None:
                uuid, handler = t.path, txredisapi.UnixConnectionHandler
            endpoint = _endpoint(t)
            options = dict(
                isLazy=True,
                handler=handler,
                password=t.password,
                replyTimeout=reply_timeout,
                convertNumbers=True,
                username=t.username,
            )
            factory = _Factory(uuid, t.db, self.poolSize, **options)
            factory.startConnecting(endpoint)
            self._connection = factory.handler
            if tracker is not None:
                tracking = _TrackingFactory(uuid, t.db, 1, tracker=tracker, **options)
                tracking.startConnecting(endpoint)
                self._tracking = tracking.handler
        log.info("Using Redis at {redis}", redis=self)

    @property
    def connected(self) -> bool:
        """Whether at least one connection of the pool is up."""
        factory = getattr(self._connection, "_factory", None)
        if factory is None:
            return self._connection is not None
        return bool(factory.size)

    def execute(self, command: str, *args: Any) -> defer.Deferred[Any]:
        """
        Run one command; fails with L{RedisUnavailable} when Redis cannot
        answer within the deadline, or with txredisapi's C{ResponseError}
        when Redis answers with an error.
        """
        if self._connection is None or not self.connected:
            return defer.fail(RedisUnavailable("not connected"))
        try:
            inner = self._connection.execute_command(command, *args)
        except Exception as exc:
            return defer.fail(RedisUnavailable(str(exc)))

        def translate(failure: Failure) -> Failure:
            if failure.check(txredisapi.ResponseError):
                return failure
            return Failure(RedisUnavailable(f"{type(failure.value).__name__}: {failure.value}"))

        seconds = self.commandTimeout
        # Never cancelled (see L{answerWithin}): txredisapi matches replies
        # to commands by position.
        return answerWithin(
            inner,
            seconds,
            self.clock,
            lambda: RedisUnavailable(f"no reply within {seconds:g} s"),
        ).addErrback(translate)

    def send(self, command: str, *args: Any) -> None:
        """
        Run one command whose reply nobody waits for (a cache write): no
        deadline timer, as no caller is kept waiting, and its failure is
        dropped.  A Redis that stops answering is still noticed: txredisapi's
        reply timeout closes the connection, which fails the command.
        """
        if self._connection is None or not self.connected:
            return
        try:
            d = self._connection.execute_command(command, *args)
        except Exception:
            return
        d.addErrback(lambda failure: None)

    def stop(self) -> defer.Deferred[None]:
        """Close every connection and stop reconnecting."""
        if self._connection is None:
            return defer.succeed(None)
        connection, self._connection = self._connection, None
        sentinel, self._sentinel = self._sentinel, None
        tracking, self._tracking = self._tracking, None
        closing = [defer.maybeDeferred(connection.disconnect)]
        if tracking is not None:
            closing.append(defer.maybeDeferred(tracking.disconnect))
        if sentinel is not None:
            closing.append(defer.maybeDeferred(sentinel.disconnect))
        d = defer.DeferredList(closing, consumeErrors=True)
        return d.addCallback(lambda _: None)
