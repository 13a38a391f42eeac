"""
Sliding windows of sent messages per sender: one interface, two backends.

The Redis backend keeps the Go program's layout exactly, so an operator can
switch programs in either direction and every sender's window carries on:

- key ``userli:ratelimit:sender:<identity>``, a sorted set;
- member ``<unix-nanoseconds>:<8 hex characters>``, score the unix
  nanoseconds of the attempt;
- the key expires 25 h after the last attempt.

One step, atomic in a Lua script: drop members older than 24 h, record this
attempt (rejected attempts too, so a sender who keeps trying stays blocked
instead of getting a free reset when old messages age out), count the last
hour and the last day, and refuse when a non-zero limit is exceeded (the
counts include this attempt, so a limit of N lets exactly N through).

The boundaries are the script's: a message exactly 24 h old still counts
for the day, a message exactly 1 h old no longer counts for the hour.

Beyond the Go program, each step keeps only the newest L{members_kept}
members (one more than the larger non-zero limit): a sender who keeps
trying would otherwise add a member per attempt, millions a day, all of
them kept for 24 h.  Every decision stays exactly the same (see
L{members_kept}), and a window written by the Go program, however large,
is cut down at our first step.

The memory backend, used when no Redis is configured, has the same
semantics and forgets senders that have been quiet for 25 h.
"""

from __future__ import annotations

import hashlib
import random
from bisect import bisect_left, bisect_right, insort
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from userli_postfix.config import Config
from userli_postfix.metrics import Metrics
from userli_postfix.redisclient import RedisClient
from userli_postfix.userli import Quota

log = Logger()

KEY_PREFIX = "userli:ratelimit:sender:"

NS_PER_SECOND = 1_000_000_000
HOUR_NS = 3600 * NS_PER_SECOND
DAY_NS = 24 * HOUR_NS

# Slightly longer than the day window, so no member that still counts is
# lost with its key, while a quiet sender's key goes away on its own.
KEY_TTL_SECONDS = 25 * 3600
KEY_TTL_NS = KEY_TTL_SECONDS * NS_PER_SECOND

# A limit this large is never reached (it would take over 11,000 messages a
# second for a day); the window is then kept whole, as the Go program keeps
# it.  Also keeps the rank the script computes from it an integer that Lua
# writes out as one (doubles print in exponent form from 1e14 on).
MAX_KEPT = 10**9

# Steps sent to Redis in one script call at most; a call of this size keeps
# Redis busy for well under a millisecond.
MAX_BATCH = 128

# The Go program's algorithm, written out again, for several steps at once:
# steps that arrive in the same turn of the reactor share one round trip
# (each step is still atomic, and steps of one key run in arrival order).
# KEYS: the window of each step.  ARGV: the key TTL in seconds, then for
# each step, in the order of KEYS: per-hour limit, per-day limit, the
# members to keep (0: all), now, now - 1 h, now - 24 h (unix nanoseconds,
# as decimal strings so that no precision is lost before Redis parses them)
# and the member suffix.
# Returns {allowed (1 or 0), count of the last hour, count of the last day}
# for each step, one after the other; {-1, error text, 0} for a step whose
# key Redis refused (a key of another type: WRONGTYPE).  Every command runs
# under redis.pcall and a step stops at its first error, so one odd key
# fails its own step only: the steps before and after it in the call are
# applied and answered as if it were not there.
SCRIPT = """\
local ttl = tonumber(ARGV[1])

local function failed(reply)
    return type(reply) == 'table' and reply.err ~= nil
end

local function step(key, at)
    local now = ARGV[at + 4]
    local reply = redis.pcall('ZREMRANGEBYSCORE', key, '-inf', '(' .. ARGV[at + 6])
    if failed(reply) then return reply end
    reply = redis.pcall('ZADD', key, now, now .. ':' .. ARGV[at + 7])
    if failed(reply) then return reply end
    local keep = tonumber(ARGV[at + 3])
    if keep > 0 then
        reply = redis.pcall('ZREMRANGEBYRANK', key, 0, -keep - 1)
        if failed(reply) then return reply end
    end
    reply = redis.pcall('EXPIRE', key, ttl)
    if failed(reply) then return reply end
    local day_count = redis.pcall('ZCARD', key)
    if failed(day_count) then return day_count end
    local hour_count = redis.pcall('ZCOUNT', key, '(' .. ARGV[at + 5], '+inf')
    if failed(hour_count) then return hour_count end
    local per_hour = tonumber(ARGV[at + 1])
    local per_day = tonumber(ARGV[at + 2])
    local allowed = 1
    if (per_hour > 0 and hour_count > per_hour) or (per_day > 0 and day_count > per_day) then
        allowed = 0
    end
    return {allowed, hour_count, day_count}
end

local result = {}
for i, key in ipairs(KEYS) do
    local reply = step(key, 1 + (i - 1) * 7)
    if failed(reply) then
        reply = {-1, tostring(reply.err), 0}
    end
    result[#result + 1] = reply[1]
    result[#result + 1] = reply[2]
    result[#result + 1] = reply[3]
end
return result
"""

