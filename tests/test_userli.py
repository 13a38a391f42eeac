"""
Tests for L{userli_postfix.userli}: the API client.

Every answer goes through a real C{twisted.web} resource in memory
(C{StubTreq}); hangs and refused connections use a fake request callable and
a L{Clock}, and the deadline and the body limit are checked once more
through the daemon's own HTTP stack (treq, Agent and its pool) on a
L{MemoryReactorClock}.  The client must turn everything that is not a
documented answer into L{UserliError}, and never let a key reach another
route.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ConnectionRefusedError, DNSLookupError
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from userli_postfix import __version__
from userli_postfix.httpclient import makeHTTPClient
from userli_postfix.metrics import Metrics
from userli_postfix.userli import MAX_BODY, AuthResult, Quota, UserliClient, UserliError

BASE = "http://userli.test"
TOKEN = "api-token-1234"


@dataclass(frozen=True)
class Seen:
    """One request as the fake Userli received it."""

    method: bytes
    uri: bytes
    postpath: list[bytes]
    headers: Headers
    body: bytes


class ScriptedUserli(Resource):
    """
    Answers every request with the status, headers and body the test set,
    and records what it received.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.status = 200
        self.body = b"[]"
        self.headers: dict[bytes, bytes] = {b"Content-Type": b"application/json"}
        self.finish = True
        self.seen: list[Seen] = []
        self.pending: list[Request] = []

    def answer(self, status: int, value: Any = None, body: bytes | None = None) -> None:
        """Answer C{status} with C{value} as JSON, or with the raw C{body}."""
        self.status = status
        self.body = body if body is not None else json.dumps(value).encode("utf-8")

    def render(self, request: Request) -> bytes | int:
        assert request.content is not None
        self.seen.append(
            Seen(
                method=request.method,
                uri=request.uri,
                postpath=list(request.postpath or []),
                headers=request.requestHeaders,
                body=request.content.read(),
            )
        )
        request.setResponseCode(self.status)
        for name, value in self.headers.items():
            request.setHeader(name, value)
        if not self.finish:
            # Headers and the first bytes go out; the rest never comes.
            request.write(self.body[:1])
            self.pending.append(request)
            return NOT_DONE_YET
        return self.body


class ClientTestCase(SynchronousTestCase):
    """Builds a client over L{ScriptedUserli}, a fresh registry and a L{Clock}."""

    def setUp(self) -> None:
        self.userli = ScriptedUserli()
        self.stub = StubTreq(self.userli)
        self.clock = Clock()
        self.metrics = Metrics(process=False)
        self.client = UserliClient(self.stub.request, BASE, TOKEN, self.clock, self.metrics)

    def settle(self, d: defer.Deferred[Any]) -> defer.Deferred[Any]:
        """Let the in-memory HTTP exchange run to its end."""
        self.stub.flush()
        return d

    def succeed(self, d: defer.Deferred[Any]) -> Any:
        return self.successResultOf(self.settle(d))

    def failing(self, d: defer.Deferred[Any]) -> UserliError:
        failure = self.failureResultOf(self.settle(d), UserliError)
        assert isinstance(failure.value, UserliError)
        return failure.value

    def requests(self, endpoint: str, status_code: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "userli_postfix_adapter_http_client_requests_total",
            {"endpoint": endpoint, "status_code": status_code},
        )
        return value or 0.0

    def durations(self, endpoint: str, status_code: str) -> tuple[float, float]:
        labels = {"endpoint": endpoint, "status_code": status_code}
        registry = self.metrics.registry
        count = registry.get_sample_value(
            "userli_postfix_adapter_http_client_duration_seconds_count", labels
        )
        total = registry.get_sample_value(
            "userli_postfix_adapter_http_client_duration_seconds_sum", labels
        )
        return (count or 0.0, total or 0.0)


