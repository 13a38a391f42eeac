"""
The HTTP transport under the Userli client: a small HTTP/1.1 client with
keep-alive connections, one request at a time on each, the whole response
body in memory.

The daemon asks one server, a few hundred bytes of JSON per answer, tens of
thousands of times a minute.  Twisted's general client (C{Agent} and
C{twisted.web._newclient}) builds a request object, a parser object, a
response object and a body producer for every call and pauses and resumes
the connection around each body; on a cache miss that machinery cost more
CPU than everything else the daemon does for the lookup.  This client does
only what the daemon needs: it writes the request in one piece and parses
the status line, the headers and a body framed by C{Content-Length},
C{chunked} transfer coding or the end of the connection.

Its requester has the C{treq.request} shape L{userli_postfix.userli.UserliClient}
takes (tests give the client C{treq.testing.StubTreq} instead), and answers
with an C{IResponse} whose body is already there.  The endpoint to each
server is built once (L{ReusedEndpoints}; HTTPS with Twisted's certificate
checks), where Agent's default builds one, IDNA-encoding the host, per
request.  A request on a reused connection that the server had closed
meanwhile (its keep-alive timeout) is retried once on a new connection when
it is a C{GET}, as Twisted's pool does; a C{POST} is never sent twice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hyperlink import URL
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.web.client import URI, BrowserLikePolicyForHTTPS, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS, IResponse
from zope.interface import implementer

# Longer status lines and header blocks are not from Userli.
MAX_HEAD = 64 * 1024

# UserliClient refuses bodies beyond its own limit (1 MiB); stop reading a
# little after that, whatever the framing says.
MAX_BODY = 2 * 1024 * 1024

# Idle connections kept per server; more are opened as needed.
MAX_IDLE = 256

_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _TRAILER, _UNTIL_CLOSE = range(6)


@implementer(IAgentEndpointFactory)
class ReusedEndpoints:
    """
    Endpoints per (scheme, host, port), built on first use and kept: the
    daemon only ever talks to one Userli.  HTTPS gets the same
    certificate checks as Twisted's default (L{BrowserLikePolicyForHTTPS}:
    the system's trusted roots and the host name), unless C{policy} says
    otherwise (a private CA as C{BrowserLikePolicyForHTTPS(trustRoot=...)}).
    """

    def __init__(
        self,
        reactor: Any,
        connectTimeout: float | None = None,
        policy: IPolicyForHTTPS | None = None,
    ) -> None:
        self._reactor = reactor
        self._connectTimeout = connectTimeout
        self._policy = policy if policy is not None else BrowserLikePolicyForHTTPS()
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


def _uriBytes(url: str) -> bytes:
    try:
        return url.encode("ascii")
    except UnicodeEncodeError:
        # An internationalised host name in USERLI_BASE_URL (keys are
        # always percent-encoded by the client): let hyperlink encode it.
        return URL.from_text(url).to_uri().to_text().encode("ascii")


class HTTPProtocolError(Exception):
    """The server's answer is not HTTP/1.x as this client understands it."""


class StaleConnection(Exception):
    """A reused connection closed before any byte of the answer arrived."""


@implementer(IResponse)
class Response:
    """
    What L{KeepAlivePool} answers with: the status code, the headers and the
    whole body; C{deliverBody} hands the body to a protocol as Twisted's
    responses do.

    @ivar rawHeaders: the headers as received, names in lower case.
    """

    version = (b"HTTP", 1, 1)
    phrase = b""
    request = None
    previousResponse = None

    def __init__(self, code: int, rawHeaders: dict[bytes, bytes], body: bytes) -> None:
        self.code = code
        self.rawHeaders = rawHeaders
        self.body = body
        self.length = len(body)

    @property
    def headers(self) -> Headers:
        """The headers as a Twisted C{Headers} (built only when asked for)."""
        return Headers({name: [value] for name, value in self.rawHeaders.items()})

    def setPreviousResponse(self, response: IResponse) -> None:
        """Redirects are never followed: there is no previous response."""

    def deliverBody(self, protocol: Protocol) -> None:
        protocol.makeConnection(_DoneTransport())
        if self.body:
            protocol.dataReceived(self.body)
        protocol.connectionLost(Failure(ResponseDone()))


