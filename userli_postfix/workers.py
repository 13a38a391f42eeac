"""
Worker processes: with C{WORKERS=N} the daemon runs N processes that serve
the same listening sockets, so it can use more than one core.

The parent is the process twistd started.  It listens as usual, then starts
N-1 children, each a fresh C{twistd -n userli-postfix} with the same
configuration, that inherit the listening sockets as file descriptors and
adopt them instead of listening themselves.  Every process accepts
connections from the same sockets; the kernel hands each new connection to
one of them.

 - Only the parent serves C{/metrics}, C{/health} and C{/ready}.  Metrics
   are kept in prometheus-client's multiprocess mode, in a private directory
   the parent creates and removes: counters and histograms add up over
   every process (those of a child that died included), connection gauges
   add up over the live ones.
 - A child watches a pipe from the parent (its standard input): when the
   parent goes away, however it went, the child stops serving and exits.
 - SIGTERM to the parent stops everything gracefully: the parent tells each
   child to stop (SIGTERM), every process stops accepting and lets
   in-flight requests finish, and the parent waits for its children (and
   kills those that outstay the grace period).
 - A child that dies while the daemon runs is replaced after a pause.

More than one worker needs C{REDIS_URL} (checked in L{userli_postfix.config}):
rate-limit windows and the lookup cache must be shared by all processes.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet import abstract, defer, error, fdesc
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

import userli_postfix
from userli_postfix.config import SETTINGS

log = Logger()

#: Set by the parent in each child's environment: which inherited file
#: descriptor is which listener, e.g. C{socketmap=3,policy=4}.  Its presence
#: is what makes a process a child.
LISTENERS_VARIABLE = "USERLI_POSTFIX_INHERITED_LISTENERS"

#: prometheus-client's own variable: where every process keeps its metrics.
METRICS_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"

# The first file descriptor a child gets a listening socket on (0, 1 and 2
# are the pipe from the parent, standard output and standard error).
FIRST_FD = 3

# How long the parent waits for its children at shutdown beyond their own
# grace period for in-flight requests, before it kills them.
STOP_MARGIN = 5.0

# Pause before a child that died is replaced, so a child that cannot start
# does not spin.
RESPAWN_DELAY = 1.0

# The command that starts a child: twistd, as the daemon itself is started.
TWISTD = "from twisted.scripts.twistd import run; run()"


def inheritedListeners(environ: Mapping[str, str] = os.environ) -> dict[str, int] | None:
    """
    The listening sockets this process inherited, by listener name, or
    C{None} when it is not a child.
    """
    value = environ.get(LISTENERS_VARIABLE)
    if not value:
        return None
    listeners: dict[str, int] = {}
    for item in value.split(","):
        name, _, fd = item.partition("=")
        listeners[name] = int(fd)
    return listeners


@implementer(IStreamServerEndpoint)
class AdoptedEndpoint:
    """
    An endpoint whose listening socket already exists: a file descriptor
    inherited from the parent.
    """

    def __init__(self, reactor: Any, fd: int) -> None:
        self._reactor = reactor
        self._fd = fd

    def listen(self, factory: IProtocolFactory) -> defer.Deferred[IListeningPort]:
        probe = socket.socket(fileno=self._fd)
        family = probe.family
        probe.detach()
        try:
            port = self._reactor.adoptStreamPort(self._fd, family, factory)
        except Exception:
            return defer.fail()
        finally:
            # The reactor works on its own duplicate.
            os.close(self._fd)
        acceptOneAtATime(port)
        return defer.succeed(port)


class _OneAtATime:
    """Mixed into a listening port: one C{accept} each time it is readable."""

    @property
    def numberAccepts(self) -> int:
        return 1

    @numberAccepts.setter
    def numberAccepts(self, value: int) -> None:
        """Twisted raises the number after a busy round; it stays 1."""


def acceptOneAtATime(port: Any) -> None:
    """
    Make a shared listening port take one new connection per wake-up.

    Every process is woken when a connection arrives on a socket they
    share, but Twisted's port accepts up to 100 at a time: the first
    process to run takes a whole burst, which is how a load generator or a
    restarted Postfix (all its smtpd processes reconnecting at once) ends
    up with 49 of 50 connections on one worker and the other core idle.
    Taking one at a time lets the processes share out a burst, and a busy
    process, slower to come back for the next, takes fewer.  Connections
    to Postfix's maps are long-lived, so the accept rate this costs never
    matters.
    """
    if hasattr(type(port), "numberAccepts") or not hasattr(port, "numberAccepts"):
        return
    port.__class__ = type(type(port).__name__, (_OneAtATime, type(port)), {})


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
            acceptOneAtATime(port)
            return port

        return self._endpoint.listen(factory).addCallback(record)


def enableMultiprocessMetrics() -> Path:
    """
    Switch prometheus-client to multiprocess mode for this process and the
    children it will start, in a new private directory.

    Must run before any metric is created.  The directory is removed when
    the process exits.
    """
    from prometheus_client import values

    directory = Path(tempfile.mkdtemp(prefix="userli-postfix-metrics-"))
    os.environ[METRICS_VARIABLE] = str(directory)
    # prometheus-client picks its value class when it is imported, which
    # twistd did long before the options were read; pick it again.
    values.ValueClass = values.get_value_class()
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return directory


def aggregatedRegistry() -> Any:
    """
    A registry that reads the metrics of every process from the
    multiprocess directory, plus this process's own process metrics.
    """
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector
    from prometheus_client.process_collector import ProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    ProcessCollector(registry=registry)
    return registry


def childEnvironment(
    environ: Mapping[str, str], options: Mapping[str, str | None] | None = None
) -> dict[str, str]:
    """
    The environment that gives a child the same configuration as this
    process: the environment, with every setting given as a twistd option
    turned into its variable (options win over the environment, so the
    result is the same), and the package importable as it is here.
    """
    env = dict(environ)
    for setting in SETTINGS:
        value = (options or {}).get(setting.option)
        if value is not None:
            env[setting.variable] = value
    here = str(Path(userli_postfix.__file__).resolve().parent.parent)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if here not in paths:
        env["PYTHONPATH"] = os.pathsep.join([here, *paths])
    return env


class _ChildProtocol(ProcessProtocol):
    """Tells the pool when its child has ended."""

    def __init__(self, ended: Callable[[_ChildProtocol, Failure], None]) -> None:
        self._ended = ended
        self.pid: int | None = None

    def connectionMade(self) -> None:
        self.pid = self.transport.pid  # type: ignore[union-attr]

    def processEnded(self, reason: Failure) -> None:
        self._ended(self, reason)


class WorkerPool(Service):
    """
    The parent's children: started once the listeners are open, replaced
    when they die, stopped (SIGTERM, then SIGKILL after a grace period) when
    the daemon stops.

    @param ports: the parent's listening ports by name, filled by
        L{RecordingEndpoint}s before this service starts.
    @param metricsDirectory: the multiprocess metrics directory, removed
        once every child has ended.
    """

    def __init__(
        self,
        reactor: Any,
        count: int,
        ports: Mapping[str, Any],
        environ: Mapping[str, str],
        grace: float,
        metricsDirectory: Path | None = None,
        executable: str = sys.executable,
        arguments: tuple[str, ...] = ("-c", TWISTD, "-n", "--pidfile=", "userli-postfix"),
    ) -> None:
        self._reactor = reactor
        self._count = count
        self._ports = ports
        self._environ = dict(environ)
        self._grace = grace
        self._metricsDirectory = metricsDirectory
        self._executable = executable
        self._arguments = arguments
        self.children: dict[_ChildProtocol, Any] = {}
        self._stopping = False
        self._allEnded: list[defer.Deferred[None]] = []
        self._respawns: list[Any] = []

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        # Once the reactor runs, this process handles SIGTERM: a stop asked
        # for while the children start up then still stops them.
        self._reactor.callWhenRunning(self._spawnAll)

    def _spawnAll(self) -> None:
        if self._stopping:
            return
        for _ in range(self._count - 1):
            self._spawn()
        log.info(
            "Serving with {count} worker processes (this one and {children} children)",
            count=self._count,
            children=self._count - 1,
        )

    def _spawn(self) -> None:
        childFDs: dict[int, int | str] = {0: "w", 1: 1, 2: 2}
        names = []
        for offset, (name, port) in enumerate(sorted(self._ports.items())):
            fd = FIRST_FD + offset
            childFDs[fd] = port.fileno()
            names.append(f"{name}={fd}")
        env = dict(self._environ)
        env[LISTENERS_VARIABLE] = ",".join(names)
        if self._metricsDirectory is not None:
            env[METRICS_VARIABLE] = str(self._metricsDirectory)
        protocol = _ChildProtocol(self._ended)
        transport = self._reactor.spawnProcess(
            protocol,
            self._executable,
            [self._executable, *self._arguments],
            env=env,
            childFDs=childFDs,
        )
        self.children[protocol] = transport

    def _ended(self, protocol: _ChildProtocol, reason: Failure) -> None:
        self.children.pop(protocol, None)
        if self._metricsDirectory is not None and protocol.pid is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(protocol.pid, str(self._metricsDirectory))
        if self._stopping:
            if not self.children:
                waiting, self._allEnded = self._allEnded, []
                for d in waiting:
                    d.callback(None)
            return
        log.error(
            "Worker process {pid} ended unexpectedly ({reason}); starting another",
            pid=protocol.pid,
            reason=reason.value,
        )
        self._respawns.append(self._reactor.callLater(RESPAWN_DELAY, self._respawn))

    def _respawn(self) -> None:
        self._respawns = [call for call in self._respawns if call.active()]
        if not self._stopping:
            self._spawn()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        self._stopping = True
        for call in self._respawns:
            if call.active():
                call.cancel()
        self._respawns = []
        for transport in list(self.children.values()):
            self._signal(transport, "TERM")
        if self.children:
            done: defer.Deferred[None] = defer.Deferred()
            self._allEnded.append(done)

            def killRest() -> None:
                for transport in list(self.children.values()):
                    log.warn("Worker process {pid} did not stop; killing it", pid=transport.pid)
                    self._signal(transport, "KILL")

            timer = self._reactor.callLater(self._grace + STOP_MARGIN, killRest)

            def finished(result: None) -> None:
                if timer.active():
                    timer.cancel()

            done.addCallback(finished)
        else:
            done = defer.succeed(None)
        return done.addCallback(lambda _: self._cleanUp())

    @staticmethod
    def _signal(transport: Any, name: str) -> None:
        try:
            transport.signalProcess(name)
        except error.ProcessExitedAlready:
            pass

    def _cleanUp(self) -> None:
        if self._metricsDirectory is not None:
            shutil.rmtree(self._metricsDirectory, ignore_errors=True)


class _ParentPipe(abstract.FileDescriptor):
    """The read end of the pipe from the parent; its end of file means the parent is gone."""

    def __init__(self, reactor: Any, fd: int, gone: Callable[[], None]) -> None:
        super().__init__(reactor)
        self._fd = fd
        self._gone = gone
        fdesc.setNonBlocking(fd)

    def fileno(self) -> int:
        return self._fd

    def doRead(self) -> Any:
        return fdesc.readFromFD(self._fd, lambda data: None)

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        self._gone()


class ParentWatch(Service):
    """
    In a child: stop the daemon when the parent is gone (the pipe on
    standard input reaches its end), so that no child outlives its parent,
    even one that was killed.
    """

    def __init__(self, reactor: Any, fd: int = 0) -> None:
        self._reactor = reactor
        self._fd = fd
        self._pipe: _ParentPipe | None = None
        self._parent = os.getppid()

    def startService(self) -> None:
        super().startService()
        self._parent = os.getppid()
        self._pipe = _ParentPipe(self._reactor, self._fd, self._parentGone)
        self._pipe.startReading()

    def stopService(self) -> None:
        super().stopService()
        if self._pipe is not None:
            self._pipe.stopReading()
            self._pipe = None

    def _parentGone(self) -> None:
        if self._pipe is None:
            return
        log.warn("The parent process is gone; stopping this worker")
        directory = os.environ.get(METRICS_VARIABLE)
        if directory:
            # The parent cannot remove the metrics directory any more.
            atexit.register(_removeMetrics, Path(directory), (self._parent, os.getpid()))
        try:
            self._reactor.stop()
        except error.ReactorNotRunning:
            pass


def _removeMetrics(directory: Path, pids: tuple[int, ...]) -> None:
    """
    Remove the metrics files of C{pids} and of every process that no longer
    runs (children that died earlier), and the directory once it is empty:
    the last worker to exit after its parent died leaves nothing behind.
    """
    for path in directory.glob("*.db"):
        pid = int(path.stem.rsplit("_", 1)[-1])
        if pid in pids or not _running(pid):
            path.unlink(missing_ok=True)
    try:
        directory.rmdir()
    except OSError:
        # Another worker's files are still there; the last one removes it.
        pass


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
