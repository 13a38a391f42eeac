"""
Tests for L{userli_postfix.endpoints}: what endpoint descriptions mean, a
listener that fails with one line naming its variable, the sockets worker
processes share, and dead socket files replaced while live ones are kept.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import tempfile
from typing import Any

from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from userli_postfix.endpoints import (
    AdoptedEndpoint,
    CannotListen,
    ListeningService,
    RecordingEndpoint,
    ReusePortEndpoint,
    TCPListen,
    UNIXListen,
    describe,
    isDead,
    reason,
    removeStaleSocket,
    sharedEndpoint,
    socketPath,
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
        from userli_postfix.endpoints import ReusePortEndpoint

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


class FakePort:
    """A listening port with a file descriptor."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def fileno(self) -> int:
        return self._fd


class FakeEndpoint:
    """A server endpoint that 'listens' at once on a L{FakePort}."""

    def __init__(self, port: FakePort) -> None:
        self.port = port

    def listen(self, factory: Any) -> defer.Deferred[Any]:
        return defer.succeed(self.port)


class RecordingEndpointTests(SynchronousTestCase):
    """L{RecordingEndpoint} keeps the parent's ports for the children."""

    def test_records(self) -> None:
        """The port the wrapped endpoint opens is recorded under the listener name."""
        ports: dict[str, Any] = {}
        port = FakePort(7)
        result = self.successResultOf(
            RecordingEndpoint(FakeEndpoint(port), "socketmap", ports).listen(object())  # type: ignore[arg-type]
        )
        self.assertIs(result, port)
        self.assertEqual(ports, {"socketmap": port})


class RecordingReactor:
    """Records the sockets it is asked to adopt, and serves them as they are."""

    def __init__(self) -> None:
        self.adopted: list[tuple[int, int, Any]] = []

    def adoptStreamPort(self, fd: int, family: int, factory: Any) -> Any:
        self.adopted.append((fd, family, factory))
        return FakePort(fd)


class AdoptingReactor(RecordingReactor):
    """Adopts like the real reactor: on a duplicate of the descriptor, kept open."""

    def adoptStreamPort(self, fd: int, family: int, factory: Any) -> Any:
        self.adopted.append((fd, family, factory))
        own = os.dup(fd)
        return FakePort(own)


def listening(family: int = socket.AF_INET) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0) if family == socket.AF_INET else ("::1", 0))
    sock.listen(1)
    return sock


class ReusePortTests(SynchronousTestCase):
    """Worker processes' TCP listeners: one C{SO_REUSEPORT} socket each."""

    def setUp(self) -> None:
        self.reactor = AdoptingReactor()

    def listen(self, endpoint: Any) -> socket.socket:
        """The socket the reactor was given to serve (a duplicate, closed at cleanup)."""
        port = self.successResultOf(endpoint.listen(object()))
        sock = socket.socket(fileno=port.fileno())
        self.addCleanup(sock.close)
        return sock

    def test_processes_share_the_port(self) -> None:
        """
        The first process's socket and a second one on the same address
        both listen, and the kernel spreads connections over them.
        """
        first = self.listen(ReusePortEndpoint(self.reactor, TCPListen(0, "127.0.0.1", 50)))
        address = first.getsockname()
        second = self.listen(
            ReusePortEndpoint(self.reactor, TCPListen(0, "127.0.0.1", 50), address, check=False)
        )
        self.assertEqual(second.getsockname(), address)
        clients = []
        for _ in range(64):
            client = socket.create_connection(address)
            self.addCleanup(client.close)
            clients.append(client)
        accepted = []
        for sock in (first, second):
            sock.setblocking(False)
            count = 0
            while True:
                try:
                    connection, _ = sock.accept()
                except BlockingIOError:
                    break
                connection.close()
                count += 1
            accepted.append(count)
        self.assertEqual(sum(accepted), 64)
        self.assertTrue(all(accepted), accepted)

    def test_port_in_use(self) -> None:
        """An address another program listens on is refused: address already in use."""
        other = listening()
        self.addCleanup(other.close)
        port = other.getsockname()[1]
        failure = self.failureResultOf(
            ReusePortEndpoint(self.reactor, TCPListen(port, "127.0.0.1", 50)).listen(object())  # type: ignore[arg-type]
        )
        self.assertEqual(reason(failure.value), "address already in use")

    def test_second_daemon_refused(self) -> None:
        """
        A second daemon on the same address fails as it would without
        C{SO_REUSEPORT}, instead of joining the first one's group.
        """
        first = self.listen(ReusePortEndpoint(self.reactor, TCPListen(0, "127.0.0.1", 50)))
        port = first.getsockname()[1]
        self.failureResultOf(
            ReusePortEndpoint(self.reactor, TCPListen(port, "127.0.0.1", 50)).listen(object())  # type: ignore[arg-type]
        )

    def test_ipv6(self) -> None:
        """An IPv6 interface gets an IPv6 socket."""
        try:
            probe = listening(socket.AF_INET6)
        except OSError:
            self.skipTest("no IPv6 loopback here")
        probe.close()
        sock = self.listen(ReusePortEndpoint(self.reactor, TCPListen(0, "::1", 50)))
        self.assertEqual(sock.family, socket.AF_INET6)
        self.assertEqual(sock.getsockname()[0], "::1")

    def test_shared_endpoint(self) -> None:
        """The parent shares TCP listeners by C{SO_REUSEPORT}, the rest as described."""
        self.assertIsInstance(
            sharedEndpoint(self.reactor, "tcp:10001:interface=127.0.0.1"), ReusePortEndpoint
        )
        self.assertNotIsInstance(
            sharedEndpoint(self.reactor, "unix:/run/x.sock"), ReusePortEndpoint
        )


