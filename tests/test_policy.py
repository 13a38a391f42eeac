"""
Tests for L{userli_postfix.policy}: the policy delegation protocol through
C{StringTransport}, and the quota decision against the fake Userli in
memory (C{StubTreq}) with a fake clock.
"""

from __future__ import annotations

from typing import Any

from treq.testing import StubTreq
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.fake_userli import ERROR, SLOW, TOKEN, FakeUserli, FakeUserliResource, UserliData
from userli_postfix.breaker import FAILURES_TO_OPEN
from userli_postfix.config import Config
from userli_postfix.metrics import Metrics
from userli_postfix.policy import (
    IDLE_TIMEOUT,
    LAST_KNOWN_QUOTA_TTL,
    MAX_ATTRIBUTES,
    MAX_LINE,
    PolicyFactory,
    PolicyProtocol,
    PolicyRequest,
    QuotaPolicy,
    QuotaSource,
    makePolicyFactory,
    one_line,
    parse_attribute,
)
from userli_postfix.ratelimit import MemoryRateLimiter, RateLimitError, Verdict
from userli_postfix.userli import Quota, UserliClient

BASE = "http://userli.test"
START = 1_700_000_000.0
ADDRESS = IPv4Address("TCP", "127.0.0.1", 40000)


def userli_data() -> UserliData:
    return UserliData(
        users={
            "limited@example.org": "pw",
            "free@example.org": "pw",
            "alice@example.org": "pw",
        },
        aliases={"info@example.org": ["alice@example.org"]},
        domains={"example.org"},
        quotas={"limited@example.org": (3, 10), "free@example.org": (0, 0)},
        default_quota=(100, 1000),
    )


def request_bytes(**attributes: str) -> bytes:
    """A policy request as Postfix frames it."""
    return b"".join(f"{k}={v}\n".encode() for k, v in attributes.items()) + b"\n"


def end_of_message(**attributes: str) -> bytes:
    """An END-OF-MESSAGE request with Postfix's usual attributes."""
    base = {
        "request": "smtpd_access_policy",
        "protocol_state": "END-OF-MESSAGE",
        "protocol_name": "ESMTP",
        "client_address": "192.0.2.1",
        "client_name": "client.example.net",
        "helo_name": "client.example.net",
        "sender": "",
        "recipient": "",
        "recipient_count": "1",
        "queue_id": "4ABCD1234",
        "instance": "1a2b.3c4d.5e6f.0",
        "size": "1234",
        "sasl_method": "",
        "sasl_username": "",
    }
    base.update(attributes)
    return request_bytes(**base)


