"""
Tests for L{userli_postfix.socketmap}: netstring framing through
C{StringTransport}, with lookups answered by a fake client the test drives.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.doubles import FakeLookupClient
from userli_postfix.lookups import Lookups
from userli_postfix.metrics import Metrics
from userli_postfix.socketmap import (
    IDLE_TIMEOUT,
    MAX_REQUEST,
    SocketmapFactory,
    SocketmapProtocol,
    netstring,
)

ADDRESS = IPv4Address("TCP", "127.0.0.1", 40000)


class SocketmapTestCase(SynchronousTestCase):
    """A socketmap factory over fake lookups, a L{Clock} and a fresh registry."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.metrics = Metrics(process=False)
        self.client = FakeLookupClient()
        lookups = Lookups(self.client, None, self.metrics, self.clock)  # type: ignore[arg-type]
        self.factory = SocketmapFactory(self.clock, lookups, self.metrics)

    def connect(self) -> tuple[SocketmapProtocol, StringTransport]:
        protocol = self.factory.buildProtocol(ADDRESS)
        assert isinstance(protocol, SocketmapProtocol)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


class NetstringTests(SynchronousTestCase):
    """L{netstring} framing."""

    def test_framing(self) -> None:
        """The length is the byte length, in decimal, before a colon; a comma ends it."""
        self.assertEqual(netstring(b"OK 1"), b"4:OK 1,")
        self.assertEqual(netstring(b""), b"0:,")
        self.assertEqual(netstring("OK ä".encode()), b"5:OK \xc3\xa4,")


class FramingTests(SocketmapTestCase):
    """Requests and replies on the wire."""

    def test_request_reply(self) -> None:
        """One request netstring gets one reply netstring."""
        protocol, transport = self.connect()
        protocol.dataReceived(netstring(b"domain example.org"))
        self.client.answerFor("domain", "example.org", True)
        self.assertEqual(transport.value(), b"4:OK 1,")

    def test_split_chunks(self) -> None:
        """A request that arrives a byte at a time is understood once complete."""
        protocol, transport = self.connect()
        data = netstring(b"alias a@example.org")
        for i in range(len(data)):
            protocol.dataReceived(data[i : i + 1])
        self.client.answerFor("alias", "a@example.org", ["b@example.org"])
        self.assertEqual(transport.value(), netstring(b"OK b@example.org"))

    def test_pipelined_in_order(self) -> None:
        """
        Several requests in one chunk are answered in request order even when
        their lookups finish out of order, and ready answers wait their turn.
        """
        protocol, transport = self.connect()
        protocol.dataReceived(
            netstring(b"alias a@example.org")
            + netstring(b"nosuchmap x")
            + netstring(b"mailbox b@example.org")
            + netstring(b"domain example.org")
        )
        self.client.answerFor("domain", "example.org", False)
        self.client.answerFor("mailbox", "b@example.org", True)
        self.assertEqual(transport.value(), b"")
        self.client.answerFor("alias", "a@example.org", ["c@example.org"])
        self.assertEqual(
            transport.value(),
            netstring(b"OK c@example.org")
            + netstring(b"PERM unknown map")
            + netstring(b"OK 1")
            + netstring(b"NOTFOUND "),
        )

    def test_immediate_answer(self) -> None:
        """A request needing no API call (an invalid key) is answered at once."""
        protocol, transport = self.connect()
        protocol.dataReceived(netstring(b"alias not-an-address"))
        self.assertEqual(transport.value(), netstring(b"NOTFOUND "))

    def test_key_with_spaces(self) -> None:
        """Only the first space splits map and key."""
        protocol, transport = self.connect()
        protocol.dataReceived(netstring(b"domain exa mple.org"))
        self.assertEqual(transport.value(), netstring(b"NOTFOUND "))
        self.assertEqual(self.client.pending, [])

    def test_largest_request(self) -> None:
        """A request of exactly the largest accepted size is answered."""
        protocol, transport = self.connect()
        protocol.dataReceived(netstring(b"alias " + b"a" * (MAX_REQUEST - 6)))
        self.assertEqual(transport.value(), netstring(b"NOTFOUND "))
        self.assertFalse(transport.disconnecting)


