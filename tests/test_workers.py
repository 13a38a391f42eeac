"""
Tests for L{userli_postfix.workers} and the C{WORKERS} setting: what the
parent hands its children (sockets, configuration, metrics directory), how
it replaces and stops them, and when more than one worker is refused.

Processes are spawned on a fake reactor here; tests/integration/test_workers.py
runs real ones.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, error
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

import userli_postfix
from userli_postfix.config import MAX_WORKERS, Config, ConfigError
from userli_postfix.listening import ReusePortEndpoint, TCPListen, UNIXListen
from userli_postfix.logs import workerObserver
from userli_postfix.workers import (
    LISTENERS_VARIABLE,
    MAX_LINE,
    METRICS_VARIABLE,
    RESPAWN_DELAY,
    STOP_MARGIN,
    AdoptedEndpoint,
    RecordingEndpoint,
    WorkerPool,
    _ChildProtocol,
    _removeMetrics,
    childEnvironment,
    forgetProcess,
    inheritedListeners,
    sharedEndpoint,
)


class WorkersSettingTests(SynchronousTestCase):
    """C{WORKERS} / C{--workers} in L{Config}."""

    def test_default_one(self) -> None:
        """Without the setting the daemon is one process, Redis or not."""
        self.assertEqual(Config.from_sources({"USERLI_TOKEN": "t"}).workers, 1)

    def test_with_redis(self) -> None:
        """With REDIS_URL any count from 1 to the maximum is accepted."""
        for value in ("1", "2", str(MAX_WORKERS)):
            config = Config.from_sources(
                {"USERLI_TOKEN": "t", "WORKERS": value, "REDIS_URL": "redis://r:6379/0"}
            )
            self.assertEqual(config.workers, int(value))

    def test_option_wins(self) -> None:
        """The twistd option C{--workers} wins over the environment."""
        config = Config.from_sources(
            {"USERLI_TOKEN": "t", "WORKERS": "2", "REDIS_URL": "redis://r/0"}, {"workers": "3"}
        )
        self.assertEqual(config.workers, 3)

    def test_refused_without_redis(self) -> None:
        """More than one worker without REDIS_URL is refused, naming WORKERS and why."""
        with self.assertRaises(ConfigError) as caught:
            Config.from_sources({"USERLI_TOKEN": "t", "WORKERS": "2"})
        self.assertEqual(caught.exception.variable, "WORKERS")
        self.assertIn("REDIS_URL", str(caught.exception))

    def test_invalid(self) -> None:
        """Zero, negative, non-numbers and absurd counts are refused."""
        for value in ("0", "-1", "two", "1.5", str(MAX_WORKERS + 1)):
            with self.assertRaises(ConfigError) as caught:
                Config.from_sources(
                    {"USERLI_TOKEN": "t", "WORKERS": value, "REDIS_URL": "redis://r/0"}
                )
            self.assertEqual(caught.exception.variable, "WORKERS")


class InheritanceTests(SynchronousTestCase):
    """How a child learns which sockets it inherited, and its configuration."""

    def test_not_a_child(self) -> None:
        """A process without the variable is the parent (or the only process)."""
        self.assertIsNone(inheritedListeners({}))
        self.assertIsNone(inheritedListeners({LISTENERS_VARIABLE: ""}))

    def test_listeners(self) -> None:
        """The variable maps listener names to file descriptors."""
        self.assertEqual(
            inheritedListeners({LISTENERS_VARIABLE: "policy=3,socketmap=4"}),
            {"policy": 3, "socketmap": 4},
        )

    def test_environment_carries_options(self) -> None:
        """
        Settings given as twistd options reach the child as variables, so it
        builds the same configuration; the rest of the environment is kept.
        """
        env = childEnvironment(
            {"USERLI_TOKEN": "t", "LOG_LEVEL": "info", "HOME": "/root"},
            {"log-level": "debug", "socketmap-listen": None},
        )
        self.assertEqual(env["LOG_LEVEL"], "debug")
        self.assertEqual(env["USERLI_TOKEN"], "t")
        self.assertEqual(env["HOME"], "/root")
        self.assertNotIn("SOCKETMAP_LISTEN_ADDR", env)
        config = Config.from_sources(env)
        self.assertEqual(config.log_level, "debug")

    def test_environment_finds_package(self) -> None:
        """The child imports the package from where this process did."""
        here = str(Path(userli_postfix.__file__).resolve().parent.parent)
        env = childEnvironment({"PYTHONPATH": "/elsewhere"})
        self.assertEqual(env["PYTHONPATH"].split(os.pathsep), [here, "/elsewhere"])
        again = childEnvironment(env)
        self.assertEqual(again["PYTHONPATH"], env["PYTHONPATH"])


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


class FakeProcessReactor(Clock):
    """A clock that records spawned processes instead of starting them."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[dict[str, Any]] = []
        self.whenRunning: list[Any] = []
        self.adopted: list[tuple[int, int, Any]] = []

    def callWhenRunning(self, f: Any, *args: Any) -> None:
        self.whenRunning.append((f, args))

    def run(self) -> None:
        for f, args in self.whenRunning:
            f(*args)
        self.whenRunning = []

    def spawnProcess(
        self, protocol: Any, executable: str, args: list[str], env: dict[str, str], childFDs: Any
    ) -> FakeProcess:
        process = FakeProcess(1000 + len(self.spawned), protocol)
        self.spawned.append(
            dict(executable=executable, args=args, env=env, childFDs=childFDs, process=process)
        )
        protocol.makeConnection(process)
        return process

    def adoptStreamPort(self, fd: int, family: int, factory: Any) -> Any:
        self.adopted.append((fd, family, factory))
        return FakePort(fd)


