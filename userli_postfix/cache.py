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
from twisted.logger import Logger
from twisted.python.failure import Failure

from userli_postfix.metrics import Metrics
from userli_postfix.redisclient import RedisClient, RedisUnavailable

log = Logger()

# Enough for every address of a large installation several times over, at
# roughly 200 bytes an entry.
MEMORY_CACHE_ENTRIES = 100_000

# The near-cache only has to hold the keys that are hot right now (the
# domains, the big aliases, the busiest mailboxes): a few MB at most.
NEAR_CACHE_ENTRIES = 5_000

# The prefix of every key of the lookup cache: what the near-cache asks
# Redis to report changes of.
CACHE_PREFIX = "userli:lookup:"

# Copies are served only while the tracking connection has proved, within
# this many seconds, that it still hears Redis (a PING answered, see
# L{userli_postfix.redisclient.TRACKING_PING}): a connection that died without a
# word (a partition, a moved address) would otherwise let copies outlive a
# change for the seconds it takes to notice.  So a copy is at most this old
# in the worst case; past it, every lookup reads Redis until the connection
# answers again or is replaced.
TRACKING_SILENCE = 1.0


def cache_key(mapname: str, key: str) -> str:
    """The Go program's Redis key for a cached answer."""
    return f"{CACHE_PREFIX}{mapname}:{key}"


class LookupCache(Protocol):
    """
    Where OK answers are kept.  C{get} fires with the reply or C{None}, or
    fails when the backend is unreachable (the caller counts that and treats
    it as a miss); C{set} never fails, keeps the entry for C{ttl} seconds
    (C{None}: the cache's own lifetime), and returns a Deferred that fires
    once the answer is stored where every process finds it (C{None} when it
    is at once), so the caller can reply after that, as the Go program
    does.  C{peek} answers at once from what this process holds (C{None}
    when it would have to ask elsewhere), so a hot key costs no Deferred and
    no round trip.
    """

    def peek(self, mapname: str, key: str) -> bytes | None: ...

    def get(self, mapname: str, key: str) -> defer.Deferred[bytes | None]: ...

    def set(
        self, mapname: str, key: str, reply: bytes, ttl: float | None = None
    ) -> defer.Deferred[None] | None: ...


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

    def discard(self, mapname: str, key: str) -> None:
        """Forget one answer."""
        self._entries.pop((mapname, key), None)

    def clear(self) -> None:
        """Forget every answer."""
        self._entries.clear()

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
    """
    OK answers in Redis, in the Go program's layout: the backend of
    L{NearCache}, which batches what goes to it.
    """

    def __init__(self, redis: RedisClient, ttl: float) -> None:
        self._redis = redis
        self._ttl = ttl

    @property
    def ttl(self) -> float:
        """How long an entry is kept unless its writer says otherwise."""
        return self._ttl

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
            # The bytes as read: a value that is not UTF-8 is compared as is.
            "EVAL",
            LIFETIME_SCRIPT,
            1,
            cache_key(mapname, key),
            reply,
        ).addCallbacks(remaining, lambda failure: 0.0)

    @staticmethod
    def _expiry(ttl: float) -> tuple[str, int]:
        # go-redis sends EX for whole seconds and PX otherwise; so do we.
        if ttl == int(ttl):
            return ("EX", int(ttl))
        return ("PX", max(1, int(ttl * 1000)))

    def setMany(
        self, items: list[tuple[str, str, bytes]], ttl: float | None = None
    ) -> defer.Deferred[bool]:
        """
        Store several answers in one command (a script of C{SET}s with the
        same expiry as L{set}); a single answer is a plain C{SET}.  Never
        fails; fires with whether Redis stored them, once it answered (or
        did not, within the deadline), so that whoever kept a copy of them
        in front of Redis can drop a copy of what Redis never got.
        """
        lifetime = self._ttl if ttl is None else ttl
        if lifetime <= 0:
            return defer.succeed(False)
        if len(items) == 1:
            [(mapname, key, reply)] = items
            d = self._redis.execute(
                "SET", cache_key(mapname, key), reply.decode("utf-8"), *self._expiry(lifetime)
            )
        else:
            args = [cache_key(mapname, key) for mapname, key, _ in items]
            args += [reply.decode("utf-8") for _, _, reply in items]
            d = self._redis.execute(
                "EVAL", SET_MANY_SCRIPT, len(items), *args, *self._expiry(lifetime)
            )
        # A failed write only means the next lookup asks the API again.
        return d.addCallbacks(lambda _: True, lambda failure: False)

    def set(
        self, mapname: str, key: str, reply: bytes, ttl: float | None = None
    ) -> defer.Deferred[None]:
        return self.setMany([(mapname, key, reply)], ttl).addCallback(lambda _: None)


