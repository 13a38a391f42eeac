"""
Tests for the Dovecot-auth server: protocol through StringTransport, time
through a Clock, and Userli through the fake resource in StubTreq.
"""

from __future__ import annotations

import os
import re
from base64 import b64encode
from typing import Any

from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.fake_userli import (
    EMPTY,
    ERROR,
    GARBAGE,
    REDIRECT,
    SLOW,
    TOKEN,
    WRONG_TYPE,
    FakeUserli,
    FakeUserliResource,
    UserliData,
)
from userli_postfix.config import Config
from userli_postfix.dovecotauth import EXCHANGE_TIMEOUT, MAX_LINE, parse_plain, sanitise
from userli_postfix.logins import Authenticator
from userli_postfix.metrics import Metrics
from userli_postfix.sasl import (
    IDLE_TIMEOUT,
    MAX_QUEUED,
    SASLFactory,
    SASLServerProtocol,
    makeSASLFactory,
)
from userli_postfix.userli import UserliClient

ALICE = "alice@example.org"
SECRET = "correct horse battery staple"
DELAY = 2.0


def b64(text: str | bytes) -> bytes:
    data = text.encode("utf-8") if isinstance(text, str) else text
    return b64encode(data)


def plain(login: str, password: str, authzid: str = "") -> bytes:
    return b64(f"{authzid}\0{login}\0{password}")


def fields(line: bytes) -> list[bytes]:
    return line.split(b"\t")


class FakeUserliWithAnswer(FakeUserli):
    """A fake whose auth endpoint gives one fixed answer."""

    def __init__(self, status: int, value: Any) -> None:
        super().__init__(UserliData(users={ALICE: SECRET}))
        self.fixed = (status, value)

    def auth(self, body: bytes) -> tuple[int, Any]:
        return self.fixed


class SASLTestMixin:
    """A factory wired to a fake Userli, and helpers to talk to it."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.metrics = Metrics(process=False)
        self.fake = FakeUserli(
            UserliData(
                users={
                    ALICE: SECRET,
                    "spam@example.org": "spam-pw",
                    "change@example.org": "change-pw",
                },
                spam_users={"spam@example.org"},
                password_change_users={"change@example.org"},
            )
        )
        self.factory = self.makeFactory(self.fake)

    def makeFactory(self, fake: FakeUserli, failure_delay: float = DELAY) -> SASLFactory:
        client = UserliClient(
            StubTreq(FakeUserliResource(fake, self.clock)).request,
            "http://userli.test",
            TOKEN,
            self.clock,
            self.metrics,
        )
        self.authenticator = Authenticator(
            client, self.clock, self.metrics, delimiter="+", failure_delay=failure_delay
        )
        return SASLFactory(
            self.authenticator, self.clock, self.metrics, pid=4242, cookie=lambda: "ab" * 16
        )

    def connect(
        self, factory: SASLFactory | None = None
    ) -> tuple[SASLServerProtocol, StringTransport]:
        factory = factory or self.factory
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        assert isinstance(protocol, SASLServerProtocol)
        transport = StringTransport()
        protocol.makeConnection(transport)
        transport.clear()
        protocol.dataReceived(b"VERSION\t1\t2\nCPID\t1234\n")
        return protocol, transport

    def send(self, protocol: SASLServerProtocol, *lines: bytes) -> None:
        protocol.dataReceived(b"".join(line + b"\n" for line in lines))

    def replies(self, transport: StringTransport) -> list[bytes]:
        """The lines written since the last call."""
        data = transport.value()
        transport.clear()
        assert data == b"" or data.endswith(b"\n"), data
        return data.split(b"\n")[:-1]

    def auth(self, request_id: int, mechanism: str, *params: bytes) -> bytes:
        base = (
            f"AUTH\t{request_id}\t{mechanism}\tservice=smtp\tnologin\tlip=127.0.0.1\trip=192.0.2.7"
        )
        return b"\t".join([base.encode("ascii"), *params])

    def count(self, mechanism: str, result: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "userli_postfix_adapter_sasl_auth_total", {"mechanism": mechanism, "result": result}
        )
        return value or 0.0


class HandshakeTests(SASLTestMixin, SynchronousTestCase):
    """The server speaks first, in the order Postfix needs."""

    def test_serverHandshake(self) -> None:
        """
        On connect, without waiting for the client, the server sends
        VERSION, one MECH per mechanism, then SPID, CUID, COOKIE and DONE.
        """
        protocol = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        assert protocol is not None
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertEqual(
            transport.value(),
            b"VERSION\t1\t2\n"
            b"MECH\tPLAIN\tplaintext\n"
            b"MECH\tLOGIN\tplaintext\n"
            b"SPID\t4242\n"
            b"CUID\t1\n"
            b"COOKIE\t" + b"ab" * 16 + b"\n"
            b"DONE\n",
        )

    def test_everyMechBeforeSpid(self) -> None:
        """
        No MECH line follows SPID: Postfix takes an early SPID for an
        auth-master socket and gives up.
        """
        protocol = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        assert protocol is not None
        transport = StringTransport()
        protocol.makeConnection(transport)
        commands = [line.split(b"\t")[0] for line in transport.value().split(b"\n")]
        spid = commands.index(b"SPID")
        self.assertNotIn(b"MECH", commands[spid:])
        self.assertEqual(commands.count(b"MECH"), 2)

    def test_cuidCountsConnections(self) -> None:
        """Each connection gets the next CUID."""
        cuids = []
        for _ in range(3):
            protocol = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
            assert protocol is not None
            transport = StringTransport()
            protocol.makeConnection(transport)
            cuids.append(re.search(rb"\nCUID\t(\d+)\n", transport.value()).group(1))  # type: ignore[union-attr]
        self.assertEqual(cuids, [b"1", b"2", b"3"])

    def test_defaultsArePidAndRandomCookie(self) -> None:
        """
        By default SPID is the process id and every connection gets its own
        random cookie of 32 hex digits.
        """
        factory = SASLFactory(self.authenticator, self.clock, self.metrics)
        cookies = []
        for _ in range(2):
            protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
            assert protocol is not None
            transport = StringTransport()
            protocol.makeConnection(transport)
            value = transport.value()
            self.assertIn(b"\nSPID\t%d\n" % os.getpid(), value)
            cookie = re.search(rb"\nCOOKIE\t([^\n]*)\n", value)
            assert cookie is not None
            self.assertRegex(cookie.group(1), rb"^[0-9a-f]{32}$")
            cookies.append(cookie.group(1))
        self.assertNotEqual(cookies[0], cookies[1])

    def test_anyMinorVersionAccepted(self) -> None:
        """A client of version 1.x for any x is served; VERSION and CPID get no reply."""
        protocol, transport = self.connect()
        self.send(protocol, b"VERSION\t1\t99", b"CPID\t77")
        self.assertEqual(self.replies(transport), [])
        self.assertFalse(transport.disconnecting)
        self.assertEqual(protocol.conversation.client_pid, "77")

    def test_otherMajorVersionClosed(self) -> None:
        """A client speaking another major version is disconnected."""
        protocol = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        assert protocol is not None
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b"VERSION\t2\t0\n")
        self.assertTrue(transport.disconnecting)

    def test_unknownLinesIgnored(self) -> None:
        """
        Unknown lines without a request id, and empty lines, are ignored;
        the connection stays up.
        """
        protocol, transport = self.connect()
        self.send(protocol, b"HELLO", b"", b"\r", b"XYZZY\tsomething")
        self.assertEqual(self.replies(transport), [])
        self.assertFalse(transport.disconnecting)

    def test_unknownCommandWithIdIgnored(self) -> None:
        """
        An unknown command is ignored even when it carries a request id:
        Postfix would take any answer as the reply to its live request, and
        a login waiting for its CONT goes on undisturbed.
        """
        protocol, transport = self.connect()
        self.send(protocol, self.auth(7, "PLAIN"))
        self.assertEqual(self.replies(transport), [b"CONT\t7\t"])
        self.send(protocol, b"FROB\t7\tx")
        self.assertEqual(self.replies(transport), [])
        self.send(protocol, b"CONT\t7\t" + plain(ALICE, SECRET))
        self.assertEqual(self.replies(transport)[-1][:5], b"OK\t7\t")
        self.assertFalse(transport.disconnecting)

    def test_overlongLineCloses(self) -> None:
        """A line beyond any request Postfix can send closes the connection."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"A" * (MAX_LINE + 10))
        self.assertTrue(transport.disconnecting)


