"""
The Dovecot authentication protocol, server side, so that Postfix with
``smtpd_sasl_type = dovecot`` checks SMTP logins against Userli.

Three parts, one job each:

 - L{SASLServerProtocol} frames and parses the protocol (``sasl.md``): the
   handshake, C{AUTH}, C{CONT} and the per-request state of the PLAIN and
   LOGIN mechanisms.  It never talks to the API.
 - L{Authenticator} decides: it normalises the login, asks Userli, fails
   closed, counts the outcome and holds back every failure for the
   configured delay.
 - L{SASLFactory} numbers connections (CUID), knows the server's pid
   (SPID) and applies the connection limit shared by every listener.

Passwords, C{resp=} values and C{CONT} payloads never reach a log line, at
any level: the protocol logs only commands, ids, mechanisms and outcomes.
"""

from __future__ import annotations

import binascii
import itertools
import os
import unicodedata
from base64 import b64decode, b64encode
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet import defer, task
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from userli_postfix.addresses import normalise_address
from userli_postfix.config import Config
from userli_postfix.listeners import MAX_CONNECTIONS, LimitedFactory, ServingMixin
from userli_postfix.metrics import Metrics
from userli_postfix.userli import AuthResult, UserliClient, UserliError

log = Logger()

# Postfix keeps its auth connection across SMTP sessions and gives up on an
# idle SMTP client after smtpd_timeout (300 s): an auth connection must
# outlive that, or the next login on it meets a closed socket (454).
IDLE_TIMEOUT = 360.0

# How long a LOGIN or PLAIN exchange waits for the client's CONT.  Postfix
# answers a challenge as soon as the SMTP client does; an exchange still
# waiting after this was abandoned (the client sent "*" or went away) and
# its state is dropped.  The connection itself stays open.
EXCHANGE_TIMEOUT = 60.0

# Exchanges waiting for a CONT on one connection.  Postfix has at most one;
# a client that opens more without finishing them loses the oldest.
MAX_WAITING = 16

# Logins waiting on one connection (the one being decided included).  Postfix
# sends one at a time; a client that pipelines more is not read from until
# half of them are answered.  Each costs its own failure delay, so more
# would only be answered after Postfix stopped waiting (10 s).
MAX_QUEUED = 16

# Postfix chops SMTP lines at line_length_limit (2048 bytes), so a request
# cannot come near this; a longer line is a broken or hostile client.
MAX_LINE = 65536

# Replies go to the SMTP client: keep them short, and the same for every
# kind of bad credentials so that they tell a guesser nothing.
MAX_REASON = 100
REASON_FAILED = "authentication failed"
REASON_AUTHZID = "authorization identity not allowed"
REASON_TEMPORARY = "temporary authentication failure"
REASON_BAD_BASE64 = "invalid base64 data"
REASON_BAD_PLAIN = "invalid PLAIN response"
REASON_BAD_UTF8 = "credentials are not UTF-8"
REASON_UNSUPPORTED = "unsupported authentication mechanism"
REASON_EXPIRED = "authentication request timed out"
REASON_BAD_REQUEST = "invalid AUTH request"

SUCCESS = "success"
INVALID = "invalid_credentials"
ERROR = "error"

# Bounded label value for AUTH requests naming a mechanism we do not offer:
# the name itself comes from the wire and must not become a label.
UNSUPPORTED = "unsupported"

MECHANISMS = ("PLAIN", "LOGIN")

_USERNAME_CHALLENGE = b64encode(b"Username:")
_PASSWORD_CHALLENGE = b64encode(b"Password:")


def sanitise(text: str, limit: int = MAX_REASON) -> str:
    """
    Make C{text} safe as one field of a reply: TAB, CR, LF, the byte 0x01
    (Dovecot's escape) and every other control character become a space,
    and the result is cut to C{limit} characters.
    """
    cleaned = "".join(
        " " if unicodedata.category(char) in ("Cc", "Zl", "Zp") else char for char in text
    )
    return " ".join(cleaned.split())[:limit]


def parse_plain(data: bytes) -> tuple[bytes, bytes, bytes] | None:
    """
    Split a PLAIN response (RFC 4616: C{authzid NUL authcid NUL passwd})
    into its three parts; C{None} when it is not made of exactly three.
    """
    parts = data.split(b"\0")
    if len(parts) != 3:
        return None
    return parts[0], parts[1], parts[2]


