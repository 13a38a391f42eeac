"""Tests for L{userli_postfix.coalesce.Coalescer}."""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from userli_postfix.coalesce import Coalescer


class Work:
    """Questions asked of a slow backend: each one's Deferred, fired by the test."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.pending: list[defer.Deferred[str]] = []

    def start(self, question: str) -> defer.Deferred[str]:
        self.asked.append(question)
        d: defer.Deferred[str] = defer.Deferred()
        self.pending.append(d)
        return d


class CoalescerTests(SynchronousTestCase):
    """Identical questions in flight share one answer; answered ones are forgotten."""

    ordered = True

    def setUp(self) -> None:
        self.work = Work()
        self.coalescer: Coalescer[str, str] = Coalescer(ordered=self.ordered)

    def ask(self, key: str) -> defer.Deferred[str]:
        return self.coalescer.ask(key, self.work.start, key)

    def test_identical_share(self) -> None:
        """Questions asked while the first is in flight wait for its answer: one is asked."""
        answers = [self.ask("a") for _ in range(100)]
        self.assertEqual(self.work.asked, ["a"])
        for d in answers:
            self.assertNoResult(d)
        self.work.pending[0].callback("answer")
        self.assertEqual([self.successResultOf(d) for d in answers], ["answer"] * 100)

    def test_different_separate(self) -> None:
        """Different keys are different questions, each answered with its own answer."""
        a, b = self.ask("a"), self.ask("b")
        self.assertEqual(self.work.asked, ["a", "b"])
        self.assertEqual(len(self.coalescer), 2)
        self.work.pending[1].callback("B")
        self.work.pending[0].callback("A")
        self.assertEqual((self.successResultOf(a), self.successResultOf(b)), ("A", "B"))

    def test_failure_shared(self) -> None:
        """A failure is every waiter's."""
        answers = [self.ask("a") for _ in range(3)]
        self.work.pending[0].errback(ValueError("down"))
        for d in answers:
            self.failureResultOf(d, ValueError)

    def test_forgotten_once_answered(self) -> None:
        """Once answered, the question is out of flight: the next one is asked afresh."""
        self.ask("a")
        self.assertIn("a", self.coalescer)
        self.work.pending[0].callback("first")
        self.assertNotIn("a", self.coalescer)
        self.assertEqual(len(self.coalescer), 0)
        again = self.ask("a")
        self.assertEqual(self.work.asked, ["a", "a"])
        self.work.pending[1].callback("second")
        self.assertEqual(self.successResultOf(again), "second")

    def test_forgotten_after_failure(self) -> None:
        """A failure is not kept either."""
        self.failureResultOf(
            self.coalescer.ask("a", lambda: defer.fail(ValueError("down"))), ValueError
        )
        self.assertEqual(len(self.coalescer), 0)
        self.ask("a")
        self.assertEqual(self.work.asked, ["a"])

    def test_answered_at_once(self) -> None:
        """Work that answers at once leaves nothing in flight."""
        d = self.coalescer.ask("a", defer.succeed, "now")
        self.assertEqual(self.successResultOf(d), "now")
        self.assertEqual(len(self.coalescer), 0)

    def test_start_raises(self) -> None:
        """Work that raises reaches the caller and leaves no question waiting forever."""

        def broken() -> defer.Deferred[str]:
            raise RuntimeError("bug")

        self.assertRaises(RuntimeError, self.coalescer.ask, "a", broken)
        self.assertNotIn("a", self.coalescer)
        d = self.ask("a")
        self.work.pending[0].callback("answer")
        self.assertEqual(self.successResultOf(d), "answer")

    def test_asked_again_while_answering(self) -> None:
        """A waiter that asks again when answered starts a new question, not a stale share."""
        again: list[defer.Deferred[str]] = []
        self.ask("a")
        self.ask("a").addCallback(lambda answer: again.append(self.ask("a")) or answer)
        self.work.pending[0].callback("first")
        self.assertEqual(self.work.asked, ["a", "a"])
        self.assertNoResult(again[0])
        self.work.pending[1].callback("second")
        self.assertEqual(self.successResultOf(again[0]), "second")

    def test_waiter_result_own(self) -> None:
        """What one asker's callbacks make of the answer is theirs alone."""
        first = self.ask("a").addCallback(lambda answer: answer.upper())
        second = self.ask("a")
        self.work.pending[0].callback("answer")
        self.assertEqual(self.successResultOf(first), "ANSWER")
        self.assertEqual(self.successResultOf(second), "answer")

    def test_order(self) -> None:
        """Ordered, the askers hear the answer in the order they asked."""
        heard: list[int] = []
        for n in range(3):
            self.ask("a").addCallback(lambda _, n: heard.append(n), n)
        self.work.pending[0].callback("answer")
        self.assertEqual(heard, [0, 1, 2])

    def test_failure_ends_work(self) -> None:
        """Ordered, a shared failure is the askers' alone: the work's Deferred ends handled."""
        d = self.ask("a")
        self.work.pending[0].errback(ValueError("down"))
        self.failureResultOf(d, ValueError)
        self.assertIsNone(self.successResultOf(self.work.pending[0]))


class UnorderedCoalescerTests(CoalescerTests):
    """The same sharing when the order of the answers does not matter."""

    ordered = False

    def test_order(self) -> None:
        """Unordered, the first asker holds the work itself and hears the answer last."""
        heard: list[int] = []
        first = self.ask("a")
        self.assertIs(first, self.work.pending[0])
        first.addCallback(lambda _: heard.append(0))
        for n in (1, 2):
            self.ask("a").addCallback(lambda _, n: heard.append(n), n)
        self.work.pending[0].callback("answer")
        self.assertEqual(heard, [1, 2, 0])

    def test_failure_ends_work(self) -> None:
        """Unordered, the work's Deferred is the first asker's: its failure is theirs."""
        d = self.ask("a")
        self.work.pending[0].errback(ValueError("down"))
        self.failureResultOf(d, ValueError)