class PlainTests(SASLTestMixin, SynchronousTestCase):
    """The PLAIN mechanism (RFC 4616) with and without an initial response."""

    def test_initialResponse(self) -> None:
        """PLAIN with resp= and the right password is OK with user= the address."""
        protocol, transport = self.connect()
        self.send(protocol, self.auth(1, "PLAIN", b"resp=" + plain(ALICE, SECRET)))
        self.assertEqual(self.replies(transport), [b"OK\t1\tuser=alice@example.org"])
        [request] = self.fake.requests("auth")
        self.assertEqual(request.json(), {"email": ALICE, "password": SECRET})

    def test_withoutInitialResponse(self) -> None:
        """
        PLAIN without resp= is answered with a CONT that carries an empty
        challenge field; the response then arrives in a CONT.
        """
        protocol, transport = self.connect()
        self.send(protocol, self.auth(1, "PLAIN"))
        self.assertEqual(transport.value(), b"CONT\t1\t\n")
        transport.clear()
        self.send(protocol, b"CONT\t1\t" + plain(ALICE, SECRET))
        self.assertEqual(self.replies(transport), [b"OK\t1\tuser=alice@example.org"])

    def test_emptyInitialResponse(self) -> None:
        """
        resp= present but empty is a zero-byte response, not a missing one:
        no CONT, but a (delayed) FAIL for a malformed PLAIN response, and
        no API call.
        """
        protocol, transport = self.connect()
        self.send(protocol, self.auth(1, "PLAIN", b"resp="))
        self.assertEqual(self.replies(transport), [])
        self.clock.advance(DELAY)
        self.assertEqual(self.replies(transport), [b"FAIL\t1\treason=invalid PLAIN response"])
        self.assertEqual(self.fake.requests("auth"), [])
        self.assertEqual(self.count("PLAIN", "error"), 1)

    def test_badBase64(self) -> None:
        """
        Invalid base64 in resp= or in a CONT is a FAIL without an API call,
        each delayed like a wrong password.
        """
        protocol, transport = self.connect()
        self.send(protocol, self.auth(1, "PLAIN", b"resp=!!notbase64!!"))
        self.send(protocol, self.auth(2, "PLAIN"))
        self.assertEqual(self.replies(transport), [b"CONT\t2\t"])
        self.send(protocol, b"CONT\t2\tAAA")
        self.clock.advance(DELAY)
        self.assertEqual(self.replies(transport), [b"FAIL\t1\treason=invalid base64 data"])
        self.clock.advance(DELAY)
        self.assertEqual(self.replies(transport), [b"FAIL\t2\treason=invalid base64 data"])
        self.assertEqual(self.fake.requests("auth"), [])

    def test_badPayload(self) -> None:
        """A PLAIN response that is not three NUL-separated parts fails."""
        protocol, transport = self.connect()
        for request_id, payload in enumerate(
            [b64(f"{ALICE}\0{SECRET}"), b64(f"\0{ALICE}\0{SECRET}\0x"), b64(SECRET)], start=1
        ):
            self.send(protocol, self.auth(request_id, "PLAIN", b"resp=" + payload))
        self.clock.pump([DELAY] * 3)
        self.assertEqual(
            self.replies(transport),
            [b"FAIL\t%d\treason=invalid PLAIN response" % i for i in (1, 2, 3)],
        )
        self.assertEqual(self.fake.requests("auth"), [])

    def test_authzidSameAsLogin(self) -> None:
        """An authzid naming the login's own mailbox is accepted."""
        protocol, transport = self.connect()
        self.send(
            protocol, self.auth(1, "PLAIN", b"resp=" + plain(ALICE, SECRET, "Alice@Example.org"))
        )
        self.assertEqual(self.replies(transport), [b"OK\t1\tuser=alice@example.org"])

    def test_authzidOfAnotherUserRefused(self) -> None:
        """
        An authzid other than the login is refused, even with the right
        password, without asking Userli.
        """
        protocol, transport = self.connect()
        self.send(
            protocol, self.auth(1, "PLAIN", b"resp=" + plain(ALICE, SECRET, "bob@example.org"))
        )
        self.clock.advance(DELAY)
        self.assertEqual(
            self.replies(transport),
            [b"FAIL\t1\tuser=alice@example.org\treason=authorization identity not allowed"],
        )
        self.assertEqual(self.fake.requests("auth"), [])
        self.assertEqual(self.count("PLAIN", "invalid_credentials"), 1)

    def test_mechanismCaseInsensitive(self) -> None:
        """Postfix passes the mechanism as the SMTP client spelled it."""
        protocol, transport = self.connect()
        self.send(protocol, self.auth(1, "plain", b"resp=" + plain(ALICE, SECRET)))
        self.assertEqual(self.replies(transport), [b"OK\t1\tuser=alice@example.org"])

    def test_parametersInAnyOrder(self) -> None:
        """AUTH parameters come in any order; unknown ones and bare flags are ignored."""
        protocol, transport = self.connect()
        self.send(
            protocol,
            b"AUTH\t1\tPLAIN\tresp=" + plain(ALICE, SECRET) + b"\tsecured\tfuture=1\tnologin"
            b"\trip=192.0.2.1\tservice=smtp\tlip=127.0.0.1",
        )
        self.assertEqual(self.replies(transport), [b"OK\t1\tuser=alice@example.org"])

    def test_crlfTolerated(self) -> None:
        """A line ending in CRLF is read like one ending in LF."""
        protocol, transport = self.connect()
        protocol.dataReceived(self.auth(1, "PLAIN", b"resp=" + plain(ALICE, SECRET)) + b"\r\n")
        self.assertEqual(self.replies(transport), [b"OK\t1\tuser=alice@example.org"])


