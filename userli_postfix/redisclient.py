"""
A Redis connection from C{REDIS_URL}, every command bounded by a deadline.

txredisapi speaks the protocol; the connections are the daemon's own (see
L{userli_postfix.redisconnections}): each is made through a Twisted endpoint,
prepared here (C{AUTH}, C{SELECT}, for a Sentinel's master C{ROLE}, each
bounded), and replaced after a capped back-off whatever happened to it.
The cache and the rate limiter must answer within a fraction of Postfix's
patience whatever Redis does, so a command either gets its reply within
the deadline or fails: at once when no connection is ready, with
L{RedisUnavailable} after the deadline otherwise.  Service resumes by itself
within about half a second of Redis's return.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, Protocol

import txredisapi
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from userli_postfix.config import RedisTarget
from userli_postfix.deadlines import answerWithin
from userli_postfix.redisconnections import Pool

log = Logger()

# A healthy Redis answers in well under a millisecond on a LAN.
COMMAND_TIMEOUT = 0.5
CONNECT_TIMEOUT = 2.0
POOL_SIZE = 4

# Twisted's HostnameEndpoint tries a name's addresses one after another,
# this long apart, and reports that the last one failed only at the next
# tick: 0.3 s by default even for one address that refuses at once.
ATTEMPT_DELAY = 0.05

# While a master is down, Sentinels answer at once but name no usable
# master: that is an answer (the next attempt follows the back-off), and a
# Sentinel that does not answer is not waited for longer than this.
SENTINEL_DISCOVERY_TIMEOUT = 1.0

# Where Redis publishes the keys a tracking client must forget (RESP2).
INVALIDATE_CHANNEL = "__redis__:invalidate"

# How often a tracking connection on which Redis refused tracking (Redis
# older than 6, CLIENT renamed away) asks again: an upgrade or a changed
# configuration is then noticed without a restart, at the cost of three
# tiny commands.
TRACKING_RETRY = 30.0

# How often the subscriber connection is asked for a PING.  Its answer
# proves that every invalidation Redis sent before the PING has arrived
# (one connection keeps its order), which is what lets the near-cache serve
# copies (see L{userli_postfix.cache.TRACKING_SILENCE}); a connection that
# died silently (a network partition) stops answering, and txredisapi's
# reply timeout closes it.
TRACKING_PING = 0.25


class RedisUnavailable(Exception):
    """Redis did not answer: not connected, timed out, or the connection broke."""


class _Protocol(txredisapi.RedisProtocol):  # type: ignore[misc]
    """
    txredisapi's protocol, built with its documented constructor arguments
    only: no password and no database, so its own set-up (which reaches
    into its factory when AUTH or SELECT fails) has nothing to do; ours
    does it (L{_prepare}).

    @ivar address: the master's address, for a connection to the master a
        Sentinel named (so that a failover can close it).
    """

    address: tuple[str, int] | None = None


class _TrackingProtocol(txredisapi.SubscriberProtocol):  # type: ignore[misc]
    """A subscriber connection that hands invalidation messages to its tracker."""

    address: tuple[str, int] | None = None
    factory: Any

    def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
        self.factory.tracker.message(channel, message)


class _ProtocolFactory(Factory):
    """Builds the protocols of one pool."""

    noisy = False

    def __init__(
        self, protocol: type[Any], replyTimeout: float, tracker: _Tracker | None = None
    ) -> None:
        self.kind = protocol
        self.replyTimeout = replyTimeout
        self.tracker = tracker

    def buildProtocol(self, addr: Any) -> Any:
        p = self.kind(charset="utf-8", replyTimeout=self.replyTimeout, convertNumbers=True)
        p.factory = self
        return p


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _prepare(
    protocol: Any,
    clock: IReactorTime,
    password: str | None = None,
    username: str | None = None,
    db: int | None = None,
    master: bool = False,
    timeout: float = CONNECT_TIMEOUT,
) -> defer.Deferred[None]:
    """
    Ready a new connection: C{AUTH}, C{SELECT} (none for a Sentinel), and for a master named by
    a Sentinel a C{ROLE} that says C{master}; all within C{timeout}.  A
    failure (an error answer, no answer, a replica) rejects the connection.
    """

    @defer.inlineCallbacks
    def steps() -> Generator[Any, Any, None]:
        if password is not None:
            auth = ("AUTH", password) if username is None else ("AUTH", username, password)
            yield protocol.execute_command(*auth)
        if db is not None:
            # Also SELECT 0: its answer marks a connection as set up, to
            # whoever reads CLIENT LIST (the last command it sent).
            yield protocol.execute_command("SELECT", db)
        if master:
            role = yield protocol.execute_command("ROLE")
            name = _text(role[0]) if isinstance(role, list) and role else repr(role)
            if name != "master":
                raise RedisUnavailable(f"the server the Sentinels named is a {name}")

    def check(result: object) -> None:
        # txredisapi hands some error answers over as values.
        if isinstance(result, Exception):
            raise result

    return answerWithin(
        steps(),
        timeout,
        clock,
        lambda: RedisUnavailable(f"no answer to the connection set-up within {timeout:g} s"),
    ).addCallback(check)


def usableMaster(state: object) -> tuple[str, int] | None:
    """
    The address in a Sentinel's C{SENTINEL MASTER} answer, if that master
    is usable: flagged C{master} and neither subjectively nor objectively
    down (txredisapi's own rule).
    """
    if not isinstance(state, list) or len(state) % 2:
        return None
    fields = {_text(k): v for k, v in zip(state[::2], state[1::2], strict=True)}
    flags = set(_text(fields.get("flags", "")).split(","))
    if "master" not in flags or flags & {"s_down", "o_down"}:
        return None
    try:
        return _text(fields["ip"]), int(_text(fields["port"]))
    except (KeyError, ValueError):
        return None


def _connector(endpoint: Any, factory: IProtocolFactory) -> Callable[[], defer.Deferred[Any]]:
    """One connection attempt through C{endpoint}, as a pool makes them."""
    return lambda: endpoint.connect(factory)


class _Sentinels:
    """
    One connection to each Sentinel, kept up like every other (a Sentinel
    whose C{AUTH} timed out is tried again, not given up), and the
    question which master they name.
    """

    def __init__(
        self,
        target: RedisTarget,
        reactor: Any,
        clock: IReactorTime,
        replyTimeout: float,
        quiet: bool = False,
    ) -> None:
        self._clock = clock
        self.pools: list[Pool] = []
        factory = _ProtocolFactory(_Protocol, replyTimeout)
        for host, port in target.sentinels:
            endpoint = HostnameEndpoint(
                reactor, host, port, timeout=CONNECT_TIMEOUT, attemptDelay=ATTEMPT_DELAY
            )

            def prepare(protocol: Any) -> defer.Deferred[None]:
                return _prepare(protocol, clock, password=target.sentinel_password)

            self.pools.append(
                Pool(
                    f"Redis Sentinel {host}:{port}",
                    1,
                    _connector(endpoint, factory),
                    prepare,
                    clock,
                    quiet=quiet,
                )
            )

    def start(self) -> None:
        for pool in self.pools:
            pool.start()

    def stop(self) -> defer.Deferred[None]:
        d = defer.DeferredList([pool.stop() for pool in self.pools], consumeErrors=True)
        return d.addCallback(lambda _: None)

    def master(self, name: str) -> defer.Deferred[tuple[str, int]]:
        """
        The address of the master C{name} that the first Sentinel to answer
        names usable; fails as soon as every Sentinel answered without one,
        or after L{SENTINEL_DISCOVERY_TIMEOUT}.
        """
        asked = [c for pool in self.pools if (c := pool.pick()) is not None]
        if not asked:
            return defer.fail(RedisUnavailable("no Redis Sentinel reachable"))
        result: defer.Deferred[tuple[str, int]] = defer.Deferred()
        left = [len(asked)]

        def answered(state: object) -> None:
            left[0] -= 1
            address = usableMaster(state)
            if result.called:
                return
            if address is not None:
                result.callback(address)
            elif not left[0]:
                result.errback(
                    RedisUnavailable(f"no Redis Sentinel names a usable master {name!r}")
                )

        for connection in asked:
            try:
                d = connection.execute_command("SENTINEL", "MASTER", name)
            except Exception:
                d = defer.fail()
            d.addErrback(lambda failure: None).addCallback(answered)
        return answerWithin(
            result,
            SENTINEL_DISCOVERY_TIMEOUT,
            self._clock,
            lambda: RedisUnavailable(f"no Redis Sentinel named a master {name!r} in time"),
        )


@implementer(IStreamClientEndpoint)
class _MasterEndpoint:
    """
    Connects to the master the Sentinels name, asking them before every
    attempt; when they name another one than before, C{changed} is told
    (so that connections to the old one are closed).
    """

    def __init__(
        self,
        sentinels: _Sentinels,
        name: str,
        reactor: Any,
        changed: Callable[[tuple[str, int]], None],
    ) -> None:
        self._sentinels = sentinels
        self._name = name
        self._reactor = reactor
        self._changed = changed
        self.address: tuple[str, int] | None = None

    def connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        def found(address: tuple[str, int]) -> defer.Deferred[IProtocol]:
            previous, self.address = self.address, address
            if previous is not None and address != previous:
                log.info(
                    "The Redis Sentinels name a new master {host}:{port}",
                    host=address[0],
                    port=address[1],
                )
                self._changed(address)
            endpoint = HostnameEndpoint(
                self._reactor,
                address[0],
                address[1],
                timeout=CONNECT_TIMEOUT,
                attemptDelay=ATTEMPT_DELAY,
            )

            def tag(protocol: Any) -> IProtocol:
                protocol.address = address
                return protocol  # type: ignore[no-any-return]

            return endpoint.connect(protocolFactory).addCallback(tag)

        return self._sentinels.master(self._name).addCallback(found)


class InvalidationListener(Protocol):
    """
    Who learns what Redis's client tracking says: L{trackingStarted} once
    the subscriber connection is tracking (every change from then on is
    reported), L{trackingLost} whenever that may no longer hold,
    L{invalidated} with the changed keys (C{None}: everything, after a
    flush), and L{trackingAlive} with the time a PING was sent whose
    answer has just arrived (every change Redis reported before then has
    been heard).
    """

    def trackingStarted(self) -> None: ...

    def trackingLost(self, reason: str) -> None: ...

    def invalidated(self, keys: list[str] | None) -> None: ...

    def trackingAlive(self, sent: float) -> None: ...


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

        sent = self.clock.seconds()

        def answered(result: object) -> None:
            if self._current is connection and connection.connected:
                self.listener.trackingAlive(sent)

        def again(result: object) -> None:
            # A failed PING has closed the connection (its loss is reported
            # through connectionLost); the next one is for a live one.
            self.clock.callLater(TRACKING_PING, self._ping, connection)

        connection.execute_command("PING").addCallbacks(answered, lambda failure: None).addBoth(
            again
        )

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


def _endpoint(target: RedisTarget, reactor: Any) -> Any:
    """
    The client endpoint of a Redis server given by address or path.
    rediss:// checks the server's certificate and host name against the
    system's trust store, as go-redis does.
    """
    if target.path is not None:
        return UNIXClientEndpoint(reactor, target.path, timeout=CONNECT_TIMEOUT)
    endpoint: Any = HostnameEndpoint(
        reactor, target.host, target.port, timeout=CONNECT_TIMEOUT, attemptDelay=ATTEMPT_DELAY
    )
    if target.tls:
        from twisted.internet.ssl import optionsForClientTLS

        endpoint = wrapClientTLS(optionsForClientTLS(target.host), endpoint)
    return endpoint


class ConnectionPool(Protocol):
    """What L{RedisClient} needs of its pool (L{userli_postfix.redisconnections.Pool})."""

    def pick(self) -> Any: ...

    def stop(self) -> defer.Deferred[None]: ...


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
        pool: ConnectionPool | None = None,
        poolSize: int = POOL_SIZE,
        reactor: Any = None,
        logOutages: bool = True,
    ) -> None:
        self.target = target
        self.clock = clock
        self.commandTimeout = commandTimeout
        # One connection when every command must reach the same one (a
        # per-connection setting such as CLIENT TRACKING).
        self.poolSize = poolSize
        # A command-line tool says in one line of its own that Redis is
        # not reachable; the daemon logs an outage and its end.
        self.logOutages = logOutages
        # What connects (the clock is the reactor, except in tests).
        self._reactor = clock if reactor is None else reactor
        self._pool = pool
        self._sentinels: _Sentinels | None = None
        self._tracker: _Tracker | None = None
        self._tracking: Pool | None = None
        self._master: _MasterEndpoint | None = None

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
        if self._pool is not None:
            return
        t = self.target
        # Lets txredisapi drop a connection that stopped answering, so it
        # is replaced.
        replyTimeout = max(2.0, self.commandTimeout * 4)
        endpoint: Any
        if t.sentinels:
            self._sentinels = _Sentinels(
                t, self._reactor, self.clock, replyTimeout, quiet=not self.logOutages
            )
            self._sentinels.start()
            endpoint = self._master = _MasterEndpoint(
                self._sentinels, t.master_name, self._reactor, self._masterChanged
            )
        else:
            endpoint = _endpoint(t, self._reactor)

        def prepare(protocol: Any) -> defer.Deferred[None]:
            return _prepare(
                protocol,
                self.clock,
                password=t.password,
                username=t.username,
                db=t.db,
                master=bool(t.sentinels),
            )

        factory = _ProtocolFactory(_Protocol, replyTimeout)
        pool = Pool(
            "Redis",
            self.poolSize,
            _connector(endpoint, factory),
            prepare,
            self.clock,
            quiet=not self.logOutages,
        )
        self._pool = pool
        pool.start()
        tracker = self._tracker
        if tracker is not None:
            tracking = _ProtocolFactory(_TrackingProtocol, replyTimeout, tracker)
            self._tracking = Pool(
                "Redis",
                1,
                _connector(endpoint, tracking),
                prepare,
                self.clock,
                ready=tracker.connectionReady,
                lost=tracker.connectionLost,
                # The pool says it for both; the near-cache says the rest.
                quiet=True,
            )
            self._tracking.start()
        log.info("Using Redis at {redis}", redis=self)

    def _masterChanged(self, address: tuple[str, int]) -> None:
        """Close every connection to another master than C{address}."""
        for pool in (self._pool, self._tracking):
            if isinstance(pool, Pool):
                for protocol in list(pool.ready):
                    if protocol.address != address:
                        protocol.transport.loseConnection()

    @property
    def connected(self) -> bool:
        """Whether at least one connection of the pool is ready."""
        return self._pool is not None and self._pool.pick() is not None

    def execute(self, command: str, *args: Any) -> defer.Deferred[Any]:
        """
        Run one command; fails with L{RedisUnavailable} when Redis cannot
        answer within the deadline (at once when no connection is ready),
        or with txredisapi's C{ResponseError} when Redis answers with an
        error.
        """
        connection = self._pool.pick() if self._pool is not None else None
        if connection is None:
            return defer.fail(RedisUnavailable("not connected"))
        try:
            inner = connection.execute_command(command, *args)
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

    def stop(self) -> defer.Deferred[None]:
        """Close every connection and stop reconnecting."""
        if self._pool is None:
            return defer.succeed(None)
        pool, self._pool = self._pool, None
        sentinels, self._sentinels = self._sentinels, None
        tracking, self._tracking = self._tracking, None
        closing = [defer.maybeDeferred(pool.stop)]
        if tracking is not None:
            closing.append(defer.maybeDeferred(tracking.stop))
        if sentinels is not None:
            closing.append(defer.maybeDeferred(sentinels.stop))
        d = defer.DeferredList(closing, consumeErrors=True)
        return d.addCallback(lambda _: None)
