"""
Identical questions in flight at the same moment share one answer.

A busy server asks the same thing many times at once: a hundred messages
of one sender wait for its quota, a hundred lookups of one address for
Userli's answer, a hundred tls_policy lookups of one domain for its
probe.  The first question is asked; the ones that come while it is
unanswered wait for its answer, which every one of them gets, failure
included.  Once answered, the question is forgotten: the next one is
asked afresh (what to keep, and for how long, is a cache's job).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

from twisted.internet import defer
from twisted.python.failure import Failure

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Coalescer(Generic[K, V]):
    """
    The questions in flight, by key, each with those waiting for its answer.

    @param ordered: whether the askers must hear the answer in the order
        they asked (quotas: a rate window counts messages in the order they
        came).  Each asker then gets a Deferred of its own.  Without it the
        first asker gets the Deferred of the work itself, a Deferred fewer
        per question (lookups), and hears the answer after the others; it
        must not cancel it, which would cancel the work for all (nothing
        here cancels).
    """

    def __init__(self, ordered: bool = True) -> None:
        self._ordered = ordered
        self._waiting: dict[K, list[defer.Deferred[V]]] = {}

    def __len__(self) -> int:
        """How many questions are in flight."""
        return len(self._waiting)

    def __contains__(self, key: K) -> bool:
        return key in self._waiting

    def ask(self, key: K, start: Callable[..., defer.Deferred[V]], *args: Any) -> defer.Deferred[V]:
        """
        The answer to C{key}: that of the identical question already in
        flight, else C{start(*args)}'s, shared with whoever asks C{key}
        before it is answered.  When C{start} raises, nothing is in flight
        and the exception reaches the caller.
        """
        waiters = self._waiting.get(key)
        if waiters is not None:
            waiter: defer.Deferred[V] = defer.Deferred()
            waiters.append(waiter)
            return waiter
        work = start(*args)
        # After start: work that raised leaves nobody waiting for nothing,
        # and work answered at once is forgotten at once (just below).
        if self._ordered:
            first: defer.Deferred[V] = defer.Deferred()
            self._waiting[key] = [first]
            work.addBoth(self._answeredAll, key)
            return first
        self._waiting[key] = []
        return work.addBoth(self._answered, key)

    def _answered(self, result: V | Failure, key: K) -> V | Failure:
        """Answer those who waited; the first asker gets it next, from the work itself."""
        waiters = self._waiting.pop(key)
        if isinstance(result, Failure):
            for waiter in waiters:
                waiter.errback(result)
        else:
            for waiter in waiters:
                waiter.callback(result)
        return result

    def _answeredAll(self, result: V | Failure, key: K) -> None:
        """
        Answer every asker, in order.  The work's own Deferred ends here, a
        failure included, which is no one's unhandled error: every asker
        had it.
        """
        self._answered(result, key)