class RequestTests(ClientTestCase):
    """What goes over the wire."""

    def test_urls(self) -> None:
        """Each lookup goes to its documented path with a GET."""
        self.userli.answer(200, [])
        self.succeed(self.client.alias("a@example.org"))
        self.succeed(self.client.senders("a@example.org"))
        self.userli.answer(200, True)
        self.succeed(self.client.domain("example.org"))
        self.succeed(self.client.mailbox("a@example.org"))
        self.userli.answer(200, {"per_hour": 1, "per_day": 2})
        self.succeed(self.client.smtp_quota("a@example.org"))
        self.assertEqual(
            [(s.method, s.uri) for s in self.userli.seen],
            [
                (b"GET", b"/api/postfix/alias/a@example.org"),
                (b"GET", b"/api/postfix/senders/a@example.org"),
                (b"GET", b"/api/postfix/domain/example.org"),
                (b"GET", b"/api/postfix/mailbox/a@example.org"),
                (b"GET", b"/api/postfix/smtp_quota/a@example.org"),
            ],
        )

    def test_base_url_with_path(self) -> None:
        """A base URL with a path prefix (Userli behind a sub-path) keeps it."""
        client = UserliClient(self.stub.request, BASE + "/userli/", TOKEN, self.clock, self.metrics)
        self.userli.answer(200, True)
        self.succeed(client.domain("example.org"))
        self.assertEqual(self.userli.seen[0].uri, b"/userli/api/postfix/domain/example.org")

    def test_headers(self) -> None:
        """Every request carries the Bearer token, asks for JSON and names the daemon."""
        self.userli.answer(200, True)
        self.succeed(self.client.domain("example.org"))
        headers = self.userli.seen[0].headers
        self.assertEqual(headers.getRawHeaders(b"Authorization"), [b"Bearer " + TOKEN.encode()])
        self.assertEqual(headers.getRawHeaders(b"Accept"), [b"application/json"])
        self.assertEqual(
            headers.getRawHeaders(b"User-Agent"), [f"userli-postfix/{__version__}".encode()]
        )

    def test_auth_request(self) -> None:
        """A login is a JSON POST of email and password, with the same headers."""
        self.userli.answer(200, {"message": "success"})
        self.succeed(self.client.auth("a@example.org", 'pä"ss\nword'))
        seen = self.userli.seen[0]
        self.assertEqual((seen.method, seen.uri), (b"POST", b"/api/postfix/auth"))
        self.assertEqual(
            json.loads(seen.body), {"email": "a@example.org", "password": 'pä"ss\nword'}
        )
        self.assertEqual(seen.headers.getRawHeaders(b"Content-Type"), [b"application/json"])
        self.assertEqual(
            seen.headers.getRawHeaders(b"Authorization"), [b"Bearer " + TOKEN.encode()]
        )
        self.assertEqual(seen.headers.getRawHeaders(b"Accept"), [b"application/json"])

    def test_one_path_segment(self) -> None:
        """
        Whatever the key holds, it arrives as exactly one path segment of the
        endpoint that was meant, decoded back to the key itself: C{/}, C{?},
        C{#}, C{%}, spaces, control and non-ASCII characters are encoded.
        """
        self.userli.answer(200, True)
        keys = [
            "a/b@example.org",
            "../domain/example.org",
            "x/../../auth",
            "a?b=c",
            "a#frag",
            "100%",
            "%2e%2e",
            "%2F",
            "a b",
            "a\x00b\r\nc",
            "bücher.de",
            "a;b=c",
            "[::1]",
            "a\\b",
        ]
        for key in keys:
            self.succeed(self.client.domain(key))
            seen = self.userli.seen[-1]
            self.assertEqual(
                seen.postpath, [b"api", b"postfix", b"domain", key.encode("utf-8")], repr(key)
            )
            raw = seen.uri.removeprefix(b"/api/postfix/domain/")
            for char in b"/?# \\":
                self.assertNotIn(char, raw, repr(key))

    def test_non_ascii_encoded(self) -> None:
        """Non-ASCII keys are sent as percent-encoded UTF-8."""
        self.userli.answer(200, True)
        self.succeed(self.client.domain("bücher.de"))
        self.assertEqual(self.userli.seen[0].uri, b"/api/postfix/domain/b%C3%BCcher.de")

    def test_dot_segments_refused(self) -> None:
        """
        C{.}, C{..} and the empty key cannot be encoded as a segment that
        servers and proxies leave alone (they resolve dot segments, and an
        empty segment names the parent route), so they fail without a request.
        """
        for key in ["", ".", ".."]:
            for call in (
                self.client.alias,
                self.client.senders,
                self.client.domain,
                self.client.mailbox,
                self.client.smtp_quota,
            ):
                self.failing(call(key))
        self.assertEqual(self.userli.seen, [])

    def test_redirect_not_followed(self) -> None:
        """
        A redirect (a proxy's login page) is a failure, and is not followed: the
        token must not be sent on to wherever it points.
        """
        self.userli.headers[b"Location"] = b"http://elsewhere.test/login"
        self.userli.answer(302, body=b"<html>Found</html>")
        self.failing(self.client.domain("example.org"))
        self.userli.answer(302, body=b"true")
        self.failing(self.client.domain("example.org"))
        self.assertEqual(len(self.userli.seen), 2)
        self.assertEqual(self.requests("domain", "302"), 2)


