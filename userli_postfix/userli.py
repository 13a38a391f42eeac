"""
The Userli API client: the one place that knows the API.

Every call has one deadline that covers connecting, the headers and the
body; the HTTP status is checked and the JSON shape validated before
anything becomes data.  Whatever is not a documented answer raises
L{UserliError}, which callers turn into their fail-open or fail-closed
answer.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar
from urllib.parse import quote

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from userli_postfix import __version__
from userli_postfix.breaker import Attempt, CircuitBreaker, unanswered
from userli_postfix.config import API_TIMEOUT
from userli_postfix.deadlines import answerWithin
from userli_postfix.metrics import Metrics, increments, observations

log = Logger()

T = TypeVar("T")

# Userli's answers are a few hundred bytes; anything far larger is a broken
# deployment, not data, and must not be buffered without bound.
MAX_BODY = 1024 * 1024


# What a 401 or 403 that is not a documented login refusal means (see the
# API reference): Userli answers so for every request of this token.
TOKEN_REFUSALS = {
    "401": (
        "The Userli API refused the token (HTTP {status}): USERLI_TOKEN is wrong or "
        "unknown to Userli; every lookup fails until it is fixed"
    ),
    "403": (
        "The Userli API refused the token (HTTP {status}): it lacks the 'postfix' scope "
        "(create one with: bin/console app:api-token:create --name postfix --scopes postfix); "
        "every lookup fails until it is fixed"
    ),
}


class UserliError(Exception):
    """The API gave no usable answer (timeout, refused, bad status or body)."""


class NoAnswer(UserliError):
    """The deadline passed before the API answered (what the breaker counts)."""


class CircuitOpen(UserliError):
    """Not asked: the API has stopped answering (see L{userli_postfix.breaker})."""


@dataclass(frozen=True)
class Quota:
    """A sender's limits; 0 means unlimited."""

    per_hour: int
    per_day: int

    @property
    def unlimited(self) -> bool:
        return self.per_hour == 0 and self.per_day == 0


@dataclass(frozen=True)
class AuthResult:
    """The API's verdict on a login: C{ok}, or refused with its C{message}."""

    ok: bool
    message: str = ""


class _BodyReader(Protocol):
    """
    Collects a response body up to L{MAX_BODY}; aborts beyond it.
    C{finished} fires with the body; cancelling it aborts the connection.
    """

    def __init__(self) -> None:
        self.finished: defer.Deferred[bytes] = defer.Deferred(self._cancel)
        self.parts: list[bytes] = []
        self.size = 0

    def _cancel(self, finished: defer.Deferred[bytes]) -> None:
        self.abort()

    def dataReceived(self, data: bytes) -> None:
        if self.finished.called:
            return
        self.size += len(data)
        if self.size > MAX_BODY:
            self.finished.errback(UserliError("response body too large"))
            self.abort()
            return
        self.parts.append(data)

    def abort(self) -> None:
        # Agent hands a body protocol a proxy of the connection that can
        # close it but not abort it; either way the connection, with its
        # unread rest, is never reused.
        for name in ("abortConnection", "loseConnection", "stopProducing"):
            close = getattr(self.transport, name, None)
            if close is not None:
                close()
                return

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        if self.finished.called:
            return
        # isinstance, not Failure.check: the same test without spelling out
        # the qualified name of every class in the exception's ancestry.
        if isinstance(reason.value, (ResponseDone, PotentialDataLoss)):
            self.finished.callback(b"".join(self.parts))
        else:
            self.finished.errback(UserliError(f"response body lost: {reason.value}"))


def _address_list(value: Any) -> list[str]:
    """A JSON list of address strings that a socketmap reply can carry."""
    if not isinstance(value, list):
        raise UserliError(f"expected a list, got {type(value).__name__}")
    for item in value:
        if not isinstance(item, str) or not item:
            raise UserliError("list element is not a non-empty string")
        if "," in item or any(ord(c) < 33 or ord(c) == 127 for c in item):
            raise UserliError("list element contains a separator or control character")
    return value


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise UserliError(f"expected true or false, got {type(value).__name__}")
    return value


def _quota(value: Any) -> Quota:
    if not isinstance(value, dict):
        raise UserliError("quota is not a JSON object")
    limits = []
    for name in ("per_hour", "per_day"):
        limit = value.get(name)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise UserliError(f"quota field {name} is not a non-negative integer")
        limits.append(limit)
    return Quota(per_hour=limits[0], per_day=limits[1])


def _ok_only(parse: Callable[[Any], T]) -> Callable[[int, Any], T]:
    """The answer of an endpoint whose only answer is a 200 with what C{parse} reads."""

    def ok_only(code: int, value: Any) -> T:
        if code != 200:
            raise UserliError(f"HTTP {code}")
        return parse(value)

    return ok_only


_ADDRESSES = _ok_only(_address_list)
_BOOLEAN = _ok_only(_boolean)


