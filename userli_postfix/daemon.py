"""
The daemon as one service: L{build} makes the backends once and one
listener per configured address; L{DaemonService} owns their lifecycle.

Backends are chosen here and nowhere else: Redis or memory for the lookup
cache and the rate-limit windows, depending on C{REDIS_URL}.
"""

from __future__ import annotations

import gc
import os
import signal
from collections.abc import Mapping
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IReactorCore, IReactorTime
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized
from twisted.web.client import HTTPConnectionPool

from userli_postfix import workers
from userli_postfix.cache import LookupCache, MemoryCache, NearCache, RedisCache
from userli_postfix.config import Config
from userli_postfix.listeners import LimitedFactory
from userli_postfix.logs import makeObserver
from userli_postfix.lookups import Lookups
from userli_postfix.metrics import Metrics
from userli_postfix.policy import makePolicyFactory
from userli_postfix.ratelimit import makeRateLimiter
from userli_postfix.redis import RedisClient
from userli_postfix.sasl import makeSASLFactory
from userli_postfix.socketmap import SocketmapFactory
from userli_postfix.transport import makeHTTPClient
from userli_postfix.unixsocket import removeStaleSocket
from userli_postfix.userli import UserliClient
from userli_postfix.web import MetricsPage, Web, makeSite

log = Logger()

# How long in-flight requests may take to finish at shutdown before their
# connections are cut (Postfix retries on a new connection).  Long enough
# for the slowest answer: a failed login against a hung API (5 s deadline
# plus the 2 s failure delay).
SHUTDOWN_GRACE = 8.0

# The listeners that worker processes serve too; /metrics, /health and
# /ready stay with the parent.
SHARED_LISTENERS = ("socketmap", "policy", "sasl")


class DaemonService(MultiService):
    """
    The whole daemon.  Starting it connects the backends and opens the
    listeners; stopping it stops accepting, lets in-flight requests finish
    (bounded), then closes the HTTP pool and Redis.
    """

    def __init__(
        self,
        clock: IReactorTime,
        observer: ILogObserver | None,
        pool: HTTPConnectionPool,
        redis: RedisClient | None,
        inherited: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        self._clock = clock
        self._observer = observer
        self._pool = pool
        self._redis = redis
        self._inherited = inherited
        self._factories: list[LimitedFactory] = []
        self._descriptions: dict[str, str] = {}
        # The listening ports worker processes share, once open.
        self.ports: dict[str, Any] = {}

    def setServiceParent(self, parent: Any) -> None:
        # twistd picks up a log observer set on the application before it
        # starts logging; that is how LOG_LEVEL and LOG_FORMAT reach it.
        if self._observer is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self._observer)
        super().setServiceParent(parent)

    def addListener(self, name: str, description: str, factory: Any) -> None:
        """
        Listen on C{description}; a failure to listen stops start-up.  A
        worker process (see L{workers}) serves the sockets it inherited
        instead, and only those.
        """
        endpoint: Any
        if self._inherited is not None:
            if name not in self._inherited:
                return
            endpoint = workers.AdoptedEndpoint(self._clock, self._inherited[name])
        elif name in SHARED_LISTENERS:
            endpoint = workers.RecordingEndpoint(
                serverFromString(self._clock, description), name, self.ports
            )
        else:
            endpoint = serverFromString(self._clock, description)
        service = StreamServerEndpointService(endpoint, factory)
        # Without this a port already in use is only logged and the daemon
        # runs without that listener.
        service._raiseSynchronously = True
        service.setName(name)
        service.setServiceParent(self)
        self._descriptions[name] = description
        if isinstance(factory, LimitedFactory):
            self._factories.append(factory)

    def privilegedStartService(self) -> None:
        # Listening happens here, so this is the last moment to clear a
        # dead socket file out of the way.  A worker process adopts sockets
        # its parent listens on and must not probe them.
        if self._inherited is None:
            for description in self._descriptions.values():
                removeStaleSocket(description)
        self._catchEarlySignals()
        super().privilegedStartService()

    def _catchEarlySignals(self) -> None:
        """
        The listeners accept from here on, but twistd installs its signal
        handlers only when the reactor runs; a SIGTERM in between (a
        supervisor or a test that stops the daemon as soon as it answers)
        would kill the process outright.  Until Twisted's own handlers
        replace this one, such a signal asks for the usual graceful stop.
        """
        from twisted.internet import reactor

        if self._clock is not reactor:
            return

        def stopWhenRunning(number: int, frame: Any) -> None:
            reactor.callWhenRunning(reactor.stop)  # type: ignore[attr-defined]

        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, stopWhenRunning)

    def startService(self) -> None:
        if self._redis is not None:
            self._redis.start()
        super().startService()
        for name, description in self._descriptions.items():
            log.info("{name} listening on {endpoint}", name=name, endpoint=description)

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        self.running = 0
        yield defer.DeferredList(
            [defer.maybeDeferred(s.stopService) for s in reversed(list(self))],
            consumeErrors=True,
        )
        yield defer.DeferredList(
            [factory.drain(SHUTDOWN_GRACE) for factory in self._factories], consumeErrors=True
        )
        yield self._pool.closeCachedConnections()
        if self._redis is not None:
            yield self._redis.stop()
        log.info("Stopped")
        # twistd re-raises the signal that stopped the reactor once it is
        # done, which makes a clean SIGTERM/SIGINT shutdown exit with
        # -15/-2; after a graceful drain the right status is 0.
        if getattr(self._clock, "_exitSignal", None) in (signal.SIGTERM, signal.SIGINT):
            self._clock._exitSignal = None  # type: ignore[attr-defined]


