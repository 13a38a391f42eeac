"""
Tests for L{userli_postfix.httpclient}: the Userli HTTP/1.1 client.

Connections are fake transports handed out by a fake endpoint; the test
plays the server by feeding bytes.  What is pinned: the bytes of each
request, every way a response body can be framed, keep-alive reuse and when
a connection must not be reused, the one retry of a GET on a connection the
server had closed, cancellation, and refusal of what is not HTTP.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from twisted.internet import defer, reactor
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionRefusedError
from twisted.internet.ssl import Certificate, PrivateCertificate
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import URI, BrowserLikePolicyForHTTPS
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from tests.certificates import self_signed
from userli_postfix.httpclient import (
    MAX_BODY,
    HTTPProtocolError,
    KeepAlivePool,
    Response,
    ReusedEndpoints,
    StaleConnection,
    keepAliveRequester,
)
from userli_postfix.metrics import Metrics
from userli_postfix.userli import MAX_BODY as USERLI_MAX_BODY
from userli_postfix.userli import UserliClient, UserliError

BASE = "http://userli.test"


class FakeTransport:
    """A connection's transport: records writes; closing tells the protocol at once."""

    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol
        self.written: list[bytes] = []
        self.closed = False
        self.aborted = False
        self.closeLater = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "write on a closed connection"
        self.written.append(data)

    def value(self) -> bytes:
        return b"".join(self.written)

    def clear(self) -> None:
        self.written.clear()

    def _close(self, reason: Failure) -> None:
        if not self.closed:
            self.closed = True
            self.protocol.connectionLost(reason)

    def loseConnection(self) -> None:
        if self.closeLater:
            # As a real transport: closed once its buffer is written.
            return
        self._close(Failure(ConnectionDone()))

    def abortConnection(self) -> None:
        self.aborted = True
        self._close(Failure(ConnectionAborted()))

    def serverCloses(self) -> None:
        """The server closed its end."""
        self._close(Failure(ConnectionDone()))


class FakeEndpoint:
    """Connects at once (or fails, or waits), handing out L{FakeTransport}s."""

    def __init__(self) -> None:
        self.transports: list[FakeTransport] = []
        self.refuse = False
        self.hold = False
        self.pending: list[defer.Deferred[Any]] = []

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        if self.refuse:
            return defer.fail(ConnectionRefusedError())
        protocol = factory.buildProtocol(None)
        transport = FakeTransport(protocol)
        protocol.makeConnection(transport)
        self.transports.append(transport)
        if self.hold:
            d: defer.Deferred[Any] = defer.Deferred()
            self.pending.append(d)
            d.addCallback(lambda _: protocol)
            return d
        return defer.succeed(protocol)


class FakeEndpoints:
    """The part of L{ReusedEndpoints} the pool uses."""

    def __init__(self, endpoint: FakeEndpoint) -> None:
        self.endpoint = endpoint
        self.uris: list[URI] = []

    def endpointForURI(self, uri: URI) -> FakeEndpoint:
        self.uris.append(uri)
        return self.endpoint


OK_TRUE = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 4\r\n\r\ntrue"


class EndpointTests(SynchronousTestCase):
    """L{ReusedEndpoints} builds each endpoint once."""

    def test_reused(self) -> None:
        """Every request to the same Userli gets the same endpoint object."""
        factory = ReusedEndpoints(MemoryReactorClock(), connectTimeout=5)
        first = factory.endpointForURI(URI.fromBytes(b"http://userli.test:8000/a"))
        second = factory.endpointForURI(URI.fromBytes(b"http://userli.test:8000/b"))
        other = factory.endpointForURI(URI.fromBytes(b"http://userli.test:8001/a"))
        self.assertIs(first, second)
        self.assertIsNot(first, other)
        self.assertIsInstance(first, HostnameEndpoint)

    def test_https_wrapped(self) -> None:
        """HTTPS endpoints speak TLS (with certificate checks), plain HTTP ones do not."""
        factory = ReusedEndpoints(MemoryReactorClock())
        endpoint = factory.endpointForURI(URI.fromBytes(b"https://userli.test/a"))
        self.assertNotIsInstance(endpoint, HostnameEndpoint)
        self.assertEqual(type(endpoint).__name__, "_WrapperEndpoint")

    def test_other_scheme_refused(self) -> None:
        """Anything but http and https is refused rather than guessed."""
        factory = ReusedEndpoints(MemoryReactorClock())
        self.assertRaises(ValueError, factory.endpointForURI, URI.fromBytes(b"ftp://userli.test/"))

    def test_connect_timeout(self) -> None:
        """The connect timeout reaches the endpoint, so a dead Userli fails fast."""
        clock = MemoryReactorClock()
        factory = ReusedEndpoints(clock, connectTimeout=5)
        endpoint = factory.endpointForURI(URI.fromBytes(b"http://127.0.0.1:8000/"))
        self.assertEqual(endpoint._timeout, 5)  # type: ignore[attr-defined]


