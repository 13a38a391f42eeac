"""
Worker processes: with C{WORKERS=N} the daemon runs N processes that serve
the same listeners, so it can use more than one core.

The parent is the process twistd started.  It listens as usual, then starts
N-1 children, each a fresh C{twistd -n userli-postfix} with the same
configuration, that inherit the parent's listening sockets as file
descriptors (see L{userli_postfix.endpoints.AdoptedEndpoint}):

 - A TCP listener is one socket per process, all bound to the same address
   with C{SO_REUSEPORT}: the kernel spreads new connections evenly over
   them, and each process accepts from its own queue.
 - A UNIX socket (which C{SO_REUSEPORT} does not balance) is the parent's
   one socket, served by every process: each waits on the shared accept
   queue, and the process the kernel wakes first takes the connection, so
   the busier a process, the fewer it takes.

More:

 - Only the parent serves C{/metrics}, C{/health} and C{/ready}.  Metrics
   are kept in prometheus-client's multiprocess mode, in a private directory
   the parent creates (L{multiprocess}) and removes: counters and histograms
   add up over every process that ever served (those of a process that
   ended are kept in an archive, L{multiprocess.retire}), connection gauges
   over the live ones.
 - A child watches a pipe from the parent (its standard input): when the
   parent goes away, however it went, the child stops serving and exits.
 - SIGTERM to the parent stops everything gracefully and in parallel: the
   parent tells each child to stop (SIGTERM) as it stops accepting itself,
   every process lets its in-flight requests finish within the grace, and
   the parent kills the children that outstay it.
 - A child that dies while the daemon runs is replaced after a pause that
   doubles while its replacements die young (L{restartDelay}); starting
   one is tried again however it fails.

More than one worker needs C{REDIS_URL} (checked in L{userli_postfix.config}):
rate-limit windows and the lookup cache must be shared by all processes.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet import abstract, defer, error, fdesc
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import LogEvent, Logger, globalLogPublisher
from twisted.python.failure import Failure

import userli_postfix
from userli_postfix import logs, multiprocess
from userli_postfix.config import SETTINGS
from userli_postfix.metrics import Metrics

log = Logger()

#: Set by the parent in each child's environment: which inherited file
#: descriptor is which listener, e.g. C{socketmap=3,policy=4}.  Its presence
#: is what makes a process a child.
LISTENERS_VARIABLE = multiprocess.LISTENERS_VARIABLE

#: prometheus-client's own variable: where every process keeps its metrics
#: (chosen by L{multiprocess.prepare}).
METRICS_VARIABLE = multiprocess.METRICS_VARIABLE

# The first file descriptor a child gets a listening socket on (0, 1 and 2
# are the pipe from the parent, and standard output and error, pipes to it).
FIRST_FD = 3

# How long the parent waits for its children at shutdown beyond their own
# grace period for in-flight requests, before it kills them: every process
# drains at the same time, so the whole stop takes the grace and this at
# most (8 + 1 s), within the 10 s a container runtime waits before SIGKILL.
STOP_MARGIN = 1.0

#: Pause before a child that died is replaced, so that one that cannot
#: start does not spin; it doubles with every replacement that dies young,
#: up to L{MAX_RESTART_DELAY}.
RESTART_DELAY = 1.0

#: The longest pause between two starts of a worker that keeps dying.
MAX_RESTART_DELAY = 60.0

#: A worker that ran this long had started fine: when it ends, its
#: replacement comes after L{RESTART_DELAY} again.
STABLE_AFTER = 10.0

# The command that starts a child: twistd, as the daemon itself is started.
TWISTD = "from twisted.scripts.twistd import run; run()"


def restartDelay(failures: int) -> float:
    """
    The pause before starting a worker again when C{failures} workers in a
    row in its place ended before L{STABLE_AFTER} (or could not be
    started): L{RESTART_DELAY}, doubled for each, at most
    L{MAX_RESTART_DELAY}.
    """
    doublings = min(max(failures, 0), 32)
    return min(RESTART_DELAY * (1 << doublings), MAX_RESTART_DELAY)


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


# A worker's output line longer than this is logged in pieces rather than
# held in memory until its end comes.
MAX_LINE = 1024 * 1024


class _Lines:
    """Splits what a pipe delivers into lines; the last one may come without its newline."""

    def __init__(self, line: Callable[[bytes], None]) -> None:
        self._line = line
        self._buffer = b""

    def write(self, data: bytes) -> None:
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        for line in lines:
            self._line(line)
        if len(self._buffer) > MAX_LINE:
            self.flush()

    def flush(self) -> None:
        rest, self._buffer = self._buffer, b""
        if rest:
            self._line(rest)


class _ChildProtocol(ProcessProtocol):
    """
    Tells the pool when its child has ended, and logs what the child
    writes: its log events (see L{logs.workerObserver}) as they are,
    through this process's log, so they go where this process's own go;
    any other line it writes (a start-up failure before its log begins)
    as a line of text from that worker.
    """

    def __init__(
        self,
        ended: Callable[[_ChildProtocol, Failure], None],
        publish: Callable[[LogEvent], None] = globalLogPublisher,
    ) -> None:
        self._ended = ended
        self._publish = publish
        self.pid: int | None = None
        self._stdout = _Lines(self._outLine)
        self._stderr = _Lines(self._errLine)

    def connectionMade(self) -> None:
        self.pid = self.transport.pid  # type: ignore[union-attr]

    def outReceived(self, data: bytes) -> None:
        self._stdout.write(data)

    def errReceived(self, data: bytes) -> None:
        self._stderr.write(data)

    def _outLine(self, line: bytes) -> None:
        event = logs.relayedEvent(line)
        if event is not None:
            self._publish(event)
        elif line.strip():
            log.info("Worker process {pid}: {line}", pid=self.pid, line=_text(line))

    def _errLine(self, line: bytes) -> None:
        if line.strip():
            log.error("Worker process {pid}: {line}", pid=self.pid, line=_text(line))

    def childConnectionLost(self, childFD: int) -> None:
        if childFD == 1:
            self._stdout.flush()
        elif childFD == 2:
            self._stderr.flush()

    def processEnded(self, reason: Failure) -> None:
        self._stdout.flush()
        self._stderr.flush()
        self._ended(self, reason)


def _text(line: bytes) -> str:
    return line.rstrip(b"\r").decode("utf-8", "replace")


class _Slot:
    """
    One of the children the pool keeps running: the one serving now, if
    any, and how the starts in this place went.
    """

    def __init__(self) -> None:
        self.protocol: _ChildProtocol | None = None
        self.transport: Any = None
        self.started = 0.0
        # Workers in this place that ended young (or could not be started)
        # in a row.
        self.failures = 0
        self.pending: IDelayedCall | None = None


class WorkerPool(Service):
    """
    The parent's children: started once the listeners are open, replaced
    when they die (after a pause that grows while they keep dying), stopped
    (SIGTERM, then SIGKILL after a grace period) when the daemon stops.

    @param ports: the parent's listening ports by name, filled by
        L{userli_postfix.endpoints.RecordingEndpoint}s before this service starts.
    @param metricsDirectory: the multiprocess metrics directory, removed
        once every child has ended.
    @param metrics: where replacements are counted.
    """

    def __init__(
        self,
        reactor: Any,
        count: int,
        ports: Mapping[str, Any],
        environ: Mapping[str, str],
        grace: float,
        metrics: Metrics,
        metricsDirectory: Path | None = None,
        executable: str = sys.executable,
        arguments: tuple[str, ...] = ("-c", TWISTD, "-n", "--pidfile=", "userli-postfix"),
    ) -> None:
        self._reactor = reactor
        self._count = count
        self._ports = ports
        self._environ = dict(environ)
        self._grace = grace
        self._metrics = metrics
        self._metricsDirectory = metricsDirectory
        self._executable = executable
        self._arguments = arguments
        self._slots = [_Slot() for _ in range(count - 1)]
        self._stopping = False
        self._allEnded: list[defer.Deferred[None]] = []

    @property
    def configured(self) -> int:
        """How many processes serve when all run: this one and its children."""
        return self._count

    @property
    def alive(self) -> int:
        """How many processes serve now: this one and its running children."""
        return 1 + len(self.children)

    @property
    def children(self) -> dict[_ChildProtocol, Any]:
        """The running children: their process protocols and transports."""
        return {slot.protocol: slot.transport for slot in self._slots if slot.protocol is not None}

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._stopping = False
        # Once the reactor runs, this process handles SIGTERM: a stop asked
        # for while the children start up then still stops them.
        self._reactor.callWhenRunning(self._startAll)

    def _startAll(self) -> None:
        if self._stopping:
            return
        for slot in self._slots:
            self._start(slot)
        log.info(
            "Serving with {count} worker processes (this one and {children} children)",
            count=self._count,
            children=self._count - 1,
        )

    def _start(self, slot: _Slot) -> None:
        """Start a child in C{slot}; if that fails, try again after a pause."""
        try:
            slot.protocol, slot.transport = self._spawn(slot)
        except Exception:
            delay = self._later(slot)
            log.failure(
                "Could not start a worker process; trying again in {delay:g} s", delay=delay
            )
            return
        slot.started = self._reactor.seconds()

    def _spawn(self, slot: _Slot) -> tuple[_ChildProtocol, Any]:
        # Standard output and error are pipes this process reads: it logs
        # the child's lines (see L{_ChildProtocol}).
        childFDs: dict[int, int | str] = {0: "w", 1: "r", 2: "r"}
        names = []
        for offset, (name, port) in enumerate(sorted(self._ports.items())):
            fd = FIRST_FD + offset
            childFDs[fd] = port.fileno()
            names.append(f"{name}={fd}")
        env = dict(self._environ)
        env[LISTENERS_VARIABLE] = ",".join(names)
        if self._metricsDirectory is not None:
            env[METRICS_VARIABLE] = str(self._metricsDirectory)
        protocol = _ChildProtocol(lambda protocol, reason: self._ended(slot, protocol, reason))
        transport = self._reactor.spawnProcess(
            protocol,
            self._executable,
            [self._executable, *self._arguments],
            env=env,
            childFDs=childFDs,
        )
        return protocol, transport

    def _later(self, slot: _Slot) -> float:
        """Start a child in C{slot} after the pause its failures call for; that pause."""
        delay = restartDelay(slot.failures)
        slot.failures += 1
        slot.pending = self._reactor.callLater(delay, self._restart, slot)
        return delay

    def _restart(self, slot: _Slot) -> None:
        # Never while stopping: the stop cancels what is pending.
        slot.pending = None
        self._metrics.worker_restarts.inc()
        self._start(slot)
        if slot.protocol is not None:
            log.info("Worker process {pid} started", pid=slot.protocol.pid)

    def _ended(self, slot: _Slot, protocol: _ChildProtocol, reason: Failure) -> None:
        slot.protocol = slot.transport = None
        if self._metricsDirectory is not None and protocol.pid is not None:
            try:
                multiprocess.retire(self._metricsDirectory, protocol.pid)
            except Exception:
                log.failure("Could not keep the metrics of worker process {pid}", pid=protocol.pid)
        if self._stopping:
            if not self.children:
                waiting, self._allEnded = self._allEnded, []
                for d in waiting:
                    d.callback(None)
            return
        lived = self._reactor.seconds() - slot.started
        if lived >= STABLE_AFTER:
            slot.failures = 0
        delay = self._later(slot)
        log.error(
            "Worker process {pid} ended unexpectedly after {lived:.1f} s ({reason}); "
            "starting another in {delay:g} s",
            pid=protocol.pid,
            lived=lived,
            reason=reason.value,
            delay=delay,
        )

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        self._stopping = True
        for slot in self._slots:
            if slot.pending is not None and slot.pending.active():
                slot.pending.cancel()
            slot.pending = None
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
        super().connectionLost(reason)  # type: ignore[no-untyped-call]
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
        super().startService()  # type: ignore[no-untyped-call]
        self._parent = os.getppid()
        self._pipe = _ParentPipe(self._reactor, self._fd, self._parentGone)
        self._pipe.startReading()  # type: ignore[no-untyped-call]

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._pipe is not None:
            self._pipe.stopReading()  # type: ignore[no-untyped-call]
            self._pipe = None

    def _parentGone(self) -> None:
        if self._pipe is None:
            return
        log.warn("The parent process is gone; stopping this worker")
        directory = os.environ.get(METRICS_VARIABLE)
        if directory:
            # The parent cannot remove the metrics directory any more.
            atexit.register(
                multiprocess.removeLeftovers, Path(directory), (self._parent, os.getpid())
            )
        try:
            self._reactor.stop()
        except error.ReactorNotRunning:
            pass
