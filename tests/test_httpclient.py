"""
Tests for L{userli_postfix.httpclient}: the Agent-based transport under the
Userli client.  It must send what the client asks (method, URL, headers,
body), build the endpoint to Userli once, keep HTTPS certificate checks, and
reuse keep-alive connections.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import URI, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from userli_postfix.httpclient import (
    BytesProducer,
    QuietConnectionPool,
    ReusedEndpoints,
    agentRequester,
    makeRequester,
)
from userli_postfix.metrics import Metrics
from userli_postfix.userli import UserliClient


class RecordingAgent:
    """An IAgent that records its calls and answers with a Deferred per call."""

    def __init__(self) -> None:
        self.calls: list[tuple[bytes, bytes, Headers | None, Any]] = []

    def request(
        self, method: bytes, uri: bytes, headers: Headers | None = None, bodyProducer: Any = None
    ) -> defer.Deferred[Any]:
        self.calls.append((method, uri, headers, bodyProducer))
        return defer.Deferred()


class RequesterTests(SynchronousTestCase):
    """L{agentRequester} turns a treq-shaped call into an Agent request."""

    def test_get(self) -> None:
        """A GET goes out with bytes method and URL, the given headers, and no body."""
        agent = RecordingAgent()
        headers = Headers({b"Accept": [b"application/json"]})
        agentRequester(agent)(  # type: ignore[arg-type]
            "GET", "http://userli.test/api/postfix/alias/a%2Fb@x", headers=headers
        )
        self.assertEqual(
            agent.calls, [(b"GET", b"http://userli.test/api/postfix/alias/a%2Fb@x", headers, None)]
        )

    def test_post_body(self) -> None:
        """A body is sent whole, with its length known up front (no chunked encoding)."""
        agent = RecordingAgent()
        agentRequester(agent)("POST", "http://userli.test/auth", data=b'{"a": 1}')  # type: ignore[arg-type]
        producer = agent.calls[0][3]
        self.assertIsInstance(producer, BytesProducer)
        self.assertEqual(producer.length, 8)
        transport = StringTransport()
        self.successResultOf(producer.startProducing(transport))
        self.assertEqual(transport.value(), b'{"a": 1}')

    def test_international_host(self) -> None:
        """A base URL with a non-ASCII host name is sent in its IDNA form."""
        agent = RecordingAgent()
        agentRequester(agent)("GET", "http://bücher.example/api/postfix/domain/x")  # type: ignore[arg-type]
        self.assertEqual(agent.calls[0][1], b"http://xn--bcher-kva.example/api/postfix/domain/x")


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


class Mailbox(Resource):
    """Answers every mailbox lookup with C{true}, remembering client ports."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.peers: list[int] = []

    def render_GET(self, request: Request) -> bytes:
        self.peers.append(request.getClientAddress().port)
        request.setHeader(b"Content-Type", b"application/json")
        return b"true"


class RealConnectionTests(TestCase):
    """The requester under L{UserliClient}, over real loopback connections."""

    @defer.inlineCallbacks
    def test_keep_alive(self) -> Any:
        """Consecutive API calls reuse one connection and get correct answers."""
        resource = Mailbox()
        port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        client = UserliClient(
            makeRequester(reactor, pool, connectTimeout=5),
            f"http://127.0.0.1:{port.getHost().port}",
            "token",
            reactor,  # type: ignore[arg-type]
            Metrics(process=False),
        )
        for _ in range(3):
            found = yield client.mailbox("a@example.org")
            self.assertIs(found, True)
        self.assertEqual(len(resource.peers), 3)
        self.assertEqual(len(set(resource.peers)), 1)


class QuietPoolTests(SynchronousTestCase):
    """L{QuietConnectionPool} does not log every connection it opens."""

    def test_quiet(self) -> None:
        """Its connection factories are not noisy; the default pool's are."""
        self.assertFalse(QuietConnectionPool._factory.noisy)
        self.assertTrue(HTTPConnectionPool._factory.noisy)
