"""Tests for L{userli_postfix.signals}: SIGTERM and SIGINT stop gracefully, exit 0."""

from __future__ import annotations

import signal
from typing import Any

from twisted.internet import error
from twisted.internet.base import ReactorBase
from twisted.trial.unittest import SynchronousTestCase

from userli_postfix import signals


class FakeReactor:
    """Records stops, what is called from a thread and the startup triggers; runs them on demand."""

    def __init__(self) -> None:
        self.stops = 0
        self.queued: list[Any] = []
        self.triggers: dict[str, list[Any]] = {"before": [], "during": [], "after": []}
        self.stopped = False

    def callFromThread(self, f: Any, *args: Any) -> None:
        self.queued.append((f, args))

    def addSystemEventTrigger(self, phase: str, event: str, f: Any, *args: Any) -> None:
        assert event == "startup"
        self.triggers[phase].append((f, args))

    def fire(self, phase: str) -> None:
        for f, args in self.triggers[phase]:
            f(*args)

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
        self.blocked: set[int] = set()
        self.maskCalls: list[tuple[int, set[int]]] = []

    def setMask(self, how: int, numbers: Any) -> None:
        self.maskCalls.append((how, set(numbers)))
        if how == signal.SIG_BLOCK:
            self.blocked |= set(numbers)
        else:
            self.assertEqual(how, signal.SIG_UNBLOCK)
            self.blocked -= set(numbers)
            self.handlersWhenReleased = dict(self.handlers)

    def install(self) -> None:
        signals.install(
            self.reactor, self.handlers.__setitem__, self.handlers.__getitem__, self.setMask
        )

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

    def test_again_during_startup(self) -> None:
        """
        Once the reactor has installed its own (in the "during startup"
        phase), ours replace them again, before any "after startup" trigger.
        """
        self.install()
        ours = self.handlers[signal.SIGTERM]
        self.reactor.fire("before")
        self.handlers[signal.SIGTERM] = self.handlers[signal.SIGINT] = "twisted's"
        self.reactor.fire("during")
        self.assertIs(self.handlers[signal.SIGTERM], ours)
        self.assertIs(self.handlers[signal.SIGINT], ours)
        self.assertEqual(self.reactor.triggers["after"], [])

    def test_held_while_twisted_handlers_are_in(self) -> None:
        """
        SIGTERM and SIGINT are blocked from the "before startup" phase
        (ahead of the reactor installing its handlers) until ours are back,
        and only then released: nothing stays blocked once the reactor runs.
        """
        self.install()
        self.assertEqual(self.blocked, set())
        self.reactor.fire("before")
        self.assertEqual(self.blocked, {signal.SIGTERM, signal.SIGINT})
        ours = self.handlers[signal.SIGTERM]
        self.handlers[signal.SIGTERM] = "twisted's"
        self.reactor.fire("during")
        self.assertEqual(self.blocked, set())
        # Ours were back by the time the held signals were let through.
        self.assertEqual(self.handlersWhenReleased, {signal.SIGTERM: ours, signal.SIGINT: ours})
        self.assertEqual(
            self.maskCalls,
            [
                (signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT}),
                (signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT}),
            ],
        )

    def test_released_when_installing_fails(self) -> None:
        """Should installing ours fail, the signals are released all the same."""
        failing = []

        def getHandler(number: int) -> object:
            if failing:
                raise ValueError("no")
            return self.handlers[number]

        signals.install(self.reactor, self.handlers.__setitem__, getHandler, self.setMask)
        self.reactor.fire("before")
        failing.append(True)
        self.assertRaises(ValueError, self.reactor.fire, "during")
        self.assertEqual(self.blocked, set())

    def test_ignored_sigint_stays(self) -> None:
        """A SIGINT ignored by whoever started the daemon stays ignored."""
        self.handlers[signal.SIGINT] = signal.SIG_IGN
        self.install()
        self.assertIs(self.handlers[signal.SIGINT], signal.SIG_IGN)
        self.assertIsNot(self.handlers[signal.SIGTERM], signal.SIG_DFL)


class Recording(ReactorBase):
    """A reactor that runs nothing: its startup event can be fired by hand."""

    def callFromThread(self, f: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def installWaker(self) -> None:
        pass


class TwistedTests(SynchronousTestCase):
    """What L{signals} works around, pinned: fails if Twisted changes it."""

    def test_twisted_handler_records_signal(self) -> None:
        """
        Twisted's own SIGTERM handler records the signal for twistd to
        re-raise once stopped (so the process would die of SIGTERM after
        a clean drain); ours exist because of it.
        """
        reactor = Recording()
        self.assertIsNone(getattr(reactor, "_exitSignal", None))
        reactor.sigTerm(signal.SIGTERM)
        self.assertEqual(getattr(reactor, "_exitSignal", None), signal.SIGTERM)

    def test_signal_during_startup_reaches_ours(self) -> None:
        """
        A real reactor starting up installs Twisted's handlers in its first
        "during startup" trigger; a SIGTERM that arrives right after that
        (here: from the next trigger) still reaches ours, which record
        nothing, and once started ours are in place and nothing is blocked.
        Fails if Twisted moves its handlers to a later phase.
        """
        saved = {number: signal.getsignal(number) for number in signals.STOP_SIGNALS}
        self.addCleanup(
            signal.pthread_sigmask, signal.SIG_SETMASK, signal.pthread_sigmask(signal.SIG_BLOCK, [])
        )
        for number, handler in saved.items():
            self.addCleanup(signal.signal, number, handler)
        reactor = Recording()
        seen = []
        twisted = reactor.sigTerm

        def sendSignal() -> None:
            seen.append(signal.getsignal(signal.SIGTERM))
            signal.raise_signal(signal.SIGTERM)

        reactor.addSystemEventTrigger("during", "startup", sendSignal)
        signals.install(reactor)
        reactor.startRunning(installSignalHandlers=True)
        self.assertEqual(seen, [twisted])
        self.assertIsNone(getattr(reactor, "_exitSignal", None))
        self.assertIsNot(signal.getsignal(signal.SIGTERM), twisted)
        self.assertNotIn(signal.SIGTERM, signal.pthread_sigmask(signal.SIG_BLOCK, []))
