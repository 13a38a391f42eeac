"""
The Dovecot authentication conversation, server side (``sasl.md``), without
a transport: a line in, what to do about it out.

L{Conversation} keeps the state of one connection: the client's handshake,
and for each request id whether it waits for a C{CONT} or is being
decided.  It answers at once what needs no decision (challenges, malformed
requests, unknown or expired ids) and asks for a decision (L{Ask}) where
one is needed; the decision comes back through L{Conversation.answer},
which turns it into the reply, or into nothing when the id has moved on
meanwhile.  It never talks to the API and never touches a socket.

Passwords, C{resp=} values and C{CONT} payloads never reach a log line, at
any level: only commands, ids, mechanisms and outcomes are logged.
"""

from __future__ import annotations

import binascii
import unicodedata
from base64 import b64decode, b64encode
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeAlias

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

log = Logger()

# How long a LOGIN or PLAIN exchange waits for the client's CONT.  Postfix
# answers a challenge as soon as the SMTP client does; an exchange still
# waiting after this was abandoned (the client sent "*" or went away) and
# its state is dropped.  The connection itself stays open.
EXCHANGE_TIMEOUT = 60.0

# Exchanges waiting for a CONT on one connection.  Postfix has at most one;
# a client that opens more without finishing them loses the oldest.
MAX_WAITING = 16

# Replies go to the SMTP client: keep them short, and the same for every
# kind of bad credentials so that they tell a guesser nothing.
MAX_REASON = 100
REASON_FAILED = "authentication failed"
REASON_BAD_BASE64 = "invalid base64 data"
REASON_BAD_PLAIN = "invalid PLAIN response"
REASON_BAD_UTF8 = "credentials are not UTF-8"
REASON_EXPIRED = "authentication request timed out"
REASON_BAD_REQUEST = "invalid AUTH request"

# The results of a login, as in the sasl_auth metric.
SUCCESS = "success"
INVALID = "invalid_credentials"
ERROR = "error"

# Bounded label value for AUTH requests naming a mechanism we do not offer:
# the name itself comes from the wire and must not become a label.
UNSUPPORTED = "unsupported"

MECHANISMS = ("PLAIN", "LOGIN")

# Postfix chops SMTP lines at line_length_limit (2048 bytes), so a request
# cannot come near this; a longer line is a broken or hostile client.
MAX_LINE = 65536

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


def handshake(pid: int, cuid: int, cookie: str) -> list[bytes]:
    """
    The lines the server sends first, without waiting for the client:
    C{VERSION}, one C{MECH} per mechanism, C{SPID}, C{CUID}, C{COOKIE},
    C{DONE}.
    """
    return [
        b"VERSION\t1\t2",
        # Every MECH must come before SPID: Postfix takes an early SPID for
        # an auth-master socket and gives up.
        *(b"MECH\t" + name.encode("ascii") + b"\tplaintext" for name in MECHANISMS),
        b"SPID\t%d" % (pid,),
        b"CUID\t%d" % (cuid,),
        b"COOKIE\t" + cookie.encode("ascii"),
        b"DONE",
    ]


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


def reply_line(request_id: str, verdict: Verdict) -> bytes:
    """The C{OK} or C{FAIL} line that answers request C{request_id}."""
    if verdict.ok:
        assert verdict.user is not None
        return b"OK\t" + _wire(request_id) + b"\tuser=" + _wire(verdict.user)
    fields = [b"FAIL", _wire(request_id)]
    if verdict.user:
        fields.append(b"user=" + _wire(verdict.user))
    if verdict.temporary:
        fields.append(b"temp")
    fields.append(b"reason=" + _wire(verdict.reason or REASON_FAILED))
    return b"\t".join(fields)


@dataclass(frozen=True, slots=True)
class Credentials:
    """A login to decide: what the client sent, decoded."""

    mechanism: str
    login: str
    password: str = field(repr=False)
    authzid: str
    remote: str


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A login whose credentials could not be read (bad base64, bad PLAIN, not UTF-8)."""

    mechanism: str
    reason: str
    remote: str


@dataclass(frozen=True, eq=False, slots=True)
class Ask:
    """
    Output: decide this login and hand the verdict to
    L{Conversation.answer}.  Each is a request of its own, compared by
    identity: a later AUTH with the same id is another L{Ask}.
    """

    request_id: str
    question: Credentials | Unreadable


@dataclass(frozen=True, slots=True)
class Withdraw:
    """Output: the answer to C{ask} is no longer wanted; do not start it if it waits its turn."""

    ask: Ask


@dataclass(frozen=True, slots=True)
class Unsupported:
    """
    Output: an AUTH for a mechanism we do not offer.  No login attempt,
    so it is answered at once, with L{reply_line} of the verdict for it.
    """

    request_id: str
    remote: str


@dataclass(frozen=True)
class Hangup:
    """Output: close the connection (the client speaks another protocol version)."""


# What Conversation.receive asks of the connection, in order: a line to
# send (without its newline), or one of the instructions above.
Output: TypeAlias = bytes | Ask | Withdraw | Unsupported | Hangup


@dataclass
class _Exchange:
    """An AUTH waiting for the client's next CONT."""

    mechanism: str
    stage: str  # "response" (PLAIN), "username" or "password" (LOGIN)
    remote: str
    timer: IDelayedCall
    login: str = ""