class _DoneTransport:
    """The transport a delivered body seems to come from: already complete."""

    def abortConnection(self) -> None:
        """Nothing to abort: the body was read whole."""

    def stopProducing(self) -> None:
        """Nothing to stop: the body was read whole."""


class _Connection(Protocol):
    """One keep-alive connection: parses the answer to the request in flight."""

    def __init__(self, pool: KeepAlivePool, key: tuple[bytes, bytes, int]) -> None:
        self.pool = pool
        self.key = key
        self.waiting: defer.Deferred[Response] | None = None
        self.reused = False
        self.lost = False
        self._reset()

    def _reset(self) -> None:
        self._buffer = b""
        self._received = False
        self._state = _HEAD
        self._code = 0
        self._headers: dict[bytes, bytes] = {}
        self._body: list[bytes] = []
        self._size = 0
        self._remaining = 0
        self._keepAlive = True

    def send(self, data: bytes, waiting: defer.Deferred[Response]) -> None:
        """Write a whole request; C{waiting} fires with its L{Response}."""
        self.waiting = waiting
        self._reset()
        self.transport.write(data)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if self.waiting is None:
            # Nothing was asked: a broken or hostile server.  Drop it.
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        self._received = True
        self._buffer += data
        try:
            self._parse()
        except HTTPProtocolError as error:
            self._fail(Failure(error))
            self.transport.abortConnection()  # type: ignore[union-attr]

    def _parse(self) -> None:
        while self.waiting is not None:
            state = self._state
            if state == _HEAD:
                end = self._buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(self._buffer) > MAX_HEAD:
                        raise HTTPProtocolError("response head too long")
                    return
                head, self._buffer = self._buffer[:end], self._buffer[end + 4 :]
                self._head(head)
            elif state == _LENGTH:
                if len(self._buffer) < self._remaining:
                    return
                body = self._buffer[: self._remaining]
                extra = self._buffer[self._remaining :]
                self._buffer = b""
                if extra:
                    # One request at a time: anything more is not ours.
                    self._keepAlive = False
                self._finish(body)
            elif state == _CHUNK_SIZE:
                end = self._buffer.find(b"\r\n")
                if end < 0:
                    if len(self._buffer) > 1024:
                        raise HTTPProtocolError("chunk size line too long")
                    return
                line, self._buffer = self._buffer[:end], self._buffer[end + 2 :]
                text = line.split(b";", 1)[0].strip()
                try:
                    size = int(text, 16)
                except ValueError:
                    raise HTTPProtocolError("malformed chunk size") from None
                if size < 0 or not text.isalnum():
                    raise HTTPProtocolError("malformed chunk size")
                if size == 0:
                    self._state = _TRAILER
                else:
                    self._grow(size)
                    self._remaining = size
                    self._state = _CHUNK_DATA
            elif state == _CHUNK_DATA:
                if len(self._buffer) < self._remaining + 2:
                    return
                if self._buffer[self._remaining : self._remaining + 2] != b"\r\n":
                    raise HTTPProtocolError("chunk not followed by CRLF")
                self._body.append(self._buffer[: self._remaining])
                self._buffer = self._buffer[self._remaining + 2 :]
                self._state = _CHUNK_SIZE
            elif state == _TRAILER:
                if self._buffer.startswith(b"\r\n"):
                    rest = self._buffer[2:]
                else:
                    end = self._buffer.find(b"\r\n\r\n")
                    if end < 0:
                        if len(self._buffer) > MAX_HEAD:
                            raise HTTPProtocolError("trailer too long")
                        return
                    rest = self._buffer[end + 4 :]
                self._buffer = b""
                if rest:
                    self._keepAlive = False
                self._finish(b"".join(self._body))
            else:  # _UNTIL_CLOSE
                self._grow(len(self._buffer))
                self._body.append(self._buffer)
                self._buffer = b""
                return

    def _grow(self, size: int) -> None:
        self._size += size
        if self._size > MAX_BODY:
            raise HTTPProtocolError("response body too large")

    def _head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise HTTPProtocolError("malformed status line")
        code = int(parts[1])
        if 100 <= code < 200:
            if code == 101:
                raise HTTPProtocolError("unexpected protocol switch")
            # An interim answer: the real one follows.
            return
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip():
                raise HTTPProtocolError("malformed header line")
            headers[name.lower()] = value.strip()
        self._code = code
        self._headers = headers
        connection = headers.get(b"connection", b"").lower()
        if parts[0] == b"HTTP/1.0":
            self._keepAlive = b"keep-alive" in connection
        else:
            self._keepAlive = b"close" not in connection
        encoding = headers.get(b"transfer-encoding")
        length = headers.get(b"content-length")
        if code in (204, 304):
            self._state = _LENGTH
            self._remaining = 0
        elif encoding is not None:
            if encoding.lower().split(b",")[-1].strip() != b"chunked":
                raise HTTPProtocolError("unsupported transfer coding")
            self._state = _CHUNK_SIZE
        elif length is not None:
            if not length.isdigit():
                raise HTTPProtocolError("malformed Content-Length")
            self._remaining = int(length)
            self._grow(self._remaining)
            self._state = _LENGTH
        else:
            self._keepAlive = False
            self._state = _UNTIL_CLOSE

    def _finish(self, body: bytes) -> None:
        waiting, self.waiting = self.waiting, None
        response = Response(self._code, self._headers, body)
        if self._keepAlive and not self.lost:
            self.pool._release(self)
        else:
            self.transport.loseConnection()  # type: ignore[union-attr]
        assert waiting is not None
        waiting.callback(response)

    def _fail(self, failure: Failure) -> None:
        waiting, self.waiting = self.waiting, None
        if waiting is not None:
            waiting.errback(failure)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.lost = True
        self.pool._lost(self)
        if self.waiting is None:
            return
        if self._state == _UNTIL_CLOSE:
            self._keepAlive = False
            self._finish(b"".join(self._body))
        elif self.reused and not self._received:
            self._fail(Failure(StaleConnection(str(reason.value))))
        else:
            self._fail(reason)


