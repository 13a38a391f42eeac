"""
Tests for L{userli_postfix.remotedomains}, the memory of the domains Userli does
not host, and for how the lookups and the quota policy use it: once Userli
answered ``domain X`` with ``false``, every question about X is answered
without a call for the TTL, and nothing but such an answer is remembered.

The fake Userli (in memory, through the real client and C{StubTreq}) counts
what reaches it; Redis is the fake of the near-cache tests.
"""

from __future__ import annotations

from typing import Any

from treq.testing import StubTreq
from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from tests.fake_userli import (
    EMPTY,
    ERROR,
    GARBAGE,
    NORMAL,
    SLOW,
    TOKEN,
    WRONG_TYPE,
    FakeUserli,
    FakeUserliResource,
    UserliData,
)
from tests.test_nearcache import FakeRedis
from userli_postfix.breaker import FAILURES_TO_OPEN
from userli_postfix.cache import MemoryCache, NearCache, RedisCache, cache_key
from userli_postfix.lookups import Lookups
from userli_postfix.metrics import Metrics
from userli_postfix.policy import DUNNO, END_OF_MESSAGE, PolicyRequest, QuotaPolicy
from userli_postfix.ratelimit import MemoryRateLimiter
from userli_postfix.remotedomains import REMEMBERED, REMOTE_MAP, RemoteDomains, domain_of
from userli_postfix.userli import UserliClient

BASE = "http://userli.test"
LOCAL = "example.org"
REMOTE = "remote.test"
TTL = 60.0
LOOKUP_TTL = 300.0

# Every map's question about the remote domain, as Postfix asks them.
REMOTE_QUESTIONS = [
    b"domain remote.test",
    b"alias someone@remote.test",
    b"mailbox someone@remote.test",
    b"senders someone@remote.test",
    # Spellings that normalise into the domain.
    b"alias Some.One+tag@Remote.TEST.",
    b"domain REMOTE.test.",
]


def userli_data() -> UserliData:
    return UserliData(
        users={f"alice@{LOCAL}": "pw", f"limited@{LOCAL}": "pw"},
        aliases={f"info@{LOCAL}": [f"alice@{LOCAL}"]},
        domains={LOCAL},
        quotas={f"limited@{LOCAL}": (3, 10)},
    )


class DomainOfTests(SynchronousTestCase):
    """The domain a key is about."""

    def test_table(self) -> None:
        """A domain key is itself; an address's domain follows its last C{@}."""
        for mapname, key, domain in [
            ("domain", "remote.test", "remote.test"),
            ("alias", "a@remote.test", "remote.test"),
            ("senders", "a@b@remote.test", "remote.test"),
            ("mailbox", "no-at-sign", "no-at-sign"),
        ]:
            self.assertEqual(domain_of(mapname, key), domain, (mapname, key))


class UserliTestCase(SynchronousTestCase):
    """The real client against the fake Userli in memory, on a fake clock."""

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        self.metrics = Metrics(process=False)
        self.userli = FakeUserli(userli_data())
        self.stub = StubTreq(FakeUserliResource(self.userli, self.clock))
        self.client = UserliClient(self.stub.request, BASE, TOKEN, self.clock, self.metrics)

    def calls(self, endpoint: str | None = None) -> int:
        """API requests the fake Userli received."""
        return len(self.userli.requests(endpoint))

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(f"userli_postfix_adapter_{name}", labels)
        return value or 0.0


