"""
A circuit breaker for the Userli API: while Userli does not answer, calls
fail at once instead of each waiting out the whole deadline.

Postfix's smtpd processes wait for every lookup, login and policy answer.
A hanging API costing each of them 5 s piles them up; a fast failure
(lookups ``TEMP``, logins ``FAIL`` with ``temp``, quotas the last one
known) frees them.  Only calls that cost the full deadline or found no
connection count as failures: an API that answers, even with a 500 or a
garbage body, is up, and never opens the breaker.

The states, on an injected clock:

- closed: every call goes out; L{FAILURES_TO_OPEN} failures in a row open it.
- open: calls fail fast; L{PROBE_INTERVAL} after opening (or after the last
  failed probe) the next call goes out as the one probe, while the others
  keep failing fast.  Its caller is answered within L{PROBE_TIMEOUT}; the
  request itself runs on to the normal deadline.
- the probe's outcome: an answer closes the breaker; no answer within
  L{PROBE_TIMEOUT} keeps it open and the next probe follows an interval
  later.  Any answer to an older call, such as a probe answered after its
  caller gave up, closes it too.

So service resumes at most about C{PROBE_INTERVAL + PROBE_TIMEOUT} (1.5 s)
after Userli is back, even when a probe went out to a Userli that hung and
never answers it; and a Userli that answers again, however slowly within
the normal deadline, closes the breaker with its first answer to a probe.
Only one probe is awaited at a time; those that outlived their short
deadline (at most a few, one per 1.5 s of the 5 s deadline) are only
listened to.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from twisted.internet import defer, error
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseNeverReceived

log = Logger()

# A handful: one slow answer is bad luck, five in a row is an outage.
FAILURES_TO_OPEN = 5
# How long calls fail fast before one is let through to find out.
PROBE_INTERVAL = 0.5
# How long a probe's caller waits, and how long until the next probe: short,
# so that a probe sent to a hanging Userli just before it comes back does
# not hold service up for a whole deadline.  The probe's request keeps the
# normal deadline, so a slow answer still closes the breaker.
PROBE_TIMEOUT = 1.0

# What a call that never got an answer fails with: its deadline expired, or
# no connection could be made or kept until a response arrived.
_NO_ANSWER: tuple[type[BaseException], ...] = (
    defer.TimeoutError,
    defer.CancelledError,
    error.ConnectError,
    error.DNSLookupError,
    error.TimeoutError,
    error.ConnectionClosed,
    ResponseNeverReceived,
)


def unanswered(failure: Failure) -> bool:
    """Whether a call's failure means Userli gave no answer at all (it counts)."""
    return failure.check(*_NO_ANSWER) is not None


class State(Enum):
    CLOSED = "closed"
    OPEN = "open"
    PROBING = "probing"


@dataclass(frozen=True, slots=True, eq=False)
class Attempt:
    """
    A call let through: how long its caller may wait for it (infinite: the
    call's own deadline), and whether it is the probe.  Compared by
    identity: each probe is its own attempt.
    """

    timeout: float
    probe: bool = False


_NORMAL = Attempt(timeout=float("inf"))


class CircuitBreaker:
    """
    The state machine; L{admit} before a call, L{record} after it.

    @param changed: called with C{True} when the breaker opens and C{False}
        when it closes (metrics).
    """

    def __init__(
        self,
        clock: IReactorTime,
        changed: Callable[[bool], None] | None = None,
        failures_to_open: int = FAILURES_TO_OPEN,
        probe_interval: float = PROBE_INTERVAL,
        probe_timeout: float = PROBE_TIMEOUT,
    ) -> None:
        self._clock = clock
        self._changed = changed
        self._threshold = failures_to_open
        self._interval = probe_interval
        self._probeTimeout = probe_timeout
        self.state = State.CLOSED
        self._failures = 0
        self._openedAt = 0.0
        self._retryAt = 0.0
        self._probe: Attempt | None = None

    @property
    def isOpen(self) -> bool:
        """Whether calls fail fast (a probe in flight included)."""
        return self.state is not State.CLOSED

    def admit(self) -> Attempt | None:
        """The call may go out (with this deadline cap), or C{None}: fail fast."""
        if self.state is State.CLOSED:
            return _NORMAL
        if self.state is State.OPEN and self._clock.seconds() >= self._retryAt:
            self.state = State.PROBING
            self._probe = Attempt(timeout=self._probeTimeout, probe=True)
            return self._probe
        return None

    def probeUnanswered(self, attempt: Attempt) -> None:
        """
        The probe C{attempt} got no answer within its caller's deadline:
        keep failing fast and send the next probe an interval from now.
        Its request goes on; should it be answered later, L{record} closes
        the breaker then.
        """
        if attempt is self._probe and self.state is State.PROBING:
            self._probe = None
            self.state = State.OPEN
            self._retryAt = self._clock.seconds() + self._interval

    def record(self, attempt: Attempt, answered: bool) -> None:
        """The outcome of a call L{admit} let through."""
        if answered:
            self._failures = 0
            if self.state is not State.CLOSED:
                self._close()
            return
        if attempt.probe:
            # A failed probe, unless a later one has taken its place.
            self.probeUnanswered(attempt)
            return
        if self.state is State.CLOSED:
            self._failures += 1
            if self._failures >= self._threshold:
                self._open()

    def _open(self) -> None:
        now = self._clock.seconds()
        self.state = State.OPEN
        self._openedAt = now
        self._retryAt = now + self._interval
        log.warn(
            "The Userli API did not answer {n} calls in a row: failing fast (lookups TEMP, "
            "logins temporary failures, quotas the last known) until it answers again",
            n=self._failures,
        )
        if self._changed is not None:
            self._changed(True)

    def _close(self) -> None:
        self.state = State.CLOSED
        self._probe = None
        self._failures = 0
        log.info(
            "The Userli API answers again after {seconds:.1f} s: calls go out again",
            seconds=self._clock.seconds() - self._openedAt,
        )
        if self._changed is not None:
            self._changed(False)