SCRIPT_SHA = hashlib.sha1(SCRIPT.encode("utf-8")).hexdigest()


def window_key(identity: str) -> str:
    """The Go program's Redis key of C{identity}'s window."""
    return KEY_PREFIX + identity


def random_suffix() -> str:
    """
    Eight hex characters that keep two attempts of the same nanosecond
    apart; they need to be distinct, not secret.
    """
    return f"{random.getrandbits(32):08x}"


def unix_ns(clock: IReactorTime) -> int:
    """The clock's time in whole unix nanoseconds."""
    return int(clock.seconds() * NS_PER_SECOND)


def members_kept(quota: Quota) -> int:
    """
    How many of a window's newest members the decisions under C{quota}
    need: one more than the larger non-zero limit; 0 (keep all) when
    neither limit is set, which is never checked.

    Kept to the newest M members, a window counts min(n, M) where it would
    count n, for the hour as for the day: the members of the last hour are
    the newest ones, and dropping a window's oldest members commutes with
    dropping those older than 24 h and with adding a newer one, so the
    kept members are always the newest M of what the Go program would keep,
    whoever wrote them.  With M greater than a non-zero limit L, min(n, M)
    > L exactly when n > L: every comparison, hence every decision, is the
    one the whole window gives.  A limit of 0 compares nothing, so its
    count may be cut too: with 3 per hour and no daily limit, 4 members
    are enough, and the day count (not used) reads at most 4.

    The counts above M are not kept, so they cannot be reported either:
    the counts of a step read at most M.  And when a quota is raised, a
    sender who had been trying far beyond the old one is judged by the
    attempts kept for the old one (at least its limit + 1), so gets the
    new quota's room sooner than the whole window would give.
    """
    largest = max(quota.per_hour, quota.per_day)
    if largest <= 0 or largest >= MAX_KEPT:
        return 0
    return largest + 1


def exceeds(quota: Quota, hour_count: int, day_count: int) -> bool:
    """
    Whether counts that include the current attempt exceed C{quota}; a
    limit of 0 is no limit.
    """
    return (0 < quota.per_hour < hour_count) or (0 < quota.per_day < day_count)


def counts(stamps: list[int], now: int) -> tuple[int, int]:
    """
    The (last hour, last day) counts of a window's sorted attempt times at
    C{now}, with the script's boundaries: exactly 24 h old still counts for
    the day, exactly 1 h old no longer counts for the hour.
    """
    day = len(stamps) - bisect_left(stamps, now - DAY_NS)
    hour = len(stamps) - bisect_right(stamps, now - HOUR_NS)
    return hour, day