class RequesterTests(SynchronousTestCase):
    """Requests and responses through L{keepAliveRequester}."""

    def setUp(self) -> None:
        self.endpoint = FakeEndpoint()
        self.endpoints = FakeEndpoints(self.endpoint)
        self.pool = KeepAlivePool(self.endpoints, maxIdle=2)  # type: ignore[arg-type]
        self.request = keepAliveRequester(self.pool)
        self.headers = Headers({b"Authorization": [b"Bearer t"], b"Accept": [b"application/json"]})

    def get(self, path: str = "/api/postfix/mailbox/a%40example.org") -> defer.Deferred[Any]:
        return self.request("GET", BASE + path, headers=self.headers)

    @property
    def transport(self) -> FakeTransport:
        return self.endpoint.transports[-1]

    def answer(self, data: bytes, transport: FakeTransport | None = None) -> None:
        (transport or self.transport).protocol.dataReceived(data)

    def body(self, response: Response) -> bytes:
        return response.body

    def test_get_bytes(self) -> None:
        """A GET is one write: request line, Host, the given headers, an empty line."""
        self.get()
        self.assertEqual(
            self.transport.value(),
            b"GET /api/postfix/mailbox/a%40example.org HTTP/1.1\r\nHost: userli.test\r\n"
            b"Authorization: Bearer t\r\nAccept: application/json\r\n\r\n",
        )
        self.assertEqual(len(self.transport.written), 1)

    def test_post_bytes(self) -> None:
        """A POST carries its body with its length."""
        self.request("POST", BASE + "/api/postfix/auth", headers=self.headers, data=b'{"a": 1}')
        self.assertTrue(
            self.transport.value().endswith(b"Content-Length: 8\r\n\r\n" + b'{"a": 1}'),
            self.transport.value(),
        )

    def test_port_in_host(self) -> None:
        """A non-default port is part of the Host header."""
        self.request("GET", "http://userli.test:8000/api/postfix/domain/x")
        self.assertIn(b"\r\nHost: userli.test:8000\r\n", self.transport.value())
        self.assertEqual(self.endpoints.uris[0].port, 8000)

    def test_international_host(self) -> None:
        """A base URL with a non-ASCII host name is sent in its IDNA form."""
        self.request("GET", "http://bücher.example/api/postfix/domain/x")
        self.assertIn(b"\r\nHost: xn--bcher-kva.example\r\n", self.transport.value())
        self.assertEqual(self.endpoints.uris[0].host, b"xn--bcher-kva.example")

    def test_content_length(self) -> None:
        """A body framed by Content-Length, with the status and headers."""
        d = self.get()
        self.answer(OK_TRUE)
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.body, b"true")
        self.assertEqual(response.rawHeaders[b"content-type"], b"application/json")
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])

    def test_byte_by_byte(self) -> None:
        """A response that trickles in a byte at a time is parsed the same."""
        d = self.get()
        for i in range(len(OK_TRUE)):
            self.assertNoResult(d)
            self.answer(OK_TRUE[i : i + 1])
        self.assertEqual(self.successResultOf(d).body, b"true")

    def test_reused(self) -> None:
        """The next request goes on the same connection."""
        first = self.get()
        self.answer(OK_TRUE)
        self.successResultOf(first)
        self.transport.clear()
        second = self.get()
        self.assertEqual(len(self.endpoint.transports), 1)
        self.answer(OK_TRUE)
        self.assertEqual(self.successResultOf(second).body, b"true")

    def test_concurrent_requests_own_connections(self) -> None:
        """Requests in flight at the same time each get a connection."""
        self.get()
        self.get()
        self.assertEqual(len(self.endpoint.transports), 2)

    def test_idle_bounded(self) -> None:
        """Beyond C{maxIdle} idle connections, finished ones are closed."""
        requests = [self.get() for _ in range(3)]
        for transport in self.endpoint.transports:
            self.answer(OK_TRUE, transport)
        for d in requests:
            self.successResultOf(d)
        self.assertEqual([t.closed for t in self.endpoint.transports], [False, False, True])

    def test_connection_close(self) -> None:
        """C{Connection: close} ends the connection after the body."""
        d = self.get()
        self.answer(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 4\r\n\r\ntrue")
        self.assertEqual(self.successResultOf(d).body, b"true")
        self.assertTrue(self.transport.closed)
        self.get()
        self.assertEqual(len(self.endpoint.transports), 2)

    def test_http10(self) -> None:
        """An HTTP/1.0 answer is not kept alive unless it says so."""
        d = self.get()
        self.answer(b"HTTP/1.0 200 OK\r\nContent-Length: 4\r\n\r\ntrue")
        self.successResultOf(d)
        self.assertTrue(self.transport.closed)
        d = self.get()
        self.answer(b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 2\r\n\r\n[]")
        self.successResultOf(d)
        self.assertFalse(self.transport.closed)

    def test_chunked(self) -> None:
        """A chunked body (with extensions and a trailer) is joined; the connection kept."""
        d = self.get()
        self.answer(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b'3;x=y\r\n["a\r\n7\r\n@b.org"\r\n1\r\n]\r\n0\r\nX-Trailer: 1\r\n\r\n'
        )
        self.assertEqual(self.successResultOf(d).body, b'["a@b.org"]')
        self.assertFalse(self.transport.closed)
        self.get()
        self.assertEqual(len(self.endpoint.transports), 1)

    def test_chunked_no_trailer_in_pieces(self) -> None:
        """A chunked body split anywhere, without a trailer, is parsed the same."""
        data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\ntrue\r\n0\r\n\r\n"
        d = self.get()
        for i in range(len(data)):
            self.answer(data[i : i + 1])
        self.assertEqual(self.successResultOf(d).body, b"true")

    def test_until_close(self) -> None:
        """Without a length, the body runs to the end of the connection."""
        d = self.get()
        self.answer(b"HTTP/1.1 200 OK\r\n\r\ntr")
        self.answer(b"ue")
        self.assertNoResult(d)
        self.transport.serverCloses()
        self.assertEqual(self.successResultOf(d).body, b"true")

    def test_no_body_statuses(self) -> None:
        """204 has no body whatever the headers say."""
        d = self.get()
        self.answer(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertEqual(self.successResultOf(d).body, b"")

    def test_interim_skipped(self) -> None:
        """A 100 Continue before the answer is skipped."""
        d = self.get()
        self.answer(b"HTTP/1.1 100 Continue\r\n\r\n" + OK_TRUE)
        self.assertEqual(self.successResultOf(d).code, 200)

    def test_error_status_is_a_response(self) -> None:
        """A 401 or 500 is a response like any other; the client judges it."""
        d = self.get()
        self.answer(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 2\r\n\r\n{}")
        self.assertEqual(self.successResultOf(d).code, 401)

    def test_extra_bytes_not_reused(self) -> None:
        """Bytes beyond the answer mean a confused server: the connection is not reused."""
        d = self.get()
        self.answer(OK_TRUE + b"HTTP/1.1 200 OK\r\n")
        self.successResultOf(d)
        self.assertTrue(self.transport.closed)

    def test_malformed(self) -> None:
        """What is not HTTP/1.x fails the request and drops the connection."""
        cases = [
            b"<html>hello</html>\r\n\r\n",
            b"HTTP/2 200\r\n\r\n",
            b"HTTP/1.1 abc OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n folded: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXX",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        ]
        for data in cases:
            d = self.get()
            transport = self.transport
            self.answer(data, transport)
            self.failureResultOf(d, HTTPProtocolError)
            self.assertTrue(transport.aborted, data)

    def test_head_too_long(self) -> None:
        """An endless header block is refused."""
        d = self.get()
        self.answer(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 20_000)
        self.failureResultOf(d, HTTPProtocolError)

    def test_body_too_large(self) -> None:
        """A body announced or sent beyond the limit is refused, not buffered."""
        d = self.get()
        self.answer(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1))
        self.failureResultOf(d, HTTPProtocolError)
        d = self.get()
        self.answer(b"HTTP/1.1 200 OK\r\n\r\n")
        self.answer(b"x" * (MAX_BODY + 1))
        self.failureResultOf(d, HTTPProtocolError)

    def test_stale_get_retried_once(self) -> None:
        """
        A GET on a reused connection that the server closes before answering
        is sent again, once, on a new connection.
        """
        first = self.get()
        self.answer(OK_TRUE)
        self.successResultOf(first)
        d = self.get()
        stale = self.transport
        stale.serverCloses()
        self.assertEqual(len(self.endpoint.transports), 2)
        self.assertTrue(self.transport.value().startswith(b"GET /api/postfix/mailbox/"))
        self.answer(OK_TRUE)
        self.assertEqual(self.successResultOf(d).body, b"true")

    def test_stale_retry_only_once(self) -> None:
        """A fresh connection that fails too is the end: no second retry."""
        first = self.get()
        self.answer(OK_TRUE)
        self.successResultOf(first)
        d = self.get()
        self.transport.serverCloses()
        self.transport.serverCloses()
        self.failureResultOf(d, ConnectionDone)
        self.assertEqual(len(self.endpoint.transports), 2)

    def test_stale_post_not_retried(self) -> None:
        """A POST is never sent twice: a stale connection fails it."""
        first = self.get()
        self.answer(OK_TRUE)
        self.successResultOf(first)
        d = self.request("POST", BASE + "/api/postfix/auth", headers=self.headers, data=b"{}")
        self.transport.serverCloses()
        self.failureResultOf(d, StaleConnection)
        self.assertEqual(len(self.endpoint.transports), 1)

    def test_lost_midway_not_retried(self) -> None:
        """A connection lost after part of the answer fails the request."""
        d = self.get()
        self.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\ntr")
        self.transport.serverCloses()
        self.failureResultOf(d, ConnectionDone)

    def test_idle_closed_by_server(self) -> None:
        """An idle connection the server closes leaves the pool."""
        d = self.get()
        self.answer(OK_TRUE)
        self.successResultOf(d)
        self.transport.serverCloses()
        self.get()
        self.assertEqual(len(self.endpoint.transports), 2)

    def test_unsolicited_data(self) -> None:
        """Data on an idle connection is a broken server: the connection is dropped."""
        d = self.get()
        self.answer(OK_TRUE)
        self.successResultOf(d)
        idle = self.transport
        self.answer(b"HTTP/1.1 200 OK\r\n", idle)
        self.assertTrue(idle.aborted)
        self.get()
        self.assertEqual(len(self.endpoint.transports), 2)

    def test_cancel_aborts(self) -> None:
        """Cancelling (a timeout) aborts the connection, which is never reused."""
        d = self.get()
        transport = self.transport
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertTrue(transport.aborted)
        self.get()
        self.assertEqual(len(self.endpoint.transports), 2)

    def test_cancel_while_connecting(self) -> None:
        """Cancelling before the connection is up cancels the connection attempt."""
        self.endpoint.hold = True
        d = self.get()
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)

    def test_connect_refused(self) -> None:
        """A refused connection fails the request."""
        self.endpoint.refuse = True
        self.failureResultOf(self.get(), ConnectionRefusedError)

    def test_close_cached(self) -> None:
        """Closing the pool closes its idle connections and fires when they are gone."""
        requests = [self.get(), self.get()]
        for transport in self.endpoint.transports:
            self.answer(OK_TRUE, transport)
        for d in requests:
            self.successResultOf(d)
        self.successResultOf(self.pool.closeCachedConnections())
        self.assertTrue(all(t.closed for t in self.endpoint.transports))
        self.successResultOf(self.pool.closeCachedConnections())

    def test_close_while_busy(self) -> None:
        """
        A request that finishes while the pool is being closed has its
        connection closed instead of kept, so the close completes.
        """
        busy = self.get()
        idle = self.get()
        busyTransport, idleTransport = self.endpoint.transports
        self.answer(OK_TRUE, idleTransport)
        self.successResultOf(idle)
        idleTransport.closeLater = True
        closing = self.pool.closeCachedConnections()
        self.answer(OK_TRUE, busyTransport)
        self.successResultOf(busy)
        self.assertTrue(busyTransport.closed)
        self.assertNoResult(closing)
        idleTransport.serverCloses()
        self.successResultOf(closing)


class UserliOverKeepAliveTests(SynchronousTestCase):
    """L{UserliClient} reads what this transport delivers."""

    def setUp(self) -> None:
        self.endpoint = FakeEndpoint()
        self.pool = KeepAlivePool(FakeEndpoints(self.endpoint))  # type: ignore[arg-type]
        self.client = UserliClient(
            keepAliveRequester(self.pool), BASE, "token", Clock(), Metrics(process=False)
        )

    def test_alias(self) -> None:
        """A JSON list becomes the destinations, with the token sent."""
        d = self.client.alias("info@example.org")
        transport = self.endpoint.transports[-1]
        self.assertIn(b"Authorization: Bearer token\r\n", transport.value())
        self.assertIn(b"GET /api/postfix/alias/info@example.org HTTP/1.1\r\n", transport.value())
        body = b'["a@example.org"]'
        transport.protocol.dataReceived(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        self.assertEqual(self.successResultOf(d), ["a@example.org"])

    def test_not_http(self) -> None:
        """An answer that is not HTTP is a UserliError, like every other failure."""
        d = self.client.mailbox("a@example.org")
        self.endpoint.transports[-1].protocol.dataReceived(b"SSH-2.0-OpenSSH\r\n\r\n")
        self.failureResultOf(d, UserliError)


class Server(Resource):
    """A real twisted.web resource: plain, chunked, and closing answers."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.peers: list[int] = []

    def render_GET(self, request: Request) -> bytes | int:
        self.peers.append(request.getClientAddress().port)
        request.setHeader(b"Content-Type", b"application/json")
        if request.path.endswith(b"/chunked"):
            # No length: twisted.web sends it chunked.
            request.write(b'["a@ex')
            request.write(b'ample.org"]')
            request.finish()
            return NOT_DONE_YET
        return b"true"


class RealServerTests(TestCase):
    """The pool against twisted.web over loopback."""

    @defer.inlineCallbacks
    def test_real_server(self) -> Any:
        """Plain and chunked answers, all on one kept-alive connection."""
        resource = Server()
        port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        pool = KeepAlivePool(ReusedEndpoints(reactor, connectTimeout=5))
        self.addCleanup(pool.closeCachedConnections)
        request = keepAliveRequester(pool)
        base = f"http://127.0.0.1:{port.getHost().port}"
        for path in ("/a", "/chunked", "/b"):
            response = yield request("GET", base + path)
            self.assertEqual(response.code, 200)
        self.assertEqual(response.body, b"true")
        chunked = yield request("GET", base + "/chunked")
        self.assertEqual(chunked.body, b'["a@example.org"]')
        self.assertEqual(len(set(resource.peers)), 1)


class UserliBodyLimitTests(SynchronousTestCase):
    """The client's own body limit holds for bodies the transport read whole."""

    def test_too_large(self) -> None:
        """A body over the client's limit (under the transport's) is a UserliError."""
        endpoint = FakeEndpoint()
        client = UserliClient(
            keepAliveRequester(KeepAlivePool(FakeEndpoints(endpoint))),  # type: ignore[arg-type]
            BASE,
            "token",
            Clock(),
            Metrics(process=False),
        )
        d = client.alias("info@example.org")
        body = b'["' + b"a" * USERLI_MAX_BODY + b'"]'
        endpoint.transports[-1].protocol.dataReceived(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        self.assertIn("too large", str(self.failureResultOf(d, UserliError).value))


class HTTPSTests(TestCase):
    """HTTPS through L{ReusedEndpoints}: certificates are checked."""

    def setUp(self) -> None:
        self.certificate, key = self_signed()
        server = PrivateCertificate.loadPEM(self.certificate + key)
        self.resource = Server()
        port = reactor.listenSSL(  # type: ignore[attr-defined]
            0, Site(self.resource), server.options(), interface="127.0.0.1"
        )
        self.addCleanup(port.stopListening)
        self.base = f"https://localhost:{port.getHost().port}"

    def requester(self, policy: Any = None) -> Any:
        pool = KeepAlivePool(ReusedEndpoints(reactor, connectTimeout=5, policy=policy))
        self.addCleanup(pool.closeCachedConnections)
        return keepAliveRequester(pool)

    @defer.inlineCallbacks
    def test_trusted(self) -> Any:
        """With the server's CA trusted, requests go over TLS and the connection is kept."""
        trust = Certificate.loadPEM(self.certificate)
        request = self.requester(BrowserLikePolicyForHTTPS(trustRoot=trust))
        for path in ("/a", "/chunked"):
            response = yield request("GET", self.base + path)
            self.assertEqual(response.code, 200)
        self.assertEqual(response.body, b'["a@example.org"]')
        self.assertEqual(len(set(self.resource.peers)), 1)

    @defer.inlineCallbacks
    def test_untrusted_refused(self) -> Any:
        """By default (the system's roots) a self-signed server is refused."""
        request = self.requester()
        yield self.assertFailure(request("GET", self.base + "/a"), SSL.Error)
        self.assertEqual(self.resource.peers, [])
