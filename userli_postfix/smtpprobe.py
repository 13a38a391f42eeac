"""
The SMTP probe of one mail server: does it complete a STARTTLS handshake?

It reads the banner, sends C{EHLO}, looks for C{STARTTLS} among the
extensions, sends C{STARTTLS}, completes a TLS handshake (no certificate
check: Postfix's C{encrypt} level checks none either) and says C{QUIT}.
No mail is ever sent.

A mail server on the Internet may be hostile or broken, so nothing it sends
is trusted: a line longer than L{MAX_LINE}, more than L{MAX_BYTES} in all,
more than L{MAX_REPLY_LINES} lines in one reply, or a step that takes
longer than L{STEP_TIMEOUT} closes the connection, and the outcome is a
report, never an exception.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from OpenSSL import SSL
from twisted.internet import defer, endpoints, ssl
from twisted.internet.interfaces import IHandshakeListener, IReactorTCP, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

# RFC 5321 allows 512 bytes per reply line; real servers stay well below.
MAX_LINE = 1000
# The banner and the EHLO reply of a real server take a few hundred bytes.
MAX_BYTES = 64 * 1024
# A real EHLO reply lists a dozen extensions.
MAX_REPLY_LINES = 100
# Each step (connecting, the banner, each reply, the handshake) gets this long.
STEP_TIMEOUT = 10.0
# The banner as shown to an operator: its first line, at most this long.
SHOWN_BANNER = 200


@dataclass(frozen=True)
class HostReport:
    """
    What the probe of one address found.

    @ivar answered: a complete banner reply came, whatever its code: the
        server is there and speaks to us.  A server that refuses us (C{554})
        has answered; one that never finishes its banner has not.
    @ivar tls: the TLS handshake completed.
    """

    address: str
    answered: bool = False
    banner: str | None = None
    starttls_offered: bool = False
    tls: bool = False
    tls_version: str | None = None
    cipher: str | None = None
    error: str | None = None


# What each step waits for, as an error message says it.
_STEPS = {
    "banner": "the banner",
    "ehlo": "the EHLO reply",
    "starttls": "the STARTTLS reply",
    "handshake": "the TLS handshake",
}


def _shown(line: bytes) -> str:
    text = line.decode("utf-8", "replace")
    return "".join(c if c.isprintable() else "?" for c in text)[:SHOWN_BANNER]


@implementer(IHandshakeListener)
class SMTPProbeProtocol(LineOnlyReceiver):
    """
    One probe conversation.  L{result} fires once with a L{HostReport},
    and the connection is closed by then or about to be.
    """

    # Servers that end lines with a bare LF are rare but exist; the CR of a
    # proper CRLF is stripped from each line.
    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE
    # TCP, then TLS over it (startTLS, getHandle, abortConnection).
    transport: Any

    def __init__(self, clock: IReactorTime, address: str, ehlo: str) -> None:
        self.clock = clock
        self.address = address
        self.ehlo = ehlo
        self.result: defer.Deferred[HostReport] = defer.Deferred()
        self._state = "banner"
        self._lines: list[bytes] = []
        self._received = 0
        self._timer: Any = None
        self._found: dict[str, Any] = {}

    # framing ----------------------------------------------------------

    def connectionMade(self) -> None:
        self._step()

    def dataReceived(self, data: bytes) -> None:
        if self.result.called:
            return
        self._received += len(data)
        if self._received > MAX_BYTES:
            self._fail(f"more than {MAX_BYTES} bytes from the server")
            return
        super().dataReceived(data)  # type: ignore[no-untyped-call]

    def lineLengthExceeded(self, line: bytes) -> None:
        self._fail(f"a line longer than {MAX_LINE} bytes")

    def lineReceived(self, line: bytes) -> None:
        if self.result.called or self._state not in ("banner", "ehlo", "starttls"):
            return
        line = line.removesuffix(b"\r")
        if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-"):
            self._fail(f"not an SMTP reply: {_shown(line)!r}")
            return
        if self._lines and line[:3] != self._lines[0][:3]:
            self._fail("a reply whose lines carry different codes")
            return
        self._lines.append(line)
        if line[3:4] == b"-":
            if len(self._lines) >= MAX_REPLY_LINES:
                self._fail(f"a reply of more than {MAX_REPLY_LINES} lines")
            return
        lines, self._lines = self._lines, []
        self._reply(int(lines[0][:3]), [entry[4:] for entry in lines])

    # the conversation -------------------------------------------------

    def _reply(self, code: int, texts: list[bytes]) -> None:
        if self._state == "banner":
            self._found["answered"] = True
            self._found["banner"] = _shown(b"%d %s" % (code, texts[0]))
            if code != 220:
                self._finish(error=f"the server refused us: {self._found['banner']}")
                return
            self._send(b"EHLO " + self.ehlo.encode("ascii"), "ehlo")
        elif self._state == "ehlo":
            if code != 250:
                self._finish(error=f"EHLO refused with {code}")
                return
            keywords = {text.split(b" ", 1)[0].strip().upper() for text in texts[1:]}
            if b"STARTTLS" not in keywords:
                self._finish(quit=True)
                return
            self._found["starttls_offered"] = True
            self._send(b"STARTTLS", "starttls")
        else:
            if code != 220:
                self._finish(error=f"STARTTLS refused with {code}", quit=True)
                return
            self._state = "handshake"
            self._step()
            # No certificate check (verify=False is CertificateOptions'
            # default): a self-signed or expired certificate still gives
            # encryption, which is all Postfix's "encrypt" level asks for.
            self.transport.startTLS(ssl.CertificateOptions())

    def handshakeCompleted(self) -> None:
        """The TLS handshake is done: note what was agreed, say QUIT, close."""
        if self.result.called:
            return
        handle = self.transport.getHandle()
        version = cipher = None
        if isinstance(handle, SSL.Connection):
            version = handle.get_protocol_version_name()
            cipher = handle.get_cipher_name()
        self._found.update(tls=True, tls_version=version, cipher=cipher)
        self._finish(quit=True)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancelTimer()
        if self._state == "handshake":
            self._report(error=f"the TLS handshake failed: {reason.getErrorMessage()}")
        elif self._state != "done":
            self._report(error=f"connection closed while waiting for {_STEPS[self._state]}")

    # helpers ----------------------------------------------------------

    def _send(self, command: bytes, state: str) -> None:
        self._state = state
        self._step()
        self.transport.write(command + b"\r\n")

    def _step(self) -> None:
        self._cancelTimer()
        self._timer = self.clock.callLater(STEP_TIMEOUT, self._timedOut)

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timedOut(self) -> None:
        self._timer = None
        if self._state == "done":
            # The server never closed after QUIT (or after TLS's close).
            self.transport.abortConnection()
            return
        self._fail(f"timed out after {STEP_TIMEOUT:g} s waiting for {_STEPS[self._state]}")

    def _fail(self, error: str) -> None:
        self._finish(error=error)
        self.transport.abortConnection()

    def _finish(self, error: str | None = None, quit: bool = False) -> None:
        """Report, then leave: politely (QUIT) when the server behaved."""
        self._report(error=error)
        self._state = "done"
        # Closing waits for the write buffer (and TLS for its close); a
        # server that stops reading must not keep the connection.
        self._step()
        if quit:
            self.transport.write(b"QUIT\r\n")
        self.transport.loseConnection()

    def _report(self, error: str | None) -> None:
        if self.result.called:
            return
        self.result.callback(HostReport(address=self.address, error=error, **self._found))


def probeAddress(
    reactor: IReactorTCP,
    clock: IReactorTime,
    address: str,
    port: int,
    ehlo: str,
) -> defer.Deferred[HostReport]:
    """
    Probe the SMTP server at C{address} (an IPv4 or IPv6 address) and
    C{port}.  Never fails: a refused or timed-out connection is a report
    with C{answered=False}.
    """
    endpoint: Any
    if ":" in address:
        endpoint = endpoints.TCP6ClientEndpoint(reactor, address, port, timeout=STEP_TIMEOUT)
    else:
        endpoint = endpoints.TCP4ClientEndpoint(reactor, address, port, timeout=STEP_TIMEOUT)
    protocol = SMTPProbeProtocol(clock, address, ehlo)
    connected: defer.Deferred[Any] = endpoints.connectProtocol(endpoint, protocol)

    def unreachable(failure: Failure) -> HostReport:
        return HostReport(address=address, error=f"no connection: {failure.getErrorMessage()}")

    def talk(_: object) -> defer.Deferred[HostReport]:
        return protocol.result

    result: defer.Deferred[HostReport] = connected.addCallbacks(talk, unreachable)
    return result
