"""
Tests for L{userli_postfix.smtpprobe}: the probe conversation through a
C{StringTransport} and a L{Clock}, well-behaved and hostile servers alike.
The TLS handshake itself is the transport's (a real one is in the
integration tests); here the transport records C{startTLS} and the test
says when the handshake completed or failed.
"""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from userli_postfix.smtpprobe import (
    MAX_BYTES,
    MAX_LINE,
    MAX_REPLY_LINES,
    STEP_TIMEOUT,
    HostReport,
    SMTPProbeProtocol,
    probeAddress,
)

EHLO_REPLY_TLS = b"250-mx.example.org hello\r\n250-PIPELINING\r\n250-STARTTLS\r\n250 8BITMIME\r\n"
EHLO_REPLY_PLAIN = b"250-mx.example.org hello\r\n250-PIPELINING\r\n250 8BITMIME\r\n"


class TLSStringTransport(StringTransport):
    """A C{StringTransport} that records C{startTLS}; no handshake happens."""

    def __init__(self) -> None:
        super().__init__()
        self.tlsOptions: Any = None
        self.aborted = False

    def startTLS(self, options: Any) -> None:
        self.tlsOptions = options

    def getHandle(self) -> Any:
        return None

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


class ProbeTestCase(SynchronousTestCase):
    """One probe over a L{TLSStringTransport}, driven by the test."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.protocol = SMTPProbeProtocol(self.clock, "192.0.2.1", "probe.example.net")
        self.transport = TLSStringTransport()
        self.protocol.makeConnection(self.transport)

    def said(self) -> bytes:
        """What the probe sent since the last call."""
        data = self.transport.value()
        self.transport.clear()
        return data

    def report(self) -> HostReport:
        return self.successResultOf(self.protocol.result)

    def closed(self) -> None:
        """The transport saw the connection end."""
        self.protocol.connectionLost(Failure(ConnectionDone()))

    def untilStartTLS(self) -> None:
        self.protocol.dataReceived(b"220 mx.example.org ESMTP\r\n")
        self.protocol.dataReceived(EHLO_REPLY_TLS)
        self.protocol.dataReceived(b"220 2.0.0 Ready to start TLS\r\n")


class ConversationTests(ProbeTestCase):
    """A server that behaves."""

    def test_tlsCompleted(self) -> None:
        """
        Banner, C{EHLO} with the configured name, C{STARTTLS}, a TLS start
        without certificate checks; once the handshake completes the report
        says TLS, and the probe says C{QUIT} and closes.
        """
        self.protocol.dataReceived(b"220 mx.example.org ESMTP\r\n")
        self.assertEqual(self.said(), b"EHLO probe.example.net\r\n")
        self.protocol.dataReceived(EHLO_REPLY_TLS)
        self.assertEqual(self.said(), b"STARTTLS\r\n")
        self.assertNoResult(self.protocol.result)
        self.protocol.dataReceived(b"220 2.0.0 Ready to start TLS\r\n")
        options = self.transport.tlsOptions
        self.assertIsInstance(options, ssl.CertificateOptions)
        self.assertFalse(options.verify)
        self.assertNoResult(self.protocol.result)
        self.protocol.handshakeCompleted()
        self.assertEqual(
            self.report(),
            HostReport(
                address="192.0.2.1",
                answered=True,
                banner="220 mx.example.org ESMTP",
                starttls_offered=True,
                tls=True,
            ),
        )
        self.assertEqual(self.said(), b"QUIT\r\n")
        self.assertTrue(self.transport.disconnecting)

    def test_tlsVersionAndCipher(self) -> None:
        """The TLS version and cipher come from the OpenSSL connection."""

        class Handle(SSL.Connection):
            def __init__(self) -> None:
                pass

            def get_protocol_version_name(self) -> str:
                return "TLSv1.3"

            def get_cipher_name(self) -> str:
                return "TLS_AES_256_GCM_SHA384"

        self.transport.getHandle = Handle  # type: ignore[method-assign]
        self.untilStartTLS()
        self.protocol.handshakeCompleted()
        report = self.report()
        self.assertEqual((report.tls_version, report.cipher), ("TLSv1.3", "TLS_AES_256_GCM_SHA384"))

    def test_noStartTLS(self) -> None:
        """Without C{STARTTLS} among the extensions: answered, no TLS, C{QUIT}."""
        self.protocol.dataReceived(b"220 mx.example.org ESMTP\r\n")
        self.said()
        self.protocol.dataReceived(EHLO_REPLY_PLAIN)
        report = self.report()
        self.assertTrue(report.answered)
        self.assertFalse(report.starttls_offered)
        self.assertFalse(report.tls)
        self.assertIsNone(report.error)
        self.assertEqual(self.said(), b"QUIT\r\n")
        self.assertTrue(self.transport.disconnecting)

    def test_startTLSWordNotFirst(self) -> None:
        """Only the keyword counts: C{STARTTLS} in a greeting text is no extension."""
        self.protocol.dataReceived(b"220 mx ESMTP\r\n")
        self.protocol.dataReceived(b"250-mx says STARTTLS is nice\r\n250 SIZE 100\r\n")
        self.assertFalse(self.report().starttls_offered)

    def test_lowerCaseAndBareLF(self) -> None:
        """Keywords in any case, and lines ended by a bare LF, are understood."""
        self.protocol.dataReceived(b"220 mx ESMTP\n")
        self.assertEqual(self.said(), b"EHLO probe.example.net\r\n")
        self.protocol.dataReceived(b"250-mx\n250 starttls\n")
        self.assertEqual(self.said(), b"STARTTLS\r\n")

    def test_multiLineBanner(self) -> None:
        """C{EHLO} waits for the last line of a multi-line banner."""
        self.protocol.dataReceived(b"220-mx.example.org ESMTP\r\n220-more\r\n")
        self.assertEqual(self.said(), b"")
        self.protocol.dataReceived(b"220 ready\r\n")
        self.assertEqual(self.said(), b"EHLO probe.example.net\r\n")

    def test_repliesInPieces(self) -> None:
        """A reply cut anywhere, one byte at a time, is the same reply."""
        for byte in b"220 mx ESMTP\r\n" + EHLO_REPLY_TLS:
            self.protocol.dataReceived(bytes([byte]))
        self.assertEqual(self.said(), b"EHLO probe.example.net\r\nSTARTTLS\r\n")

    def test_bannerRefusal(self) -> None:
        """
        A 554 (or 421) banner: the server answered, without usable TLS; no
        C{EHLO} is sent.
        """
        self.protocol.dataReceived(b"554 5.7.1 go away\r\n")
        report = self.report()
        self.assertTrue(report.answered)
        self.assertFalse(report.tls)
        self.assertEqual(report.banner, "554 5.7.1 go away")
        self.assertIn("refused", report.error or "")
        self.assertEqual(self.said(), b"")
        self.assertTrue(self.transport.disconnecting)

    def test_ehloRefused(self) -> None:
        """An C{EHLO} refused: answered, no TLS."""
        self.protocol.dataReceived(b"220 mx ESMTP\r\n")
        self.protocol.dataReceived(b"550 no\r\n")
        report = self.report()
        self.assertTrue(report.answered)
        self.assertFalse(report.tls)
        self.assertIn("EHLO", report.error or "")

    def test_startTLSRefused(self) -> None:
        """C{STARTTLS} offered but refused (454): offered, no TLS; C{QUIT}."""
        self.protocol.dataReceived(b"220 mx ESMTP\r\n" + EHLO_REPLY_TLS)
        self.said()
        self.protocol.dataReceived(b"454 4.7.0 TLS not available\r\n")
        report = self.report()
        self.assertTrue(report.starttls_offered)
        self.assertFalse(report.tls)
        self.assertIsNone(self.transport.tlsOptions)
        self.assertEqual(self.said(), b"QUIT\r\n")

    def test_handshakeFails(self) -> None:
        """The connection lost during the handshake: offered, not completed, the reason."""
        self.untilStartTLS()
        self.protocol.connectionLost(Failure(SSL.Error([("", "", "wrong version number")])))
        report = self.report()
        self.assertTrue(report.answered)
        self.assertTrue(report.starttls_offered)
        self.assertFalse(report.tls)
        self.assertIn("handshake failed", report.error or "")
        self.assertIn("wrong version number", report.error or "")

    def test_handshakeNeverCompletes(self) -> None:
        """A handshake that hangs is given up after a step's timeout."""
        self.untilStartTLS()
        self.clock.advance(STEP_TIMEOUT)
        report = self.report()
        self.assertFalse(report.tls)
        self.assertIn("TLS handshake", report.error or "")
        self.assertTrue(self.transport.aborted)

    def test_plaintextAfterStartTLSIgnored(self) -> None:
        """
        Lines a server slips in after its C{220} to C{STARTTLS} (before the
        handshake) are ignored: they neither end nor steer the probe.
        """
        self.protocol.dataReceived(b"220 mx ESMTP\r\n" + EHLO_REPLY_TLS)
        self.protocol.dataReceived(b"220 go ahead\r\n250 injected\r\n554 bye\r\n")
        self.assertNoResult(self.protocol.result)
        self.protocol.handshakeCompleted()
        self.assertTrue(self.report().tls)

    def test_closedEarly(self) -> None:
        """A server that hangs up after its banner: answered, no TLS, said why."""
        self.protocol.dataReceived(b"220 mx ESMTP\r\n")
        self.closed()
        report = self.report()
        self.assertTrue(report.answered)
        self.assertFalse(report.tls)
        self.assertIn("EHLO reply", report.error or "")

    def test_serverNeverClosesAfterQuit(self) -> None:
        """After C{QUIT}, a server that keeps the connection open is cut off."""
        self.protocol.dataReceived(b"220 mx ESMTP\r\n" + EHLO_REPLY_PLAIN)
        self.assertFalse(self.transport.aborted)
        self.clock.advance(STEP_TIMEOUT)
        self.assertTrue(self.transport.aborted)
        self.closed()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class HostileServerTests(ProbeTestCase):
    """Servers that try to keep the probe busy or fill its memory."""

    def test_silence(self) -> None:
        """A server that accepts and says nothing: not answered, cut off after a step."""
        self.clock.advance(STEP_TIMEOUT - 0.1)
        self.assertNoResult(self.protocol.result)
        self.clock.advance(0.1)
        report = self.report()
        self.assertFalse(report.answered)
        self.assertIn("banner", report.error or "")
        self.assertTrue(self.transport.aborted)

    def test_trickle(self) -> None:
        """
        A banner trickled a byte a second does not extend the step: the
        timeout counts from the start of the step, not from the last byte.
        """
        for _ in range(int(STEP_TIMEOUT)):
            self.protocol.dataReceived(b"2")
            self.clock.advance(1)
        report = self.report()
        self.assertFalse(report.answered)
        self.assertTrue(self.transport.aborted)

    def test_endlessBanner(self) -> None:
        """A banner of continuation lines that never ends is cut at the line bound."""
        for _ in range(MAX_REPLY_LINES - 1):
            self.protocol.dataReceived(b"220-still greeting you\r\n")
        self.assertNoResult(self.protocol.result)
        self.protocol.dataReceived(b"220-still greeting you\r\n")
        report = self.report()
        self.assertFalse(report.answered)
        self.assertIn("lines", report.error or "")
        self.assertTrue(self.transport.aborted)

    def test_noLineEnd(self) -> None:
        """Bytes without a line end are cut at the line-length bound."""
        self.protocol.dataReceived(b"220 " + b"x" * (MAX_LINE - 10))
        self.assertNoResult(self.protocol.result)
        self.protocol.dataReceived(b"x" * 20)
        report = self.report()
        self.assertFalse(report.answered)
        self.assertIn("longer than", report.error or "")
        self.assertTrue(self.transport.aborted)

    def test_megabytesOfExtensions(self) -> None:
        """
        Megabytes of extensions in one burst are refused at the byte bound,
        without being parsed: answered, no TLS, the connection cut.
        """
        self.protocol.dataReceived(b"220 mx ESMTP\r\n")
        self.said()
        flood = b"250-X-EXTENSION-" + b"A" * 40 + b"\r\n"
        self.protocol.dataReceived(flood * (2 * 1024 * 1024 // len(flood)))
        report = self.report()
        self.assertTrue(report.answered)
        self.assertFalse(report.tls)
        self.assertIn(str(MAX_BYTES), report.error or "")
        self.assertTrue(self.transport.aborted)
        self.assertEqual(self.said(), b"")

    def test_manyExtensionLines(self) -> None:
        """An C{EHLO} reply of more lines than any real server sends is cut."""
        self.protocol.dataReceived(b"220 mx ESMTP\r\n")
        self.protocol.dataReceived(b"250-X\r\n" * MAX_REPLY_LINES + b"250 STARTTLS\r\n")
        report = self.report()
        self.assertFalse(report.starttls_offered)
        self.assertTrue(self.transport.aborted)

    def test_notSMTP(self) -> None:
        """Something that is not an SMTP reply ends the probe at once."""
        self.protocol.dataReceived(b"HTTP/1.1 400 Bad Request\r\n")
        report = self.report()
        self.assertFalse(report.answered)
        self.assertIn("not an SMTP reply", report.error or "")
        self.assertTrue(self.transport.aborted)

    def test_mixedCodes(self) -> None:
        """A multi-line reply whose lines change code is refused."""
        self.protocol.dataReceived(b"220 mx ESMTP\r\n250-a\r\n220 b\r\n")
        self.assertIn("different codes", self.report().error or "")

    def test_ehloReplyTimeout(self) -> None:
        """An C{EHLO} reply that never comes: answered, no TLS, after one step."""
        self.protocol.dataReceived(b"220 mx ESMTP\r\n")
        self.clock.advance(STEP_TIMEOUT)
        report = self.report()
        self.assertTrue(report.answered)
        self.assertFalse(report.tls)
        self.assertIn("EHLO reply", report.error or "")

    def test_bannerShownSafely(self) -> None:
        """Control characters in a banner are not passed on; its length is bounded."""
        self.protocol.dataReceived(b"554 \x1b[31mred\x00 " + b"y" * 500 + b"\r\n")
        banner = self.report().banner or ""
        self.assertTrue(banner.isprintable())
        self.assertLessEqual(len(banner), 200)


class ProbeAddressTests(SynchronousTestCase):
    """L{probeAddress}: connecting, and a connection that fails."""

    def test_refused(self) -> None:
        """A refused connection is a report (not answered), not a failure."""
        reactor = MemoryReactor()
        d = probeAddress(reactor, Clock(), "192.0.2.7", 2525, "probe.example.net")
        host, port, factory, timeout, _ = reactor.tcpClients[0]
        self.assertEqual((host, port, timeout), ("192.0.2.7", 2525, STEP_TIMEOUT))
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        report = self.successResultOf(d)
        self.assertFalse(report.answered)
        self.assertIn("refused", report.error or "")

    def test_conversation(self) -> None:
        """Once connected, the report is the conversation's."""
        reactor = MemoryReactor()
        d = probeAddress(reactor, Clock(), "2001:db8::25", 25, "probe.example.net")
        host, port, factory, _, _ = reactor.tcpClients[0]
        self.assertEqual((host, port), ("2001:db8::25", 25))
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b"220 mx ESMTP\r\n")
        self.assertEqual(transport.value(), b"EHLO probe.example.net\r\n")
        protocol.dataReceived(EHLO_REPLY_PLAIN)
        report = self.successResultOf(d)
        self.assertEqual(report.address, "2001:db8::25")
        self.assertTrue(report.answered)


FUZZ = settings(
    max_examples=200,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

server_fragments = st.one_of(
    st.sampled_from(
        [
            b"220 mx ESMTP\r\n",
            b"220-mx\r\n",
            b"554 go away\r\n",
            b"421 busy\r\n",
            b"250-mx hello\r\n",
            b"250-STARTTLS\r\n",
            b"250 STARTTLS\r\n",
            b"250 8BITMIME\r\n",
            b"220 Ready to start TLS\r\n",
            b"454 no TLS\r\n",
            b"\r\n",
            b"\n",
            b"\r",
            b"2",
            b"x" * 600,
            b"250-" + b"A" * 900 + b"\r\n",
        ]
    ),
    st.binary(max_size=30),
)


class FuzzTests(SynchronousTestCase):
    """Whatever a server sends, in whatever pieces, the probe ends cleanly."""

    @FUZZ
    @given(
        data=st.lists(server_fragments, max_size=25).map(b"".join),
        cut=st.lists(st.integers(min_value=0, max_value=10**6), max_size=12),
        handshake=st.booleans(),
    )
    def test_garbage(self, data: bytes, cut: list[int], handshake: bool) -> None:
        """
        Nothing raises; the probe only ever sends C{EHLO}, C{STARTTLS} and
        C{QUIT}; TLS starts only after C{STARTTLS} was sent; every step ends
        within its timeout, with one report whose claims hold together.
        """
        clock = Clock()
        protocol = SMTPProbeProtocol(clock, "192.0.2.1", "probe.example.net")
        transport = TLSStringTransport()
        protocol.makeConnection(transport)
        points = sorted({0, len(data), *(c % (len(data) + 1) for c in cut)})
        for start, end in itertools.pairwise(points):
            if transport.disconnecting:
                break
            protocol.dataReceived(data[start:end])
        if handshake and transport.tlsOptions is not None and not transport.disconnecting:
            protocol.handshakeCompleted()
        for _ in range(6):
            clock.advance(STEP_TIMEOUT)
        report = self.successResultOf(protocol.result)
        self.assertTrue(transport.disconnecting)
        sent = transport.value().split(b"\r\n")
        self.assertEqual(sent[-1], b"")
        allowed = {b"EHLO probe.example.net", b"STARTTLS", b"QUIT"}
        self.assertTrue(set(sent[:-1]) <= allowed, sent)
        if transport.tlsOptions is not None:
            self.assertIn(b"STARTTLS", sent)
        if report.tls:
            self.assertTrue(report.answered and report.starttls_offered)
        if report.starttls_offered:
            self.assertTrue(report.answered)
        self.assertTrue(report.tls or report.error is not None or report.answered)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(clock.getDelayedCalls(), [])