class ValidationTests(ClientTestCase):
    """Only documented answers become data."""

    def test_alias_and_senders(self) -> None:
        """A 200 JSON list of address strings is the answer; C{[]} means none."""
        for method in (self.client.alias, self.client.senders):
            self.userli.answer(200, ["a@example.org", "b@example.org"])
            self.assertEqual(
                self.succeed(method("x@example.org")), ["a@example.org", "b@example.org"]
            )
            self.userli.answer(200, [])
            self.assertEqual(self.succeed(method("x@example.org")), [])

    def test_list_wrong_types(self) -> None:
        """
        Anything but a list of non-empty strings free of separators and control
        characters is refused: it would corrupt a socketmap reply.
        """
        for value in [
            True,
            None,
            "a@example.org",
            {"a@example.org": 1},
            0,
            [1],
            [None],
            [""],
            ["a@example.org", 2],
            [["a@example.org"]],
            ["a@example.org,b@example.org"],
            ["a@example.org b@example.org"],
            ["a@example.org\r\n"],
            ["a\x00@example.org"],
        ]:
            for method in (self.client.alias, self.client.senders):
                self.userli.answer(200, value)
                self.failing(method("x@example.org"))

    def test_domain_and_mailbox(self) -> None:
        """A 200 JSON boolean is the answer."""
        for method in (self.client.domain, self.client.mailbox):
            for value in (True, False):
                self.userli.answer(200, value)
                self.assertIs(self.succeed(method("example.org")), value)

    def test_boolean_wrong_types(self) -> None:
        """Truthy values that are not C{true} (C{1}, C{"true"}, C{[true]}) are refused."""
        for value in [1, 0, "true", "false", None, [True], {"exists": True}, []]:
            for method in (self.client.domain, self.client.mailbox):
                self.userli.answer(200, value)
                self.failing(method("example.org"))

    def test_quota(self) -> None:
        """A 200 object of two non-negative integers is the quota; zeros mean unlimited."""
        self.userli.answer(200, {"per_hour": 10, "per_day": 100})
        quota = self.succeed(self.client.smtp_quota("a@example.org"))
        self.assertEqual(quota, Quota(per_hour=10, per_day=100))
        self.assertFalse(quota.unlimited)
        self.userli.answer(200, {"per_hour": 0, "per_day": 0, "extra": "ignored"})
        quota = self.succeed(self.client.smtp_quota("a@example.org"))
        self.assertEqual(quota, Quota(per_hour=0, per_day=0))
        self.assertTrue(quota.unlimited)

    def test_quota_wrong_types(self) -> None:
        """Missing fields, negative numbers, floats, strings and booleans are refused."""
        for value in [
            [],
            None,
            10,
            {},
            {"per_hour": 10},
            {"per_day": 10},
            {"per_hour": -1, "per_day": 10},
            {"per_hour": 1.5, "per_day": 10},
            {"per_hour": "10", "per_day": 10},
            {"per_hour": True, "per_day": 10},
            {"per_hour": 10, "per_day": None},
        ]:
            self.userli.answer(200, value)
            self.failing(self.client.smtp_quota("a@example.org"))

    def test_quota_not_found(self) -> None:
        """The documented 404 C{{"error": ...}} means Userli does not know the sender."""
        self.userli.answer(404, {"error": "User not found"})
        self.assertIsNone(self.succeed(self.client.smtp_quota("a@example.org")))
        self.assertEqual(self.requests("smtp_quota", "404"), 1)

    def test_quota_other_404(self) -> None:
        """A 404 that is not Userli's (a proxy's HTML page, Symfony's route miss) is a failure."""
        self.userli.answer(404, body=b"<html><body>Not Found</body></html>")
        self.failing(self.client.smtp_quota("a@example.org"))
        self.userli.answer(
            404, {"title": "An error occurred", "status": 404, "detail": "No route found"}
        )
        self.failing(self.client.smtp_quota("a@example.org"))

    def test_404_only_for_quota(self) -> None:
        """For every other endpoint a 404, even with Userli's body, is a failure."""
        self.userli.answer(404, {"error": "User not found"})
        for method in (
            self.client.alias,
            self.client.senders,
            self.client.domain,
            self.client.mailbox,
        ):
            self.failing(method("a@example.org"))

    def test_error_statuses(self) -> None:
        """
        401, 403, 500 and 502 are failures even when their body would decode
        as data of the right type: the Go program's mistake, not repeated.
        """
        bodies = [
            [],
            True,
            {"per_hour": 0, "per_day": 0},
            {"error": "Invalid API token"},
            {"type": "about:blank", "title": "An error occurred", "status": 403},
        ]
        for status in (401, 403, 500, 502, 503):
            for value in bodies:
                self.userli.answer(status, value)
                self.failing(self.client.alias("a@example.org"))
                self.failing(self.client.senders("a@example.org"))
                self.failing(self.client.domain("example.org"))
                self.failing(self.client.mailbox("a@example.org"))
                self.failing(self.client.smtp_quota("a@example.org"))

    def test_not_json(self) -> None:
        """An HTML page, an empty body or truncated JSON on a 200 is a failure."""
        for body in [
            b"<!DOCTYPE html><html><body>Maintenance</body></html>",
            b"",
            b"[",
            b"tru",
            b"\xff\xfe",
        ]:
            self.userli.headers[b"Content-Type"] = b"text/html"
            self.userli.answer(200, body=body)
            self.failing(self.client.alias("a@example.org"))
            self.failing(self.client.domain("example.org"))
            self.failing(self.client.smtp_quota("a@example.org"))
            self.failing(self.client.auth("a@example.org", "pw"))

    def test_body_too_large(self) -> None:
        """A body beyond L{MAX_BODY} is a failure, not buffered without bound."""
        self.userli.answer(200, body=b"[" + b" " * MAX_BODY + b"]")
        self.failing(self.client.alias("a@example.org"))


