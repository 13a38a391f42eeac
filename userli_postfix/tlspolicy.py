"""
The C{tls_policy} socketmap: which remote domains get mandatory TLS.

Postfix asks, through C{smtp_tls_policy_maps}, before it delivers to a
remote domain.  We find the domain's mail servers (L{Prober}: MX through
C{twisted.names}, then each server through L{smtpprobe}), decide
(L{decide}, a pure function), remember the verdict (L{MemoryPolicyCache}
or L{RedisPolicyCache}, the Go branch's key layout) and answer
C{OK encrypt} or C{NOTFOUND} (L{TLSPolicy}).

The one answer that can hurt is C{OK encrypt}: Postfix then defers every
message to the domain that cannot go over TLS.  So it is given only for a
domain whose every mail server that answered completed a TLS handshake,
and every doubt (no answer yet, DNS failing, Redis failing, too many
probes running) is C{NOTFOUND}, which leaves Postfix's own level in force.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.names import client, dns, error
from twisted.python.failure import Failure

from userli_postfix.addresses import normalise_domain
from userli_postfix.coalesce import Coalescer
from userli_postfix.config import Config
from userli_postfix.deadlines import answerWithin
from userli_postfix.metrics import Metrics, increments
from userli_postfix.redisclient import RedisClient
from userli_postfix.smtpprobe import HostReport, probeAddress

log = Logger()

ENCRYPT = "encrypt"
NOTLS = "notls"

OK_ENCRYPT = b"OK encrypt"
NOTFOUND = b"NOTFOUND "

# The Go branch's key layout, so both programs share what they learnt.
CACHE_PREFIX = "userli:tlspolicy:domain:"

# Postfix is answered within the socketmap's usual deadline (that of a
# Userli lookup); a probe still running then goes on in the background.
ANSWER_DEADLINE = 5.0
# Probes running at once.  Each holds at most two SMTP connections at a
# time, so 32 is 64 connections to port 25 at most: far below any file
# limit, few enough not to look like a scan to the remote side, and a
# burst of new domains (a newsletter) is still learnt within seconds.
# When all are busy, a new domain is answered NOTFOUND and probed at a
# later delivery attempt: waiting for a free slot could outlast the
# deadline anyway.
MAX_PROBES = 32
# The Go branch's bound: mail rarely goes past the second MX.
MAX_MX_HOSTS = 2
# Addresses tried per mail server, until one answers.
MAX_ADDRESSES = 2
# twisted.names retries a query after each of these timeouts (seconds).
DNS_TIMEOUTS = (1, 3)
# The system's resolver configuration, when TLS_POLICY_NAMESERVERS is empty.
RESOLV_CONF = "/etc/resolv.conf"
# The longest domain name DNS carries, without its final dot.
MAX_DOMAIN = 253
# Without Redis: at most this many domains remembered.
MEMORY_ENTRIES = 100_000


def cache_key(domain: str) -> str:
    """The Redis key of a domain's verdict."""
    return CACHE_PREFIX + domain


def normalise_policy_key(raw: str) -> str | None:
    """
    The domain a C{tls_policy} key is about: the key itself, or the part
    after its last C{@}; lower case, without a trailing dot.  C{None} for a
    key that cannot be a domain (it is answered C{NOTFOUND}, unprobed).
    """
    domain = normalise_domain(raw.rpartition("@")[2])
    if domain is None:
        return None
    try:
        # What DNS can carry: labels of at most 63 bytes, 253 in all, each
        # non-ASCII one as its IDNA form (which twisted.names sends).
        encoded = domain.encode("idna")
    except UnicodeError:
        return None
    return domain if len(encoded) <= MAX_DOMAIN else None


def decide(hosts: Sequence[tuple[bool, bool]]) -> str | None:
    """
    The verdict from the probed mail servers, each given as (answered,
    completed a TLS handshake): C{encrypt} when at least one answered and
    every one that answered did TLS; C{notls} when one answered without
    it; C{None} (an error, not cached) when none answered.

    A server that did not answer counts neither way: it is down now, and
    Postfix will not deliver to it while it is.
    """
    answered = [tls for reached, tls in hosts if reached]
    if not answered:
        return None
    return ENCRYPT if all(answered) else NOTLS


@dataclass(frozen=True)
class MailHost:
    """One mail server of a domain, and what probing its addresses found."""

    name: str
    reports: tuple[HostReport, ...] = ()
    error: str | None = None

    @property
    def answered(self) -> bool:
        """Some address of it answered."""
        return any(r.answered for r in self.reports)

    @property
    def tls(self) -> bool:
        """The address that answered completed a TLS handshake."""
        return any(r.answered and r.tls for r in self.reports)


