"""
The HTTP client under the Userli client: treq's C{HTTPClient} on Twisted's
C{Agent}, over a persistent connection pool.

The daemon asks one server, tens of thousands of times a minute on a cold
cache, so connections are kept alive and reused: as many idle ones as the
listeners can have lookups in flight (more are opened when a burst needs
them), each closed after a while unused, all of them at shutdown.

Agent's own endpoint factory builds a new endpoint (and, for HTTPS, new TLS
options with their trust store) for every request, even one that goes out
on a pooled connection; L{UserliEndpoints} builds the endpoint to Userli
once.  It also keeps the pool's connections out of the log: each new one
would otherwise write "Starting factory" and "Stopping factory" at info
level, hundreds of lines when a burst of cache misses grows the pool.

The Userli API is stateless, so the client keeps no cookies: a cookie set by
a proxy in front of Userli (a PHP session, say) is never sent back, which
would otherwise tie every call to one session, and with PHP's session
locking serialise all of them.
"""

from __future__ import annotations

from http.cookiejar import CookieJar, CookiePolicy
from typing import Any

from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.web.client import URI, Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from userli_postfix.serving import MAX_CONNECTIONS

# Idle keep-alive connections kept to Userli: a listener's connection limit,
# so the lookups of a full listener (one at a time per Postfix connection)
# all find one.  More are opened beyond that as needed, so lookups never
# queue for a connection; idle ones beyond it are closed.
POOL_IDLE_PER_HOST = MAX_CONNECTIONS

# Seconds an idle connection is kept.  Web servers close idle keep-alive
# connections themselves (nginx after 75 s, Apache after 5 s); Twisted
# retries a GET that meets such a closed connection once on a new one.
POOL_IDLE_TIMEOUT = 60

# Seconds to establish a connection (TCP, and the TLS handshake for https).
# Every call also has the Userli client's overall deadline.
CONNECT_TIMEOUT = 5.0

# Twisted's HostnameEndpoint starts an attempt on the next address of a
# name (IPv6 and IPv4 for localhost) this many seconds after the previous
# one, and learns that the last one failed only at its next tick: with
# the default of 0.3 s a Userli that refuses connections cost every lookup
# 0.3 s (0.6 s for localhost) before it could answer TEMP.  A refused
# connection is known at once; so is the answer now.  A hanging attempt
# costs that tick twenty times a second until its timeout.
ATTEMPT_DELAY = 0.05


class NoCookies(CookiePolicy):
    """A cookie policy that accepts no cookie and returns none."""

    netscape = False
    rfc2965 = False
    hide_cookie2 = True

    def set_ok(self, cookie: Any, request: Any) -> bool:
        return False

    def return_ok(self, cookie: Any, request: Any) -> bool:
        return False

    def domain_return_ok(self, domain: str, request: Any) -> bool:
        return False

    def path_return_ok(self, path: str, request: Any) -> bool:
        return False


@implementer(IStreamClientEndpoint)
class _QuietEndpoint:
    """Connects the pool's connection factories with their logging off."""

    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self._endpoint = endpoint

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        # Factory.noisy is the public switch for "Starting/Stopping factory".
        protocolFactory.noisy = False  # type: ignore[attr-defined]
        return self._endpoint.connect(protocolFactory)


@implementer(IAgentEndpointFactory)
class UserliEndpoints:
    """
    The endpoint to each origin, built on first use and kept (the daemon
    only ever talks to one Userli).  HTTPS gets Twisted's default checks
    (L{BrowserLikePolicyForHTTPS}: the system's trusted roots, which
    C{SSL_CERT_FILE} can replace, and the host name) unless C{policy} says
    otherwise.
    """

    def __init__(
        self,
        reactor: Any,
        connectTimeout: float = CONNECT_TIMEOUT,
        policy: IPolicyForHTTPS | None = None,
    ) -> None:
        self._reactor = reactor
        self._connectTimeout = connectTimeout
        if policy is None:
            policy = BrowserLikePolicyForHTTPS()
        self._policy = policy
        self._endpoints: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        """The endpoint for C{uri}'s scheme, host and port."""
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            if uri.scheme not in (b"http", b"https"):
                raise ValueError(f"unsupported scheme {uri.scheme!r}")
            endpoint = HostnameEndpoint(
                self._reactor,
                uri.host,
                uri.port,
                timeout=self._connectTimeout,
                attemptDelay=ATTEMPT_DELAY,
            )
            if uri.scheme == b"https":
                endpoint = wrapClientTLS(
                    self._policy.creatorForNetloc(uri.host, uri.port), endpoint
                )
            endpoint = self._endpoints[key] = _QuietEndpoint(endpoint)
        return endpoint


def makeHTTPClient(
    reactor: Any,
    policy: IPolicyForHTTPS | None = None,
    idlePerHost: int = POOL_IDLE_PER_HOST,
    idleTimeout: int = POOL_IDLE_TIMEOUT,
    connectTimeout: float = CONNECT_TIMEOUT,
) -> tuple[HTTPClient, HTTPConnectionPool]:
    """
    A treq client over a persistent pool, and the pool (whose
    C{closeCachedConnections} the daemon calls at shutdown).
    """
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = idlePerHost
    pool.cachedConnectionTimeout = idleTimeout
    pool.retryAutomatically = True
    endpoints = UserliEndpoints(reactor, connectTimeout, policy)
    agent = Agent.usingEndpointFactory(reactor, endpoints, pool=pool)
    # treq takes any CookieJar (its annotation names its own subclass,
    # which the oldest treq we support does not have).
    jar = CookieJar(NoCookies())
    return HTTPClient(agent, cookiejar=jar), pool  # type: ignore[arg-type]