class MemoryLookupTests(UserliTestCase):
    """Without Redis: the memory is in the process."""

    def setUp(self) -> None:
        super().setUp()
        self.store = MemoryCache(self.clock, TTL)
        self.remote = RemoteDomains(self.store, TTL, complete=True)
        self.lookups = self.build(self.remote)

    def build(self, remote: RemoteDomains | None) -> Lookups:
        cache = MemoryCache(self.clock, LOOKUP_TTL)
        return Lookups(self.client, cache, self.metrics, self.clock, "+", remote)

    def ask(self, request: bytes) -> bytes:
        d = defer.maybeDeferred(self.lookups.answer, request)
        self.stub.flush()
        result: bytes = self.successResultOf(d)
        return result

    def test_no_calls_while_remembered(self) -> None:
        """
        After C{domain remote.test} is C{NOTFOUND}, every map's question
        about the domain gets the answer it got from Userli, without a call.
        """
        before = [self.ask(q) for q in REMOTE_QUESTIONS[1:4]]
        self.assertEqual(before, [b"NOTFOUND "] * 3)
        self.assertEqual(self.ask(b"domain remote.test"), b"NOTFOUND ")
        calls = self.calls()
        for _ in range(3):
            for question in REMOTE_QUESTIONS:
                self.assertEqual(self.ask(question), b"NOTFOUND ", question)
        self.assertEqual(self.calls(), calls)
        self.assertEqual(
            self.sample("remote_domain_answers_total", handler="alias"),
            6,
        )
        self.assertEqual(self.sample("remote_domain_answers_total", handler="domain"), 6)
        self.assertEqual(
            self.sample("requests_total", handler="senders", status="notfound"),
            4,
        )

    def test_hot_key_costs_nothing_more(self) -> None:
        """
        A held answer of a hosted domain is served before the memory is
        consulted: a hot key costs what it cost without the memory.
        """
        self.ask(b"alias info@example.org")
        peeks: list[tuple[str, str]] = []
        peek = self.store.peek

        def counted(mapname: str, key: str) -> bytes | None:
            peeks.append((mapname, key))
            return peek(mapname, key)

        self.patch(self.store, "peek", counted)
        self.assertEqual(self.lookups.answer(b"alias info@example.org"), b"OK alice@example.org")
        self.assertEqual(peeks, [])
        self.assertEqual(self.ask(b"alias other@example.org"), b"NOTFOUND ")
        self.assertNotEqual(peeks, [])

    def test_asked_again_after_ttl(self) -> None:
        """Once the TTL has passed, Userli is asked again (and the answer remembered anew)."""
        self.ask(b"domain remote.test")
        self.clock.advance(TTL - 1)
        self.ask(b"alias a@remote.test")
        self.assertEqual(self.calls("alias"), 0)
        self.clock.advance(1)
        self.assertEqual(self.ask(b"alias a@remote.test"), b"NOTFOUND ")
        self.assertEqual(self.calls("alias"), 1)
        self.assertEqual(self.ask(b"domain remote.test"), b"NOTFOUND ")
        self.assertEqual(self.calls("domain"), 2)
        self.ask(b"alias a@remote.test")
        self.assertEqual(self.calls("alias"), 1)

    def test_domain_added_in_userli(self) -> None:
        """A domain Userli starts hosting is C{OK} once the TTL has passed."""
        self.ask(b"domain remote.test")
        self.userli.data.domains.add(REMOTE)
        self.assertEqual(self.ask(b"domain remote.test"), b"NOTFOUND ")
        self.clock.advance(TTL)
        self.assertEqual(self.ask(b"domain remote.test"), b"OK 1")

    def test_hosted_domain_not_remembered(self) -> None:
        """C{OK} is not "not ours": keys of a hosted domain are asked as before."""
        self.assertEqual(self.ask(b"domain example.org"), b"OK 1")
        self.assertEqual(self.ask(b"alias info@example.org"), b"OK alice@example.org")
        self.assertEqual(self.ask(b"mailbox nobody@example.org"), b"NOTFOUND ")
        self.assertEqual(self.ask(b"mailbox nobody@example.org"), b"NOTFOUND ")
        self.assertEqual(self.calls("mailbox"), 2)
        self.assertEqual(len(self.store), 0)

    def test_other_domains_asked(self) -> None:
        """Only the domain Userli answered about is remembered, not its sub- or parent domains."""
        self.ask(b"domain remote.test")
        self.ask(b"alias a@sub.remote.test")
        self.ask(b"alias a@test")
        self.assertEqual(self.calls("alias"), 2)

    def test_invalid_key_not_remembered(self) -> None:
        """A domain key that is no domain is answered without asking, and remembers nothing."""
        self.assertEqual(self.ask(b"domain remote..test"), b"NOTFOUND ")
        self.assertEqual(self.calls(), 0)
        self.assertEqual(len(self.store), 0)

    def test_off(self) -> None:
        """Without the memory (TTL 0) every question asks Userli, as the Go program does."""
        self.lookups = self.build(None)
        self.ask(b"domain remote.test")
        self.ask(b"domain remote.test")
        self.ask(b"alias a@remote.test")
        self.assertEqual(self.calls(), 3)

    def test_shared_call_remembered_once(self) -> None:
        """Concurrent questions about the domain share one call and one write."""
        self.userli.set_mode(SLOW, 0.5)
        ds = [defer.maybeDeferred(self.lookups.answer, b"domain remote.test") for _ in range(5)]
        self.stub.flush()
        self.clock.advance(0.5)
        self.stub.flush()
        self.assertEqual([self.successResultOf(d) for d in ds], [b"NOTFOUND "] * 5)
        self.assertEqual(self.calls("domain"), 1)
        self.assertEqual(len(self.store), 1)


