"""
Tests for L{userli_postfix.breaker}: the circuit breaker's state machine
on a L{Clock}, table-driven, and its place in L{UserliClient._call}: what
opens it (only calls that got no answer), failing fast while open, one
probe at a time with a short deadline, and the metrics and log lines.
"""

from __future__ import annotations

from typing import Any

from treq.testing import StubTreq
from twisted.internet import defer, error, task
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import resource
from twisted.web.client import ResponseNeverReceived

from tests.test_userli import BASE, TOKEN
from userli_postfix.breaker import (
    FAILURES_TO_OPEN,
    PROBE_INTERVAL,
    PROBE_TIMEOUT,
    CircuitBreaker,
    State,
    unanswered,
)
from userli_postfix.lookups import Lookups
from userli_postfix.metrics import Metrics
from userli_postfix.policy import PolicyRequest, QuotaPolicy
from userli_postfix.ratelimit import MemoryRateLimiter
from userli_postfix.userli import CircuitOpen, NoAnswer, UserliClient, UserliError

# How long a slow Userli takes to answer (within the 5 s deadline).
SLOW = 2.0

# Steps of the state machine: (time to advance, event, expected admit
# result after the event, expected state).  Events: "ok"/"fail" record the
# outcome of the last admitted attempt; "admit" asks to call.
TABLE: list[tuple[str, list[tuple[float, str, str]]]] = [
    (
        "opens after the threshold, not before",
        [(0, "fail", "closed")] * (FAILURES_TO_OPEN - 1)
        + [(0, "fail", "open"), (0, "admit-refused", "open")],
    ),
    (
        "an answer in between resets the count",
        [(0, "fail", "closed")] * (FAILURES_TO_OPEN - 1)
        + [(0, "ok", "closed")]
        + [(0, "fail", "closed")] * (FAILURES_TO_OPEN - 1),
    ),
    (
        "one probe after the interval; the others fail fast",
        [(0, "fail", "closed")] * (FAILURES_TO_OPEN - 1)
        + [
            (0, "fail", "open"),
            (PROBE_INTERVAL - 0.001, "admit-refused", "open"),
            (0.001, "admit-probe", "probing"),
            (0, "admit-refused", "probing"),
            (0, "ok", "closed"),
            (0, "admit", "closed"),
        ],
    ),
    (
        "a failed probe reopens for another interval",
        [(0, "fail", "closed")] * (FAILURES_TO_OPEN - 1)
        + [
            (0, "fail", "open"),
            (PROBE_INTERVAL, "admit-probe", "probing"),
            (PROBE_TIMEOUT, "fail", "open"),
            (PROBE_INTERVAL - 0.001, "admit-refused", "open"),
            (0.001, "admit-probe", "probing"),
            (0, "ok", "closed"),
        ],
    ),
    (
        "a late answer to an older call closes it too",
        [(0, "fail", "closed")] * (FAILURES_TO_OPEN - 1)
        + [(0, "fail", "open"), (0, "ok-old", "closed")],
    ),
    (
        "late failures of older calls while open change nothing",
        [(0, "fail", "closed")] * (FAILURES_TO_OPEN - 1)
        + [
            (0, "fail", "open"),
            (PROBE_INTERVAL, "admit-probe", "probing"),
            (0, "fail-old", "probing"),
            (0, "admit-refused", "probing"),
        ],
    ),
]


