"""
Listening sockets: what an endpoint description asks the reactor for, a
listening service whose failure is one line naming the variable, a stale
UNIX socket file replaced, and the sockets worker processes share (the
per-process C{SO_REUSEPORT} sockets that spread TCP load, the parent's
sockets its children inherit).

What a description means is learnt from Twisted itself: the endpoint that
C{serverFromString} builds is asked to listen on a reactor that only
records the call (C{listenTCP}, C{listenSSL}, C{listenUNIX}, all public
interfaces), so every description Twisted accepts is understood exactly as
Twisted understands it, quoting included, without reading the endpoints'
private attributes.

A socket file outlives the process that made it.  Twisted's ``lockfile=1``
only recovers a socket left by an earlier run of this daemon (it looks for
our own stale ``.lock`` file); one left by the Go program, by Dovecot or by a
run without a lock file blocks the start with "Address already in use".  A
socket file that nobody answers on is dead and safe to remove
(L{removeStaleSocket}); one that accepts a connection belongs to a running
server and is left alone, so the start fails loudly instead of stealing it.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.abstract import isIPv6Address
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

log = Logger()


@dataclass(frozen=True)
class TCPListen:
    """A TCP (or TLS over TCP) listener: interface, port and accept queue."""

    port: int
    interface: str
    backlog: int
    #: The TLS context factory of an C{ssl:} listener, else C{None}.
    contextFactory: Any = None


@dataclass(frozen=True)
class UNIXListen:
    """A UNIX socket listener."""

    path: str
    backlog: int


class _Recorded(Exception):
    """Raised by L{_RecordingReactor} once it knows what was asked."""

    def __init__(self, request: TCPListen | UNIXListen) -> None:
        super().__init__(request)
        self.request = request


class _RecordingReactor:
    """Accepts the listen calls of Twisted's server endpoints and records them."""

    def listenTCP(
        self, port: int, factory: Any, backlog: int = 50, interface: str = ""
    ) -> IListeningPort:
        raise _Recorded(TCPListen(port, interface, backlog))

    def listenSSL(
        self,
        port: int,
        factory: Any,
        contextFactory: Any,
        backlog: int = 50,
        interface: str = "",
    ) -> IListeningPort:
        raise _Recorded(TCPListen(port, interface, backlog, contextFactory))

    def listenUNIX(
        self, address: str | bytes, factory: Any, backlog: int = 50, *args: Any, **kwargs: Any
    ) -> IListeningPort:
        path = address.decode() if isinstance(address, bytes) else address
        raise _Recorded(UNIXListen(path, backlog))


def describe(description: str) -> TCPListen | UNIXListen | None:
    """
    What listening on the endpoint C{description} means: a TCP or UNIX
    socket, or C{None} for anything else (a socket passed in by systemd,
    for instance).
    """
    try:
        endpoint = serverFromString(_RecordingReactor(), description)
    except Exception:
        # Not for this reactor (systemd's sockets are looked up as the
        # endpoint is made); the real endpoint reports any real error.
        return None
    outcome: list[Any] = []
    endpoint.listen(_NoFactory()).addBoth(outcome.append)
    if outcome and isinstance(outcome[0], Failure) and isinstance(outcome[0].value, _Recorded):
        return outcome[0].value.request
    return None


class _NoFactory:
    """The factory handed to an endpoint that only records; never used."""


class CannotListen(Exception):
    """
    A listener could not be opened: the one line the operator sees, naming
    the variable that configures it.
    """

    def __init__(self, variable: str, description: str, reason: str) -> None:
        super().__init__(f"{variable}: cannot listen on {description}: {reason}")
        self.variable = variable


def reason(failure: BaseException | None) -> str:
    """The short reason a listen failed: C{address already in use}, ..."""
    cause: BaseException | None = failure
    if isinstance(failure, CannotListenError) and isinstance(failure.socketError, BaseException):
        cause = failure.socketError
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror.lower()
    return str(failure)