def decode_base64(data: bytes) -> bytes | None:
    """Strict base64 (what Postfix forwards); C{None} when C{data} is not."""
    try:
        return b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return None


@dataclass(frozen=True)
class Verdict:
    """
    The outcome of one login.

    @ivar result: C{success}, C{invalid_credentials} or C{error}, as in the
        C{sasl_auth} metric.
    @ivar user: the normalised address, when the login was one.
    @ivar reason: the text for the SMTP client when the login failed.
    @ivar temporary: the failure is ours (the API gave no usable answer),
        not the user's.
    """

    result: str
    user: str | None = None
    reason: str = ""
    temporary: bool = False

    @property
    def ok(self) -> bool:
        return self.result == SUCCESS


class Authenticator:
    """
    Decides logins: normalise, ask Userli, fail closed.

    Every failed login is answered only after C{failure_delay} seconds
    (Dovecot's C{auth_failure_delay}); the Deferred fires only then.  The
    protocol decides one login at a time per connection, so this slows a
    password guesser to one try per delay per connection, however many it
    pipelines, without holding up anything else: the delay is a timer on
    the injected clock, never a wait.
    """

    def __init__(
        self,
        client: UserliClient,
        clock: IReactorTime,
        metrics: Metrics,
        delimiter: str = "",
        failure_delay: float = 2.0,
    ) -> None:
        self._client = client
        self._clock = clock
        self._metrics = metrics
        self._delimiter = delimiter
        self.failure_delay = failure_delay

    def login(
        self,
        mechanism: str,
        login: str,
        password: str,
        authzid: str = "",
        remote: str = "",
    ) -> defer.Deferred[Verdict]:
        """
        Check C{login} and C{password}.  The Deferred never fails.

        @param authzid: PLAIN's authorisation identity; empty, or the same
            mailbox as C{login}, or the login is refused.
        @param remote: the SMTP client's address, for the log.
        """
        started = self._clock.seconds()
        address = normalise_address(login, self._delimiter)
        if address is None:
            log.info(
                "SASL {mechanism} login from {remote} refused: the login name is not an address",
                mechanism=mechanism,
                remote=remote,
            )
            return self._finish(mechanism, started, Verdict(INVALID, reason=REASON_FAILED))
        if authzid and normalise_address(authzid, self._delimiter) != address:
            log.info(
                "SASL {mechanism} login of {user} from {remote} refused: "
                "it asked to act as another identity",
                mechanism=mechanism,
                user=address,
                remote=remote,
            )
            return self._finish(mechanism, started, Verdict(INVALID, address, REASON_AUTHZID))
        if not password:
            log.info(
                "SASL {mechanism} login of {user} from {remote} refused: empty password",
                mechanism=mechanism,
                user=address,
                remote=remote,
            )
            return self._finish(mechanism, started, Verdict(INVALID, address, REASON_FAILED))

        def decided(result: AuthResult) -> Verdict:
            if result.ok:
                log.info(
                    "SASL {mechanism} login of {user} from {remote} succeeded",
                    mechanism=mechanism,
                    user=address,
                    remote=remote,
                )
                return Verdict(SUCCESS, address)
            reason = sanitise(result.message) or REASON_FAILED
            log.info(
                "SASL {mechanism} login of {user} from {remote} refused by Userli: {reason}",
                mechanism=mechanism,
                user=address,
                remote=remote,
                reason=reason,
            )
            return Verdict(INVALID, address, reason)

        def failed(failure: Failure) -> Verdict:
            if failure.check(UserliError):
                log.warn(
                    "SASL {mechanism} login of {user} from {remote} refused, "
                    "the Userli API gave no usable answer: {error}",
                    mechanism=mechanism,
                    user=address,
                    remote=remote,
                    error=str(failure.value),
                )
            else:
                # A bug, not an outage: still fail closed, but say where.
                log.failure(
                    "SASL login of {user} refused after an unexpected error",
                    failure,
                    user=address,
                )
            return Verdict(ERROR, address, REASON_TEMPORARY, temporary=True)

        def finish(verdict: Verdict) -> defer.Deferred[Verdict]:
            return self._finish(mechanism, started, verdict)

        asked: defer.Deferred[AuthResult] = defer.maybeDeferred(
            self._client.auth, address, password
        )
        decision: defer.Deferred[Verdict] = asked.addCallbacks(decided, failed)
        return decision.addCallback(finish)

    def refuse(self, mechanism: str, reason: str, remote: str = "") -> defer.Deferred[Verdict]:
        """
        Fail a login whose credentials could not even be read (bad base64,
        a malformed PLAIN response): counted as an error, and delayed like
        every other failure so that garbage is no faster than a guess.
        """
        log.info(
            "SASL {mechanism} login from {remote} refused: {reason}",
            mechanism=mechanism,
            remote=remote,
            reason=reason,
        )
        return self._finish(mechanism, self._clock.seconds(), Verdict(ERROR, reason=reason))

    def unsupported(self, remote: str = "") -> Verdict:
        """
        Answer an AUTH for a mechanism we do not offer.  Not a login attempt
        (no credentials were sent), so it is answered at once.
        """
        log.info("SASL login from {remote} asked for an unsupported mechanism", remote=remote)
        self._count(UNSUPPORTED, 0.0, ERROR)
        return Verdict(ERROR, reason=REASON_UNSUPPORTED)

    def _count(self, mechanism: str, elapsed: float, result: str) -> None:
        self._metrics.sasl_auth.labels(mechanism, result).inc()
        self._metrics.sasl_auth_duration.labels(mechanism, result).observe(elapsed)

    def _finish(self, mechanism: str, started: float, verdict: Verdict) -> defer.Deferred[Verdict]:
        # The duration measures the decision, not the brake applied after it.
        self._count(mechanism, self._clock.seconds() - started, verdict.result)
        if verdict.ok or self.failure_delay <= 0:
            return defer.succeed(verdict)
        return task.deferLater(self._clock, self.failure_delay, lambda: verdict)


