"""
Tests for L{userli_postfix.httpclient}: treq over Agent and a persistent pool.

The connections are made on a L{MemoryReactorClock}; the test plays Userli
by feeding bytes to the connection's protocol.  What is pinned: one endpoint
per origin (HTTPS with certificate checks, the connect timeout), a
connection kept alive and reused, idle connections closed after the idle
timeout and at shutdown, and no log line per connection.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import URI

from userli_postfix.httpclient import (
    CONNECT_TIMEOUT,
    POOL_IDLE_TIMEOUT,
    UserliEndpoints,
    makeHTTPClient,
)
from userli_postfix.serving import MAX_CONNECTIONS

BASE = "http://127.0.0.1:8000"
OK_TRUE = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 4\r\n\r\ntrue"


class EndpointTests(SynchronousTestCase):
    """L{UserliEndpoints} builds each endpoint once."""

    def test_reused(self) -> None:
        """Every request to the same origin gets the same endpoint object."""
        factory = UserliEndpoints(MemoryReactorClock())
        first = factory.endpointForURI(URI.fromBytes(b"http://userli.test:8000/a"))
        second = factory.endpointForURI(URI.fromBytes(b"http://userli.test:8000/b"))
        other = factory.endpointForURI(URI.fromBytes(b"http://userli.test:8001/a"))
        self.assertIs(first, second)
        self.assertIsNot(first, other)

    def test_https_wrapped(self) -> None:
        """An https origin is reached over TLS, with the policy's checks for its host."""
        asked: list[tuple[bytes, int]] = []

        class Policy:
            def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
                asked.append((hostname, port))
                return object()

        factory = UserliEndpoints(MemoryReactorClock(), policy=Policy())  # type: ignore[arg-type]
        factory.endpointForURI(URI.fromBytes(b"https://userli.test/a"))
        factory.endpointForURI(URI.fromBytes(b"https://userli.test/b"))
        factory.endpointForURI(URI.fromBytes(b"http://userli.test/a"))
        self.assertEqual(asked, [(b"userli.test", 443)])

    def test_other_scheme_refused(self) -> None:
        """Anything but http and https is refused rather than guessed."""
        factory = UserliEndpoints(MemoryReactorClock())
        self.assertRaises(ValueError, factory.endpointForURI, URI.fromBytes(b"ftp://userli.test/"))

    def test_connect_timeout(self) -> None:
        """The connect timeout reaches the connection attempt."""
        reactor = MemoryReactorClock()
        endpoint = UserliEndpoints(reactor, connectTimeout=3).endpointForURI(
            URI.fromBytes(b"http://127.0.0.1:8000/")
        )
        endpoint.connect(Factory.forProtocol(Protocol))
        self.assertEqual(reactor.tcpClients[0][3], 3)

    def test_quiet(self) -> None:
        """A factory connected through the endpoint starts and stops without a log line."""
        events: list[LogEvent] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        loud = Factory.forProtocol(Protocol)
        loud.doStart()
        loud.doStop()
        self.assertEqual(len(events), 2, "a plain factory logs: the test can fail")
        quiet = Factory.forProtocol(Protocol)
        endpoint = UserliEndpoints(MemoryReactorClock()).endpointForURI(
            URI.fromBytes(b"http://127.0.0.1:8000/")
        )
        endpoint.connect(quiet)
        quiet.doStart()
        quiet.doStop()
        self.assertEqual(len(events), 2)


class ClientTests(SynchronousTestCase):
    """L{makeHTTPClient}: requests over kept-alive connections."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.http, self.pool = makeHTTPClient(self.reactor)
        self.transports: list[StringTransport] = []
        self.protocols: list[Any] = []

    def get(self, path: str = "/api/postfix/domain/example.org") -> Any:
        """Send a GET; connect a new connection if the pool opened one."""
        d = self.http.request("GET", BASE + path, unbuffered=True)
        while len(self.transports) < len(self.reactor.tcpClients):
            factory = self.reactor.tcpClients[len(self.transports)][2]
            protocol = factory.buildProtocol(None)
            transport = StringTransport()
            protocol.makeConnection(transport)
            self.transports.append(transport)
            self.protocols.append(protocol)
        return d

    def answer(self, transport: StringTransport, data: bytes = OK_TRUE) -> None:
        self.protocols[self.transports.index(transport)].dataReceived(data)

    def test_pool_settings(self) -> None:
        """Persistent, as many idle connections as a listener has clients, idle ones expire."""
        self.assertTrue(self.pool.persistent)
        self.assertEqual(self.pool.maxPersistentPerHost, MAX_CONNECTIONS)
        self.assertEqual(self.pool.cachedConnectionTimeout, POOL_IDLE_TIMEOUT)
        self.assertTrue(self.pool.retryAutomatically)

    def test_connect_timeout(self) -> None:
        """The default connect timeout reaches the reactor."""
        self.get()
        self.assertEqual(self.reactor.tcpClients[0][3], CONNECT_TIMEOUT)

    def test_kept_alive(self) -> None:
        """Requests one after another share one connection."""
        for _ in range(3):
            d = self.get()
            self.answer(self.transports[0])
            self.assertEqual(self.successResultOf(d).code, 200)
            self.transports[0].clear()
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.assertFalse(self.transports[0].disconnecting)

    def test_concurrent(self) -> None:
        """Concurrent requests each get a connection; none waits for another."""
        first, second = self.get(), self.get()
        self.assertEqual(len(self.transports), 2)
        self.answer(self.transports[1])
        self.successResultOf(second)
        self.assertNoResult(first)

    def test_idle_timeout(self) -> None:
        """An idle connection is closed after the idle timeout, and a new one made after."""
        d = self.get()
        self.answer(self.transports[0])
        self.successResultOf(d)
        self.reactor.advance(POOL_IDLE_TIMEOUT - 1)
        self.assertFalse(self.transports[0].disconnecting)
        self.reactor.advance(1)
        self.assertTrue(self.transports[0].disconnecting)

    def test_close_cached(self) -> None:
        """At shutdown the idle connections are closed."""
        d = self.get()
        self.answer(self.transports[0])
        self.successResultOf(d)
        self.pool.closeCachedConnections()
        self.assertTrue(self.transports[0].disconnecting)

    def test_quiet(self) -> None:
        """Opening and closing a connection to Userli writes no log line."""
        events: list[LogEvent] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.get()
        # What the reactor's connector does around a connection.
        factory = self.reactor.tcpClients[0][2]
        factory.doStart()
        factory.doStop()
        self.assertEqual(events, [])

    def test_no_cookies(self) -> None:
        """
        A cookie Userli (or a proxy in front of it) sets is neither kept nor
        sent with the next request on the same connection.
        """
        d = self.get()
        self.answer(
            self.transports[0],
            b"HTTP/1.1 200 OK\r\nSet-Cookie: PHPSESSID=abc123; Path=/\r\n"
            b"Content-Type: application/json\r\nContent-Length: 4\r\n\r\ntrue",
        )
        self.successResultOf(d)
        self.transports[0].clear()
        self.get()
        sent = self.transports[0].value()
        self.assertIn(b"GET /api/postfix/domain/example.org", sent)
        self.assertNotIn(b"cookie", sent.lower())
        self.assertNotIn(b"abc123", sent)
