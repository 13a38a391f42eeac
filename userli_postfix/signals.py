"""
SIGTERM and SIGINT: a graceful stop that ends with exit status 0.

Twisted's own handlers stop the reactor too, but also record the signal,
and twistd then kills its own process with it once everything has stopped
(so a supervisor sees "killed by SIGTERM", status 143 in a shell, even
after a clean drain).  The daemon stops gracefully on these signals, and a
graceful stop is a success: these handlers ask for the same stop and
record nothing, so twistd exits 0.

They are installed as soon as the listeners accept (twistd runs the
reactor only later, and a SIGTERM in between, from a supervisor or a test
that stops the daemon as soon as it answers, must stop it gracefully too),
and again over Twisted's, which the reactor installs in its first "during
startup" trigger.  Between Twisted's installing its handlers and ours
replacing them, a signal would reach Twisted's: so SIGTERM and SIGINT are
blocked from the "before startup" phase until ours are back.  A signal sent
meanwhile is held by the kernel, not lost, and delivered to ours.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

from twisted.internet import error
from twisted.logger import Logger

log = Logger()

#: The signals that stop the daemon gracefully.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

Handler = Callable[[int, "FrameType | None"], Any]
Mask = Callable[[int, Iterable[int]], object]


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
    setMask: Mask = signal.pthread_sigmask,
) -> None:
    """
    Stop C{reactor} gracefully on SIGTERM and SIGINT, now and once it runs
    (replacing Twisted's handlers).  A SIGINT that is ignored (a daemon
    started in the background by a shell) stays ignored.

    Call before the reactor runs: the triggers added here run after the
    reactor's own "during startup" trigger, which it adds when it is made
    and which installs Twisted's handlers.
    """
    handler = gracefulStop(reactor)

    def installNow() -> None:
        for number in STOP_SIGNALS:
            if getHandler(number) is not signal.SIG_IGN:
                setHandler(number, handler)

    def hold() -> None:
        # The reactor is about to install Twisted's handlers: hold the stop
        # signals back until ours are in place again.  The reactor runs in
        # this thread, and threads it starts later inherit the mask.
        setMask(signal.SIG_BLOCK, STOP_SIGNALS)

    def replaceAndRelease() -> None:
        try:
            installNow()
        finally:
            # A signal held meanwhile is delivered now, to ours.  Released
            # before the "after startup" triggers, so worker processes
            # spawned there do not inherit a blocked SIGTERM.
            setMask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    installNow()
    reactor.addSystemEventTrigger("before", "startup", hold)
    reactor.addSystemEventTrigger("during", "startup", replaceAndRelease)