def _quota_answer(code: int, value: Any) -> Quota | None:
    """A quota; C{None} for the 404 of an address Userli does not know."""
    if code == 404 and isinstance(value, dict) and "error" in value:
        return None
    if code != 200:
        raise UserliError(f"HTTP {code}")
    return _quota(value)


def _auth_answer(code: int, value: Any) -> AuthResult:
    """A login's verdict: a 200 with the success message, or a documented refusal."""
    message = value.get("message") if isinstance(value, dict) else None
    if code == 200:
        if message == "success":
            return AuthResult(ok=True)
        raise UserliError("HTTP 200 without the success message")
    if code in (401, 403) and isinstance(message, str):
        return AuthResult(ok=False, message=message)
    raise UserliError(f"HTTP {code}")


@dataclass(slots=True)
class _Exchange:
    """
    One API call on its way, as its steps share it: C{status} is the HTTP
    status once the headers are in (the metric label), C{"error"} until
    then and when none came.
    """

    endpoint: str
    attempt: Attempt
    deadline: float
    started: float
    status: str = "error"


def _checked(
    response: IResponse, exchange: _Exchange, parse: Callable[[int, Any], T]
) -> defer.Deferred[T]:
    """The status noted, then the body read (bounded) and handed to L{_decoded}."""
    code = response.code
    exchange.status = str(code)
    reader = _BodyReader()
    response.deliverBody(reader)
    return reader.finished.addCallback(_decoded, code, parse)


def _decoded(data: bytes, code: int, parse: Callable[[int, Any], T]) -> T:
    """The body as JSON, then as the endpoint's answer for this status (C{parse})."""
    try:
        value = json.loads(data)
    except ValueError:
        raise UserliError(f"HTTP {code} with a body that is not JSON") from None
    return parse(code, value)


def _timedOut(result: object, timeout: float) -> Failure:
    return Failure(NoAnswer(f"no answer within {timeout:g} s"))


def _noAnswer(failure: Failure) -> bool:
    """Whether the API did not answer (what the breaker counts), rather than answered badly."""
    return unanswered(failure) or failure.check(NoAnswer) is not None


def _asUserliError(failure: Failure, deadline: float) -> Failure:
    """C{failure} as the one exception type callers handle."""
    if failure.check(defer.TimeoutError, defer.CancelledError):
        return Failure(UserliError(f"no answer within {deadline:g} s"))
    if not failure.check(UserliError):
        return Failure(UserliError(f"{type(failure.value).__name__}: {failure.value}"))
    return failure