@dataclass(frozen=True)
class ProbeResult:
    """
    A domain's probe: its mail servers and the verdict (C{None} when no
    server could be reached, or DNS failed: an error).
    """

    domain: str
    verdict: str | None
    hosts: tuple[MailHost, ...] = ()
    error: str | None = None
    null_mx: bool = False


class Resolver(Protocol):
    """What L{Prober} needs of a C{twisted.names} resolver."""

    def lookupMailExchange(self, name: str, timeout: Any = ...) -> defer.Deferred[Any]: ...

    def lookupAddress(self, name: str, timeout: Any = ...) -> defer.Deferred[Any]: ...

    def lookupIPV6Address(self, name: str, timeout: Any = ...) -> defer.Deferred[Any]: ...


class NullMX(Exception):
    """The domain says it takes no mail (RFC 7505: C{MX 0 .})."""


def _records(result: Any, kind: int) -> list[Any]:
    answers = result[0]
    return [rr.payload for rr in answers if rr.type == kind]


class Prober:
    """
    Probes a domain: its mail servers (at most L{MAX_MX_HOSTS}, lowest
    preference first; the domain itself when it has no MX, as SMTP does),
    each at its first addresses until one answers, all servers at once.

    @param resolver: makes the C{twisted.names} resolver on first use (one
        reading C{resolv.conf} starts a timer that re-reads it, which a
        process that never probes has no use for).
    @param probeAddress: probes one address, never fails (L{smtpprobe}).
    """

    def __init__(
        self,
        resolver: Callable[[], Resolver],
        probeAddress: Callable[[str], defer.Deferred[HostReport]],
    ) -> None:
        self._makeResolver = resolver
        self._resolver: Resolver | None = None
        self._probeAddress = probeAddress

    @property
    def resolver(self) -> Resolver:
        """The resolver, made on first use."""
        if self._resolver is None:
            self._resolver = self._makeResolver()
        return self._resolver

    def probe(self, domain: str) -> defer.Deferred[ProbeResult]:
        """The probe of C{domain}; never fails."""

        def failed(failure: Failure) -> ProbeResult:
            if failure.check(NullMX):
                # Nothing to protect: the domain takes no mail, so no
                # delivery can be downgraded.  Remembered as "notls" so that
                # the next lookup costs no DNS query.
                return ProbeResult(domain, NOTLS, error="null MX", null_mx=True)
            if failure.check(error.DNSNameError):
                return ProbeResult(domain, None, error="no such domain")
            return ProbeResult(
                domain, None, error=f"DNS lookup failed: {failure.getErrorMessage() or failure}"
            )

        d = defer.maybeDeferred(self.mailHosts, domain).addCallback(self._probeHosts, domain)
        return d.addErrback(failed)

    def mailHosts(self, domain: str) -> defer.Deferred[list[str]]:
        """
        The names of the mail servers to probe; fails with L{NullMX}, or
        with the DNS error.
        """

        def chosen(result: Any) -> list[str]:
            records = _records(result, dns.MX)
            names = [(r.preference, str(r.name).lower().rstrip(".")) for r in records]
            if any(not name for _, name in names):
                if len(names) == 1:
                    raise NullMX(domain)
                names = [(p, name) for p, name in names if name]
            if not names:
                return [domain]
            hosts: list[str] = []
            for _, name in sorted(names):
                if name not in hosts:
                    hosts.append(name)
            return hosts[:MAX_MX_HOSTS]

        return self.resolver.lookupMailExchange(domain, timeout=DNS_TIMEOUTS).addCallback(chosen)

    def addresses(self, host: str) -> defer.Deferred[list[str]]:
        """A host's IPv4 addresses, then its IPv6 ones (either may be missing)."""
        v4 = self.resolver.lookupAddress(host, timeout=DNS_TIMEOUTS)
        v6 = self.resolver.lookupIPV6Address(host, timeout=DNS_TIMEOUTS)

        def combine(results: list[tuple[bool, Any]]) -> list[str]:
            found: list[str] = []
            (ok4, r4), (ok6, r6) = results
            if ok4:
                found.extend(a.dottedQuad() for a in _records(r4, dns.A))
            if ok6:
                found.extend(
                    socket.inet_ntop(socket.AF_INET6, a.address) for a in _records(r6, dns.AAAA)
                )
            if not found:
                failure = r4 if not ok4 else (r6 if not ok6 else None)
                if isinstance(failure, Failure):
                    raise LookupError(failure.getErrorMessage() or str(failure.value))
            return found

        return defer.DeferredList([v4, v6], consumeErrors=True).addCallback(combine)

    def _probeHosts(self, hosts: list[str], domain: str) -> defer.Deferred[ProbeResult]:
        def done(results: list[tuple[bool, Any]]) -> ProbeResult:
            probed = tuple(result for _, result in results)
            verdict = decide([(h.answered, h.tls) for h in probed])
            problem = None if verdict is not None else "no mail server answered"
            return ProbeResult(domain, verdict, probed, error=problem)

        return defer.DeferredList(
            [self._probeHost(host) for host in hosts], consumeErrors=True
        ).addCallback(done)

    @defer.inlineCallbacks
    def _probeHost(self, host: str) -> Any:
        try:
            # A name from an MX record that DNS cannot carry fails here too.
            addresses = yield defer.maybeDeferred(self.addresses, host)
        except Exception as problem:
            return MailHost(host, error=f"DNS lookup failed: {problem}")
        if not addresses:
            return MailHost(host, error="no address")
        reports: list[HostReport] = []
        for address in addresses[:MAX_ADDRESSES]:
            report = yield self._probeAddress(address)
            reports.append(report)
            if report.answered:
                break
        return MailHost(host, tuple(reports))


