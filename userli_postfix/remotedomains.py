"""
The remote-domain memory: the domains Userli said it does not host.

A domain Userli does not host has no aliases, mailboxes, senders or quotas
there.  Postfix nevertheless asks about it several times per message (the
domain itself, a remote recipient as an alias, a remote sender's logins and
quota), and each question is an API call.  Once Userli answered ``domain X``
with "not ours", those questions are settled here, without a call, for
C{REMOTE_DOMAIN_CACHE_TTL}, so that a domain added in Userli is recognised
within that time.

Only a real answer is remembered, never a failure.  The entries live in the
lookup cache's store under a map name of their own (Redis key
C{userli:lookup:remote:<domain>}): a key the Go program never reads, under
the prefix whose changes Redis reports to the near-cache, so every process
sees a removal (C{userli-postfix cache drop domain X}) at once.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from userli_postfix.cache import LookupCache

log = Logger()

#: The map name of the entries in the lookup cache's store.
REMOTE_MAP = "remote"

#: What an entry holds (only its presence counts): what Userli's answer
#: turned into.
REMEMBERED = b"NOTFOUND"

#: Without Redis, the most domains kept in the process: a day of spam from
#: random domains must not grow it without bound.
MEMORY_ENTRIES = 50_000

# A domain Userli hosts, as the domain map's cached answer says.
_HOSTED = b"OK 1"


def domain_of(mapname: str, key: str) -> str:
    """The domain a key of C{mapname} is about (the part after the last C{@})."""
    return key if mapname == "domain" else key.rpartition("@")[2]


class RemoteDomains:
    """
    The domains Userli said it does not host, in C{store} for C{ttl}
    seconds.

    @param store: a L{LookupCache}; the lookup cache itself when it shares
        the backend, so that a read of both is one Redis command, and so
        that a domain whose C{domain} answer (C{OK 1}) is held shows at once
        that it is not remote.
    @param complete: whether C{store} holds everything in this process (a
        memory cache): then L{known} never needs to ask further.
    """

    def __init__(self, store: LookupCache, ttl: float, complete: bool) -> None:
        self._store = store
        self._ttl = ttl
        self._complete = complete

    def held(self, domain: str) -> bool:
        """Whether this process holds the memory of C{domain} (the cheap check)."""
        return self._store.peek(REMOTE_MAP, domain) is not None

    def known(self, domain: str) -> bool | None:
        """
        C{True} when C{domain} is remembered, C{False} when it surely is not,
        C{None} when only L{remembered} can tell.
        """
        store = self._store
        if store.peek(REMOTE_MAP, domain) is not None:
            return True
        if self._complete or store.peek("domain", domain) == _HOSTED:
            return False
        return None

    def remembered(self, domain: str) -> defer.Deferred[bool]:
        """
        Whether C{domain} is remembered, from the store.  Never fails: a
        store that cannot answer means "not remembered", so Userli is asked.
        """

        def unknown(failure: Failure) -> bool:
            log.debug("Remote-domain memory unavailable: {error}", error=failure.value)
            return False

        return self._store.get(REMOTE_MAP, domain).addCallbacks(
            lambda reply: reply is not None, unknown
        )

    def remember(self, domain: str) -> None:
        """Userli said it does not host C{domain}."""
        self._store.set(REMOTE_MAP, domain, REMEMBERED, self._ttl)