@dataclass
class _Exchange:
    """An AUTH waiting for the client's next CONT."""

    mechanism: str
    stage: str  # "response" (PLAIN), "username" or "password" (LOGIN)
    remote: str
    timer: IDelayedCall
    login: str = ""


class SASLServerProtocol(ServingMixin, LineReceiver):
    """
    One auth connection from Postfix.

    State is kept per request id: each id is either waiting for a CONT,
    queued, or being decided.  A new AUTH with an id replaces whatever that
    id had pending, and a stale decision is never written under the new
    request.

    Logins are decided one at a time, in the order they arrived, each with
    its own failure delay: Postfix never sends a second login before the
    first is answered, and a client that pipelines guesses would otherwise
    get all its failures after one delay.  At L{MAX_QUEUED} logins waiting
    the connection is not read from (neither the socket nor lines already
    received) until half of them are answered.  Challenges (C{CONT}) and
    answers that need no decision are written at once.

    The connection closes only when it has been idle (nothing being
    decided) for L{IDLE_TIMEOUT}, on a VERSION with another major number,
    or on an absurdly long line; an exchange that waits too long for its
    CONT is dropped, not the connection.
    """

    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE
    factory: SASLFactory

    def connectionMade(self) -> None:
        self._waiting: dict[str, _Exchange] = {}
        # The token of the latest request for each id queued or being decided.
        self._deciding: dict[str, object] = {}
        # Logins not started yet: (id, token, start), oldest first.
        self._queue: deque[tuple[str, object, Callable[[], defer.Deferred[Verdict]]]] = deque()
        # The token of the login being decided, if any.
        self._running: object | None = None
        self._advancing = False
        self._inflight = 0
        self._closed = False
        self.clientPid = ""
        super().connectionMade()
        factory = self.factory
        handshake = [
            b"VERSION\t1\t2",
            # Every MECH must come before SPID: Postfix takes an early SPID
            # for an auth-master socket and gives up.
            *(b"MECH\t" + name.encode("ascii") + b"\tplaintext" for name in MECHANISMS),
            b"SPID\t%d" % (factory.pid,),
            b"CUID\t%d" % (factory.nextConnectionId(),),
            b"COOKIE\t" + factory.newCookie().encode("ascii"),
            b"DONE",
        ]
        self.transport.write(b"".join(line + b"\n" for line in handshake))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closed = True
        for exchange in self._waiting.values():
            if exchange.timer.active():
                exchange.timer.cancel()
        self._waiting.clear()
        self._deciding.clear()
        self._queue.clear()
        super().connectionLost(reason)

    @property
    def outstanding(self) -> int:
        """
        AUTH requests queued, being decided or waiting for their C{CONT}: a
        connection with any of them is not closed at shutdown until they
        end (bounded by the drain's grace period), since Postfix reports a
        closed auth connection as a temporary failure to the SMTP client.
        """
        return self._inflight + len(self._waiting)

    def _closeIfDrained(self) -> None:
        if self.factory.draining and not self._closed and not self.outstanding:
            self.transport.loseConnection()

    def lineLengthExceeded(self, line: bytes) -> None:
        # Without the end of the line there is no way back into the
        # framing; Postfix never sends such a line.
        log.warn("Closing SASL connection: a line longer than {limit} bytes", limit=MAX_LINE)
        self.transport.loseConnection()

    def lineReceived(self, line: bytes) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            return
        command, _, rest = line.partition(b"\t")
        if command == b"AUTH":
            self._auth(rest.split(b"\t"))
        elif command == b"CONT":
            request_id, _, data = rest.partition(b"\t")
            self._cont(_field(request_id), data)
        elif command == b"VERSION":
            self._version(rest.split(b"\t"))
        elif command == b"CPID":
            self.clientPid = _field(rest)
            log.debug("SASL client pid {pid}", pid=_shown(self.clientPid))
        elif command == b"CANCEL":
            self._cancel(_field(rest.split(b"\t")[0]))
        else:
            self._unknown(command)
        self._rearm()
        self._closeIfDrained()

    # Client handshake

    def _version(self, fields: list[bytes]) -> None:
        major = _field(fields[0]) if fields else ""
        if major != "1":
            log.error(
                "Closing SASL connection: the client speaks protocol version {major}, not 1",
                major=major,
            )
            self.transport.loseConnection()
            return
        log.debug("SASL client protocol version {major}", major=major)

    # Requests

    def _auth(self, fields: list[bytes]) -> None:
        request_id = _field(fields[0]) if fields else ""
        if len(fields) < 2 or not request_id or not fields[1]:
            if request_id:
                self._writeFail(request_id, Verdict(ERROR, reason=REASON_BAD_REQUEST))
            else:
                log.warn("Ignoring an AUTH request without an id")
            return
        mechanism = _field(fields[1]).upper()
        params: dict[bytes, bytes] = {}
        for param in fields[2:]:
            key, sep, value = param.partition(b"=")
            if sep:
                params[key] = value
        # Only ever logged; it comes from the client like everything else.
        remote = _shown(_field(params.get(b"rip", b"")))
        response = params.get(b"resp")
        # A new AUTH replaces whatever this id had pending.
        self._forget(request_id)
        log.debug(
            "SASL AUTH id={id} mechanism={mechanism} rip={remote} initial_response={initial} "
            "client_pid={client}",
            id=_shown(request_id),
            client=_shown(self.clientPid),
            mechanism=mechanism if mechanism in MECHANISMS else UNSUPPORTED,
            remote=remote,
            initial="yes" if response is not None else "no",
        )
        if mechanism not in MECHANISMS:
            self._writeFail(request_id, self.factory.authenticator.unsupported(remote))
            return
        if response is None:
            stage = "response" if mechanism == "PLAIN" else "username"
            challenge = b"" if mechanism == "PLAIN" else _USERNAME_CHALLENGE
            self._wait(request_id, mechanism, stage, remote, challenge)
            return
        self._respond(
            request_id,
            mechanism,
            "response" if mechanism == "PLAIN" else "username",
            remote,
            "",
            response,
        )

    def _cont(self, request_id: str, data: bytes) -> None:
        exchange = self._waiting.pop(request_id, None)
        if exchange is None:
            if request_id in self._deciding:
                log.warn(
                    "Ignoring a CONT for request {id}, which is being decided",
                    id=_shown(request_id),
                )
            else:
                log.debug("SASL CONT for unknown or expired request {id}", id=_shown(request_id))
                self._writeFail(request_id, Verdict(ERROR, reason=REASON_EXPIRED))
            return
        if exchange.timer.active():
            exchange.timer.cancel()
        log.debug("SASL CONT id={id}", id=_shown(request_id))
        self._respond(
            request_id, exchange.mechanism, exchange.stage, exchange.remote, exchange.login, data
        )

    def _respond(
        self, request_id: str, mechanism: str, stage: str, remote: str, login: str, data: bytes
    ) -> None:
        """Take the client's answer at C{stage} of an exchange."""
        authenticator = self.factory.authenticator

        def refuse(reason: str) -> None:
            self._decide(request_id, lambda: authenticator.refuse(mechanism, reason, remote))

        decoded = decode_base64(data)
        if decoded is None:
            refuse(REASON_BAD_BASE64)
            return
        if stage == "username":
            try:
                name = decoded.decode("utf-8")
            except UnicodeDecodeError:
                refuse(REASON_BAD_UTF8)
                return
            self._wait(request_id, mechanism, "password", remote, _PASSWORD_CHALLENGE, name)
            return
        if stage == "password":
            authzid, password_bytes = b"", decoded
            login_bytes = None
        else:
            parts = parse_plain(decoded)
            if parts is None:
                refuse(REASON_BAD_PLAIN)
                return
            authzid, login_bytes, password_bytes = parts
        try:
            password = password_bytes.decode("utf-8")
            authz = authzid.decode("utf-8")
            if login_bytes is not None:
                login = login_bytes.decode("utf-8")
        except UnicodeDecodeError:
            refuse(REASON_BAD_UTF8)
            return
        self._decide(
            request_id,
            lambda: authenticator.login(mechanism, login, password, authz, remote=remote),
        )

    def _wait(
        self,
        request_id: str,
        mechanism: str,
        stage: str,
        remote: str,
        challenge: bytes,
        login: str = "",
    ) -> None:
        """Send a challenge and keep the exchange until its CONT arrives."""
        if len(self._waiting) >= MAX_WAITING:
            oldest = next(iter(self._waiting))
            log.debug("Dropping abandoned SASL request {id}", id=_shown(oldest))
            self._forget(oldest)
        timer = self.factory.clock.callLater(
            self.factory.exchange_timeout, self._expire, request_id
        )
        self._waiting[request_id] = _Exchange(mechanism, stage, remote, timer, login)
        # The field after the id is required even when the challenge is empty.
        self._writeLine(b"CONT\t" + _wire(request_id) + b"\t" + challenge)

    def _expire(self, request_id: str) -> None:
        if self._waiting.pop(request_id, None) is not None:
            log.debug("SASL request {id} got no CONT in time; dropped", id=_shown(request_id))
            self._closeIfDrained()

    def _cancel(self, request_id: str) -> None:
        log.debug("SASL CANCEL id={id}", id=_shown(request_id))
        self._forget(request_id)

    def _forget(self, request_id: str) -> None:
        exchange = self._waiting.pop(request_id, None)
        if exchange is not None and exchange.timer.active():
            exchange.timer.cancel()
        # A decision still running for this id is let finish (it is counted
        # as outstanding) but its reply is no longer written; one still
        # queued is dropped before it costs an API call.
        token = self._deciding.pop(request_id, None)
        if token is not None:
            for job in self._queue:
                if job[1] is token:
                    self._queue.remove(job)
                    self._inflight -= 1
                    self._inflightChanged()
                    break

    def _unknown(self, command: bytes) -> None:
        # Only the command word is logged, and only when it looks like one:
        # a confused client could send anything, a password included.
        name = command.decode("ascii", "replace")
        shown = name if name.isalpha() and name.isupper() and len(name) <= 16 else "?"
        # Ignored, as sasl.md asks: an answer would be taken by Postfix as
        # the reply to its live request with that id.
        log.debug("SASL unknown command {command} ignored", command=shown)

    # Replies

    def _decide(self, request_id: str, start: Callable[[], defer.Deferred[Verdict]]) -> None:
        """
        Queue a login: C{start} begins its decision (an API call, and the
        failure delay) once every login before it on this connection has
        been answered.
        """
        token = object()
        self._deciding[request_id] = token
        self._queue.append((request_id, token, start))
        self._inflight += 1
        self._inflightChanged()
        self._advance()

    def _advance(self) -> None:
        """Start the next queued login when none is being decided."""
        if self._advancing:
            # Called back from a decision that finished at once: the loop
            # below, further up the stack, goes on.
            return
        self._advancing = True
        try:
            while self._running is None and self._queue and not self._closed:
                request_id, token, start = self._queue.popleft()
                self._running = token
                verdict = defer.maybeDeferred(start)
                verdict.addCallback(self._answer, request_id, token)
                verdict.addErrback(self._lost, token)
        finally:
            self._advancing = False

    def _answer(self, result: Verdict, request_id: str, token: object) -> None:
        self._running = None
        self._inflight -= 1
        if not self._closed and self._deciding.get(request_id) is token:
            del self._deciding[request_id]
            if result.ok:
                assert result.user is not None
                self._writeLine(b"OK\t" + _wire(request_id) + b"\tuser=" + _wire(result.user))
            else:
                self._writeFail(request_id, result)
        if not self._closed:
            self._advance()
            self._inflightChanged()

    def _lost(self, failure: Failure, token: object) -> None:
        # The authenticator never fails; should it, the queue must go on.
        log.failure("SASL reply lost", failure)
        if self._running is token:
            self._running = None
            self._inflight -= 1
        if not self._closed:
            self._advance()
            self._inflightChanged()

    def _writeFail(self, request_id: str, verdict: Verdict) -> None:
        fields = [b"FAIL", _wire(request_id)]
        if verdict.user:
            fields.append(b"user=" + _wire(verdict.user))
        if verdict.temporary:
            fields.append(b"temp")
        fields.append(b"reason=" + _wire(verdict.reason or REASON_FAILED))
        self._writeLine(b"\t".join(fields))

    def _writeLine(self, line: bytes) -> None:
        if not self._closed:
            self.transport.write(line + b"\n")

    # Connection discipline

    def idleTimeout(self) -> float | None:
        return self.factory.idle_timeout

    def _rearm(self) -> None:
        if not self._closed and not self._inflight:
            self.setTimeout(self.idleTimeout())  # type: ignore[no-untyped-call]

    def _inflightChanged(self) -> None:
        if self._paused and self._inflight < MAX_QUEUED // 2 and not self._closed:
            self._paused = False
            # Parses the lines received meanwhile (which may pause again),
            # before a draining connection is found idle and closed.
            self.resumeProducing()  # type: ignore[no-untyped-call]
        if self._inflight:
            self.setTimeout(None)  # type: ignore[no-untyped-call]
            if self._inflight >= MAX_QUEUED and not self._paused:
                # LineReceiver's pause, not only the transport's: lines
                # already received and not yet parsed must wait too.
                self._paused = True
                self.pauseProducing()  # type: ignore[no-untyped-call]
        else:
            self.setTimeout(self.idleTimeout())  # type: ignore[no-untyped-call]
            self._closeIfDrained()


