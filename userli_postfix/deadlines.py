"""
An answer within a deadline, without cancelling the work behind it.

Cancelling is not always right when a deadline passes: txredisapi matches
replies to commands by position, so a cancelled command would hand the
next command this one's reply; and a Userli probe that outlives its short
deadline should still be heard when it is answered late (a slow Userli is
not a dead one).  So the caller gets its failure at the deadline while the
work runs on to its own end, and whatever it ends with is consumed here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

T = TypeVar("T")


def answerWithin(
    inner: defer.Deferred[T],
    seconds: float,
    clock: IReactorTime,
    expired: Callable[[], BaseException],
) -> defer.Deferred[T]:
    """
    Fire with C{inner}'s result, or fail with C{expired()} after C{seconds},
    whichever comes first.  C{inner} is never cancelled; its late result,
    a failure included, is consumed.
    """
    outer: defer.Deferred[T] = defer.Deferred()

    def expire() -> None:
        if not outer.called:
            outer.errback(expired())

    timer = clock.callLater(seconds, expire)

    def done(result: Any) -> None:
        if timer.active():
            timer.cancel()
        if outer.called:
            # Too late for the caller, who was answered at the deadline.
            return
        if isinstance(result, Failure):
            outer.errback(result)
        else:
            outer.callback(result)

    inner.addBoth(done)
    return outer