class RecordingLimiter:
    """A limiter that records its calls and answers from a prepared list."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Quota]] = []
        self.answers: list[defer.Deferred[Verdict]] = []

    def check(self, identity: str, quota: Quota) -> defer.Deferred[Verdict]:
        self.calls.append((identity, quota))
        if self.answers:
            return self.answers.pop(0)
        return defer.succeed(Verdict(True, 1, 1))


class PolicyTestCase(SynchronousTestCase):
    """A fake Userli in memory, a fake clock, the memory limiter."""

    delimiter = "+"
    message = "Rate limit exceeded, please try again later"
    cache_ttl = 30.0

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.clock.advance(START)
        self.metrics = Metrics(process=False)
        self.userli = FakeUserli(userli_data())
        self.stub = StubTreq(FakeUserliResource(self.userli, self.clock))
        self.client = UserliClient(self.stub.request, BASE, TOKEN, self.clock, self.metrics)
        self.limiter: Any = MemoryRateLimiter(self.clock)
        self.policy = QuotaPolicy(
            self.client,
            self.limiter,
            self.clock,
            self.metrics,
            delimiter=self.delimiter,
            message=self.message,
            cache_ttl=self.cache_ttl,
        )
        self.factory = PolicyFactory(self.clock, self.policy, self.metrics)

    def connect(self) -> tuple[PolicyProtocol, StringTransport]:
        protocol = self.factory.buildProtocol(ADDRESS)
        assert isinstance(protocol, PolicyProtocol)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def ask(self, data: bytes) -> bytes:
        """Send C{data} on a new connection; what came back so far."""
        protocol, transport = self.connect()
        protocol.dataReceived(data)
        self.stub.flush()
        return transport.value()

    def decide(self, **attributes: str) -> str:
        result = self.policy.decide(PolicyRequest(**attributes))
        self.stub.flush()
        if isinstance(result, str):
            return result
        action: str = self.successResultOf(result)
        return action

    def quota_calls(self) -> list[str | None]:
        return [r.key for r in self.userli.requests("smtp_quota")]

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.metrics.registry.get_sample_value(
            f"userli_postfix_adapter_{name}", labels or {}
        )
        return value or 0.0


class ParseTests(SynchronousTestCase):
    """Attribute lines, table-driven."""

    def test_table(self) -> None:
        """Known attributes are kept, unknown ones and non-attributes are not."""
        cases = [
            (b"sender=a@example.org", ("sender", "a@example.org")),
            (b"sasl_username=", ("sasl_username", "")),
            (b"protocol_state=END-OF-MESSAGE\r", ("protocol_state", "END-OF-MESSAGE")),
            (b"recipient=a=b@example.org", ("recipient", "a=b@example.org")),
            (b"client_name=caf\xc3\xa9.example", ("client_name", "caf\u00e9.example")),
            (b"client_name=\xff", ("client_name", "\ufffd")),
            (b"ccert_subject=whatever", None),
            (b"policy_context=", None),
            (b"sender", None),
            (b"=value", None),
            (b"SENDER=a@example.org", None),
            (b"sender =a@example.org", None),
        ]
        for line, expected in cases:
            self.assertEqual(parse_attribute(line), expected, line)

    def test_requestDefaults(self) -> None:
        """An attribute Postfix did not send is the empty string."""
        request = PolicyRequest(sender="a@example.org")
        self.assertEqual((request.sasl_username, request.protocol_state), ("", ""))

    def test_requestIsFrozen(self) -> None:
        """A parsed request cannot be changed by whoever handles it."""
        request = PolicyRequest(sender="a@example.org")
        self.assertRaises(AttributeError, setattr, request, "sender", "b@example.org")

    def test_oneLine(self) -> None:
        """Line breaks and runs of whitespace become one space."""
        self.assertEqual(one_line(" Too many\r\nmessages\t today \n"), "Too many messages today")


class ProtocolTests(PolicyTestCase):
    """Framing, through C{StringTransport}."""

    def test_oneRequest(self) -> None:
        """A request ends at the empty line; the reply is C{action=...} and an empty line."""
        self.assertEqual(
            self.ask(request_bytes(request="smtpd_access_policy", protocol_state="RCPT")),
            b"action=DUNNO\n\n",
        )

    def test_severalRequestsOneConnection(self) -> None:
        """
        Requests on one connection are answered in order and the connection
        stays open between them.
        """
        protocol, transport = self.connect()
        for _ in range(4):
            protocol.dataReceived(end_of_message(sasl_username="limited@example.org"))
            self.stub.flush()
        self.assertEqual(transport.value(), b"action=DUNNO\n\n" * 3 + self.reject())
        self.assertFalse(transport.disconnecting)

    def reject(self) -> bytes:
        return b"action=REJECT Rate limit exceeded, please try again later\n\n"

    def test_requestsInOneChunk(self) -> None:
        """Several requests arriving in one read are all answered, in order."""
        data = end_of_message(sasl_username="limited@example.org") * 4
        self.assertEqual(self.ask(data), b"action=DUNNO\n\n" * 3 + self.reject())

    def test_byteByByte(self) -> None:
        """A request split across many reads is put back together."""
        protocol, transport = self.connect()
        for byte in end_of_message(sender="alice@example.org"):
            protocol.dataReceived(bytes([byte]))
        self.stub.flush()
        self.assertEqual(transport.value(), b"action=DUNNO\n\n")
        self.assertEqual(self.quota_calls(), ["alice@example.org"])

    def test_repliesInRequestOrder(self) -> None:
        """
        A request that waits for the API is answered before a later one
        that needed nothing.
        """
        self.userli.set_mode(SLOW, delay=1.0)
        protocol, transport = self.connect()
        protocol.dataReceived(end_of_message(sasl_username="alice@example.org"))
        protocol.dataReceived(request_bytes(protocol_state="RCPT"))
        self.stub.flush()
        self.assertEqual(transport.value(), b"")
        self.clock.advance(1.0)
        self.stub.flush()
        self.assertEqual(transport.value(), b"action=DUNNO\n\n" * 2)

    def test_unknownAttributesIgnored(self) -> None:
        """Attributes the daemon does not know, and lines without C{=}, change nothing."""
        data = end_of_message(
            sasl_username="limited@example.org",
            ccert_subject="x",
            server_port="587",
            compatibility_level="3.6",
            mail_version="3.7.11",
            some_future_attribute="value=with=equals",
        )
        data = b"garbage without equals\n" + data
        self.assertEqual(self.ask(data), b"action=DUNNO\n\n")
        self.assertEqual(self.quota_calls(), ["limited@example.org"])

    def test_emptyValues(self) -> None:
        """An empty C{sasl_username} falls back to C{sender}; both empty is DUNNO."""
        self.assertEqual(
            self.ask(end_of_message(sasl_username="", sender="limited@example.org")),
            b"action=DUNNO\n\n",
        )
        self.assertEqual(self.quota_calls(), ["limited@example.org"])
        self.assertEqual(self.ask(end_of_message(sasl_username="", sender="")), b"action=DUNNO\n\n")
        self.assertEqual(self.quota_calls(), ["limited@example.org"])

    def test_otherStates(self) -> None:
        """Every state but END-OF-MESSAGE is DUNNO without asking anyone."""
        for state in ("CONNECT", "EHLO", "HELO", "MAIL", "RCPT", "DATA", "VRFY", "ETRN", ""):
            self.assertEqual(
                self.ask(request_bytes(protocol_state=state, sasl_username="limited@example.org")),
                b"action=DUNNO\n\n",
            )
        self.assertEqual(self.quota_calls(), [])
        self.assertEqual(
            self.sample("policy_requests_total", {"stage": "skip", "action": "dunno"}), 9
        )

    def test_crlf(self) -> None:
        """Lines ending in CRLF (a person at a terminal) are understood too."""
        data = end_of_message(sasl_username="alice@example.org").replace(b"\n", b"\r\n")
        self.assertEqual(self.ask(data), b"action=DUNNO\n\n")
        self.assertEqual(self.quota_calls(), ["alice@example.org"])

    def test_oversizedLine(self) -> None:
        """
        A line longer than the limit closes that connection, unanswered;
        another connection is served as usual.
        """
        protocol, transport = self.connect()
        other, otherTransport = self.connect()
        protocol.dataReceived(b"sender=" + b"a" * MAX_LINE)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        other.dataReceived(request_bytes(protocol_state="RCPT"))
        self.assertEqual(otherTransport.value(), b"action=DUNNO\n\n")
        self.assertFalse(otherTransport.disconnecting)

    def test_oversizedLineWithNewline(self) -> None:
        """An oversized line is refused also when its end arrives in the same read."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"sender=" + b"a" * MAX_LINE + b"\n\n")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")

    def test_longLineWithinLimit(self) -> None:
        """A long line within the limit is fine."""
        data = end_of_message(client_name="x" * (MAX_LINE - 20))
        self.assertEqual(self.ask(data), b"action=DUNNO\n\n")

    def test_tooManyAttributes(self) -> None:
        """A request of more lines than any Postfix sends closes the connection."""
        protocol, transport = self.connect()
        protocol.dataReceived(b"".join(b"x%d=1\n" % n for n in range(MAX_ATTRIBUTES + 1)))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")

    def test_manyAttributesWithinLimit(self) -> None:
        """Exactly the allowed number of lines is still a request."""
        lines = b"".join(b"x%d=1\n" % n for n in range(MAX_ATTRIBUTES - 1))
        data = lines + b"protocol_state=RCPT\n\n"
        self.assertEqual(self.ask(data * 2), b"action=DUNNO\n\n" * 2)

    def test_idleTimeout(self) -> None:
        """
        An idle connection is closed after the idle timeout, which is longer
        than Postfix's own (300 s), so Postfix normally closes first.
        """
        self.assertGreater(IDLE_TIMEOUT, 300)
        protocol, transport = self.connect()
        protocol.dataReceived(request_bytes(protocol_state="RCPT"))
        self.clock.advance(IDLE_TIMEOUT - 1)
        self.assertFalse(transport.disconnecting)
        protocol.dataReceived(request_bytes(protocol_state="RCPT"))
        self.clock.advance(IDLE_TIMEOUT - 1)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(transport.disconnecting)

    def test_noTimeoutWhileWaiting(self) -> None:
        """
        A connection waiting for its answer is not idle; the idle timer
        starts again once the answer is written.
        """
        self.limiter = RecordingLimiter()
        window: defer.Deferred[Verdict] = defer.Deferred()
        self.limiter.answers.append(window)
        self.policy._limiter = self.limiter
        protocol, transport = self.connect()
        protocol.dataReceived(end_of_message(sasl_username="alice@example.org"))
        self.stub.flush()
        self.clock.advance(IDLE_TIMEOUT + 1)
        self.assertFalse(transport.disconnecting)
        window.callback(Verdict(True, 1, 1))
        self.assertEqual(transport.value(), b"action=DUNNO\n\n")
        self.clock.advance(IDLE_TIMEOUT - 1)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(transport.disconnecting)

    def test_connectionLimit(self) -> None:
        """
        Beyond 500 open connections a new one is refused and counted; the
        gauge shows the open ones.
        """
        factory = PolicyFactory(self.clock, self.policy, self.metrics, max_connections=2)
        for _ in range(2):
            protocol = factory.buildProtocol(ADDRESS)
            assert protocol is not None
            protocol.makeConnection(StringTransport())
        self.assertIsNone(factory.buildProtocol(ADDRESS))
        self.assertEqual(self.sample("policy_connection_pool_full_total"), 1)
        self.assertEqual(self.sample("policy_active_connections"), 2)
        self.assertEqual(self.factory.max_connections, 500)

    def test_gaugeFollowsConnections(self) -> None:
        """Closing a connection lowers the gauge."""
        protocol, _ = self.connect()
        self.assertEqual(self.sample("policy_active_connections"), 1)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.sample("policy_active_connections"), 0)

    def test_decisionBug(self) -> None:
        """A decision that raises is answered DUNNO; the connection goes on."""

        def broken(request: PolicyRequest) -> str:
            raise ZeroDivisionError()

        self.policy.decide = broken  # type: ignore[method-assign]
        protocol, transport = self.connect()
        protocol.dataReceived(request_bytes(protocol_state="RCPT") * 2)
        self.assertEqual(transport.value(), b"action=DUNNO\n\n" * 2)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 2)