class FailureNotRememberedTests(UserliTestCase):
    """Only a real "not ours" is remembered: never a failed call."""

    def setUp(self) -> None:
        super().setUp()
        self.store = MemoryCache(self.clock, TTL)
        self.remote = RemoteDomains(self.store, TTL, complete=True)
        self.lookups = Lookups(self.client, None, self.metrics, self.clock, "", self.remote)

    def answer(self) -> defer.Deferred[Any]:
        d = defer.maybeDeferred(self.lookups.answer, b"domain remote.test")
        self.stub.flush()
        return d

    def assertNotRemembered(self) -> None:
        self.assertEqual(len(self.store), 0)
        self.userli.set_mode(NORMAL)
        before = self.calls("alias")
        d = defer.maybeDeferred(self.lookups.answer, b"alias a@remote.test")
        self.stub.flush()
        self.assertEqual(self.successResultOf(d), b"NOTFOUND ")
        self.assertEqual(self.calls("alias"), before + 1)

    def test_failed_answers(self) -> None:
        """A 500, an HTML page, the wrong JSON type and an empty body remember nothing."""
        for mode in (ERROR, GARBAGE, WRONG_TYPE, EMPTY):
            self.userli.set_mode(mode)
            self.assertTrue(self.successResultOf(self.answer()).startswith(b"TEMP "), mode)
            self.assertNotRemembered()
        self.flushLoggedErrors()

    def test_timeout(self) -> None:
        """A call that times out remembers nothing."""
        self.userli.set_mode(SLOW, 30.0)
        d = self.answer()
        self.clock.advance(5)
        self.assertTrue(self.successResultOf(d).startswith(b"TEMP "))
        self.assertNotRemembered()

    def test_circuit_open(self) -> None:
        """While the circuit breaker fails calls fast, nothing is remembered either."""
        self.userli.set_mode(SLOW, 30.0)
        for _ in range(FAILURES_TO_OPEN):
            d = self.answer()
            self.clock.advance(5)
            self.successResultOf(d)
        self.assertTrue(self.client.breaker.isOpen)
        d = self.answer()
        self.assertTrue(self.successResultOf(d).startswith(b"TEMP "))
        self.assertEqual(len(self.store), 0)


