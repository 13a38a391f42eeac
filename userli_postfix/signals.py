"""
SIGTERM and SIGINT: a graceful stop that ends with exit status 0.

Twisted's own handlers stop the reactor too, but also record the signal,
and twistd then kills its own process with it once everything has stopped
(so a supervisor sees "killed by SIGTERM", status 143 in a shell, even
after a clean drain).  The daemon stops gracefully on these signals, and a
graceful stop is a success: these handlers ask for the same stop and
record nothing, so twistd exits 0.

They are installed twice: as soon as the listeners accept (twistd installs
its handlers only when the reactor runs, and a SIGTERM in between, from a
supervisor or a test that stops the daemon as soon as it answers, would
kill the process outright), and again once the reactor runs, over
Twisted's.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

from twisted.internet import error
from twisted.logger import Logger

log = Logger()

#: The signals that stop the daemon gracefully.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

Handler = Callable[[int, "FrameType | None"], Any]


def gracefulStop(reactor: Any) -> Handler:
    """A signal handler that asks C{reactor} to stop, once."""

    def stop() -> None:
        try:
            reactor.stop()
        except error.ReactorNotRunning:
            # A second signal while the first stop is under way.
            pass

    def handler(number: int, frame: FrameType | None) -> None:
        log.info("Received {name}, stopping", name=signal.Signals(number).name)
        # Safe from a signal handler, and queued until the reactor runs
        # when it does not yet.
        reactor.callFromThread(stop)

    return handler


def install(
    reactor: Any,
    setHandler: Callable[[int, Handler], object] = signal.signal,
    getHandler: Callable[[int], object] = signal.getsignal,
) -> None:
    """
    Stop C{reactor} gracefully on SIGTERM and SIGINT, now and once it runs
    (replacing Twisted's handlers).  A SIGINT that is ignored (a daemon
    started in the background by a shell) stays ignored.
    """
    handler = gracefulStop(reactor)

    def installNow() -> None:
        for number in STOP_SIGNALS:
            if getHandler(number) is not signal.SIG_IGN:
                setHandler(number, handler)

    installNow()
    # "after startup" triggers run after the reactor installed its own.
    reactor.callWhenRunning(installNow)