class LoginTests(SASLTestMixin, SynchronousTestCase):
    """The LOGIN mechanism with and without an initial response."""

    def test_withoutInitialResponse(self) -> None:
        """LOGIN asks for Username: then Password:, each in a CONT."""
        protocol, transport = self.connect()
        self.send(protocol, self.auth(1, "LOGIN"))
        self.assertEqual(self.replies(transport), [b"CONT\t1\t" + b64("Username:")])
        self.send(protocol, b"CONT\t1\t" + b64(ALICE))
        self.assertEqual(self.replies(transport), [b"CONT\t1\t" + b64("Password:")])
        self.send(protocol, b"CONT\t1\t" + b64(SECRET))
        self.assertEqual(self.replies(transport), [b"OK\t1\tuser=alice@example.org"])
        [request] = self.fake.requests("auth")
        self.assertEqual(request.json(), {"email": ALICE, "password": SECRET})
        self.assertEqual(self.count("LOGIN", "success"), 1)

    def test_initialResponseIsTheUserName(self) -> None:
        """
        LOGIN with an initial response (what smtplib sends by default) takes
        it as the user name and asks only for the password.
        """
        protocol, transport = self.connect()
        self.send(protocol, self.auth(1, "LOGIN", b"resp=" + b64(ALICE)))
        self.assertEqual(self.replies(transport), [b"CONT\t1\t" + b64("Password:")])
        self.send(protocol, b"CONT\t1\t" + b64(SECRET))
        self.assertEqual(self.replies(transport), [b"OK\t1\tuser=alice@example.org"])
        [request] = self.fake.requests("auth")
        self.assertEqual(request.json(), {"email": ALICE, "password": SECRET})

    def test_emptyInitialResponse(self) -> None:
        """
        LOGIN with an empty initial response is an empty user name: the
        password is asked for, and the login fails without an API call.
        """
        protocol, transport = self.connect()
        self.send(protocol, self.auth(1, "LOGIN", b"resp="))
        self.assertEqual(self.replies(transport), [b"CONT\t1\t" + b64("Password:")])
        self.send(protocol, b"CONT\t1\t" + b64(SECRET))
        self.clock.advance(DELAY)
        self.assertEqual(self.replies(transport), [b"FAIL\t1\treason=authentication failed"])
        self.assertEqual(self.fake.requests("auth"), [])

    def test_wrongPassword(self) -> None:
        """A wrong password is FAIL with the API's message, after the delay."""
        protocol, transport = self.connect()
        self.send(protocol, self.auth(1, "LOGIN", b"resp=" + b64(ALICE)))
        self.replies(transport)
        self.send(protocol, b"CONT\t1\t" + b64("wrong"))
        self.assertEqual(self.replies(transport), [])
        self.clock.advance(DELAY - 0.01)
        self.assertEqual(self.replies(transport), [])
        self.clock.advance(0.01)
        self.assertEqual(
            self.replies(transport),
            [b"FAIL\t1\tuser=alice@example.org\treason=authentication failed"],
        )
        self.assertEqual(self.count("LOGIN", "invalid_credentials"), 1)

    def test_badBase64UserName(self) -> None:
        """Invalid base64 as the LOGIN user name fails at once (after the delay)."""
        protocol, transport = self.connect()
        self.send(protocol, self.auth(1, "LOGIN"))
        self.replies(transport)
        self.send(protocol, b"CONT\t1\t%%%")
        self.clock.advance(DELAY)
        self.assertEqual(self.replies(transport), [b"FAIL\t1\treason=invalid base64 data"])

    def test_notUtf8(self) -> None:
        """Credentials that are not UTF-8 fail without an API call."""
        protocol, transport = self.connect()
        self.send(protocol, self.auth(1, "LOGIN", b"resp=" + b64(ALICE)))
        self.replies(transport)
        self.send(protocol, b"CONT\t1\t" + b64(b"\xff\xfe"))
        self.clock.advance(DELAY)
        self.assertEqual(self.replies(transport), [b"FAIL\t1\treason=credentials are not UTF-8"])
        self.assertEqual(self.fake.requests("auth"), [])


