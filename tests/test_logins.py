"""
Tests for L{userli_postfix.logins.LoginQueue}: the logins of one
connection take turns.  The decisions come from a double whose Deferreds
the test fires; the L{Authenticator} itself is tested through the protocol
in C{test_sasl}.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from userli_postfix.dovecotauth import (
    ERROR,
    INVALID,
    SUCCESS,
    Ask,
    Credentials,
    Unreadable,
    Verdict,
)
from userli_postfix.logins import Authenticator, LoginQueue


class DecisionsByHand(Authenticator):
    """An authenticator whose decisions the test gives, one Deferred per call."""

    def __init__(self, synchronous: bool = False) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.decisions: list[defer.Deferred[Verdict]] = []
        self.synchronous = synchronous

    def _decision(self, *call: str) -> defer.Deferred[Verdict]:
        self.calls.append(call)
        if self.synchronous:
            return defer.succeed(Verdict(SUCCESS, call[1]))
        decision: defer.Deferred[Verdict] = defer.Deferred()
        self.decisions.append(decision)
        return decision

    def login(
        self, mechanism: str, login: str, password: str, authzid: str = "", remote: str = ""
    ) -> defer.Deferred[Verdict]:
        if login == "bug":
            raise RuntimeError("bug")
        return self._decision(mechanism, login, password, authzid, remote)

    def refuse(self, mechanism: str, reason: str, remote: str = "") -> defer.Deferred[Verdict]:
        return self._decision(mechanism, reason, remote)


def login(request_id: str, name: str) -> Ask:
    return Ask(request_id, Credentials("PLAIN", name, "pw", "", "192.0.2.7"))


class LoginQueueTests(SynchronousTestCase):
    """One login at a time, in order; withdrawn ones never asked."""

    def setUp(self) -> None:
        self.authenticator = DecisionsByHand()
        self.answered: list[tuple[str, str]] = []
        self.sizes: list[int] = []
        self.queue = LoginQueue(self.authenticator, self.answer, self.changed)

    def answer(self, ask: Ask, verdict: Verdict) -> None:
        self.answered.append((ask.request_id, verdict.result))

    def changed(self) -> None:
        self.sizes.append(len(self.queue))

    def test_oneAtATime(self) -> None:
        """
        The second login is asked only once the first is answered, and
        answers come in order.
        """
        for n in range(1, 4):
            self.queue.add(login(str(n), f"user{n}"))
        self.assertEqual([call[1] for call in self.authenticator.calls], ["user1"])
        self.assertEqual(len(self.queue), 3)
        self.authenticator.decisions[0].callback(Verdict(INVALID))
        self.assertEqual([call[1] for call in self.authenticator.calls], ["user1", "user2"])
        self.assertEqual(self.answered, [("1", INVALID)])
        self.authenticator.decisions[1].callback(Verdict(SUCCESS, "user2"))
        self.authenticator.decisions[2].callback(Verdict(SUCCESS, "user3"))
        self.assertEqual(self.answered, [("1", INVALID), ("2", SUCCESS), ("3", SUCCESS)])
        self.assertEqual(len(self.queue), 0)
        self.assertEqual(self.sizes[-1], 0)

    def test_unreadableRefused(self) -> None:
        """Credentials that could not be read are refused, not looked up."""
        self.queue.add(Ask("1", Unreadable("LOGIN", "invalid base64 data", "192.0.2.7")))
        self.assertEqual(self.authenticator.calls, [("LOGIN", "invalid base64 data", "192.0.2.7")])

    def test_withdrawnBeforeItsTurn(self) -> None:
        """A login withdrawn while queued is never asked and leaves the count at once."""
        first, second, third = login("1", "a"), login("2", "b"), login("3", "c")
        for ask in (first, second, third):
            self.queue.add(ask)
        self.queue.withdraw(second)
        self.assertEqual(len(self.queue), 2)
        self.assertEqual(self.sizes[-1], 2)
        self.authenticator.decisions[0].callback(Verdict(INVALID))
        self.authenticator.decisions[1].callback(Verdict(INVALID))
        self.assertEqual([call[1] for call in self.authenticator.calls], ["a", "c"])
        self.assertEqual(self.answered, [("1", INVALID), ("3", INVALID)])

    def test_withdrawnWhileDecided(self) -> None:
        """A login being decided runs to its end: withdrawing it changes nothing here."""
        running = login("1", "a")
        self.queue.add(running)
        self.queue.withdraw(running)
        self.assertEqual(len(self.queue), 1)
        self.authenticator.decisions[0].callback(Verdict(INVALID))
        self.assertEqual(self.answered, [("1", INVALID)])

    def test_decidedAtOnce(self) -> None:
        """
        When the logins queued behind one are decided at once, each as it
        starts, all are answered in order without the stack growing with
        their number.
        """
        count = 3000
        for n in range(1, count + 1):
            self.queue.add(login(str(n), "a"))
        self.authenticator.synchronous = True
        self.authenticator.decisions[0].callback(Verdict(INVALID))
        self.assertEqual(
            [request_id for request_id, _ in self.answered], [str(n) for n in range(1, count + 1)]
        )
        self.assertEqual(len(self.queue), 0)

    def test_brokenDecision(self) -> None:
        """A decision that raises is logged and the logins behind it go on."""
        self.queue.add(login("1", "bug"))
        self.queue.add(login("2", "a"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(len(self.queue), 1)
        self.authenticator.decisions[0].callback(Verdict(ERROR))
        self.assertEqual(self.answered, [("2", ERROR)])
        self.assertEqual(len(self.queue), 0)

    def test_close(self) -> None:
        """After close nothing more is asked or answered."""
        self.queue.add(login("1", "a"))
        self.queue.add(login("2", "b"))
        self.queue.close()
        self.authenticator.decisions[0].callback(Verdict(INVALID))
        self.assertEqual(self.answered, [])
        self.assertEqual(len(self.authenticator.calls), 1)