class RedisLookupTests(UserliTestCase):
    """
    With Redis: the memory shares the lookup cache's store (the near-cache
    in front of Redis), under C{userli:lookup:remote:<domain>}.
    """

    def setUp(self) -> None:
        super().setUp()
        self.redis = FakeRedis(self.clock)
        self.lookups, self.near = self.process()

    def process(self) -> tuple[Lookups, NearCache]:
        """One daemon process's lookups over the shared (fake) Redis."""
        near = NearCache(RedisCache(self.redis, LOOKUP_TTL), self.clock, LOOKUP_TTL)  # type: ignore[arg-type]
        near.trackingStarted()
        remote = RemoteDomains(near, TTL, complete=False)
        return Lookups(self.client, near, self.metrics, self.clock, "+", remote), near

    def ask(self, request: bytes, lookups: Lookups | None = None) -> bytes:
        d = defer.maybeDeferred((lookups or self.lookups).answer, request)
        for _ in range(3):
            # Batched Redis reads and writes, then the API call.
            self.clock.advance(0)
            self.stub.flush()
        result: bytes = self.successResultOf(d)
        return result

    def test_written_under_own_key(self) -> None:
        """
        The memory is C{userli:lookup:remote:<domain>} with the TTL; the Go
        program's C{userli:lookup:domain:<domain>} is never written for it.
        """
        self.ask(b"domain Remote.Test")
        self.assertEqual(set(self.redis.data), {cache_key(REMOTE_MAP, REMOTE)})
        value, expires = self.redis.data[cache_key(REMOTE_MAP, REMOTE)]
        self.assertEqual(value, REMEMBERED.decode())
        self.assertEqual(expires, self.clock.seconds() + TTL)
        self.assertIn(
            ("SET", "userli:lookup:remote:remote.test", "NOTFOUND", "EX", 60), self.redis.commands
        )

    def test_own_ttl_beside_lookup_ttl(self) -> None:
        """Written in one turn, the memory and a cached answer keep their own lifetimes."""
        first = defer.maybeDeferred(self.lookups.answer, b"domain remote.test")
        second = defer.maybeDeferred(self.lookups.answer, b"domain example.org")
        for _ in range(3):
            self.clock.advance(0)
            self.stub.flush()
        self.assertEqual(self.successResultOf(first), b"NOTFOUND ")
        self.assertEqual(self.successResultOf(second), b"OK 1")
        now = self.clock.seconds()
        self.assertEqual(self.redis.data[cache_key(REMOTE_MAP, REMOTE)][1], now + TTL)
        self.assertEqual(self.redis.data[cache_key("domain", LOCAL)][1], now + LOOKUP_TTL)

    def test_hot_and_without_redis_command(self) -> None:
        """Once remembered, the process answers at once: no Deferred, no Redis command, no call."""
        self.ask(b"domain remote.test")
        self.redis.commands.clear()
        calls = self.calls()
        for question in REMOTE_QUESTIONS:
            self.assertEqual(self.lookups.answer(question), b"NOTFOUND ", question)
        self.clock.advance(0)
        self.assertEqual(self.redis.commands, [])
        self.assertEqual(self.calls(), calls)

    def test_other_process_uses_it(self) -> None:
        """What one process learned, another (on the same Redis) uses without a call."""
        self.ask(b"domain remote.test")
        other, _ = self.process()
        calls = self.calls()
        for question in REMOTE_QUESTIONS:
            self.assertEqual(self.ask(question, other), b"NOTFOUND ", question)
        self.assertEqual(self.calls(), calls)

    def test_one_redis_read_for_both(self) -> None:
        """
        A key neither held nor known to be local costs one Redis read for
        the memory and the cached answer together, as one read did before.
        """
        self.redis.put(cache_key("alias", "info@example.org"), "OK alice@example.org", 300)
        self.assertEqual(self.ask(b"alias info@example.org"), b"OK alice@example.org")
        reads = [c for c in self.redis.commands if c[0] in ("GET", "MGET")]
        self.assertEqual(
            reads,
            [("MGET", "userli:lookup:alias:info@example.org", "userli:lookup:remote:example.org")],
        )
        self.assertEqual(self.calls(), 0)

    def test_hosted_domain_held_skips_the_read(self) -> None:
        """
        While the process holds C{domain X} as C{OK 1}, X is known not to
        be remote: a lookup in X reads only its own cached answer.
        """
        self.ask(b"domain example.org")
        self.redis.commands.clear()
        self.ask(b"mailbox alice@example.org")
        reads = [c for c in self.redis.commands if c[0] in ("GET", "MGET")]
        self.assertEqual(reads, [("GET", "userli:lookup:mailbox:alice@example.org")])

    def test_hot_local_key_unchanged(self) -> None:
        """A held answer in a hosted domain still costs no Redis command and no call."""
        self.ask(b"alias info@example.org")
        self.redis.commands.clear()
        self.assertEqual(self.lookups.answer(b"alias info@example.org"), b"OK alice@example.org")
        self.clock.advance(0)
        self.assertEqual(self.redis.commands, [])
        self.assertEqual(self.calls("alias"), 1)

    def test_removed_in_redis(self) -> None:
        """
        When anyone removes the entry in Redis (reported by client tracking),
        the next question asks Userli.
        """
        self.ask(b"domain remote.test")
        name = cache_key(REMOTE_MAP, REMOTE)
        del self.redis.data[name]
        self.near.invalidated([name])
        self.userli.data.domains.add(REMOTE)
        self.assertEqual(self.ask(b"domain remote.test"), b"OK 1")
        self.assertEqual(self.calls("domain"), 2)

    def test_expires_with_redis(self) -> None:
        """The held copy goes with the Redis entry: after the TTL, Userli is asked."""
        self.ask(b"domain remote.test")
        self.clock.advance(TTL)
        self.ask(b"alias a@remote.test")
        self.assertEqual(self.calls("alias"), 1)

    def test_redis_error_is_not_remembered(self) -> None:
        """A Redis error reading the memory means "not remembered": Userli answers."""
        self.redis.put(cache_key(REMOTE_MAP, REMOTE), "NOTFOUND", TTL)
        self.redis.failing.add("MGET")
        self.assertEqual(self.ask(b"alias a@remote.test"), b"NOTFOUND ")
        self.assertEqual(self.calls("alias"), 1)
        self.assertEqual(self.ask(b"alias info@example.org"), b"OK alice@example.org")

    def test_memory_off_with_cache(self) -> None:
        """TTL 0 with Redis: no entry of the memory is read or written."""
        near = NearCache(RedisCache(self.redis, LOOKUP_TTL), self.clock, LOOKUP_TTL)  # type: ignore[arg-type]
        lookups = Lookups(self.client, near, self.metrics, self.clock, "+")
        self.ask(b"domain remote.test", lookups)
        self.ask(b"alias a@remote.test", lookups)
        self.assertEqual(self.calls(), 2)
        self.assertNotIn("userli:lookup:remote:", " ".join(str(c) for c in self.redis.commands))


