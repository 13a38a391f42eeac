"""
Tests for L{userli_postfix.ratelimit}: the window arithmetic (against the
memory backend here; the same suite runs against a real Redis in
C{tests/integration/test_policy_redis.py}), the memory backend's bound, and
what the Redis backend sends and how it fails.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import txredisapi
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from userli_postfix.config import Config
from userli_postfix.metrics import Metrics
from userli_postfix.ratelimit import (
    DAY_NS,
    HOUR_NS,
    KEY_TTL_SECONDS,
    MAX_KEPT,
    NS_PER_SECOND,
    SCRIPT,
    SCRIPT_SHA,
    MemoryRateLimiter,
    RateLimiter,
    RateLimitError,
    RedisRateLimiter,
    Verdict,
    counts,
    exceeds,
    makeRateLimiter,
    members_kept,
    next_allowed,
    random_suffix,
    unix_ns,
    window_key,
)
from userli_postfix.redisclient import RedisClient, RedisUnavailable
from userli_postfix.userli import Quota

# A realistic wall-clock start (November 2023), so that nanosecond scores
# have the magnitude they have in production.
START = 1_700_000_000.0
HOUR = 3600.0
DAY = 24 * HOUR


class WindowArithmeticMixin:
    """
    The semantics of one sliding-window step, whatever the backend: mixed
    into a C{SynchronousTestCase} that provides L{makeLimiter}.
    """

    clock: task.Clock

    def makeLimiter(self, clock: task.Clock) -> RateLimiter:
        raise NotImplementedError

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.clock.advance(START)
        self.limiter = self.makeLimiter(self.clock)

    def step(self, quota: Quota, identity: str = "limited@example.org") -> Verdict:
        result = self.limiter.check(identity, quota)
        if isinstance(result, defer.Deferred):
            # The Redis backend sends what was asked in one turn of the reactor.
            self.clock.advance(0)
            verdict: Verdict = self.successResultOf(result)  # type: ignore[attr-defined]
            return verdict
        return result

    def steps(self, count: int, quota: Quota, identity: str = "limited@example.org") -> list[bool]:
        return [self.step(quota, identity).allowed for _ in range(count)]

    def test_limitOfNAllowsExactlyN(self) -> None:
        """
        A limit of N lets exactly N messages through; the counts include
        the current attempt.
        """
        quota = Quota(per_hour=3, per_day=0)
        verdicts = [self.step(quota) for _ in range(4)]
        self.assertEqual([v.allowed for v in verdicts], [True, True, True, False])
        self.assertEqual([v.hour_count for v in verdicts], [1, 2, 3, 4])
        self.assertEqual([v.day_count for v in verdicts], [1, 2, 3, 4])

    def test_limitOfOne(self) -> None:
        """A limit of 1 allows one message, the second is refused."""
        self.assertEqual(self.steps(2, Quota(per_hour=1, per_day=0)), [True, False])

    def test_hourBoundary(self) -> None:
        """
        A message stops counting for the hour when it is exactly one hour
        old, not a moment earlier.
        """
        quota = Quota(per_hour=1, per_day=0)
        self.assertTrue(self.step(quota).allowed)
        self.clock.advance(HOUR - 1)
        # One second short of an hour: still counted (and this attempt is
        # recorded too).
        self.assertEqual(self.step(quota), Verdict(False, 2, 2))
        self.clock.advance(1)
        # The first message is now exactly one hour old; the refused attempt
        # of a second ago still counts.  (The window keeps the newest
        # limit + 1 = 2 members, so the day count reads 2, not 3.)
        self.assertEqual(self.step(quota), Verdict(False, 2, 2))
        self.clock.advance(HOUR)
        self.assertEqual(self.step(quota), Verdict(True, 1, 2))

    def test_dayBoundary(self) -> None:
        """
        A message counts for the day up to and including the moment it is
        exactly 24 hours old, and is forgotten after that.
        """
        quota = Quota(per_hour=0, per_day=2)
        self.assertEqual(self.steps(2, quota), [True, True])
        self.clock.advance(DAY)
        self.assertEqual(self.step(quota), Verdict(False, 1, 3))
        self.clock.advance(1)
        # The two messages are older than 24 h; the refused attempt of a
        # second ago still counts.
        self.assertEqual(self.step(quota), Verdict(True, 2, 2))

    def test_rejectedAttemptsAreCounted(self) -> None:
        """
        A sender who keeps trying while over the limit keeps their own
        window full: refused attempts count like sent messages.
        """
        quota = Quota(per_hour=2, per_day=0)
        self.assertEqual(self.steps(2, quota), [True, True])
        for _ in range(12):
            self.clock.advance(10 * 60)
            self.assertFalse(self.step(quota).allowed)
        # Two hours on, the sender is still blocked because of the retries
        # (7 of them in the last hour, counted up to limit + 1).
        self.assertEqual(self.step(quota), Verdict(False, 3, 3))

    def test_hourLimitAlone(self) -> None:
        """The hourly limit refuses although the daily one would allow."""
        quota = Quota(per_hour=2, per_day=10)
        self.assertEqual(self.steps(3, quota), [True, True, False])
        self.clock.advance(HOUR)
        # The hour is over: the sender may send again.
        self.assertEqual(self.steps(2, quota), [True, True])

    def test_dayLimitAlone(self) -> None:
        """The daily limit refuses although the hourly one would allow."""
        quota = Quota(per_hour=2, per_day=3)
        self.assertEqual(self.steps(2, quota), [True, True])
        self.clock.advance(HOUR)
        self.assertEqual(self.step(quota), Verdict(True, 1, 3))
        self.assertEqual(self.step(quota), Verdict(False, 2, 4))

    def test_zeroHourlyIsUnlimited(self) -> None:
        """A per-hour limit of 0 limits nothing; the daily limit still holds."""
        quota = Quota(per_hour=0, per_day=5)
        self.assertEqual(self.steps(6, quota), [True] * 5 + [False])

    def test_zeroDailyIsUnlimited(self) -> None:
        """A per-day limit of 0 limits nothing; the hourly limit still holds."""
        quota = Quota(per_hour=3, per_day=0)
        for _ in range(10):
            self.assertEqual(self.steps(3, quota), [True, True, True])
            self.clock.advance(HOUR)
        # 31 messages today, counted up to limit + 1: no daily limit to judge.
        self.assertEqual(self.step(quota), Verdict(True, 1, 4))

    def test_sendersAreIndependent(self) -> None:
        """One sender's window does not count another's messages."""
        quota = Quota(per_hour=1, per_day=0)
        self.assertTrue(self.step(quota, "a@example.org").allowed)
        self.assertFalse(self.step(quota, "a@example.org").allowed)
        self.assertTrue(self.step(quota, "b@example.org").allowed)

    def windowSize(self, identity: str = "limited@example.org") -> int:
        """Members the backend keeps for C{identity}."""
        raise NotImplementedError

    def test_hammeringSenderStaysSmall(self) -> None:
        """
        500 attempts at 100 a second with a quota of 3 per hour: three
        pass, every other is refused, the counts read the true counts up
        to 4 (limit + 1), and the window never holds more than 4 members.
        """
        quota = Quota(per_hour=3, per_day=0)
        for n in range(1, 501):
            verdict = self.step(quota)
            self.assertEqual(verdict, Verdict(n <= 3, min(n, 4), min(n, 4)), n)
            self.assertLessEqual(self.windowSize(), 4)
            self.clock.advance(0.01)
        self.assertEqual(self.windowSize(), 4)
        self.clock.advance(HOUR)
        # The hour is over (the newest attempts are the ones kept).
        self.assertEqual(self.steps(4, quota), [True, True, True, False])

    def test_keptForTheLargerLimit(self) -> None:
        """
        With both limits set, the window keeps enough for the larger: the
        hourly limit refuses, an hour later the daily one does, exactly as
        the whole window would.
        """
        quota = Quota(per_hour=2, per_day=5)
        self.assertEqual(self.steps(50, quota), [True, True] + [False] * 48)
        self.assertEqual(self.windowSize(), 6)
        self.clock.advance(HOUR)
        self.assertEqual(self.step(quota), Verdict(False, 1, 6))

    def test_sameInstant(self) -> None:
        """Several messages in the same nanosecond are all counted."""
        quota = Quota(per_hour=5, per_day=0)
        self.assertEqual(self.step(quota), Verdict(True, 1, 1))
        self.assertEqual([self.step(quota).hour_count for _ in range(5)], [2, 3, 4, 5, 6])


class MemoryWindowArithmeticTests(WindowArithmeticMixin, SynchronousTestCase):
    """The window arithmetic of the memory backend."""

    def makeLimiter(self, clock: task.Clock) -> RateLimiter:
        self.memory = MemoryRateLimiter(clock)
        return self.memory

    def windowSize(self, identity: str = "limited@example.org") -> int:
        return len(self.memory._windows[identity].stamps)


class MembersKeptTests(SynchronousTestCase):
    """The trimming rule: how many of a window's newest members are kept."""

    def test_table(self) -> None:
        """
        One more than the larger non-zero limit; all when neither is set,
        or when the larger is beyond any rate a sender can reach.
        """
        table = [
            (Quota(3, 0), 4),
            (Quota(0, 3), 4),
            (Quota(3, 20), 21),
            (Quota(20, 3), 21),
            (Quota(1, 1), 2),
            (Quota(0, 0), 0),
            (Quota(MAX_KEPT - 1, 5), MAX_KEPT),
            (Quota(5, MAX_KEPT), 0),
            (Quota(10**30, 0), 0),
        ]
        for quota, expected in table:
            self.assertEqual(members_kept(quota), expected, quota)

    @given(
        st.sampled_from([Quota(3, 0), Quota(0, 4), Quota(2, 5), Quota(6, 2), Quota(1, 1)]),
        st.lists(
            st.sampled_from([0.0, 0.001, 1.0, 60.0, 600.0, HOUR - 1, HOUR, HOUR + 1, DAY]),
            min_size=1,
            max_size=60,
        ),
    )
    @settings(max_examples=300, deadline=None)
    def test_decisionsOfTheWholeWindow(self, quota: Quota, gaps: list[float]) -> None:
        """
        Whatever the rhythm of the attempts, the trimmed window decides
        exactly as the whole window (the Go program's, kept here as a plain
        list) does, and counts what it counts up to L{members_kept}.
        """
        clock = task.Clock()
        clock.advance(START)
        limiter = MemoryRateLimiter(clock)
        keep = members_kept(quota)
        everything: list[int] = []
        for gap in gaps:
            clock.advance(gap)
            now = int(clock.seconds() * 10**9)
            everything = [t for t in everything if t >= now - DAY_NS] + [now]
            day = len(everything)
            hour = sum(1 for t in everything if t > now - HOUR_NS)
            verdict = limiter.step("a@example.org", quota)
            self.assertEqual(verdict.allowed, not exceeds(quota, hour, day))
            self.assertEqual(
                (verdict.hour_count, verdict.day_count), (min(hour, keep), min(day, keep))
            )