def build(config: Config, reactor: Any, given: Mapping[str, str | None]) -> DaemonService:
    """
    Build the daemon from its configuration.

    @param given: the twistd options given on the command line (keyed by
        option name), which worker processes are started with too.
    """
    assert IReactorCore.providedBy(reactor) or hasattr(reactor, "seconds")

    observer = makeObserver(config.log_level, config.log_format)
    inherited = workers.inheritedListeners()
    metricsDirectory = None
    if config.workers > 1 and inherited is None:
        metricsDirectory = workers.enableMultiprocessMetrics()
    metrics = Metrics()

    http, pool = makeHTTPClient(reactor)
    client = UserliClient(
        http.request,
        config.userli_base_url,
        config.userli_token,
        reactor,
        metrics,
    )

    redis = RedisClient(config.redis, reactor) if config.redis is not None else None
    cache: LookupCache | None
    if config.lookup_cache_ttl <= 0:
        cache = None
    elif redis is not None:
        cache = NearCache(
            RedisCache(redis, config.lookup_cache_ttl), reactor, config.lookup_cache_ttl
        )
    else:
        cache = MemoryCache(reactor, config.lookup_cache_ttl)
    if redis is None:
        log.info(
            "REDIS_URL is not set: the lookup cache and the rate-limit windows are "
            "kept in memory and are lost on restart"
        )

    lookups = Lookups(client, cache, metrics, reactor, config.recipient_delimiter)
    daemon = DaemonService(reactor, observer, pool, redis, inherited)
    limiter = makeRateLimiter(config, reactor, redis, metrics)
    daemon.addListener(
        "socketmap", config.socketmap_listen, SocketmapFactory(reactor, lookups, metrics)
    )
    daemon.addListener(
        "policy",
        config.policy_listen,
        makePolicyFactory(config, reactor, client, metrics, limiter),
    )
    if config.sasl_listen is not None:
        daemon.addListener(
            "sasl", config.sasl_listen, makeSASLFactory(config, reactor, client, metrics)
        )
    metricsResource = None
    if metricsDirectory is not None:
        metricsResource = MetricsPage(workers.aggregatedRegistry())
    daemon.addListener(
        "http", config.metrics_listen, makeSite(Web(metrics, client, metricsResource))
    )
    if metricsDirectory is not None:
        workers.WorkerPool(
            reactor,
            config.workers,
            daemon.ports,
            workers.childEnvironment(os.environ, given),
            SHUTDOWN_GRACE,
            metricsDirectory,
        ).setServiceParent(daemon)
    if inherited is not None:
        workers.ParentWatch(reactor).setServiceParent(daemon)
    if hasattr(reactor, "callWhenRunning"):
        # Everything built so far lives as long as the process: keep it out
        # of the collector's scans, so a full collection under load takes
        # milliseconds instead of tens of them.
        reactor.callWhenRunning(gc.freeze)
    return daemon