class PolicyTests(UserliTestCase):
    """A sender in a remembered domain has no quota: C{DUNNO} without a call."""

    def setUp(self) -> None:
        super().setUp()
        self.store = MemoryCache(self.clock, TTL)
        self.remote = RemoteDomains(self.store, TTL, complete=True)
        self.policy = self.build(self.remote)
        self.lookups = Lookups(self.client, None, self.metrics, self.clock, "+", self.remote)

    def build(self, remote: RemoteDomains | None) -> QuotaPolicy:
        return QuotaPolicy(
            self.client,
            MemoryRateLimiter(self.clock),
            self.clock,
            self.metrics,
            delimiter="+",
            remote=remote,
        )

    def decide(self, sender: str, policy: QuotaPolicy | None = None) -> str:
        request = PolicyRequest(protocol_state=END_OF_MESSAGE, sender=sender)
        result = (policy or self.policy).decide(request)
        for _ in range(3):
            self.clock.advance(0)
            self.stub.flush()
        if isinstance(result, str):
            return result
        action: str = self.successResultOf(result)
        return action

    def learn(self) -> None:
        d = defer.maybeDeferred(self.lookups.answer, b"domain remote.test")
        self.stub.flush()
        self.assertEqual(self.successResultOf(d), b"NOTFOUND ")

    def test_same_answer_without_call(self) -> None:
        """
        Before: Userli is asked (404) and the answer is C{DUNNO}; once the
        domain is remembered, the same C{DUNNO}, counted the same, without a
        call; after the TTL Userli is asked again.
        """
        self.assertEqual(self.decide("stranger@remote.test"), DUNNO)
        self.assertEqual(self.calls("smtp_quota"), 1)
        self.learn()
        self.assertEqual(self.decide("stranger@remote.test"), DUNNO)
        self.assertEqual(self.decide("Other+x@Remote.Test"), DUNNO)
        self.assertEqual(self.calls("smtp_quota"), 1)
        self.assertEqual(self.sample("policy_requests_total", stage="check", action="dunno"), 3)
        self.assertEqual(self.sample("remote_domain_answers_total", handler="policy"), 2)
        self.clock.advance(TTL)
        self.assertEqual(self.decide("stranger@remote.test"), DUNNO)
        self.assertEqual(self.calls("smtp_quota"), 2)

    def test_local_sender_still_limited(self) -> None:
        """A sender of a hosted domain is counted as before."""
        self.learn()
        answers = [self.decide(f"limited@{LOCAL}") for _ in range(4)]
        self.assertEqual(answers[:3], [DUNNO] * 3)
        self.assertTrue(answers[3].startswith("REJECT"))
        self.assertEqual(self.calls("smtp_quota"), 4)

    def test_redis_backed(self) -> None:
        """
        With Redis, a memory learned by another process is read from Redis;
        a Redis error reading it asks Userli as before.
        """
        redis = FakeRedis(self.clock)
        redis.put(cache_key(REMOTE_MAP, REMOTE), "NOTFOUND", TTL)
        near = NearCache(RedisCache(redis, LOOKUP_TTL), self.clock, LOOKUP_TTL)  # type: ignore[arg-type]
        near.trackingStarted()
        policy = self.build(RemoteDomains(near, TTL, complete=False))
        self.assertEqual(self.decide("stranger@remote.test", policy), DUNNO)
        self.assertEqual(self.calls("smtp_quota"), 0)
        redis.down = True
        near.trackingLost("test")
        self.assertEqual(self.decide("stranger@remote.test", policy), DUNNO)
        self.assertEqual(self.calls("smtp_quota"), 1)
        self.assertEqual(self.decide(f"limited@{LOCAL}", policy), DUNNO)
        self.assertEqual(self.calls("smtp_quota"), 2)


class KnownTests(SynchronousTestCase):
    """L{RemoteDomains.known}: what the process can say without asking."""

    def test_memory_is_complete(self) -> None:
        """In memory, absent means not remembered."""
        clock = task.Clock()
        remote = RemoteDomains(MemoryCache(clock, TTL), TTL, complete=True)
        self.assertIs(remote.known(REMOTE), False)
        remote.remember(REMOTE)
        self.assertIs(remote.known(REMOTE), True)
        self.assertTrue(remote.held(REMOTE))

    def test_near_cache(self) -> None:
        """In front of Redis, absent is unknown, unless the domain is held as hosted."""
        clock = task.Clock()
        near = NearCache(RedisCache(FakeRedis(clock), LOOKUP_TTL), clock, LOOKUP_TTL)  # type: ignore[arg-type]
        near.trackingStarted()
        remote = RemoteDomains(near, TTL, complete=False)
        self.assertIsNone(remote.known(REMOTE))
        near.set("domain", LOCAL, b"OK 1")
        self.assertIs(remote.known(LOCAL), False)
        remote.remember(REMOTE)
        self.assertIs(remote.known(REMOTE), True)
