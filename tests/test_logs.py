"""
Tests for L{userli_postfix.logs}: C{LOG_LEVEL} filters events, and
C{LOG_FORMAT=json} writes exactly one JSON object per line.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import sys
import tempfile
from typing import IO, Any

from twisted.logger import ILogObserver, Logger, LogLevel, formatEvent
from twisted.python import syslog as twisted_syslog
from twisted.trial.unittest import SynchronousTestCase

from userli_postfix.logs import (
    LEVELS,
    PipeObserver,
    daemonObserver,
    filtered,
    relayedEvent,
    streamObserver,
    withoutCredentials,
    workerObserver,
)


def makeObserver(level: str, format: str, stream: IO[str]) -> ILogObserver:
    """An observer that drops events below C{level} and writes the rest in C{format}."""
    return filtered(streamObserver(stream, format), level)


class LevelTests(SynchronousTestCase):
    """Events below the configured level are dropped."""

    def emitAll(self, level: str, format: str = "json") -> list[str]:
        """Log one event at each level; return the levels that came out."""
        stream = io.StringIO()
        log = Logger(namespace="test", observer=makeObserver(level, format, stream))
        log.debug("at debug")
        log.info("at info")
        log.warn("at warn")
        log.error("at error")
        log.critical("at critical")
        return [line for line in stream.getvalue().splitlines() if line]

    def test_levels(self) -> None:
        """Each configured level lets through itself and everything more severe."""
        table = {
            "debug": ["debug", "info", "warn", "error", "critical"],
            "info": ["info", "warn", "error", "critical"],
            "warn": ["warn", "error", "critical"],
            "error": ["error", "critical"],
        }
        for level, expected in table.items():
            lines = self.emitAll(level)
            self.assertEqual([json.loads(line)["level"] for line in lines], expected, level)

    def test_text_filtered(self) -> None:
        """The level filter applies to the text format too."""
        lines = self.emitAll("warn", "text")
        self.assertEqual(len(lines), 3)
        self.assertFalse(any("at info" in line for line in lines))
        self.assertTrue(any("at warn" in line for line in lines))

    def test_known_levels(self) -> None:
        """The levels are the Go program's four."""
        self.assertEqual(set(LEVELS), {"debug", "info", "warn", "error"})


class JSONTests(SynchronousTestCase):
    """C{LOG_FORMAT=json}: one object per line, for log shippers."""

    def setUp(self) -> None:
        self.stream = io.StringIO()
        self.log = Logger(
            namespace="userli_postfix.test", observer=makeObserver("debug", "json", self.stream)
        )

    def records(self) -> list[dict[str, object]]:
        lines = self.stream.getvalue().split("\n")
        self.assertEqual(lines[-1], "", "output ends with a newline")
        return [json.loads(line) for line in lines[:-1]]

    def test_fields(self) -> None:
        """Each record has the time, level, namespace and formatted message."""
        self.log.info("Looked up {map}", map="alias")
        (record,) = self.records()
        self.assertEqual(record["level"], "info")
        self.assertEqual(record["namespace"], "userli_postfix.test")
        self.assertEqual(record["message"], "Looked up alias")
        self.assertRegex(str(record["time"]), r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")

    def test_one_line_each(self) -> None:
        """Line breaks inside a message stay inside its one line."""
        self.log.warn("first\nsecond\r\nthird")
        self.log.info("next")
        records = self.records()
        self.assertEqual(len(records), 2)
        self.assertEqual(records[0]["message"], "first\nsecond\r\nthird")

    def test_failure(self) -> None:
        """A logged failure carries its traceback in C{error}, still on one line."""
        try:
            raise ValueError("boom")
        except ValueError:
            self.log.failure("It failed")
        (record,) = self.records()
        self.assertEqual(record["level"], "critical")
        self.assertEqual(record["message"], "It failed")
        self.assertIn("ValueError: boom", str(record["error"]))

    def test_unserialisable_values(self) -> None:
        """Odd values in an event do not break the line."""
        self.log.info("value {v}", v=object())
        (record,) = self.records()
        self.assertIn("object object", str(record["message"]))

    def test_non_ascii(self) -> None:
        """Non-ASCII text survives as text."""
        self.log.info("domain {d}", d="bücher.de")
        (record,) = self.records()
        self.assertEqual(record["message"], "domain bücher.de")


class DestinationTests(SynchronousTestCase):
    """
    L{daemonObserver} writes where twistd's options send the log, in
    C{LOG_FORMAT}, through C{LOG_LEVEL}'s filter.
    """

    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.directory)
        # twistd's log file rotates on SIGUSR1; leave the process as it was.
        previous = signal.getsignal(signal.SIGUSR1)
        self.addCleanup(signal.signal, signal.SIGUSR1, previous)
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)

    def emit(self, observer: Any) -> None:
        """One event at info and one at warn."""
        log = Logger(namespace="userli_postfix.test", observer=observer)
        log.info("socketmap listening on {where}", where="tcp:10001")
        log.warn("Userli alias lookup failed")

    def test_logfile_text(self) -> None:
        """C{--logfile}: twistd's text lines in that file, filtered by level."""
        path = os.path.join(self.directory, "daemon.log")
        observer = daemonObserver("warn", "text", {"logfile": path, "nodaemon": False})
        self.emit(observer)
        with open(path) as f:
            lines = f.read().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("[userli_postfix.test#warn] Userli alias lookup failed", lines[0])

    def test_logfile_json(self) -> None:
        """C{--logfile} with C{LOG_FORMAT=json}: each line of the file is one JSON object."""
        path = os.path.join(self.directory, "daemon.log")
        self.emit(daemonObserver("info", "json", {"logfile": path, "nodaemon": True}))
        with open(path) as f:
            records = [json.loads(line) for line in f.read().splitlines()]
        self.assertEqual(
            [(r["level"], r["message"]) for r in records],
            [("info", "socketmap listening on tcp:10001"), ("warn", "Userli alias lookup failed")],
        )

    def test_logfile_rotates_on_sigusr1(self) -> None:
        """As with twistd's own log file, SIGUSR1 asks for a rotation."""
        path = os.path.join(self.directory, "daemon.log")
        daemonObserver("info", "text", {"logfile": path})
        self.assertNotIn(signal.getsignal(signal.SIGUSR1), (None, signal.SIG_DFL))

    def test_daemon_default_file(self) -> None:
        """In daemon mode without C{--logfile} the log is twistd's C{twistd.log}."""
        cwd = os.getcwd()
        self.addCleanup(os.chdir, cwd)
        os.chdir(self.directory)
        self.emit(daemonObserver("info", "text", {"logfile": None, "nodaemon": False}))
        with open(os.path.join(self.directory, "twistd.log")) as f:
            self.assertIn("Userli alias lookup failed", f.read())

    def test_stdout(self) -> None:
        """With C{-n} and no log file (and without twistd at all) the log is stdout."""
        for options in ({"nodaemon": True}, {"nodaemon": True, "logfile": "-"}, None):
            stdout = io.StringIO()
            self.patch(sys, "stdout", stdout)
            self.emit(daemonObserver("info", "json", options))
            self.assertEqual(len(stdout.getvalue().splitlines()), 2, options)

    def test_daemon_cannot_log_to_stdout(self) -> None:
        """C{--logfile=-} in daemon mode is refused, as twistd refuses it."""
        error = self.assertRaises(
            SystemExit, daemonObserver, "info", "text", {"logfile": "-", "nodaemon": False}
        )
        self.assertIn("stdout", str(error.code))


