"""
The daemon as one service: L{build} makes the backends once and one
listener per configured address; L{DaemonService} owns their lifecycle.

Backends are chosen here and nowhere else: Redis or memory for the lookup
cache, the remote-domain memory and the rate-limit windows, depending on
C{REDIS_URL}.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IReactorCore, IReactorTime
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized
from twisted.web.client import HTTPConnectionPool

from userli_postfix import __version__, multiprocess, signals, workers
from userli_postfix.cache import CACHE_PREFIX, LookupCache, MemoryCache, NearCache, RedisCache
from userli_postfix.config import LISTENERS_BY_NAME, Config
from userli_postfix.endpoints import (
    AdoptedEndpoint,
    CannotListen,
    ListeningService,
    RecordingEndpoint,
    describe,
    removeStaleSocket,
    sharedEndpoint,
)
from userli_postfix.httpclient import makeHTTPClient
from userli_postfix.logs import daemonObserver, withoutCredentials, workerObserver
from userli_postfix.lookups import Lookups
from userli_postfix.metrics import Metrics
from userli_postfix.policy import makePolicyFactory
from userli_postfix.ratelimit import makeRateLimiter
from userli_postfix.redisclient import RedisClient
from userli_postfix.remotedomains import MEMORY_ENTRIES, RemoteDomains
from userli_postfix.sasl import makeSASLFactory
from userli_postfix.serving import LimitedFactory
from userli_postfix.socketmap import SocketmapFactory
from userli_postfix.tlspolicy import makeTLSPolicy
from userli_postfix.userli import UserliClient
from userli_postfix.web import MetricsPage, OneProcess, Processes, Web, makeSite

log = Logger()

# How long in-flight requests may take to finish at shutdown before their
# connections are cut (Postfix retries on a new connection).  Long enough
# for the slowest answer: a failed login against a hung API (5 s deadline
# plus the 2 s failure delay).
SHUTDOWN_GRACE = 8.0


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
        workers: int = 1,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._clock = clock
        self._observer = observer
        self._pool = pool
        self._redis = redis
        self._inherited = inherited
        self._workers = workers
        self._factories: list[LimitedFactory] = []
        self._descriptions: dict[str, str] = {}
        # The listening ports worker processes share, once open.
        self.ports: dict[str, Any] = {}

    def setServiceParent(self, parent: Any) -> None:
        # twistd picks up a log observer set on the application before it
        # starts logging; that is how LOG_LEVEL and LOG_FORMAT reach it.
        if self._observer is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self._observer)
        super().setServiceParent(parent)  # type: ignore[no-untyped-call]

    def addListener(self, name: str, description: str, factory: Any) -> None:
        """
        Listen on C{description}; a failure to listen stops start-up with
        one line naming the variable.  Worker processes (see L{workers})
        share the socketmap, policy and SASL listeners: the first process
        opens them in a way its children can share, and a child serves those
        and only those.
        """
        endpoint: Any
        if self._inherited is not None:
            if name not in self._inherited:
                return
            endpoint = AdoptedEndpoint(self._clock, self._inherited[name], describe(description))
        elif LISTENERS_BY_NAME[name].postfix and self._workers > 1:
            endpoint = RecordingEndpoint(sharedEndpoint(self._clock, description), name, self.ports)
        else:
            endpoint = serverFromString(self._clock, description)
        service = ListeningService(endpoint, factory, LISTENERS_BY_NAME[name].variable, description)
        service.setName(name)  # type: ignore[no-untyped-call]
        service.setServiceParent(self)  # type: ignore[no-untyped-call]
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
        from twisted.internet import reactor

        if self._clock is reactor:
            signals.install(reactor)
        try:
            super().privilegedStartService()  # type: ignore[no-untyped-call]
        except CannotListen as failure:
            log.critical("{message}", message=str(failure))
            _oneLineWhenUncaught(failure)
            # Raised, not turned into SystemExit: in daemon mode twistd
            # reports an exception to the process waiting for the start-up
            # (and removes the pid file); SystemExit would leave it waiting.
            raise

    def startService(self) -> None:
        if self._redis is not None:
            self._redis.start()
        super().startService()  # type: ignore[no-untyped-call]
        for name, description in self._descriptions.items():
            log.info("{name} listening on {endpoint}", name=name, endpoint=description)

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        self.running = 0
        # Everything at once: the listeners stop accepting, the worker
        # processes are told to stop, and this process drains its own
        # connections while they drain theirs, so the whole stop takes the
        # grace at most, however many processes there are.
        yield defer.DeferredList(
            [defer.maybeDeferred(s.stopService) for s in reversed(list(self))]
            + [factory.drain(SHUTDOWN_GRACE) for factory in self._factories],
            consumeErrors=True,
        )
        yield self._pool.closeCachedConnections()
        if self._redis is not None:
            yield self._redis.stop()
        log.info("Stopped")


def _oneLineWhenUncaught(failure: CannotListen) -> None:
    """
    Have C{failure}, should it end the process, print as the one line that
    names the setting and why (exit status 1) rather than as the traceback
    Python prints for an uncaught exception.
    """
    previous = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        if value is not failure:
            previous(kind, value, tb)
            return
        # twistd's log observer may still stand in for sys.stderr.
        stderr = sys.__stderr__
        if stderr is not None:
            stderr.write(f"userli-postfix: {failure}\n")
            stderr.flush()

    sys.excepthook = hook


def build(
    config: Config,
    reactor: Any,
    given: Mapping[str, str | None],
    twistd: Mapping[str, Any] | None = None,
) -> DaemonService:
    """
    Build the daemon from its configuration.

    @param given: the twistd options given on the command line (keyed by
        option name), which worker processes are started with too.
    @param twistd: twistd's own options (C{--logfile}, C{--syslog}, C{-n},
        ...), which say where the log goes; C{None} without twistd.
    """
    assert IReactorCore.providedBy(reactor) or hasattr(reactor, "seconds")

    inherited = workers.inheritedListeners()
    metricsDirectory = None
    if config.workers > 1 and inherited is None:
        # Chosen while the options were read (see L{multiprocess}).
        metricsDirectory = multiprocess.current() or multiprocess.prepare(str(config.workers))
    metrics = Metrics()
    # A worker process hands its events to the first process, which logs
    # them where its own go.
    observer = (
        daemonObserver(config.log_level, config.log_format, twistd)
        if inherited is None
        else workerObserver(config.log_level, dropped=metrics.log_lines_dropped.inc)
    )

    http, pool = makeHTTPClient(reactor)
    client = UserliClient(
        http.request,
        config.userli_base_url,
        config.userli_token,
        reactor,
        metrics,
    )

    redis = RedisClient(config.redis, reactor) if config.redis is not None else None
    lookupTTL, remoteTTL = config.lookup_cache_ttl, config.remote_domain_cache_ttl
    cache: LookupCache | None = None
    remote: RemoteDomains | None = None
    if redis is not None and max(lookupTTL, remoteTTL) > 0:
        # One store for both, so that a lookup reads both in one command.
        near = NearCache(
            RedisCache(redis, lookupTTL),
            reactor,
            max(lookupTTL, remoteTTL),
            metrics=metrics,
        )
        # Redis tells the near-cache of every change to a cached answer.
        redis.track(CACHE_PREFIX, near)
        cache = near if lookupTTL > 0 else None
        remote = RemoteDomains(near, remoteTTL, complete=False) if remoteTTL > 0 else None
    elif redis is None:
        cache = MemoryCache(reactor, lookupTTL) if lookupTTL > 0 else None
        if remoteTTL > 0:
            remote = RemoteDomains(
                MemoryCache(reactor, remoteTTL, MEMORY_ENTRIES), remoteTTL, complete=True
            )
    log.info(
        "userli-postfix {version} using the Userli API at {url}",
        version=__version__,
        url=withoutCredentials(config.userli_base_url),
    )
    if redis is None:
        log.info(
            "REDIS_URL is not set: the lookup cache, the remote-domain memory and the "
            "rate-limit windows are kept in memory and are lost on restart"
        )

    tlsPolicy = makeTLSPolicy(config, reactor, redis, metrics)
    lookups = Lookups(
        client,
        cache,
        metrics,
        reactor,
        config.recipient_delimiter,
        remote,
        others={"tls_policy": tlsPolicy.answer},
    )
    daemon = DaemonService(reactor, observer, pool, redis, inherited, workers=config.workers)
    limiter = makeRateLimiter(config, reactor, redis, metrics)
    daemon.addListener(
        "socketmap", config.socketmap_listen, SocketmapFactory(reactor, lookups, metrics)
    )
    daemon.addListener(
        "policy",
        config.policy_listen,
        makePolicyFactory(config, reactor, client, metrics, limiter, remote),
    )
    if config.sasl_listen is not None:
        daemon.addListener(
            "sasl", config.sasl_listen, makeSASLFactory(config, reactor, client, metrics)
        )
    metricsResource = None
    processes: Processes = OneProcess()
    workerPool = None
    if metricsDirectory is not None:
        metricsResource = MetricsPage(multiprocess.aggregatedRegistry())
        workerPool = processes = workers.WorkerPool(
            reactor,
            config.workers,
            daemon.ports,
            workers.childEnvironment(os.environ, given),
            SHUTDOWN_GRACE,
            metrics,
            metricsDirectory,
        )
    daemon.addListener(
        "http", config.metrics_listen, makeSite(Web(metrics, client, metricsResource, processes))
    )
    if workerPool is not None:
        # After the listeners: it starts once they are open.
        workerPool.setServiceParent(daemon)  # type: ignore[no-untyped-call]
    if inherited is not None:
        workers.ParentWatch(reactor).setServiceParent(daemon)  # type: ignore[no-untyped-call]
    if hasattr(reactor, "callWhenRunning"):
        # Everything built so far lives as long as the process: keep it out
        # of the collector's scans, so a full collection under load takes
        # milliseconds instead of tens of them.
        reactor.callWhenRunning(gc.freeze)
    return daemon
