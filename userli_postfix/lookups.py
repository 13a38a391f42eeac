"""
Answers to socketmap requests: a (map, key) in, a reply text out.

The decision lives here, apart from the netstring framing: which maps
exist, how keys are normalised, when the cache is asked, and how API
answers become ``OK``/``NOTFOUND``/``TEMP``/``PERM``.  Identical lookups in
flight at the same moment share one API call (L{userli_postfix.coalesce}),
and each spelling among them one cache write.  A key in a domain Userli
said it does not host is ``NOTFOUND`` without a call (see
L{userli_postfix.remotedomains}).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from userli_postfix.addresses import normalise_address, normalise_domain
from userli_postfix.cache import LookupCache
from userli_postfix.coalesce import Coalescer
from userli_postfix.metrics import Metrics, increments, observations
from userli_postfix.remotedomains import RemoteDomains, domain_of
from userli_postfix.userli import CircuitOpen, UserliClient

log = Logger()

# Postfix refuses socketmap replies longer than this.
MAX_REPLY = 100_000

NOTFOUND = b"NOTFOUND "


def _ok_list(mapname: str, value: list[str]) -> bytes:
    """A list as Postfix takes it, or C{TEMP} when it is longer than L{MAX_REPLY}."""
    if not value:
        return NOTFOUND
    reply = b"OK " + ",".join(value).encode("utf-8")
    if len(reply) > MAX_REPLY:
        log.error("Userli {map} answer too long for Postfix", map=mapname)
        return b"TEMP answer too long for Postfix"
    return reply


def _ok_flag(value: bool) -> bytes:
    return b"OK 1" if value else NOTFOUND


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
        self._clock = clock
        # By (map, key as sent): the answer and its cache write.
        self._answers: Coalescer[tuple[str, str], bytes] = Coalescer(ordered=False)
        # By (map, normalised key): the API call that spellings share.
        self._calls: Coalescer[tuple[str, str], bytes] = Coalescer(ordered=False)
        self._requests = increments(metrics.requests)
        self._durations = observations(metrics.request_duration)
        self._cacheResults = increments(metrics.lookup_cache)
        self._remoteAnswers = increments(metrics.remote_domain_answers)
        address = partial(normalise_address, delimiter=delimiter)
        # map name -> (key normaliser, API call, reply formatter)
        self._maps: dict[
            str, tuple[Callable[[str], str | None], Callable[[str], Any], Callable[[Any], bytes]]
        ] = {
            "alias": (address, client.alias, partial(_ok_list, "alias")),
            "domain": (normalise_domain, self._domain if remote else client.domain, _ok_flag),
            "mailbox": (address, client.mailbox, _ok_flag),
            "senders": (address, client.senders, partial(_ok_list, "senders")),
        }

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
            return self._done(b"PERM unknown map", "invalid", started)
        if not space or not raw_key.strip():
            return self._done(b"PERM request without a key", mapname, started)
        try:
            key = raw_key.decode("utf-8")
        except UnicodeDecodeError:
            return self._done(NOTFOUND, mapname, started)
        if other is not None:
            answered = other(key)
            if isinstance(answered, bytes):
                return self._done(answered, mapname, started)
            return answered.addCallback(self._done, mapname, started)
        assert entry is not None
        cache = self._cache
        if cache is not None:
            # What this process holds was stored after the key passed
            # normalisation (below), so a hit may skip it: same answer, and
            # the hottest path costs no Deferred and no round trip.
            reply = cache.peek(mapname, key)
            if reply is not None:
                self._cacheResults[mapname, "hit"]()
                return self._done(reply, mapname, started)
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
            return self._done(NOTFOUND, mapname, started)
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
        self._remoteAnswers[mapname]()
        return self._done(NOTFOUND, mapname, started)

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
                self._cacheResults[mapname, "hit"]()
                return self._done(reply, mapname, started)
            self._cacheResults[mapname, "miss"]()
            return self._fetch(mapname, key, normalised, call, render, started)

        def unavailable(failure: Failure) -> defer.Deferred[bytes] | bytes:
            self._cacheResults[mapname, "error"]()
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
        """Userli's answer, shared with the identical lookups in flight."""
        d = self._answers.ask((mapname, key), self._stored, mapname, key, normalised, call, render)
        return d.addCallback(self._done, mapname, started)

    def _stored(
        self,
        mapname: str,
        key: str,
        normalised: str,
        call: Callable[[str], Any],
        render: Callable[[Any], bytes],
    ) -> defer.Deferred[bytes]:
        """
        The answer for one spelling, stored before it is given: identical
        lookups share it, spellings of one key share the API call.
        """
        d = self._calls.ask((mapname, normalised), self._ask, mapname, normalised, call, render)
        return d.addCallback(self._store, mapname, key)

    def _ask(
        self,
        mapname: str,
        normalised: str,
        call: Callable[[str], Any],
        render: Callable[[Any], bytes],
    ) -> defer.Deferred[bytes]:
        """Userli's answer for a normalised key, as a reply Postfix accepts."""
        d: defer.Deferred[Any] = call(normalised)
        d.addCallback(render)
        return d.addErrback(self._temporary, mapname)

    @staticmethod
    def _temporary(failure: Failure, mapname: str) -> bytes:
        # While the circuit breaker is open, it has said so once; a line per
        # lookup answered at once would flood the log.
        if not failure.check(CircuitOpen):
            log.warn("Userli {map} lookup failed: {error}", map=mapname, error=failure.value)
        return b"TEMP Userli API unavailable"

    def _store(self, reply: bytes, mapname: str, key: str) -> defer.Deferred[bytes] | bytes:
        # Stored before it is given, as the Go program does, so the next
        # lookup finds it, in this process and in every other on the same
        # Redis; once per spelling, however many shared it.
        cache = self._cache
        if cache is None or not reply.startswith(b"OK "):
            return reply
        written = cache.set(mapname, key, reply)
        if written is None:
            return reply
        return written.addCallback(lambda _: reply)

    def _done(self, reply: bytes, handler: str, started: float) -> bytes:
        if reply.startswith(b"OK"):
            status = "success"
        elif reply.startswith(b"NOTFOUND"):
            status = "notfound"
        else:
            status = "error"
        self._requests[handler, status]()
        self._durations[handler, status](self._clock.seconds() - started)
        return reply