class DecisionTests(SASLTestMixin, SynchronousTestCase):
    """What the API's answers become."""

    def login(self, login: str, password: str) -> list[bytes]:
        protocol, transport = self.connect()
        self.send(protocol, self.auth(1, "PLAIN", b"resp=" + plain(login, password)))
        # Step by step: a timer set while the clock advances counts from then.
        self.clock.pump([1] * 60)
        return self.replies(transport)

    def test_normalisedAddress(self) -> None:
        """
        The login is normalised before the API call and the OK carries the
        normalised address, so Postfix sees one identity per mailbox.
        """
        self.assertEqual(
            self.login(" Alice+Tag@Example.ORG ", SECRET), [b"OK\t1\tuser=alice@example.org"]
        )
        [request] = self.fake.requests("auth")
        self.assertEqual(request.json()["email"], ALICE)

    def test_notAnAddress(self) -> None:
        """A login that fails normalisation is a failed login without an API call."""
        for login in ["alice", "alice@@example.org", "al!ce@example.org", ""]:
            self.assertEqual(
                self.login(login, SECRET), [b"FAIL\t1\treason=authentication failed"], login
            )
        self.assertEqual(self.fake.requests("auth"), [])

    def test_emptyPassword(self) -> None:
        """An empty password fails without an API call (Userli would answer 422)."""
        self.assertEqual(
            self.login(ALICE, ""),
            [b"FAIL\t1\tuser=alice@example.org\treason=authentication failed"],
        )
        self.assertEqual(self.fake.requests("auth"), [])

    def test_refusedUsers(self) -> None:
        """Spam-role and password-change users get FAIL with Userli's message."""
        self.assertEqual(
            self.login("spam@example.org", "spam-pw"),
            [b"FAIL\t1\tuser=spam@example.org\treason=user disabled due to spam role"],
        )
        self.assertEqual(
            self.login("change@example.org", "change-pw"),
            [b"FAIL\t1\tuser=change@example.org\treason=user password change required"],
        )

    def test_apiFailuresFailClosed(self) -> None:
        """
        A 500, an empty, HTML or differently typed 200, a redirect and no
        answer within the deadline all fail the login, marked temporary.
        """
        for mode in (ERROR, EMPTY, GARBAGE, WRONG_TYPE, REDIRECT, SLOW):
            self.fake.set_mode(mode, delay=30)
            self.assertEqual(
                self.login(ALICE, SECRET),
                [b"FAIL\t1\tuser=alice@example.org\ttemp\treason=temporary authentication failure"],
                mode,
            )
        self.assertEqual(self.count("PLAIN", "error"), 6)
        self.assertEqual(self.count("PLAIN", "success"), 0)

    def test_oddSuccessBodies(self) -> None:
        """
        Only a 200 whose body is {"message": "success"} is a success: other
        shapes of a 200 fail closed.
        """
        for value in [
            {},
            {"message": "ok"},
            {"message": True},
            [],
            None,
            "success",
            {"status": "success"},
        ]:
            self.factory = self.makeFactory(FakeUserliWithAnswer(200, value))
            self.assertEqual(
                self.login(ALICE, SECRET),
                [b"FAIL\t1\tuser=alice@example.org\ttemp\treason=temporary authentication failure"],
                value,
            )

    def test_badTokenFailsClosed(self) -> None:
        """A 401 for our token (no message field) fails closed."""
        self.factory = self.makeFactory(FakeUserliWithAnswer(401, {"error": "Invalid API token"}))
        self.assertEqual(
            self.login(ALICE, SECRET),
            [b"FAIL\t1\tuser=alice@example.org\ttemp\treason=temporary authentication failure"],
        )

    def test_controlCharactersInApiMessage(self) -> None:
        """
        TAB, CR, LF and 0x01 in an API message cannot inject fields or
        lines: the reply stays one line with one reason field, cut short.
        """
        message = "bad\tnews\r\nOK\t1\tuser=evil@example.org\x01" + "x" * 500
        self.factory = self.makeFactory(FakeUserliWithAnswer(403, {"message": message}))
        [line] = self.login(ALICE, SECRET)
        self.assertEqual(fields(line)[:3], [b"FAIL", b"1", b"user=alice@example.org"])
        self.assertEqual(len(fields(line)), 4)
        reason = fields(line)[3]
        self.assertTrue(reason.startswith(b"reason=bad news OK 1 user=evil@example.org"))
        self.assertNotIn(b"\x01", reason)
        self.assertLessEqual(len(reason), len(b"reason=") + 100)

    def test_unsupportedMechanism(self) -> None:
        """An unknown mechanism is answered at once with FAIL, without an API call."""
        protocol, transport = self.connect()
        self.send(protocol, self.auth(1, "CRAM-MD5"), self.auth(2, "XOAUTH2", b"resp=abc"))
        self.assertEqual(
            self.replies(transport),
            [
                b"FAIL\t1\treason=unsupported authentication mechanism",
                b"FAIL\t2\treason=unsupported authentication mechanism",
            ],
        )
        self.assertEqual(self.fake.requests("auth"), [])
        self.assertEqual(self.count("unsupported", "error"), 2)

    def test_malformedAuth(self) -> None:
        """An AUTH without a mechanism is answered; one without an id is ignored."""
        protocol, transport = self.connect()
        self.send(protocol, b"AUTH\t5", b"AUTH")
        self.assertEqual(self.replies(transport), [b"FAIL\t5\treason=invalid AUTH request"])
        self.assertFalse(transport.disconnecting)


class FailureDelayTests(SASLTestMixin, SynchronousTestCase):
    """The brute-force brake holds back failures and nothing else."""

    def test_otherConnectionServedDuringDelay(self) -> None:
        """A second connection logs in while the first one's failure is held back."""
        first, firstTransport = self.connect()
        second, secondTransport = self.connect()
        self.send(first, self.auth(1, "PLAIN", b"resp=" + plain(ALICE, "wrong")))
        self.send(second, self.auth(1, "PLAIN", b"resp=" + plain(ALICE, SECRET)))
        self.assertEqual(self.replies(secondTransport), [b"OK\t1\tuser=alice@example.org"])
        self.assertEqual(self.replies(firstTransport), [])
        self.clock.advance(DELAY)
        self.assertEqual(
            self.replies(firstTransport),
            [b"FAIL\t1\tuser=alice@example.org\treason=authentication failed"],
        )

    def test_laterLoginWaitsItsTurn(self) -> None:
        """
        On one connection, a login sent while an earlier one's failure is
        held back is decided (and asked of Userli) only once that failure
        has been answered.
        """
        protocol, transport = self.connect()
        self.send(
            protocol,
            self.auth(1, "PLAIN", b"resp=" + plain(ALICE, "wrong")),
            self.auth(2, "PLAIN", b"resp=" + plain(ALICE, SECRET)),
        )
        self.assertEqual(self.replies(transport), [])
        self.assertEqual(len(self.fake.requests("auth")), 1)
        self.clock.advance(DELAY)
        self.assertEqual(
            self.replies(transport),
            [
                b"FAIL\t1\tuser=alice@example.org\treason=authentication failed",
                b"OK\t2\tuser=alice@example.org",
            ],
        )
        self.assertEqual(len(self.fake.requests("auth")), 2)

    def test_successNotDelayed(self) -> None:
        """A good login is answered at once."""
        protocol, transport = self.connect()
        self.send(protocol, self.auth(1, "PLAIN", b"resp=" + plain(ALICE, SECRET)))
        self.assertEqual(self.replies(transport), [b"OK\t1\tuser=alice@example.org"])

    def test_zeroDelay(self) -> None:
        """SASL_FAILURE_DELAY=0 turns the brake off."""
        self.factory = self.makeFactory(self.fake, failure_delay=0)
        protocol, transport = self.connect()
        self.send(protocol, self.auth(1, "PLAIN", b"resp=" + plain(ALICE, "wrong")))
        self.assertEqual(
            self.replies(transport),
            [b"FAIL\t1\tuser=alice@example.org\treason=authentication failed"],
        )

    def test_durationExcludesDelay(self) -> None:
        """The duration histogram measures the decision, not the brake."""
        protocol, _transport = self.connect()
        self.send(protocol, self.auth(1, "PLAIN", b"resp=" + plain(ALICE, "wrong")))
        self.clock.advance(DELAY)
        total = self.metrics.registry.get_sample_value(
            "userli_postfix_adapter_sasl_auth_duration_seconds_sum",
            {"mechanism": "PLAIN", "result": "invalid_credentials"},
        )
        self.assertEqual(total, 0.0)


