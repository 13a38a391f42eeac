"""
Answers to socketmap requests: a (map, key) in, a reply text out.

The decision lives here, apart from the netstring framing: which maps
exist, how keys are normalised, when the cache is asked, and how API
answers become ``OK``/``NOTFOUND``/``TEMP``/``PERM``.  Identical lookups in
flight at the same moment share one API call.  A key in a domain Userli
said it does not host is ``NOTFOUND`` without a call (see
L{userli_postfix.remotedomains}).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from userli_postfix.addresses import normalise_address, normalise_domain
from userli_postfix.cache import LookupCache
from userli_postfix.metrics import Metrics
from userli_postfix.remotedomains import RemoteDomains, domain_of
from userli_postfix.userli import CircuitOpen, UserliClient

log = Logger()

# Postfix refuses socketmap replies longer than this.
MAX_REPLY = 100_000

NOTFOUND = b"NOTFOUND "


def _ok_list(value: list[str]) -> bytes:
    return b"OK " + ",".join(value).encode("utf-8") if value else NOTFOUND


def _ok_flag(value: bool) -> bytes:
    return b"OK 1" if value else NOTFOUND


def _fire(waiters: list[defer.Deferred[bytes]], reply: bytes) -> None:
    for waiter in waiters:
        waiter.callback(reply)


class Lookups:
    """
    Answers socketmap lookups from the cache and the Userli API.

    @param cache: where OK answers are kept, or C{None} to cache nothing.
    @param remote: the domains Userli does not host, or C{None} to ask
        Userli every time.
    @param others: maps answered elsewhere (C{tls_policy}), by name: each
        takes the decoded key and keeps its own cache; only the request
        metrics are counted here.
    """

    def __init__(
        self,
        client: UserliClient,
        cache: LookupCache | None,
        metrics: Metrics,
        clock: IReactorTime,
        delimiter: str = "",
        remote: RemoteDomains | None = None,
        others: Mapping[str, Callable[[str], defer.Deferred[bytes] | bytes]] | None = None,
    ) -> None:
        self._client = client
        self._others = dict(others or {})
        self._cache = cache
        self._remote = remote
        self._metrics = metrics
        self._clock = clock
        self._delimiter = delimiter
        # (map, normalised key) -> the waiters, each with its key as sent.
        self._inflight: dict[tuple[str, str], list[tuple[str, defer.Deferred[bytes]]]] = {}
        self._series: dict[tuple[str, str], tuple[Callable[[], None], Callable[[float], None]]] = {}
        self._cacheSeries: dict[tuple[str, str], Callable[[], None]] = {}
        self._remoteSeries: dict[str, Callable[[], None]] = {}
        # map name -> (key normaliser, API call, reply formatter)
        self._maps: dict[
            str, tuple[Callable[[str], str | None], Callable[[str], Any], Callable[[Any], bytes]]
        ] = {
            "alias": (self._address, client.alias, _ok_list),
            "domain": (normalise_domain, self._domain if remote else client.domain, _ok_flag),
            "mailbox": (self._address, client.mailbox, _ok_flag),
            "senders": (self._address, client.senders, _ok_list),
        }

    def _address(self, key: str) -> str | None:
        return normalise_address(key, self._delimiter)

    def _domain(self, name: str) -> defer.Deferred[bool]:
        """Ask Userli about a domain, and remember it when it is not Userli's."""
        return self._client.domain(name).addCallback(self._learn, name)

    def _learn(self, hosted: bool, name: str) -> bool:
        # Only a real answer gets here: a failure skips this callback.
        if not hosted and self._remote is not None:
            self._remote.remember(name)
        return hosted

    def answer(self, request: bytes) -> defer.Deferred[bytes] | bytes:
        """
        The reply to one socketmap request (``<map> <key>``), without the
        netstring framing.  Never fails: every problem is a reply.
        """
        started = self._clock.seconds()
        mapname_raw, space, raw_key = request.partition(b" ")
        mapname = mapname_raw.decode("ascii", "replace")
        entry = self._maps.get(mapname)
        other = self._others.get(mapname)
        if entry is None and other is None:
            return self._done("invalid", started, b"PERM unknown map")
        if not space or not raw_key.strip():
            return self._done(mapname, started, b"PERM request without a key")
        try:
            key = raw_key.decode("utf-8")
        except UnicodeDecodeError:
            return self._done(mapname, started, NOTFOUND)
        if other is not None:
            answered = other(key)
            if isinstance(answered, bytes):
                return self._done(mapname, started, answered)
            return answered.addCallback(lambda reply: self._done(mapname, started, reply))
        assert entry is not None
        cache = self._cache
        if cache is not None:
            # What this process holds was stored after the key passed
            # normalisation (below), so a hit may skip it: same answer, and
            # the hottest path costs no Deferred and no round trip.
            reply = cache.peek(mapname, key)
            if reply is not None:
                self._cacheResult(mapname, "hit")
                return self._done(mapname, started, reply)
        # After the held OK answers, so that a hot key of a hosted domain
        # costs nothing more; before any Redis read or API call.  The domain
        # as Postfix sent it: when that is a remembered one, so is the
        # normalised key's (or the key is none: NOTFOUND either way).
        remote = self._remote
        if remote is not None and remote.held(domain_of(mapname, key)):
            return self._remembered(mapname, started)
        normalise, call, render = entry
        normalised = normalise(key)
        if normalised is None:
            return self._done(mapname, started, NOTFOUND)
        if remote is not None:
            domain = domain_of(mapname, normalised)
            known = remote.known(domain)
            if known:
                return self._remembered(mapname, started)
            if known is None:
                # Both reads in this turn: one Redis command.
                pending = None if cache is None else cache.get(mapname, key)

                def decide(remembered: bool) -> defer.Deferred[bytes] | bytes:
                    if remembered:
                        if pending is not None:
                            pending.addErrback(lambda failure: None)
                        return self._remembered(mapname, started)
                    return self._lookup(mapname, key, normalised, call, render, started, pending)

                return remote.remembered(domain).addCallback(decide)
        return self._lookup(mapname, key, normalised, call, render, started)

    def _remembered(self, mapname: str, started: float) -> bytes:
        inc = self._remoteSeries.get(mapname)
        if inc is None:
            inc = self._remoteSeries[mapname] = self._metrics.remote_domain_answers.labels(
                mapname
            ).inc
        inc()
        return self._done(mapname, started, NOTFOUND)

    def _lookup(
        self,
        mapname: str,
        key: str,
        normalised: str,
        call: Callable[[str], Any],
        render: Callable[[Any], bytes],
        started: float,
        pending: defer.Deferred[bytes | None] | None = None,
    ) -> defer.Deferred[bytes] | bytes:
        """The cached answer (C{pending}: its read, already sent), else Userli's."""
        cache = self._cache
        if cache is None:
            return self._fetch(mapname, key, normalised, call, render, started)

        d = cache.get(mapname, key) if pending is None else pending

        def cached(reply: bytes | None) -> defer.Deferred[bytes] | bytes:
            if reply is not None:
                self._cacheResult(mapname, "hit")
                return self._done(mapname, started, reply)
            self._cacheResult(mapname, "miss")
            return self._fetch(mapname, key, normalised, call, render, started)

        def unavailable(failure: Failure) -> defer.Deferred[bytes] | bytes:
            self._cacheResult(mapname, "error")
            log.debug("Lookup cache unavailable: {error}", error=failure.value)
            return self._fetch(mapname, key, normalised, call, render, started)

        return d.addCallbacks(cached, unavailable)

    def _fetch(
        self,
        mapname: str,
        key: str,
        normalised: str,
        call: Callable[[str], Any],
        render: Callable[[Any], bytes],
        started: float,
    ) -> defer.Deferred[bytes]:
        item = (mapname, normalised)
        waiters = self._inflight.get(item)
        waiter: defer.Deferred[bytes] = defer.Deferred()
        if waiters is None:
            self._inflight[item] = [(key, waiter)]
            d: defer.Deferred[Any] = call(normalised)
            d.addCallback(render)
            d.addErrback(self._temporary, mapname)
            d.addCallback(self._release, item)
        else:
            waiters.append((key, waiter))
        return waiter.addCallback(lambda reply: self._done(mapname, started, reply))

    def _temporary(self, failure: Failure, mapname: str) -> bytes:
        # While the circuit breaker is open, it has said so once; a line per
        # lookup answered at once would flood the log.
        if not failure.check(CircuitOpen):
            log.warn("Userli {map} lookup failed: {error}", map=mapname, error=failure.value)
        return b"TEMP Userli API unavailable"

    def _release(self, reply: bytes, item: tuple[str, str]) -> None:
        mapname = item[0]
        if len(reply) > MAX_REPLY:
            log.error("Userli {map} answer too long for Postfix", map=mapname)
            reply = b"TEMP answer too long for Postfix"
        byKey: dict[str, list[defer.Deferred[bytes]]] = {}
        for key, waiter in self._inflight.pop(item):
            byKey.setdefault(key, []).append(waiter)
        cache = self._cache if reply.startswith(b"OK ") else None
        for key, waiters in byKey.items():
            # Stored before it is given, as the Go program does, so the
            # next lookup finds it, in this process and in every other on
            # the same Redis; once per spelling, however many shared it.
            written = cache.set(mapname, key, reply) if cache is not None else None
            if written is None:
                _fire(waiters, reply)
            else:
                written.addCallback(lambda _, ws: _fire(ws, reply), waiters)

    def _cacheResult(self, handler: str, result: str) -> None:
        inc = self._cacheSeries.get((handler, result))
        if inc is None:
            inc = self._cacheSeries[handler, result] = self._metrics.lookup_cache.labels(
                handler, result
            ).inc
        inc()

    def _done(self, handler: str, started: float, reply: bytes) -> bytes:
        if reply.startswith(b"OK"):
            status = "success"
        elif reply.startswith(b"NOTFOUND"):
            status = "notfound"
        else:
            status = "error"
        # Looking up a labelled child costs more than using it: keep them.
        series = self._series.get((handler, status))
        if series is None:
            series = self._series[handler, status] = (
                self._metrics.requests.labels(handler, status).inc,
                self._metrics.request_duration.labels(handler, status).observe,
            )
        series[0]()
        series[1](self._clock.seconds() - started)
        return reply
