"""
Test doubles shared by the unit tests of the lookup path, and the
configuration as the daemon reads it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

from userli_postfix.config import Config, raw_values


def configFrom(
    environ: Mapping[str, str], options: Mapping[str, str | None] | None = None
) -> Config:
    """
    The configuration the daemon checks from C{environ} and twistd
    C{options} (keyed by option name, taking precedence).

    @raise userli_postfix.config.ConfigError: naming the first variable
        that is wrong.
    """
    return Config.from_values(raw_values(environ, options))


class FakeLookupClient:
    """
    The lookup endpoints of L{userli_postfix.userli.UserliClient}: every call
    is recorded in C{calls} and answered through a Deferred the test fires,
    all at once (L{answer}), one by key (L{answerFor}), or by hand from
    C{pending}.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.pending: list[defer.Deferred[Any]] = []
        self._byKey: dict[tuple[str, str], defer.Deferred[Any]] = {}

    def _call(self, endpoint: str, key: str) -> defer.Deferred[Any]:
        self.calls.append((endpoint, key))
        d: defer.Deferred[Any] = defer.Deferred()
        self.pending.append(d)
        self._byKey[endpoint, key] = d
        return d

    def alias(self, address: str) -> defer.Deferred[Any]:
        return self._call("alias", address)

    def senders(self, address: str) -> defer.Deferred[Any]:
        return self._call("senders", address)

    def domain(self, name: str) -> defer.Deferred[Any]:
        return self._call("domain", name)

    def mailbox(self, address: str) -> defer.Deferred[Any]:
        return self._call("mailbox", address)

    @staticmethod
    def _fire(d: defer.Deferred[Any], value: Any) -> None:
        if isinstance(value, Exception):
            d.errback(Failure(value))
        else:
            d.callback(value)

    def answer(self, value: Any) -> None:
        """Answer every pending call with C{value} (an exception fails them)."""
        pending, self.pending = self.pending, []
        self._byKey.clear()
        for d in pending:
            self._fire(d, value)

    def answerFor(self, endpoint: str, key: str, value: Any) -> None:
        """Answer the pending call for C{(endpoint, key)}."""
        d = self._byKey.pop((endpoint, key))
        self.pending.remove(d)
        self._fire(d, value)