class DecisionTests(PolicyTestCase):
    """The quota decision of compatibility.md, "Rate limiting"."""

    def test_quotaEnforced(self) -> None:
        """A quota of 3 per hour: three messages pass, the fourth is refused."""
        actions = [
            self.decide(protocol_state="END-OF-MESSAGE", sasl_username="limited@example.org")
            for _ in range(4)
        ]
        self.assertEqual(
            actions, ["DUNNO"] * 3 + ["REJECT Rate limit exceeded, please try again later"]
        )
        self.assertEqual(self.sample("quota_exceeded_total"), 1)
        self.assertEqual(self.sample("quota_checks_total", {"result": "checked"}), 4)
        self.assertEqual(
            self.sample("policy_requests_total", {"stage": "check", "action": "dunno"}), 3
        )
        self.assertEqual(
            self.sample("policy_requests_total", {"stage": "check", "action": "reject"}), 1
        )
        self.assertEqual(
            self.sample(
                "policy_request_duration_seconds_count", {"stage": "check", "action": "reject"}
            ),
            1,
        )

    def test_oneMailboxOneQuota(self) -> None:
        """
        However the login is spelt (case, recipient delimiter, spaces), it
        is one sender with one window, and the API is asked for the
        normalised address.
        """
        spellings = [
            "LIMITED@example.org",
            "limited+x@example.org",
            " limited@EXAMPLE.org",
            "limited@example.org",
        ]
        actions = [self.decide(protocol_state="END-OF-MESSAGE", sasl_username=s) for s in spellings]
        self.assertEqual(actions[:3], ["DUNNO"] * 3)
        self.assertTrue(actions[3].startswith("REJECT "))
        self.assertEqual(set(self.quota_calls()), {"limited@example.org"})

    def test_saslUsernameFirst(self) -> None:
        """The login is the identity when there is one, not the envelope sender."""
        self.decide(
            protocol_state="END-OF-MESSAGE",
            sasl_username="alice@example.org",
            sender="limited@example.org",
        )
        self.assertEqual(self.quota_calls(), ["alice@example.org"])

    def test_senderWithoutLogin(self) -> None:
        """Without a login the envelope sender is the identity."""
        self.decide(protocol_state="END-OF-MESSAGE", sender="Alice+list@Example.org")
        self.assertEqual(self.quota_calls(), ["alice@example.org"])

    def test_noIdentity(self) -> None:
        """No login and the null sender: DUNNO, nobody asked."""
        self.assertEqual(self.decide(protocol_state="END-OF-MESSAGE"), "DUNNO")
        self.assertEqual(self.quota_calls(), [])
        self.assertEqual(
            self.sample("policy_requests_total", {"stage": "check", "action": "dunno"}), 1
        )

    def test_invalidIdentity(self) -> None:
        """An identity that cannot be an address: DUNNO without an API call."""
        for raw in (
            "no-at-sign",
            "a@b@example.org",
            "sp ace@example.org",
            "x/../y@example.org",
            "@example.org",
        ):
            self.assertEqual(
                self.decide(protocol_state="END-OF-MESSAGE", sasl_username=raw), "DUNNO"
            )
        self.assertEqual(self.quota_calls(), [])

    def test_unknownSender(self) -> None:
        """Userli's 404 (neither user nor alias): no quota, DUNNO, no window touched."""
        self.limiter = RecordingLimiter()
        self.policy._limiter = self.limiter
        self.assertEqual(
            self.decide(protocol_state="END-OF-MESSAGE", sender="stranger@example.net"), "DUNNO"
        )
        self.assertEqual(self.limiter.calls, [])
        self.assertEqual(self.quota_calls(), ["stranger@example.net"])

    def test_unlimited(self) -> None:
        """Both limits 0: DUNNO without touching the windows."""
        self.limiter = RecordingLimiter()
        self.policy._limiter = self.limiter
        for _ in range(5):
            self.assertEqual(
                self.decide(protocol_state="END-OF-MESSAGE", sasl_username="free@example.org"),
                "DUNNO",
            )
        self.assertEqual(self.limiter.calls, [])
        self.assertEqual(self.sample("quota_checks_total", {"result": "checked"}), 0)

    def test_aliasQuota(self) -> None:
        """An alias used as sender has a quota of its own (Userli's answer)."""
        self.limiter = RecordingLimiter()
        self.policy._limiter = self.limiter
        self.decide(protocol_state="END-OF-MESSAGE", sender="info@example.org")
        self.assertEqual(self.limiter.calls, [("info@example.org", Quota(100, 1000))])

    def test_apiFailureFailsOpen(self) -> None:
        """The API failing: DUNNO, counted as an error, nothing kept."""
        self.userli.set_mode(ERROR)
        self.assertEqual(
            self.decide(protocol_state="END-OF-MESSAGE", sasl_username="limited@example.org"),
            "DUNNO",
        )
        self.assertEqual(
            self.sample("policy_requests_total", {"stage": "check", "action": "error"}), 1
        )
        self.userli.set_mode("normal")
        for _ in range(3):
            self.assertEqual(
                self.decide(protocol_state="END-OF-MESSAGE", sasl_username="limited@example.org"),
                "DUNNO",
            )
        self.assertTrue(
            self.decide(
                protocol_state="END-OF-MESSAGE", sasl_username="limited@example.org"
            ).startswith("REJECT")
        )

    def test_apiTimeoutFailsOpen(self) -> None:
        """An API that does not answer within its deadline: DUNNO."""
        self.userli.set_mode(SLOW, delay=60)
        d = self.policy.decide(
            PolicyRequest(protocol_state="END-OF-MESSAGE", sasl_username="limited@example.org")
        )
        assert isinstance(d, defer.Deferred)
        self.assertNoResult(d)
        self.clock.advance(5)
        self.assertEqual(self.successResultOf(d), "DUNNO")

    def test_limiterFailureFailsOpen(self) -> None:
        """The windows unavailable (Redis down): DUNNO, counted as an error."""
        self.limiter = RecordingLimiter()
        self.limiter.answers.append(defer.fail(RateLimitError("not connected")))
        self.policy._limiter = self.limiter
        self.assertEqual(
            self.decide(protocol_state="END-OF-MESSAGE", sasl_username="limited@example.org"),
            "DUNNO",
        )
        self.assertEqual(
            self.sample("policy_requests_total", {"stage": "check", "action": "error"}), 1
        )
        self.assertEqual(self.sample("quota_checks_total", {"result": "checked"}), 1)

    def test_limiterBugFailsOpen(self) -> None:
        """Even an unexpected failure of the limiter answers DUNNO, and is logged."""
        self.limiter = RecordingLimiter()
        self.limiter.answers.append(defer.fail(ZeroDivisionError()))
        self.policy._limiter = self.limiter
        self.assertEqual(
            self.decide(protocol_state="END-OF-MESSAGE", sasl_username="limited@example.org"),
            "DUNNO",
        )

    def test_stateIsCaseSensitive(self) -> None:
        """Only Postfix's exact C{END-OF-MESSAGE} is checked."""
        self.assertEqual(
            self.decide(protocol_state="end-of-message", sasl_username="limited@example.org"),
            "DUNNO",
        )
        self.assertEqual(self.quota_calls(), [])


