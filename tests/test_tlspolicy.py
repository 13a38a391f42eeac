"""
Tests for L{userli_postfix.tlspolicy}: key normalisation and the verdict
(tables), the choice of mail servers from a fake resolver, the caches, and
the map's answers with a fake prober and a L{Clock}: the deadline, the
probe that goes on in the background, coalescing and the bound.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.names import client, dns, error
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.doubles import FakeLookupClient, configFrom
from userli_postfix.lookups import Lookups
from userli_postfix.metrics import Metrics
from userli_postfix.redisclient import RedisUnavailable
from userli_postfix.smtpprobe import HostReport
from userli_postfix.tlspolicy import (
    ANSWER_DEADLINE,
    ENCRYPT,
    MAX_MX_HOSTS,
    NOTLS,
    RESOLV_CONF,
    Lifetimes,
    MailHost,
    MemoryPolicyCache,
    Prober,
    ProbeResult,
    RedisPolicyCache,
    TLSPolicy,
    cache_key,
    decide,
    makeResolver,
    normalise_policy_key,
)


def answer(*payloads: Any) -> tuple[list[dns.RRHeader], list[Any], list[Any]]:
    """A resolver's result holding C{payloads} as answers."""
    return ([dns.RRHeader(b"x", p.TYPE, payload=p) for p in payloads], [], [])


class FakeResolver:
    """Answers from dicts; a name missing from every dict is an empty answer."""

    def __init__(self) -> None:
        self.mx: dict[str, Any] = {}
        self.a: dict[str, Any] = {}
        self.aaaa: dict[str, Any] = {}
        self.asked: list[tuple[str, str]] = []

    def _lookup(self, kind: str, table: dict[str, Any], name: str) -> defer.Deferred[Any]:
        self.asked.append((kind, name))
        result = table.get(name, ([], [], []))
        if isinstance(result, Exception):
            return defer.fail(result)
        return defer.succeed(result)

    def lookupMailExchange(self, name: str, timeout: Any = None) -> defer.Deferred[Any]:
        return self._lookup("MX", self.mx, name)

    def lookupAddress(self, name: str, timeout: Any = None) -> defer.Deferred[Any]:
        return self._lookup("A", self.a, name)

    def lookupIPV6Address(self, name: str, timeout: Any = None) -> defer.Deferred[Any]:
        return self._lookup("AAAA", self.aaaa, name)


def tls(address: str) -> HostReport:
    return HostReport(address, answered=True, starttls_offered=True, tls=True)


def plain(address: str) -> HostReport:
    return HostReport(address, answered=True)


def silent(address: str) -> HostReport:
    return HostReport(address, error="no connection")


class NormalisationTests(SynchronousTestCase):
    """L{normalise_policy_key}."""

    def test_table(self) -> None:
        """Domains and addresses become the domain; what cannot be one is refused."""
        table = {
            "example.org": "example.org",
            "Example.ORG.": "example.org",
            "user@example.org": "example.org",
            "a@b@Example.org": "example.org",
            "@example.org": "example.org",
            " example.org ": "example.org",
            "": None,
            "user@": None,
            "exa mple.org": None,
            "[192.0.2.1]": None,
            "example..org": None,
            "example.org/../x": None,
            "-bad.example": None,
            "x" * 300 + ".org": None,
            "a" * 64 + ".org": None,
            "a" * 63 + ".org": "a" * 63 + ".org",
            "Bücher.Example": "bücher.example",
            "a" * 60 + "ü.org": None,
        }
        for key, expected in table.items():
            self.assertEqual(normalise_policy_key(key), expected, key)

    @settings(max_examples=300, derandomize=True, database=None, deadline=None)
    @given(
        key=st.one_of(
            st.text(max_size=80),
            st.builds(
                lambda local, labels: local + "@" + ".".join(labels),
                st.text(max_size=10),
                st.lists(
                    st.one_of(
                        st.text(max_size=70),
                        st.text(alphabet="ab9-ü", min_size=1, max_size=70),
                        st.builds(
                            lambda n, tail: "a" * n + tail,
                            st.integers(55, 70),
                            st.sampled_from(["", "ü", "b"]),
                        ),
                    ),
                    min_size=1,
                    max_size=5,
                ),
            ),
        )
    )
    def test_anyKey(self, key: str) -> None:
        """
        Any key gives C{None} or a domain DNS can carry: no C{@}, no space
        or control character, at most 253 bytes in IDNA form, and stable
        when normalised again.
        """
        domain = normalise_policy_key(key)
        if domain is None:
            return
        self.assertNotIn("@", domain)
        self.assertTrue(domain.isprintable() and " " not in domain, domain)
        self.assertLessEqual(len(domain.encode("idna")), 253)
        self.assertEqual(normalise_policy_key(domain), domain)