class NearCache:
    """
    A small in-process cache of OK answers in front of L{RedisCache}, so a
    hot key costs no Redis command at all, kept coherent with Redis by
    Redis itself (client tracking, see L{userli_postfix.redisclient}).

    Copies exist only while tracking is established: Redis then reports
    every change to a C{userli:lookup:} key (C{DEL}, C{SET}, C{EXPIRE},
    expiry, eviction, a flush) by anyone, and the copy is dropped within
    milliseconds.  Until then, and from the moment tracking may have
    lapsed (the subscriber connection closed, Redis refused tracking), no
    copy is kept or served: every lookup reads Redis.  And copies are
    served only while the subscriber connection has answered a PING sent
    within the last L{TRACKING_SILENCE} seconds, proof that every change
    Redis reported before then has arrived: a connection that died
    silently stops serving copies within that bound, long before its
    death is noticed.  So an answer served from here is one Redis served
    at most that long ago, and Redis stays the one shared cache of every
    process and of the Go program.

    A value read from Redis is copied only when nothing could have changed
    it unheard since the read was sent: no invalidation of that key, no
    flush and no loss of tracking in between (invalidations arrive on
    another connection than the reply, in either order).  A copy never
    outlives the Redis entry either: it is kept for at most what C{PTTL}
    said was left, counted from before the question was sent, and only
    while Redis still holds that same value (one atomic script).

    What goes to Redis is batched: the reads of one reactor turn are one
    C{MGET}, its writes one script call, so a burst of cache misses costs a
    few Redis commands instead of two per lookup.  L{set} fires once its
    batch is written, so that the answer is in Redis, for every process,
    before it is given.

    @param ttl: the longest any copy is kept: the longest lifetime that
        entries are written with.
    """

    def __init__(
        self,
        backend: RedisCache,
        clock: IReactorTime,
        ttl: float,
        max_entries: int = NEAR_CACHE_ENTRIES,
        metrics: Metrics | None = None,
    ) -> None:
        self._backend = backend
        self._clock = clock
        self._near = MemoryCache(clock, ttl, max_entries)
        self._reads: list[tuple[str, str, defer.Deferred[bytes | None]]] = []
        # (map, key) -> (reply, lifetime); None: the backend's own.
        self._writes: dict[tuple[str, str], tuple[bytes, float | None]] = {}
        self._written: list[defer.Deferred[None]] = []
        self._flushCall: IDelayedCall | None = None
        self._gauge = metrics.near_cache_coherent if metrics is not None else None
        self._coherent = False
        # When the last PING was sent that the tracking connection answered.
        self._provenAt = float("-inf")
        # Every event that can make a read stale gets the next number: a
        # read sent at number n may be copied only if no event about its
        # key (nor a global one) is numbered above n.
        self._seq = 0
        self._lastGlobal = 0
        # Keys with reads in flight (how many), and the last invalidation
        # of each while in flight: bounded by the reads in flight.
        self._inflight: dict[str, int] = {}
        self._invalidatedAt: dict[str, int] = {}
        if self._gauge is not None:
            self._gauge.set(0)

    def __len__(self) -> int:
        return len(self._near)

    # InvalidationListener

    def trackingStarted(self) -> None:
        """Redis reports every change from now on: copies may be kept again."""
        self._dropAll()
        self._provenAt = self._clock.seconds()
        if not self._coherent:
            self._coherent = True
            if self._gauge is not None:
                self._gauge.set(1)
            log.info("Near-cache on: Redis reports every change to a cached answer")

    def trackingLost(self, reason: str) -> None:
        """Changes may go unheard: drop every copy and read Redis until tracking is back."""
        self._dropAll()
        if self._coherent:
            self._coherent = False
            if self._gauge is not None:
                self._gauge.set(0)
            log.warn(
                "Near-cache off until Redis reports changes again ({reason}); "
                "every lookup reads Redis",
                reason=reason,
            )

    def trackingAlive(self, sent: float) -> None:
        """A PING sent at C{sent} was answered: every change before it has been heard."""
        if sent > self._provenAt:
            self._provenAt = sent

    def invalidated(self, keys: list[str] | None) -> None:
        """Redis says these keys (C{None}: all of them) changed."""
        if keys is None:
            self._dropAll()
            return
        for name in keys:
            self._seq += 1
            if name in self._inflight:
                self._invalidatedAt[name] = self._seq
            mapname, key = _split_cache_key(name)
            if mapname is not None:
                self._near.discard(mapname, key)

    def _dropAll(self) -> None:
        self._seq += 1
        self._lastGlobal = self._seq
        self._near.clear()

    def _mayCopy(self, name: str, sent: int) -> bool:
        return (
            self._coherent and self._lastGlobal <= sent and self._invalidatedAt.get(name, 0) <= sent
        )

    def _begin(self, name: str) -> None:
        self._inflight[name] = self._inflight.get(name, 0) + 1

    def _end(self, name: str) -> None:
        left = self._inflight[name] - 1
        if left:
            self._inflight[name] = left
        else:
            del self._inflight[name]
            self._invalidatedAt.pop(name, None)

    # LookupCache

    def peek(self, mapname: str, key: str) -> bytes | None:
        if self._clock.seconds() - self._provenAt > TRACKING_SILENCE:
            return None
        return self._near.peek(mapname, key)

    def get(self, mapname: str, key: str) -> defer.Deferred[bytes | None]:
        reply = self.peek(mapname, key)
        if reply is not None:
            return defer.succeed(reply)
        waiter: defer.Deferred[bytes | None] = defer.Deferred()
        self._reads.append((mapname, key, waiter))
        self._schedule()
        return waiter

    def set(
        self, mapname: str, key: str, reply: bytes, ttl: float | None = None
    ) -> defer.Deferred[None]:
        if self._coherent:
            # What Redis will hold a moment later; a change by anyone
            # after that is reported and drops it, and so does a write
            # that fails (_flush).
            self._near.set(mapname, key, reply, self._backend.ttl if ttl is None else ttl)
        self._writes[mapname, key] = (reply, ttl)
        written: defer.Deferred[None] = defer.Deferred()
        self._written.append(written)
        self._schedule()
        return written

    def _schedule(self) -> None:
        if self._flushCall is None:
            # Runs right after the reactor has handled this turn's events.
            self._flushCall = self._clock.callLater(0, self._flush)

    def _flush(self) -> None:
        self._flushCall = None
        reads, self._reads = self._reads, []
        writes, self._writes = self._writes, {}
        written, self._written = self._written, []
        if writes:
            # One command per lifetime: the lookup cache's, and the few
            # entries written with another (see L{userli_postfix.remotedomains}).
            batches: dict[float | None, list[tuple[str, str, bytes]]] = {}
            for (m, k), (reply, ttl) in writes.items():
                batches.setdefault(ttl, []).append((m, k, reply))

            def landed(stored: list[bool]) -> None:
                # A copy kept by set() of an answer Redis never got would be
                # served in its stead, and no change to it would ever be
                # reported: drop it, the next lookup reads Redis.
                for ok, items in zip(stored, batches.values(), strict=True):
                    if not ok:
                        for mapname, key, _ in items:
                            self._near.discard(mapname, key)
                for waiter in written:
                    waiter.callback(None)

            defer.gatherResults(
                [self._backend.setMany(items, ttl) for ttl, items in batches.items()]
            ).addCallback(landed)
        if not reads:
            return
        asked = self._clock.seconds()
        sent = self._seq
        names = [cache_key(m, k) for m, k, _ in reads]
        for name in names:
            self._begin(name)

        def answer(replies: list[bytes | None]) -> None:
            if len(replies) != len(reads):
                fail(Failure(RedisUnavailable(f"{len(replies)} replies to {len(reads)} keys")))
                return
            # Every waiter fires, whatever one reply holds.
            for (mapname, key, waiter), name, reply in zip(reads, names, replies, strict=True):
                if reply is not None and self._mayCopy(name, sent):
                    self._copy(mapname, key, name, reply, asked, sent)
                else:
                    self._end(name)
                waiter.callback(reply)

        def fail(failure: Failure) -> None:
            for name in names:
                self._end(name)
            for _, _, waiter in reads:
                waiter.errback(failure)

        self._backend.getMany([(m, k) for m, k, _ in reads]).addCallbacks(answer, fail)

    def _copy(
        self, mapname: str, key: str, name: str, reply: bytes, asked: float, sent: int
    ) -> None:
        """Keep an answer read from Redis for no longer than Redis keeps it."""

        def keep(remaining: float | None) -> None:
            if not self._mayCopy(name, sent):
                return
            if remaining is None:
                lifetime = float("inf")
            else:
                # Redis measured what was left at some moment after we
                # asked; count it from the asking, so the copy expires no
                # later than the original.
                lifetime = remaining - (self._clock.seconds() - asked)
            if lifetime > 0:
                # MemoryCache caps this at the lookup TTL from now.
                self._near.set(mapname, key, reply, ttl=lifetime)

        d = defer.maybeDeferred(self._backend.lifetime, mapname, key, reply)
        d.addCallback(keep)
        d.addBoth(lambda _: self._end(name))


def _split_cache_key(name: str) -> tuple[str | None, str]:
    """(map, key) of a Redis key of ours; C{(None, "")} for any other."""
    if not name.startswith(CACHE_PREFIX):
        return None, ""
    mapname, colon, key = name[len(CACHE_PREFIX) :].partition(":")
    if not colon:
        return None, ""
    return mapname, key
