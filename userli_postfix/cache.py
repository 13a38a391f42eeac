"""
Caches of OK lookup answers: none, in memory, in Redis, or in Redis with a
small near-cache in this process in front of it.

Only OK answers are cached, so a new mailbox or alias works at once and an
outage never turns into a cached "not found".  The Redis layout is the Go
program's (key ``userli:lookup:<map>:<key>``, value the reply text, TTL
``LOOKUP_CACHE_TTL``), so both programs can share one Redis during a switch.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from userli_postfix.redis import RedisClient

# Enough for every address of a large installation several times over, at
# roughly 200 bytes an entry.
MEMORY_CACHE_ENTRIES = 100_000

# The near-cache only has to hold the keys that are hot right now (the
# domains, the big aliases, the busiest mailboxes): a few MB at most.
NEAR_CACHE_ENTRIES = 20_000

# How long an answer is served from the near-cache before Redis is asked
# again.  Short, so that an operator who deletes a key in Redis (to drop a
# removed alias at once) waits at most this long; long enough that a hot key
# costs one Redis round trip every few seconds instead of one per lookup.
NEAR_CACHE_TTL = 5.0


def cache_key(mapname: str, key: str) -> str:
    """The Go program's Redis key for a cached answer."""
    return f"userli:lookup:{mapname}:{key}"


class LookupCache(Protocol):
    """
    Where OK answers are kept.  C{get} fires with the reply or C{None}, or
    fails when the backend is unreachable (the caller counts that and treats
    it as a miss); C{set} never fails.  C{peek} answers at once from what
    this process holds (C{None} when it would have to ask elsewhere), so a
    hot key costs no Deferred and no round trip.
    """

    def peek(self, mapname: str, key: str) -> bytes | None: ...

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


def _decode(value: object) -> bytes | None:
    """A Redis string reply as bytes; anything else is no answer."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    return None


class RedisCache:
    """OK answers in Redis, in the Go program's layout."""

    def __init__(self, redis: RedisClient, ttl: float) -> None:
        self._redis = redis
        self._ttl = ttl

    def peek(self, mapname: str, key: str) -> bytes | None:
        """Nothing is held in this process: always ask Redis."""
        return None

    def get(self, mapname: str, key: str) -> defer.Deferred[bytes | None]:
        return self._redis.execute("GET", cache_key(mapname, key)).addCallback(_decode)

    def getWithLifetime(
        self, mapname: str, key: str
    ) -> defer.Deferred[tuple[bytes | None, float | None]]:
        """
        The reply and how many seconds Redis keeps it (C{None}: no expiry;
        C{0} when C{PTTL} failed, so that nothing is copied on a guess).

        C{PTTL} is asked only after a hit: a miss, the common case for a
        key not in the near-cache, then costs one command, as before.
        """
        name = cache_key(mapname, key)

        def lifetime(reply: bytes | None) -> Any:
            if reply is None:
                return (None, None)

            def remaining(value: object) -> tuple[bytes | None, float | None]:
                if isinstance(value, int) and not isinstance(value, bool):
                    # -1: no expiry; -2: gone already (expired just now).
                    return (reply, None if value == -1 else max(value, 0) / 1000.0)
                return (reply, 0.0)

            return self._redis.execute("PTTL", name).addCallbacks(
                remaining, lambda failure: (reply, 0.0)
            )

        return self._redis.execute("GET", name).addCallback(_decode).addCallback(lifetime)

    def set(self, mapname: str, key: str, reply: bytes) -> None:
        # go-redis sends EX for whole seconds and PX otherwise; so do we.
        if self._ttl == int(self._ttl):
            expiry = ("EX", int(self._ttl))
        else:
            expiry = ("PX", max(1, int(self._ttl * 1000)))
        d = self._redis.execute("SET", cache_key(mapname, key), reply.decode("utf-8"), *expiry)
        # A failed write only means the next lookup asks the API again.
        d.addErrback(lambda failure: None)


class NearCache:
    """
    A small in-process cache of OK answers in front of L{RedisCache}, so a
    hot key costs no Redis round trip.

    Its entries never outlive the Redis entry they copy: an answer written
    by this process is kept for M{min(near_ttl, ttl)} from the moment it is
    sent to Redis (which keeps it for C{ttl} from a moment later); an answer
    read from Redis is kept for at most what C{PTTL} said was left, counted
    from before the question was sent.  So an answer served from here is
    always one Redis would still serve, and Redis stays the one shared cache
    of every process and of the Go program.
    """

    def __init__(
        self,
        backend: RedisCache,
        clock: IReactorTime,
        ttl: float,
        near_ttl: float = NEAR_CACHE_TTL,
        max_entries: int = NEAR_CACHE_ENTRIES,
    ) -> None:
        self._backend = backend
        self._clock = clock
        self._near = MemoryCache(clock, min(near_ttl, ttl), max_entries)

    def __len__(self) -> int:
        return len(self._near)

    def peek(self, mapname: str, key: str) -> bytes | None:
        return self._near.peek(mapname, key)

    def get(self, mapname: str, key: str) -> defer.Deferred[bytes | None]:
        reply = self._near.peek(mapname, key)
        if reply is not None:
            return defer.succeed(reply)
        asked = self._clock.seconds()

        def keep(answer: tuple[bytes | None, float | None]) -> bytes | None:
            reply, remaining = answer
            if reply is not None:
                lifetime = self._near_lifetime(remaining, asked)
                if lifetime > 0:
                    # MemoryCache caps this at min(near_ttl, ttl) from now.
                    self._near.set(mapname, key, reply, ttl=lifetime)
            return reply

        return self._backend.getWithLifetime(mapname, key).addCallback(keep)

    def _near_lifetime(self, remaining: float | None, asked: float) -> float:
        if remaining is None:
            return float("inf")
        # Redis measured what was left at some moment after we asked; count
        # it from the asking, so the copy expires no later than the original.
        return remaining - (self._clock.seconds() - asked)

    def set(self, mapname: str, key: str, reply: bytes) -> None:
        self._near.set(mapname, key, reply)
        self._backend.set(mapname, key, reply)
