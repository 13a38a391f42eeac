"""
Tests for L{userli_postfix.cache}: the memory cache (TTL, bound, LRU) on a
L{Clock}, and the Redis cache in the Go program's layout through a fake
Redis client.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from userli_postfix.cache import MemoryCache, RedisCache, cache_key
from userli_postfix.redisclient import RedisUnavailable


class MemoryCacheTests(SynchronousTestCase):
    """L{MemoryCache}: OK answers kept in this process."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.cache = MemoryCache(self.clock, 300.0, max_entries=3)

    def get(self, mapname: str, key: str) -> bytes | None:
        result: bytes | None = self.successResultOf(self.cache.get(mapname, key))
        return result

    def test_miss(self) -> None:
        """An unknown key is a miss."""
        self.assertIsNone(self.get("alias", "a@example.org"))
        self.assertIsNone(self.cache.peek("alias", "a@example.org"))

    def test_hit(self) -> None:
        """A stored answer is returned, by L{MemoryCache.get} and L{MemoryCache.peek}."""
        self.cache.set("alias", "a@example.org", b"OK b@example.org")
        self.assertEqual(self.get("alias", "a@example.org"), b"OK b@example.org")
        self.assertEqual(self.cache.peek("alias", "a@example.org"), b"OK b@example.org")

    def test_map_and_key_distinct(self) -> None:
        """The same key in two maps, or two spellings of a key, are separate entries."""
        self.cache.set("alias", "a@example.org", b"OK b@example.org")
        self.assertIsNone(self.get("mailbox", "a@example.org"))
        self.assertIsNone(self.get("alias", "A@example.org"))

    def test_ttl(self) -> None:
        """An answer lives for the TTL and not a moment longer."""
        self.cache.set("domain", "example.org", b"OK 1")
        self.clock.advance(299.999)
        self.assertEqual(self.get("domain", "example.org"), b"OK 1")
        self.clock.advance(0.001)
        self.assertIsNone(self.get("domain", "example.org"))
        self.assertEqual(len(self.cache), 0)

    def test_shorter_ttl(self) -> None:
        """A caller may ask for a shorter life than the cache's TTL, never a longer one."""
        self.cache.set("domain", "short.org", b"OK 1", ttl=10)
        self.cache.set("domain", "long.org", b"OK 1", ttl=1000)
        self.clock.advance(10)
        self.assertIsNone(self.get("domain", "short.org"))
        self.assertEqual(self.get("domain", "long.org"), b"OK 1")
        self.clock.advance(290)
        self.assertIsNone(self.get("domain", "long.org"))

    def test_overwrite_renews(self) -> None:
        """Storing a key again replaces its answer and starts its TTL afresh."""
        self.cache.set("alias", "a@example.org", b"OK old@example.org")
        self.clock.advance(200)
        self.cache.set("alias", "a@example.org", b"OK new@example.org")
        self.clock.advance(200)
        self.assertEqual(self.get("alias", "a@example.org"), b"OK new@example.org")
        self.assertEqual(len(self.cache), 1)

    def test_zero_ttl(self) -> None:
        """With a TTL of 0 nothing is kept."""
        cache = MemoryCache(self.clock, 0.0)
        cache.set("domain", "example.org", b"OK 1")
        self.assertIsNone(cache.peek("domain", "example.org"))
        self.assertEqual(len(cache), 0)

    def test_bound(self) -> None:
        """Beyond its bound the cache drops the least recently stored entry."""
        for i in range(4):
            self.cache.set("domain", f"d{i}.org", b"OK 1")
        self.assertEqual(len(self.cache), 3)
        self.assertIsNone(self.get("domain", "d0.org"))
        for i in range(1, 4):
            self.assertEqual(self.get("domain", f"d{i}.org"), b"OK 1")

    def test_lru(self) -> None:
        """A read keeps an entry: the least recently used one goes first."""
        for i in range(3):
            self.cache.set("domain", f"d{i}.org", b"OK 1")
        self.get("domain", "d0.org")
        self.cache.set("domain", "d3.org", b"OK 1")
        self.assertEqual(self.get("domain", "d0.org"), b"OK 1")
        self.assertIsNone(self.get("domain", "d1.org"))

    def test_default_bound(self) -> None:
        """The default bound is large enough for a big installation."""
        cache = MemoryCache(self.clock, 300.0)
        for i in range(1000):
            cache.set("alias", f"a{i}@example.org", b"OK x@example.org")
        self.assertEqual(len(cache), 1000)