class OneLoginAtATimeTests(SASLTestMixin, SynchronousTestCase):
    """
    Logins on one connection are decided one after the other, so that each
    failure costs its own delay however many a client pipelines.
    """

    WRONG = [b"resp=" + plain(ALICE, f"guess-{n}") for n in range(4)]
    FAIL = b"FAIL\t%d\tuser=alice@example.org\treason=authentication failed"

    def test_pipelinedFailuresOneDelayApart(self) -> None:
        """
        Four wrong logins pipelined on one connection are answered one delay
        apart, each only after its own delay; a correct login pipelined
        behind them is still answered, right after the last failure; another
        connection meanwhile is served at once.
        """
        protocol, transport = self.connect()
        self.send(
            protocol,
            *(self.auth(n, "PLAIN", self.WRONG[n - 1]) for n in range(1, 5)),
            self.auth(5, "PLAIN", b"resp=" + plain(ALICE, SECRET)),
        )
        other, otherTransport = self.connect()
        self.send(other, self.auth(1, "PLAIN", b"resp=" + plain(ALICE, SECRET)))
        self.assertEqual(self.replies(otherTransport), [b"OK\t1\tuser=alice@example.org"])
        self.send(other, self.auth(2, "PLAIN", self.WRONG[0]))
        for n in range(1, 5):
            self.clock.advance(DELAY - 0.01)
            self.assertEqual(self.replies(transport), [])
            self.assertEqual(len(self.fake.requests("auth")), 1 + n + 1)
            self.clock.advance(0.01)
            expected = [self.FAIL % n]
            if n == 4:
                expected.append(b"OK\t5\tuser=alice@example.org")
            self.assertEqual(self.replies(transport), expected, n)
            if n == 1:
                # The other connection's failure had its own delay, in parallel.
                self.assertEqual(self.replies(otherTransport), [self.FAIL % 2])
        self.assertEqual(protocol.outstanding, 0)
        self.assertEqual(self.count("PLAIN", "invalid_credentials"), 5)
        self.assertEqual(self.count("PLAIN", "success"), 2)

    def test_badCredentialsQueuedToo(self) -> None:
        """
        Logins refused without an API call (bad base64, not an address)
        take their turn and their delay like a wrong password: garbage is
        no faster than a guess.
        """
        protocol, transport = self.connect()
        self.send(
            protocol,
            self.auth(1, "PLAIN", b"resp=!!"),
            self.auth(2, "PLAIN", b"resp=" + plain("nobody", "x")),
            self.auth(3, "PLAIN", self.WRONG[0]),
        )
        self.clock.advance(DELAY)
        self.assertEqual(self.replies(transport), [b"FAIL\t1\treason=invalid base64 data"])
        self.assertEqual(self.fake.requests("auth"), [])
        self.clock.advance(DELAY)
        self.assertEqual(self.replies(transport), [b"FAIL\t2\treason=authentication failed"])
        self.assertEqual(len(self.fake.requests("auth")), 1)
        self.clock.advance(DELAY)
        self.assertEqual(self.replies(transport), [self.FAIL % 3])

    def test_challengesNotQueued(self) -> None:
        """A LOGIN challenge needs no decision: it is sent while a failure is held back."""
        protocol, transport = self.connect()
        self.send(protocol, self.auth(1, "PLAIN", self.WRONG[0]), self.auth(2, "LOGIN"))
        self.assertEqual(self.replies(transport), [b"CONT\t2\t" + b64("Username:")])

    def test_replacedQueuedLoginNeverAsked(self) -> None:
        """
        A queued login whose id is reused (or cancelled) before its turn is
        dropped without an API call and without a reply.
        """
        protocol, transport = self.connect()
        self.send(
            protocol,
            self.auth(1, "PLAIN", self.WRONG[0]),
            self.auth(2, "PLAIN", self.WRONG[1]),
            self.auth(3, "PLAIN", self.WRONG[2]),
            self.auth(2, "PLAIN", b"resp=" + plain(ALICE, SECRET)),
            b"CANCEL\t3",
        )
        self.assertEqual(protocol.outstanding, 2)
        self.clock.advance(DELAY)
        self.assertEqual(self.replies(transport), [self.FAIL % 1, b"OK\t2\tuser=alice@example.org"])
        self.clock.advance(DELAY * 3)
        self.assertEqual(self.replies(transport), [])
        self.assertEqual(
            [request.json()["password"] for request in self.fake.requests("auth")],
            ["guess-0", SECRET],
        )
        self.assertEqual(protocol.outstanding, 0)

    def test_backPressure(self) -> None:
        """
        At L{MAX_QUEUED} logins waiting, the connection is paused: the
        transport stops reading and lines already received are not parsed
        either.  Once half are answered, reading resumes, the lines received
        meanwhile are parsed, and every login is answered, one delay apart.
        """
        protocol, transport = self.connect()
        total = MAX_QUEUED + 4
        self.send(
            protocol,
            *(self.auth(n, "PLAIN", b"resp=" + plain(ALICE, f"g{n}")) for n in range(1, total + 1)),
        )
        self.assertEqual(transport.producerState, "paused")
        self.assertTrue(protocol.paused)
        self.assertEqual(protocol.outstanding, MAX_QUEUED)
        answered = 0
        while answered <= MAX_QUEUED // 2:
            self.assertEqual(transport.producerState, "paused", answered)
            self.clock.advance(DELAY)
            answered += 1
            self.assertEqual(len(self.replies(transport)), 1)
        self.assertEqual(transport.producerState, "producing")
        self.assertFalse(protocol.paused)
        self.assertEqual(protocol.outstanding, total - answered)
        for _ in range(total - answered):
            self.clock.advance(DELAY)
            self.assertEqual(len(self.replies(transport)), 1)
        self.assertEqual(len(self.fake.requests("auth")), total)
        self.assertEqual(protocol.outstanding, 0)

    def test_drainWhilePaused(self) -> None:
        """
        At shutdown, a paused connection's lines still unread are parsed
        and answered within the grace period before the connection closes.
        """
        protocol, transport = self.connect()
        total = MAX_QUEUED + 2
        self.send(
            protocol,
            *(self.auth(n, "PLAIN", b"resp=" + plain(ALICE, f"g{n}")) for n in range(1, total + 1)),
        )
        self.assertEqual(transport.producerState, "paused")
        drained = self.factory.drain(DELAY * (total + 1))
        self.assertNoResult(drained)
        self.clock.pump([DELAY] * total)
        self.assertEqual(len(self.replies(transport)), total)
        self.assertTrue(transport.disconnecting)

    def test_brokenDecisionDoesNotStall(self) -> None:
        """
        A decision that fails unexpectedly (a bug) is logged, and the logins
        queued behind it are still decided and answered.
        """
        real = self.authenticator.login
        calls: list[str] = []

        def login(*args: Any, **kwargs: Any) -> Any:
            calls.append(args[1])
            if len(calls) == 1:
                raise RuntimeError("bug")
            return real(*args, **kwargs)

        self.authenticator.login = login  # type: ignore[method-assign]
        protocol, transport = self.connect()
        self.send(
            protocol,
            self.auth(1, "PLAIN", self.WRONG[0]),
            self.auth(2, "PLAIN", b"resp=" + plain(ALICE, SECRET)),
        )
        self.assertEqual(self.replies(transport), [b"OK\t2\tuser=alice@example.org"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(protocol.outstanding, 0)

    def test_closedWhileQueued(self) -> None:
        """Logins still queued when the client leaves are never asked."""
        protocol, transport = self.connect()
        self.send(protocol, *(self.auth(n, "PLAIN", self.WRONG[n - 1]) for n in range(1, 5)))
        protocol.connectionLost(Failure(ConnectionDone()))
        self.clock.advance(DELAY * 5)
        self.assertEqual(len(self.fake.requests("auth")), 1)
        self.assertEqual(self.replies(transport), [])


class ControlCharacterLoginTests(SASLTestMixin, SynchronousTestCase):
    """
    A login name with a control, format or whitespace character inside is
    no Userli address: a failed login (delayed), no API call, and the name
    in no log line.
    """

    LOGINS = [
        "alice\n@example.org",
        "alice\r@example.org",
        "ali\x00ce@example.org",
        "alice@example.org\n.net",
        "alice+\x1b@example.org",
        "alice\u200b@example.org",
        "alice\u2028@example.org",
    ]

    def test_noApiCall(self) -> None:
        """PLAIN and LOGIN with such a name fail without asking Userli."""
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        protocol, transport = self.connect()
        request_id = 0
        for login in self.LOGINS:
            request_id += 1
            self.send(protocol, self.auth(request_id, "PLAIN", b"resp=" + plain(login, SECRET)))
            request_id += 1
            self.send(protocol, self.auth(request_id, "LOGIN", b"resp=" + b64(login)))
            self.send(protocol, b"CONT\t%d\t" % request_id + b64(SECRET))
        self.clock.pump([DELAY] * request_id)
        replies = [line for line in self.replies(transport) if not line.startswith(b"CONT\t")]
        # A NUL makes the PLAIN response itself invalid: a FAIL all the same.
        self.assertEqual(len(replies), request_id)
        for n, reply in enumerate(replies, start=1):
            self.assertTrue(reply.startswith(b"FAIL\t%d\treason=" % n), reply)
        self.assertEqual(self.fake.requests("auth"), [])
        text = "\n".join(formatEvent(event) + repr(event) for event in events)
        for login in self.LOGINS:
            self.assertNotIn(login, text)
            self.assertNotIn(repr(login)[1:-1], text)

    def test_clientFieldsNotLogged(self) -> None:
        """A C{rip=} or request id with control characters reaches no log line as sent."""
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        protocol, _transport = self.connect()
        self.send(
            protocol,
            b"AUTH\t7\x1b[2J\tPLAIN\tservice=smtp\trip=192.0.2.7\r\x1b[31mforged\tresp="
            + plain(ALICE, "wrong"),
        )
        self.clock.advance(DELAY)
        text = "\n".join(formatEvent(event) + repr(event) for event in events)
        self.assertTrue(events)
        self.assertNotIn("\x1b", text)
        self.assertNotIn("forged", text)


class RequestStateTests(SASLTestMixin, SynchronousTestCase):
    """State per request id: abandoned logins, reused ids, stale replies."""

    def test_newAuthAfterAbandonedLogin(self) -> None:
        """
        After an SMTP client aborts a LOGIN (Postfix sends no CANCEL), the
        next AUTH on the connection is served normally.
        """
        protocol, transport = self.connect()
        self.send(protocol, self.auth(1, "LOGIN"))
        self.send(protocol, b"CONT\t1\t" + b64(ALICE))
        self.assertEqual(
            self.replies(transport),
            [b"CONT\t1\t" + b64("Username:"), b"CONT\t1\t" + b64("Password:")],
        )
        self.send(protocol, self.auth(2, "LOGIN", b"resp=" + b64(ALICE)))
        self.assertEqual(self.replies(transport), [b"CONT\t2\t" + b64("Password:")])
        self.send(protocol, b"CONT\t2\t" + b64(SECRET))
        self.assertEqual(self.replies(transport), [b"OK\t2\tuser=alice@example.org"])

    def test_newAuthReplacesPendingOneWithSameId(self) -> None:
        """An AUTH reusing a pending id replaces the old exchange."""
        protocol, transport = self.connect()
        self.send(protocol, self.auth(1, "LOGIN", b"resp=" + b64("bob@example.org")))
        self.replies(transport)
        self.send(protocol, self.auth(1, "PLAIN"))
        self.assertEqual(self.replies(transport), [b"CONT\t1\t"])
        self.send(protocol, b"CONT\t1\t" + plain(ALICE, SECRET))
        self.assertEqual(self.replies(transport), [b"OK\t1\tuser=alice@example.org"])

    def test_replacedDecisionNotWritten(self) -> None:
        """
        When an id is reused while its old login is still held back, only
        the new request's answer is written for it, and only once the old
        one's delay is over: reusing an id does not skip the brake.
        """
        protocol, transport = self.connect()
        self.send(protocol, self.auth(5, "PLAIN", b"resp=" + plain(ALICE, "wrong")))
        self.send(protocol, self.auth(5, "PLAIN", b"resp=" + plain(ALICE, SECRET)))
        self.assertEqual(self.replies(transport), [])
        self.clock.advance(DELAY)
        self.assertEqual(self.replies(transport), [b"OK\t5\tuser=alice@example.org"])
        self.clock.advance(DELAY)
        self.assertEqual(self.replies(transport), [])

    def test_finishedIdForgotten(self) -> None:
        """A CONT for an id already answered gets a FAIL, not a second login."""
        protocol, transport = self.connect()
        self.send(protocol, self.auth(1, "PLAIN", b"resp=" + plain(ALICE, SECRET)))
        self.send(protocol, b"CONT\t1\t" + plain(ALICE, SECRET))
        self.assertEqual(
            self.replies(transport),
            [b"OK\t1\tuser=alice@example.org", b"FAIL\t1\treason=authentication request timed out"],
        )
        self.assertEqual(len(self.fake.requests("auth")), 1)

    def test_contWhileDecidingIgnored(self) -> None:
        """A CONT for a request being decided is ignored; its answer still comes."""
        protocol, transport = self.connect()
        self.send(protocol, self.auth(1, "PLAIN", b"resp=" + plain(ALICE, "wrong")))
        self.send(protocol, b"CONT\t1\t" + b64("x"))
        self.assertEqual(self.replies(transport), [])
        self.clock.advance(DELAY)
        self.assertEqual(len(self.replies(transport)), 1)

    def test_idsIndependent(self) -> None:
        """Two LOGIN exchanges interleaved on one connection each finish under their id."""
        protocol, transport = self.connect()
        self.send(protocol, self.auth(1, "LOGIN"), self.auth(2, "LOGIN"))
        self.send(protocol, b"CONT\t2\t" + b64(ALICE), b"CONT\t1\t" + b64(ALICE))
        self.send(protocol, b"CONT\t1\t" + b64(SECRET), b"CONT\t2\t" + b64(SECRET))
        self.assertEqual(
            self.replies(transport),
            [
                b"CONT\t1\t" + b64("Username:"),
                b"CONT\t2\t" + b64("Username:"),
                b"CONT\t2\t" + b64("Password:"),
                b"CONT\t1\t" + b64("Password:"),
                b"OK\t1\tuser=alice@example.org",
                b"OK\t2\tuser=alice@example.org",
            ],
        )

    def test_cancel(self) -> None:
        """CANCEL drops a pending exchange without a reply."""
        protocol, transport = self.connect()
        self.send(protocol, self.auth(1, "LOGIN"), b"CANCEL\t1")
        self.replies(transport)
        self.send(protocol, b"CONT\t1\t" + b64(ALICE))
        self.assertEqual(
            self.replies(transport), [b"FAIL\t1\treason=authentication request timed out"]
        )

    def test_abandonedExchangeExpires(self) -> None:
        """
        An exchange without its CONT is dropped after the exchange deadline;
        the connection stays open.
        """
        protocol, transport = self.connect()
        self.send(protocol, self.auth(1, "LOGIN"))
        self.replies(transport)
        self.clock.advance(EXCHANGE_TIMEOUT)
        self.assertFalse(transport.disconnecting)
        self.send(protocol, b"CONT\t1\t" + b64(ALICE))
        self.assertEqual(
            self.replies(transport), [b"FAIL\t1\treason=authentication request timed out"]
        )

    def test_waitingExchangesBounded(self) -> None:
        """A client opening many exchanges without finishing them loses the oldest."""
        protocol, transport = self.connect()
        for request_id in range(1, 18):
            self.send(protocol, self.auth(request_id, "LOGIN"))
        self.replies(transport)
        self.send(protocol, b"CONT\t1\t" + b64(ALICE), b"CONT\t17\t" + b64(ALICE))
        self.assertEqual(
            self.replies(transport),
            [b"FAIL\t1\treason=authentication request timed out", b"CONT\t17\t" + b64("Password:")],
        )


class ConnectionLifeTests(SASLTestMixin, SynchronousTestCase):
    """Idle timeout, outstanding requests, drain and the connection limit."""

    def test_idleTimeout(self) -> None:
        """An idle connection lives for the idle timeout (360 s), not less."""
        _protocol, transport = self.connect()
        self.assertEqual(IDLE_TIMEOUT, 360)
        self.clock.advance(IDLE_TIMEOUT - 1)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(transport.disconnecting)

    def test_activityRestartsIdleTimer(self) -> None:
        """Each finished exchange starts the idle time anew."""
        protocol, transport = self.connect()
        self.clock.advance(IDLE_TIMEOUT - 10)
        self.send(protocol, self.auth(1, "PLAIN", b"resp=" + plain(ALICE, SECRET)))
        self.clock.advance(IDLE_TIMEOUT - 1)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(transport.disconnecting)

    def test_neverClosedWithRequestOutstanding(self) -> None:
        """
        While a login is being decided (here: held back far longer than the
        idle timeout) the connection is not closed; it is once idle again.
        """
        self.factory = self.makeFactory(self.fake, failure_delay=3 * IDLE_TIMEOUT)
        protocol, transport = self.connect()
        self.send(protocol, self.auth(1, "PLAIN", b"resp=" + plain(ALICE, "wrong")))
        self.clock.advance(3 * IDLE_TIMEOUT - 1)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)
        self.assertEqual(len(self.replies(transport)), 1)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(IDLE_TIMEOUT)
        self.assertTrue(transport.disconnecting)

    def test_waitingForContKeepsConnection(self) -> None:
        """A pending CONT does not shorten the connection's life below the idle timeout."""
        protocol, transport = self.connect()
        self.send(protocol, self.auth(1, "LOGIN"))
        self.clock.advance(IDLE_TIMEOUT - 1)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(transport.disconnecting)

    def test_drainWaitsForOutstandingReply(self) -> None:
        """At shutdown a connection with a login in flight closes after its answer."""
        busy, busyTransport = self.connect()
        idle, idleTransport = self.connect()
        self.send(busy, self.auth(1, "PLAIN", b"resp=" + plain(ALICE, "wrong")))
        done = self.factory.drain(grace=10)
        self.assertTrue(idleTransport.disconnecting)
        self.assertFalse(busyTransport.disconnecting)
        self.clock.advance(DELAY)
        self.assertEqual(len(self.replies(busyTransport)), 1)
        self.assertTrue(busyTransport.disconnecting)
        for protocol in (busy, idle):
            protocol.connectionLost(None)  # type: ignore[arg-type]
        self.successResultOf(done)

    def test_drainWaitsForPendingCont(self) -> None:
        """
        At shutdown a login waiting for the client's CONT is not cut off:
        the connection closes once that login is answered.
        """
        protocol, transport = self.connect()
        self.send(protocol, self.auth(1, "LOGIN"))
        self.factory.drain(grace=10)
        self.assertFalse(transport.disconnecting)
        self.send(protocol, b"CONT\t1\t" + b64(ALICE))
        self.assertFalse(transport.disconnecting)
        self.send(protocol, b"CONT\t1\t" + b64(SECRET))
        self.assertTrue(self.replies(transport)[-1].startswith(b"OK\t1\t"))
        self.assertTrue(transport.disconnecting)

    def test_connectionLimit(self) -> None:
        """Connections beyond the limit are refused and counted."""
        factory = SASLFactory(self.authenticator, self.clock, self.metrics, max_connections=1)
        self.connect(factory)
        self.assertIsNone(factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40001)))
        self.assertEqual(
            self.metrics.registry.get_sample_value(
                "userli_postfix_adapter_sasl_connection_pool_full_total"
            ),
            1,
        )
        self.assertEqual(
            self.metrics.registry.get_sample_value(
                "userli_postfix_adapter_sasl_active_connections"
            ),
            1,
        )

    def test_replyAfterDisconnectDropped(self) -> None:
        """A held-back failure whose connection went away is not written anywhere."""
        protocol, transport = self.connect()
        self.send(protocol, self.auth(1, "PLAIN", b"resp=" + plain(ALICE, "wrong")))
        protocol.connectionLost(None)  # type: ignore[arg-type]
        self.clock.advance(DELAY)
        self.assertEqual(self.replies(transport), [])


