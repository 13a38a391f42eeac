"""
Tests for L{userli_postfix.listening}: what endpoint descriptions mean, and
a listener that fails with one line naming its variable.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from userli_postfix.listening import (
    CannotListen,
    ListeningService,
    TCPListen,
    UNIXListen,
    describe,
    reason,
)


class DescribeTests(SynchronousTestCase):
    """L{describe} reads descriptions as Twisted's endpoints do."""

    def test_tcp(self) -> None:
        """Port, interface and accept queue of C{tcp:} descriptions, defaults included."""
        self.assertEqual(
            describe("tcp:10001:interface=127.0.0.1:backlog=4096"),
            TCPListen(10001, "127.0.0.1", 4096),
        )
        self.assertEqual(describe("tcp:10001"), TCPListen(10001, "", 50))

    def test_tcp6(self) -> None:
        """C{tcp6:} with an escaped IPv6 interface; its default is every IPv6 address."""
        self.assertEqual(
            describe("tcp6:10001:interface=\\:\\:1:backlog=10"), TCPListen(10001, "::1", 10)
        )
        self.assertEqual(describe("tcp6:10001"), TCPListen(10001, "::", 50))

    def test_unix(self) -> None:
        """The path of a C{unix:} description, escapes undone."""
        self.assertEqual(
            describe("unix:/run/x\\:y.sock:mode=660:lockfile=1:backlog=7"),
            UNIXListen("/run/x:y.sock", 7),
        )

    def test_other(self) -> None:
        """A socket passed in by systemd is neither: nothing to bind."""
        self.assertIsNone(describe("systemd:domain=INET:index=0"))


class ReasonTests(SynchronousTestCase):
    """L{reason}: the short why of a failure to listen."""

    def test_in_use(self) -> None:
        """Twisted's CannotListenError and a plain OSError give the system's words."""
        inUse = OSError(errno.EADDRINUSE, "Address already in use")
        self.assertEqual(reason(CannotListenError("", 1, inUse)), "address already in use")
        self.assertEqual(reason(inUse), "address already in use")

    def test_other(self) -> None:
        """Anything else is its text."""
        self.assertEqual(reason(ValueError("odd")), "odd")


class FailingEndpoint:
    """An endpoint whose listen fails at once."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def listen(self, factory: Any) -> defer.Deferred[Any]:
        return defer.fail(self.error)


class ListeningServiceTests(SynchronousTestCase):
    """L{ListeningService}."""

    def test_listens_and_stops(self) -> None:
        """Started, it listens; stopped, the port stops listening."""
        from twisted.internet.endpoints import TCP4ServerEndpoint

        reactor = MemoryReactor()
        factory = object()
        service = ListeningService(
            TCP4ServerEndpoint(reactor, 10001),
            factory,  # type: ignore[arg-type]
            "SOCKETMAP_LISTEN_ADDR",
            "tcp:10001",
        )
        service.privilegedStartService()
        service.startService()
        self.assertEqual(len(reactor.tcpServers), 1)
        self.assertIs(reactor.tcpServers[0][1], factory)
        self.successResultOf(service.stopService())
        self.assertIsNone(service.port)

    def test_failure_names_variable(self) -> None:
        """A failure to listen raises at once, as one line naming the variable."""
        inUse = CannotListenError("", 10001, OSError(errno.EADDRINUSE, "Address already in use"))
        service = ListeningService(
            FailingEndpoint(inUse),  # type: ignore[arg-type]
            object(),  # type: ignore[arg-type]
            "POLICY_LISTEN_ADDR",
            "tcp:10003",
        )
        with self.assertRaises(CannotListen) as caught:
            service.privilegedStartService()
        self.assertEqual(
            str(caught.exception),
            "POLICY_LISTEN_ADDR: cannot listen on tcp:10003: address already in use",
        )
        self.assertEqual(caught.exception.variable, "POLICY_LISTEN_ADDR")

    def test_real_port_in_use(self) -> None:
        """With a real reactor and a taken port: the same line."""
        from twisted.internet import reactor
        from twisted.internet.endpoints import serverFromString

        holder = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(holder.close)
        port = holder.getsockname()[1]
        description = f"tcp:{port}:interface=127.0.0.1"
        service = ListeningService(
            serverFromString(reactor, description),
            object(),  # type: ignore[arg-type]
            "SOCKETMAP_LISTEN_ADDR",
            description,
        )
        with self.assertRaises(CannotListen) as caught:
            service.privilegedStartService()
        self.assertTrue(str(caught.exception).endswith(": address already in use"))


class TLSTests(SynchronousTestCase):
    """An C{ssl:} listener shared by worker processes stays TLS."""

    def test_ssl_described_and_wrapped(self) -> None:
        """
        C{ssl:} gives the port, interface and TLS context; the per-process
        socket then serves the factory wrapped in TLS, as Twisted's own SSL
        port does.
        """
        import os
        import shutil
        import tempfile

        from twisted.protocols.tls import TLSMemoryBIOFactory

        from tests.certificates import self_signed
        from userli_postfix.listening import ReusePortEndpoint

        certificate, key = self_signed()
        directory = tempfile.mkdtemp()
        pem = os.path.join(directory, "server.pem")
        with open(pem, "wb") as f:
            f.write(key + certificate)
        self.addCleanup(shutil.rmtree, directory)
        request = describe(f"ssl:0:interface=127.0.0.1:privateKey={pem}:certKey={pem}")
        assert isinstance(request, TCPListen)
        self.assertEqual((request.port, request.interface), (0, "127.0.0.1"))
        self.assertIsNotNone(request.contextFactory)

        adopted: list[Any] = []

        class Reactor:
            def adoptStreamPort(self, fd: int, family: int, factory: Any) -> Any:
                adopted.append(factory)
                return object()

        factory = object()
        self.successResultOf(ReusePortEndpoint(Reactor(), request).listen(factory))  # type: ignore[arg-type]
        self.assertIsInstance(adopted[0], TLSMemoryBIOFactory)
        self.assertIs(adopted[0].wrappedFactory, factory)