class PolicyCache(Protocol):
    """Where verdicts are remembered: in Redis, or in this process."""

    def get(self, domain: str) -> defer.Deferred[str | None]:
        """The verdict, C{None} when none; fails when the backend does."""

    def set(self, domain: str, verdict: str) -> None:
        """Remember C{verdict} for its lifetime; a failure is only logged."""


@dataclass(frozen=True)
class Lifetimes:
    """How long each verdict is remembered, in seconds."""

    tls: float = 168 * 3600.0
    notls: float = 24 * 3600.0

    def of(self, verdict: str) -> float:
        """The lifetime of C{verdict}."""
        return self.tls if verdict == ENCRYPT else self.notls


class MemoryPolicyCache:
    """Verdicts in this process (no Redis): bounded, oldest dropped first."""

    def __init__(
        self, clock: IReactorTime, lifetimes: Lifetimes, entries: int = MEMORY_ENTRIES
    ) -> None:
        self._clock = clock
        self._lifetimes = lifetimes
        self._entries = entries
        self._data: dict[str, tuple[str, float]] = {}

    def get(self, domain: str) -> defer.Deferred[str | None]:
        entry = self._data.get(domain)
        if entry is None:
            return defer.succeed(None)
        if entry[1] <= self._clock.seconds():
            del self._data[domain]
            return defer.succeed(None)
        return defer.succeed(entry[0])

    def set(self, domain: str, verdict: str) -> None:
        self._data.pop(domain, None)
        while len(self._data) >= self._entries:
            del self._data[next(iter(self._data))]
        self._data[domain] = (verdict, self._clock.seconds() + self._lifetimes.of(verdict))


class RedisPolicyCache:
    """Verdicts in Redis under the Go branch's keys, with their lifetimes."""

    def __init__(self, redis: RedisClient, lifetimes: Lifetimes) -> None:
        self._redis = redis
        self._lifetimes = lifetimes

    def get(self, domain: str) -> defer.Deferred[str | None]:
        def decode(value: object) -> str | None:
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            return value if value in (ENCRYPT, NOTLS) else None

        return self._redis.execute("GET", cache_key(domain)).addCallback(decode)

    def set(self, domain: str, verdict: str) -> None:
        milliseconds = max(1, round(self._lifetimes.of(verdict) * 1000))
        d = self._redis.execute("SET", cache_key(domain), verdict, "PX", milliseconds)
        d.addErrback(
            lambda failure: log.warn(
                "TLS policy of {domain} not stored in Redis: {error}",
                domain=domain,
                error=failure.value,
            )
        )


class StillProbing(Exception):
    """The probe outlasted the answer's deadline; it goes on without us."""


