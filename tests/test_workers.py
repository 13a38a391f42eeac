"""
Tests for L{userli_postfix.workers} and the C{WORKERS} setting: what the
parent hands its children (sockets, configuration, metrics directory), how
it replaces and stops them, and when more than one worker is refused.

Processes are spawned on a fake reactor here; tests/integration/test_workers.py
runs real ones.
"""

from __future__ import annotations

import errno
import os
import shutil
import struct
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
from tests.doubles import configFrom
from tests.test_endpoints import FakePort
from tests.test_logs import Pipe
from tests.test_multiprocess import readTotals, writeMetrics
from userli_postfix.config import MAX_WORKERS, ConfigError
from userli_postfix.logs import workerObserver
from userli_postfix.metrics import Metrics
from userli_postfix.multiprocess import ARCHIVE
from userli_postfix.workers import (
    LISTENERS_VARIABLE,
    MAX_LINE,
    MAX_RESTART_DELAY,
    METRICS_VARIABLE,
    RESTART_DELAY,
    STABLE_AFTER,
    STOP_MARGIN,
    WorkerPool,
    _ChildProtocol,
    childEnvironment,
    inheritedListeners,
    restartDelay,
)


class WorkersSettingTests(SynchronousTestCase):
    """C{WORKERS} / C{--workers} in L{Config}."""

    def test_default_one(self) -> None:
        """Without the setting the daemon is one process, Redis or not."""
        self.assertEqual(configFrom({"USERLI_TOKEN": "t"}).workers, 1)

    def test_with_redis(self) -> None:
        """With REDIS_URL any count from 1 to the maximum is accepted."""
        for value in ("1", "2", str(MAX_WORKERS)):
            config = configFrom(
                {"USERLI_TOKEN": "t", "WORKERS": value, "REDIS_URL": "redis://r:6379/0"}
            )
            self.assertEqual(config.workers, int(value))

    def test_option_wins(self) -> None:
        """The twistd option C{--workers} wins over the environment."""
        config = configFrom(
            {"USERLI_TOKEN": "t", "WORKERS": "2", "REDIS_URL": "redis://r/0"}, {"workers": "3"}
        )
        self.assertEqual(config.workers, 3)

    def test_refused_without_redis(self) -> None:
        """More than one worker without REDIS_URL is refused, naming WORKERS and why."""
        with self.assertRaises(ConfigError) as caught:
            configFrom({"USERLI_TOKEN": "t", "WORKERS": "2"})
        self.assertEqual(caught.exception.variable, "WORKERS")
        self.assertIn("REDIS_URL", str(caught.exception))

    def test_invalid(self) -> None:
        """Zero, negative, non-numbers and absurd counts are refused."""
        for value in ("0", "-1", "two", "1.5", str(MAX_WORKERS + 1)):
            with self.assertRaises(ConfigError) as caught:
                configFrom({"USERLI_TOKEN": "t", "WORKERS": value, "REDIS_URL": "redis://r/0"})
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
        config = configFrom(env)
        self.assertEqual(config.log_level, "debug")

    def test_environment_finds_package(self) -> None:
        """The child imports the package from where this process did."""
        here = str(Path(userli_postfix.__file__).resolve().parent.parent)
        env = childEnvironment({"PYTHONPATH": "/elsewhere"})
        self.assertEqual(env["PYTHONPATH"].split(os.pathsep), [here, "/elsewhere"])
        again = childEnvironment(env)
        self.assertEqual(again["PYTHONPATH"], env["PYTHONPATH"])


