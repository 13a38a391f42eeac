"""Tests for L{userli_postfix.deadlines.answerWithin}."""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from userli_postfix.deadlines import answerWithin


class Late(Exception):
    """What the caller gets at the deadline."""


class AnswerWithinTests(SynchronousTestCase):
    """The caller's answer within a deadline, the work behind it left alone."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.inner: defer.Deferred[str] = defer.Deferred()
        self.outer = answerWithin(self.inner, 1.0, self.clock, Late)

    def test_result_in_time(self) -> None:
        """A result before the deadline is the caller's; no timer is left."""
        self.inner.callback("answer")
        self.assertEqual(self.successResultOf(self.outer), "answer")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_failure_in_time(self) -> None:
        """A failure before the deadline is the caller's too."""
        self.inner.errback(ValueError("broken"))
        self.failureResultOf(self.outer, ValueError)

    def test_deadline(self) -> None:
        """
        At the deadline the caller fails with the given error; the work is
        not cancelled, and its late result, even a failure, is consumed.
        """
        self.clock.advance(0.999)
        self.assertNoResult(self.outer)
        self.clock.advance(0.001)
        self.failureResultOf(self.outer, Late)
        self.assertFalse(self.inner.called)
        self.inner.errback(ValueError("late"))
        # Consumed: the inner Deferred ends with no unhandled failure.
        self.assertIsNone(self.successResultOf(self.inner))

    def test_late_result_consumed(self) -> None:
        """A late result changes nothing for the caller."""
        self.clock.advance(1.0)
        failure = self.failureResultOf(self.outer, Late)
        self.inner.callback("late")
        self.assertIsInstance(failure, Failure)
        self.assertIsNone(self.successResultOf(self.inner))