class TLSPolicy:
    """
    Answers C{tls_policy} lookups: from the cache, else from a probe that
    answers within the deadline or goes on in the background.  Identical
    probes in flight share one; at most C{maxProbes} run at once.
    """

    def __init__(
        self,
        prober: Prober,
        cache: PolicyCache,
        metrics: Metrics,
        clock: IReactorTime,
        maxProbes: int = MAX_PROBES,
        deadline: float = ANSWER_DEADLINE,
    ) -> None:
        self._prober = prober
        self._cache = cache
        self._metrics = metrics
        self._clock = clock
        self._maxProbes = maxProbes
        self._deadline = deadline
        # Order does not matter: each asker has its own deadline.
        self._probes: Coalescer[str, str | None] = Coalescer(ordered=False)
        self._cacheHits = increments(metrics.tls_policy_cache_hits)
        self._probeResults = increments(metrics.tls_policy_probes)

    @property
    def probing(self) -> int:
        """Probes running now."""
        return len(self._probes)

    def answer(self, key: str) -> defer.Deferred[bytes] | bytes:
        """The reply to a C{tls_policy} key; never fails."""
        domain = normalise_policy_key(key)
        if domain is None:
            return NOTFOUND
        started = self._clock.seconds()

        def cached(verdict: str | None) -> defer.Deferred[bytes] | bytes:
            if verdict is not None:
                self._cacheHits[verdict]()
                return _reply(verdict)
            return self._awaitProbe(domain, started)

        def unavailable(failure: Failure) -> bytes:
            # Fail open: Postfix's own level applies, as with the Go branch.
            log.debug("TLS policy cache unavailable: {error}", error=failure.value)
            return NOTFOUND

        return self._cache.get(domain).addCallbacks(cached, unavailable)

    def _awaitProbe(self, domain: str, started: float) -> defer.Deferred[bytes] | bytes:
        probes = self._probes
        if domain not in probes and len(probes) >= self._maxProbes:
            log.debug(
                "{count} TLS policy probes running: {domain} is probed later",
                count=len(probes),
                domain=domain,
            )
            return NOTFOUND
        verdict = probes.ask(domain, self._probe, domain)
        left = max(0.0, self._deadline - (self._clock.seconds() - started))

        def late(failure: Failure) -> bytes:
            failure.trap(StillProbing)
            return NOTFOUND

        return answerWithin(verdict, left, self._clock, StillProbing).addCallbacks(_reply, late)

    def _probe(self, domain: str) -> defer.Deferred[str | None]:
        """Probe C{domain}: its verdict, kept in the cache, or C{None} when there is none."""
        started = self._clock.seconds()

        def probed(result: ProbeResult) -> str | None:
            self._metrics.tls_policy_probe_duration.observe(self._clock.seconds() - started)
            self._probeResults[
                {ENCRYPT: "tls", NOTLS: "notls"}.get(result.verdict or "", "error")
            ]()
            if result.verdict is not None:
                self._cache.set(domain, result.verdict)
            else:
                log.info(
                    "TLS policy probe of {domain} failed: {error}",
                    domain=domain,
                    error=result.error,
                )
            return result.verdict

        def crashed(failure: Failure) -> None:
            log.failure("TLS policy probe of {domain} crashed", failure, domain=domain)

        d = defer.maybeDeferred(self._prober.probe, domain)
        return d.addCallback(probed).addErrback(crashed)


def _reply(verdict: str | None) -> bytes:
    return OK_ENCRYPT if verdict == ENCRYPT else NOTFOUND


def makeResolver(config: Config, reactor: Any) -> Callable[[], Resolver]:
    """
    The C{twisted.names} resolver the probes use, made when first needed:
    C{TLS_POLICY_NAMESERVERS} alone when set (no query then leaves for
    the system's servers), else the servers of C{/etc/resolv.conf}.
    """

    def make() -> Resolver:
        if config.tls_policy_nameservers:
            resolver = client.Resolver(servers=list(config.tls_policy_nameservers), reactor=reactor)
        else:
            resolver = client.Resolver(resolv=RESOLV_CONF, reactor=reactor)
        return cast(Resolver, resolver)

    return make


def makeProber(config: Config, reactor: Any) -> Prober:
    """A L{Prober} as configured (name servers, SMTP port, EHLO name)."""

    def probe(address: str) -> defer.Deferred[HostReport]:
        return probeAddress(
            reactor,
            reactor,
            address,
            config.tls_policy_smtp_port,
            config.tls_policy_ehlo_hostname,
        )

    return Prober(makeResolver(config, reactor), probe)


def makeTLSPolicy(
    config: Config, reactor: Any, redis: RedisClient | None, metrics: Metrics
) -> TLSPolicy:
    """The C{tls_policy} map, its verdicts in Redis when there is one."""
    lifetimes = Lifetimes(config.tls_policy_cache_ttl_tls, config.tls_policy_cache_ttl_notls)
    cache: PolicyCache
    if redis is not None:
        cache = RedisPolicyCache(redis, lifetimes)
    else:
        cache = MemoryPolicyCache(reactor, lifetimes)
    return TLSPolicy(makeProber(config, reactor), cache, metrics, reactor)