class _ConnectionFactory(Factory):
    noisy = False

    def __init__(self, pool: KeepAlivePool, key: tuple[bytes, bytes, int]) -> None:
        self.pool = pool
        self.key = key

    def buildProtocol(self, addr: Any) -> _Connection:
        return _Connection(self.pool, self.key)


class KeepAlivePool:
    """
    Keep-alive connections to each server, and the requests sent over them.

    @param endpoints: gives the endpoint for a URI (built once per server).
    """

    def __init__(self, endpoints: ReusedEndpoints, maxIdle: int = MAX_IDLE) -> None:
        self._endpoints = endpoints
        self._maxIdle = maxIdle
        self._idle: dict[tuple[bytes, bytes, int], list[_Connection]] = {}
        self._busy: set[_Connection] = set()
        self._closing: list[defer.Deferred[None]] = []

    def request(self, uri: URI, data: bytes, retry: bool) -> defer.Deferred[Response]:
        """
        Send C{data}, a whole request for C{uri}'s server, on an idle
        connection or a new one.  Cancelling the result aborts the
        connection (a connection with an unanswered request cannot be
        reused).
        """
        key = (uri.scheme, uri.host, uri.port)
        current: list[Any] = [None]

        def cancel(d: defer.Deferred[Response]) -> None:
            attempt = current[0]
            if isinstance(attempt, _Connection):
                attempt.waiting = None
                if attempt.transport is not None:
                    attempt.transport.abortConnection()  # type: ignore[attr-defined]
            elif isinstance(attempt, defer.Deferred):
                attempt.cancel()

        result: defer.Deferred[Response] = defer.Deferred(cancel)

        def sendOn(connection: _Connection, mayRetry: bool) -> None:
            current[0] = connection
            self._busy.add(connection)
            answer: defer.Deferred[Response] = defer.Deferred()

            def done(response: Response) -> None:
                self._busy.discard(connection)
                if not result.called:
                    result.callback(response)

            def failed(failure: Failure) -> None:
                self._busy.discard(connection)
                if result.called:
                    return
                if mayRetry and failure.check(StaleConnection):
                    connect(False)
                else:
                    result.errback(failure)

            answer.addCallbacks(done, failed)
            connection.send(data, answer)

        def connect(mayRetry: bool) -> None:
            idle = self._idle.get(key)
            while idle:
                connection = idle.pop()
                if not connection.lost:
                    connection.reused = True
                    sendOn(connection, mayRetry)
                    return
            endpoint: IStreamClientEndpoint = self._endpoints.endpointForURI(uri)
            connecting = endpoint.connect(_ConnectionFactory(self, key))
            current[0] = connecting

            def connected(protocol: _Connection) -> None:
                if result.called:
                    protocol.transport.loseConnection()  # type: ignore[union-attr]
                    return
                sendOn(protocol, False)

            def notConnected(failure: Failure) -> None:
                if not result.called:
                    result.errback(failure)

            connecting.addCallbacks(connected, notConnected)

        connect(retry)
        return result

    def _release(self, connection: _Connection) -> None:
        idle = self._idle.setdefault(connection.key, [])
        # While the pool is being closed, a connection whose request just
        # finished is closed too, or the close would wait for it forever.
        if self._closing or len(idle) >= self._maxIdle:
            connection.transport.loseConnection()  # type: ignore[union-attr]
            return
        idle.append(connection)

    def _lost(self, connection: _Connection) -> None:
        idle = self._idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)
        self._busy.discard(connection)
        if self._closing and not self._open():
            waiting, self._closing = self._closing, []
            for d in waiting:
                d.callback(None)

    def _open(self) -> int:
        return sum(len(idle) for idle in self._idle.values())

    def closeCachedConnections(self) -> defer.Deferred[None]:
        """Close every idle connection; fires once they are closed."""
        connections = [c for idle in self._idle.values() for c in idle]
        if not connections:
            return defer.succeed(None)
        done: defer.Deferred[None] = defer.Deferred()
        self._closing.append(done)
        for connection in connections:
            connection.transport.loseConnection()  # type: ignore[union-attr]
        return done