class AuthTests(ClientTestCase):
    """Logins: only an explicit success logs anybody in."""

    def test_success(self) -> None:
        """200 with C{{"message": "success"}} is the only success."""
        self.userli.answer(200, {"message": "success"})
        self.assertEqual(self.succeed(self.client.auth("a@example.org", "pw")), AuthResult(ok=True))

    def test_200_without_success(self) -> None:
        """
        A 200 with any other body (empty, HTML, another message, a bare
        C{true}) is a failure, never a login: the Go program logged these in.
        """
        for body in [
            b"",
            b"<html>OK</html>",
            b"{}",
            b"true",
            b'"success"',
            b'{"message": "Success"}',
            b'{"message": "failed"}',
            b'{"status": "success"}',
            b'[{"message": "success"}]',
        ]:
            self.userli.answer(200, body=body)
            self.failing(self.client.auth("a@example.org", "pw"))

    def test_refusals(self) -> None:
        """The documented 401 and 403 answers are refusals that carry Userli's message."""
        for status, message in [
            (401, "authentication failed"),
            (403, "user disabled due to spam role"),
            (403, "user password change required"),
        ]:
            self.userli.answer(status, {"message": message})
            self.assertEqual(
                self.succeed(self.client.auth("a@example.org", "pw")),
                AuthResult(ok=False, message=message),
            )

    def test_bad_token(self) -> None:
        """
        A 401 for our token (C{{"error": ...}}) or the 403 of a token without
        the postfix scope is a failure of the API, not a wrong password.
        """
        for status, value in [
            (401, {"error": "Invalid API token"}),
            (401, {"error": "No API token provided"}),
            (403, {"type": "about:blank", "title": "An error occurred", "detail": "Denied"}),
        ]:
            self.userli.answer(status, value)
            self.failing(self.client.auth("a@example.org", "pw"))
        self.flushLoggedErrors()

    def test_other_statuses(self) -> None:
        """A 422 (blank field), 500 or 302 is a failure."""
        for status, value in [
            (422, {"message": "email: This value should not be blank."}),
            (500, {"message": "success"}),
            (302, {"message": "success"}),
        ]:
            self.userli.answer(status, value)
            self.failing(self.client.auth("a@example.org", "pw"))


