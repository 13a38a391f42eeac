"""Tests for L{userli_postfix.signals}: SIGTERM and SIGINT stop gracefully, exit 0."""

from __future__ import annotations

import signal
from typing import Any

from twisted.internet import error
from twisted.trial.unittest import SynchronousTestCase

from userli_postfix import signals


class FakeReactor:
    """Records stops; runs what is called from a thread and when running at once, on demand."""

    def __init__(self) -> None:
        self.stops = 0
        self.queued: list[Any] = []
        self.whenRunning: list[Any] = []
        self.stopped = False

    def callFromThread(self, f: Any, *args: Any) -> None:
        self.queued.append((f, args))

    def callWhenRunning(self, f: Any, *args: Any) -> None:
        self.whenRunning.append((f, args))

    def stop(self) -> None:
        if self.stopped:
            raise error.ReactorNotRunning()
        self.stopped = True
        self.stops += 1

    def runQueued(self) -> None:
        queued, self.queued = self.queued, []
        for f, args in queued:
            f(*args)


class InstallTests(SynchronousTestCase):
    """L{signals.install}."""

    def setUp(self) -> None:
        self.reactor = FakeReactor()
        self.handlers: dict[int, Any] = {
            signal.SIGTERM: signal.SIG_DFL,
            signal.SIGINT: signal.default_int_handler,
        }

    def install(self) -> None:
        signals.install(self.reactor, self.handlers.__setitem__, self.handlers.__getitem__)

    def test_stop_without_recording(self) -> None:
        """
        SIGTERM stops the reactor through its public C{stop}, recording
        nothing twistd would re-raise; a second signal does no harm.
        """
        self.install()
        handler = self.handlers[signal.SIGTERM]
        handler(signal.SIGTERM, None)
        handler(signal.SIGINT, None)
        self.reactor.runQueued()
        self.assertEqual(self.reactor.stops, 1)
        self.assertFalse(hasattr(self.reactor, "_exitSignal"))

    def test_again_once_running(self) -> None:
        """Once the reactor runs (and has installed its own), ours replace them again."""
        self.install()
        ours = self.handlers[signal.SIGTERM]
        self.handlers[signal.SIGTERM] = self.handlers[signal.SIGINT] = "twisted's"
        for f, args in self.reactor.whenRunning:
            f(*args)
        self.assertIs(self.handlers[signal.SIGTERM], ours)
        self.assertIs(self.handlers[signal.SIGINT], ours)

    def test_ignored_sigint_stays(self) -> None:
        """A SIGINT ignored by whoever started the daemon stays ignored."""
        self.handlers[signal.SIGINT] = signal.SIG_IGN
        self.install()
        self.assertIs(self.handlers[signal.SIGINT], signal.SIG_IGN)
        self.assertIsNot(self.handlers[signal.SIGTERM], signal.SIG_DFL)


class TwistedTests(SynchronousTestCase):
    """What L{signals} works around, pinned: fails if Twisted changes it."""

    def test_twisted_handler_records_signal(self) -> None:
        """
        Twisted's own SIGTERM handler records the signal for twistd to
        re-raise once stopped (so the process would die of SIGTERM after
        a clean drain); ours exist because of it.
        """
        from twisted.internet.base import ReactorBase

        class Recording(ReactorBase):
            def callFromThread(self, f: Any, *args: Any, **kwargs: Any) -> None:
                pass

            def installWaker(self) -> None:
                pass

        reactor = Recording()
        self.assertIsNone(getattr(reactor, "_exitSignal", None))
        reactor.sigTerm(signal.SIGTERM)
        self.assertEqual(getattr(reactor, "_exitSignal", None), signal.SIGTERM)
