"""
A fake Userli that follows the API contract of the daemon (userli-api.md).

It exists so that tests, and later benchmarks, talk HTTP to something that
behaves like Userli, error codes included, and that can be made to misbehave
the way real deployments do (slow, 500, refused, HTML from a proxy, JSON of
the wrong type, an empty body).  It records every request it receives, so a
test can assert what the daemon asked, or that it asked nothing.

Three ways to run it:

 - L{FakeUserliResource} is a plain C{twisted.web} resource over a
   L{FakeUserli} state object: mount it in C{treq.testing.StubTreq} for
   in-memory tests.
 - L{FakeUserliServer} serves it on a real TCP port from a private reactor
   running in a thread of the test process, so a test can reconfigure it and
   read what it received while a daemon subprocess talks to it.  The private
   reactor leaves the global one alone for trial test cases.
 - As a standalone process, for benchmarks::

     python tests/fake_userli.py --port 8000 --latency 0.005 --data data.json

   It prints C{listening on http://HOST:PORT} once it accepts connections.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from twisted.internet import threads
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web import http, resource, server

#: The token the daemon is configured with in tests; it carries the postfix scope.
TOKEN = "test-token"
#: A token Userli knows but that lacks the postfix scope: answered 403.
TOKEN_WITHOUT_SCOPE = "token-without-postfix-scope"

#: Fault modes, switchable at run time with L{FakeUserli.set_mode}.
NORMAL = "normal"
SLOW = "slow"  # answer correctly, but only after C{delay} seconds
ERROR = "error"  # HTTP 500 with Symfony's error body
REFUSED = "refused"  # stop listening and drop every open connection
GARBAGE = "garbage"  # HTTP 200 with an HTML page, as from a misconfigured proxy
WRONG_TYPE = "wrong-type"  # HTTP 200 with valid JSON of the wrong type
EMPTY = "empty"  # HTTP 200 with an empty body
REDIRECT = "redirect"  # HTTP 302 to a login page
MODES = (NORMAL, SLOW, ERROR, REFUSED, GARBAGE, WRONG_TYPE, EMPTY, REDIRECT)

LOOKUP_ENDPOINTS = ("alias", "domain", "mailbox", "senders", "smtp_quota")


def _problem(status: int, detail: str) -> dict[str, Any]:
    """Symfony's default JSON error body (access denied, not found, server error)."""
    return {
        "type": "https://tools.ietf.org/html/rfc2616#section-10",
        "title": "An error occurred",
        "status": status,
        "detail": detail,
    }


@dataclass
class UserliData:
    """
    What the fake Userli knows.  Addresses are matched exactly as the daemon
    sends them, so a test sees when a key was not normalised.

    @ivar users: mailbox address -> password.
    @ivar aliases: alias source -> destinations.
    @ivar domains: the domains Userli serves.
    @ivar quotas: address (user or alias) -> (per_hour, per_day).
    @ivar default_quota: the global limits for a user or alias without its own.
    @ivar spam_users: users whose login is refused for the spam role.
    @ivar password_change_users: users whose login is refused until they change
        their password.
    @ivar tokens: API token -> its scopes.
    """

    users: dict[str, str] = field(default_factory=dict)
    aliases: dict[str, list[str]] = field(default_factory=dict)
    domains: set[str] = field(default_factory=set)
    quotas: dict[str, tuple[int, int]] = field(default_factory=dict)
    default_quota: tuple[int, int] = (0, 0)
    spam_users: set[str] = field(default_factory=set)
    password_change_users: set[str] = field(default_factory=set)
    tokens: dict[str, set[str]] = field(
        default_factory=lambda: {TOKEN: {"postfix"}, TOKEN_WITHOUT_SCOPE: {"dovecot"}}
    )

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> UserliData:
        """
        Build from the JSON layout of C{--data}: the attribute names above,
        sets and tuples as lists, e.g. C{{"users": {"a@x": "pw"},
        "aliases": {"b@x": ["a@x"]}, "domains": ["x"], "quotas": {"a@x": [10, 100]}}}.
        """
        data = cls()
        data.users = dict(value.get("users", {}))
        data.aliases = {k: list(v) for k, v in value.get("aliases", {}).items()}
        data.domains = set(value.get("domains", ()))
        data.quotas = {k: (int(v[0]), int(v[1])) for k, v in value.get("quotas", {}).items()}
        default = value.get("default_quota", (0, 0))
        data.default_quota = (int(default[0]), int(default[1]))
        data.spam_users = set(value.get("spam_users", ()))
        data.password_change_users = set(value.get("password_change_users", ()))
        if "tokens" in value:
            data.tokens = {k: set(v) for k, v in value["tokens"].items()}
        return data


