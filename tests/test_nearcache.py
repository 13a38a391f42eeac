"""
Tests for L{userli_postfix.cache.NearCache}, the in-process cache of OK
answers in front of Redis, and for how L{userli_postfix.lookups.Lookups}
uses it: a hot key costs no Redis round trip, an entry never outlives the
Redis entry it copies, copies exist only while Redis reports changes
(client tracking) and no change reported after a read was sent is ever
missed, and identical lookups in flight share one API call.

Redis is a small fake with expiry on a L{Clock}; replies can be held back
to test what happens while a command is on the wire.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.doubles import FakeLookupClient
from userli_postfix.cache import (
    CACHE_PREFIX,
    LIFETIME_SCRIPT,
    NEAR_CACHE_ENTRIES,
    SET_MANY_SCRIPT,
    TRACKING_SILENCE,
    NearCache,
    RedisCache,
    cache_key,
)
from userli_postfix.lookups import Lookups
from userli_postfix.metrics import Metrics
from userli_postfix.redisclient import RedisUnavailable
from userli_postfix.userli import UserliError


class FakeRedis:
    """
    The part of L{userli_postfix.redisclient.RedisClient} the cache uses, over a
    dict with expiry times on C{clock}.

    @ivar commands: every command sent, in order.
    @ivar hold: when true, commands run at once (as Redis would) but their
        replies wait in C{held} until L{release}, as if still on the wire.
    @ivar down: when true, every command fails with L{RedisUnavailable}.
    @ivar failing: command names that fail with L{RedisUnavailable}.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.data: dict[str, tuple[str, float | None]] = {}
        self.commands: list[tuple[Any, ...]] = []
        self.hold = False
        self.held: list[tuple[defer.Deferred[Any], Any]] = []
        self.down = False
        self.failing: set[str] = set()

    def put(self, key: str, value: str, ttl: float | None) -> None:
        """Store C{value} as another program would (C{ttl} None: no expiry)."""
        self.data[key] = (value, None if ttl is None else self.clock.seconds() + ttl)

    def _live(self, key: str) -> tuple[str, float | None] | None:
        entry = self.data.get(key)
        if entry is not None and entry[1] is not None and entry[1] <= self.clock.seconds():
            del self.data[key]
            return None
        return entry

    def _run(self, command: str, *args: Any) -> Any:
        if command == "GET":
            entry = self._live(args[0])
            return None if entry is None else entry[0]
        if command == "PTTL":
            entry = self._live(args[0])
            if entry is None:
                return -2
            if entry[1] is None:
                return -1
            return round((entry[1] - self.clock.seconds()) * 1000)
        if command == "MGET":
            return [self._run("GET", key) for key in args]
        if command == "SET":
            key, value, unit, amount = args
            seconds = amount if unit == "EX" else amount / 1000.0
            self.put(key, value, seconds)
            return "OK"
        if command == "EVAL" and args[0] == LIFETIME_SCRIPT:
            _, _, key, expected = args
            if isinstance(expected, bytes):
                expected = expected.decode("utf-8")
            if self._run("GET", key) != expected:
                return -2
            return self._run("PTTL", key)
        if command == "EVAL":
            assert args[0] == SET_MANY_SCRIPT
            count = args[1]
            keys, values = args[2 : 2 + count], args[2 + count : 2 + 2 * count]
            unit, amount = args[2 + 2 * count :]
            for key, value in zip(keys, values, strict=True):
                self._run("SET", key, value, unit, amount)
            return count
        raise AssertionError(f"unexpected command {command}")

    def execute(self, command: str, *args: Any) -> defer.Deferred[Any]:
        self.commands.append((command, *args))
        if self.down or command in self.failing:
            return defer.fail(RedisUnavailable("not connected"))
        result = self._run(command, *args)
        if self.hold:
            d: defer.Deferred[Any] = defer.Deferred()
            self.held.append((d, result))
            return d
        return defer.succeed(result)

    def release(self) -> None:
        """Deliver every held reply, in order."""
        held, self.held = self.held, []
        for d, result in held:
            d.callback(result)

    def names(self) -> list[str]:
        """The command names sent so far."""
        return [c[0] for c in self.commands]


class TrackedClock(Clock):
    """
    A clock that comes with a healthy tracking connection: every step
    ends with the answer to a PING sent at its end, so the near-caches
    registered in C{caches} may serve copies however far it is advanced.
    """

    def __init__(self) -> None:
        super().__init__()
        self.caches: list[NearCache] = []

    def advance(self, amount: float) -> None:
        super().advance(amount)
        for cache in self.caches:
            cache.trackingAlive(self.seconds())


