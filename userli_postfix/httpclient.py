"""
The HTTP transport under the Userli client: Twisted's C{Agent} over a
keep-alive pool, called directly.

L{UserliClient} only needs "send this request, give me the response"; it
reads and checks the body itself.  treq's conveniences (URL parsing and IDNA
checks on every call, a cookie jar, gzip negotiation, a buffering layer)
cost more CPU than the rest of a cache-missing lookup together, and Agent's
default endpoint factory builds a new endpoint, with its own IDNA
encoding of the host, for every request even when a pooled connection is
reused.  Here the endpoint to Userli is built once and the request goes
straight to the Agent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hyperlink import URL
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IConsumer, IStreamClientEndpoint
from twisted.web.client import URI, Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

Requester = Callable[..., defer.Deferred[IResponse]]


class _QuietClientFactory(HTTPConnectionPool._factory):  # type: ignore[name-defined,misc,valid-type]
    noisy = False


class QuietConnectionPool(HTTPConnectionPool):
    """
    A connection pool whose connections are not logged: by default each
    new connection to Userli writes "Starting factory" and "Stopping
    factory" lines at info level, hundreds of them when lookups burst.
    """

    _factory = _QuietClientFactory


@implementer(IAgentEndpointFactory)
class ReusedEndpoints:
    """
    Endpoints per (scheme, host, port), built on first use and kept: the
    daemon only ever talks to one Userli.  HTTPS gets the same
    certificate checks as Twisted's default (L{BrowserLikePolicyForHTTPS}).
    """

    def __init__(self, reactor: Any, connectTimeout: float | None = None) -> None:
        self._reactor = reactor
        self._connectTimeout = connectTimeout
        self._policy = BrowserLikePolicyForHTTPS()
        self._endpoints: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            if uri.scheme not in (b"http", b"https"):
                raise ValueError(f"unsupported scheme {uri.scheme!r}")
            kwargs: dict[str, Any] = {}
            if self._connectTimeout is not None:
                kwargs["timeout"] = self._connectTimeout
            endpoint = HostnameEndpoint(self._reactor, uri.host.decode("ascii"), uri.port, **kwargs)
            if uri.scheme == b"https":
                creator = self._policy.creatorForNetloc(uri.host, uri.port)
                endpoint = wrapClientTLS(creator, endpoint)
            self._endpoints[key] = endpoint
        return endpoint


@implementer(IBodyProducer)
class BytesProducer:
    """A request body that is all in memory: written at once."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: IConsumer) -> defer.Deferred[None]:
        consumer.write(self._data)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        """Nothing to pause: the body was written in one go."""

    def resumeProducing(self) -> None:
        """Nothing to resume: the body was written in one go."""

    def stopProducing(self) -> None:
        """Nothing to stop: the body was written in one go."""


def _uriBytes(url: str) -> bytes:
    try:
        return url.encode("ascii")
    except UnicodeEncodeError:
        # An internationalised host name in USERLI_BASE_URL (keys are
        # always percent-encoded by the client): let hyperlink encode it.
        return URL.from_text(url).to_uri().to_text().encode("ascii")


def agentRequester(agent: IAgent) -> Requester:
    """
    A C{treq.request}-shaped callable over C{agent}: C{(method, url,
    headers=None, data=None, allow_redirects=False)}.  Redirects are never
    followed (an Agent does not), which is what the Userli client wants.
    """

    def request(
        method: str,
        url: str,
        headers: Headers | None = None,
        data: bytes | None = None,
        allow_redirects: bool = False,
    ) -> defer.Deferred[IResponse]:
        producer = None if data is None else BytesProducer(data)
        return agent.request(method.encode("ascii"), _uriBytes(url), headers, producer)

    return request


def makeRequester(
    reactor: Any, pool: HTTPConnectionPool, connectTimeout: float | None = None
) -> Requester:
    """The requester the daemon gives its L{UserliClient}: an Agent on C{pool}."""
    agent = Agent.usingEndpointFactory(reactor, ReusedEndpoints(reactor, connectTimeout), pool=pool)
    return agentRequester(agent)