class FakeSyslog:
    """Stands in for the C{syslog} module's C{openlog} and C{syslog}."""

    def __init__(self) -> None:
        self.opened: list[tuple[Any, ...]] = []
        self.messages: list[tuple[int, str]] = []

    def openlog(self, *args: Any) -> None:
        self.opened.append(args)

    def syslog(self, priority: int, message: str) -> None:
        self.messages.append((priority, message))


class SyslogTests(SynchronousTestCase):
    """C{--syslog} and C{--prefix}: the events go to syslog with their level's priority."""

    def setUp(self) -> None:
        self.fake = FakeSyslog()
        self.patch(twisted_syslog.SyslogObserver, "openlog", self.fake.openlog)
        self.patch(twisted_syslog.SyslogObserver, "syslog", self.fake.syslog)

    def emit(self, format: str, level: str = "info") -> None:
        options = {"syslog": True, "prefix": "userli-postfix", "nodaemon": False}
        log = Logger(
            namespace="userli_postfix.test", observer=daemonObserver(level, format, options)
        )
        log.debug("hidden")
        log.info("socketmap listening on {where}", where="tcp:10001")
        log.warn("Userli alias lookup failed")

    def test_text(self) -> None:
        """The prefix names the program; info is LOG_INFO (6), warn LOG_WARNING (4)."""
        self.emit("text")
        self.assertEqual(self.fake.opened[0][0], "userli-postfix")
        self.assertEqual(
            [(priority & 7, message.split("] ", 1)[1]) for priority, message in self.fake.messages],
            [(6, "socketmap listening on tcp:10001"), (4, "Userli alias lookup failed")],
        )

    def test_json(self) -> None:
        """With C{LOG_FORMAT=json} each syslog message is one JSON object."""
        self.emit("json", level="warn")
        ((priority, message),) = self.fake.messages
        self.assertEqual(priority & 7, 4)
        record = json.loads(message.split("] ", 1)[1])
        self.assertEqual(record["message"], "Userli alias lookup failed")
        self.assertEqual(record["level"], "warn")