class Conversation:
    """
    One connection's side of the conversation.

    State is kept per request id: each id is either waiting for a CONT or
    being decided (an L{Ask} given out and not yet answered).  A new AUTH
    with an id replaces whatever that id had pending, and the answer to a
    replaced L{Ask} is never written under the new request.

    An exchange that waits longer than C{exchange_timeout} for its CONT is
    dropped (the C{expired} callback is told, so that a draining connection
    can close); at most L{MAX_WAITING} wait at a time.
    """

    def __init__(
        self,
        clock: IReactorTime,
        exchange_timeout: float = EXCHANGE_TIMEOUT,
        expired: Callable[[], None] = lambda: None,
    ) -> None:
        self._clock = clock
        self._exchange_timeout = exchange_timeout
        self._expired = expired
        self._waiting: dict[str, _Exchange] = {}
        # The latest Ask given out for each id and not answered yet.
        self._deciding: dict[str, Ask] = {}
        self.client_pid = ""

    @property
    def waiting(self) -> int:
        """Exchanges waiting for the client's CONT."""
        return len(self._waiting)

    def receive(self, line: bytes) -> list[Output]:
        """Take one line from the client (without its line end); say what to do."""
        out: list[Output] = []
        command, _, rest = line.partition(b"\t")
        if command == b"AUTH":
            self._auth(rest.split(b"\t"), out)
        elif command == b"CONT":
            raw_id, _, data = rest.partition(b"\t")
            self._cont(_field(raw_id), data, out)
        elif command == b"VERSION":
            self._version(rest.split(b"\t"), out)
        elif command == b"CPID":
            self.client_pid = _field(rest)
            log.debug("SASL client pid {pid}", pid=_shown(self.client_pid))
        elif command == b"CANCEL":
            cancelled = _field(rest.split(b"\t")[0])
            log.debug("SASL CANCEL id={id}", id=_shown(cancelled))
            self._forget(cancelled, out)
        else:
            _unknown(command)
        return out

    def answer(self, ask: Ask, verdict: Verdict) -> bytes | None:
        """
        The reply to C{ask} once decided; C{None} when its id was reused,
        cancelled or its connection closed meanwhile.
        """
        if self._deciding.get(ask.request_id) is not ask:
            return None
        del self._deciding[ask.request_id]
        return reply_line(ask.request_id, verdict)

    def close(self) -> None:
        """The connection is gone: stop every timer and forget every request."""
        for exchange in self._waiting.values():
            if exchange.timer.active():
                exchange.timer.cancel()
        self._waiting.clear()
        self._deciding.clear()

    # Client handshake

    def _version(self, fields: list[bytes], out: list[Output]) -> None:
        major = _field(fields[0]) if fields else ""
        if major != "1":
            log.error(
                "Closing SASL connection: the client speaks protocol version {major}, not 1",
                major=major,
            )
            out.append(Hangup())
            return
        log.debug("SASL client protocol version {major}", major=major)

    # Requests

    def _auth(self, fields: list[bytes], out: list[Output]) -> None:
        request_id = _field(fields[0]) if fields else ""
        if len(fields) < 2 or not request_id or not fields[1]:
            if request_id:
                out.append(reply_line(request_id, Verdict(ERROR, reason=REASON_BAD_REQUEST)))
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
        self._forget(request_id, out)
        log.debug(
            "SASL AUTH id={id} mechanism={mechanism} rip={remote} initial_response={initial} "
            "client_pid={client}",
            id=_shown(request_id),
            client=_shown(self.client_pid),
            mechanism=mechanism if mechanism in MECHANISMS else UNSUPPORTED,
            remote=remote,
            initial="yes" if response is not None else "no",
        )
        if mechanism not in MECHANISMS:
            out.append(Unsupported(request_id, remote))
            return
        stage = "response" if mechanism == "PLAIN" else "username"
        if response is None:
            challenge = b"" if mechanism == "PLAIN" else _USERNAME_CHALLENGE
            self._wait(request_id, mechanism, stage, remote, challenge, "", out)
            return
        self._respond(request_id, mechanism, stage, remote, "", response, out)

    def _cont(self, request_id: str, data: bytes, out: list[Output]) -> None:
        exchange = self._waiting.pop(request_id, None)
        if exchange is None:
            if request_id in self._deciding:
                log.warn(
                    "Ignoring a CONT for request {id}, which is being decided",
                    id=_shown(request_id),
                )
            else:
                log.debug("SASL CONT for unknown or expired request {id}", id=_shown(request_id))
                out.append(reply_line(request_id, Verdict(ERROR, reason=REASON_EXPIRED)))
            return
        if exchange.timer.active():
            exchange.timer.cancel()
        log.debug("SASL CONT id={id}", id=_shown(request_id))
        self._respond(
            request_id,
            exchange.mechanism,
            exchange.stage,
            exchange.remote,
            exchange.login,
            data,
            out,
        )

    def _respond(
        self,
        request_id: str,
        mechanism: str,
        stage: str,
        remote: str,
        login: str,
        data: bytes,
        out: list[Output],
    ) -> None:
        """Take the client's answer at C{stage} of an exchange."""
        decoded = decode_base64(data)
        if decoded is None:
            self._ask(request_id, Unreadable(mechanism, REASON_BAD_BASE64, remote), out)
            return
        if stage == "username":
            try:
                name = decoded.decode("utf-8")
            except UnicodeDecodeError:
                self._ask(request_id, Unreadable(mechanism, REASON_BAD_UTF8, remote), out)
                return
            self._wait(request_id, mechanism, "password", remote, _PASSWORD_CHALLENGE, name, out)
            return
        if stage == "password":
            authzid, password_bytes = b"", decoded
            login_bytes = None
        else:
            parts = parse_plain(decoded)
            if parts is None:
                self._ask(request_id, Unreadable(mechanism, REASON_BAD_PLAIN, remote), out)
                return
            authzid, login_bytes, password_bytes = parts
        try:
            password = password_bytes.decode("utf-8")
            authz = authzid.decode("utf-8")
            if login_bytes is not None:
                login = login_bytes.decode("utf-8")
        except UnicodeDecodeError:
            self._ask(request_id, Unreadable(mechanism, REASON_BAD_UTF8, remote), out)
            return
        self._ask(request_id, Credentials(mechanism, login, password, authz, remote), out)

    def _ask(self, request_id: str, question: Credentials | Unreadable, out: list[Output]) -> None:
        """Ask for a decision; only the latest L{Ask} of an id is ever answered."""
        asked = Ask(request_id, question)
        self._deciding[request_id] = asked
        out.append(asked)

    def _wait(
        self,
        request_id: str,
        mechanism: str,
        stage: str,
        remote: str,
        challenge: bytes,
        login: str,
        out: list[Output],
    ) -> None:
        """Send a challenge and keep the exchange until its CONT arrives."""
        if len(self._waiting) >= MAX_WAITING:
            oldest = next(iter(self._waiting))
            log.debug("Dropping abandoned SASL request {id}", id=_shown(oldest))
            self._forget(oldest, out)
        timer = self._clock.callLater(self._exchange_timeout, self._expire, request_id)
        self._waiting[request_id] = _Exchange(mechanism, stage, remote, timer, login)
        # The field after the id is required even when the challenge is empty.
        out.append(b"CONT\t" + _wire(request_id) + b"\t" + challenge)

    def _expire(self, request_id: str) -> None:
        if self._waiting.pop(request_id, None) is not None:
            log.debug("SASL request {id} got no CONT in time; dropped", id=_shown(request_id))
            self._expired()

    def _forget(self, request_id: str, out: list[Output]) -> None:
        exchange = self._waiting.pop(request_id, None)
        if exchange is not None and exchange.timer.active():
            exchange.timer.cancel()
        # A decision already running for this id is let finish but its
        # reply is no longer written; one still waiting its turn is
        # withdrawn before it costs an API call.
        asked = self._deciding.pop(request_id, None)
        if asked is not None:
            out.append(Withdraw(asked))


def _unknown(command: bytes) -> None:
    # Only the command word is logged, and only when it looks like one: a
    # confused client could send anything, a password included.
    name = command.decode("ascii", "replace")
    shown = name if name.isalpha() and name.isupper() and len(name) <= 16 else "?"
    # Ignored, as sasl.md asks: an answer would be taken by Postfix as the
    # reply to its live request with that id.
    log.debug("SASL unknown command {command} ignored", command=shown)


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