def next_allowed(quota: Quota, stamps: list[int], now: int) -> int:
    """
    When (unix nanoseconds, C{now} or later) the next attempt would be
    allowed, given a window's sorted attempt times and no attempt before
    then (every attempt counts, a refused one too, and pushes this back).
    """
    at = now
    hour, day = counts(stamps, now)
    if 0 < quota.per_hour <= hour:
        # The attempt that must leave the hour for one more to fit.
        oldest = stamps[len(stamps) - hour + (hour - quota.per_hour)]
        at = max(at, oldest + HOUR_NS)
    if 0 < quota.per_day <= day:
        oldest = stamps[len(stamps) - day + (day - quota.per_day)]
        at = max(at, oldest + DAY_NS + 1)
    return at


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of one step: allowed or not, and the counts it saw."""

    allowed: bool
    hour_count: int
    day_count: int


class RateLimitError(Exception):
    """The window could not be read or updated; the caller fails open."""


class RateLimiter(Protocol):
    """
    Records one attempt of a sender and says whether it is within quota.

    C{check} answers at once when it can (memory) and with a Deferred when
    it must wait (Redis), as the socketmap lookups do, so the hot path of
    a single server costs no Deferred.  The Deferred fails with
    L{RateLimitError} when the backend cannot answer; the failure has
    already been counted in the metrics and logged.
    """

    def check(self, identity: str, quota: Quota) -> Verdict | defer.Deferred[Verdict]: ...


class _Window:
    """One sender's attempts (sorted unix nanoseconds) and when it last tried."""

    __slots__ = ("stamps", "touched")

    def __init__(self) -> None:
        self.stamps: list[int] = []
        self.touched = 0


