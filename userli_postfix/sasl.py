"""
The SASL listener, so that Postfix with ``smtpd_sasl_type = dovecot``
checks SMTP logins against Userli: framing and connection life only.

L{SASLServerProtocol} cuts the stream into lines and hands each to the
connection's L{Conversation} (the Dovecot-auth state machine), writes what
it answers at once, and has the logins it asks for decided by the
L{Authenticator}, one at a time (L{LoginQueue}).  The idle timeout,
back-pressure, drain and connection limit are those every listener shares.
L{SASLFactory} numbers connections (CUID) and knows the server's pid
(SPID) for the handshake.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from userli_postfix.config import Config
from userli_postfix.dovecotauth import (
    EXCHANGE_TIMEOUT,
    MAX_LINE,
    Ask,
    Conversation,
    Unsupported,
    Verdict,
    Withdraw,
    handshake,
    reply_line,
)
from userli_postfix.logins import Authenticator, LoginQueue
from userli_postfix.metrics import Metrics
from userli_postfix.serving import MAX_CONNECTIONS, ConnectionMixin, LimitedFactory
from userli_postfix.userli import UserliClient

log = Logger()

# Postfix keeps its auth connection across SMTP sessions and gives up on an
# idle SMTP client after smtpd_timeout (300 s): an auth connection must
# outlive that, or the next login on it meets a closed socket (454).
IDLE_TIMEOUT = 360.0

# Logins waiting on one connection (the one being decided included).  Postfix
# sends one at a time; a client that pipelines more is not read from until
# half of them are answered.  Each costs its own failure delay, so more
# would only be answered after Postfix stopped waiting (10 s).
MAX_QUEUED = 16


class SASLServerProtocol(ConnectionMixin, LineReceiver):
    """
    One auth connection from Postfix.

    Challenges and answers that need no decision are written at once;
    logins are decided in the order they arrived, one at a time.  At
    L{MAX_QUEUED} logins waiting the connection is not read from (neither
    the socket nor lines already received) until half of them are answered.

    The connection closes only when it has been idle (nothing being
    decided) for L{IDLE_TIMEOUT}, on a VERSION with another major number,
    or on an absurdly long line; an exchange that waits too long for its
    CONT is dropped, not the connection.
    """

    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE
    maxPending = MAX_QUEUED
    factory: SASLFactory

    def connectionMade(self) -> None:
        factory = self.factory
        self.conversation = Conversation(
            factory.clock, factory.exchange_timeout, self.closeIfDrained
        )
        self.logins = LoginQueue(factory.authenticator, self._answered, self.pendingChanged)
        super().connectionMade()
        lines = handshake(factory.pid, factory.nextConnectionId(), factory.newCookie())
        self.transport.write(b"".join(line + b"\n" for line in lines))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.conversation.close()
        self.logins.close()
        super().connectionLost(reason)

    @property
    def pending(self) -> int:
        """Logins queued or being decided."""
        return len(self.logins)

    @property
    def outstanding(self) -> int:
        """
        Logins queued, being decided or waiting for their C{CONT}: a
        connection with any of them is not closed at shutdown until they
        end (bounded by the drain's grace period), since Postfix reports a
        lost auth connection as a temporary failure to the SMTP client.
        """
        return len(self.logins) + self.conversation.waiting

    def pauseReading(self) -> None:
        # LineReceiver's pause, not only the transport's: lines already
        # received and not yet parsed must wait too.
        self.pauseProducing()  # type: ignore[no-untyped-call]

    def resumeReading(self) -> None:
        # Parses the lines received meanwhile (which may pause again).
        self.resumeProducing()  # type: ignore[no-untyped-call]

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
        for output in self.conversation.receive(line):
            if isinstance(output, Ask):
                self.logins.add(output)
            elif isinstance(output, bytes):
                self._send(output)
            elif isinstance(output, Withdraw):
                self.logins.withdraw(output.ask)
            elif isinstance(output, Unsupported):
                verdict = self.factory.authenticator.unsupported(output.remote)
                self._send(reply_line(output.request_id, verdict))
            else:
                # Hangup: the client speaks another protocol version.
                self.transport.loseConnection()
        # Any line is activity: the idle time starts anew when nothing is
        # being decided, and a draining connection may now be done.
        self.pendingChanged()

    def _answered(self, ask: Ask, verdict: Verdict) -> None:
        line = self.conversation.answer(ask, verdict)
        if line is not None:
            self._send(line)

    def _send(self, line: bytes) -> None:
        if not self.disconnected:
            self.transport.write(line + b"\n")


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
