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
from typing import Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from userli_postfix.redis import RedisClient, RedisUnavailable

# Enough for every address of a large installation several times over, at
# roughly 200 bytes an entry.
MEMORY_CACHE_ENTRIES = 100_000

# The near-cache only has to hold the keys that are hot right now (the
# domains, the big aliases, the busiest mailboxes): a few MB at most.
NEAR_CACHE_ENTRIES = 5_000

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


# SET KEYS[i] ARGV[i] <unit> <amount> for every key: the writes of one
# reactor turn in one command.
SET_MANY_SCRIPT = """
local n = #KEYS
for i, key in ipairs(KEYS) do
  redis.call('SET', key, ARGV[i], ARGV[n + 1], ARGV[n + 2])
end
return n
"""


# The remaining lifetime of an entry, but only while it still holds the value
# we copy: read atomically, so an entry that expired and was written anew
# (by another process or the Go program) between our read and this question
# is never copied with the new entry's lifetime.
LIFETIME_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return -2
end
return redis.call('PTTL', KEYS[1])
"""


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

    def getMany(self, items: list[tuple[str, str]]) -> defer.Deferred[list[bytes | None]]:
        """
        The replies for several (map, key) pairs in one command (C{MGET});
        a single pair is a plain C{GET}.
        """
        names = [cache_key(mapname, key) for mapname, key in items]
        if len(names) == 1:
            return self._redis.execute("GET", names[0]).addCallback(lambda value: [_decode(value)])

        def decode(values: object) -> list[bytes | None]:
            if not isinstance(values, list) or len(values) != len(names):
                raise RedisUnavailable(f"MGET answered {type(values).__name__}")
            return [_decode(value) for value in values]

        return self._redis.execute("MGET", *names).addCallback(decode)

    def lifetime(self, mapname: str, key: str, reply: bytes) -> defer.Deferred[float | None]:
        """
        How many seconds Redis keeps the entry, provided it still holds
        C{reply}: C{None} when it has no expiry, C{0} when it is gone, holds
        another value, or the question failed (so that nothing is copied on
        a guess).
        """

        def remaining(value: object) -> float | None:
            if isinstance(value, int) and not isinstance(value, bool):
                # -1: no expiry; -2: gone already (expired just now).
                return None if value == -1 else max(value, 0) / 1000.0
            return 0.0

        return self._redis.execute(
            "EVAL", LIFETIME_SCRIPT, 1, cache_key(mapname, key), reply.decode("utf-8")
        ).addCallbacks(remaining, lambda failure: 0.0)

    def _expiry(self) -> tuple[str, int]:
        # go-redis sends EX for whole seconds and PX otherwise; so do we.
        if self._ttl == int(self._ttl):
            return ("EX", int(self._ttl))
        return ("PX", max(1, int(self._ttl * 1000)))

    def setMany(self, items: list[tuple[str, str, bytes]]) -> None:
        """
        Store several answers in one command (a script of C{SET}s with the
        same expiry as L{set}); a single answer is a plain C{SET}.  Never
        fails.
        """
        if len(items) == 1:
            self.set(*items[0])
            return
        args = [cache_key(mapname, key) for mapname, key, _ in items]
        args += [reply.decode("utf-8") for _, _, reply in items]
        d = self._redis.execute("EVAL", SET_MANY_SCRIPT, len(items), *args, *self._expiry())
        d.addErrback(lambda failure: None)

    def set(self, mapname: str, key: str, reply: bytes) -> None:
        d = self._redis.execute(
            "SET", cache_key(mapname, key), reply.decode("utf-8"), *self._expiry()
        )
        # A failed write only means the next lookup asks the API again.
        d.addErrback(lambda failure: None)


class NearCache:
    """
    A small in-process cache of OK answers in front of L{RedisCache}, so a
    hot key costs no Redis round trip.

    Its entries never outlive the Redis entry they copy: an answer written
    by this process is kept for M{min(near_ttl, ttl)} from the moment it is
    stored, before it is sent to Redis (which keeps it for C{ttl} from a
    moment later); an answer read from Redis is kept for at most what
    C{PTTL} said was left, counted from before the question was sent, and
    only while Redis still holds that same value (one atomic script).  So an
    answer served from here is always one Redis would still serve, and Redis
    stays the one shared cache of every process and of the Go program.

    What goes to Redis is batched: the reads of one reactor turn are one
    C{MGET}, its writes one script call, so a burst of cache misses costs a
    few Redis commands instead of two per lookup.
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
        self._reads: list[tuple[str, str, defer.Deferred[bytes | None]]] = []
        self._writes: dict[tuple[str, str], bytes] = {}
        self._flushCall: IDelayedCall | None = None

    def __len__(self) -> int:
        return len(self._near)

    def peek(self, mapname: str, key: str) -> bytes | None:
        return self._near.peek(mapname, key)

    def get(self, mapname: str, key: str) -> defer.Deferred[bytes | None]:
        reply = self._near.peek(mapname, key)
        if reply is not None:
            return defer.succeed(reply)
        waiter: defer.Deferred[bytes | None] = defer.Deferred()
        self._reads.append((mapname, key, waiter))
        self._schedule()
        return waiter

    def set(self, mapname: str, key: str, reply: bytes) -> None:
        self._near.set(mapname, key, reply)
        self._writes[mapname, key] = reply
        self._schedule()

    def _schedule(self) -> None:
        if self._flushCall is None:
            # Runs right after the reactor has handled this turn's events.
            self._flushCall = self._clock.callLater(0, self._flush)

    def _flush(self) -> None:
        self._flushCall = None
        reads, self._reads = self._reads, []
        writes, self._writes = self._writes, {}
        if writes:
            self._backend.setMany([(m, k, reply) for (m, k), reply in writes.items()])
        if not reads:
            return
        asked = self._clock.seconds()

        def answer(replies: list[bytes | None]) -> None:
            for (mapname, key, waiter), reply in zip(reads, replies, strict=True):
                if reply is not None:
                    self._copy(mapname, key, reply, asked)
                waiter.callback(reply)

        def fail(failure: Failure) -> None:
            for _, _, waiter in reads:
                waiter.errback(failure)

        self._backend.getMany([(m, k) for m, k, _ in reads]).addCallbacks(answer, fail)

    def _copy(self, mapname: str, key: str, reply: bytes, asked: float) -> None:
        """Keep an answer read from Redis for no longer than Redis keeps it."""

        def keep(remaining: float | None) -> None:
            if remaining is None:
                lifetime = float("inf")
            else:
                # Redis measured what was left at some moment after we
                # asked; count it from the asking, so the copy expires no
                # later than the original.
                lifetime = remaining - (self._clock.seconds() - asked)
            if lifetime > 0:
                # MemoryCache caps this at min(near_ttl, ttl) from now.
                self._near.set(mapname, key, reply, ttl=lifetime)

        self._backend.lifetime(mapname, key, reply).addCallback(keep)