class SecretsAndMetricsTests(SASLTestMixin, SynchronousTestCase):
    """Nothing secret in the logs, nothing personal in the metric labels."""

    def test_noSecretsInLogs(self) -> None:
        """
        No password, resp= value or CONT payload appears in any log event,
        whatever the outcome.
        """
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        secrets = [SECRET, "wrong-" + SECRET]
        protocol, _transport = self.connect()
        self.send(protocol, self.auth(1, "PLAIN", b"resp=" + plain(ALICE, SECRET)))
        self.send(protocol, self.auth(2, "LOGIN", b"resp=" + b64(ALICE)))
        self.send(protocol, b"CONT\t2\t" + b64(secrets[1]))
        self.send(protocol, self.auth(3, "LOGIN"), b"CONT\t3\t" + b64(ALICE))
        self.send(protocol, b"CONT\t3\t" + b64(SECRET))
        self.send(protocol, self.auth(4, "PLAIN", b"resp=" + plain("not an address", SECRET)))
        self.send(protocol, self.auth(5, "PLAIN", b"resp=" + b64(SECRET)))
        self.send(protocol, b"FROB\t6\t" + SECRET.encode())
        self.fake.set_mode(ERROR)
        self.send(protocol, self.auth(7, "PLAIN", b"resp=" + plain(ALICE, SECRET)))
        self.clock.advance(DELAY)
        self.assertTrue(events)
        text = "\n".join(formatEvent(event) + repr(event) for event in events)
        for secret in secrets:
            for form in (secret, b64(secret).decode(), plain(ALICE, secret).decode()):
                self.assertNotIn(form, text)

    def test_noAddressInLabels(self) -> None:
        """No metric label carries an address."""
        protocol, _transport = self.connect()
        self.send(protocol, self.auth(1, "PLAIN", b"resp=" + plain(ALICE, SECRET)))
        self.send(protocol, self.auth(2, "PLAIN", b"resp=" + plain(ALICE, "wrong")))
        self.send(protocol, self.auth(3, "X-" + ALICE))
        self.clock.advance(DELAY)
        for metric in self.metrics.registry.collect():
            for sample in metric.samples:
                for value in sample.labels.values():
                    self.assertNotIn("@", value, sample)

    def test_resultsCounted(self) -> None:
        """Every login outcome is counted by mechanism and result."""
        protocol, _transport = self.connect()
        self.send(protocol, self.auth(1, "PLAIN", b"resp=" + plain(ALICE, SECRET)))
        self.send(protocol, self.auth(2, "LOGIN", b"resp=" + b64(ALICE)), b"CONT\t2\t" + b64("x"))
        self.clock.advance(DELAY)
        self.assertEqual(self.count("PLAIN", "success"), 1)
        self.assertEqual(self.count("LOGIN", "invalid_credentials"), 1)