class FakeProcess:
    """A spawned process: records signals; the test ends it."""

    def __init__(self, pid: int, protocol: Any) -> None:
        self.pid = pid
        self.protocol = protocol
        self.signals: list[str] = []
        self.ended = False

    def signalProcess(self, name: str) -> None:
        if self.ended:
            raise error.ProcessExitedAlready()
        self.signals.append(name)

    def end(self) -> None:
        self.ended = True
        self.protocol.processEnded(Failure(error.ProcessTerminated(signal=15)))

    # What ProcessProtocol.makeConnection needs of a transport.
    def closeStdin(self) -> None:
        """Nothing to close."""


class ChildLogTests(SynchronousTestCase):
    """L{_ChildProtocol}: what a child writes reaches this process's log."""

    def setUp(self) -> None:
        self.published: list[dict[str, Any]] = []
        self.protocol = _ChildProtocol(lambda protocol, reason: None, self.published.append)
        self.protocol.makeConnection(FakeProcess(1234, self.protocol))
        # What this process logs itself (lines that are not events).
        self.own: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.own.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.own.append)

    def childLogger(self, level: str = "info") -> Logger:
        """A logger set up as in a child; L{written} is what it wrote."""
        self.stream = io.StringIO()
        return Logger(namespace="userli_postfix.child", observer=workerObserver(level, self.stream))

    def written(self) -> bytes:
        """What the child's logger wrote to its stdout."""
        return self.stream.getvalue().encode("utf-8")

    def test_events_passed_through(self) -> None:
        """
        A child's events, split anywhere by the pipe, are published whole
        and in order in this process: message, level, namespace, time.
        """
        logger = self.childLogger()
        logger.warn("first {what}", what="warning")
        logger.info("then info")
        data = self.written()
        self.assertEqual(data.count(b"\n"), 2, "one line per event")
        for i in range(0, len(data), 7):
            self.protocol.outReceived(data[i : i + 7])
        self.assertEqual(
            [(formatEvent(e), e["log_level"], e["log_namespace"]) for e in self.published],
            [
                ("first warning", LogLevel.warn, "userli_postfix.child"),
                ("then info", LogLevel.info, "userli_postfix.child"),
            ],
        )
        self.assertIsInstance(self.published[0]["log_time"], float)

    def test_level_applies_in_child(self) -> None:
        """The child writes only the events at its LOG_LEVEL or above."""
        logger = self.childLogger("warn")
        logger.info("dropped")
        logger.error("kept")
        self.protocol.outReceived(self.written())
        self.assertEqual([e["log_format"] for e in self.published], ["kept"])

    def test_failure_kept(self) -> None:
        """A failure an event carries arrives with its traceback text."""
        logger = self.childLogger()
        try:
            raise ZeroDivisionError("division by zero")
        except ZeroDivisionError:
            logger.failure("it broke")
        self.protocol.outReceived(self.written())
        (event,) = self.published
        self.assertIn("ZeroDivisionError", event["log_failure"].getTraceback())

    def test_other_lines(self) -> None:
        """
        A line on stdout that is not an event is logged as text (info), one
        on stderr as an error, both naming the worker; blank lines are not.
        """
        self.protocol.outReceived(b"plain text\n\n")
        self.protocol.errReceived(b"Traceback (most recent call last):\r\n")
        self.assertEqual(self.published, [])
        lines = [(e["log_level"], e["pid"], e["line"]) for e in self.own if "line" in e]
        self.assertEqual(
            lines,
            [
                (LogLevel.info, 1234, "plain text"),
                (LogLevel.error, 1234, "Traceback (most recent call last):"),
            ],
        )

    def test_last_line_without_newline(self) -> None:
        """What a child wrote last without a newline is logged when its output ends."""
        self.protocol.errReceived(b"fatal: no newline")
        self.assertEqual([e for e in self.own if "line" in e], [])
        self.protocol.childConnectionLost(2)
        self.assertEqual([e["line"] for e in self.own if "line" in e], ["fatal: no newline"])
        self.protocol.processEnded(Failure(error.ProcessDone(0)))
        self.assertEqual(len([e for e in self.own if "line" in e]), 1, "logged once")

    def test_endless_line_in_pieces(self) -> None:
        """A line without end is logged in pieces instead of piling up in memory."""
        self.protocol.errReceived(b"x" * (MAX_LINE + 1))
        self.assertEqual([len(e["line"]) for e in self.own if "line" in e], [MAX_LINE + 1])


