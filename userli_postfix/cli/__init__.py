"""
C{userli-postfix}: the operator's command beside the daemon.

It reads the daemon's configuration (the same variables and options, the
same checks, the same one-line errors naming the variable) and works on the
daemon's own parts: the Userli client, the Redis client, the Go key layout
and the key normalisers.  It runs once on the reactor (C{task.react}) and
exits 0 (ok), 1 (not found, not ok) or 2 (usage or configuration error).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Generator, Mapping
from dataclasses import replace
from typing import IO, Any

from twisted.internet import defer, task
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
)
from twisted.python import usage

from userli_postfix.cli.check import check
from userli_postfix.cli.commands import Tools
from userli_postfix.cli.options import Options, parse
from userli_postfix.cli.report import NOT_OK, USAGE, Report, render
from userli_postfix.config import LISTENERS, Config, ConfigError, raw_values
from userli_postfix.httpclient import makeHTTPClient
from userli_postfix.logs import LEVELS, streamObserver


def cliObserver(level: str, format: str, stream: IO[str]) -> ILogObserver:
    """
    The command's log on C{stream} (stderr): what the command did (a reset,
    a drop) at C{info}, everything else from the daemon's modules only from
    C{warn} up (C{LOG_LEVEL=debug} shows it all), in C{LOG_FORMAT}.
    """
    observer = streamObserver(stream, format)
    default = LogLevel.debug if level == "debug" else max(LEVELS[level], LogLevel.warn)
    predicate = LogLevelFilterPredicate(defaultLogLevel=default)
    predicate.setLogLevelForNamespace(__name__, LEVELS[level])
    return FilteringLogObserver(observer, [predicate])


@defer.inlineCallbacks
def execute(tools: Tools, name: str, words: tuple[str, ...]) -> Generator[Any, Any, Report]:
    """
    Run one parsed command and close what it opened.  A backend that fails
    midway (Redis gone, a command timed out) ends the command with exit
    status 1 and one line saying why, not a traceback.
    """
    report: Report
    try:
        if words[0] == "check":
            report = yield check(tools)
        elif words[0] == "lookup":
            report = yield tools.lookup(words[1], words[2])
        elif words[:2] == ("quota", "show"):
            report = yield tools.quotaShow(words[2])
        elif words[:2] == ("quota", "reset"):
            report = yield tools.quotaReset(words[2])
        elif words[0] == "tls-policy":
            report = yield tools.tlsPolicy(words[1], probe=words[2] == "probe")
        elif words[:2] == ("cache", "drop"):
            report = yield tools.cacheDrop(words[2], words[3])
        else:
            report = yield tools.cacheFlush(words[2] if len(words) > 2 else None)
    except Exception as error:
        report = Report(name, NOT_OK, {"error": f"{name}: {error}"})
    finally:
        yield tools.close()
    return report


def _write(report: Report, as_json: bool, stdout: IO[str], stderr: IO[str]) -> int:
    out, err = render(report, as_json)
    stdout.write(out)
    stdout.flush()
    stderr.write(err)
    stderr.flush()
    return report.status


def checked(raw: Mapping[str, str | None]) -> Config:
    """
    The configuration checked as the daemon checks it, except a socket
    passed in by systemd (C{systemd:...}): it exists only in the daemon's
    process, so here it is kept as written (C{check} says Postfix reaches
    it at the address of the socket unit).

    @raise ConfigError: naming the first variable that is wrong.
    """
    passed = [
        listener
        for listener in LISTENERS
        if (raw.get(listener.variable) or "").strip().startswith("systemd:")
    ]
    config = Config.from_values({**raw, **{listener.variable: "tcp:0" for listener in passed}})
    fields: dict[str, Any] = {
        listener.field: (raw.get(listener.variable) or "").strip() for listener in passed
    }
    return replace(config, **fields)


def run(
    argv: list[str],
    environ: dict[str, str] | os._Environ[str],
    stdout: IO[str],
    stderr: IO[str],
) -> tuple[Options, Tools, bool] | int:
    """
    Parse the command line and the configuration: the options and the
    tools to run them with, or the exit status when there is nothing to run
    (help, version, a usage or configuration error, already reported).
    """
    try:
        options, as_json = parse(argv)
    except usage.UsageError as error:
        stderr.write(f"userli-postfix: {error}\nTry userli-postfix --help.\n")
        return USAGE
    raw = raw_values(environ, options.given())
    try:
        config = checked(raw)
    except ConfigError as error:
        report = Report(
            options.commandName(),
            USAGE,
            {"error": f"configuration error: {error}", "variable": error.variable},
        )
        return _write(report, as_json, stdout, stderr)
    from twisted.internet import reactor

    # The daemon's own HTTP client: the same endpoints, TLS checks,
    # timeouts and cookie policy; its pool is closed with the tools.
    http, pool = makeHTTPClient(reactor)
    tools = Tools(config, raw, reactor, http.request, pool)
    return options, tools, as_json


def main(argv: list[str] | None = None) -> None:
    """The C{userli-postfix} console script."""
    arguments = sys.argv[1:] if argv is None else argv
    prepared = run(arguments, os.environ, sys.stdout, sys.stderr)
    if isinstance(prepared, int):
        raise SystemExit(prepared)
    options, tools, as_json = prepared
    config = tools.config
    globalLogBeginner.beginLoggingTo(
        [cliObserver(config.log_level, config.log_format, sys.stderr)],
        redirectStandardIO=False,
    )

    @defer.inlineCallbacks
    def once(reactor: Any) -> Generator[Any, Any, None]:
        report = yield execute(tools, options.commandName(), options.command())
        status = _write(report, as_json, sys.stdout, sys.stderr)
        if status:
            raise SystemExit(status)

    task.react(once)