def keepAliveRequester(
    pool: KeepAlivePool,
) -> Callable[..., defer.Deferred[IResponse]]:
    """
    A C{treq.request}-shaped callable over C{pool}: C{(method, url,
    headers=None, data=None, allow_redirects=False)}.  Redirects are never
    followed; the answer is a L{Response} with the body already read.
    """
    origins: dict[str, tuple[URI, bytes]] = {}
    headerBlocks: dict[int, tuple[Headers, bytes]] = {}

    def headerBlock(headers: Headers | None) -> bytes:
        if headers is None:
            return b""
        cached = headerBlocks.get(id(headers))
        if cached is None or cached[0] is not headers:
            block = b"".join(
                name + b": " + value + b"\r\n"
                for name, values in headers.getAllRawHeaders()
                for value in values
            )
            cached = headerBlocks[id(headers)] = (headers, block)
        return cached[1]

    def request(
        method: str,
        url: str,
        headers: Headers | None = None,
        data: bytes | None = None,
        allow_redirects: bool = False,
    ) -> defer.Deferred[IResponse]:
        scheme, _, rest = url.partition("://")
        netloc, slash, path = rest.partition("/")
        origin = origins.get(scheme + "://" + netloc)
        if origin is None:
            uri = URI.fromBytes(_uriBytes(scheme + "://" + netloc + "/"))
            origin = origins[scheme + "://" + netloc] = (uri, b"Host: " + uri.netloc + b"\r\n")
        uri, host = origin
        target = _uriBytes("/" + path) if slash else b"/"
        parts = [method.encode("ascii"), b" ", target, b" HTTP/1.1\r\n", host, headerBlock(headers)]
        if data is not None:
            parts += [b"Content-Length: ", b"%d" % len(data), b"\r\n\r\n", data]
        else:
            parts.append(b"\r\n")
        answer = pool.request(uri, b"".join(parts), retry=method == "GET" and data is None)
        return answer  # type: ignore[return-value]

    return request
