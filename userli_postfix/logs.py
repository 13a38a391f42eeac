"""
Logging set-up: ``LOG_LEVEL`` filters twisted.logger events and
``LOG_FORMAT`` chooses plain text or one JSON object per line.

twistd installs its log observer after the service is built; the daemon
hands this observer to twistd through the application (see
L{userli_postfix.tap.DaemonService.setServiceParent}), so every event, from
start-up to shutdown, goes through the level filter.
"""

from __future__ import annotations

import json
import sys
from typing import IO

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    formatTime,
    textFileLogObserver,
)
from zope.interface import implementer

LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
}


@implementer(ILogObserver)
class JSONLinesObserver:
    """Writes each event as one JSON object on one line."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def __call__(self, event: LogEvent) -> None:
        record = {
            "time": formatTime(event.get("log_time"), timeFormat="%Y-%m-%dT%H:%M:%S.%f%z"),
            "level": event["log_level"].name if event.get("log_level") else "info",
            "namespace": event.get("log_namespace", ""),
            "message": formatEvent(event),
        }
        failure = event.get("log_failure")
        if failure is not None:
            record["error"] = failure.getTraceback()
        self._stream.write(json.dumps(record, default=str) + "\n")
        self._stream.flush()


def makeObserver(level: str, format: str, stream: IO[str] | None = None) -> ILogObserver:
    """An observer that drops events below C{level} and writes the rest in C{format}."""
    out = stream if stream is not None else sys.stdout
    observer: ILogObserver = (
        JSONLinesObserver(out) if format == "json" else textFileLogObserver(out)
    )
    predicate = LogLevelFilterPredicate(defaultLogLevel=LEVELS[level])
    return FilteringLogObserver(observer, [predicate])