def _field(raw: bytes) -> str:
    """A protocol field as text; undecodable bytes become U+FFFD."""
    return raw.decode("utf-8", "replace")


def _shown(text: str, limit: int = 64) -> str:
    """
    A field from the client as a log line may show it: unchanged when it is
    short and printable (ids, addresses), else C{?}, so that nothing the
    client sends can break or forge a log line.
    """
    return text if len(text) <= limit and text.isprintable() else "?"


def _wire(text: str) -> bytes:
    return sanitise(text, limit=MAX_LINE).encode("utf-8")


class SASLFactory(LimitedFactory):
    """
    The SASL listener: the connection limit and gauges shared with every
    listener, plus what the handshake needs (the pid, a connection counter
    and a fresh cookie per connection).
    """

    protocol = SASLServerProtocol

    def __init__(
        self,
        authenticator: Authenticator,
        clock: IReactorTime,
        metrics: Metrics,
        idle_timeout: float = IDLE_TIMEOUT,
        exchange_timeout: float = EXCHANGE_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
        pid: int | None = None,
        cookie: Callable[[], str] | None = None,
    ) -> None:
        super().__init__(
            clock,
            idle_timeout,
            active=metrics.sasl_active_connections,
            refused=metrics.sasl_connection_pool_full,
            max_connections=max_connections,
        )
        self.authenticator = authenticator
        self.exchange_timeout = exchange_timeout
        self.pid = os.getpid() if pid is None else pid
        self._cuid = itertools.count(1)
        self._cookie = cookie or (lambda: os.urandom(16).hex())

    def nextConnectionId(self) -> int:
        """The CUID of a new connection: unique within this process."""
        return next(self._cuid)

    def newCookie(self) -> str:
        """32 random hex digits."""
        return self._cookie()


def makeSASLFactory(
    config: Config, clock: IReactorTime, client: UserliClient, metrics: Metrics
) -> SASLFactory:
    """Build the SASL listener's factory from the configuration."""
    authenticator = Authenticator(
        client,
        clock,
        metrics,
        delimiter=config.recipient_delimiter,
        failure_delay=config.sasl_failure_delay,
    )
    return SASLFactory(authenticator, clock, metrics)
