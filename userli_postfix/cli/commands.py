"""
The operator's commands (C{check} is in L{userli_postfix.cli.check}) and
their connections, on the daemon's own parts: the L{UserliClient}, the
L{RedisClient}, the Redis key layout (L{cache_key}, L{window_key}) and the
key normalisers, so what a command shows is what the daemon sees.

Each command returns a L{Report}; nothing here writes to a terminal.
"""

from __future__ import annotations

import getpass
from collections.abc import Callable, Generator
from dataclasses import asdict
from typing import Any

import txredisapi
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.client import HTTPConnectionPool

from userli_postfix import tlspolicy
from userli_postfix.addresses import normalise_address, normalise_domain
from userli_postfix.cache import cache_key
from userli_postfix.cli.report import NOT_OK, OK, Report, usage_error, when
from userli_postfix.config import Config
from userli_postfix.lookups import Lookups
from userli_postfix.metrics import Metrics
from userli_postfix.ratelimit import (
    DAY_NS,
    NS_PER_SECOND,
    counts,
    next_allowed,
    unix_ns,
    window_key,
)
from userli_postfix.redisclient import CONNECT_TIMEOUT, POOL_SIZE, RedisClient
from userli_postfix.remotedomains import REMOTE_MAP, domain_of
from userli_postfix.userli import Quota, UserliClient, UserliError

log = Logger()

# The socketmap maps the daemon answers from Userli (see L{Lookups}).
MAPS = ("alias", "domain", "mailbox", "senders")
# The maps whose cached answers the cache commands work on.
CACHE_MAPS = (*MAPS, "tls_policy")

# How long a command waits for its Redis connection before it says Redis
# cannot be reached: a little longer than one connection attempt.
REDIS_CONNECT_DEADLINE = CONNECT_TIMEOUT + 1.0

# Keys asked for per SCAN step, and removed per UNLINK.
SCAN_COUNT = 1000

# Every cached answer's key starts with this (the Go layout, see cache_key).
LOOKUP_PREFIX = cache_key("", "").removesuffix(":")