class WorkerPoolTests(SynchronousTestCase):
    """L{WorkerPool}: starting, replacing and stopping children."""

    def setUp(self) -> None:
        self.reactor = FakeProcessReactor()
        self.directory = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.directory, ignore_errors=True)
        self.ports = {"socketmap": FakePort(11), "policy": FakePort(12)}
        self.pool = WorkerPool(
            self.reactor,
            3,
            self.ports,
            {"USERLI_TOKEN": "t"},
            grace=5.0,
            metricsDirectory=self.directory,
        )

    def start(self) -> None:
        self.pool.startService()
        self.reactor.run()

    def test_children_once_running(self) -> None:
        """N workers are this process and N-1 children, started once the reactor runs."""
        self.pool.startService()
        self.assertEqual(self.reactor.spawned, [])
        self.reactor.run()
        self.assertEqual(len(self.reactor.spawned), 2)

    def test_sockets_and_environment(self) -> None:
        """
        Each child gets the listening sockets from fd 3 on, named in its
        environment, the pipe from the parent on stdin, pipes to the parent
        on stdout and stderr (which it logs), and the metrics directory.
        """
        self.start()
        child = self.reactor.spawned[0]
        self.assertEqual(child["childFDs"], {0: "w", 1: "r", 2: "r", 3: 12, 4: 11})
        self.assertEqual(child["env"][LISTENERS_VARIABLE], "policy=3,socketmap=4")
        self.assertEqual(child["env"][METRICS_VARIABLE], str(self.directory))
        self.assertEqual(child["env"]["USERLI_TOKEN"], "t")
        self.assertEqual(
            child["args"][-3:], ["-n", "--pidfile=", "userli-postfix"], "started as twistd -n"
        )

    def test_dead_child_replaced(self) -> None:
        """A child that dies while the daemon runs is replaced after a pause."""
        self.start()
        self.reactor.spawned[0]["process"].end()
        self.assertEqual(len(self.reactor.spawned), 2)
        self.reactor.advance(RESPAWN_DELAY)
        self.assertEqual(len(self.reactor.spawned), 3)
        self.assertEqual(len(self.pool.children), 2)

    def test_stop(self) -> None:
        """
        Stopping sends SIGTERM to every child and fires once all ended; the
        metrics directory is removed then, and nobody is replaced.
        """
        self.start()
        d = self.pool.stopService()
        processes = [s["process"] for s in self.reactor.spawned]
        self.assertEqual([p.signals for p in processes], [["TERM"], ["TERM"]])
        self.assertNoResult(d)
        processes[0].end()
        self.assertNoResult(d)
        self.assertTrue(self.directory.exists())
        processes[1].end()
        self.successResultOf(d)
        self.assertFalse(self.directory.exists())
        self.reactor.advance(RESPAWN_DELAY * 10)
        self.assertEqual(len(self.reactor.spawned), 2)

    def test_stop_kills_stragglers(self) -> None:
        """A child still running after the grace period (plus a margin) is killed."""
        self.start()
        d = self.pool.stopService()
        processes = [s["process"] for s in self.reactor.spawned]
        processes[0].end()
        self.reactor.advance(5.0 + STOP_MARGIN - 0.001)
        self.assertEqual(processes[1].signals, ["TERM"])
        self.reactor.advance(0.001)
        self.assertEqual(processes[1].signals, ["TERM", "KILL"])
        processes[1].end()
        self.successResultOf(d)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_stop_before_running(self) -> None:
        """A stop that comes before the reactor runs starts no child at all."""
        self.pool.startService()
        self.successResultOf(self.pool.stopService())
        self.reactor.run()
        self.assertEqual(self.reactor.spawned, [])

    def test_pending_respawn_cancelled(self) -> None:
        """A replacement due when the daemon stops is not started."""
        self.start()
        self.reactor.spawned[0]["process"].end()
        d = self.pool.stopService()
        self.reactor.spawned[1]["process"].end()
        self.successResultOf(d)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_dead_child_metrics_dropped(self) -> None:
        """
        Every metrics file of a child that ended is removed (its live gauges
        through prometheus-client's C{mark_process_dead}); other processes'
        files stay.
        """
        self.start()
        process = self.reactor.spawned[0]["process"]
        other = self.reactor.spawned[1]["process"]
        names = [
            f"gauge_livesum_{process.pid}.db",
            f"counter_{process.pid}.db",
            f"histogram_{process.pid}.db",
            f"counter_{other.pid}.db",
            f"counter_1{process.pid}.db",
        ]
        for name in names:
            (self.directory / name).write_bytes(b"")
        process.end()
        self.assertEqual(sorted(p.name for p in self.directory.iterdir()), sorted(names[3:]))

    def test_crashing_child_leaves_no_pile(self) -> None:
        """
        A child that dies again and again (each replacement writing its
        metrics files) leaves no more files behind than the live processes
        have.
        """
        self.start()
        for _ in range(20):
            victim = self.reactor.spawned[-1]["process"]
            (self.directory / f"counter_{victim.pid}.db").write_bytes(b"")
            (self.directory / f"gauge_livesum_{victim.pid}.db").write_bytes(b"")
            victim.end()
            self.reactor.advance(RESPAWN_DELAY)
        live = {child.pid for child in self.pool.children}
        left = {int(p.stem.rsplit("_", 1)[1]) for p in self.directory.iterdir()}
        self.assertLessEqual(left, live)
        self.assertEqual(len(self.pool.children), 2)