class FakeProcessReactor(Clock):
    """A clock that records spawned processes instead of starting them."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[dict[str, Any]] = []
        self.whenRunning: list[Any] = []
        # What spawnProcess raises, while set (fork failing, no memory).
        self.failing: Exception | None = None
        self.failed = 0

    def callWhenRunning(self, f: Any, *args: Any) -> None:
        self.whenRunning.append((f, args))

    def run(self) -> None:
        for f, args in self.whenRunning:
            f(*args)
        self.whenRunning = []

    def spawnProcess(
        self, protocol: Any, executable: str, args: list[str], env: dict[str, str], childFDs: Any
    ) -> FakeProcess:
        if self.failing is not None:
            self.failed += 1
            raise self.failing
        process = FakeProcess(1000 + len(self.spawned), protocol)
        self.spawned.append(
            dict(executable=executable, args=args, env=env, childFDs=childFDs, process=process)
        )
        protocol.makeConnection(process)
        return process


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
        self.pipe = Pipe(self)
        return Logger(
            namespace="userli_postfix.child", observer=workerObserver(level, self.pipe.writing)
        )

    def written(self) -> bytes:
        """What the child's logger wrote to its stdout."""
        return self.pipe.read()

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
        self.metrics = Metrics(process=False)
        self.pool = WorkerPool(
            self.reactor,
            3,
            self.ports,
            {"USERLI_TOKEN": "t"},
            grace=5.0,
            metrics=self.metrics,
            metricsDirectory=self.directory,
        )
        self.logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def start(self) -> None:
        self.pool.startService()
        self.reactor.run()

    def restarts(self) -> float | None:
        return self.metrics.registry.get_sample_value(
            "userli_postfix_adapter_worker_restarts_total"
        )

    def latest(self) -> FakeProcess:
        process: FakeProcess = self.reactor.spawned[-1]["process"]
        return process

    def errors(self) -> list[str]:
        return [formatEvent(e) for e in self.logged if e.get("log_level") == LogLevel.error]

    def test_children_once_running(self) -> None:
        """N workers are this process and N-1 children, started once the reactor runs."""
        self.pool.startService()
        self.assertEqual(self.reactor.spawned, [])
        self.assertEqual((self.pool.alive, self.pool.configured), (1, 3))
        self.reactor.run()
        self.assertEqual(len(self.reactor.spawned), 2)
        self.assertEqual((self.pool.alive, self.pool.configured), (3, 3))

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
        """
        A child that dies while the daemon runs is replaced after a pause,
        the replacement counted; meanwhile one process fewer is alive.
        """
        self.start()
        self.reactor.spawned[0]["process"].end()
        self.assertEqual(len(self.reactor.spawned), 2)
        self.assertEqual(self.pool.alive, 2)
        self.reactor.advance(RESTART_DELAY)
        self.assertEqual(len(self.reactor.spawned), 3)
        self.assertEqual(self.pool.alive, 3)
        self.assertEqual(self.restarts(), 1.0)

    def test_delay_table(self) -> None:
        """1 s, doubling with each worker in a row that died young, at most a minute."""
        self.assertEqual(
            [restartDelay(n) for n in range(9)], [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]
        )
        self.assertEqual(restartDelay(10**6), MAX_RESTART_DELAY)

    def nextDelay(self) -> float:
        """
        End the newest child at once and measure, on the clock, how long
        the pool waits before it starts the next one.
        """
        self.latest().end()
        spawned = len(self.reactor.spawned)
        waited = 0.0
        while len(self.reactor.spawned) == spawned:
            self.reactor.advance(0.5)
            waited += 0.5
        return waited

    def test_delays_grow(self) -> None:
        """
        A worker that keeps dying young is restarted after 1, 2, 4 ... s,
        then every minute; each restart counted, each death one error line
        that says when the next try comes.
        """
        self.start()
        delays = [self.nextDelay() for _ in range(8)]
        self.assertEqual(delays, [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0])
        self.assertEqual(self.restarts(), 8.0)
        self.assertEqual(len(self.errors()), 8)
        self.assertIn("starting another in 60 s", self.errors()[-1])

    def test_delay_reset_after_a_while(self) -> None:
        """A worker that ran a while started fine: its replacement comes after 1 s again."""
        self.start()
        for _ in range(4):
            self.nextDelay()
        self.reactor.advance(STABLE_AFTER)
        self.assertEqual(self.nextDelay(), RESTART_DELAY)
        self.assertEqual(self.nextDelay(), 2 * RESTART_DELAY)

    def test_start_failure_retried(self) -> None:
        """
        A replacement that cannot be started (spawning raises in the
        restart timer) is tried again and again with growing pauses, each
        counted and logged, never given up; once starting works again the
        pool is full.
        """
        self.start()
        self.reactor.failing = OSError(errno.EAGAIN, "Resource temporarily unavailable")
        self.latest().end()
        self.assertEqual(self.pool.alive, 2)
        for delay, tries in [(1.0, 1), (2.0, 2), (4.0, 3), (8.0, 4), (16.0, 5)]:
            self.reactor.advance(delay - 0.5)
            self.assertEqual(self.reactor.failed, tries - 1)
            self.reactor.advance(0.5)
            self.assertEqual(self.reactor.failed, tries)
        self.assertEqual(self.restarts(), 5.0)
        self.assertEqual(self.pool.alive, 2)
        failures = [e for e in self.logged if e.get("log_failure") is not None]
        self.assertEqual(len(failures), 5)
        self.assertIn("Resource temporarily unavailable", str(failures[0]["log_failure"].value))
        self.reactor.failing = None
        self.reactor.advance(32.0)
        self.assertEqual((self.pool.alive, self.pool.configured), (3, 3))
        self.assertEqual(self.restarts(), 6.0)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 5)

    def test_first_start_failure_retried(self) -> None:
        """Children that cannot be started with the daemon are tried again later."""
        self.reactor.failing = OSError(errno.ENOMEM, "Cannot allocate memory")
        self.start()
        self.assertEqual(self.pool.alive, 1)
        self.reactor.failing = None
        self.reactor.advance(RESTART_DELAY)
        self.assertEqual(self.pool.alive, 3)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 2)

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
        self.reactor.advance(MAX_RESTART_DELAY * 10)
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

    def test_dead_child_metrics_kept(self) -> None:
        """
        What a child that ended counted stays in the totals (its counters
        and histograms kept in the archive); its live gauges go; other
        processes' files stay as they are.
        """
        self.start()
        process = self.reactor.spawned[0]["process"]
        other = self.reactor.spawned[1]["process"]
        writeMetrics(self.directory, process.pid, requests=5, connections=2)
        writeMetrics(self.directory, other.pid, requests=7, connections=1)
        before = readTotals(self.directory)
        process.end()
        after = readTotals(self.directory)
        self.assertEqual(after.pop("connections"), 1.0)
        self.assertEqual(before.pop("connections"), 3.0)
        self.assertEqual(after, before)
        self.assertEqual(after["requests_total"], 12.0)
        self.assertEqual(
            sorted(p.name for p in self.directory.iterdir()),
            sorted(
                [
                    f"counter_{ARCHIVE}.db",
                    f"histogram_{ARCHIVE}.db",
                    f"counter_{other.pid}.db",
                    f"histogram_{other.pid}.db",
                    f"gauge_livesum_{other.pid}.db",
                ]
            ),
        )

    def test_crashing_child_leaves_no_pile(self) -> None:
        """
        A child that dies again and again (each replacement writing its
        metrics files) leaves no more files behind than the live processes
        have, plus one archive per type, and every death's counts stay in
        the totals.
        """
        self.start()
        for _ in range(20):
            victim = self.latest()
            writeMetrics(self.directory, victim.pid, requests=1, connections=1)
            self.nextDelay()
        live = {str(child.pid) for child in self.pool.children}
        owners = {p.stem.rsplit("_", 1)[1] for p in self.directory.iterdir()}
        self.assertLessEqual(owners, live | {ARCHIVE})
        self.assertLessEqual(len(list(self.directory.iterdir())), 3 * len(live) + 2)
        self.assertEqual(readTotals(self.directory)["requests_total"], 20.0)
        self.assertEqual(self.pool.alive, 3)

    def test_unreadable_metrics(self) -> None:
        """
        A dead child's metrics file that cannot be read (cut short) is
        logged and removed; the child is replaced all the same.
        """
        self.start()
        victim = self.latest()
        (self.directory / f"counter_{victim.pid}.db").write_bytes(b"\x01")
        self.nextDelay()
        self.assertEqual(list(self.directory.iterdir()), [])
        self.assertEqual(self.pool.alive, 3)
        self.assertTrue(any("Could not keep the metrics" in formatEvent(e) for e in self.logged))
        self.assertEqual(len(self.flushLoggedErrors(struct.error)), 1)


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
        config = configFrom({"USERLI_TOKEN": "t"})
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