class MemoryRateLimiter:
    """
    The windows in this process's memory: the Redis script's semantics,
    without Redis, for a single server.

    Memory is bounded by activity: a sender's timestamps older than 24 h are
    dropped at its next attempt, only the newest L{members_kept} are kept
    however fast it tries, and a sender quiet for 25 h is forgotten
    (checked on every step, oldest first, so the cost is constant per
    message and no timer is needed).
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        # Least recently active first.
        self._windows: OrderedDict[str, _Window] = OrderedDict()

    def __len__(self) -> int:
        """Senders currently remembered."""
        return len(self._windows)

    def step(self, identity: str, quota: Quota) -> Verdict:
        """Record one attempt of C{identity} now and judge it against C{quota}."""
        now = unix_ns(self._clock)
        self._forgetIdle(now)
        windows = self._windows
        window = windows.get(identity)
        if window is None:
            window = windows[identity] = _Window()
        else:
            windows.move_to_end(identity)
        window.touched = now
        stamps = window.stamps
        day_ago = now - DAY_NS
        if stamps and stamps[0] < day_ago:
            del stamps[: bisect_left(stamps, day_ago)]
        if not stamps or stamps[-1] <= now:
            stamps.append(now)
        else:
            # The clock went backwards: keep the list sorted, as a sorted set is.
            insort(stamps, now)
        keep = members_kept(quota)
        if keep and len(stamps) > keep:
            del stamps[: len(stamps) - keep]
        day_count = len(stamps)
        hour_count = day_count - bisect_right(stamps, now - HOUR_NS)
        return Verdict(not exceeds(quota, hour_count, day_count), hour_count, day_count)

    def check(self, identity: str, quota: Quota) -> Verdict:
        """L{step}, as the L{RateLimiter} interface asks; never fails."""
        return self.step(identity, quota)

    def _forgetIdle(self, now: int) -> None:
        windows = self._windows
        expired = now - KEY_TTL_NS
        while windows:
            oldest = next(iter(windows.values()))
            if oldest.touched > expired:
                break
            windows.popitem(last=False)


class RedisRateLimiter:
    """
    The windows in Redis, shared by every daemon (and every Go adapter)
    that uses the same Redis: several instances enforce one quota.

    Steps asked for in the same turn of the reactor (a burst of messages
    from many Postfix processes) go to Redis together, in one script call,
    up to L{MAX_BATCH} at a time: one round trip and one command for all
    of them instead of one each, which is what keeps the policy service
    fast when Redis is on the path of every message.

    The script is loaded with the first EVAL and then run by its hash; when
    Redis answers NOSCRIPT (it restarted or its script cache was flushed)
    the call is sent again with the script itself.  Every command has the
    Redis client's deadline, so a dead Redis costs at most that long.
    """

    def __init__(
        self,
        redis: RedisClient,
        clock: IReactorTime,
        metrics: Metrics,
        suffix: Callable[[], str] = random_suffix,
        max_batch: int = MAX_BATCH,
    ) -> None:
        self._redis = redis
        self._clock = clock
        self._suffix = suffix
        self._maxBatch = max_batch
        self._errors = metrics.ratelimit_backend_errors.labels("check")
        self._loaded = False
        self._keys: list[str] = []
        self._args: list[int | str] = []
        self._waiters: list[defer.Deferred[Verdict]] = []
        self._flushCall: IDelayedCall | None = None

    def check(self, identity: str, quota: Quota) -> defer.Deferred[Verdict]:
        now = unix_ns(self._clock)
        waiter: defer.Deferred[Verdict] = defer.Deferred()
        self._keys.append(window_key(identity))
        self._args.extend(
            (
                quota.per_hour,
                quota.per_day,
                members_kept(quota),
                now,
                now - HOUR_NS,
                now - DAY_NS,
                self._suffix(),
            )
        )
        self._waiters.append(waiter)
        if len(self._waiters) >= self._maxBatch:
            self._flush()
        elif self._flushCall is None:
            self._flushCall = self._clock.callLater(0, self._flush)
        return waiter

    def _flush(self) -> None:
        if self._flushCall is not None:
            if self._flushCall.active():
                self._flushCall.cancel()
            self._flushCall = None
        keys, args, waiters = self._keys, self._args, self._waiters
        self._keys, self._args, self._waiters = [], [], []
        command = (len(keys), *keys, KEY_TTL_SECONDS, *args)
        if self._loaded:
            d = self._redis.execute("EVALSHA", SCRIPT_SHA, *command)
            d.addErrback(self._reload, command)
        else:
            d = self._eval(command)
        d.addCallbacks(self._deliver, self._fail, callbackArgs=(waiters,), errbackArgs=(waiters,))

    def _eval(self, command: tuple[Any, ...]) -> defer.Deferred[Any]:
        def loaded(result: Any) -> Any:
            self._loaded = True
            return result

        return self._redis.execute("EVAL", SCRIPT, *command).addCallback(loaded)

    def _reload(self, failure: Failure, command: tuple[Any, ...]) -> defer.Deferred[Any] | Failure:
        if str(failure.value).startswith("NOSCRIPT"):
            log.info("Redis lost the rate-limit script; sending it again")
            self._loaded = False
            return self._eval(command)
        return failure

    def _deliver(self, reply: Any, waiters: list[defer.Deferred[Verdict]]) -> None:
        if not isinstance(reply, list) or len(reply) != 3 * len(waiters):
            error = RateLimitError(f"unexpected reply from the rate-limit script: {reply!r:.200}")
            self._fail(Failure(error), waiters)
            return
        # Each step's answer on its own: one odd key fails its own sender only.
        problems: list[str] = []
        answers: list[tuple[defer.Deferred[Verdict], Verdict | RateLimitError]] = []
        for index, waiter in enumerate(waiters):
            allowed, hour, day = reply[3 * index : 3 * index + 3]
            if type(allowed) is int and type(hour) is int and type(day) is int and allowed >= 0:
                answers.append((waiter, Verdict(allowed == 1, hour, day)))
                continue
            if allowed == -1 and isinstance(hour, str | bytes):
                text = hour.decode("utf-8", "replace") if isinstance(hour, bytes) else hour
                problem = f"Redis refused the step: {text:.200}"
            else:
                problem = f"unexpected reply from the rate-limit script: {reply!r:.200}"
            problems.append(problem)
            answers.append((waiter, RateLimitError(problem)))
        if problems:
            self._errors.inc(len(problems))
            log.warn(
                "Rate-limit check of {count} of {total} message(s) failed: {error}",
                count=len(problems),
                total=len(waiters),
                error=problems[0],
            )
        for waiter, answer in answers:
            if isinstance(answer, Verdict):
                waiter.callback(answer)
            else:
                waiter.errback(answer)

    def _fail(self, failure: Failure, waiters: list[defer.Deferred[Verdict]]) -> None:
        self._errors.inc(len(waiters))
        log.warn(
            "Rate-limit check of {count} message(s) failed: {error}",
            count=len(waiters),
            error=failure.value,
        )
        if not failure.check(RateLimitError):
            failure = Failure(RateLimitError(f"{type(failure.value).__name__}: {failure.value}"))
        for waiter in waiters:
            waiter.errback(failure)


def makeRateLimiter(
    config: Config, clock: IReactorTime, redis: RedisClient | None, metrics: Metrics
) -> RateLimiter:
    """
    The rate limiter the daemon uses: in Redis when the daemon has a Redis
    client (C{REDIS_URL}), else in memory.
    """
    if redis is not None:
        return RedisRateLimiter(redis, clock, metrics)
    return MemoryRateLimiter(clock)