class DecisionTests(SynchronousTestCase):
    """L{decide}: (answered, TLS) per probed host -> verdict."""

    def test_table(self) -> None:
        """C{encrypt} only when every host that answered did TLS, and one did."""
        table: list[tuple[list[tuple[bool, bool]], str | None]] = [
            ([], None),
            ([(False, False)], None),
            ([(False, False), (False, False)], None),
            ([(True, True)], ENCRYPT),
            ([(True, True), (True, True)], ENCRYPT),
            ([(True, True), (False, False)], ENCRYPT),
            ([(False, False), (True, True)], ENCRYPT),
            ([(True, False)], NOTLS),
            ([(True, True), (True, False)], NOTLS),
            ([(True, False), (True, True)], NOTLS),
            ([(True, False), (False, False)], NOTLS),
        ]
        for hosts, verdict in table:
            self.assertEqual(decide(hosts), verdict, hosts)


class ProberTests(SynchronousTestCase):
    """L{Prober}: which servers and addresses are probed, and the result."""

    def setUp(self) -> None:
        self.resolver = FakeResolver()
        self.reports: dict[str, Any] = {}
        self.probed: list[str] = []
        self.prober = Prober(lambda: self.resolver, self.probeAddress)

    def probeAddress(self, address: str) -> defer.Deferred[HostReport]:
        self.probed.append(address)
        report = self.reports.get(address, silent(address))
        if isinstance(report, defer.Deferred):
            return report
        return defer.succeed(report)

    def probe(self, domain: str = "example.org") -> ProbeResult:
        return self.successResultOf(self.prober.probe(domain))

    def test_lowestPreferenceFirstAtMostTwo(self) -> None:
        """The two MX hosts of lowest preference are probed, no others."""
        self.resolver.mx["example.org"] = answer(
            dns.Record_MX(30, b"mx3.example.org"),
            dns.Record_MX(10, b"MX1.example.org."),
            dns.Record_MX(20, b"mx2.example.org"),
        )
        for n in (1, 2, 3):
            self.resolver.a[f"mx{n}.example.org"] = answer(dns.Record_A(f"192.0.2.{n}"))
            self.reports[f"192.0.2.{n}"] = tls(f"192.0.2.{n}")
        result = self.probe()
        self.assertEqual([h.name for h in result.hosts], ["mx1.example.org", "mx2.example.org"])
        self.assertEqual(sorted(self.probed), ["192.0.2.1", "192.0.2.2"])
        self.assertEqual(len(result.hosts), MAX_MX_HOSTS)
        self.assertEqual(result.verdict, ENCRYPT)

    def test_duplicateMX(self) -> None:
        """A host listed twice is probed once."""
        self.resolver.mx["example.org"] = answer(
            dns.Record_MX(10, b"mx.example.org"), dns.Record_MX(20, b"mx.example.org")
        )
        self.resolver.a["mx.example.org"] = answer(dns.Record_A("192.0.2.1"))
        self.probe()
        self.assertEqual(self.probed, ["192.0.2.1"])

    def test_withoutMX(self) -> None:
        """A domain without MX is probed at its own addresses, as SMTP does."""
        self.resolver.a["example.org"] = answer(dns.Record_A("192.0.2.9"))
        self.reports["192.0.2.9"] = plain("192.0.2.9")
        result = self.probe()
        self.assertEqual([h.name for h in result.hosts], ["example.org"])
        self.assertEqual(result.verdict, NOTLS)

    def test_nullMX(self) -> None:
        """A null MX (RFC 7505): nothing probed, remembered as C{notls}."""
        self.resolver.mx["example.org"] = answer(dns.Record_MX(0, b""))
        result = self.probe()
        self.assertEqual(result.verdict, NOTLS)
        self.assertTrue(result.null_mx)
        self.assertEqual(self.probed, [])
        self.assertEqual([kind for kind, _ in self.resolver.asked], ["MX"])

    def test_noSuchDomain(self) -> None:
        """A domain that does not exist is an error (not cached), nothing probed."""
        self.resolver.mx["example.org"] = error.DNSNameError("example.org")
        result = self.probe()
        self.assertIsNone(result.verdict)
        self.assertEqual(result.error, "no such domain")
        self.assertEqual(self.probed, [])

    def test_dnsFailure(self) -> None:
        """A failing MX lookup (time-out, SERVFAIL) is an error, said why."""
        self.resolver.mx["example.org"] = error.DNSServerError("SERVFAIL")
        result = self.probe()
        self.assertIsNone(result.verdict)
        self.assertIn("DNS", result.error or "")

    def test_resolverRaises(self) -> None:
        """A resolver that raises at once (a name it cannot encode) is an error, not a crash."""

        def refuse(name: str, timeout: Any = None) -> defer.Deferred[Any]:
            raise UnicodeError("label empty or too long")

        self.resolver.lookupMailExchange = refuse  # type: ignore[method-assign]
        self.assertIn("DNS", self.probe().error or "")
        self.resolver = FakeResolver()
        self.resolver.mx["example.org"] = answer(dns.Record_MX(10, b"mx.example.org"))
        self.resolver.lookupAddress = refuse  # type: ignore[method-assign]
        prober = Prober(lambda: self.resolver, self.probeAddress)
        result = self.successResultOf(prober.probe("example.org"))
        self.assertIsNone(result.verdict)
        self.assertIn("label", result.hosts[0].error or "")

    def test_ipv4ThenIPv6UntilOneAnswers(self) -> None:
        """
        A server's IPv4 addresses come before its IPv6 ones; the next is
        tried only while none answered, and at most two.
        """
        self.resolver.mx["example.org"] = answer(dns.Record_MX(10, b"mx.example.org"))
        self.resolver.a["mx.example.org"] = answer(dns.Record_A("192.0.2.1"))
        self.resolver.aaaa["mx.example.org"] = answer(
            dns.Record_AAAA("2001:db8::1"), dns.Record_AAAA("2001:db8::2")
        )
        self.reports["2001:db8::1"] = tls("2001:db8::1")
        result = self.probe()
        self.assertEqual(self.probed, ["192.0.2.1", "2001:db8::1"])
        self.assertTrue(result.hosts[0].tls)
        self.assertEqual(result.verdict, ENCRYPT)

    def test_firstAnswerDecides(self) -> None:
        """Once an address answered, the server's other addresses are not probed."""
        self.resolver.a["example.org"] = answer(
            dns.Record_A("192.0.2.1"), dns.Record_A("192.0.2.2")
        )
        self.reports["192.0.2.1"] = plain("192.0.2.1")
        self.probe()
        self.assertEqual(self.probed, ["192.0.2.1"])

    def test_oneHostWithoutTLS(self) -> None:
        """One server with TLS, one that answers without: C{notls}."""
        self.resolver.mx["example.org"] = answer(
            dns.Record_MX(10, b"mx1.example.org"), dns.Record_MX(20, b"mx2.example.org")
        )
        self.resolver.a["mx1.example.org"] = answer(dns.Record_A("192.0.2.1"))
        self.resolver.a["mx2.example.org"] = answer(dns.Record_A("192.0.2.2"))
        self.reports["192.0.2.1"] = tls("192.0.2.1")
        self.reports["192.0.2.2"] = plain("192.0.2.2")
        self.assertEqual(self.probe().verdict, NOTLS)

    def test_noHostAnswered(self) -> None:
        """No server answered, or none has an address: an error."""
        self.resolver.mx["example.org"] = answer(
            dns.Record_MX(10, b"mx1.example.org"), dns.Record_MX(20, b"mx2.example.org")
        )
        self.resolver.a["mx1.example.org"] = answer(dns.Record_A("192.0.2.1"))
        self.resolver.a["mx2.example.org"] = error.DNSServerError("SERVFAIL")
        result = self.probe()
        self.assertIsNone(result.verdict)
        self.assertEqual(result.hosts[1], MailHost("mx2.example.org", error=result.hosts[1].error))
        self.assertIn("DNS", result.hosts[1].error or "")

    def test_hostsProbedAtOnce(self) -> None:
        """Both servers are probed at the same time, not one after the other."""
        self.resolver.mx["example.org"] = answer(
            dns.Record_MX(10, b"mx1.example.org"), dns.Record_MX(20, b"mx2.example.org")
        )
        self.resolver.a["mx1.example.org"] = answer(dns.Record_A("192.0.2.1"))
        self.resolver.a["mx2.example.org"] = answer(dns.Record_A("192.0.2.2"))
        first: defer.Deferred[HostReport] = defer.Deferred()
        self.reports["192.0.2.1"] = first
        d = self.prober.probe("example.org")
        self.assertEqual(self.probed, ["192.0.2.1", "192.0.2.2"])
        first.callback(tls("192.0.2.1"))
        self.assertEqual(self.successResultOf(d).verdict, ENCRYPT)

    def test_resolverMadeOnFirstUse(self) -> None:
        """The resolver is made when the first probe needs it, once."""
        made: list[FakeResolver] = []

        def make() -> FakeResolver:
            made.append(FakeResolver())
            return made[-1]

        prober = Prober(make, self.probeAddress)
        self.assertEqual(made, [])
        prober.probe("example.org")
        prober.probe("example.net")
        self.assertEqual(len(made), 1)