class MetricsCleanupTests(SynchronousTestCase):
    """L{_removeMetrics}: a worker whose parent died cleans up after it."""

    def test_removes_dead_and_given(self) -> None:
        """
        Files of the given pids and of processes that no longer run go;
        files of running processes stay, and so does the directory then.
        """
        directory = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        mine = os.getpid()
        names = [f"counter_{mine}.db", "counter_999999999.db", f"gauge_livesum_{os.getppid()}.db"]
        for name in names:
            (directory / name).write_bytes(b"")
        _removeMetrics(directory, (mine,))
        self.assertEqual(sorted(p.name for p in directory.iterdir()), [names[2]])
        _removeMetrics(directory, (os.getppid(),))
        self.assertFalse(directory.exists())


class ForgetProcessTests(SynchronousTestCase):
    """L{forgetProcess} with prometheus-client's own files."""

    def test_real_files(self) -> None:
        """
        The files prometheus-client writes for a process (a counter and a
        live gauge here, made in a subprocess in multiprocess mode) are all
        gone after L{forgetProcess}: fails if prometheus-client names its
        files differently.
        """
        import subprocess
        import sys

        directory = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        script = (
            "import os; from prometheus_client import Counter, Gauge; "
            "Counter('c', 'c').inc(); Gauge('g', 'g', multiprocess_mode='livesum').inc(); "
            "print(os.getpid())"
        )
        result = subprocess.run(
            [sys.executable, "-c", script],
            env={**os.environ, METRICS_VARIABLE: str(directory)},
            capture_output=True,
            check=True,
        )
        pid = int(result.stdout)
        self.assertEqual(len(list(directory.iterdir())), 2)
        forgetProcess(directory, pid)
        self.assertEqual(list(directory.iterdir()), [])


class AdoptingReactor(FakeProcessReactor):
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
        from userli_postfix.listening import reason

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
        reactor = FakeProcessReactor()
        factory = object()
        port: Any = self.successResultOf(
            AdoptedEndpoint(reactor, fd, UNIXListen(path, 50)).listen(factory)  # type: ignore[arg-type]
        )
        self.assertEqual(reactor.adopted, [(fd, socket.AF_UNIX, factory)])
        self.assertEqual(port.fileno(), fd)
        self.assertRaises(OSError, os.fstat, fd)


class SlowToStop(Service):
    """A service (like the worker pool) whose stop completes when the test says."""

    def __init__(self) -> None:
        self.stopped: defer.Deferred[None] = defer.Deferred()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return self.stopped


class ParallelStopTests(SynchronousTestCase):
    """L{DaemonService.stopService} drains while the worker processes stop."""

    def test_drains_while_children_stop(self) -> None:
        """
        The first process closes its idle connections and finishes its
        in-flight ones while its children are still stopping, instead of
        only once they are gone; the stop completes when both are done.
        """
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import MemoryReactorClock, StringTransport

        from userli_postfix import daemon, tap

        reactor = MemoryReactorClock()
        config = Config.from_sources({"USERLI_TOKEN": "t"})
        service: Any = tap.makeService({"config": config}, reactor=reactor)
        children = SlowToStop()
        children.setServiceParent(service)
        service.startService()
        factory = service.getServiceNamed("socketmap").factory
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()
        protocol.makeConnection(transport)
        d = service.stopService()
        self.assertTrue(transport.disconnecting, "idle connection closed at once")
        protocol.connectionLost(Failure(error.ConnectionDone()))
        self.assertNoResult(d)
        reactor.advance(daemon.SHUTDOWN_GRACE)
        children.stopped.callback(None)
        self.successResultOf(d)