class MemoryRateLimiterTests(SynchronousTestCase):
    """What only the memory backend has to get right: its memory."""

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.clock.advance(START)
        self.limiter = MemoryRateLimiter(self.clock)
        self.quota = Quota(per_hour=10, per_day=100)

    def test_idleSendersAreForgotten(self) -> None:
        """
        A sender quiet for 25 hours is forgotten at the next step of anyone,
        as Redis expires the key of a quiet sender.
        """
        self.limiter.step("a@example.org", self.quota)
        self.clock.advance(HOUR)
        self.limiter.step("b@example.org", self.quota)
        self.assertEqual(len(self.limiter), 2)
        self.clock.advance(24 * HOUR - 1)
        self.limiter.step("c@example.org", self.quota)
        self.assertEqual(len(self.limiter), 3)
        self.clock.advance(1)
        self.limiter.step("c@example.org", self.quota)
        self.assertEqual(len(self.limiter), 2)
        self.clock.advance(HOUR)
        self.limiter.step("c@example.org", self.quota)
        self.assertEqual(len(self.limiter), 1)

    def test_activityKeepsASender(self) -> None:
        """A sender who sends now and then is never forgotten."""
        for _ in range(10):
            self.limiter.step("a@example.org", self.quota)
            self.clock.advance(20 * HOUR)
        self.limiter.step("b@example.org", self.quota)
        self.assertEqual(len(self.limiter), 2)

    def test_oldTimestampsAreDropped(self) -> None:
        """A sender's window keeps at most a day of attempts."""
        for _ in range(48):
            self.limiter.step("a@example.org", self.quota)
            self.clock.advance(HOUR)
        # The attempts of the last 24 h, the one exactly 24 h old included,
        # and this one.
        self.assertEqual(self.limiter.step("a@example.org", self.quota).day_count, 25)

    def test_clockGoingBackwards(self) -> None:
        """
        When the wall clock steps back, an attempt still lands in its place
        in time, as in a sorted set, and counts are right.
        """
        quota = Quota(per_hour=0, per_day=0)
        self.limiter.step("a@example.org", quota)
        self.clock.advance(-2 * HOUR)
        # The attempt "two hours ago" counts; the one in its future too.
        self.assertEqual(self.limiter.step("a@example.org", quota), Verdict(True, 2, 2))
        self.clock.advance(2 * HOUR + 1)
        self.assertEqual(self.limiter.step("a@example.org", quota), Verdict(True, 2, 3))

    def test_checkAnswersAtOnce(self) -> None:
        """C{check} is C{step}: the verdict itself, no Deferred to wait for."""
        self.assertEqual(self.limiter.check("a@example.org", self.quota), Verdict(True, 1, 1))


