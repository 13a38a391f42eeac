"""
Tests for L{userli_postfix.dovecotauth}: the Dovecot-auth conversation as
a state machine, lines in and outputs out, with no socket and no API; time
through a L{Clock}.
"""

from __future__ import annotations

from base64 import b64encode

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from userli_postfix.dovecotauth import (
    ERROR,
    EXCHANGE_TIMEOUT,
    INVALID,
    MAX_WAITING,
    SUCCESS,
    Ask,
    Conversation,
    Credentials,
    Hangup,
    Output,
    Unreadable,
    Unsupported,
    Verdict,
    Withdraw,
    handshake,
    reply_line,
)

ALICE = "alice@example.org"
USERNAME = b"CONT\t1\t" + b64encode(b"Username:")
PASSWORD = b"CONT\t1\t" + b64encode(b"Password:")


def b64(text: str | bytes) -> bytes:
    return b64encode(text.encode("utf-8") if isinstance(text, str) else text)


def auth(mechanism: bytes, *params: bytes, request_id: bytes = b"1") -> bytes:
    """An AUTH line as Postfix sends it."""
    base = [b"AUTH", request_id, mechanism, b"service=smtp", b"nologin", b"rip=192.0.2.7"]
    return b"\t".join(base + list(params))


def creds(mechanism: str, login: str, password: str, authzid: str = "") -> Credentials:
    return Credentials(mechanism, login, password, authzid, "192.0.2.7")


def unreadable(mechanism: str, reason: str) -> Unreadable:
    return Unreadable(mechanism, reason, "192.0.2.7")