class ResolverTests(SynchronousTestCase):
    """L{makeResolver}: which DNS servers the probes ask."""

    def test_nameservers(self) -> None:
        """With C{TLS_POLICY_NAMESERVERS} only those are asked, never resolv.conf's."""
        config = configFrom(
            {"USERLI_TOKEN": "t", "TLS_POLICY_NAMESERVERS": "127.0.0.1:5353,127.0.0.2:53"}
        )
        resolver = makeResolver(config, Clock())()
        assert isinstance(resolver, client.Resolver)
        self.assertEqual(resolver.servers, [("127.0.0.1", 5353), ("127.0.0.2", 53)])
        self.assertIsNone(resolver.resolv)

    def test_system(self) -> None:
        """Without it, the system's C{/etc/resolv.conf}."""
        config = configFrom({"USERLI_TOKEN": "t"})
        resolver = makeResolver(config, Clock())()
        assert isinstance(resolver, client.Resolver)
        self.assertEqual(resolver.servers, [])
        self.assertEqual(resolver.resolv, RESOLV_CONF)


class FakeRedis:
    """A Redis client's C{execute} over a dict, or failing."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.commands: list[tuple[Any, ...]] = []
        self.down = False

    def execute(self, command: str, *args: Any) -> defer.Deferred[Any]:
        self.commands.append((command, *args))
        if self.down:
            return defer.fail(RedisUnavailable("down"))
        if command == "GET":
            return defer.succeed(self.data.get(args[0]))
        if command == "SET":
            self.data[args[0]] = args[1].encode()
            return defer.succeed(b"OK")
        raise AssertionError(command)


class CacheTests(SynchronousTestCase):
    """L{MemoryPolicyCache} and L{RedisPolicyCache}."""

    lifetimes = Lifetimes(tls=7 * 86400.0, notls=86400.0)

    def test_memoryLifetimes(self) -> None:
        """Each verdict is kept for its own lifetime."""
        clock = Clock()
        cache = MemoryPolicyCache(clock, self.lifetimes)
        cache.set("tls.example", ENCRYPT)
        cache.set("plain.example", NOTLS)
        clock.advance(86400 - 1)
        self.assertEqual(self.successResultOf(cache.get("plain.example")), NOTLS)
        clock.advance(1)
        self.assertIsNone(self.successResultOf(cache.get("plain.example")))
        self.assertEqual(self.successResultOf(cache.get("tls.example")), ENCRYPT)
        clock.advance(6 * 86400)
        self.assertIsNone(self.successResultOf(cache.get("tls.example")))

    def test_memoryBounded(self) -> None:
        """Past its size the oldest entry goes first."""
        cache = MemoryPolicyCache(Clock(), self.lifetimes, entries=2)
        for name in ("a.example", "b.example", "c.example"):
            cache.set(name, ENCRYPT)
        self.assertIsNone(self.successResultOf(cache.get("a.example")))
        self.assertEqual(self.successResultOf(cache.get("c.example")), ENCRYPT)

    def test_redisKeysAndLifetimes(self) -> None:
        """The Go branch's key, the verdict as value, the lifetime in milliseconds."""
        redis = FakeRedis()
        cache = RedisPolicyCache(redis, self.lifetimes)  # type: ignore[arg-type]
        cache.set("example.org", ENCRYPT)
        cache.set("example.net", NOTLS)
        self.assertEqual(
            redis.commands,
            [
                ("SET", "userli:tlspolicy:domain:example.org", "encrypt", "PX", 604800000),
                ("SET", "userli:tlspolicy:domain:example.net", "notls", "PX", 86400000),
            ],
        )
        self.assertEqual(cache_key("example.org"), "userli:tlspolicy:domain:example.org")
        self.assertEqual(self.successResultOf(cache.get("example.org")), ENCRYPT)
        self.assertIsNone(self.successResultOf(cache.get("example.com")))

    def test_redisUnknownValue(self) -> None:
        """A value that is neither verdict (written by hand) counts as none."""
        redis = FakeRedis()
        redis.data[cache_key("example.org")] = b"maybe"
        cache = RedisPolicyCache(redis, self.lifetimes)  # type: ignore[arg-type]
        self.assertIsNone(self.successResultOf(cache.get("example.org")))

    def test_redisDown(self) -> None:
        """Reading fails (the map answers NOTFOUND); writing only logs."""
        redis = FakeRedis()
        redis.down = True
        cache = RedisPolicyCache(redis, self.lifetimes)  # type: ignore[arg-type]
        self.failureResultOf(cache.get("example.org"), RedisUnavailable)
        cache.set("example.org", ENCRYPT)
        self.assertEqual(len(self.flushLoggedErrors()), 0)


