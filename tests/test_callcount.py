"""
How many Python function calls one uncached socketmap lookup costs through
the daemon's stack: the socketmap protocol, L{Lookups}, the near-cache in
front of Redis, the Userli client, and treq over Twisted's Agent and its
connection pool, as L{userli_postfix.daemon.build} wires them.

Counting calls is deterministic where timing is not, and a call is roughly
what costs CPU in this code.  I/O is in memory: the sockets are
L{StringTransport}s on a L{MemoryReactorClock} (the test plays Userli on the
pooled HTTP connection) and Redis is a dictionary behind the connection
object the Redis client is given.

The budgets are the counts measured when they were set (Python 3.11,
Twisted 26.10, treq 26.7, prometheus_client of the time) plus about 20 %:
enough for a library release to move a little, not enough to hide a
regression that adds a Deferred chain, a timer or a label lookup per
lookup.  When they were set, an uncached lookup made 80 calls of our own
and 730 in all (the version before made 90 and 772), and a hot
one 51 in all.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from userli_postfix.cache import NearCache, RedisCache
from userli_postfix.config import RedisTarget
from userli_postfix.httpclient import makeHTTPClient
from userli_postfix.lookups import Lookups
from userli_postfix.metrics import Metrics
from userli_postfix.redisclient import RedisClient
from userli_postfix.socketmap import SocketmapFactory, netstring
from userli_postfix.userli import UserliClient

# Calls of functions defined in userli_postfix, per uncached lookup.
OUR_BUDGET = 96
# Every Python function call, per uncached lookup: ours, Twisted's, treq's,
# hyperlink's, the standard library's.
TOTAL_BUDGET = 880
# Every Python function call of a lookup answered from the near-cache.
HOT_BUDGET = 60

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 4\r\n\r\ntrue"


class DictRedis:
    """
    The connection the Redis client is given: the few commands the lookup
    cache sends, answered at once from a dictionary.
    """

    def __init__(self) -> None:
        self.data: dict[str, str] = {}
        self.commands: list[str] = []

    def execute_command(self, command: str, *args: Any) -> defer.Deferred[Any]:
        self.commands.append(command)
        if command == "GET":
            return defer.succeed(self.data.get(args[0]))
        if command == "MGET":
            return defer.succeed([self.data.get(key) for key in args])
        if command == "SET":
            self.data[args[0]] = args[1]
            return defer.succeed("OK")
        if command == "EVAL" and "SET" in args[0]:
            n = args[1]
            keys, values = args[2 : 2 + n], args[2 + n : 2 + 2 * n]
            self.data.update(zip(keys, values, strict=True))
            return defer.succeed(n)
        raise AssertionError(f"unexpected Redis command {command}")


class OnePool:
    """The Redis client's pool: always the one connection, ready."""

    def __init__(self, connection: DictRedis) -> None:
        self.connection = connection

    def pick(self) -> DictRedis:
        return self.connection

    def stop(self) -> defer.Deferred[None]:
        return defer.succeed(None)