class MessageTests(PolicyTestCase):
    """The reject text."""

    message = "Too many\r\nmessages;\n\ttry later"

    def test_oneLine(self) -> None:
        """The configured text is forced onto one line."""
        actions = [
            self.decide(protocol_state="END-OF-MESSAGE", sasl_username="limited@example.org")
            for _ in range(4)
        ]
        self.assertEqual(actions[3], "REJECT Too many messages; try later")

    def test_wire(self) -> None:
        """On the wire the reply is one action line and the empty line."""
        data = end_of_message(sasl_username="limited@example.org") * 4
        self.assertTrue(
            self.ask(data).endswith(b"\n\naction=REJECT Too many messages; try later\n\n")
        )


class ActionTests(PolicyTestCase):
    """C{RATE_LIMIT_ACTION}: what a sender over quota gets, told apart in the metrics."""

    def test_series_from_start(self) -> None:
        """Every outcome of a decision has its series at 0 before the first request."""
        QuotaPolicy(self.client, self.limiter, self.clock, self.metrics, action="HOLD")
        for stage, action in (
            ("skip", "dunno"),
            ("check", "dunno"),
            ("check", "error"),
            ("check", "hold"),
        ):
            labels = {"stage": stage, "action": action}
            for name in ("policy_requests_total", "policy_request_duration_seconds_count"):
                value = self.metrics.registry.get_sample_value(
                    f"userli_postfix_adapter_{name}", labels
                )
                self.assertEqual(value, 0.0, (name, labels))

    def over_quota(self, action: str) -> list[str]:
        """Four messages of C{limited@} (3 an hour) with C{action}: the answers."""
        policy = QuotaPolicy(
            self.client,
            MemoryRateLimiter(self.clock),
            self.clock,
            self.metrics,
            message="Slow down",
            action=action,
        )
        answers = []
        for _ in range(4):
            result = policy.decide(
                PolicyRequest(protocol_state="END-OF-MESSAGE", sasl_username="limited@example.org")
            )
            self.stub.flush()
            answers.append(result if isinstance(result, str) else self.successResultOf(result))
        return answers

    def test_eachAction(self) -> None:
        """
        Each action is the access(5) answer followed by the message; the
        messages within quota stay DUNNO; C{policy_requests_total} counts
        the answer under the action's lower-case name, and
        C{quota_exceeded_total} counts every decision over quota.
        """
        for number, action in enumerate(
            ["REJECT", "DEFER", "DEFER_IF_PERMIT", "HOLD", "WARN"], start=1
        ):
            self.clock.advance(3601)
            self.assertEqual(self.over_quota(action), ["DUNNO"] * 3 + [f"{action} Slow down"])
            self.assertEqual(
                self.sample("policy_requests_total", {"stage": "check", "action": action.lower()}),
                1,
                action,
            )
            self.assertEqual(self.sample("quota_exceeded_total"), number)
        self.assertEqual(
            self.sample("policy_requests_total", {"stage": "check", "action": "dunno"}), 15
        )

    def test_warnIsLogged(self) -> None:
        """The log line of a decision over quota names the action."""
        events: list[dict[str, Any]] = []
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.over_quota("WARN")
        exceeded = [e for e in events if "Sending quota exceeded" in e.get("log_format", "")]
        self.assertEqual(len(exceeded), 1)
        self.assertEqual(exceeded[0]["action"], "WARN")