class AdoptedEndpointTests(SynchronousTestCase):
    """L{AdoptedEndpoint}: how a child serves what it inherited."""

    def test_tcp_own_socket(self) -> None:
        """
        For a TCP listener the child binds a socket of its own to the
        inherited socket's address (port 0 resolved included) and closes
        the inherited descriptor.
        """
        parent = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        parent.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        parent.bind(("127.0.0.1", 0))
        parent.listen(1)
        self.addCleanup(parent.close)
        fd = os.dup(parent.fileno())
        reactor = AdoptingReactor()
        request = TCPListen(0, "127.0.0.1", 50)
        port: Any = self.successResultOf(
            AdoptedEndpoint(reactor, fd, request).listen(object())  # type: ignore[arg-type]
        )
        own = socket.socket(fileno=port.fileno())
        self.addCleanup(own.close)
        self.assertEqual(own.getsockname(), parent.getsockname())
        self.assertNotEqual(
            os.fstat(own.fileno()).st_ino, os.fstat(parent.fileno()).st_ino, "a socket of its own"
        )
        self.assertEqual(own.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT), 1)

    def test_unix_shared(self) -> None:
        """A UNIX socket is served as inherited: the parent's socket itself."""
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "s.sock")
        listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listening.bind(path)
        listening.listen(1)
        self.addCleanup(listening.close)
        fd = os.dup(listening.fileno())
        reactor = RecordingReactor()
        factory = object()
        port: Any = self.successResultOf(
            AdoptedEndpoint(reactor, fd, UNIXListen(path, 50)).listen(factory)  # type: ignore[arg-type]
        )
        self.assertEqual(reactor.adopted, [(fd, socket.AF_UNIX, factory)])
        self.assertEqual(port.fileno(), fd)
        self.assertRaises(OSError, os.fstat, fd)


class UnixSocketTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp()
        self.path = os.path.join(self.directory, "auth")

    def tearDown(self) -> None:
        for name in os.listdir(self.directory):
            os.unlink(os.path.join(self.directory, name))
        os.rmdir(self.directory)

    def bound(self, listen: bool) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self.path)
        if listen:
            sock.listen(1)
        return sock

    def test_socketPath(self) -> None:
        """The path comes out of unix: descriptions, escapes undone; other types have none."""
        self.assertEqual(socketPath("unix:/run/x\\:y.sock:mode=660:lockfile=1"), "/run/x:y.sock")
        self.assertIsNone(socketPath("tcp:10001"))

    def test_deadSocketRemoved(self) -> None:
        """A socket file nobody listens on (left by another program) is removed."""
        self.bound(listen=False).close()
        self.assertTrue(isDead(self.path))
        removeStaleSocket(f"unix:{self.path}:mode=666")
        self.assertFalse(os.path.exists(self.path))

    def test_liveSocketKept(self) -> None:
        """A socket a running server accepts on is left alone."""
        server = self.bound(listen=True)
        self.addCleanup(server.close)
        self.assertFalse(isDead(self.path))
        removeStaleSocket(f"unix:{self.path}")
        self.assertTrue(os.path.exists(self.path))

    def test_regularFileKept(self) -> None:
        """A file that is not a socket is never deleted."""
        with open(self.path, "w") as f:
            f.write("data")
        removeStaleSocket(f"unix:{self.path}")
        self.assertTrue(os.path.exists(self.path))

    def test_missingIsFine(self) -> None:
        """No file at all: nothing to do, no error."""
        removeStaleSocket(f"unix:{self.path}")
        self.assertFalse(os.path.exists(self.path))
