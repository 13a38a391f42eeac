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

from typing import Any

import txredisapi
from twisted.internet import defer
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from userli_postfix.config import RedisTarget

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


class RedisUnavailable(Exception):
    """Redis did not answer: not connected, timed out, or the connection broke."""


def _withDeadline(
    inner: defer.Deferred[Any], seconds: float, clock: IReactorTime
) -> defer.Deferred[Any]:
    """
    Fire with C{inner}'s result, or fail after C{seconds}.

    C{inner} itself is never cancelled: txredisapi matches replies to
    commands by position, and cancelling a waiting command would hand the
    next command this one's reply.
    """
    outer: defer.Deferred[Any] = defer.Deferred()

    def expire() -> None:
        if not outer.called:
            outer.errback(RedisUnavailable(f"no reply within {seconds:g} s"))

    timer = clock.callLater(seconds, expire)

    def done(result: Any) -> None:
        if timer.active():
            timer.cancel()
        if not outer.called:
            outer.callback(result)
        elif isinstance(result, Failure):
            # Already timed out: the late failure is expected and handled.
            pass

    inner.addBoth(done)
    return outer


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


class _Factory(_KeepTrying, txredisapi.RedisFactory):
    """A pool of connections to one Redis server."""


class _MasterFactory(_KeepTrying, txredisapi.SentinelConnectionFactory):
    """Connections to the master a Sentinel names, retried at least every second."""

    def retryDelay(self, attempt: int) -> float:
        # Not maxDelay: txredisapi also uses that as the connect timeout.
        return min(float(super().retryDelay(attempt)), SENTINEL_RETRY_MAX_DELAY)


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

    def __repr__(self) -> str:
        t = self.target
        if t.sentinels:
            where = f"master {t.master_name!r} via Sentinels " + ",".join(
                f"{host}:{port}" for host, port in t.sentinels
            )
        else:
            where = t.path or f"{t.host}:{t.port}"
        return f"<RedisClient {where} db={self.target.db}>"

    def start(self) -> None:
        """Start connecting (in the background; commands fail fast until connected)."""
        if self._connection is not None:
            return
        t = self.target
        # Lets txredisapi drop a connection that stopped answering, so the
        # reconnect logic replaces it.
        reply_timeout = max(2.0, self.commandTimeout * 4)
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
        else:
            # txredisapi's lazyConnectionPool and lazyUnixConnectionPool, with
            # the factory that keeps trying.
            if t.path is not None:
                # txredisapi works on the global reactor whatever clock we have.
                from twisted.internet import reactor

                uuid, handler = t.path, txredisapi.UnixConnectionHandler
                endpoint = UNIXClientEndpoint(reactor, t.path, timeout=CONNECT_TIMEOUT)
            else:
                uuid, handler = f"{t.host}:{t.port}", txredisapi.ConnectionHandler
                # rediss:// checks the server's certificate and host name
                # against the system's trust store, as go-redis does.
                tls = None
                if t.tls:
                    # Only a rediss:// configuration loads TLS (see notls).
                    from twisted.internet.ssl import optionsForClientTLS

                    tls = optionsForClientTLS(t.host)
                endpoint = txredisapi._makeEndpoint(t.host, t.port, CONNECT_TIMEOUT, tls)
            factory = _Factory(
                uuid,
                t.db,
                self.poolSize,
                isLazy=True,
                handler=handler,
                password=t.password,
                replyTimeout=reply_timeout,
                convertNumbers=True,
                username=t.username,
            )
            factory.startConnecting(endpoint)
            self._connection = factory.handler
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

        return _withDeadline(inner, self.commandTimeout, self.clock).addErrback(translate)

    def stop(self) -> defer.Deferred[None]:
        """Close every connection and stop reconnecting."""
        if self._connection is None:
            return defer.succeed(None)
        connection, self._connection = self._connection, None
        sentinel, self._sentinel = self._sentinel, None
        closing = [defer.maybeDeferred(connection.disconnect)]
        if sentinel is not None:
            closing.append(defer.maybeDeferred(sentinel.disconnect))
        d = defer.DeferredList(closing, consumeErrors=True)
        return d.addCallback(lambda _: None)
