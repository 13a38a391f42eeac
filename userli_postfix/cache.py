"""
Caches of OK lookup answers: none, in memory, or in Redis.

Only OK answers are cached, so a new mailbox or alias works at once and an
outage never turns into a cached "not found".  The Redis layout is the Go
program's (key ``userli:lookup:<map>:<key>``, value the reply text, TTL
``LOOKUP_CACHE_TTL``), so both programs can share one Redis during a switch.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from userli_postfix.redis import RedisClient

# Enough for every address of a large installation several times over, at
# roughly 200 bytes an entry.
MEMORY_CACHE_ENTRIES = 100_000


def cache_key(mapname: str, key: str) -> str:
    """The Go program's Redis key for a cached answer."""
    return f"userli:lookup:{mapname}:{key}"


class LookupCache(Protocol):
    """
    Where OK answers are kept.  C{get} fires with the reply or C{None}, or
    fails when the backend is unreachable (the caller counts that and treats
    it as a miss); C{set} never fails.
    """

    def get(self, mapname: str, key: str) -> defer.Deferred[bytes | None]: ...

    def set(self, mapname: str, key: str, reply: bytes) -> None: ...


class MemoryCache:
    """A bounded, least-recently-used cache with a TTL, in this process."""

    def __init__(
        self, clock: IReactorTime, ttl: float, max_entries: int = MEMORY_CACHE_ENTRIES
    ) -> None:
        self._clock = clock
        self._ttl = ttl
        self._max = max_entries
        self._entries: OrderedDict[tuple[str, str], tuple[float, bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def peek(self, mapname: str, key: str) -> bytes | None:
        """The cached reply, without a Deferred (for callers on the hot path)."""
        item = (mapname, key)
        entry = self._entries.get(item)
        if entry is None:
            return None
        if entry[0] <= self._clock.seconds():
            del self._entries[item]
            return None
        self._entries.move_to_end(item)
        return entry[1]

    def get(self, mapname: str, key: str) -> defer.Deferred[bytes | None]:
        return defer.succeed(self.peek(mapname, key))

    def set(self, mapname: str, key: str, reply: bytes, ttl: float | None = None) -> None:
        lifetime = self._ttl if ttl is None else min(ttl, self._ttl)
        if lifetime <= 0:
            return
        item = (mapname, key)
        self._entries[item] = (self._clock.seconds() + lifetime, reply)
        self._entries.move_to_end(item)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)


class RedisCache:
    """OK answers in Redis, in the Go program's layout."""

    def __init__(self, redis: RedisClient, ttl: float) -> None:
        self._redis = redis
        self._ttl = ttl

    def get(self, mapname: str, key: str) -> defer.Deferred[bytes | None]:
        def decode(value: object) -> bytes | None:
            if isinstance(value, bytes):
                return value
            if isinstance(value, str):
                return value.encode("utf-8")
            return None

        return self._redis.execute("GET", cache_key(mapname, key)).addCallback(decode)

    def set(self, mapname: str, key: str, reply: bytes) -> None:
        # go-redis sends EX for whole seconds and PX otherwise; so do we.
        if self._ttl == int(self._ttl):
            expiry = ("EX", int(self._ttl))
        else:
            expiry = ("PX", max(1, int(self._ttl * 1000)))
        d = self._redis.execute("SET", cache_key(mapname, key), reply.decode("utf-8"), *expiry)
        # A failed write only means the next lookup asks the API again.
        d.addErrback(lambda failure: None)