class ExceedsTests(SynchronousTestCase):
    """The limit comparison, table-driven."""

    def test_table(self) -> None:
        """C{count > limit} for each non-zero limit; 0 is no limit."""
        cases = [
            (Quota(0, 0), 10**6, 10**6, False),
            (Quota(3, 0), 3, 99, False),
            (Quota(3, 0), 4, 4, True),
            (Quota(0, 3), 99, 3, False),
            (Quota(0, 3), 1, 4, True),
            (Quota(2, 5), 2, 5, False),
            (Quota(2, 5), 3, 3, True),
            (Quota(2, 5), 1, 6, True),
        ]
        for quota, hour, day, expected in cases:
            self.assertEqual(exceeds(quota, hour, day), expected, (quota, hour, day))


class NextAllowedTests(SynchronousTestCase):
    """
    L{counts} and L{next_allowed}, what C{userli-postfix quota show}
    reports, checked against the memory limiter (the script's semantics).
    """

    def test_counts(self) -> None:
        """The script's boundaries: 24 h old counts for the day, 1 h old not for the hour."""
        now = 100 * DAY_NS
        stamps = [now - DAY_NS - 1, now - DAY_NS, now - HOUR_NS, now - HOUR_NS + 1, now]
        self.assertEqual(counts(stamps, now), (2, 4))

    def test_allowedNow(self) -> None:
        """Within quota, or unlimited: now."""
        now = 100 * DAY_NS
        self.assertEqual(next_allowed(Quota(3, 10), [now - 5, now - 4], now), now)
        self.assertEqual(next_allowed(Quota(0, 0), [now - 1] * 50, now), now)

    def test_agreesWithTheLimiter(self) -> None:
        """
        For hourly, daily and both limits: a sender who used them up (the
        refused attempt counted too) is still refused a millisecond before
        the time L{next_allowed} gives, and allowed a millisecond after.
        """
        for quota in (Quota(3, 0), Quota(0, 4), Quota(2, 5)):
            for gap in (1, 60, 600):
                clock = task.Clock()
                clock.advance(1_700_000_000)
                before, after = MemoryRateLimiter(clock), MemoryRateLimiter(clock)
                stamps: list[int] = []
                while True:
                    stamps.append(unix_ns(clock))
                    allowed = before.step("a@x", quota).allowed
                    after.step("a@x", quota)
                    if not allowed:
                        break
                    clock.advance(gap)
                now = unix_ns(clock)
                at = next_allowed(quota, stamps, now)
                self.assertGreater(at, now, (quota, gap))
                clock.advance((at - now) / NS_PER_SECOND - 0.001)
                self.assertFalse(before.step("a@x", quota).allowed, (quota, gap))
                clock.advance(0.002)
                self.assertTrue(after.step("a@x", quota).allowed, (quota, gap))