class IdentityTests(PolicyTestCase):
    """C{RATE_LIMIT_IDENTITY}: who is counted."""

    def make(self, identity: str) -> QuotaPolicy:
        return QuotaPolicy(
            self.client,
            self.limiter,
            self.clock,
            self.metrics,
            identity=identity,
        )

    def decideWith(self, policy: QuotaPolicy, **attributes: str) -> str:
        result = policy.decide(PolicyRequest(protocol_state="END-OF-MESSAGE", **attributes))
        self.stub.flush()
        return result if isinstance(result, str) else self.successResultOf(result)

    def test_saslOnlyIgnoresSender(self) -> None:
        """
        With C{sasl}, a message without a login is DUNNO however often it
        comes, nobody is asked and nothing is counted: a forged local
        sender on port 25 cannot use up that user's quota.
        """
        policy = self.make("sasl")
        answers = [self.decideWith(policy, sender="limited@example.org") for _ in range(5)]
        self.assertEqual(answers, ["DUNNO"] * 5)
        self.assertEqual(self.quota_calls(), [])
        self.assertEqual(len(self.limiter), 0)
        self.assertEqual(self.sample("quota_checks_total", {"result": "checked"}), 0)

    def test_saslOnlyCountsLogins(self) -> None:
        """With C{sasl}, an authenticated sender is counted and limited as before."""
        policy = self.make("sasl")
        answers = [
            self.decideWith(policy, sasl_username="limited@example.org", sender="x@example.net")
            for _ in range(4)
        ]
        self.assertEqual(answers[:3], ["DUNNO"] * 3)
        self.assertTrue(answers[3].startswith("REJECT "))
        self.assertEqual(set(self.quota_calls()), {"limited@example.org"})

    def test_saslOrSenderCountsSender(self) -> None:
        """With C{sasl_or_sender} (the default), the envelope sender is counted."""
        policy = self.make("sasl_or_sender")
        answers = [self.decideWith(policy, sender="limited@example.org") for _ in range(4)]
        self.assertTrue(answers[3].startswith("REJECT "))


