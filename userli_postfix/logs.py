"""
Logging set-up: ``LOG_LEVEL`` filters twisted.logger events and
``LOG_FORMAT`` chooses plain text or one JSON object per line, written
wherever twistd's options send the log.

twistd takes the log observer from the application when one is set on it
(see L{userli_postfix.daemon.DaemonService.setServiceParent}); otherwise it
makes a text observer for C{--logfile}, C{--syslog} or stdout.  The
daemon sets one so that every event, twistd's own included, goes through
the level filter, and so that a JSON line is the whole line: twistd's text
observer starts every line with a time stamp and the system name.  The
observer goes where twistd's would (L{destination} reads twistd's own
options) and writes through the same pieces twistd uses: its L{LogFile}
(size rotation, and SIGUSR1 as twistd installs it) and its
L{SyslogObserver}.  An explicit C{--logger} still wins, as twistd documents.

Worker processes (L{userli_postfix.workers}) do not write the log
themselves: two processes must not write and rotate one file, and in
daemon mode their stdout would be /dev/null.  A worker writes each event
whole, as a line of twisted.logger's JSON, to a pipe to the first process
(L{workerObserver}), and the first process logs it as if it were its own
(L{relayedEvent}): same destination, format and rotation.  Serving never
waits for that pipe: a worker writes to it without blocking, and while it
is full (the first process busy, or stopped) drops lines, counts them and
says how many once lines get through again (L{PipeObserver}).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import IO, Any, cast
from urllib.parse import urlsplit, urlunsplit

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LegacyLogObserverWrapper,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    eventAsJSON,
    eventFromJSON,
    formatEvent,
    formatTime,
    textFileLogObserver,
)
from twisted.python.log import ILogObserver as ILegacyLogObserver
from twisted.python.logfile import LogFile
from zope.interface import implementer

LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
}

# syslog(3) priorities (LOG_DEBUG ... LOG_CRIT), so that syslog's own
# filtering sees the event's level; numbers, so the module is imported
# only when syslog is used.
SYSLOG_PRIORITIES = {
    LogLevel.debug: 7,
    LogLevel.info: 6,
    LogLevel.warn: 4,
    LogLevel.error: 3,
    LogLevel.critical: 2,
}

# twistd's default log file in daemon mode without --logfile.
DEFAULT_LOGFILE = "twistd.log"


def withoutCredentials(url: str) -> str:
    """C{url} fit for a log line: any C{user:password@} is left out."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def jsonRecord(event: LogEvent) -> str:
    """The JSON object for C{event}, on one line (no trailing newline)."""
    level = event.get("log_level")
    record = {
        "time": formatTime(event.get("log_time"), timeFormat="%Y-%m-%dT%H:%M:%S.%f%z"),
        "level": level.name if level is not None else "info",
        "namespace": event.get("log_namespace", ""),
        "message": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        record["error"] = failure.getTraceback()
    return json.dumps(record, default=str)


def jsonLine(event: LogEvent) -> str:
    """C{event} as one JSON object and a newline."""
    return jsonRecord(event) + "\n"


def streamObserver(stream: IO[Any], format: str) -> ILogObserver:
    """Text lines as twistd writes them, or JSON lines, to a file or stdout."""
    if format == "json":
        return FileLogObserver(stream, jsonLine)
    return textFileLogObserver(stream)


@implementer(ILogObserver)
class SyslogPriority:
    """
    Hands events to a syslog observer with the syslog priority of their
    level (twistd's own syslog observer sends everything but failures as
    LOG_INFO), and in JSON as the message when C{format} is C{json}.
    """

    def __init__(self, observer: ILogObserver, format: str) -> None:
        self._observer = observer
        self._json = format == "json"

    def __call__(self, event: LogEvent) -> None:
        priority = SYSLOG_PRIORITIES.get(event.get("log_level", LogLevel.info), 6)
        if self._json:
            event = {
                "log_format": "{log_json}",
                "log_json": jsonRecord(event),
                "log_level": event.get("log_level", LogLevel.info),
                "log_time": event.get("log_time"),
                "log_namespace": event.get("log_namespace", ""),
                "log_system": event.get("log_system", "-"),
            }
        else:
            event = dict(event)
        event["syslogPriority"] = priority
        self._observer(event)


def _rotateOnSIGUSR1(logFile: LogFile) -> None:
    """Rotate C{logFile} on SIGUSR1, as twistd does for its own log file."""
    if signal.getsignal(signal.SIGUSR1) not in (None, signal.SIG_DFL):
        return

    def rotate(number: int, frame: Any) -> None:
        from twisted.internet import reactor

        reactor.callFromThread(logFile.rotate)  # type: ignore[attr-defined]

    signal.signal(signal.SIGUSR1, rotate)


def destination(format: str, twistd: Mapping[str, Any] | None) -> ILogObserver:
    """
    Where the log goes, by twistd's options (C{twistd --help}): C{--syslog}
    (with C{--prefix}), else C{--logfile} (C{-} is stdout), else stdout with
    C{-n} and C{twistd.log} in daemon mode.  Without twistd (C{twistd} is
    C{None}: tests, or another runner) the log goes to stdout.
    """
    options: Mapping[str, Any] = twistd if twistd is not None else {"nodaemon": True}
    if options.get("syslog"):
        from twisted.python.syslog import SyslogObserver

        prefix = options.get("prefix") or "twisted"
        # twisted.python.syslog has no type hints; its observer is a legacy one.
        emit = SyslogObserver(prefix).emit
        syslogObserver = LegacyLogObserverWrapper(cast(ILegacyLogObserver, emit))
        return SyslogPriority(syslogObserver, format)
    filename = options.get("logfile") or ""
    nodaemon = bool(options.get("nodaemon"))
    if filename == "-":
        if not nodaemon:
            sys.exit("Daemons cannot log to stdout, exiting!")
        return streamObserver(sys.stdout, format)
    if not filename:
        if nodaemon:
            return streamObserver(sys.stdout, format)
        filename = DEFAULT_LOGFILE
    logFile = LogFile.fromFullPath(filename)
    _rotateOnSIGUSR1(logFile)
    return streamObserver(logFile, format)


def filtered(observer: ILogObserver, level: str) -> ILogObserver:
    """C{observer}, given only the events at C{level} or more severe."""
    predicate = LogLevelFilterPredicate(defaultLogLevel=LEVELS[level])
    return FilteringLogObserver(observer, [predicate])


def daemonObserver(
    level: str, format: str, twistd: Mapping[str, Any] | None = None
) -> ILogObserver:
    """The daemon's observer: C{level} and C{format} applied where twistd logs."""
    return filtered(destination(format, twistd), level)


@implementer(ILogObserver)
class PipeObserver:
    """
    A worker process's log: each event, whole (level, namespace, time,
    failure), as one line of twisted.logger's JSON on the pipe the first
    process reads it from (see L{relayedEvent}), written without ever
    waiting for the first process to read.

    The write end is made non-blocking.  A line the pipe has no room for is
    dropped and counted (C{dropped}); the first line that gets through
    after some were dropped is preceded by one that says how many.  A line
    only partly written (longer than what the pipe took at once) is
    finished before anything else is written, so the first process never
    sees lines cut into each other.

    Events may come from any thread: writes are one at a time.
    """

    def __init__(self, fd: int, dropped: Callable[[], object] | None = None) -> None:
        os.set_blocking(fd, False)
        self._fd = fd
        self._dropped = dropped
        self._lock = threading.Lock()
        # The end of a line the pipe took only part of.
        self._rest = b""
        # Lines dropped since the last one that got through.
        self._lost = 0

    def __call__(self, event: LogEvent) -> None:
        line = (eventAsJSON(event) + "\n").encode("utf-8")
        with self._lock:
            if self._lost and self._finish():
                if not self._write(self._notice(self._lost)):
                    self._drop()
                    return
                self._lost = 0
            if not (self._finish() and self._write(line)):
                self._drop()

    def _finish(self) -> bool:
        """Write what is left of a line only partly written; whether nothing is left."""
        if self._rest:
            self._write(self._rest)
        return not self._rest

    def _write(self, data: bytes) -> bool:
        """Write C{data} as far as the pipe takes it; C{False} when it took none."""
        try:
            written = os.write(self._fd, data)
        except OSError:
            # Full (BlockingIOError), or the first process is gone.
            return False
        self._rest = data[written:]
        return written > 0

    def _drop(self) -> None:
        self._lost += 1
        if self._dropped is not None:
            self._dropped()

    @staticmethod
    def _notice(count: int) -> bytes:
        event = {
            "log_format": (
                "Log lines of this worker dropped while the pipe to the first "
                "process was full: {count}"
            ),
            "count": count,
            "log_level": LogLevel.warn,
            "log_namespace": __name__,
            "log_time": time.time(),
        }
        return (eventAsJSON(event) + "\n").encode("utf-8")


def workerObserver(
    level: str, fd: int = 1, dropped: Callable[[], object] | None = None
) -> ILogObserver:
    """
    A worker process's observer: each event at C{level} or more severe
    through a L{PipeObserver} on C{fd}, its stdout, which is a pipe to the
    first process.
    """
    return filtered(PipeObserver(fd, dropped), level)


def relayedEvent(line: bytes) -> LogEvent | None:
    """
    The event a worker process wrote as C{line} (see L{workerObserver}), to
    be logged again as it is; C{None} when C{line} is anything else.
    """
    try:
        event = eventFromJSON(line.decode("utf-8"))
    except ValueError:
        # Not JSON, or not UTF-8 (UnicodeDecodeError is a ValueError).
        return None
    if not isinstance(event, dict) or event.get("log_level") not in _LEVELS:
        return None
    return event


_LEVELS = frozenset(LogLevel.iterconstants())