WRONGTYPE = "Operation against a key holding the wrong kind of value"


class FakeRedis:
    """
    Stands in for L{RedisClient}: records commands and answers each with the
    next prepared result (a value or an exception).
    """

    def __init__(self) -> None:
        self.commands: list[tuple[Any, ...]] = []
        self.results: list[Any] = []

    def execute(self, command: str, *args: Any) -> defer.Deferred[Any]:
        self.commands.append((command, *args))
        result = self.results.pop(0)
        if isinstance(result, Exception):
            return defer.fail(result)
        return defer.succeed(result)


class RedisRateLimiterTests(SynchronousTestCase):
    """What the Redis backend sends, and how it fails open."""

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.clock.advance(START)
        self.redis = FakeRedis()
        self.metrics = Metrics(process=False)
        self.limiter = RedisRateLimiter(
            self.redis,  # type: ignore[arg-type]
            self.clock,
            self.metrics,
            suffix=lambda: "0badcafe",
            max_batch=4,
        )
        self.quota = Quota(per_hour=3, per_day=20)

    def errors(self) -> float:
        value = self.metrics.registry.get_sample_value(
            "userli_postfix_adapter_ratelimit_backend_errors_total", {"operation": "check"}
        )
        return value or 0.0

    def check(self, identity: str = "limited@example.org") -> defer.Deferred[Verdict]:
        """One check, sent at once (the end of the reactor's turn)."""
        d = self.limiter.check(identity, self.quota)
        self.clock.advance(0)
        return d

    def test_goLayout(self) -> None:
        """
        The step is the script with the Go program's key, nanosecond
        timestamps, member suffix and 25 h TTL.
        """
        self.redis.results.append([1, 1, 1])
        self.assertEqual(self.successResultOf(self.check()), Verdict(True, 1, 1))
        now = 1_700_000_000 * 10**9
        self.assertEqual(
            self.redis.commands,
            [
                (
                    "EVAL",
                    SCRIPT,
                    1,
                    "userli:ratelimit:sender:limited@example.org",
                    90000,
                    3,
                    20,
                    21,
                    now,
                    now - 3600 * 10**9,
                    now - 86400 * 10**9,
                    "0badcafe",
                )
            ],
        )
        self.assertEqual(KEY_TTL_SECONDS, 25 * 3600)
        self.assertEqual((HOUR_NS, DAY_NS), (3600 * 10**9, 86400 * 10**9))

    def test_oneTurnOneCall(self) -> None:
        """
        Steps asked for in the same turn of the reactor share one script
        call, each with its own limits, and each gets its own verdict.
        """
        self.redis.results.append([1, 1, 1, 0, 4, 4, 1, 2, 9])
        first = self.limiter.check("a@example.org", Quota(5, 0))
        second = self.limiter.check("b@example.org", Quota(3, 0))
        third = self.limiter.check("a@example.org", Quota(0, 10))
        self.assertEqual(self.redis.commands, [])
        self.clock.advance(0)
        self.assertEqual(
            [self.successResultOf(d) for d in (first, second, third)],
            [Verdict(True, 1, 1), Verdict(False, 4, 4), Verdict(True, 2, 9)],
        )
        ((_, _, count, *rest),) = self.redis.commands
        self.assertEqual(count, 3)
        keys, ttl, args = rest[:3], rest[3], rest[4:]
        self.assertEqual(
            keys,
            [
                "userli:ratelimit:sender:a@example.org",
                "userli:ratelimit:sender:b@example.org",
                "userli:ratelimit:sender:a@example.org",
            ],
        )
        self.assertEqual(ttl, 90000)
        now = 1_700_000_000 * 10**9
        self.assertEqual(
            args,
            [
                *(5, 0, 6, now, now - HOUR_NS, now - DAY_NS, "0badcafe"),
                *(3, 0, 4, now, now - HOUR_NS, now - DAY_NS, "0badcafe"),
                *(0, 10, 11, now, now - HOUR_NS, now - DAY_NS, "0badcafe"),
            ],
        )

    def test_fullBatchSentAtOnce(self) -> None:
        """A full batch goes out without waiting for the end of the turn."""
        self.redis.results.extend([[1, 1, 1] * 4, [1, 5, 5]])
        pending = [self.limiter.check("limited@example.org", self.quota) for _ in range(5)]
        self.assertEqual(len(self.redis.commands), 1)
        self.assertEqual(self.redis.commands[0][2], 4)
        self.clock.advance(0)
        self.assertEqual(len(self.redis.commands), 2)
        self.assertEqual(self.redis.commands[1][2], 1)
        self.assertEqual(self.successResultOf(pending[4]), Verdict(True, 5, 5))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_scriptSentOnceThenByHash(self) -> None:
        """After one EVAL the script is run by its SHA-1."""
        self.redis.results.extend([[1, 1, 1], [1, 2, 2], [0, 4, 4]])
        for _ in range(3):
            self.check()
        self.assertEqual([c[0] for c in self.redis.commands], ["EVAL", "EVALSHA", "EVALSHA"])
        self.assertEqual(self.redis.commands[1][1], SCRIPT_SHA)
        self.assertEqual(SCRIPT_SHA, hashlib.sha1(SCRIPT.encode("utf-8")).hexdigest())

    def test_noscriptFallsBackToEval(self) -> None:
        """
        When Redis lost the script (restart, SCRIPT FLUSH) the call is sent
        again with the script, and later calls use the hash again.
        """
        self.redis.results.extend(
            [
                [1, 1, 1],
                txredisapi.ResponseError("NOSCRIPT No matching script. Please use EVAL."),
                [0, 2, 2],
                [0, 3, 3],
            ]
        )
        self.successResultOf(self.check())
        self.assertEqual(self.successResultOf(self.check()), Verdict(False, 2, 2))
        self.successResultOf(self.check())
        self.assertEqual(
            [c[0] for c in self.redis.commands], ["EVAL", "EVALSHA", "EVAL", "EVALSHA"]
        )
        # The retry is the same step: same timestamp and member.
        self.assertEqual(self.redis.commands[1][2:], self.redis.commands[2][2:])
        self.assertEqual(self.errors(), 0)

    def test_unavailable(self) -> None:
        """
        Redis down: every check of the call fails with L{RateLimitError}
        and the backend error counter grows by one for each.
        """
        self.redis.results.append(RedisUnavailable("not connected"))
        pending = [self.limiter.check("limited@example.org", self.quota) for _ in range(3)]
        self.clock.advance(0)
        for d in pending:
            failure = self.failureResultOf(d, RateLimitError)
            self.assertIn("not connected", str(failure.value))
        self.assertEqual(self.errors(), 3)

    def test_errorReply(self) -> None:
        """An error reply other than NOSCRIPT is a backend failure too."""
        self.redis.results.append(txredisapi.ResponseError("OOM command not allowed"))
        self.failureResultOf(self.check(), RateLimitError)
        self.assertEqual(self.errors(), 1)

    def test_failedReload(self) -> None:
        """A NOSCRIPT followed by a failed EVAL is one backend failure."""
        self.redis.results.extend(
            [
                [1, 1, 1],
                txredisapi.ResponseError("NOSCRIPT No matching script. Please use EVAL."),
                RedisUnavailable("no reply within 0.5 s"),
            ]
        )
        self.successResultOf(self.check())
        self.failureResultOf(self.check(), RateLimitError)
        self.assertEqual(self.errors(), 1)

    def test_oneStepRefused(self) -> None:
        """
        A step whose key Redis refused (the script answers C{-1} and the
        error for it) fails that check only, counted once; the other checks
        of the call get their verdicts.
        """
        self.redis.results.append([*(1, 1, 1), *(-1, f"WRONGTYPE {WRONGTYPE}", 0), *(0, 4, 4)])
        first = self.limiter.check("a@example.org", self.quota)
        second = self.limiter.check("odd@example.org", self.quota)
        third = self.limiter.check("b@example.org", self.quota)
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(first), Verdict(True, 1, 1))
        failure = self.failureResultOf(second, RateLimitError)
        self.assertIn("WRONGTYPE", str(failure.value))
        self.assertEqual(self.successResultOf(third), Verdict(False, 4, 4))
        self.assertEqual(self.errors(), 1)

    def test_oneStepUnreadable(self) -> None:
        """An unreadable answer for one step fails that step only."""
        self.redis.results.append([1, 1, 1, 1, "x", 1, None, 2, 2])
        pending = [self.limiter.check(f"{n}@example.org", self.quota) for n in range(3)]
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(pending[0]), Verdict(True, 1, 1))
        self.failureResultOf(pending[1], RateLimitError)
        self.failureResultOf(pending[2], RateLimitError)
        self.assertEqual(self.errors(), 2)

    def test_unexpectedReply(self) -> None:
        """A reply that is not three integers per step is a backend failure."""
        for reply in ([1, 2], [1, 1, 1, 1, 1, 1], "OK", None, [1, "2", 3], [True, 1, 1]):
            self.redis.results.append(reply)
            self.failureResultOf(self.check(), RateLimitError)
        self.assertEqual(self.errors(), 6)