class QuotaCacheTests(PolicyTestCase):
    """Quota answers are kept for C{QUOTA_CACHE_TTL}; identical requests in flight share a call."""

    def test_burstCostsOneCall(self) -> None:
        """Messages within the TTL cost one API call."""
        for _ in range(3):
            self.decide(protocol_state="END-OF-MESSAGE", sasl_username="limited@example.org")
            self.clock.advance(self.cache_ttl / 4)
        self.assertEqual(len(self.quota_calls()), 1)

    def test_expires(self) -> None:
        """After the TTL the API is asked again (a changed quota takes effect)."""
        self.decide(protocol_state="END-OF-MESSAGE", sasl_username="limited@example.org")
        self.clock.advance(self.cache_ttl)
        self.decide(protocol_state="END-OF-MESSAGE", sasl_username="limited@example.org")
        self.assertEqual(len(self.quota_calls()), 2)

    def test_notFoundKept(self) -> None:
        """A 404 is an answer and is kept too (external senders arrive in bursts)."""
        for _ in range(3):
            self.decide(protocol_state="END-OF-MESSAGE", sender="stranger@example.net")
        self.assertEqual(len(self.quota_calls()), 1)

    def test_failureNotKept(self) -> None:
        """A failure is not kept: the next message asks again."""
        self.userli.set_mode(ERROR)
        self.decide(protocol_state="END-OF-MESSAGE", sasl_username="limited@example.org")
        self.decide(protocol_state="END-OF-MESSAGE", sasl_username="limited@example.org")
        self.assertEqual(len(self.quota_calls()), 2)

    def test_coalescing(self) -> None:
        """Messages of one sender waiting for the same answer share one API call."""
        self.userli.set_mode(SLOW, delay=1.0)
        pending = [
            self.policy.decide(PolicyRequest(protocol_state="END-OF-MESSAGE", sasl_username=s))
            for s in (
                "limited@example.org",
                "LIMITED@example.org",
                "limited+a@example.org",
                "limited@example.org",
            )
        ]
        self.stub.flush()
        self.assertEqual(len(self.quota_calls()), 1)
        self.clock.advance(1.0)
        self.stub.flush()
        actions = [self.successResultOf(d) for d in pending]  # type: ignore[arg-type]
        self.assertEqual(actions[:3], ["DUNNO"] * 3)
        self.assertTrue(actions[3].startswith("REJECT"))

    def test_coalescedFailure(self) -> None:
        """Every waiter of a failed call answers DUNNO."""
        self.userli.set_mode(SLOW, delay=10.0)
        pending = [
            self.policy.decide(
                PolicyRequest(protocol_state="END-OF-MESSAGE", sasl_username="limited@example.org")
            )
            for _ in range(3)
        ]
        self.clock.advance(5)
        self.assertEqual([self.successResultOf(d) for d in pending], ["DUNNO"] * 3)  # type: ignore[arg-type]
        self.assertEqual(len(self.quota_calls()), 1)