class ListeningService(Service):
    """
    Listens on an endpoint when started and stops listening when stopped.

    Unlike Twisted's C{StreamServerEndpointService}, which logs a failure to
    listen and goes on without the listener unless told otherwise through a
    private attribute, a failure here raises L{CannotListen} at once, so the
    daemon never runs without one of its listeners.
    """

    def __init__(
        self,
        endpoint: IStreamServerEndpoint,
        factory: IProtocolFactory,
        variable: str,
        description: str,
    ) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.variable = variable
        self.description = description
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()  # type: ignore[no-untyped-call]
        self._listen()

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        if self.port is None:
            self._listen()

    def _listen(self) -> None:
        outcome: list[Any] = []
        self.endpoint.listen(self.factory).addBoth(outcome.append)
        if not outcome:
            # Every endpoint this daemon is configured with listens at once.
            raise CannotListen(self.variable, self.description, "the endpoint did not listen")
        if isinstance(outcome[0], Failure):
            failure: Failure = outcome[0]
            raise CannotListen(self.variable, self.description, reason(failure.value))
        self.port = outcome[0]

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        port, self.port = self.port, None
        if port is None:
            return defer.succeed(None)
        stopped = port.stopListening()
        return stopped if stopped is not None else defer.succeed(None)


def _bound(family: int, interface: str, port: int) -> tuple[Any, ...]:
    """The socket address to bind for C{interface} and C{port}."""
    if family == socket.AF_INET6:
        # Resolves a scope ("fe80::1%eth0") the way Twisted's own ports do.
        info = socket.getaddrinfo(
            interface, port, family, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST
        )
        return tuple(info[0][4])
    return (interface, port)


def reusePortSocket(family: int, address: tuple[Any, ...], backlog: int) -> socket.socket:
    """
    A listening TCP socket with C{SO_REUSEPORT}: every worker process opens
    one on the same address, and the kernel spreads new connections evenly
    over them (by a hash of the connection's addresses), each process
    accepting only from its own queue.
    """
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def checkFree(family: int, address: tuple[Any, ...]) -> None:
    """
    Raise C{EADDRINUSE} when anything listens on C{address} already.

    C{SO_REUSEPORT} lets any process of the same user join a group of
    listening sockets, so a second daemon started by mistake would share
    the port silently instead of failing; a bind without the option tells.
    """
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)
    finally:
        probe.close()


def adopt(
    reactor: Any, sock: socket.socket, factory: IProtocolFactory, contextFactory: Any
) -> IListeningPort:
    """Serve the listening C{sock} with C{factory} (over TLS with C{contextFactory})."""
    if contextFactory is not None:
        from twisted.protocols.tls import TLSMemoryBIOFactory

        factory = TLSMemoryBIOFactory(contextFactory, False, factory)
    try:
        # The reactor works on its own duplicate of the descriptor.
        port: IListeningPort = reactor.adoptStreamPort(sock.fileno(), sock.family, factory)
    finally:
        sock.close()
    return port


@implementer(IStreamServerEndpoint)
class ReusePortEndpoint:
    """
    A TCP listener of its own for this process, on an address other
    processes listen on too (C{SO_REUSEPORT}).

    @param address: the socket address to bind; port 0 picks a free port
        (the first process does; the others bind the one it got).
    @param check: whether to fail when anything listens there already (the
        first process); the other processes join its group.
    """

    def __init__(
        self,
        reactor: Any,
        request: TCPListen,
        address: tuple[Any, ...] | None = None,
        check: bool = True,
    ) -> None:
        self._reactor = reactor
        self._request = request
        self._address = address
        self._check = check

    def listen(self, factory: IProtocolFactory) -> defer.Deferred[IListeningPort]:
        request = self._request
        family = socket.AF_INET6 if isIPv6Address(request.interface) else socket.AF_INET
        try:
            address = self._address
            if address is None:
                address = _bound(family, request.interface, request.port)
            else:
                family = socket.AF_INET6 if len(address) == 4 else socket.AF_INET
            if self._check and address[1] != 0:
                checkFree(family, address)
            sock = reusePortSocket(family, address, request.backlog)
            return defer.succeed(adopt(self._reactor, sock, factory, request.contextFactory))
        except OSError as exc:
            return defer.fail(CannotListenError(request.interface, request.port, exc))