class ConversationTestCase(SynchronousTestCase):
    """A conversation over a L{Clock} that counts its expiries."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.expiries = 0
        self.conversation = Conversation(self.clock, EXCHANGE_TIMEOUT, self.expired)

    def expired(self) -> None:
        self.expiries += 1

    def feed(self, *lines: bytes) -> list[Output]:
        """Every output of C{lines}, in order."""
        outputs: list[Output] = []
        for line in lines:
            outputs.extend(self.conversation.receive(line))
        return outputs

    def questions(self, outputs: list[Output]) -> list[object]:
        """The outputs with each L{Ask} shown as (id, question)."""
        return [
            (output.request_id, output.question) if isinstance(output, Ask) else output
            for output in outputs
        ]


class HandshakeTests(SynchronousTestCase):
    """What the server says first."""

    def test_handshake(self) -> None:
        """VERSION, the MECH lines, then SPID, CUID, COOKIE and DONE."""
        self.assertEqual(
            handshake(7, 3, "ab" * 16),
            [
                b"VERSION\t1\t2",
                b"MECH\tPLAIN\tplaintext",
                b"MECH\tLOGIN\tplaintext",
                b"SPID\t7",
                b"CUID\t3",
                b"COOKIE\t" + b"ab" * 16,
                b"DONE",
            ],
        )


class ReplyTests(SynchronousTestCase):
    """The OK and FAIL lines, table-driven."""

    CASES = [
        (Verdict(SUCCESS, ALICE), b"OK\t1\tuser=alice@example.org"),
        (
            Verdict(INVALID, ALICE, "authentication failed"),
            b"FAIL\t1\tuser=alice@example.org\treason=authentication failed",
        ),
        (Verdict(ERROR, reason="invalid base64 data"), b"FAIL\t1\treason=invalid base64 data"),
        (Verdict(INVALID), b"FAIL\t1\treason=authentication failed"),
        (
            Verdict(ERROR, ALICE, "temporary authentication failure", temporary=True),
            b"FAIL\t1\tuser=alice@example.org\ttemp\treason=temporary authentication failure",
        ),
        (Verdict(INVALID, reason="bad\tnews\r\nhere"), b"FAIL\t1\treason=bad news here"),
    ]

    def test_replies(self) -> None:
        """Each verdict gives its line; tabs and line ends inside fields become spaces."""
        for verdict, line in self.CASES:
            self.assertEqual(reply_line("1", verdict), line, verdict)

    def test_idSanitised(self) -> None:
        """A request id with a TAB cannot add a field to the reply."""
        self.assertEqual(
            reply_line("1\t2", Verdict(INVALID)), b"FAIL\t1 2\treason=authentication failed"
        )


class RequestTests(ConversationTestCase):
    """One line in, the outputs out: table-driven over the requests Postfix may send."""

    CASES: list[tuple[str, list[bytes], list[object]]] = [
        ("VERSION 1.x", [b"VERSION\t1\t99"], []),
        ("other major version", [b"VERSION\t2\t0"], [Hangup()]),
        ("empty VERSION", [b"VERSION"], [Hangup()]),
        ("CPID", [b"CPID\t77"], []),
        ("unknown command", [b"FROB\t1\tx"], []),
        ("AUTH without an id", [b"AUTH"], []),
        ("AUTH without a mechanism", [b"AUTH\t5"], [b"FAIL\t5\treason=invalid AUTH request"]),
        ("AUTH with an empty mechanism", [b"AUTH\t5\t"], [b"FAIL\t5\treason=invalid AUTH request"]),
        ("unsupported mechanism", [auth(b"CRAM-MD5")], [Unsupported("1", "192.0.2.7")]),
        (
            "PLAIN with initial response",
            [auth(b"PLAIN", b"resp=" + b64(f"\0{ALICE}\0pw"))],
            [("1", creds("PLAIN", ALICE, "pw"))],
        ),
        (
            "PLAIN with authzid",
            [auth(b"plain", b"resp=" + b64(f"{ALICE}\0{ALICE}\0pw"))],
            [("1", creds("PLAIN", ALICE, "pw", ALICE))],
        ),
        ("PLAIN without initial response", [auth(b"PLAIN")], [b"CONT\t1\t"]),
        (
            "PLAIN then CONT",
            [auth(b"PLAIN"), b"CONT\t1\t" + b64(f"\0{ALICE}\0pw")],
            [b"CONT\t1\t", ("1", creds("PLAIN", ALICE, "pw"))],
        ),
        (
            "PLAIN, empty initial response",
            [auth(b"PLAIN", b"resp=")],
            [("1", unreadable("PLAIN", "invalid PLAIN response"))],
        ),
        (
            "PLAIN, bad base64",
            [auth(b"PLAIN", b"resp=!!")],
            [("1", unreadable("PLAIN", "invalid base64 data"))],
        ),
        (
            "PLAIN, two parts",
            [auth(b"PLAIN", b"resp=" + b64(f"{ALICE}\0pw"))],
            [("1", unreadable("PLAIN", "invalid PLAIN response"))],
        ),
        (
            "PLAIN, not UTF-8",
            [auth(b"PLAIN", b"resp=" + b64(b"\0alice\0\xff"))],
            [("1", unreadable("PLAIN", "credentials are not UTF-8"))],
        ),
        (
            "LOGIN without initial response",
            [auth(b"LOGIN"), b"CONT\t1\t" + b64(ALICE), b"CONT\t1\t" + b64("pw")],
            [USERNAME, PASSWORD, ("1", creds("LOGIN", ALICE, "pw"))],
        ),
        (
            "LOGIN with the user name as initial response",
            [auth(b"LOGIN", b"resp=" + b64(ALICE)), b"CONT\t1\t" + b64("pw")],
            [PASSWORD, ("1", creds("LOGIN", ALICE, "pw"))],
        ),
        (
            "LOGIN, empty initial response",
            [auth(b"LOGIN", b"resp="), b"CONT\t1\t"],
            [PASSWORD, ("1", creds("LOGIN", "", ""))],
        ),
        (
            "LOGIN, user name not UTF-8",
            [auth(b"LOGIN", b"resp=" + b64(b"\xff"))],
            [("1", unreadable("LOGIN", "credentials are not UTF-8"))],
        ),
        (
            "LOGIN, bad base64 password",
            [auth(b"LOGIN", b"resp=" + b64(ALICE)), b"CONT\t1\t%%"],
            [PASSWORD, ("1", unreadable("LOGIN", "invalid base64 data"))],
        ),
        (
            "CONT for an unknown id",
            [b"CONT\t9\t" + b64("x")],
            [b"FAIL\t9\treason=authentication request timed out"],
        ),
        (
            "CANCEL of a waiting exchange",
            [auth(b"LOGIN"), b"CANCEL\t1", b"CONT\t1\t" + b64(ALICE)],
            [USERNAME, b"FAIL\t1\treason=authentication request timed out"],
        ),
        (
            "parameters in any order, unknown ones ignored",
            [b"AUTH\t1\tPLAIN\tresp=" + b64(f"\0{ALICE}\0pw") + b"\tsecured\tx=y\trip=192.0.2.7"],
            [("1", creds("PLAIN", ALICE, "pw"))],
        ),
    ]

    def test_requests(self) -> None:
        """Each sequence of lines gives exactly its outputs."""
        for name, lines, expected in self.CASES:
            self.conversation = Conversation(self.clock, EXCHANGE_TIMEOUT, self.expired)
            self.assertEqual(self.questions(self.feed(*lines)), expected, name)

    def test_clientPid(self) -> None:
        """CPID is remembered."""
        self.feed(b"CPID\t77")
        self.assertEqual(self.conversation.client_pid, "77")

    def test_passwordNotInRepr(self) -> None:
        """A question shown anywhere (a log, a traceback) does not show the password."""
        self.assertNotIn("s3cret", repr(creds("PLAIN", ALICE, "s3cret")))


class StatePerIdTests(ConversationTestCase):
    """Asks, answers, withdrawals and expiry, per request id."""

    def ask(self, line: bytes) -> Ask:
        outputs = self.feed(line)
        asks = [output for output in outputs if isinstance(output, Ask)]
        self.assertEqual(len(asks), 1, outputs)
        return asks[0]

    def test_answer(self) -> None:
        """An answered Ask gives its reply once; the id is then forgotten."""
        asked = self.ask(auth(b"PLAIN", b"resp=" + b64(f"\0{ALICE}\0pw")))
        self.assertEqual(
            self.conversation.answer(asked, Verdict(SUCCESS, ALICE)),
            b"OK\t1\tuser=alice@example.org",
        )
        self.assertIsNone(self.conversation.answer(asked, Verdict(SUCCESS, ALICE)))
        self.assertEqual(
            self.feed(b"CONT\t1\t" + b64("x")),
            [b"FAIL\t1\treason=authentication request timed out"],
        )

    def test_contWhileDeciding(self) -> None:
        """A CONT for an id being decided is ignored."""
        self.ask(auth(b"PLAIN", b"resp=" + b64(f"\0{ALICE}\0pw")))
        self.assertEqual(self.feed(b"CONT\t1\t" + b64("x")), [])

    def test_newAuthWithdrawsOldAsk(self) -> None:
        """
        A new AUTH with the id of an Ask not yet answered withdraws it, and
        the old Ask's answer is then dropped while the new one's is written.
        """
        old = self.ask(auth(b"PLAIN", b"resp=" + b64(f"\0{ALICE}\0wrong")))
        outputs = self.feed(auth(b"PLAIN", b"resp=" + b64(f"\0{ALICE}\0pw")))
        self.assertEqual(len(outputs), 2)
        self.assertEqual(outputs[0], Withdraw(old))
        new = outputs[1]
        assert isinstance(new, Ask)
        self.assertIsNot(new, old)
        self.assertIsNone(self.conversation.answer(old, Verdict(INVALID, ALICE)))
        self.assertEqual(
            self.conversation.answer(new, Verdict(SUCCESS, ALICE)),
            b"OK\t1\tuser=alice@example.org",
        )

    def test_cancelWithdraws(self) -> None:
        """CANCEL withdraws the Ask of its id and nothing else."""
        asked = self.ask(auth(b"PLAIN", b"resp=!!"))
        other = self.ask(auth(b"PLAIN", b"resp=!!", request_id=b"2"))
        self.assertEqual(self.feed(b"CANCEL\t1"), [Withdraw(asked)])
        self.assertIsNone(self.conversation.answer(asked, Verdict(ERROR)))
        self.assertIsNotNone(self.conversation.answer(other, Verdict(ERROR)))

    def test_idsIndependent(self) -> None:
        """Two LOGIN exchanges interleaved each finish under their own id."""
        self.feed(auth(b"LOGIN"), auth(b"LOGIN", request_id=b"2"))
        self.feed(b"CONT\t2\t" + b64(ALICE), b"CONT\t1\t" + b64("bob@example.org"))
        outputs = self.feed(b"CONT\t1\t" + b64("pw1"), b"CONT\t2\t" + b64("pw2"))
        self.assertEqual(
            self.questions(outputs),
            [("1", creds("LOGIN", "bob@example.org", "pw1")), ("2", creds("LOGIN", ALICE, "pw2"))],
        )

    def test_exchangeExpires(self) -> None:
        """
        An exchange without its CONT is dropped after the exchange timeout,
        and the owner is told; a CONT then finds it gone.
        """
        self.feed(auth(b"LOGIN"))
        self.assertEqual(self.conversation.waiting, 1)
        self.clock.advance(EXCHANGE_TIMEOUT - 0.001)
        self.assertEqual((self.conversation.waiting, self.expiries), (1, 0))
        self.clock.advance(0.001)
        self.assertEqual((self.conversation.waiting, self.expiries), (0, 1))
        self.assertEqual(
            self.feed(b"CONT\t1\t" + b64(ALICE)),
            [b"FAIL\t1\treason=authentication request timed out"],
        )

    def test_answeredExchangeDoesNotExpire(self) -> None:
        """A CONT in time stops the exchange's timer."""
        self.feed(auth(b"PLAIN"), b"CONT\t1\t" + b64(f"\0{ALICE}\0pw"))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_waitingBounded(self) -> None:
        """Beyond L{MAX_WAITING} exchanges waiting, the oldest is dropped."""
        for n in range(1, MAX_WAITING + 2):
            self.feed(auth(b"LOGIN", request_id=b"%d" % n))
        self.assertEqual(self.conversation.waiting, MAX_WAITING)
        self.assertEqual(len(self.clock.getDelayedCalls()), MAX_WAITING)
        self.assertEqual(
            self.feed(b"CONT\t1\t" + b64(ALICE)),
            [b"FAIL\t1\treason=authentication request timed out"],
        )

    def test_close(self) -> None:
        """Closing stops every timer and drops every answer still to come."""
        asked = self.ask(auth(b"PLAIN", b"resp=!!"))
        self.feed(auth(b"LOGIN", request_id=b"2"))
        self.conversation.close()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.conversation.waiting, 0)
        self.assertIsNone(self.conversation.answer(asked, Verdict(ERROR)))