class FakeRedis:
    """Records commands; each answers with a Deferred the test controls."""

    def __init__(self) -> None:
        self.commands: list[tuple[Any, ...]] = []
        self.answers: list[defer.Deferred[Any]] = []

    def execute(self, *command: Any) -> defer.Deferred[Any]:
        self.commands.append(command)
        d: defer.Deferred[Any] = defer.Deferred()
        self.answers.append(d)
        return d


class RedisCacheTests(SynchronousTestCase):
    """L{RedisCache}: the Go program's layout, so both can share one Redis."""

    def setUp(self) -> None:
        self.redis = FakeRedis()
        self.cache = RedisCache(self.redis, 300.0)  # type: ignore[arg-type]

    def get(self, mapname: str, key: str) -> defer.Deferred[bytes | None]:
        """One lookup's read, as the near-cache makes it (alone in its batch)."""
        return self.cache.getMany([(mapname, key)]).addCallback(lambda replies: replies[0])

    def test_key_layout(self) -> None:
        """Keys are C{userli:lookup:<map>:<key>}, with the key exactly as Postfix sent it."""
        self.assertEqual(
            cache_key("alias", "User+Tag@Example.org"), "userli:lookup:alias:User+Tag@Example.org"
        )
        self.assertEqual(cache_key("domain", "example.org"), "userli:lookup:domain:example.org")

    def test_get(self) -> None:
        """A lookup is one GET of the Go key; the stored text is the reply."""
        d = self.get("mailbox", "a@example.org")
        self.assertEqual(self.redis.commands, [("GET", "userli:lookup:mailbox:a@example.org")])
        self.redis.answers[0].callback("OK 1")
        self.assertEqual(self.successResultOf(d), b"OK 1")

    def test_get_bytes(self) -> None:
        """A reply delivered as bytes is used as it is."""
        d = self.get("alias", "a@example.org")
        self.redis.answers[0].callback(b"OK b@example.org")
        self.assertEqual(self.successResultOf(d), b"OK b@example.org")

    def test_get_non_ascii(self) -> None:
        """A cached reply with non-ASCII text comes back as its UTF-8 bytes."""
        d = self.get("alias", "a@bücher.de")
        self.assertEqual(self.redis.commands, [("GET", "userli:lookup:alias:a@bücher.de")])
        self.redis.answers[0].callback("OK b@bücher.de")
        self.assertEqual(self.successResultOf(d), "OK b@bücher.de".encode())

    def test_miss(self) -> None:
        """A missing key (nil) is a miss."""
        d = self.get("alias", "a@example.org")
        self.redis.answers[0].callback(None)
        self.assertIsNone(self.successResultOf(d))

    def test_unexpected_type(self) -> None:
        """Anything but a string under the key (a number, a list) is a miss, not a reply."""
        for value in [1, [b"OK 1"]]:
            d = self.get("alias", "a@example.org")
            self.redis.answers[-1].callback(value)
            self.assertIsNone(self.successResultOf(d))

    def test_get_error(self) -> None:
        """
        An unreachable Redis fails the read, so the caller can count the error
        and treat it as a miss.
        """
        d = self.get("alias", "a@example.org")
        self.redis.answers[0].errback(RedisUnavailable("not connected"))
        self.failureResultOf(d, RedisUnavailable)

    def test_set(self) -> None:
        """An answer is stored as its reply text with the TTL in whole seconds."""
        self.cache.set("alias", "a@example.org", b"OK b@example.org,c@example.org")
        self.assertEqual(
            self.redis.commands,
            [
                (
                    "SET",
                    "userli:lookup:alias:a@example.org",
                    "OK b@example.org,c@example.org",
                    "EX",
                    300,
                )
            ],
        )

    def test_set_fractional_ttl(self) -> None:
        """A TTL that is not whole seconds is sent in milliseconds, as go-redis does."""
        RedisCache(self.redis, 1.5).set("domain", "example.org", b"OK 1")  # type: ignore[arg-type]
        RedisCache(self.redis, 0.0001).set("domain", "example.org", b"OK 1")  # type: ignore[arg-type]
        self.assertEqual(
            [command[3:] for command in self.redis.commands], [("PX", 1500), ("PX", 1)]
        )

    def test_set_error_swallowed(self) -> None:
        """A failed write is consumed: the next lookup just asks the API again."""
        self.cache.set("domain", "example.org", b"OK 1")
        write = self.redis.answers[0]
        write.errback(RedisUnavailable("no reply within 0.5 s"))
        self.assertIsNone(self.successResultOf(write))