class StateMachineTests(SynchronousTestCase):
    """L{CircuitBreaker} on its own."""

    def test_table(self) -> None:
        """Every row of L{TABLE} ends in the state it names, step by step."""
        for name, steps in TABLE:
            clock = Clock()
            changes: list[bool] = []
            breaker = CircuitBreaker(clock, changes.append)
            old = breaker.admit()
            assert old is not None
            last = old
            for advance, event, state in steps:
                clock.advance(advance)
                if event in ("ok", "fail"):
                    breaker.record(last, event == "ok")
                elif event in ("ok-old", "fail-old"):
                    breaker.record(old, event == "ok-old")
                elif event == "admit":
                    attempt = breaker.admit()
                    self.assertIsNotNone(attempt, name)
                    assert attempt is not None
                    self.assertFalse(attempt.probe, name)
                    last = attempt
                elif event == "admit-probe":
                    attempt = breaker.admit()
                    assert attempt is not None, name
                    self.assertTrue(attempt.probe, name)
                    self.assertEqual(attempt.timeout, PROBE_TIMEOUT, name)
                    last = attempt
                elif event == "admit-refused":
                    self.assertIsNone(breaker.admit(), name)
                self.assertEqual(breaker.state, State(state), f"{name}: after {event}")
            self.assertEqual(changes, _changes(steps), name)

    def test_defaults(self) -> None:
        """A handful of failures open it; service resumes within 2 s of Userli's return."""
        self.assertEqual(FAILURES_TO_OPEN, 5)
        self.assertLess(PROBE_INTERVAL + PROBE_TIMEOUT, 2.0)
        self.assertLessEqual(PROBE_INTERVAL, 1.0)

    def test_unanswered(self) -> None:
        """Deadlines and failed connections count; everything else does not."""
        for exc in (
            defer.TimeoutError(),
            defer.CancelledError(),
            error.ConnectionRefusedError(),
            error.ConnectError(),
            error.DNSLookupError(),
            error.TimeoutError(),
            error.ConnectionLost(),
            ResponseNeverReceived([]),
        ):
            self.assertTrue(unanswered(Failure(exc)), exc)
        for exc in (UserliError("HTTP 500"), ValueError("garbage"), UserliError("not JSON")):
            self.assertFalse(unanswered(Failure(exc)), exc)

    def test_log_lines(self) -> None:
        """One line when it opens, one when it closes; none for each fast failure."""
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        clock = Clock()
        breaker = CircuitBreaker(clock)
        for _ in range(FAILURES_TO_OPEN + 3):
            attempt = breaker.admit()
            if attempt is not None:
                breaker.record(attempt, False)
        for _ in range(10):
            self.assertIsNone(breaker.admit())
        clock.advance(PROBE_INTERVAL)
        probe = breaker.admit()
        assert probe is not None
        breaker.record(probe, True)
        mine = [e for e in events if e.get("log_namespace") == "userli_postfix.breaker"]
        self.assertEqual(len(mine), 2)

    def test_late_probe_failure_is_stale(self) -> None:
        """
        A probe whose caller gave up (L{CircuitBreaker.probeUnanswered}) and
        whose request fails later does not push back the probe that took
        its place, nor open anything anew.
        """
        clock = Clock()
        breaker = _opened(clock)
        clock.advance(PROBE_INTERVAL)
        first = breaker.admit()
        assert first is not None and first.probe
        clock.advance(PROBE_TIMEOUT)
        breaker.probeUnanswered(first)
        self.assertIs(breaker.state, State.OPEN)
        clock.advance(PROBE_INTERVAL)
        second = breaker.admit()
        assert second is not None and second.probe and second is not first
        breaker.record(first, False)
        self.assertIs(breaker.state, State.PROBING)
        self.assertIsNone(breaker.admit())
        breaker.record(second, True)
        self.assertIs(breaker.state, State.CLOSED)

    def test_late_probe_answer_closes(self) -> None:
        """A probe answered after its caller gave up still closes the breaker."""
        clock = Clock()
        breaker = _opened(clock)
        clock.advance(PROBE_INTERVAL)
        probe = breaker.admit()
        assert probe is not None
        clock.advance(PROBE_TIMEOUT)
        breaker.probeUnanswered(probe)
        clock.advance(1.0)
        breaker.record(probe, True)
        self.assertIs(breaker.state, State.CLOSED)