class FailureModeTests(SynchronousTestCase):
    """Timeouts and transport failures, with a fake request callable and a L{Clock}."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.metrics = Metrics(process=False)
        self.calls: list[tuple[str, str]] = []
        self.result: defer.Deferred[Any] | None = None

    def request(self, method: str, url: str, **kwargs: Any) -> defer.Deferred[Any]:
        """Answer with C{self.result} when set, else with a request that never answers."""
        self.calls.append((method, url))
        return self.result if self.result is not None else defer.Deferred()

    def client(self, timeout: float = 5.0) -> UserliClient:
        return UserliClient(self.request, BASE, TOKEN, self.clock, self.metrics, timeout=timeout)

    def requests(self, endpoint: str, status_code: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "userli_postfix_adapter_http_client_requests_total",
            {"endpoint": endpoint, "status_code": status_code},
        )
        return value or 0.0

    def test_no_answer(self) -> None:
        """A request that never answers fails after 5 s, not before."""
        d = self.client().domain("example.org")
        self.clock.advance(4.999)
        self.assertNoResult(d)
        self.clock.advance(0.001)
        failure = self.failureResultOf(d, UserliError)
        self.assertIn("5 s", str(failure.value))
        self.assertEqual(self.requests("domain", "error"), 1)

    def test_cancelled_on_timeout(self) -> None:
        """The hanging request itself is cancelled, so its connection is given up."""
        cancelled: list[bool] = []
        self.result = defer.Deferred(lambda d: cancelled.append(True))
        d = self.client().alias("a@example.org")
        self.clock.advance(5)
        self.failureResultOf(d, UserliError)
        self.assertEqual(cancelled, [True])

    def test_custom_timeout(self) -> None:
        """A shorter deadline (the readiness check's 2 s) is honoured."""
        d = self.client().domain("health-check.invalid", timeout=2.0)
        self.clock.advance(1.999)
        self.assertNoResult(d)
        self.clock.advance(0.001)
        failure = self.failureResultOf(d, UserliError)
        self.assertIn("2 s", str(failure.value))

    def test_every_endpoint_bounded(self) -> None:
        """Every endpoint, the login included, has the deadline."""
        client = self.client()
        calls = [
            client.alias("a@example.org"),
            client.senders("a@example.org"),
            client.domain("example.org"),
            client.mailbox("a@example.org"),
            client.smtp_quota("a@example.org"),
            client.auth("a@example.org", "pw"),
        ]
        self.clock.advance(5)
        for d in calls:
            self.failureResultOf(d, UserliError)
        for endpoint in ("alias", "senders", "domain", "mailbox", "smtp_quota", "auth"):
            self.assertEqual(self.requests(endpoint, "error"), 1, endpoint)

    def test_connection_refused(self) -> None:
        """A refused connection is a L{UserliError}, labelled C{error}."""
        self.result = defer.fail(ConnectionRefusedError("127.0.0.1", 8000))
        failure = self.failureResultOf(self.client().mailbox("a@example.org"), UserliError)
        self.assertIn("ConnectionRefusedError", str(failure.value))
        self.assertEqual(self.requests("mailbox", "error"), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_dns_failure(self) -> None:
        """A name that does not resolve is a L{UserliError} too."""
        self.result = defer.fail(DNSLookupError("userli.test"))
        self.failureResultOf(self.client().alias("a@example.org"), UserliError)

    def test_body_never_finishes(self) -> None:
        """
        Headers that arrive in time do not extend the deadline: a body that
        trickles and never ends fails at 5 s, and its connection is aborted.
        """
        response = HangingResponse(200)
        self.result = defer.succeed(response)
        d = self.client().alias("a@example.org")
        self.clock.advance(3)
        response.send(b"[")
        self.clock.advance(1.5)
        response.send(b'"a@example.org"')
        self.assertNoResult(d)
        self.clock.advance(0.5)
        self.failureResultOf(d, UserliError)
        self.assertTrue(response.transport.disconnected)
        self.assertEqual(self.requests("alias", "200"), 1)

    def test_body_lost(self) -> None:
        """A connection that breaks in the middle of the body is a failure."""
        response = HangingResponse(200)
        self.result = defer.succeed(response)
        d = self.client().alias("a@example.org")
        response.send(b'["a@example.org"')
        response.lose(ConnectionRefusedError())
        self.failureResultOf(d, UserliError)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_timer_cancelled_on_answer(self) -> None:
        """An answer in time leaves no timer behind."""
        response = HangingResponse(200)
        self.result = defer.succeed(response)
        d = self.client().domain("example.org")
        response.send(b"true")
        response.finish()
        self.assertIs(self.successResultOf(d), True)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_duration_observed(self) -> None:
        """The duration histogram sees the time the call took on the clock."""
        response = HangingResponse(200)
        self.result = defer.succeed(response)
        d = self.client().domain("example.org")
        self.clock.advance(0.25)
        response.send(b"true")
        response.finish()
        self.successResultOf(d)
        labels = {"endpoint": "domain", "status_code": "200"}
        registry = self.metrics.registry
        self.assertEqual(
            registry.get_sample_value(
                "userli_postfix_adapter_http_client_duration_seconds_sum", labels
            ),
            0.25,
        )

    def test_token_not_in_repr(self) -> None:
        """The API token appears in no repr, so it cannot leak into a log line."""
        client = self.client()
        self.assertNotIn(TOKEN, repr(client))
        self.assertNotIn(TOKEN, str(client))

    def test_token_not_in_errors(self) -> None:
        """Failure messages do not carry the token either."""
        self.result = defer.fail(ConnectionRefusedError("127.0.0.1", 8000))
        failure = self.failureResultOf(self.client().auth("a@example.org", "pw"), UserliError)
        self.assertNotIn(TOKEN, str(failure.value))
        self.assertNotIn("pw", str(failure.value))


class HangingResponse:
    """
    An C{IResponse} whose body the test feeds by hand, to model a server
    that sends headers and then stalls.
    """

    def __init__(self, code: int) -> None:
        self.code = code
        self.headers = Headers()
        self.length = None
        self.transport = StringTransport()
        self.protocol: Protocol | None = None

    def deliverBody(self, protocol: Protocol) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        assert self.protocol is not None
        self.protocol.dataReceived(data)

    def finish(self) -> None:
        assert self.protocol is not None
        self.protocol.connectionLost(Failure(ResponseDone()))

    def lose(self, exception: Exception) -> None:
        assert self.protocol is not None
        self.protocol.connectionLost(Failure(exception))


class MetricsTests(ClientTestCase):
    """Each call is counted by endpoint and HTTP status (or C{error}), never by key."""

    def test_labels(self) -> None:
        """The status label is the HTTP code of the answer, whatever its body."""
        self.userli.answer(200, True)
        self.succeed(self.client.domain("example.org"))
        self.userli.answer(500, body=b"<html>oops</html>")
        self.failing(self.client.domain("example.org"))
        self.userli.answer(401, {"message": "authentication failed"})
        self.succeed(self.client.auth("a@example.org", "pw"))
        self.assertEqual(self.requests("domain", "200"), 1)
        self.assertEqual(self.requests("domain", "500"), 1)
        self.assertEqual(self.requests("auth", "401"), 1)
        self.assertEqual(self.durations("domain", "200")[0], 1)

    def test_no_address_in_labels(self) -> None:
        """No label value ever holds the key that was looked up."""
        self.userli.answer(200, [])
        self.succeed(self.client.alias("secret-person@example.org"))
        for family in self.metrics.registry.collect():
            for sample in family.samples:
                for value in sample.labels.values():
                    self.assertNotIn("secret-person", value)
                    self.assertNotIn("example.org", value)


class TokenRefusalTests(ClientTestCase):
    """A 401/403 for our token is said once, in words an admin can act on."""

    def setUp(self) -> None:
        super().setUp()
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def errors(self) -> list[str]:
        """The error-level messages logged so far."""
        return [formatEvent(e) for e in self.events if e.get("log_level") == LogLevel.error]

    def test_wrong_token_once(self) -> None:
        """Many lookups refused with 401 log one error naming USERLI_TOKEN, not one each."""
        self.userli.answer(401, {"error": "Invalid API token"})
        for _ in range(5):
            self.failing(self.client.alias("a@example.org"))
        self.failing(self.client.auth("a@example.org", "pw"))
        (message,) = self.errors()
        self.assertIn("HTTP 401", message)
        self.assertIn("USERLI_TOKEN is wrong", message)
        self.assertNotIn(TOKEN, message)

    def test_missing_scope_once(self) -> None:
        """A 403 (Symfony's body, or none at all) names the missing postfix scope, once."""
        self.userli.answer(403, {"type": "about:blank", "title": "An error occurred"})
        self.failing(self.client.domain("example.org"))
        self.userli.answer(403, body=b"<html>Access Denied</html>")
        self.failing(self.client.mailbox("a@example.org"))
        (message,) = self.errors()
        self.assertIn("HTTP 403", message)
        self.assertIn("'postfix' scope", message)

    def test_login_refusals_are_not_token_errors(self) -> None:
        """A user's refused login (401/403 with Userli's message) says nothing about the token."""
        self.userli.answer(401, {"message": "authentication failed"})
        self.succeed(self.client.auth("a@example.org", "pw"))
        self.userli.answer(403, {"message": "user disabled due to spam role"})
        self.succeed(self.client.auth("a@example.org", "pw"))
        self.assertEqual(self.errors(), [])

    def test_said_again_after_recovery(self) -> None:
        """Once an answer shows the token working, a new refusal is logged again."""
        self.userli.answer(401, {"error": "Invalid API token"})
        self.failing(self.client.alias("a@example.org"))
        self.userli.answer(200, [])
        self.succeed(self.client.alias("a@example.org"))
        self.userli.answer(401, {"error": "Invalid API token"})
        self.failing(self.client.alias("a@example.org"))
        self.failing(self.client.alias("a@example.org"))
        self.assertEqual(len(self.errors()), 2)


class OverAgentTests(SynchronousTestCase):
    """
    The deadline and the body limit through the daemon's real HTTP stack
    (treq, Agent and its pool, see L{makeHTTPClient}) on a
    L{MemoryReactorClock}; the test plays Userli on the connection.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.metrics = Metrics(process=False)
        http, self.pool = makeHTTPClient(self.reactor)
        self.client = UserliClient(
            http.request, "http://127.0.0.1:8000", TOKEN, self.reactor, self.metrics
        )
        self.transport = StringTransport()
        self.protocol: Any = None

    def connect(self) -> None:
        """Let the pending connection attempt succeed."""
        factory = self.reactor.tcpClients[-1][2]
        self.protocol = factory.buildProtocol(None)
        self.protocol.makeConnection(self.transport)

    def head(self, length: int) -> bytes:
        """The status line and headers of a 200 with a body of C{length} bytes."""
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % length

    def test_answer(self) -> None:
        """A whole answer is read and decoded; the request carried the token."""
        d = self.client.alias("a@example.org")
        self.connect()
        self.assertIn(b"GET /api/postfix/alias/a@example.org HTTP/1.1\r\n", self.transport.value())
        self.assertIn(b"Authorization: Bearer " + TOKEN.encode(), self.transport.value())
        self.protocol.dataReceived(self.head(17) + b'["b@example.org"]')
        self.assertEqual(self.successResultOf(d), ["b@example.org"])

    def test_connect_deadline(self) -> None:
        """A connection that never comes up fails at the deadline and is given up."""
        d = self.client.domain("example.org")
        self.reactor.advance(4.9)
        self.assertNoResult(d)
        self.reactor.advance(0.1)
        self.assertIn("5 s", str(self.failureResultOf(d, UserliError).value))
        self.assertTrue(self.reactor.connectors[-1].stoppedConnecting)

    def test_headers_deadline(self) -> None:
        """A request whose answer never starts fails at the deadline; the connection is cut."""
        d = self.client.domain("example.org")
        self.connect()
        self.reactor.advance(5)
        self.failureResultOf(d, UserliError)
        self.assertTrue(self.transport.disconnecting)

    def test_body_deadline(self) -> None:
        """Headers in time do not extend the deadline: a stalled body fails at 5 s, cut."""
        d = self.client.alias("a@example.org")
        self.connect()
        self.reactor.advance(3)
        self.protocol.dataReceived(self.head(17) + b'["b@ex')
        self.reactor.advance(1.9)
        self.assertNoResult(d)
        self.reactor.advance(0.1)
        self.failureResultOf(d, UserliError)
        self.assertTrue(self.transport.disconnecting)

    def test_body_too_large(self) -> None:
        """A body beyond L{MAX_BODY} fails as soon as it is exceeded; the connection is cut."""
        d = self.client.alias("a@example.org")
        self.connect()
        self.protocol.dataReceived(self.head(MAX_BODY + 2) + b"[" + b" " * (MAX_BODY // 2))
        self.assertNoResult(d)
        self.protocol.dataReceived(b" " * (MAX_BODY // 2 + 1))
        self.assertIn("too large", str(self.failureResultOf(d, UserliError).value))
        self.assertTrue(self.transport.disconnecting)

    def test_not_http(self) -> None:
        """An answer that is not HTTP is a L{UserliError}."""
        d = self.client.mailbox("a@example.org")
        self.connect()
        self.protocol.dataReceived(b"SSH-2.0-OpenSSH\r\n\r\n")
        self.failureResultOf(d, UserliError)

    def test_body_lost(self) -> None:
        """A connection lost in the middle of the body is a L{UserliError}."""
        d = self.client.alias("a@example.org")
        self.connect()
        self.protocol.dataReceived(self.head(17) + b'["b@ex')
        self.protocol.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(d, UserliError)

    def test_redirect_not_followed(self) -> None:
        """A redirect is a failure; nothing is sent to where it points."""
        d = self.client.domain("example.org")
        self.connect()
        self.protocol.dataReceived(
            b"HTTP/1.1 302 Found\r\nLocation: http://elsewhere.test/\r\nContent-Length: 0\r\n\r\n"
        )
        self.failureResultOf(d, UserliError)
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.assertEqual(self.transport.value().count(b"GET "), 1)