class PureFunctionTests(SynchronousTestCase):
    """The pure helpers, table-driven."""

    def test_sanitise(self) -> None:
        """Control characters become spaces, runs collapse, the text is cut."""
        table = [
            ("plain text", "plain text"),
            ("a\tb", "a b"),
            ("a\r\nb", "a b"),
            ("a\x01b", "a b"),
            ("a\x7fb", "a b"),
            ("  padded  ", "padded"),
            ("x" * 150, "x" * 100),
        ]
        for raw, expected in table:
            self.assertEqual(sanitise(raw), expected, raw)

    def test_parsePlain(self) -> None:
        """A PLAIN response splits into exactly three parts or not at all."""
        table: list[tuple[bytes, tuple[bytes, bytes, bytes] | None]] = [
            (b"\0u\0p", (b"", b"u", b"p")),
            (b"z\0u\0p", (b"z", b"u", b"p")),
            (b"\0\0", (b"", b"", b"")),
            (b"u\0p", None),
            (b"", None),
            (b"\0u\0p\0", None),
        ]
        for raw, expected in table:
            self.assertEqual(parse_plain(raw), expected, raw)


class MakeFactoryTests(SynchronousTestCase):
    """makeSASLFactory builds the listener from the configuration."""

    def test_fromConfig(self) -> None:
        """The delimiter and failure delay come from the configuration."""
        clock = Clock()
        metrics = Metrics(process=False)
        fake = FakeUserli(UserliData(users={ALICE: SECRET}))
        client = UserliClient(
            StubTreq(FakeUserliResource(fake, clock)).request,
            "http://u.test",
            TOKEN,
            clock,
            metrics,
        )
        config = Config(userli_token=TOKEN, recipient_delimiter="-", sasl_failure_delay=7.0)
        factory = makeSASLFactory(config, clock, client, metrics)
        self.assertEqual(factory.pid, os.getpid())
        self.assertEqual(factory.idle_timeout, IDLE_TIMEOUT)
        self.assertEqual(factory.authenticator.failure_delay, 7.0)
        verdict = self.successResultOf(
            factory.authenticator.login("PLAIN", "alice-tag@example.org", SECRET)
        )
        self.assertEqual((verdict.ok, verdict.user), (True, ALICE))