def _opened(clock: Clock) -> CircuitBreaker:
    """A breaker opened by L{FAILURES_TO_OPEN} calls without an answer."""
    breaker = CircuitBreaker(clock)
    for _ in range(FAILURES_TO_OPEN):
        attempt = breaker.admit()
        assert attempt is not None
        breaker.record(attempt, False)
    assert breaker.isOpen
    return breaker


def _changes(steps: list[tuple[float, str, str]]) -> list[bool]:
    """The open/close notifications a row implies."""
    result: list[bool] = []
    previous = "closed"
    for _, _, state in steps:
        now_open = state != "closed"
        if now_open != (previous != "closed"):
            result.append(now_open)
        previous = state
    return result


class ClientBreakerTests(SynchronousTestCase):
    """The breaker inside L{UserliClient}."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.metrics = Metrics(process=False)
        self.calls = 0
        self.mode = "hang"
        self.stub = StubTreq(Answers(self))

    def request(self, method: str, url: str, **kwargs: Any) -> defer.Deferred[Any]:
        self.calls += 1
        if self.mode == "hang":
            return defer.Deferred()
        if self.mode == "refused":
            return defer.fail(error.ConnectionRefusedError())
        if self.mode == "slow":
            # Answers, but only SLOW seconds later.
            return task.deferLater(self.clock, SLOW, lambda: None).addCallback(
                lambda _: self.stub.request(method, url, **kwargs)
            )
        return self.stub.request(method, url, **kwargs)  # type: ignore[no-any-return]

    def client(self) -> UserliClient:
        return UserliClient(self.request, BASE, TOKEN, self.clock, self.metrics)

    def sample(self, name: str) -> float | None:
        return self.metrics.registry.get_sample_value(f"userli_postfix_adapter_{name}")

    def open(self, client: UserliClient) -> None:
        """Make it open with calls that hang until their deadline."""
        for _ in range(FAILURES_TO_OPEN):
            d = client.domain("example.org")
            self.clock.advance(5)
            self.failureResultOf(d, UserliError)
        self.assertTrue(client.breaker.isOpen)

    def test_hanging_api_fails_fast(self) -> None:
        """
        After a handful of calls at the deadline, the next fail at once
        with a L{UserliError} (so every caller keeps its answer), unsent.
        """
        client = self.client()
        self.open(client)
        sent = self.calls
        for call in (
            client.alias("a@example.org"),
            client.mailbox("a@example.org"),
            client.smtp_quota("a@example.org"),
            client.auth("a@example.org", "pw"),
        ):
            self.failureResultOf(call, CircuitOpen)
        self.assertTrue(issubclass(CircuitOpen, UserliError))
        self.assertEqual(self.calls, sent)
        self.assertEqual(self.sample("circuit_breaker_open"), 1.0)
        self.assertEqual(self.sample("circuit_breaker_opened_total"), 1.0)

    def test_refused_opens(self) -> None:
        """Connections refused at once count like deadlines."""
        client = self.client()
        self.mode = "refused"
        for _ in range(FAILURES_TO_OPEN):
            self.failureResultOf(client.domain("example.org"), UserliError)
        self.failureResultOf(client.domain("example.org"), CircuitOpen)

    def test_fast_errors_never_open(self) -> None:
        """An API that answers 500 (or garbage) quickly is asked every time."""
        client = self.client()
        for mode in ("500", "garbage"):
            self.mode = mode
            for _ in range(FAILURES_TO_OPEN * 4):
                d = client.domain("example.org")
                self.stub.flush()
                self.failureResultOf(d, UserliError)
        self.assertFalse(client.breaker.isOpen)
        self.assertEqual(self.calls, FAILURES_TO_OPEN * 8)
        self.assertEqual(self.sample("circuit_breaker_open"), 0.0)

    def test_probe_and_recovery(self) -> None:
        """
        One call goes out as the probe, with the short deadline; when it is
        answered the breaker closes, the gauge drops, and calls go out.
        """
        client = self.client()
        self.open(client)
        self.clock.advance(PROBE_INTERVAL)
        probe = client.domain("example.org")
        self.failureResultOf(client.domain("example.org"), CircuitOpen)
        self.clock.advance(PROBE_TIMEOUT)
        self.failureResultOf(probe, UserliError)
        self.mode = "ok"
        self.clock.advance(PROBE_INTERVAL)
        d = client.domain("example.org")
        self.stub.flush()
        self.assertTrue(self.successResultOf(d))
        self.assertFalse(client.breaker.isOpen)
        self.assertEqual(self.sample("circuit_breaker_open"), 0.0)
        d = client.domain("example.org")
        self.stub.flush()
        self.assertTrue(self.successResultOf(d))

    def test_fast_failures_not_logged_each(self) -> None:
        """
        While open, lookups and quota checks answered at once write no line
        each (the breaker said so once); the answers are still TEMP and DUNNO.
        """
        client = self.client()
        self.open(client)
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        lookups = Lookups(client, None, self.metrics, self.clock)
        policy = QuotaPolicy(client, MemoryRateLimiter(self.clock), self.clock, self.metrics)
        for n in range(10):
            reply = lookups.answer(b"mailbox a%d@example.org" % n)
            if not isinstance(reply, bytes):
                reply = self.successResultOf(reply)
            self.assertTrue(reply.startswith(b"TEMP "))
            action = policy.decide(
                PolicyRequest(protocol_state="END-OF-MESSAGE", sender=f"a{n}@example.org")
            )
            if not isinstance(action, str):
                action = self.successResultOf(action)
            self.assertEqual(action, "DUNNO")
        self.assertEqual(
            [e.get("log_format") for e in events if e.get("log_level") is not None], []
        )


class Answers(resource.Resource):
    """Userli answering at once: C{true}, a 500, or an HTML page, by the test's mode."""

    isLeaf = True

    def __init__(self, test: ClientBreakerTests) -> None:
        super().__init__()
        self.test = test

    def render_GET(self, request: Any) -> bytes:
        if self.test.mode == "500":
            request.setResponseCode(500)
            return b'{"error": "Internal Server Error"}'
        if self.test.mode == "garbage":
            return b"<html>proxy error</html>"
        return b"true"

    def test_slow_answer_to_probe_closes(self) -> None:
        """
        A Userli back from an outage but slow (answers in 2 s, within the
        normal deadline): the probe's caller is answered at the probe
        deadline, the request runs on, and its answer closes the breaker.
        """
        client = self.client()
        self.open(client)
        self.mode = "slow"
        self.clock.advance(PROBE_INTERVAL)
        probe = client.domain("example.org")
        self.clock.advance(PROBE_TIMEOUT)
        self.failureResultOf(probe, NoAnswer)
        self.assertTrue(client.breaker.isOpen)
        self.clock.advance(SLOW - PROBE_TIMEOUT)
        self.stub.flush()
        self.assertFalse(client.breaker.isOpen)
        self.mode = "ok"
        d = client.domain("example.org")
        self.stub.flush()
        self.assertTrue(self.successResultOf(d))

    def test_next_probe_while_one_hangs(self) -> None:
        """
        A probe sent to a hanging Userli does not hold up the next: one
        interval after its caller gave up, another goes out, and when that
        one is answered the breaker closes; the first one's timeout later
        changes nothing.
        """
        client = self.client()
        self.open(client)
        self.clock.advance(PROBE_INTERVAL)
        first = client.domain("example.org")
        self.clock.advance(PROBE_TIMEOUT)
        self.failureResultOf(first, NoAnswer)
        self.mode = "ok"
        self.failureResultOf(client.domain("example.org"), CircuitOpen)
        self.clock.advance(PROBE_INTERVAL)
        second = client.domain("example.org")
        self.stub.flush()
        self.assertTrue(self.successResultOf(second))
        self.assertFalse(client.breaker.isOpen)
        self.clock.advance(5)
        self.assertFalse(client.breaker.isOpen)
        self.assertEqual(self.sample("circuit_breaker_opened_total"), 1.0)