class NoQuotaCacheTests(PolicyTestCase):
    """C{QUOTA_CACHE_TTL=0}: every message asks."""

    cache_ttl = 0.0

    def test_everyMessageAsks(self) -> None:
        """Without a cache every message costs an API call."""
        for _ in range(3):
            self.decide(protocol_state="END-OF-MESSAGE", sasl_username="limited@example.org")
        self.assertEqual(len(self.quota_calls()), 3)


class QuotaSourceTests(PolicyTestCase):
    """The quota cache's own bound."""

    def test_bounded(self) -> None:
        """Beyond its size the oldest entries are dropped."""
        source = QuotaSource(self.client, self.clock, ttl=30.0, max_entries=2)
        for user in ("limited", "free", "alice"):
            self.successResultOf(source.fetch(f"{user}@example.org"))
        self.assertEqual(len(source), 2)
        self.assertIsNone(source.peek("limited@example.org"))
        self.assertEqual(source.peek("alice@example.org"), Quota(100, 1000))

    def test_expiredEntriesDropped(self) -> None:
        """Expired entries do not accumulate."""
        source = QuotaSource(self.client, self.clock, ttl=30.0)
        self.successResultOf(source.fetch("limited@example.org"))
        self.clock.advance(31)
        self.successResultOf(source.fetch("free@example.org"))
        self.assertEqual(len(source), 2)
        self.clock.advance(LAST_KNOWN_QUOTA_TTL - 30)
        self.successResultOf(source.fetch("alice@example.org"))
        self.assertEqual(len(source), 2)
        self.assertIsNone(source.lastKnown("limited@example.org"))

    def test_lastKnownBounded(self) -> None:
        """The last-known quotas are bounded too, oldest dropped first."""
        source = QuotaSource(self.client, self.clock, ttl=0.0, max_entries=2)
        for user in ("limited", "free", "alice"):
            self.successResultOf(source.fetch(f"{user}@example.org"))
        self.assertEqual(len(source), 2)
        self.assertIsNone(source.lastKnown("limited@example.org"))
        self.assertEqual(source.lastKnown("alice@example.org"), Quota(100, 1000))

    def test_noTtlNoPeek(self) -> None:
        """With a TTL of 0 nothing is ever answered from memory while Userli answers."""
        source = QuotaSource(self.client, self.clock, ttl=0.0)
        self.successResultOf(source.fetch("alice@example.org"))
        self.assertIsNone(source.peek("alice@example.org"))
        self.assertEqual(source.lastKnown("alice@example.org"), Quota(100, 1000))


class LastKnownQuotaTests(PolicyTestCase):
    """
    The default (C{QUOTA_CACHE_TTL=0}): every message asks Userli, and the
    last quota learned is enforced while Userli cannot answer.
    """

    cache_ttl = 0.0

    def eom(self, identity: str = "limited@example.org") -> str:
        """One END-OF-MESSAGE of C{identity}, with the fake Userli answering at once."""
        return self.decide(protocol_state="END-OF-MESSAGE", sasl_username=identity)

    def test_default(self) -> None:
        """Quotas are fresh by default: C{QUOTA_CACHE_TTL} is 0."""
        self.assertEqual(Config(userli_token="t").quota_cache_ttl, 0.0)
        policy = QuotaPolicy(self.client, self.limiter, self.clock, self.metrics)
        self.assertEqual(policy._quotas._ttl, 0.0)

    def test_loweredQuotaAppliesToNextMessage(self) -> None:
        """A quota lowered in Userli rejects the very next message."""
        self.userli.data.quotas["alice@example.org"] = (100, 1000)
        self.assertEqual(self.eom("alice@example.org"), "DUNNO")
        self.assertEqual(self.eom("alice@example.org"), "DUNNO")
        self.userli.data.quotas["alice@example.org"] = (1, 1)
        self.assertTrue(self.eom("alice@example.org").startswith("REJECT"))

    def test_enforcedDuringOutage(self) -> None:
        """Learned, then the quota endpoint fails: the last quota is still enforced."""
        self.assertEqual(self.eom(), "DUNNO")
        self.userli.set_mode(ERROR)
        self.assertEqual(self.eom(), "DUNNO")
        self.assertEqual(self.eom(), "DUNNO")
        self.assertTrue(self.eom().startswith("REJECT"))
        self.assertEqual(len(self.quota_calls()), 4)

    def test_enforcedDuringTimeout(self) -> None:
        """A hanging Userli: after the deadline, the last quota is enforced."""
        for _ in range(3):
            self.assertEqual(self.eom(), "DUNNO")
        self.userli.set_mode(SLOW, delay=60)
        d = self.policy.decide(
            PolicyRequest(protocol_state="END-OF-MESSAGE", sasl_username="limited@example.org")
        )
        assert isinstance(d, defer.Deferred)
        self.clock.advance(5)
        self.assertTrue(self.successResultOf(d).startswith("REJECT"))

    def test_enforcedWhileBreakerOpen(self) -> None:
        """With the circuit breaker failing calls fast, the last quota is enforced at once."""
        for _ in range(3):
            self.assertEqual(self.eom(), "DUNNO")
        self.userli.set_mode(SLOW, delay=60)
        for _ in range(FAILURES_TO_OPEN):
            d = self.client.domain("example.org")
            self.clock.advance(5)
            self.failureResultOf(d)
        self.assertTrue(self.client.breaker.isOpen)
        action = self.policy.decide(
            PolicyRequest(protocol_state="END-OF-MESSAGE", sasl_username="limited@example.org")
        )
        self.assertTrue(_now(self, action).startswith("REJECT"))
        action = self.policy.decide(
            PolicyRequest(protocol_state="END-OF-MESSAGE", sasl_username="alice@example.org")
        )
        self.assertEqual(_now(self, action), "DUNNO")

    def test_neverSeenIsDunno(self) -> None:
        """A sender never learned is DUNNO during the outage (fail open)."""
        self.userli.set_mode(ERROR)
        for _ in range(5):
            self.assertEqual(self.eom(), "DUNNO")

    def test_forgottenAfterADay(self) -> None:
        """A quota learned more than 24 h ago is not enforced any more."""
        self.assertEqual(self.eom(), "DUNNO")
        self.assertEqual(self.eom(), "DUNNO")
        self.clock.advance(LAST_KNOWN_QUOTA_TTL)
        self.userli.set_mode(ERROR)
        self.limiter = MemoryRateLimiter(self.clock)
        self.policy._limiter = self.limiter
        for _ in range(4):
            self.assertEqual(self.eom(), "DUNNO")

    def test_newAnswerReplacesOld(self) -> None:
        """What is enforced during an outage is the latest answer, a raised quota included."""
        self.assertEqual(self.eom(), "DUNNO")
        self.userli.data.quotas["limited@example.org"] = (100, 1000)
        self.assertEqual(self.eom(), "DUNNO")
        self.userli.set_mode(ERROR)
        for _ in range(5):
            self.assertEqual(self.eom(), "DUNNO")