@dataclass(frozen=True)
class ReceivedRequest:
    """One request as the fake received it."""

    method: str
    #: The request target exactly as sent (still percent-encoded).
    raw_path: str
    #: Header names lower-cased; the last value of each.
    headers: dict[str, str]
    body: bytes

    @property
    def endpoint(self) -> str | None:
        """C{alias}, C{auth}, ... for an C{/api/postfix/} request, else C{None}."""
        parts = self.raw_path.split("?", 1)[0].split("/")
        if len(parts) >= 4 and parts[1:3] == ["api", "postfix"]:
            return parts[3]
        return None

    @property
    def key(self) -> str | None:
        """The decoded path parameter of a lookup, else C{None}."""
        parts = self.raw_path.split("?", 1)[0].split("/")
        if len(parts) == 5 and parts[1:3] == ["api", "postfix"]:
            return unquote(parts[4], errors="surrogateescape")
        return None

    def json(self) -> Any:
        """The decoded JSON body (auth requests)."""
        return json.loads(self.body)


class FakeUserli:
    """
    The fake's state: its data, its fault mode and what it received.

    Safe to use from a test thread while a reactor thread serves it: the
    request log is guarded by a lock, and mode and data are replaced, not
    mutated, by the setters.
    """

    def __init__(
        self, data: UserliData | None = None, latency: float = 0.0, keep_requests: bool = True
    ) -> None:
        self.data = data if data is not None else UserliData()
        #: Whether L{record} keeps requests; a long benchmark run turns it off
        #: so memory does not grow with every request.
        self.keep_requests = keep_requests
        #: Seconds every answer is held back, in every mode (benchmarks).
        self.latency = latency
        self.mode = NORMAL
        #: Extra seconds an answer is held back in L{SLOW} mode.
        self.delay = 0.0
        self._lock = threading.Lock()
        self._received: list[ReceivedRequest] = []
        #: Called with the new mode after every L{set_mode} (the server uses
        #: it to stop and resume listening).
        self.onModeChange: Callable[[str], None] | None = None

    def set_data(self, data: UserliData) -> None:
        """Replace everything the fake knows."""
        self.data = data

    def set_mode(self, mode: str, delay: float = 0.0) -> None:
        """Switch the fault mode; C{delay} is the hold-back of L{SLOW}."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
        self.delay = delay
        self.mode = mode
        if self.onModeChange is not None:
            self.onModeChange(mode)

    def record(self, request: ReceivedRequest) -> None:
        """Remember a received request."""
        if not self.keep_requests:
            return
        with self._lock:
            self._received.append(request)

    def requests(self, endpoint: str | None = None) -> list[ReceivedRequest]:
        """Everything received so far, optionally only for one endpoint."""
        with self._lock:
            received = list(self._received)
        if endpoint is None:
            return received
        return [r for r in received if r.endpoint == endpoint]

    def clear(self) -> None:
        """Forget what was received."""
        with self._lock:
            self._received.clear()

    # The answers, as (status, JSON value) pairs, following userli-api.md.

    def authorise(self, headers: dict[str, str]) -> tuple[int, Any] | None:
        """The 401/403 answer for a request without a usable token, else C{None}."""
        token = None
        authorization = headers.get("authorization")
        if authorization is not None:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                token = value.strip()
        if token is None and headers.get("x-api-token", "").strip():
            token = headers["x-api-token"].strip()
        if token is None:
            return 401, {"error": "No API token provided"}
        scopes = self.data.tokens.get(token)
        if scopes is None:
            return 401, {"error": "Invalid API token"}
        if "postfix" not in scopes:
            return 403, _problem(403, "Access Denied.")
        return None

    def lookup(self, endpoint: str, key: str) -> tuple[int, Any]:
        """The answer of a C{GET /api/postfix/<endpoint>/<key>}."""
        data = self.data
        if endpoint == "alias":
            return 200, list(data.aliases.get(key, []))
        if endpoint == "domain":
            return 200, key in data.domains
        if endpoint == "mailbox":
            return 200, key in data.users
        if endpoint == "senders":
            senders = [key] if key in data.users else []
            senders.extend(d for d in data.aliases.get(key, []) if d not in senders)
            return 200, senders
        if endpoint == "smtp_quota":
            if key not in data.users and key not in data.aliases:
                return 404, {"error": "User not found"}
            per_hour, per_day = data.quotas.get(key, data.default_quota)
            return 200, {"per_hour": per_hour, "per_day": per_day}
        return 404, _problem(404, "Not Found")

    def auth(self, body: bytes) -> tuple[int, Any]:
        """The answer of a C{POST /api/postfix/auth}."""
        try:
            value = json.loads(body)
        except ValueError:
            return 400, _problem(400, 'Request payload contains invalid "json" data.')
        if not isinstance(value, dict):
            return 400, _problem(400, 'Request payload contains invalid "json" data.')
        violations = [
            {"propertyPath": name, "title": "This value should not be blank."}
            for name in ("email", "password")
            if not isinstance(value.get(name), str) or not value[name].strip()
        ]
        if violations:
            return 422, {
                "type": "https://symfony.com/errors/validation",
                "title": "Validation Failed",
                "status": 422,
                "detail": "; ".join(f"{v['propertyPath']}: {v['title']}" for v in violations),
                "violations": violations,
            }
        email, password = value["email"], value["password"]
        data = self.data
        if data.users.get(email) != password:
            return 401, {"message": "authentication failed"}
        if email in data.spam_users:
            return 403, {"message": "user disabled due to spam role"}
        if email in data.password_change_users:
            return 403, {"message": "user password change required"}
        return 200, {"message": "success"}

    def answer(
        self, method: str, raw_path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, Any]:
        """Route a request to its answer, as (status, JSON value)."""
        denied = self.authorise(headers)
        if denied is not None:
            return denied
        parts = raw_path.split("?", 1)[0].split("/")
        if parts[1:3] != ["api", "postfix"] or len(parts) < 4:
            return 404, _problem(404, "Not Found")
        endpoint = parts[3]
        if endpoint == "auth" and len(parts) == 4:
            if method != "POST":
                return 405, _problem(405, "Method Not Allowed")
            return self.auth(body)
        if endpoint in LOOKUP_ENDPOINTS and len(parts) == 5 and parts[4]:
            if method != "GET":
                return 405, _problem(405, "Method Not Allowed")
            return self.lookup(endpoint, unquote(parts[4], errors="surrogateescape"))
        return 404, _problem(404, "Not Found")


def _wrong_type(endpoint: str | None) -> Any:
    """Valid JSON of a type the endpoint never answers with."""
    if endpoint in ("alias", "senders"):
        return True
    if endpoint in ("domain", "mailbox"):
        return "true"
    if endpoint == "smtp_quota":
        return [10, 100]
    return "success"


class FakeUserliResource(resource.Resource):
    """The fake as a C{twisted.web} resource; every path is handled here."""

    isLeaf = True

    def __init__(self, fake: FakeUserli, clock: IReactorTime) -> None:
        super().__init__()
        self.fake = fake
        self.clock = clock

    def render(self, request: server.Request) -> bytes | int:
        raw_path = request.uri.decode("latin-1")
        headers = {
            name.decode("latin-1").lower(): values[-1].decode("latin-1")
            for name, values in request.requestHeaders.getAllRawHeaders()
        }
        body = request.content.read() if request.content is not None else b""
        method = request.method.decode("latin-1")
        received = ReceivedRequest(method, raw_path, headers, body)
        self.fake.record(received)

        mode = self.fake.mode
        if mode == REFUSED:
            # A request on a connection opened before the switch: drop it,
            # as a dead server would.
            request.transport.abortConnection()  # type: ignore[union-attr]
            return server.NOT_DONE_YET
        delay = self.fake.latency + (self.fake.delay if mode == SLOW else 0.0)
        if delay <= 0:
            self._respond(request, received, mode)
            return server.NOT_DONE_YET
        call: IDelayedCall = self.clock.callLater(delay, self._respond, request, received, mode)

        def cancel(reason: Failure) -> None:
            if call.active():
                call.cancel()

        request.notifyFinish().addErrback(cancel)
        return server.NOT_DONE_YET

    def _respond(self, request: server.Request, received: ReceivedRequest, mode: str) -> None:
        if mode == ERROR:
            status, value = 500, _problem(500, "Internal Server Error")
        elif mode == GARBAGE:
            self._finish(
                request,
                200,
                b"<!DOCTYPE html><html><body><h1>Sign in</h1></body></html>",
                b"text/html; charset=UTF-8",
            )
            return
        elif mode == EMPTY:
            self._finish(request, 200, b"", b"application/json")
            return
        elif mode == REDIRECT:
            request.setHeader(b"Location", b"/login")
            self._finish(request, 302, b"", b"text/html; charset=UTF-8")
            return
        else:
            status, value = self.fake.answer(
                received.method, received.raw_path, received.headers, received.body
            )
            if mode == WRONG_TYPE and status == 200:
                value = _wrong_type(received.endpoint)
        self._finish(request, status, json.dumps(value).encode("utf-8"), b"application/json")

    @staticmethod
    def _finish(request: server.Request, status: int, body: bytes, content_type: bytes) -> None:
        if request.finished or request._disconnected:
            return
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", content_type)
        request.setHeader(b"Content-Length", str(len(body)).encode("ascii"))
        request.write(body)
        request.finish()


class _TrackingChannel(http.HTTPChannel):
    """An HTTP connection that its site can find and drop (L{REFUSED}) and counts."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.site.channels.add(self)  # type: ignore[attr-defined]
        self.site.connectionsMade += 1  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.site.channels.discard(self)  # type: ignore[attr-defined]
        super().connectionLost(reason)