class NearCacheTests(SynchronousTestCase):
    """L{NearCache} on its own."""

    def setUp(self) -> None:
        self.clock = TrackedClock()
        self.clock.advance(1000)
        self.redis = FakeRedis(self.clock)
        self.ttl = 300.0
        self.metrics = Metrics(process=False)
        self.cache = NearCache(
            RedisCache(self.redis, self.ttl),  # type: ignore[arg-type]
            self.clock,
            self.ttl,
            metrics=self.metrics,
        )
        self.clock.caches.append(self.cache)
        self.cache.trackingStarted()

    def flush(self) -> None:
        """End the reactor turn: what was batched goes to Redis."""
        self.clock.advance(0)

    def get(self, mapname: str, key: str) -> bytes | None:
        """C{get} across the end of the turn."""
        d = self.cache.get(mapname, key)
        self.flush()
        result: bytes | None = self.successResultOf(d)
        return result

    def test_defaults(self) -> None:
        """The near-cache keeps a bounded set of keys, under the Go program's key prefix."""
        self.assertEqual(NEAR_CACHE_ENTRIES, 5_000)
        self.assertEqual(CACHE_PREFIX, "userli:lookup:")

    def test_set_writes_both(self) -> None:
        """An answer is kept in the process at once, and written to Redis in the Go layout."""
        self.cache.set("alias", "a@example.org", b"OK b@example.org")
        self.assertEqual(self.cache.peek("alias", "a@example.org"), b"OK b@example.org")
        self.flush()
        self.assertEqual(
            self.redis.commands,
            [("SET", "userli:lookup:alias:a@example.org", "OK b@example.org", "EX", 300)],
        )

    def test_failed_write_not_kept(self) -> None:
        """
        An answer Redis did not store (the connections to the master not up
        yet while the tracking one is) is not served from the process: it
        would hide that Redis lacks it, and no change to it would ever be
        reported.  The next lookup reads Redis, and a write that lands is
        kept again.
        """
        self.redis.down = True
        written = self.cache.set("alias", "a@example.org", b"OK b@example.org")
        self.cache.set("alias", "c@example.org", b"OK d@example.org")
        self.flush()
        self.assertIsNone(self.successResultOf(written))
        self.assertIsNone(self.cache.peek("alias", "a@example.org"))
        self.assertIsNone(self.cache.peek("alias", "c@example.org"))
        self.redis.down = False
        self.cache.set("alias", "a@example.org", b"OK b@example.org")
        self.flush()
        self.assertEqual(self.cache.peek("alias", "a@example.org"), b"OK b@example.org")
        self.assertEqual(
            self.redis._run("GET", cache_key("alias", "a@example.org")), "OK b@example.org"
        )

    def test_writes_batched(self) -> None:
        """The writes of one reactor turn are one script call, with the usual expiry."""
        for name in ("a", "b", "c"):
            self.cache.set("mailbox", f"{name}@example.org", b"OK 1")
        self.cache.set("mailbox", "a@example.org", b"OK 1")
        self.assertEqual(self.redis.commands, [])
        self.flush()
        self.assertEqual(self.redis.names(), ["EVAL"])
        self.assertEqual(
            self.redis.commands[0][1:],
            (
                SET_MANY_SCRIPT,
                3,
                *(f"userli:lookup:mailbox:{n}@example.org" for n in "abc"),
                "OK 1",
                "OK 1",
                "OK 1",
                "EX",
                300,
            ),
        )
        for name in ("a", "b", "c"):
            self.assertEqual(
                self.redis._run("PTTL", cache_key("mailbox", f"{name}@example.org")), 300_000
            )

    def test_reads_batched(self) -> None:
        """The reads of one reactor turn are one MGET; each caller gets its own answer."""
        self.redis.put(cache_key("domain", "example.org"), "OK 1", 100)
        found = self.cache.get("domain", "example.org")
        missing = self.cache.get("alias", "x@example.org")
        again = self.cache.get("domain", "example.org")
        self.assertEqual(self.redis.commands, [])
        self.flush()
        self.assertEqual(self.redis.names()[0], "MGET")
        self.assertEqual(self.successResultOf(found), b"OK 1")
        self.assertIsNone(self.successResultOf(missing))
        self.assertEqual(self.successResultOf(again), b"OK 1")

    def test_hit_costs_no_round_trip(self) -> None:
        """A key in the near-cache is answered at once, without any Redis command."""
        self.cache.set("mailbox", "a@example.org", b"OK 1")
        self.flush()
        self.redis.commands.clear()
        self.assertEqual(self.successResultOf(self.cache.get("mailbox", "a@example.org")), b"OK 1")
        self.assertEqual(self.cache.peek("mailbox", "a@example.org"), b"OK 1")
        self.flush()
        self.assertEqual(self.redis.commands, [])

    def test_copy_kept_as_long_as_redis(self) -> None:
        """
        While Redis reports changes, an own answer is kept the lookup TTL
        (Redis keeps it a moment longer), with no Redis command meanwhile.
        """
        self.cache.set("mailbox", "a@example.org", b"OK 1")
        self.flush()
        self.redis.commands.clear()
        self.clock.advance(self.ttl - 0.001)
        self.assertEqual(self.cache.peek("mailbox", "a@example.org"), b"OK 1")
        self.clock.advance(0.001)
        self.assertIsNone(self.cache.peek("mailbox", "a@example.org"))
        self.assertEqual(self.redis.commands, [])

    def test_silent_tracking_serves_no_copies(self) -> None:
        """
        Copies are served only while the tracking connection has answered
        a PING sent within the last second: past that (a connection that
        died without a word), lookups read Redis, and see what it holds
        now; once a later PING is answered, copies are served again.
        """
        cache = NearCache(RedisCache(self.redis, 300.0), self.clock, 300.0)  # type: ignore[arg-type]
        cache.trackingStarted()
        cache.set("alias", "a@example.org", b"OK old@example.org")
        self.flush()
        self.clock.advance(TRACKING_SILENCE)
        self.assertEqual(cache.peek("alias", "a@example.org"), b"OK old@example.org")
        # The tracking connection falls silent; another program changes the entry.
        self.redis.put(cache_key("alias", "a@example.org"), "OK new@example.org", 300)
        self.clock.advance(0.001)
        self.assertIsNone(cache.peek("alias", "a@example.org"))
        d = cache.get("alias", "a@example.org")
        self.flush()
        self.assertEqual(self.successResultOf(d), b"OK new@example.org")
        # A PING sent now is answered (the invalidation came before it).
        cache.invalidated([cache_key("alias", "a@example.org")])
        cache.set("alias", "b@example.org", b"OK b@example.org")
        cache.trackingAlive(self.clock.seconds())
        self.assertEqual(cache.peek("alias", "b@example.org"), b"OK b@example.org")
        self.assertIsNone(cache.peek("alias", "a@example.org"))

    def test_alive_counts_from_the_ping_sent(self) -> None:
        """
        What proves the connection alive is when the answered PING was
        sent, not when its answer arrived: an answer that took long proves
        only what Redis had said by then.
        """
        cache = NearCache(RedisCache(self.redis, 300.0), self.clock, 300.0)  # type: ignore[arg-type]
        cache.trackingStarted()
        cache.set("domain", "example.org", b"OK 1")
        sent = self.clock.seconds()
        self.clock.advance(TRACKING_SILENCE + 0.5)
        cache.trackingAlive(sent)
        self.assertIsNone(cache.peek("domain", "example.org"))
        cache.trackingAlive(self.clock.seconds() - 0.5)
        self.assertEqual(cache.peek("domain", "example.org"), b"OK 1")
        # An older answer arriving late does not move the proof back.
        cache.trackingAlive(sent)
        self.assertEqual(cache.peek("domain", "example.org"), b"OK 1")

    def test_lookup_ttl_caps_copies(self) -> None:
        """With a short LOOKUP_CACHE_TTL, entries live LOOKUP_CACHE_TTL."""
        cache = NearCache(RedisCache(self.redis, 2.0), self.clock, 2.0)  # type: ignore[arg-type]
        self.clock.caches.append(cache)
        cache.trackingStarted()
        cache.set("domain", "example.org", b"OK 1")
        self.clock.advance(1.999)
        self.assertEqual(cache.peek("domain", "example.org"), b"OK 1")
        self.clock.advance(0.001)
        self.assertIsNone(cache.peek("domain", "example.org"))

    def test_own_write_expires_first(self) -> None:
        """
        An answer this process wrote leaves the near-cache no later than
        Redis drops it, though Redis got it a reactor turn later.
        """
        cache = NearCache(RedisCache(self.redis, 2.0), self.clock, 2.0)  # type: ignore[arg-type]
        self.clock.caches.append(cache)
        cache.trackingStarted()
        cache.set("domain", "example.org", b"OK 1")
        self.clock.advance(0.5)  # a slow turn: the write goes out half a second later
        self.clock.advance(1.5)
        self.assertIsNone(cache.peek("domain", "example.org"))
        self.assertEqual(self.redis._run("GET", cache_key("domain", "example.org")), "OK 1")

    def test_copy_never_outlives_redis(self) -> None:
        """
        An answer read from Redis with less left than the near TTL (written
        by another process long ago) is kept only as long as Redis keeps it.
        """
        self.redis.put(cache_key("domain", "example.org"), "OK 1", 2.0)
        self.assertEqual(self.get("domain", "example.org"), b"OK 1")
        self.clock.advance(1.999)
        self.assertEqual(self.cache.peek("domain", "example.org"), b"OK 1")
        self.clock.advance(0.001)
        self.assertIsNone(self.cache.peek("domain", "example.org"))
        self.assertIsNone(self.get("domain", "example.org"))

    def test_wire_time_deducted(self) -> None:
        """
        The time replies spent on the way back is taken off what Redis said
        was left, so the copy still expires no later than the original.
        """
        self.redis.put(cache_key("domain", "example.org"), "OK 1", 3.0)
        self.redis.hold = True
        d = self.cache.get("domain", "example.org")
        self.flush()
        self.redis.release()  # the MGET reply; PTTL goes out and says 3 s are left
        self.assertEqual(self.successResultOf(d), b"OK 1")
        self.clock.advance(1.0)  # ... but its reply takes a second to arrive
        self.redis.release()
        # Redis drops it 3 s after the asking; so does the copy, not 3 s
        # after the reply arrived.
        self.clock.advance(1.999)
        self.assertEqual(self.cache.peek("domain", "example.org"), b"OK 1")
        self.clock.advance(0.001)
        self.assertIsNone(self.cache.peek("domain", "example.org"))

    def test_no_expiry_kept_lookup_ttl(self) -> None:
        """A Redis entry without expiry is copied for at most the lookup TTL."""
        self.redis.put(cache_key("domain", "example.org"), "OK 1", None)
        self.assertEqual(self.get("domain", "example.org"), b"OK 1")
        self.clock.advance(self.ttl - 0.001)
        self.assertEqual(self.cache.peek("domain", "example.org"), b"OK 1")
        self.clock.advance(0.001)
        self.assertIsNone(self.cache.peek("domain", "example.org"))

    def test_miss_asks_once(self) -> None:
        """A key Redis does not have costs one GET and nothing is kept."""
        self.assertIsNone(self.get("alias", "x@example.org"))
        self.assertEqual(self.redis.names(), ["GET"])
        self.assertIsNone(self.cache.peek("alias", "x@example.org"))
        self.assertEqual(len(self.cache), 0)

    def test_expired_between_get_and_pttl(self) -> None:
        """An entry that expires between GET and PTTL is answered but not copied."""
        self.redis.put(cache_key("domain", "example.org"), "OK 1", 1.0)
        self.redis.hold = True
        d = self.cache.get("domain", "example.org")
        self.flush()
        self.redis.release()
        self.clock.advance(1.0)
        self.redis.release()
        self.assertEqual(self.successResultOf(d), b"OK 1")
        self.assertIsNone(self.cache.peek("domain", "example.org"))

    def test_rewritten_between_get_and_pttl(self) -> None:
        """
        An entry that expires and is written anew with another value between
        our read and the lifetime question is answered but not copied: the
        new entry's lifetime says nothing about the value we read.
        """
        name = cache_key("alias", "team@example.org")
        self.redis.put(name, "OK old@example.org", 0.001)
        self.redis.hold = True
        d = self.cache.get("alias", "team@example.org")
        self.flush()
        self.redis.hold = False
        self.clock.advance(0.001)
        self.redis.put(name, "OK new@example.org", 300.0)
        self.redis.release()
        self.assertEqual(self.successResultOf(d), b"OK old@example.org")
        self.assertIsNone(self.cache.peek("alias", "team@example.org"))

    def test_pttl_failure(self) -> None:
        """When PTTL fails the answer is still served, but not copied on a guess."""
        self.redis.put(cache_key("domain", "example.org"), "OK 1", 100.0)
        self.redis.failing.add("EVAL")
        self.assertEqual(self.get("domain", "example.org"), b"OK 1")
        self.assertIsNone(self.cache.peek("domain", "example.org"))

    def test_redis_down(self) -> None:
        """
        With Redis down, C{get} of a key not held near fails (the caller
        counts a cache error and asks the API); held keys still answer.
        """
        self.cache.set("domain", "example.org", b"OK 1")
        self.flush()
        self.redis.down = True
        d = self.cache.get("alias", "x@example.org")
        self.flush()
        self.failureResultOf(d, RedisUnavailable)
        self.assertEqual(self.get("domain", "example.org"), b"OK 1")

    def test_mget_wrong_shape(self) -> None:
        """An MGET answer of the wrong length is an unavailable cache, not data."""
        self.redis.hold = True
        first = self.cache.get("alias", "a@example.org")
        second = self.cache.get("alias", "b@example.org")
        self.flush()
        self.redis.held[0] = (self.redis.held[0][0], [None])
        self.redis.release()
        self.failureResultOf(first, RedisUnavailable)
        self.failureResultOf(second, RedisUnavailable)

    def test_bounded(self) -> None:
        """Beyond its size the least recently used entries are dropped."""
        cache = NearCache(
            RedisCache(self.redis, self.ttl),  # type: ignore[arg-type]
            self.clock,
            self.ttl,
            max_entries=3,
        )
        cache.trackingStarted()
        for name in ("a", "b", "c"):
            cache.set("mailbox", f"{name}@example.org", b"OK 1")
        self.assertEqual(cache.peek("mailbox", "a@example.org"), b"OK 1")  # a is now recent
        cache.set("mailbox", "d@example.org", b"OK 1")
        self.assertEqual(len(cache), 3)
        self.assertIsNone(cache.peek("mailbox", "b@example.org"))
        for name in ("a", "c", "d"):
            self.assertEqual(cache.peek("mailbox", f"{name}@example.org"), b"OK 1")

    def test_maps_apart(self) -> None:
        """The same key in two maps is two entries."""
        self.cache.set("alias", "a@example.org", b"OK b@example.org")
        self.assertIsNone(self.cache.peek("senders", "a@example.org"))

    # Coherence with Redis (client tracking).

    def gauge(self) -> float | None:
        """The near-cache's coherence gauge."""
        return self.metrics.registry.get_sample_value("userli_postfix_adapter_near_cache_coherent")

    def copied(self, mapname: str, key: str, value: str) -> None:
        """Put C{value} in Redis and read it through, so it is copied."""
        self.redis.put(cache_key(mapname, key), value, 300.0)
        self.assertEqual(self.get(mapname, key), value.encode())
        self.assertEqual(self.cache.peek(mapname, key), value.encode())

    def test_no_copies_until_tracking(self) -> None:
        """
        Before tracking is established nothing is copied, own answers
        included: every lookup reads Redis.
        """
        metrics = Metrics(process=False)
        cache = NearCache(RedisCache(self.redis, self.ttl), self.clock, self.ttl, metrics=metrics)  # type: ignore[arg-type]
        self.assertEqual(
            metrics.registry.get_sample_value("userli_postfix_adapter_near_cache_coherent"), 0
        )
        cache.set("domain", "example.org", b"OK 1")
        self.assertIsNone(cache.peek("domain", "example.org"))
        self.flush()
        d = cache.get("domain", "example.org")
        self.flush()
        self.assertEqual(self.successResultOf(d), b"OK 1")
        self.assertIsNone(cache.peek("domain", "example.org"))
        self.assertEqual(len(cache), 0)

    def test_gauge(self) -> None:
        """The gauge says 1 while tracking holds and 0 otherwise."""
        self.assertEqual(self.gauge(), 1.0)
        self.cache.trackingLost("test")
        self.assertEqual(self.gauge(), 0.0)
        self.cache.trackingStarted()
        self.assertEqual(self.gauge(), 1.0)

    def test_loss_drops_everything(self) -> None:
        """Losing tracking drops every copy; none is made until it is back."""
        self.copied("domain", "example.org", "OK 1")
        self.cache.trackingLost("test")
        self.assertIsNone(self.cache.peek("domain", "example.org"))
        self.assertEqual(self.get("domain", "example.org"), b"OK 1")
        self.assertIsNone(self.cache.peek("domain", "example.org"))
        self.cache.trackingStarted()
        self.assertEqual(self.get("domain", "example.org"), b"OK 1")
        self.assertEqual(self.cache.peek("domain", "example.org"), b"OK 1")

    def test_loss_logged_once(self) -> None:
        """One log line when tracking is lost, however often it is said; one when it is back."""
        events: list[dict[str, Any]] = []
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for _ in range(3):
            self.cache.trackingLost("test")
        self.cache.trackingStarted()
        self.cache.trackingStarted()
        formats = [
            e.get("log_format", "")
            for e in events
            if e.get("log_namespace", "").startswith("userli_postfix.cache")
        ]
        self.assertEqual(len([f for f in formats if f.startswith("Near-cache off")]), 1)
        self.assertEqual(len([f for f in formats if f.startswith("Near-cache on")]), 1)

    def test_invalidation_drops_key(self) -> None:
        """An invalidated key is dropped, and only that one."""
        self.copied("domain", "example.org", "OK 1")
        self.copied("domain", "example.net", "OK 1")
        self.cache.invalidated([cache_key("domain", "example.org"), "other:key"])
        self.assertIsNone(self.cache.peek("domain", "example.org"))
        self.assertEqual(self.cache.peek("domain", "example.net"), b"OK 1")

    def test_null_invalidation_drops_all(self) -> None:
        """An invalidation without keys (a flush) drops every copy."""
        self.copied("domain", "example.org", "OK 1")
        self.copied("alias", "a@example.org", "OK b@example.org")
        self.cache.invalidated(None)
        self.assertEqual(len(self.cache), 0)
        self.assertEqual(self.gauge(), 1)

    def test_own_write_invalidated(self) -> None:
        """An own answer is dropped when Redis reports a change of its key."""
        self.cache.set("domain", "example.org", b"OK 1")
        self.cache.invalidated([cache_key("domain", "example.org")])
        self.assertIsNone(self.cache.peek("domain", "example.org"))

    def test_invalidated_while_in_flight_not_copied(self) -> None:
        """
        A change reported after the read was sent (the invalidation arrived
        before the reply, on the other connection) keeps the value read
        from being copied; it is still the answer to that lookup.
        """
        self.redis.put(cache_key("domain", "example.org"), "OK 1", 300.0)
        self.redis.hold = True
        d = self.cache.get("domain", "example.org")
        self.flush()
        self.cache.invalidated([cache_key("domain", "example.org")])
        self.redis.hold = False
        self.redis.release()
        self.assertEqual(self.successResultOf(d), b"OK 1")
        self.assertIsNone(self.cache.peek("domain", "example.org"))
        # The next read, after the change, is copied again.
        self.assertEqual(self.get("domain", "example.org"), b"OK 1")
        self.assertEqual(self.cache.peek("domain", "example.org"), b"OK 1")

    def test_invalidated_before_lifetime_reply_not_copied(self) -> None:
        """A change reported between the read's reply and the lifetime reply is not missed."""
        self.redis.put(cache_key("domain", "example.org"), "OK 1", 300.0)
        self.redis.hold = True
        d = self.cache.get("domain", "example.org")
        self.flush()
        self.redis.release()  # the MGET reply; the lifetime question goes out
        self.assertEqual(self.successResultOf(d), b"OK 1")
        self.cache.invalidated([cache_key("domain", "example.org")])
        self.redis.release()
        self.assertIsNone(self.cache.peek("domain", "example.org"))

    def test_other_key_invalidated_in_flight_copied(self) -> None:
        """A change of another key while a read is in flight does not stop its copy."""
        self.redis.put(cache_key("domain", "example.org"), "OK 1", 300.0)
        self.redis.hold = True
        d = self.cache.get("domain", "example.org")
        self.flush()
        self.cache.invalidated([cache_key("domain", "example.net")])
        self.redis.hold = False
        self.redis.release()
        self.assertEqual(self.successResultOf(d), b"OK 1")
        self.assertEqual(self.cache.peek("domain", "example.org"), b"OK 1")

    def test_flush_or_loss_in_flight_not_copied(self) -> None:
        """
        A flush, a loss of tracking or tracking (re)established while a
        read is in flight: the value read is not copied.
        """
        events = [
            lambda: self.cache.invalidated(None),
            lambda: (self.cache.trackingLost("test"), self.cache.trackingStarted()),
            self.cache.trackingStarted,
        ]
        for event in events:
            self.redis.put(cache_key("domain", "example.org"), "OK 1", 300.0)
            self.redis.hold = True
            d = self.cache.get("domain", "example.org")
            self.flush()
            event()
            self.redis.hold = False
            self.redis.release()
            self.assertEqual(self.successResultOf(d), b"OK 1")
            self.assertIsNone(self.cache.peek("domain", "example.org"))

    def test_in_flight_bookkeeping_bounded(self) -> None:
        """Once its reads are answered, nothing is kept about an invalidated key."""
        self.redis.hold = True
        d = self.cache.get("domain", "example.org")
        self.flush()
        self.cache.invalidated([cache_key("domain", "example.org")])
        self.cache.invalidated([cache_key("domain", f"{n}.example") for n in range(100)])
        self.redis.hold = False
        self.redis.release()
        self.successResultOf(d)
        self.assertEqual(self.cache._inflight, {})
        self.assertEqual(self.cache._invalidatedAt, {})

    def test_every_waiter_fires_on_odd_reply(self) -> None:
        """
        One reply that cannot be copied (bytes that are not UTF-8, the
        lifetime question blowing up) leaves no other waiter of the batch
        without its answer.
        """
        self.redis.put(cache_key("alias", "b@example.org"), "OK c@example.org", 300.0)
        self.redis.hold = True
        first = self.cache.get("alias", "a@example.org")
        second = self.cache.get("alias", "b@example.org")
        self.flush()
        self.redis.hold = False
        self.redis.held[0] = (self.redis.held[0][0], [b"OK \xff\xfe", "OK c@example.org"])
        self.redis.failing.add("EVAL")
        self.redis.release()
        self.assertEqual(self.successResultOf(first), b"OK \xff\xfe")
        self.assertEqual(self.successResultOf(second), b"OK c@example.org")

    def test_every_waiter_fires_when_copy_raises(self) -> None:
        """Even a lifetime question that raises at once leaves every waiter answered."""
        self.redis.put(cache_key("alias", "a@example.org"), "OK x@example.org", 300.0)
        self.redis.put(cache_key("alias", "b@example.org"), "OK y@example.org", 300.0)

        def boom(*args: Any) -> Any:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

        self.cache._backend.lifetime = boom  # type: ignore[method-assign]
        first = self.cache.get("alias", "a@example.org")
        second = self.cache.get("alias", "b@example.org")
        self.flush()
        self.assertEqual(self.successResultOf(first), b"OK x@example.org")
        self.assertEqual(self.successResultOf(second), b"OK y@example.org")
        self.assertEqual(self.cache._inflight, {})