@implementer(IStreamServerEndpoint)
class AdoptedEndpoint:
    """
    In a child: serve a listener whose socket the parent handed down as a
    file descriptor.

    A TCP listener (C{request} given) gets a socket of its own, bound with
    C{SO_REUSEPORT} to the address the parent's socket has (so a port 0 the
    parent was given stays the same), and the kernel spreads connections
    over the processes' sockets.  Anything else (a UNIX socket, which
    C{SO_REUSEPORT} does not balance; a socket from systemd) is served on
    the parent's very socket: every process waits on the one accept queue
    and whichever the kernel wakes first takes the connection.
    """

    def __init__(
        self, reactor: Any, fd: int, request: TCPListen | UNIXListen | None = None
    ) -> None:
        self._reactor = reactor
        self._fd = fd
        self._request = request

    def listen(self, factory: IProtocolFactory) -> defer.Deferred[IListeningPort]:
        inherited = socket.socket(fileno=self._fd)
        family = inherited.family
        if isinstance(self._request, TCPListen) and family in (socket.AF_INET, socket.AF_INET6):
            # The parent's socket only tells where; this process listens on
            # a socket of its own.
            with inherited:
                address = tuple(inherited.getsockname())
            return ReusePortEndpoint(self._reactor, self._request, address, check=False).listen(
                factory
            )
        inherited.detach()
        try:
            port = self._reactor.adoptStreamPort(self._fd, family, factory)
        except Exception:
            return defer.fail()
        finally:
            # The reactor works on its own duplicate.
            os.close(self._fd)
        return defer.succeed(port)


@implementer(IStreamServerEndpoint)
class RecordingEndpoint:
    """
    Wraps the parent's endpoint so that the listening port it opens can be
    handed to the children.
    """

    def __init__(self, endpoint: IStreamServerEndpoint, name: str, ports: dict[str, Any]) -> None:
        self._endpoint = endpoint
        self._name = name
        self._ports = ports

    def listen(self, factory: IProtocolFactory) -> defer.Deferred[IListeningPort]:
        def record(port: IListeningPort) -> IListeningPort:
            self._ports[self._name] = port
            return port

        return self._endpoint.listen(factory).addCallback(record)


def sharedEndpoint(reactor: Any, description: str) -> IStreamServerEndpoint:
    """
    The parent's endpoint for a listener its children serve too: for TCP a
    socket with C{SO_REUSEPORT} (each child then opens its own on the same
    address, see L{AdoptedEndpoint}), for anything else the endpoint as
    described, whose socket the children inherit.
    """
    request = describe(description)
    if isinstance(request, TCPListen):
        return ReusePortEndpoint(reactor, request)
    endpoint: IStreamServerEndpoint = serverFromString(reactor, description)
    return endpoint


def socketPath(description: str) -> str | None:
    """The file a C{unix:} endpoint description listens on, else C{None}."""
    if not description.startswith("unix:"):
        return None
    request = describe(description)
    return request.path if isinstance(request, UNIXListen) else None


def isDead(path: str) -> bool:
    """Whether C{path} is a socket file that refuses connections."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return False
    except FileNotFoundError:
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError as error:
        return error.errno in (errno.ECONNREFUSED, errno.ENOENT)
    finally:
        probe.close()
    return False


def removeStaleSocket(description: str) -> None:
    """Remove the socket file of a C{unix:} listener when it is dead."""
    path = socketPath(description)
    if path is None or not isDead(path):
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    log.info("Removed the stale socket {path}", path=path)