class Pipe:
    """
    A pipe as a worker's stdout is: the write end for the observer, the
    read end for what the first process would read.
    """

    def __init__(self, case: SynchronousTestCase) -> None:
        self.reading, self.writing = os.pipe()
        case.addCleanup(os.close, self.reading)
        case.addCleanup(os.close, self.writing)
        os.set_blocking(self.reading, False)
        self.received = b""

    def read(self) -> bytes:
        """Everything in the pipe now (which frees it), added to L{received}."""
        data = b""
        while True:
            try:
                chunk = os.read(self.reading, 1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                break
            data += chunk
        self.received += data
        return data

    def events(self) -> list[dict[str, Any]]:
        """The events in what was received so far, one per line, each whole."""
        self.read()
        events = []
        for line in self.received.split(b"\n")[:-1]:
            event = relayedEvent(line)
            assert event is not None, line[:200]
            events.append(event)
        return events


class WorkerLogTests(SynchronousTestCase):
    """L{workerObserver} and L{relayedEvent}: a worker's events, one line each."""

    def test_round_trip(self) -> None:
        """An event a worker writes is read back with its message, level and namespace."""
        pipe = Pipe(self)
        Logger(namespace="ns", observer=workerObserver("debug", pipe.writing)).debug(
            "a {thing}\nwith a newline", thing=object()
        )
        (line,) = pipe.read().splitlines()
        event = relayedEvent(line)
        assert event is not None
        self.assertEqual(event["log_namespace"], "ns")
        self.assertIs(event["log_level"], LEVELS["debug"])
        self.assertTrue(formatEvent(event).startswith("a <object object at "))

    def test_not_events(self) -> None:
        """Text, other JSON and bytes that are not UTF-8 are not events."""
        for line in [b"plain", b"[1, 2]", b'{"log_level": "warn"}', b"\xff{}", b""]:
            self.assertIsNone(relayedEvent(line), line)


class PipeObserverTests(SynchronousTestCase):
    """
    L{PipeObserver}: a worker's logging never waits for the first process
    to read; what does not fit is dropped, counted and reported.
    """

    def setUp(self) -> None:
        self.pipe = Pipe(self)
        self.dropped = 0
        self.log = Logger(namespace="worker", observer=PipeObserver(self.pipe.writing, self.count))

    def count(self) -> None:
        self.dropped += 1

    def fill(self) -> int:
        """Log until the pipe is full (the first process reading nothing); how many went in."""
        logged = 0
        while not self.dropped:
            self.log.info("line {n} {padding}", n=logged, padding="x" * 200)
            logged += 1
        return logged - 1

    def test_full_pipe_drops(self) -> None:
        """
        With nobody reading, logging goes on without blocking once the pipe
        is full: each line that does not fit is dropped and counted.
        """
        written = self.fill()
        self.assertGreater(written, 0)
        for _ in range(99):
            self.log.info("more")
        self.assertEqual(self.dropped, 100)
        events = self.pipe.events()
        self.assertEqual([e["n"] for e in events], list(range(written)), "whole lines, in order")

    def test_said_once_when_recovered(self) -> None:
        """
        The first line that gets through after drops is preceded by one
        warning that says how many were dropped; the next lines come alone.
        """
        written = self.fill()
        self.log.info("dropped too")
        self.pipe.read()
        self.log.info("through again")
        self.log.info("and again")
        events = self.pipe.events()[written:]
        self.assertEqual(
            [(e["log_level"], formatEvent(e)) for e in events],
            [
                (
                    LogLevel.warn,
                    "Log lines of this worker dropped while the pipe to the first "
                    "process was full: 2",
                ),
                (LogLevel.info, "through again"),
                (LogLevel.info, "and again"),
            ],
        )
        self.assertEqual(self.dropped, 2, "the warning is no drop")

    def test_long_line_finished_first(self) -> None:
        """
        A line longer than the pipe holds goes in part; lines logged while
        the rest does not fit are dropped, never written into its middle,
        and the rest goes first once there is room.
        """
        self.log.info("{big}", big="b" * 30_000)
        self.log.info("while full")
        self.assertEqual(self.dropped, 1)
        self.pipe.read()
        self.log.info("after")
        self.pipe.read()
        self.log.info("last")
        events = self.pipe.events()
        self.assertEqual(
            [formatEvent(e)[:20] for e in events],
            ["b" * 20, "Log lines of this wo", "after", "last"],
        )
        self.assertEqual(len(formatEvent(events[0])), 30_000)

    def test_first_process_gone(self) -> None:
        """A pipe whose reader is gone drops lines instead of raising."""
        reading, writing = os.pipe()
        os.close(reading)
        self.addCleanup(os.close, writing)
        dropped: list[None] = []
        Logger(observer=PipeObserver(writing, lambda: dropped.append(None))).error("lost")
        self.assertEqual(len(dropped), 1)


class CredentialsTests(SynchronousTestCase):
    """URLs in log lines."""

    def test_without_credentials(self) -> None:
        """User and password in a URL are left out; everything else stays."""
        self.assertEqual(
            withoutCredentials("https://user:secret@userli.example.org:8443/base"),
            "https://userli.example.org:8443/base",
        )
        self.assertEqual(withoutCredentials("http://localhost:8000"), "http://localhost:8000")