class HelpersTests(SynchronousTestCase):
    """The small pieces of the Go layout."""

    def test_windowKey(self) -> None:
        """The key is the Go program's prefix and the identity."""
        self.assertEqual(
            window_key("limited@example.org"), "userli:ratelimit:sender:limited@example.org"
        )

    def test_randomSuffix(self) -> None:
        """The member suffix is eight lower-case hex characters."""
        for _ in range(100):
            self.assertRegex(random_suffix(), re.compile(r"^[0-9a-f]{8}$"))


class MakeRateLimiterTests(SynchronousTestCase):
    """The backend is chosen by whether the daemon has a Redis client."""

    def test_memory(self) -> None:
        """Without Redis the windows are kept in memory."""
        limiter = makeRateLimiter(
            Config(userli_token="t"), task.Clock(), None, Metrics(process=False)
        )
        self.assertIsInstance(limiter, MemoryRateLimiter)

    def test_redis(self) -> None:
        """With a Redis client the windows are kept in Redis."""
        from userli_postfix.config import RedisTarget

        clock = task.Clock()
        redis = RedisClient(RedisTarget(), clock)
        limiter = makeRateLimiter(Config(userli_token="t"), clock, redis, Metrics(process=False))
        self.assertIsInstance(limiter, RedisRateLimiter)
