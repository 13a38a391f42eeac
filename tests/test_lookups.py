"""
Tests for L{userli_postfix.lookups}: how a socketmap request becomes a
reply.  A fake client lets each test decide when and how the API answers;
one test class goes through the real client and C{StubTreq} to tie the
failure modes to C{TEMP}.
"""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request

from tests.doubles import FakeLookupClient
from userli_postfix.cache import MemoryCache
from userli_postfix.lookups import MAX_REPLY, Lookups
from userli_postfix.metrics import Metrics
from userli_postfix.redisclient import RedisUnavailable
from userli_postfix.userli import UserliClient, UserliError


class FailingCache:
    """A cache whose backend is down: every read fails, writes vanish."""

    def __init__(self) -> None:
        self.writes = 0

    def peek(self, mapname: str, key: str) -> bytes | None:
        return None

    def get(self, mapname: str, key: str) -> defer.Deferred[bytes | None]:
        return defer.fail(RedisUnavailable("not connected"))

    def set(self, mapname: str, key: str, reply: bytes) -> None:
        self.writes += 1


class LookupTestCase(SynchronousTestCase):
    """A L{Lookups} over a L{FakeLookupClient}, without a cache unless a test adds one."""

    delimiter = "+"

    def setUp(self) -> None:
        self.clock = Clock()
        self.metrics = Metrics(process=False)
        self.client = FakeLookupClient()
        self.cache: Any = None
        self.lookups = self.build()

    def build(self, cache: Any = None) -> Lookups:
        self.cache = cache
        return Lookups(
            self.client,  # type: ignore[arg-type]
            cache,
            self.metrics,
            self.clock,
            self.delimiter,
        )

    def ask(self, request: bytes) -> defer.Deferred[bytes]:
        """The answer to C{request}, always as a Deferred."""
        return defer.maybeDeferred(self.lookups.answer, request)

    def reply(self, request: bytes, *answers: Any) -> bytes:
        """
        Ask, answer the API calls this made with C{answers} in order, and
        return the reply.
        """
        d = self.ask(request)
        for answer in answers:
            pending = self.client.pending.pop(0)
            if isinstance(answer, Exception):
                pending.errback(answer)
            else:
                pending.callback(answer)
        result: bytes = self.successResultOf(d)
        return result

    def count(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


class ReplyFormatTests(LookupTestCase):
    """Each map's reply, as compatibility.md gives it."""

    def test_alias(self) -> None:
        """An alias is C{OK} with its destinations joined by commas, else C{NOTFOUND}."""
        self.assertEqual(
            self.reply(b"alias a@example.org", ["b@example.org", "c@example.org"]),
            b"OK b@example.org,c@example.org",
        )
        self.assertEqual(self.reply(b"alias a@example.org", []), b"NOTFOUND ")

    def test_senders(self) -> None:
        """Senders are C{OK} with the logins joined by commas, else C{NOTFOUND}."""
        self.assertEqual(
            self.reply(b"senders a@example.org", ["a@example.org"]), b"OK a@example.org"
        )
        self.assertEqual(self.reply(b"senders a@example.org", []), b"NOTFOUND ")

    def test_domain_and_mailbox(self) -> None:
        """Domains and mailboxes are C{OK 1} or C{NOTFOUND}."""
        self.assertEqual(self.reply(b"domain example.org", True), b"OK 1")
        self.assertEqual(self.reply(b"domain example.org", False), b"NOTFOUND ")
        self.assertEqual(self.reply(b"mailbox a@example.org", True), b"OK 1")
        self.assertEqual(self.reply(b"mailbox a@example.org", False), b"NOTFOUND ")

    def test_endpoint_per_map(self) -> None:
        """Each map asks its own endpoint."""
        self.reply(b"alias a@example.org", [])
        self.reply(b"senders a@example.org", [])
        self.reply(b"domain example.org", True)
        self.reply(b"mailbox a@example.org", True)
        self.assertEqual(
            [endpoint for endpoint, _ in self.client.calls],
            ["alias", "senders", "domain", "mailbox"],
        )

    def test_non_ascii_reply(self) -> None:
        """Destinations with non-ASCII domains are sent on as UTF-8."""
        self.assertEqual(
            self.reply(b"alias a@example.org", ["b@bücher.de"]), "OK b@bücher.de".encode()
        )

    def test_reply_too_long(self) -> None:
        """An answer longer than Postfix accepts becomes C{TEMP}, not a refused reply."""
        many = [f"user{i:06d}@example.org" for i in range(MAX_REPLY // 20 + 1)]
        reply = self.reply(b"alias list@example.org", many)
        self.assertTrue(reply.startswith(b"TEMP "), reply[:40])
        self.flushLoggedErrors()


class PermTests(LookupTestCase):
    """Requests that are wrong in themselves: C{PERM}, and no API call."""

    def test_unknown_map(self) -> None:
        """An unknown map name is C{PERM}, counted under the handler C{invalid}."""
        for request in [b"virtual a@example.org", b"ALIAS a@example.org", b"\xff\xfe x"]:
            reply = self.reply(request)
            self.assertTrue(reply.startswith(b"PERM "), request)
        self.assertEqual(self.client.calls, [])
        self.assertEqual(
            self.count("userli_postfix_adapter_requests_total", handler="invalid", status="error"),
            3,
        )

    def test_no_space(self) -> None:
        """A request without a space, or with an empty key, is C{PERM}."""
        for request in [b"", b"alias", b"alias ", b"domain  ", b"aliasa@example.org"]:
            reply = self.reply(request)
            self.assertTrue(reply.startswith(b"PERM "), request)
        self.assertEqual(self.client.calls, [])

    def test_key_with_spaces(self) -> None:
        """Only the first space separates map and key; the rest belongs to the key."""
        self.assertEqual(self.reply(b"alias a @example.org"), b"NOTFOUND ")
        self.assertEqual(self.client.calls, [])


class NormalisationTests(LookupTestCase):
    """Keys are normalised before the API sees them; invalid ones never reach it."""

    def test_address_normalised(self) -> None:
        """Case, whitespace and the delimiter tag are gone by the time the API is asked."""
        self.reply(b"alias  User+Tag@Example.ORG\xe2\x80\x8b", [])
        self.reply(b"mailbox USER@EXAMPLE.ORG", True)
        self.reply(b"senders user+x@example.org.", [])
        self.assertEqual(
            self.client.calls,
            [
                ("alias", "user@example.org"),
                ("mailbox", "user@example.org"),
                ("senders", "user@example.org"),
            ],
        )

    def test_domain_normalised(self) -> None:
        """Domain keys are lower-cased and lose a trailing dot."""
        self.reply(b"domain Example.ORG.", True)
        self.assertEqual(self.client.calls, [("domain", "example.org")])

    def test_invalid_keys_not_asked(self) -> None:
        """
        A key that cannot be a Userli address or domain is C{NOTFOUND} without
        an API call (the Go program sent C{/}, C{?} and C{#} on unchecked).
        """
        for request in [
            b"alias u!x@example.org",
            b"alias u%x@example.org",
            b"alias u/x@example.org",
            b"alias +tag@example.org",
            b"alias postmaster",
            b"alias a@b@example.org",
            b"mailbox a@exa..mple.org",
            b"senders a@example.org/../auth",
            b"domain ..",
            b"domain example.org/../alias",
            b"domain example.org?x",
            b"domain example.org#x",
            b"domain a%2fb",
            b"alias \xff@example.org",
        ]:
            self.assertEqual(self.reply(request), b"NOTFOUND ", request)
        self.assertEqual(self.client.calls, [])
        self.assertEqual(
            self.count("userli_postfix_adapter_requests_total", handler="alias", status="notfound"),
            7,
        )


class ControlCharacterKeyTests(LookupTestCase):
    """
    A control, format or whitespace character inside a key makes it no
    Userli address or domain, for every map: C{NOTFOUND}, no API call, no
    cache read, and the key in no log line.
    """

    KEYS = [
        b"alice\n@example.org",
        b"alice\r\n@example.org",
        b"ali\x00ce@example.org",
        b"alice@example.org\n.net",
        b"alice@exam\tple.org",
        b"alice+\n@example.org",
        b"alice\x7f@example.org",
        b"alice\xc2\x85@example.org",
        b"alice\xe2\x80\x8b@example.org",
        b"alice\xe2\x80\xa8@example.org",
    ]
    DOMAINS = [
        b"example.org\n.net",
        b"example\n.org",
        b"exa\x00mple.org",
        b"exa\x1bmple.org",
        b"exa\xe2\x80\x8bmple.org",
        b"exa mple.org",
    ]

    def test_no_api_call(self) -> None:
        """Every map answers C{NOTFOUND} without asking the API or the cache."""
        self.lookups = self.build(FailingCache())
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        requests = [
            mapname + b" " + key
            for mapname in (b"alias", b"mailbox", b"senders")
            for key in self.KEYS
        ] + [b"domain " + key for key in self.DOMAINS]
        for request in requests:
            self.assertEqual(self.reply(request), b"NOTFOUND ", request)
        self.assertEqual(self.client.calls, [])
        for mapname in ("alias", "domain", "mailbox", "senders"):
            # The cache is down: a read would have been counted as an error.
            self.assertEqual(
                self.count(
                    "userli_postfix_adapter_lookup_cache_total", handler=mapname, result="error"
                ),
                0,
            )
        text = "\n".join(formatEvent(event) + repr(event) for event in events)
        for key in self.KEYS + self.DOMAINS:
            self.assertNotIn(key.decode("utf-8"), text)
        for mapname in ("alias", "mailbox", "senders"):
            self.assertEqual(
                self.count(
                    "userli_postfix_adapter_requests_total", handler=mapname, status="notfound"
                ),
                len(self.KEYS),
            )

    def test_trailing_line_break_trimmed(self) -> None:
        """At the ends of the key, a line break is trimmed as before (as the Go program does)."""
        self.reply(b"mailbox alice@example.org\r\n", True)
        self.reply(b"domain example.org\n", True)
        self.assertEqual(
            self.client.calls, [("mailbox", "alice@example.org"), ("domain", "example.org")]
        )


class TempTests(LookupTestCase):
    """Every failure of the API is C{TEMP}: Postfix defers and retries."""

    def test_api_error(self) -> None:
        """A L{UserliError} is C{TEMP}, counted as an error."""
        for request in [
            b"alias a@example.org",
            b"senders a@example.org",
            b"domain example.org",
            b"mailbox a@example.org",
        ]:
            reply = self.reply(request, UserliError("HTTP 500"))
            self.assertTrue(reply.startswith(b"TEMP "), request)
        self.assertEqual(
            self.count("userli_postfix_adapter_requests_total", handler="domain", status="error"),
            1,
        )

    def test_unexpected_error(self) -> None:
        """Even an unexpected exception is C{TEMP}, never an unanswered request."""
        reply = self.reply(b"alias a@example.org", KeyError("bug"))
        self.assertTrue(reply.startswith(b"TEMP "))
        self.flushLoggedErrors()

    def test_reason_without_key(self) -> None:
        """The reason Postfix logs does not echo the key."""
        reply = self.reply(b"alias secret@example.org", UserliError("HTTP 500"))
        self.assertNotIn(b"secret", reply)


class StubUserli(Resource):
    """A Userli that answers every request with one status and body."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.status = 200
        self.body = b"true"
        self.requests = 0

    def render(self, request: Request) -> bytes:
        self.requests += 1
        request.setResponseCode(self.status)
        return self.body


class RealClientTempTests(SynchronousTestCase):
    """The real client under every failure mode of userli-api.md: always C{TEMP}."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.metrics = Metrics(process=False)
        self.userli = StubUserli()
        self.stub = StubTreq(self.userli)
        client = UserliClient(
            self.stub.request, "http://userli.test", "t", self.clock, self.metrics
        )
        self.lookups = Lookups(client, None, self.metrics, self.clock)

    def ask(self, request: bytes) -> bytes:
        d = defer.maybeDeferred(self.lookups.answer, request)
        self.stub.flush()
        result: bytes = self.successResultOf(d)
        return result

    def test_failure_modes(self) -> None:
        """401, 403, 500, a redirect, HTML, an empty body and the wrong JSON type are C{TEMP}."""
        for status, body in [
            (401, b'{"error": "Invalid API token"}'),
            (403, b'{"title": "An error occurred"}'),
            (500, b"true"),
            (302, b""),
            (200, b"<html>maintenance</html>"),
            (200, b""),
            (200, b'"yes"'),
            (404, b'{"error": "User not found"}'),
        ]:
            self.userli.status, self.userli.body = status, body
            reply = self.ask(b"domain example.org")
            self.assertTrue(reply.startswith(b"TEMP "), (status, body, reply))
        self.flushLoggedErrors()

    def test_timeout(self) -> None:
        """A request that gets no answer within 5 s is C{TEMP} at 5 s."""

        def never(*args: Any, **kwargs: Any) -> defer.Deferred[Any]:
            return defer.Deferred()

        client = UserliClient(never, "http://userli.test", "t", self.clock, self.metrics)
        lookups = Lookups(client, None, self.metrics, self.clock)
        d = defer.maybeDeferred(lookups.answer, b"mailbox a@example.org")
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.assertTrue(self.successResultOf(d).startswith(b"TEMP "))

    def test_answer(self) -> None:
        """A good answer comes through the real client as C{OK 1}."""
        self.userli.body = json.dumps(True).encode()
        self.assertEqual(self.ask(b"domain example.org"), b"OK 1")


class CacheTests(LookupTestCase):
    """Only OK answers are cached; a cache failure is a miss, never a failed lookup."""

    def setUp(self) -> None:
        super().setUp()
        self.lookups = self.build(MemoryCache(self.clock, 300.0))

    def test_ok_cached(self) -> None:
        """An OK answer is served from the cache the next time, without an API call."""
        self.assertEqual(self.reply(b"mailbox a@example.org", True), b"OK 1")
        self.assertEqual(self.reply(b"mailbox a@example.org"), b"OK 1")
        self.assertEqual(len(self.client.calls), 1)
        self.assertEqual(
            self.count(
                "userli_postfix_adapter_lookup_cache_total", handler="mailbox", result="miss"
            ),
            1,
        )
        self.assertEqual(
            self.count(
                "userli_postfix_adapter_lookup_cache_total", handler="mailbox", result="hit"
            ),
            1,
        )
        self.assertEqual(
            self.count(
                "userli_postfix_adapter_requests_total", handler="mailbox", status="success"
            ),
            2,
        )

    def test_cached_under_key_as_sent(self) -> None:
        """The cache key is the key as Postfix sent it (the Go layout)."""
        self.reply(b"alias User+x@Example.org", ["b@example.org"])
        self.assertEqual(self.cache.peek("alias", "User+x@Example.org"), b"OK b@example.org")
        self.assertIsNone(self.cache.peek("alias", "user@example.org"))

    def test_ttl(self) -> None:
        """After the TTL the API is asked again."""
        self.reply(b"domain example.org", True)
        self.clock.advance(300)
        self.assertEqual(self.reply(b"domain example.org", True), b"OK 1")
        self.assertEqual(len(self.client.calls), 2)

    def test_notfound_not_cached(self) -> None:
        """C{NOTFOUND} is not cached, so a new mailbox works at once."""
        self.reply(b"mailbox new@example.org", False)
        self.assertEqual(self.reply(b"mailbox new@example.org", True), b"OK 1")
        self.assertEqual(len(self.client.calls), 2)

    def test_temp_not_cached(self) -> None:
        """C{TEMP} is not cached: the next lookup asks again."""
        self.reply(b"alias a@example.org", UserliError("HTTP 500"))
        self.assertEqual(self.reply(b"alias a@example.org", ["b@example.org"]), b"OK b@example.org")
        self.assertEqual(len(self.client.calls), 2)

    def test_perm_and_invalid_not_cached(self) -> None:
        """C{PERM} and the C{NOTFOUND} of invalid keys leave the cache alone."""
        self.reply(b"virtual a@example.org")
        self.reply(b"alias u!x@example.org")
        self.assertEqual(len(self.cache), 0)

    def test_cache_error_is_miss(self) -> None:
        """A failing cache is counted as C{error} and the API answers instead."""
        self.lookups = self.build(FailingCache())
        self.assertEqual(self.reply(b"domain example.org", True), b"OK 1")
        self.assertEqual(
            self.count(
                "userli_postfix_adapter_lookup_cache_total", handler="domain", result="error"
            ),
            1,
        )

    def test_without_cache(self) -> None:
        """Without a cache (TTL 0) every lookup asks the API."""
        self.lookups = self.build(None)
        self.reply(b"domain example.org", True)
        self.reply(b"domain example.org", True)
        self.assertEqual(len(self.client.calls), 2)


class CoalescingTests(LookupTestCase):
    """Identical lookups in flight at the same moment share one API call."""

    def test_hundred_identical(self) -> None:
        """100 concurrent identical lookups make 1 API call, and all get its answer."""
        ds = [self.ask(b"alias a@example.org") for _ in range(100)]
        self.assertEqual(len(self.client.calls), 1)
        self.client.pending.pop().callback(["b@example.org"])
        for d in ds:
            self.assertEqual(self.successResultOf(d), b"OK b@example.org")
        self.assertEqual(
            self.count("userli_postfix_adapter_requests_total", handler="alias", status="success"),
            100,
        )

    def test_spellings_share(self) -> None:
        """Spellings of one address share the call too: it is by normalised key."""
        ds = [
            self.ask(b"mailbox a@example.org"),
            self.ask(b"mailbox A@Example.org"),
            self.ask(b"mailbox a+tag@example.org"),
        ]
        self.assertEqual(self.client.calls, [("mailbox", "a@example.org")])
        self.client.pending.pop().callback(True)
        self.assertEqual([self.successResultOf(d) for d in ds], [b"OK 1"] * 3)

    def test_different_maps_separate(self) -> None:
        """The same key in two maps is two calls."""
        self.ask(b"alias a@example.org")
        self.ask(b"senders a@example.org")
        self.assertEqual(len(self.client.calls), 2)

    def test_failure_shared(self) -> None:
        """A failing shared call makes every waiter C{TEMP}."""
        ds = [self.ask(b"domain example.org") for _ in range(3)]
        self.client.pending.pop().errback(UserliError("HTTP 502"))
        for d in ds:
            self.assertTrue(self.successResultOf(d).startswith(b"TEMP "))

    def test_not_after_completion(self) -> None:
        """Once the call completed, the next lookup (uncached) asks afresh."""
        self.reply(b"domain example.org", False)
        self.ask(b"domain example.org")
        self.assertEqual(len(self.client.calls), 2)

    def test_with_cache(self) -> None:
        """With a cache in front, concurrent misses still make one call."""
        self.lookups = self.build(MemoryCache(self.clock, 300.0))
        ds = [self.ask(b"alias a@example.org") for _ in range(100)]
        self.assertEqual(len(self.client.calls), 1)
        self.client.pending.pop().callback(["b@example.org"])
        for d in ds:
            self.assertEqual(self.successResultOf(d), b"OK b@example.org")
        self.assertEqual(self.reply(b"alias a@example.org"), b"OK b@example.org")
        self.assertEqual(len(self.client.calls), 1)


class CountingCache(MemoryCache):
    """A memory cache that counts its writes."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock, 300.0)
        self.writes = 0

    def set(self, mapname: str, key: str, reply: bytes, ttl: float | None = None) -> None:
        self.writes += 1
        super().set(mapname, key, reply, ttl)


class CacheWriteTests(LookupTestCase):
    """One API answer is one cache write, however many lookups shared it."""

    def test_coalesced_written_once(self) -> None:
        """
        100 concurrent identical lookups store the answer once (each write is
        a Redis command), not once per waiter.
        """
        cache = CountingCache(self.clock)
        self.lookups = self.build(cache)
        ds = [self.ask(b"alias a@example.org") for _ in range(100)]
        self.client.pending.pop().callback(["b@example.org"])
        for d in ds:
            self.assertEqual(self.successResultOf(d), b"OK b@example.org")
        self.assertEqual(cache.writes, 1)

    def test_each_spelling_written(self) -> None:
        """Each spelling Postfix sent gets its own entry (the Go layout keys the raw key)."""
        cache = CountingCache(self.clock)
        self.lookups = self.build(cache)
        ds = [self.ask(b"mailbox a@example.org"), self.ask(b"mailbox A@example.org")]
        self.client.pending.pop().callback(True)
        for d in ds:
            self.successResultOf(d)
        self.assertEqual(cache.writes, 2)
        self.assertEqual(cache.peek("mailbox", "A@example.org"), b"OK 1")


class MetricsTests(LookupTestCase):
    """Request metrics by map and outcome, timed on the clock."""

    def test_duration(self) -> None:
        """The duration covers the time until the answer, on the injected clock."""
        d = self.ask(b"domain example.org")
        self.clock.advance(0.004)
        self.client.pending.pop().callback(True)
        self.successResultOf(d)
        self.assertEqual(
            self.count(
                "userli_postfix_adapter_request_duration_seconds_sum",
                handler="domain",
                status="success",
            ),
            0.004,
        )

    def test_no_key_in_labels(self) -> None:
        """No label carries the key, whatever map or outcome."""
        self.reply(b"alias secret@example.org", [])
        self.reply(b"unknown secret@example.org")
        for family in self.metrics.registry.collect():
            for sample in family.samples:
                for value in sample.labels.values():
                    self.assertNotIn("secret", value)