def text(value: Any) -> str:
    """A Redis reply as text."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class Tools:
    """
    The commands, built once per run from the checked configuration.

    @param request: C{treq}'s C{request}, for the Userli client.
    @param pool: the connection pool under C{request}, closed with the
        tools (the daemon's HTTP client keeps its connections).
    """

    def __init__(
        self,
        config: Config,
        raw: dict[str, str | None],
        clock: IReactorTime,
        request: Callable[..., Any],
        pool: HTTPConnectionPool | None = None,
    ) -> None:
        self.config = config
        self.raw = raw
        self.clock = clock
        self.pool = pool
        self.metrics = Metrics(process=False)
        self.client = UserliClient(
            request, config.userli_base_url, config.userli_token, clock, self.metrics
        )
        self._redis: RedisClient | None = None

    # Redis ------------------------------------------------------------

    @defer.inlineCallbacks
    def connect(self, poolSize: int | None = None) -> Generator[Any, Any, RedisClient]:
        """
        A started Redis client, once connected; fails with the reason when
        it cannot connect within L{REDIS_CONNECT_DEADLINE}.
        """
        assert self.config.redis is not None
        redis = RedisClient(
            self.config.redis, self.clock, poolSize=poolSize or POOL_SIZE, logOutages=False
        )
        redis.start()
        give_up = self.clock.seconds() + REDIS_CONNECT_DEADLINE
        while not redis.connected:
            if self.clock.seconds() >= give_up:
                yield redis.stop()
                raise ConnectionError(
                    f"Redis not reachable within {REDIS_CONNECT_DEADLINE:g} s ({redis!r})"
                )
            yield task.deferLater(self.clock, 0.05, lambda: None)
        return redis

    @defer.inlineCallbacks
    def redis(self) -> Generator[Any, Any, RedisClient]:
        """The shared Redis client of this run (connected on first use)."""
        if self._redis is None:
            self._redis = yield self.connect()
        assert self._redis is not None
        return self._redis

    @defer.inlineCallbacks
    def close(self) -> Generator[Any, Any, None]:
        """Close the Redis connections and those kept to Userli."""
        if self._redis is not None:
            redis, self._redis = self._redis, None
            yield redis.stop()
        if self.pool is not None:
            pool, self.pool = self.pool, None
            yield pool.closeCachedConnections()

    def needsRedis(self, command: str) -> Report | None:
        """The usage error of a command that needs Redis when there is none."""
        if self.config.redis is None:
            return usage_error(
                command,
                f"{command}: needs Redis, and REDIS_URL is not set (without Redis the "
                "cache and the quota windows live inside the daemon's memory)",
                "REDIS_URL",
            )
        return None

    # lookup -----------------------------------------------------------

    def normalise(self, mapname: str, key: str) -> str | None:
        """The key as the daemon asks Userli for it; C{None} when it never would."""
        if mapname == "tls_policy":
            return tlspolicy.normalise_policy_key(key)
        if mapname == "domain":
            return normalise_domain(key)
        return normalise_address(key, self.config.recipient_delimiter)

    @defer.inlineCallbacks
    def _entry(self, name: str) -> Generator[Any, Any, dict[str, Any] | str]:
        """
        What Redis holds under C{name} and for how long, or why that is
        unknown.
        """
        try:
            redis = yield self.redis()
            value = yield redis.execute("GET", name)
            ttl_ms = yield redis.execute("PTTL", name)
        except Exception as error:
            return f"Redis not reachable ({error}): the daemon would ask Userli"
        reply = None if value is None else text(value)
        ttl = None if int(ttl_ms) == -1 else max(int(ttl_ms), 0) / 1000.0
        return {"key": name, "reply": reply, "ttl": ttl if reply is not None else None}

    @defer.inlineCallbacks
    def lookup(self, mapname: str, key: str) -> Generator[Any, Any, Report]:
        """
        What Postfix would get for (map, key), as the daemon decides it: from
        the remote-domain memory, else the cached answer, else Userli's.
        """
        normalised = self.normalise(mapname, key)
        data: dict[str, Any] = {"map": mapname, "key": key, "normalised": normalised}
        remote: dict[str, Any] | str | None = None
        if normalised is not None:
            domain = domain_of(mapname, normalised)
            if self.config.remote_domain_cache_ttl <= 0:
                remote = "off (REMOTE_DOMAIN_CACHE_TTL=0)"
            elif self.config.redis is None:
                remote = "in the daemon's memory (no REDIS_URL), not visible here"
            else:
                remote = yield self._entry(cache_key(REMOTE_MAP, domain))
                if isinstance(remote, dict):
                    remote["domain"] = domain
        cached: dict[str, Any] | str
        if self.config.lookup_cache_ttl <= 0:
            cached = "off (LOOKUP_CACHE_TTL=0)"
        elif self.config.redis is None:
            cached = "in the daemon's memory (no REDIS_URL), not visible here"
        else:
            cached = yield self._entry(cache_key(mapname, key))
        lookups = Lookups(
            self.client, None, self.metrics, self.clock, self.config.recipient_delimiter
        )
        answer = yield defer.maybeDeferred(lookups.answer, f"{mapname} {key}".encode())
        now = text(answer).strip()
        data["remote"] = remote
        data["cached"] = cached
        data["userli"] = now
        if isinstance(remote, dict) and remote["reply"] is not None:
            data["reply"], data["source"] = "NOTFOUND", "remote-domain memory"
        elif isinstance(cached, dict) and cached["reply"] is not None:
            data["reply"], data["source"] = cached["reply"], "cache"
        else:
            data["reply"], data["source"] = now, "Userli"
        return Report("lookup", OK if data["reply"].startswith("OK") else NOT_OK, data)

    # quota ------------------------------------------------------------

    def _sender(self, command: str, address: str) -> tuple[Report | None, str, dict[str, Any]]:
        """
        The identity a quota command works on (normalised as the policy
        server does), with the report's data; or the report that ends the
        command at once (no Redis, or no valid address).
        """
        identity = normalise_address(address, self.config.recipient_delimiter)
        data: dict[str, Any] = {"address": address, "identity": identity}
        missing = self.needsRedis(command)
        if missing is not None:
            return missing, "", data
        if identity is None:
            return Report(command, NOT_OK, data), "", data
        return None, identity, data

    @defer.inlineCallbacks
    def quotaShow(self, address: str) -> Generator[Any, Any, Report]:
        """A sender's limits, its windows, and when its next message is accepted."""
        command = "quota show"
        refused, identity, data = self._sender(command, address)
        if refused is not None:
            return refused
        status = OK
        quota: Quota | None = None
        data["limits_error"] = None
        try:
            quota = yield self.client.smtp_quota(identity)
        except UserliError as error:
            data["limits_error"] = str(error)
            status = NOT_OK
        else:
            if quota is None:
                status = NOT_OK
        data["limits"] = (
            None if quota is None else {"per_hour": quota.per_hour, "per_day": quota.per_day}
        )
        redis = yield self.redis()
        key = window_key(identity)
        now = unix_ns(self.clock)
        members = yield redis.execute("ZRANGEBYSCORE", key, now - DAY_NS, "+inf", "WITHSCORES")
        # Scores may come back as floats (a few hundred nanoseconds off):
        # plenty for counting and for a time shown to the second.
        stamps = sorted(int(float(score)) for score in members[1::2])
        hour, day = counts(stamps, now)
        data["window"] = {"key": key, "hour": hour, "day": day}
        data["next_accepted"] = None
        data["next_accepted_in"] = None
        if quota is not None:
            at = next_allowed(quota, stamps, now)
            data["next_accepted"] = _iso(at)
            data["next_accepted_in"] = (at - now) / NS_PER_SECOND
        return Report(command, status, data)

    @defer.inlineCallbacks
    def quotaReset(self, address: str) -> Generator[Any, Any, Report]:
        """Forget a sender's windows: its next message is counted from zero."""
        command = "quota reset"
        refused, identity, data = self._sender(command, address)
        if refused is not None:
            return refused
        redis = yield self.redis()
        key = window_key(identity)
        counted = yield redis.execute("ZCARD", key)
        removed = yield redis.execute("DEL", key)
        data.update(key=key, counted=int(counted), removed=bool(removed))
        if removed:
            log.info(
                "Sending-quota windows of {identity} reset by {user} "
                "({counted} attempts forgotten)",
                identity=identity,
                user=_user(),
                counted=int(counted),
            )
        return Report(command, OK if removed else NOT_OK, data)

    # cache ------------------------------------------------------------

    @defer.inlineCallbacks
    def cacheDrop(self, mapname: str, key: str) -> Generator[Any, Any, Report]:
        """
        Drop the cached answer of (map, key), and of its normalised form
        (what Postfix sends for most keys), so the next lookup asks Userli;
        for a domain, also forget that Userli did not host it.
        """
        command = "cache drop"
        missing = self.needsRedis(command)
        if missing is not None:
            return missing
        normalised = self.normalise(mapname, key)
        if mapname == "tls_policy":
            # Verdicts are kept under the domain only.
            keys = [tlspolicy.cache_key(normalised or key)]
        else:
            keys = [cache_key(mapname, key)]
            if normalised is not None and normalised != key:
                keys.append(cache_key(mapname, normalised))
            if mapname == "domain" and normalised is not None:
                keys.append(cache_key(REMOTE_MAP, normalised))
        redis = yield self.redis()
        removed = []
        for name in keys:
            if (yield redis.execute("DEL", name)):
                removed.append(name)
        if removed:
            log.info(
                "Cached answers {keys} dropped by {user}", keys=", ".join(removed), user=_user()
            )
        return Report(command, OK if removed else NOT_OK, {"keys": keys, "removed": removed})

    @defer.inlineCallbacks
    def cacheFlush(self, mapname: str | None) -> Generator[Any, Any, Report]:
        """
        Drop every cached answer (of one map; for C{domain}, the
        remote-domain memory too): C{SCAN} by pattern and C{UNLINK} what it
        finds, a batch at a time, so Redis never blocks on one huge command
        (no C{KEYS}).
        """
        command = "cache flush"
        missing = self.needsRedis(command)
        if missing is not None:
            return missing
        if mapname == "tls_policy":
            patterns = [tlspolicy.cache_key("*")]
        else:
            patterns = [cache_key(mapname, "*") if mapname else LOOKUP_PREFIX + "*"]
        if mapname == "domain":
            patterns.append(cache_key(REMOTE_MAP, "*"))
        redis = yield self.redis()
        removed = 0
        for pattern in patterns:
            cursor = "0"
            while True:
                reply = yield redis.execute("SCAN", cursor, "MATCH", pattern, "COUNT", SCAN_COUNT)
                cursor, names = text(reply[0]), reply[1]
                if names:
                    removed += int((yield self._unlink(redis, names)))
                if cursor == "0":
                    break
        log.info(
            "{removed} cached answers matching {patterns} dropped by {user}",
            removed=removed,
            patterns=" and ".join(patterns),
            user=_user(),
        )
        return Report(
            command, OK, {"pattern": patterns[0], "patterns": patterns, "removed": removed}
        )

    # tls-policy -------------------------------------------------------

    def makeProber(self) -> tlspolicy.Prober:
        """A prober as the daemon's (name servers, SMTP port, EHLO name)."""
        return tlspolicy.makeProber(self.config, self.clock)

    @defer.inlineCallbacks
    def tlsPolicy(self, key: str, probe: bool = False) -> Generator[Any, Any, Report]:
        """
        The C{tls_policy} answer for a domain: the cached verdict and its
        remaining lifetime; with C{probe}, a fresh probe (not stored).
        """
        command = "tls-policy"
        domain = tlspolicy.normalise_policy_key(key)
        data: dict[str, Any] = {"key": key, "domain": domain, "probe": None}
        if domain is None:
            data.update(cached=None, reply="NOTFOUND")
            return Report(command, NOT_OK, data)
        cached: dict[str, Any] | str
        if self.config.redis is None:
            cached = "in the daemon's memory (no REDIS_URL), not visible here"
        else:
            name = tlspolicy.cache_key(domain)
            try:
                redis = yield self.redis()
                value = yield redis.execute("GET", name)
                ttl_ms = yield redis.execute("PTTL", name)
                verdict = None if value is None else text(value)
                ttl = None if int(ttl_ms) < 0 else int(ttl_ms) / 1000.0
                cached = {"key": name, "verdict": verdict, "ttl": ttl if verdict else None}
            except Exception as error:
                cached = f"Redis not reachable ({error}): the daemon answers NOTFOUND"
        data["cached"] = cached
        verdict = cached.get("verdict") if isinstance(cached, dict) else None
        data["reply"] = "OK encrypt" if verdict == tlspolicy.ENCRYPT else "NOTFOUND"
        answer = data["reply"]
        if probe:
            started = self.clock.seconds()
            result = yield self.makeProber().probe(domain)
            data["probe"] = _probeData(result, self.clock.seconds() - started)
            answer = "OK encrypt" if result.verdict == tlspolicy.ENCRYPT else "NOTFOUND"
        return Report(command, OK if answer == "OK encrypt" else NOT_OK, data)

    @staticmethod
    def _unlink(redis: RedisClient, names: list[Any]) -> defer.Deferred[Any]:
        """UNLINK (frees memory in the background); DEL on a Redis older than 4."""

        def old(failure: Any) -> defer.Deferred[Any]:
            failure.trap(txredisapi.ResponseError)
            return redis.execute("DEL", *names)

        return redis.execute("UNLINK", *names).addErrback(old)


def _probeData(result: tlspolicy.ProbeResult, seconds: float) -> dict[str, Any]:
    """A probe's result as JSON-ready data."""
    return {
        "verdict": result.verdict,
        "error": result.error,
        "null_mx": result.null_mx,
        "seconds": round(seconds, 3),
        "hosts": [
            {
                "name": host.name,
                "error": host.error,
                "answered": host.answered,
                "tls": host.tls,
                "addresses": [asdict(report) for report in host.reports],
            }
            for host in result.hosts
        ],
    }


def _iso(unix_ns_value: int) -> str:
    return when(unix_ns_value / NS_PER_SECOND)


def _user() -> str:
    """Who ran the command, for the log."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown user"