def _now(case: SynchronousTestCase, action: str | defer.Deferred[str]) -> str:
    """The action, which must already be known (no call went out)."""
    if isinstance(action, str):
        return action
    result: str = case.successResultOf(action)
    return result


class MakePolicyFactoryTests(PolicyTestCase):
    """The factory the daemon listens with, built from the configuration."""

    def test_configuration(self) -> None:
        """Delimiter, reject text, action and cache TTL come from the configuration."""
        config = Config(
            userli_token="t",
            recipient_delimiter="-",
            rate_limit_message="Slow down",
            rate_limit_action="DEFER",
            quota_cache_ttl=0.0,
        )
        factory = makePolicyFactory(config, self.clock, self.client, self.metrics, self.limiter)
        self.assertEqual(factory.idle_timeout, IDLE_TIMEOUT)
        protocol = factory.buildProtocol(ADDRESS)
        assert protocol is not None
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(end_of_message(sasl_username="limited-tag@example.org") * 4)
        self.stub.flush()
        self.assertEqual(transport.value(), b"action=DUNNO\n\n" * 3 + b"action=DEFER Slow down\n\n")
        self.assertEqual(self.quota_calls(), ["limited@example.org"] * 4)


class ControlCharacterIdentityTests(PolicyTestCase):
    """
    A login or sender with a control, format or whitespace character inside
    is no Userli address: no quota is asked for, no window is touched, the
    message is let through (C{DUNNO}), and the identity is in no log line.
    """

    IDENTITIES = [
        "limited\r@example.org",
        "limited\x00@example.org",
        "limited@example.org\x0b.net",
        "limited+\x1b@example.org",
        "limited\x85@example.org",
        "limited\u200b@example.org",
        "limited\u2028@example.org",
        "limited\t@example.org",
    ]

    def test_no_api_call(self) -> None:
        """On the wire, as C{sasl_username} and as C{sender}: C{DUNNO}, nothing asked."""
        self.limiter = RecordingLimiter()
        self.policy._limiter = self.limiter
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for identity in self.IDENTITIES:
            for attribute in ("sasl_username", "sender"):
                reply = self.ask(end_of_message(**{attribute: identity}))
                self.assertEqual(reply, b"action=DUNNO\n\n", (attribute, identity))
        self.assertEqual(self.quota_calls(), [])
        self.assertEqual(self.limiter.calls, [])
        text = "\n".join(formatEvent(event) + repr(event) for event in events)
        for identity in self.IDENTITIES:
            self.assertNotIn(identity, text)
            self.assertNotIn(repr(identity)[1:-1], text)

    def test_identityFromConfiguration(self) -> None:
        """C{RATE_LIMIT_IDENTITY=sasl} reaches the decision: a bare sender is not counted."""
        config = Config(userli_token="t", rate_limit_identity="sasl", quota_cache_ttl=0.0)
        factory = makePolicyFactory(config, self.clock, self.client, self.metrics, self.limiter)
        protocol = factory.buildProtocol(ADDRESS)
        assert protocol is not None
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(end_of_message(sender="limited@example.org") * 4)
        self.stub.flush()
        self.assertEqual(transport.value(), b"action=DUNNO\n\n" * 4)
        self.assertEqual(self.quota_calls(), [])