class FakeUserliSite(server.Site):
    """
    A quiet site that knows its open connections.

    @ivar connectionsMade: how many connections it accepted so far: with
        keep-alive, far fewer than the requests.
    """

    protocol = _TrackingChannel  # type: ignore[assignment]
    noisy = False

    def __init__(self, fake: FakeUserli, reactor: IReactorTime) -> None:
        super().__init__(FakeUserliResource(fake, reactor), reactor=reactor)
        self.channels: set[_TrackingChannel] = set()
        self.connectionsMade = 0

    def log(self, request: http.Request) -> None:
        """No access log: benchmarks send thousands of requests a second."""

    def dropConnections(self) -> None:
        """Abort every open connection, as a crashed server would."""
        for channel in list(self.channels):
            channel.transport.abortConnection()  # type: ignore[union-attr]


def private_reactor() -> Any:
    """
    A reactor instance that is not installed as the global one, for a
    server in a thread of the test process (this fake, the fake DNS of the
    tls_policy tests): the global reactor stays untouched for trial test
    cases.
    """
    try:
        from twisted.internet.epollreactor import EPollReactor

        return EPollReactor()
    except ImportError:  # pragma: no cover - not Linux
        from twisted.internet.pollreactor import PollReactor

        return PollReactor()


class FakeUserliServer:
    """
    The fake on a real TCP port, served by a private reactor in a thread.

    C{set_mode(REFUSED)} stops listening and drops open connections; any
    other mode listens again on the same port.

        fake = FakeUserliServer(UserliData(users={"a@x": "pw"}))
        fake.start()
        ... USERLI_BASE_URL=fake.url ...
        fake.set_mode(ERROR)
        assert fake.requests("alias") == []
        fake.stop()
    """

    def __init__(
        self,
        data: UserliData | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        latency: float = 0.0,
        tls: tuple[bytes, bytes] | None = None,
    ) -> None:
        self.fake = FakeUserli(data, latency=latency)
        # (certificate, key) as PEM: serve HTTPS with them.
        self.tls = tls
        self.fake.onModeChange = self._modeChanged
        self.host = host
        self.port = port
        self._reactor: Any = None
        self._thread: threading.Thread | None = None
        self._site: FakeUserliSite | None = None
        self._listening: IListeningPort | None = None

    @property
    def url(self) -> str:
        """The base URL to give the daemon as C{USERLI_BASE_URL}."""
        if self.tls is not None:
            # The name the certificate is for.
            return f"https://localhost:{self.port}"
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        """Start the reactor thread and listen."""
        self._reactor = private_reactor()
        self._site = FakeUserliSite(self.fake, self._reactor)
        self._thread = threading.Thread(
            target=self._reactor.run,
            kwargs={"installSignalHandlers": False},
            name="fake-userli",
            daemon=True,
        )
        self._thread.start()
        self._call(self._listen)

    def stop(self) -> None:
        """Stop listening, drop connections and end the reactor thread."""
        if self._thread is None:
            return
        self._call(self._unlisten)
        reactor: Any = self._reactor
        reactor.callFromThread(reactor.stop)
        self._thread.join(timeout=30)
        self._thread = None

    def _call(self, function: Callable[[], Any]) -> Any:
        return threads.blockingCallFromThread(self._reactor, function)

    def _listen(self) -> None:
        if self._listening is None:
            factory: Any = self._site
            if self.tls is not None:
                from twisted.internet.ssl import PrivateCertificate
                from twisted.protocols.tls import TLSMemoryBIOFactory

                certificate = PrivateCertificate.loadPEM(b"".join(self.tls))
                # Not listenSSL: its TLS layer would flush writes on the
                # global reactor, which does not run in this thread.
                factory = TLSMemoryBIOFactory(
                    certificate.options(), False, self._site, clock=self._reactor
                )
            self._listening = self._reactor.listenTCP(
                self.port, factory, backlog=1024, interface=self.host
            )
            self.port = self._listening.getHost().port  # type: ignore[union-attr]

    def _unlisten(self) -> Any:
        assert self._site is not None
        self._site.dropConnections()
        listening, self._listening = self._listening, None
        if listening is not None:
            return listening.stopListening()
        return None

    def _modeChanged(self, mode: str) -> None:
        if self._thread is None:
            return
        if mode == REFUSED:
            self._call(self._unlisten)
        else:
            self._call(self._listen)

    @property
    def connections(self) -> int:
        """How many connections the fake accepted so far (HTTPS: TLS connections)."""
        assert self._site is not None
        return self._site.connectionsMade

    # The state object's interface, for convenience.

    @property
    def data(self) -> UserliData:
        return self.fake.data

    def set_data(self, data: UserliData) -> None:
        self.fake.set_data(data)

    def set_mode(self, mode: str, delay: float = 0.0) -> None:
        self.fake.set_mode(mode, delay)

    def requests(self, endpoint: str | None = None) -> list[ReceivedRequest]:
        return self.fake.requests(endpoint)

    def clear(self) -> None:
        self.fake.clear()

    def __enter__(self) -> FakeUserliServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def main(argv: Iterable[str] | None = None) -> None:
    """Run the fake as a standalone process on the global reactor."""
    parser = argparse.ArgumentParser(description="A fake Userli API server for tests")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: pick a free port")
    parser.add_argument(
        "--latency", type=float, default=0.0, help="seconds every answer is held back"
    )
    parser.add_argument("--data", help="JSON file with users, aliases, domains, quotas, ...")
    parser.add_argument("--mode", choices=[m for m in MODES if m != REFUSED], default=NORMAL)
    parser.add_argument("--delay", type=float, default=0.0, help="extra hold-back in slow mode")
    args = parser.parse_args(list(argv) if argv is not None else None)

    from twisted.internet import reactor as installed

    # The installed reactor, typed as the module attribute it is not.
    reactor: Any = installed
    data = None
    if args.data:
        with open(args.data, encoding="utf-8") as f:
            data = UserliData.from_json(json.load(f))
    # Nobody can read the requests of a standalone fake: do not keep them.
    fake = FakeUserli(data, latency=args.latency, keep_requests=False)
    fake.set_mode(args.mode, args.delay)
    site = FakeUserliSite(fake, reactor)
    port = reactor.listenTCP(args.port, site, backlog=1024, interface=args.host)
    print(f"listening on http://{args.host}:{port.getHost().port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