class Stack:
    """The daemon's lookup stack on in-memory I/O."""

    def __init__(self) -> None:
        self.reactor = MemoryReactorClock()
        metrics = Metrics(process=False)
        http, _ = makeHTTPClient(self.reactor)
        client = UserliClient(http.request, "http://127.0.0.1:8000", "token", self.reactor, metrics)
        self.redis = DictRedis()
        target = RedisTarget(host="127.0.0.1", port=6379, db=0)
        redis = RedisClient(target, self.reactor, pool=OnePool(self.redis))
        near = NearCache(RedisCache(redis, 60.0), self.reactor, 60.0, metrics=metrics)
        # What Redis confirms once client tracking is on.
        near.trackingStarted()
        lookups = Lookups(client, near, metrics, self.reactor)
        factory = SocketmapFactory(self.reactor, lookups, metrics)
        self.postfix = StringTransport()
        self.protocol = factory.buildProtocol(None)
        self.protocol.makeConnection(self.postfix)
        self.userli: Any = None
        self.http = StringTransport()

    def hot(self, key: str) -> bytes:
        """One lookup answered from this process's near-cache."""
        self.postfix.clear()
        self.protocol.dataReceived(netstring(f"mailbox {key}".encode()))
        return self.postfix.value()

    def lookup(self, key: str) -> bytes:
        """One uncached C{mailbox} lookup from Postfix's request to its reply."""
        self.postfix.clear()
        self.http.clear()
        self.protocol.dataReceived(netstring(f"mailbox {key}".encode()))
        # The near-cache sends this turn's reads to Redis.
        self.reactor.advance(0)
        if self.userli is None:
            factory = self.reactor.tcpClients[-1][2]
            self.userli = factory.buildProtocol(None)
            self.userli.makeConnection(self.http)
        assert b"GET /api/postfix/mailbox/" in self.http.value(), self.http.value()
        self.userli.dataReceived(ANSWER)
        # ... and this turn's writes.
        self.reactor.advance(0)
        return self.postfix.value()


@contextmanager
def counting() -> Iterator[Counter[str]]:
    """Count the Python function calls made inside, by where they are defined."""
    counts: Counter[str] = Counter()

    def profile(frame: FrameType, event: str, arg: object) -> None:
        if event == "call":
            counts[frame.f_code.co_filename] += 1

    sys.setprofile(profile)
    try:
        yield counts
    finally:
        sys.setprofile(None)


def ours(counts: Counter[str]) -> int:
    """The calls of functions defined in userli_postfix."""
    return sum(n for name, n in counts.items() if "userli_postfix" in name)


def measure(lookups: int = 10, hot: bool = False) -> Counter[str]:
    """
    Calls per uncached lookup (or, with C{hot}, per lookup answered from the
    near-cache), averaged over C{lookups} after a first one.
    """
    stack = Stack()
    # The first lookup opens the HTTP connection, makes the metric series
    # and leaves its answer in the near-cache.
    stack.lookup("first@example.org")
    with counting() as counts:
        for i in range(lookups):
            if hot:
                stack.hot("first@example.org")
            else:
                stack.lookup(f"user{i}@example.org")
    return Counter({name: n // lookups for name, n in counts.items()})


class CallCountTests(SynchronousTestCase):
    """The cost of an uncached lookup, in calls."""

    def test_stack_answers(self) -> None:
        """The stack counted is the real one: the lookup goes to Redis and Userli and back."""
        stack = Stack()
        self.assertEqual(stack.lookup("a@example.org"), b"4:OK 1,")
        self.assertEqual(stack.lookup("b@example.org"), b"4:OK 1,")
        self.assertEqual(stack.redis.data["userli:lookup:mailbox:b@example.org"], "OK 1")
        self.assertIn("GET", stack.redis.commands)

    def test_hot_answered_here(self) -> None:
        """A hot lookup is answered from the near-cache: no Redis command, no HTTP request."""
        stack = Stack()
        stack.lookup("a@example.org")
        commands, sent = len(stack.redis.commands), stack.http.value()
        self.assertEqual(stack.hot("a@example.org"), b"4:OK 1,")
        self.assertEqual(len(stack.redis.commands), commands)
        self.assertEqual(stack.http.value(), sent)

    def test_budget(self) -> None:
        """An uncached lookup stays within its call budgets."""
        counts = measure()
        total = sum(counts.values())
        self.assertLessEqual(ours(counts), OUR_BUDGET, counts.most_common(15))
        self.assertLessEqual(total, TOTAL_BUDGET, counts.most_common(15))

    def test_hot_budget(self) -> None:
        """A lookup answered from the near-cache stays within its call budget."""
        counts = measure(hot=True)
        self.assertLessEqual(sum(counts.values()), HOT_BUDGET, counts.most_common(15))