def _result(answer: defer.Deferred[bytes] | bytes, case: LookupsWithNearCacheTests) -> bytes:
    if isinstance(answer, bytes):
        return answer
    # An answer from Userli is given once its batched write has landed.
    case.flush()
    return case.successResultOf(answer)


class LookupsWithNearCacheTests(SynchronousTestCase):
    """L{Lookups} in front of a L{NearCache}."""

    def setUp(self) -> None:
        self.clock = TrackedClock()
        self.clock.advance(1000)
        self.redis = FakeRedis(self.clock)
        self.cache = NearCache(RedisCache(self.redis, 300.0), self.clock, 300.0)  # type: ignore[arg-type]
        self.clock.caches.append(self.cache)
        self.cache.trackingStarted()
        self.client = FakeLookupClient()
        self.metrics = Metrics(process=False)
        self.lookups = Lookups(self.client, self.cache, self.metrics, self.clock, "+")  # type: ignore[arg-type]

    def flush(self) -> None:
        """End the reactor turn: what was batched goes to Redis."""
        self.clock.advance(0)

    def cacheCount(self, handler: str, result: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "userli_postfix_adapter_lookup_cache_total", {"handler": handler, "result": result}
        )
        return value or 0.0

    def test_concurrent_identical_lookups_one_call(self) -> None:
        """
        100 identical lookups in flight at once cost one Redis command, one
        API call, and all get its answer.
        """
        answers = [self.lookups.answer(b"mailbox a@example.org") for _ in range(100)]
        self.flush()
        self.assertEqual(self.redis.names(), ["MGET"])
        self.assertEqual(self.client.calls, [("mailbox", "a@example.org")])
        self.client.answer(True)
        self.assertEqual({_result(a, self) for a in answers}, {b"OK 1"})
        self.assertEqual(self.client.calls, [("mailbox", "a@example.org")])
        self.flush()
        self.assertEqual(self.redis.names(), ["MGET", "SET"])

    def test_variants_share_one_call(self) -> None:
        """Keys that normalise alike share the call; each is cached as sent."""
        first = self.lookups.answer(b"mailbox a+x@example.org")
        second = self.lookups.answer(b"mailbox A@Example.org")
        self.flush()
        self.assertEqual(self.client.calls, [("mailbox", "a@example.org")])
        self.client.answer(True)
        self.assertEqual(_result(first, self), b"OK 1")
        self.assertEqual(_result(second, self), b"OK 1")
        self.assertEqual(self.cache.peek("mailbox", "a+x@example.org"), b"OK 1")
        self.assertEqual(self.cache.peek("mailbox", "A@Example.org"), b"OK 1")
        self.flush()
        self.assertEqual(self.redis.names(), ["MGET", "EVAL"])

    def test_hot_key_answered_at_once(self) -> None:
        """
        Once answered, a key is answered synchronously (no Deferred), with
        no Redis command and no API call, and counted as a cache hit.
        """
        pending = self.lookups.answer(b"domain example.org")
        self.flush()
        self.client.answer(True)
        self.assertEqual(_result(pending, self), b"OK 1")
        self.flush()
        self.redis.commands.clear()
        for _ in range(10):
            self.assertEqual(self.lookups.answer(b"domain example.org"), b"OK 1")
        self.flush()
        self.assertEqual(self.redis.commands, [])
        self.assertEqual(len(self.client.calls), 1)
        self.assertEqual(self.cacheCount("domain", "hit"), 10)
        self.assertEqual(self.cacheCount("domain", "miss"), 1)

    def test_other_process_answer_used(self) -> None:
        """An answer another process put in Redis is used without an API call."""
        self.redis.put(cache_key("alias", "info@example.org"), "OK a@example.org", 300)
        answer = self.lookups.answer(b"alias info@example.org")
        self.flush()
        self.assertEqual(_result(answer, self), b"OK a@example.org")
        self.assertEqual(self.client.calls, [])
        self.assertEqual(self.lookups.answer(b"alias info@example.org"), b"OK a@example.org")

    def test_notfound_not_cached(self) -> None:
        """NOTFOUND is never kept: the next lookup asks again, so a new mailbox works at once."""
        first = self.lookups.answer(b"mailbox new@example.org")
        self.flush()
        self.client.answer(False)
        self.assertEqual(_result(first, self), b"NOTFOUND ")
        self.assertIsNone(self.cache.peek("mailbox", "new@example.org"))
        second = self.lookups.answer(b"mailbox new@example.org")
        self.flush()
        self.assertEqual(len(self.client.calls), 2)
        self.client.answer(True)
        self.assertEqual(_result(second, self), b"OK 1")

    def test_temporary_failure_not_cached(self) -> None:
        """An API failure is a TEMP answer and is not kept."""
        answer = self.lookups.answer(b"mailbox a@example.org")
        self.flush()
        self.client.answer(UserliError("boom"))
        self.assertTrue(_result(answer, self).startswith(b"TEMP "))
        self.assertIsNone(self.cache.peek("mailbox", "a@example.org"))
        self.assertEqual(len(self.cache), 0)

    def test_invalid_key_never_asked(self) -> None:
        """A key that fails normalisation is NOTFOUND without Redis or the API."""
        self.assertEqual(self.lookups.answer(b"mailbox not an address"), b"NOTFOUND ")
        self.flush()
        self.assertEqual(self.redis.commands, [])
        self.assertEqual(self.client.calls, [])

    def test_stored_before_given(self) -> None:
        """
        An answer from Userli is given only once Redis has it, so the next
        lookup finds it in this process and in every other on the same
        Redis (the Go program writes before it replies); a write that fails
        does not hold the answer back.
        """
        self.redis.hold = True
        answer = self.lookups.answer(b"mailbox a@example.org")
        self.flush()
        self.redis.release()  # the GET: a miss
        self.client.answer(True)
        self.flush()
        self.assertEqual(self.redis.names(), ["GET", "SET"])
        self.assertNoResult(answer)
        self.redis.release()  # the SET lands
        self.assertEqual(self.successResultOf(answer), b"OK 1")
        self.redis.hold = False
        self.redis.failing.add("SET")
        answer = self.lookups.answer(b"mailbox b@example.org")
        self.flush()
        self.client.answer(True)
        self.assertEqual(_result(answer, self), b"OK 1")

    def test_redis_down_still_answers(self) -> None:
        """
        With Redis down lookups go to the API, every time: an answer Redis
        did not store is not kept in the process either.
        """
        self.redis.down = True
        for _ in range(2):
            answer = self.lookups.answer(b"mailbox a@example.org")
            self.flush()
            self.client.answer(True)
            self.assertEqual(_result(answer, self), b"OK 1")
        self.assertEqual(self.cacheCount("mailbox", "error"), 2)
        self.assertEqual(len(self.client.calls), 2)
