"""
Where a SASL login is decided, and how fast a guesser may try.

 - L{Authenticator} decides one login: it normalises the name, asks
   Userli, fails closed, counts the outcome and holds back every failure
   for the configured delay.
 - L{LoginQueue} makes the logins of one connection take turns, so that
   each failure costs its own delay however many a client pipelines.

Passwords never reach a log line, at any level.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from userli_postfix.addresses import normalise_address
from userli_postfix.dovecotauth import (
    ERROR,
    INVALID,
    REASON_FAILED,
    SUCCESS,
    UNSUPPORTED,
    Ask,
    Unreadable,
    Verdict,
    sanitise,
)
from userli_postfix.metrics import Metrics, increments, observations
from userli_postfix.userli import AuthResult, UserliClient, UserliError

log = Logger()

REASON_AUTHZID = "authorization identity not allowed"
REASON_TEMPORARY = "temporary authentication failure"
REASON_UNSUPPORTED = "unsupported authentication mechanism"


class Authenticator:
    """
    Decides logins: normalise, ask Userli, fail closed.

    Every failed login is answered only after C{failure_delay} seconds
    (Dovecot's C{auth_failure_delay}); the Deferred fires only then.  With
    L{LoginQueue} deciding one login at a time per connection, this slows
    a password guesser to one try per delay per connection, however many
    it pipelines, without holding up anything else: the delay is a timer on
    the injected clock, never a wait.
    """

    def __init__(
        self,
        client: UserliClient,
        clock: IReactorTime,
        metrics: Metrics,
        delimiter: str = "",
        failure_delay: float = 2.0,
    ) -> None:
        self._client = client
        self._clock = clock
        self._logins = increments(metrics.sasl_auth)
        self._durations = observations(metrics.sasl_auth_duration)
        self._delimiter = delimiter
        self.failure_delay = failure_delay

    def login(
        self,
        mechanism: str,
        login: str,
        password: str,
        authzid: str = "",
        remote: str = "",
    ) -> defer.Deferred[Verdict]:
        """
        Check C{login} and C{password}.  The Deferred never fails.

        @param authzid: PLAIN's authorisation identity; empty, or the same
            mailbox as C{login}, or the login is refused.
        @param remote: the SMTP client's address, for the log.
        """
        started = self._clock.seconds()
        address = normalise_address(login, self._delimiter)
        if address is None:
            log.info(
                "SASL {mechanism} login from {remote} refused: the login name is not an address",
                mechanism=mechanism,
                remote=remote,
            )
            return self._finish(mechanism, started, Verdict(INVALID, reason=REASON_FAILED))
        if authzid and normalise_address(authzid, self._delimiter) != address:
            log.info(
                "SASL {mechanism} login of {user} from {remote} refused: "
                "it asked to act as another identity",
                mechanism=mechanism,
                user=address,
                remote=remote,
            )
            return self._finish(mechanism, started, Verdict(INVALID, address, REASON_AUTHZID))
        if not password:
            log.info(
                "SASL {mechanism} login of {user} from {remote} refused: empty password",
                mechanism=mechanism,
                user=address,
                remote=remote,
            )
            return self._finish(mechanism, started, Verdict(INVALID, address, REASON_FAILED))

        def decided(result: AuthResult) -> Verdict:
            if result.ok:
                log.info(
                    "SASL {mechanism} login of {user} from {remote} succeeded",
                    mechanism=mechanism,
                    user=address,
                    remote=remote,
                )
                return Verdict(SUCCESS, address)
            reason = sanitise(result.message) or REASON_FAILED
            log.info(
                "SASL {mechanism} login of {user} from {remote} refused by Userli: {reason}",
                mechanism=mechanism,
                user=address,
                remote=remote,
                reason=reason,
            )
            return Verdict(INVALID, address, reason)

        def failed(failure: Failure) -> Verdict:
            if failure.check(UserliError):
                log.warn(
                    "SASL {mechanism} login of {user} from {remote} refused, "
                    "the Userli API gave no usable answer: {error}",
                    mechanism=mechanism,
                    user=address,
                    remote=remote,
                    error=str(failure.value),
                )
            else:
                # A bug, not an outage: still fail closed, but say where.
                log.failure(
                    "SASL login of {user} refused after an unexpected error",
                    failure,
                    user=address,
                )
            return Verdict(ERROR, address, REASON_TEMPORARY, temporary=True)

        def finish(verdict: Verdict) -> defer.Deferred[Verdict]:
            return self._finish(mechanism, started, verdict)

        asked: defer.Deferred[AuthResult] = defer.maybeDeferred(
            self._client.auth, address, password
        )
        decision: defer.Deferred[Verdict] = asked.addCallbacks(decided, failed)
        return decision.addCallback(finish)

    def refuse(self, mechanism: str, reason: str, remote: str = "") -> defer.Deferred[Verdict]:
        """
        Fail a login whose credentials could not even be read (bad base64,
        a malformed PLAIN response): counted as an error, and delayed like
        every other failure so that garbage is no faster than a guess.
        """
        log.info(
            "SASL {mechanism} login from {remote} refused: {reason}",
            mechanism=mechanism,
            remote=remote,
            reason=reason,
        )
        return self._finish(mechanism, self._clock.seconds(), Verdict(ERROR, reason=reason))

    def unsupported(self, remote: str = "") -> Verdict:
        """
        Answer an AUTH for a mechanism we do not offer.  Not a login attempt
        (no credentials were sent), so it is answered at once.
        """
        log.info("SASL login from {remote} asked for an unsupported mechanism", remote=remote)
        self._count(UNSUPPORTED, 0.0, ERROR)
        return Verdict(ERROR, reason=REASON_UNSUPPORTED)

    def _count(self, mechanism: str, elapsed: float, result: str) -> None:
        self._logins[mechanism, result]()
        self._durations[mechanism, result](elapsed)

    def _finish(self, mechanism: str, started: float, verdict: Verdict) -> defer.Deferred[Verdict]:
        # The duration measures the decision, not the brake applied after it.
        self._count(mechanism, self._clock.seconds() - started, verdict.result)
        if verdict.ok or self.failure_delay <= 0:
            return defer.succeed(verdict)
        return task.deferLater(self._clock, self.failure_delay, lambda: verdict)


class LoginQueue:
    """
    The logins of one connection, decided one after the other in the order
    they came, each with its own failure delay.

    Postfix never sends a second login before the first is answered; a
    client that pipelines guesses would otherwise get all its failures
    after one delay.  A login withdrawn before its turn never costs an API
    call; one withdrawn while being decided is let finish.

    @param answered: called with each L{Ask} and its verdict, in order.
    @param changed: called whenever the number of logins queued or being
        decided (C{len}) changed.
    """

    def __init__(
        self,
        authenticator: Authenticator,
        answered: Callable[[Ask, Verdict], None],
        changed: Callable[[], None],
    ) -> None:
        self._authenticator = authenticator
        self._answered = answered
        self._changed = changed
        # Logins not started yet, oldest first.
        self._queue: deque[Ask] = deque()
        # The login being decided, if any.
        self._running: Ask | None = None
        self._advancing = False
        self._count = 0
        self._closed = False

    def __len__(self) -> int:
        """Logins queued or being decided."""
        return self._count

    def add(self, ask: Ask) -> None:
        """Decide C{ask} once every login before it has been answered."""
        self._queue.append(ask)
        self._count += 1
        self._changed()
        self._advance()

    def withdraw(self, ask: Ask) -> None:
        """Drop C{ask} if it still waits its turn."""
        if ask in self._queue:
            self._queue.remove(ask)
            self._count -= 1
            self._changed()

    def close(self) -> None:
        """The connection is gone: start nothing more, answer nothing more."""
        self._closed = True
        self._queue.clear()

    def _decide(self, ask: Ask) -> defer.Deferred[Verdict]:
        question = ask.question
        if isinstance(question, Unreadable):
            return self._authenticator.refuse(question.mechanism, question.reason, question.remote)
        return self._authenticator.login(
            question.mechanism,
            question.login,
            question.password,
            question.authzid,
            remote=question.remote,
        )

    def _advance(self) -> None:
        """Start the next queued login when none is being decided."""
        if self._advancing:
            # Called back from a decision that finished at once: the loop
            # below, further up the stack, goes on.
            return
        self._advancing = True
        try:
            while self._running is None and self._queue and not self._closed:
                ask = self._queue.popleft()
                self._running = ask
                verdict = defer.maybeDeferred(self._decide, ask)
                verdict.addCallback(self._done, ask)
                verdict.addErrback(self._lost, ask)
        finally:
            self._advancing = False

    def _done(self, verdict: Verdict, ask: Ask) -> None:
        self._running = None
        self._count -= 1
        if not self._closed:
            self._answered(ask, verdict)
            self._advance()
            self._changed()

    def _lost(self, failure: Failure, ask: Ask) -> None:
        # The authenticator never fails; should it, the queue must go on.
        log.failure("SASL reply lost", failure)
        if self._running is ask:
            self._running = None
            self._count -= 1
        if not self._closed:
            self._advance()
            self._changed()