class UserliClient:
    """
    One method per endpoint of ``/api/postfix``.

    @param request: C{treq.client.HTTPClient.request} (a client over a
        persistent pool, see L{userli_postfix.httpclient}, or C{StubTreq}'s in
        tests).
    """

    def __init__(
        self,
        request: Callable[..., defer.Deferred[Any]],
        base_url: str,
        token: str,
        clock: IReactorTime,
        metrics: Metrics,
        timeout: float = API_TIMEOUT,
    ) -> None:
        self._request = request
        self._prefix = base_url.rstrip("/") + "/api/postfix/"
        self._clock = clock
        self._metrics = metrics
        self._timeout = timeout
        self.breaker = CircuitBreaker(clock, self._breakerChanged)
        metrics.circuit_breaker_open.set(0)
        self._requests = increments(metrics.http_client_requests)
        self._durations = observations(metrics.http_client_duration)
        self._tokenRefused: str | None = None
        common = {
            b"Authorization": [b"Bearer " + token.encode("utf-8")],
            b"Accept": [b"application/json"],
            b"User-Agent": [f"userli-postfix/{__version__}".encode()],
        }
        self._getHeaders = Headers(common)
        self._postHeaders = Headers({**common, b"Content-Type": [b"application/json"]})

    def __repr__(self) -> str:
        # The token must never reach a log line, even through a repr.
        return f"<UserliClient {self._prefix}>"

    def _breakerChanged(self, isOpen: bool) -> None:
        self._metrics.circuit_breaker_open.set(1 if isOpen else 0)
        if isOpen:
            self._metrics.circuit_breaker_opened.inc()

    def _noteTokenRefusal(self, code: str, failed: bool) -> None:
        """
        Say once what a 401 or 403 without a usable answer means: our token
        is refused, so every lookup fails until an admin fixes it.  Once per
        refusal, not per request (a busy server would log thousands), and
        again after an answer showed the token working.
        """
        if not failed:
            if code.startswith("2"):
                self._tokenRefused = None
            return
        if code not in TOKEN_REFUSALS or self._tokenRefused == code:
            return
        self._tokenRefused = code
        log.error(TOKEN_REFUSALS[code], status=code)

    def _call(
        self,
        endpoint: str,
        parse: Callable[[int, Any], T],
        key: str | None = None,
        body: bytes | None = None,
        timeout: float | None = None,
    ) -> defer.Deferred[T]:
        """
        One request to the API, in the steps every call takes: the URL is
        made (a C{GET} names its C{key}, a C{POST} sends a C{body}), the
        breaker admits the call (or it fails at once), the request goes
        out, its status and body are checked, all within the deadline; then
        the call is measured, the breaker told how it went, and any failure
        made a L{UserliError}.
        """
        # The URL.
        if key is None:
            url = self._prefix + endpoint
        else:
            # Percent-encoding cannot protect these: servers and proxies
            # resolve dot segments (encoded or not), and an empty segment
            # names the parent route.  No valid key looks like this anyway.
            if key in ("", ".", ".."):
                return defer.fail(UserliError(f"{endpoint}: refusing key {key!r}"))
            # One path segment: '/', '?', '#', '%' and everything else that
            # is not unreserved is percent-encoded, so no key reaches
            # another route.
            url = self._prefix + endpoint + "/" + quote(key, safe="@")
        # The breaker: while the API is not answering, it is not asked.
        attempt = self.breaker.admit()
        if attempt is None:
            return defer.fail(CircuitOpen("the API is not answering: not asked"))
        exchange = _Exchange(
            endpoint, attempt, self._timeout if timeout is None else timeout, self._clock.seconds()
        )
        # The request, unbuffered: the body goes straight to _BodyReader,
        # which can stop it at MAX_BODY and abort the connection on the
        # deadline.
        method, headers = ("GET", self._getHeaders) if body is None else ("POST", self._postHeaders)
        d: defer.Deferred[Any] = self._request(
            method, url, headers=headers, data=body, allow_redirects=False, unbuffered=True
        )
        # The status and the body: JSON, then what the endpoint accepts.
        d.addCallback(_checked, exchange, parse)
        # The deadline, over the headers and the body.  Whatever cancelling
        # made of the request (a cancelled connection attempt fails with
        # its own error), a timeout reads as one.
        d.addTimeout(exchange.deadline, self._clock, onTimeoutCancel=_timedOut)
        # The metrics, the breaker's count, one error type.
        d.addBoth(self._settled, exchange)
        if attempt.timeout < exchange.deadline:
            # The breaker's probe: its caller is answered soon, while the
            # request runs on, so that a slow answer still closes it.
            return answerWithin(
                d, attempt.timeout, self._clock, partial(self._probeUnanswered, attempt)
            )
        return d

    def _settled(self, result: T | Failure, exchange: _Exchange) -> T | Failure:
        """Count the call, tell the breaker, and make any failure a L{UserliError}."""
        endpoint, status = exchange.endpoint, exchange.status
        self._requests[endpoint, status]()
        self._durations[endpoint, status](self._clock.seconds() - exchange.started)
        if not isinstance(result, Failure):
            self.breaker.record(exchange.attempt, True)
            if self._tokenRefused is not None:
                self._noteTokenRefusal(status, False)
            return result
        self.breaker.record(exchange.attempt, not _noAnswer(result))
        self._noteTokenRefusal(status, True)
        return _asUserliError(result, exchange.deadline)

    def _probeUnanswered(self, attempt: Attempt) -> NoAnswer:
        """What the caller of an unanswered probe gets, once the breaker knows."""
        self.breaker.probeUnanswered(attempt)
        return NoAnswer(f"no answer within {attempt.timeout:g} s")

    def alias(self, address: str) -> defer.Deferred[list[str]]:
        """Destinations of the alias C{address}; C{[]} when it is none."""
        return self._call("alias", _ADDRESSES, key=address)

    def senders(self, address: str) -> defer.Deferred[list[str]]:
        """Logins allowed to send as C{address}; C{[]} when none."""
        return self._call("senders", _ADDRESSES, key=address)

    def domain(self, name: str, timeout: float | None = None) -> defer.Deferred[bool]:
        """Whether C{name} is a Userli domain."""
        return self._call("domain", _BOOLEAN, key=name, timeout=timeout)

    def mailbox(self, address: str) -> defer.Deferred[bool]:
        """Whether C{address} is a mailbox."""
        return self._call("mailbox", _BOOLEAN, key=address)

    def smtp_quota(self, address: str) -> defer.Deferred[Quota | None]:
        """The sending quota of C{address}; C{None} when Userli does not know it (404)."""
        return self._call("smtp_quota", _quota_answer, key=address)

    def auth(self, email: str, password: str) -> defer.Deferred[AuthResult]:
        """
        Check a login.  C{AuthResult(ok=True)} only for a 200 whose body is
        C{{"message": "success"}}; a documented refusal (401/403 with a
        C{message}) is C{AuthResult(ok=False, message=...)}; anything else,
        a bad API token included, raises L{UserliError} (fail closed).
        """
        body = json.dumps({"email": email, "password": password}).encode("utf-8")
        return self._call("auth", _auth_answer, body=body)
