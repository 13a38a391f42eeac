"""
Tests for L{userli_postfix.workers} and the C{WORKERS} setting: what the
parent hands its children (sockets, configuration, metrics directory), how
it replaces and stops them, and when more than one worker is refused.

Processes are spawned on a fake reactor here; tests/integration/test_workers.py
runs real ones.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import defer, error
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

import userli_postfix
from userli_postfix.config import MAX_WORKERS, Config, ConfigError
from userli_postfix.workers import (
    LISTENERS_VARIABLE,
    METRICS_VARIABLE,
    RESPAWN_DELAY,
    STOP_MARGIN,
    AdoptedEndpoint,
    RecordingEndpoint,
    WorkerPool,
    _removeMetrics,
    acceptOneAtATime,
    childEnvironment,
    inheritedListeners,
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
        environment, the pipe from the parent on stdin, the parent's stdout
        and stderr, and the metrics directory.
        """
        self.start()
        child = self.reactor.spawned[0]
        self.assertEqual(child["childFDs"], {0: "w", 1: 1, 2: 2, 3: 12, 4: 11})
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

    def test_dead_child_gauges_dropped(self) -> None:
        """The live gauges of a child that ended no longer count on /metrics."""
        self.start()
        process = self.reactor.spawned[0]["process"]
        gauge = self.directory / f"gauge_livesum_{process.pid}.db"
        counter = self.directory / f"counter_{process.pid}.db"
        gauge.write_bytes(b"")
        counter.write_bytes(b"")
        process.end()
        self.assertFalse(gauge.exists())
        self.assertTrue(counter.exists(), "counts of a dead child still add up")


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


class AdoptedEndpointTests(SynchronousTestCase):
    """L{AdoptedEndpoint} serves an inherited listening socket."""

    def test_adopts(self) -> None:
        """The socket is handed to the reactor with its family; our copy is closed."""
        listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listening.bind(("127.0.0.1", 0))
        listening.listen(1)
        self.addCleanup(listening.close)
        fd = os.dup(listening.fileno())
        reactor = FakeProcessReactor()
        factory = object()
        port = self.successResultOf(AdoptedEndpoint(reactor, fd).listen(factory))  # type: ignore[arg-type]
        self.assertEqual(reactor.adopted, [(fd, socket.AF_INET, factory)])
        self.assertEqual(port.fileno(), fd)
        self.assertRaises(OSError, os.fstat, fd)


class AcceptOneAtATimeTests(SynchronousTestCase):
    """L{acceptOneAtATime}: a shared port takes one connection per wake-up."""

    def listen(self, onePerWakeUp: bool) -> tuple[Any, list[Any], tuple[str, int]]:
        from twisted.internet import reactor
        from twisted.internet.protocol import Factory, Protocol

        built: list[Any] = []

        class Recording(Factory):
            def buildProtocol(self, addr: Any) -> Protocol:
                built.append(addr)
                return Protocol()

        port: Any = reactor.listenTCP(0, Recording(), interface="127.0.0.1")  # type: ignore[attr-defined]
        # Driven by hand below, not by the reactor (which does not run here).
        port.stopReading()
        self.addCleanup(port.connectionLost, None)
        if onePerWakeUp:
            acceptOneAtATime(port)
        address = port.getHost()
        return port, built, (address.host, address.port)

    def pending(self, address: tuple[str, int], count: int) -> None:
        """Open C{count} connections the kernel has queued, not yet accepted."""
        for _ in range(count):
            client = socket.create_connection(address)
            self.addCleanup(client.close)

    def test_one_per_wake_up(self) -> None:
        """Three queued connections take three wake-ups, even after a busy round."""
        port, built, address = self.listen(onePerWakeUp=True)
        self.pending(address, 3)
        for expected in (1, 2, 3):
            port.doRead()
            self.assertEqual(len(built), expected)
            self.assertEqual(port.numberAccepts, 1)

    def test_twisted_default_takes_the_burst(self) -> None:
        """Without it, one wake-up takes everything queued (what this changes)."""
        port, built, address = self.listen(onePerWakeUp=False)
        self.pending(address, 3)
        port.doRead()
        self.assertEqual(len(built), 3)

    def test_fake_ports_left_alone(self) -> None:
        """A port without an accept loop (a test double) is not touched."""
        port = FakePort(0)
        acceptOneAtATime(port)
        self.assertIs(type(port), FakePort)