class MalformedTests(SocketmapTestCase):
    """A netstring that cannot be resynchronised closes that connection only."""

    def test_malformed(self) -> None:
        """A non-digit length, a missing comma or a missing colon closes the connection."""
        for data in [b"abc:alias x,", b"5:alias;", b"-1:,", b"12alias", b"5:alias x,"]:
            protocol, transport = self.connect()
            protocol.dataReceived(data)
            self.assertTrue(transport.disconnecting, data)

    def test_oversized(self) -> None:
        """A length beyond the limit closes the connection before the data arrives."""
        for data in [b"%d:" % (MAX_REQUEST + 1), b"99999999999999999999:"]:
            protocol, transport = self.connect()
            protocol.dataReceived(data)
            self.assertTrue(transport.disconnecting, data)
            self.assertEqual(transport.value(), b"")

    def test_others_unaffected(self) -> None:
        """Other connections keep being served after one sent garbage."""
        good, goodTransport = self.connect()
        bad, badTransport = self.connect()
        good.dataReceived(netstring(b"domain example.org"))
        bad.dataReceived(b"garbage")
        self.assertTrue(badTransport.disconnecting)
        bad.connectionLost(Failure(ConnectionDone()))
        self.client.answerFor("domain", "example.org", True)
        self.assertEqual(goodTransport.value(), netstring(b"OK 1"))
        self.assertFalse(goodTransport.disconnecting)
        good.dataReceived(netstring(b"alias x"))
        self.assertEqual(goodTransport.value(), netstring(b"OK 1") + netstring(b"NOTFOUND "))

    def test_valid_before_garbage_answered(self) -> None:
        """A request that was complete before the garbage still gets its answer computed."""
        protocol, transport = self.connect()
        protocol.dataReceived(netstring(b"alias not-an-address") + b"x:")
        self.assertEqual(transport.value(), netstring(b"NOTFOUND "))
        self.assertTrue(transport.disconnecting)


class ControlCharacterTests(SocketmapTestCase):
    """Keys with a line break or another control character inside, on the wire."""

    def test_not_found_without_api_call(self) -> None:
        """
        C{mailbox alice\\n@example.org} and its kind are C{NOTFOUND} for every
        map, in order, without an API call; the connection keeps serving.
        """
        protocol, transport = self.connect()
        requests = [
            b"mailbox alice\n@example.org",
            b"alias alice\r@example.org",
            b"senders alice\x00@example.org",
            b"domain example.org\n.net",
            b"domain exa\x0bmple.org",
        ]
        protocol.dataReceived(b"".join(netstring(request) for request in requests))
        self.assertEqual(transport.value(), netstring(b"NOTFOUND ") * len(requests))
        self.assertEqual(self.client.calls, [])
        protocol.dataReceived(netstring(b"mailbox alice@example.org"))
        self.client.answerFor("mailbox", "alice@example.org", True)
        self.assertTrue(transport.value().endswith(netstring(b"OK 1")))
        self.assertFalse(transport.disconnecting)


class ConnectionTests(SocketmapTestCase):
    """Connection life: limit, gauges, idle timeout."""

    def test_idle_timeout(self) -> None:
        """An idle connection is closed after L{IDLE_TIMEOUT} (longer than Postfix's 10 s)."""
        self.assertGreater(IDLE_TIMEOUT, 10)
        protocol, transport = self.connect()
        protocol.dataReceived(netstring(b"alias x"))
        self.clock.advance(IDLE_TIMEOUT - 0.001)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.001)
        self.assertTrue(transport.disconnecting)

    def test_slow_lookup_not_cut(self) -> None:
        """A connection waiting for a slow lookup is not idle."""
        protocol, transport = self.connect()
        protocol.dataReceived(netstring(b"domain example.org"))
        self.clock.advance(IDLE_TIMEOUT * 2)
        self.assertFalse(transport.disconnecting)
        self.client.answerFor("domain", "example.org", True)
        self.assertEqual(transport.value(), netstring(b"OK 1"))

    def test_limit(self) -> None:
        """The 501st connection is refused; the gauges count 500."""
        for _ in range(500):
            self.connect()
        self.assertIsNone(self.factory.buildProtocol(ADDRESS))
        self.assertEqual(self.sample("userli_postfix_adapter_active_connections"), 500)
        self.assertEqual(self.sample("userli_postfix_adapter_connection_pool_usage"), 500)

    def test_gauge_follows_connections(self) -> None:
        """The active-connection gauge drops when a connection closes."""
        protocol, _ = self.connect()
        self.assertEqual(self.sample("userli_postfix_adapter_active_connections"), 1)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.sample("userli_postfix_adapter_active_connections"), 0)


class MetricsTests(SocketmapTestCase):
    """Request counters by map and outcome."""

    def test_requests_counted(self) -> None:
        """Each request is counted under its map (or C{invalid}) and outcome."""
        protocol, _ = self.connect()
        protocol.dataReceived(
            netstring(b"domain example.org")
            + netstring(b"alias not-an-address")
            + netstring(b"bogus x")
        )
        self.client.answerFor("domain", "example.org", True)
        name = "userli_postfix_adapter_requests_total"
        self.assertEqual(self.sample(name, handler="domain", status="success"), 1)
        self.assertEqual(self.sample(name, handler="alias", status="notfound"), 1)
        self.assertEqual(self.sample(name, handler="invalid", status="error"), 1)