class FakeProber:
    """Probes that the test finishes, recorded by domain."""

    def __init__(self) -> None:
        self.running: dict[str, list[defer.Deferred[ProbeResult]]] = {}

    def probe(self, domain: str) -> defer.Deferred[ProbeResult]:
        d: defer.Deferred[ProbeResult] = defer.Deferred()
        self.running.setdefault(domain, []).append(d)
        return d

    def finish(self, domain: str, verdict: str | None) -> None:
        for d in self.running.pop(domain):
            d.callback(ProbeResult(domain, verdict))


class TLSPolicyTests(SynchronousTestCase):
    """L{TLSPolicy}: answers, deadline, background probes, coalescing, bound."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.metrics = Metrics(process=False)
        self.prober = FakeProber()
        self.cache = MemoryPolicyCache(self.clock, Lifetimes())
        self.policy = TLSPolicy(
            self.prober,  # type: ignore[arg-type]
            self.cache,
            self.metrics,
            self.clock,
            maxProbes=2,
        )

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def ask(self, key: str) -> defer.Deferred[bytes]:
        return defer.maybeDeferred(self.policy.answer, key)

    def test_invalidKey(self) -> None:
        """A key that cannot be a domain is NOTFOUND at once, unprobed."""
        self.assertEqual(self.successResultOf(self.ask("not a domain")), b"NOTFOUND ")
        self.assertEqual(self.prober.running, {})

    def test_probeWithinDeadline(self) -> None:
        """A probe that ends within the deadline gives the answer, then cached."""
        d = self.ask("User@Example.ORG")
        self.assertNoResult(d)
        self.assertEqual(list(self.prober.running), ["example.org"])
        self.clock.advance(1.5)
        self.prober.finish("example.org", ENCRYPT)
        self.assertEqual(self.successResultOf(d), b"OK encrypt")
        self.assertEqual(self.successResultOf(self.cache.get("example.org")), ENCRYPT)
        self.assertEqual(
            self.sample("userli_postfix_adapter_tls_policy_probe_total", result="tls"), 1
        )
        self.assertEqual(
            self.sample("userli_postfix_adapter_tls_policy_probe_duration_seconds_sum"), 1.5
        )

    def test_cacheHits(self) -> None:
        """Cached verdicts answer without a probe, counted by verdict."""
        self.cache.set("tls.example", ENCRYPT)
        self.cache.set("plain.example", NOTLS)
        self.assertEqual(self.successResultOf(self.ask("tls.example")), b"OK encrypt")
        self.assertEqual(self.successResultOf(self.ask("plain.example")), b"NOTFOUND ")
        self.assertEqual(self.prober.running, {})
        name = "userli_postfix_adapter_tls_policy_cache_hits_total"
        self.assertEqual(self.sample(name, result="encrypt"), 1)
        self.assertEqual(self.sample(name, result="notls"), 1)

    def test_deadlineThenBackground(self) -> None:
        """
        A probe still running at the deadline: NOTFOUND then, and the probe
        goes on; its verdict is cached for the next delivery attempt.
        """
        d = self.ask("example.org")
        self.clock.advance(ANSWER_DEADLINE - 0.01)
        self.assertNoResult(d)
        self.clock.advance(0.01)
        self.assertEqual(self.successResultOf(d), b"NOTFOUND ")
        self.assertIsNone(self.successResultOf(self.cache.get("example.org")))
        self.clock.advance(20)
        self.prober.finish("example.org", ENCRYPT)
        self.assertEqual(self.successResultOf(self.ask("example.org")), b"OK encrypt")
        self.assertEqual(self.policy.probing, 0)

    def test_coalescing(self) -> None:
        """Lookups of one domain while its probe runs share it."""
        first = self.ask("example.org")
        self.clock.advance(3)
        second = self.ask("someone@example.org")
        self.assertEqual(len(self.prober.running["example.org"]), 1)
        self.clock.advance(2)
        # The first waited its whole deadline; the second has 3 s left.
        self.assertEqual(self.successResultOf(first), b"NOTFOUND ")
        self.assertNoResult(second)
        self.prober.finish("example.org", NOTLS)
        self.assertEqual(self.successResultOf(second), b"NOTFOUND ")
        self.assertEqual(
            self.sample("userli_postfix_adapter_tls_policy_probe_total", result="notls"), 1
        )

    def test_bound(self) -> None:
        """
        With every probe slot busy, another domain is answered NOTFOUND at
        once and not probed; a slot freed takes the next one.
        """
        self.ask("a.example")
        self.ask("b.example")
        third = self.ask("c.example")
        self.assertEqual(self.successResultOf(third), b"NOTFOUND ")
        self.assertEqual(sorted(self.prober.running), ["a.example", "b.example"])
        # A domain already being probed still shares its probe.
        self.assertNoResult(self.ask("a.example"))
        self.prober.finish("a.example", NOTLS)
        self.assertNoResult(self.ask("c.example"))
        self.assertEqual(sorted(self.prober.running), ["b.example", "c.example"])

    def test_errorNotCached(self) -> None:
        """A probe that reached no server: NOTFOUND, not cached, counted as an error."""
        d = self.ask("example.org")
        self.prober.finish("example.org", None)
        self.assertEqual(self.successResultOf(d), b"NOTFOUND ")
        self.assertIsNone(self.successResultOf(self.cache.get("example.org")))
        self.assertEqual(
            self.sample("userli_postfix_adapter_tls_policy_probe_total", result="error"), 1
        )
        self.ask("example.org")
        self.assertEqual(list(self.prober.running), ["example.org"])

    def test_cacheFailing(self) -> None:
        """Redis failing: NOTFOUND (fail open), no probe."""
        redis = FakeRedis()
        redis.down = True
        policy = TLSPolicy(
            self.prober,  # type: ignore[arg-type]
            RedisPolicyCache(redis, Lifetimes()),  # type: ignore[arg-type]
            self.metrics,
            self.clock,
        )
        self.assertEqual(
            self.successResultOf(defer.maybeDeferred(policy.answer, "example.org")),
            b"NOTFOUND ",
        )
        self.assertEqual(self.prober.running, {})

    def test_proberCrash(self) -> None:
        """A probe that fails (a bug) answers NOTFOUND and frees its slot."""
        d = self.ask("example.org")
        self.prober.running.pop("example.org")[0].errback(Failure(RuntimeError("bug")))
        self.assertEqual(self.successResultOf(d), b"NOTFOUND ")
        self.assertEqual(self.policy.probing, 0)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_probeEndsAtOnce(self) -> None:
        """A probe that has its verdict at once answers at once."""

        def quick(domain: str) -> defer.Deferred[ProbeResult]:
            return defer.succeed(ProbeResult(domain, ENCRYPT))

        self.patch(self.prober, "probe", quick)
        self.assertEqual(self.successResultOf(self.ask("example.org")), b"OK encrypt")
        self.assertEqual(self.policy.probing, 0)

    def test_proberRaises(self) -> None:
        """A probe that raises at once (a bug) answers NOTFOUND and frees its slot."""

        def broken(domain: str) -> Any:
            raise RuntimeError("bug")

        self.patch(self.prober, "probe", broken)
        self.assertEqual(self.successResultOf(self.ask("example.org")), b"NOTFOUND ")
        self.assertEqual(self.policy.probing, 0)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class SocketmapDispatchTests(SynchronousTestCase):
    """C{tls_policy} through L{Lookups}, as the socketmap asks."""

    def test_requestMetrics(self) -> None:
        """Requests are counted under the handler C{tls_policy}."""
        clock = Clock()
        metrics = Metrics(process=False)
        cache = MemoryPolicyCache(clock, Lifetimes())
        cache.set("example.org", ENCRYPT)
        policy = TLSPolicy(FakeProber(), cache, metrics, clock)  # type: ignore[arg-type]
        lookups = Lookups(
            FakeLookupClient(),  # type: ignore[arg-type]
            None,
            metrics,
            clock,
            others={"tls_policy": policy.answer},
        )
        reply = defer.maybeDeferred(lookups.answer, b"tls_policy example.org")
        self.assertEqual(self.successResultOf(reply), b"OK encrypt")
        reply = defer.maybeDeferred(lookups.answer, b"tls_policy not..valid")
        self.assertEqual(self.successResultOf(reply), b"NOTFOUND ")
        name = "userli_postfix_adapter_requests_total"
        labels = {"handler": "tls_policy"}
        self.assertEqual(
            metrics.registry.get_sample_value(name, {**labels, "status": "success"}), 1
        )
        self.assertEqual(
            metrics.registry.get_sample_value(name, {**labels, "status": "notfound"}), 1
        )
