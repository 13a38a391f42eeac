"""
The operator's commands, on the daemon's own parts: the L{UserliClient},
the L{RedisClient}, the Redis key layout (L{cache_key}, L{window_key}) and
the key normalisers, so what a command shows is what the daemon sees.

Each command returns a L{Report}; nothing here writes to a terminal.
"""

from __future__ import annotations

import getpass
from collections.abc import Callable, Generator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import txredisapi
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from userli_postfix.addresses import normalise_address, normalise_domain
from userli_postfix.cache import cache_key
from userli_postfix.cli.postfix import postfix_lines
from userli_postfix.cli.report import NOT_OK, OK, Report, usage_error, when
from userli_postfix.config import API_TIMEOUT, LISTEN_VARIABLES, SETTINGS, Config
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
from userli_postfix.redis import CONNECT_TIMEOUT, POOL_SIZE, RedisClient
from userli_postfix.userli import Quota, UserliClient, UserliError

log = Logger()

# The socketmap maps the daemon serves (see L{Lookups}).
MAPS = ("alias", "domain", "mailbox", "senders")

# How long a command waits for its Redis connection before it says Redis
# cannot be reached: a little longer than one connection attempt.
REDIS_CONNECT_DEADLINE = CONNECT_TIMEOUT + 1.0

# Keys asked for per SCAN step, and removed per UNLINK.
SCAN_COUNT = 1000

# Every cached answer's key starts with this (the Go layout, see cache_key).
LOOKUP_PREFIX = cache_key("", "").removesuffix(":")

# The daemon's /ready asks for this domain: it can never exist.
PROBE_DOMAIN = "health-check.invalid"

# What the configuration shows instead of a secret.
HIDDEN = "(set, not shown)"

_SECRETS = ("USERLI_TOKEN", "REDIS_SENTINEL_PASSWORD")

_MEANINGS = {
    "200": "reached, the token is accepted",
    "401": "HTTP 401: Userli refused the token (USERLI_TOKEN is wrong)",
    "403": "HTTP 403: the token is valid but lacks the postfix scope",
}


def without_password(url: str) -> str:
    """C{REDIS_URL} with its password replaced, for showing."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "(malformed, not shown)"
    if password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def shown_configuration(raw: dict[str, str | None], config: Config) -> dict[str, str]:
    """Every setting as the daemon sees it, secrets hidden."""
    shown: dict[str, str] = {}
    endpoints = {
        "SOCKETMAP_LISTEN_ADDR": config.socketmap_listen,
        "POLICY_LISTEN_ADDR": config.policy_listen,
        "METRICS_LISTEN_ADDR": config.metrics_listen,
        "SASL_LISTEN_ADDR": config.sasl_listen,
    }
    for setting in SETTINGS:
        value = raw.get(setting.variable) or ""
        if setting.variable in _SECRETS:
            shown[setting.variable] = HIDDEN if value else ""
        elif setting.variable == "REDIS_URL":
            shown[setting.variable] = without_password(value) if value else ""
        elif setting.variable in LISTEN_VARIABLES and endpoints[setting.variable]:
            shown[setting.variable] = f"{value} ({endpoints[setting.variable]})"
        else:
            shown[setting.variable] = value
    return shown


def parse_info(text: str) -> dict[str, str]:
    """The fields of an C{INFO} reply."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        name, colon, value = line.partition(":")
        if colon and not name.startswith("#"):
            fields[name.strip()] = value.strip()
    return fields


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class Tools:
    """
    The commands, built once per run from the checked configuration.

    @param request: C{treq}'s C{request}, for the Userli client.
    """

    def __init__(
        self,
        config: Config,
        raw: dict[str, str | None],
        clock: IReactorTime,
        request: Callable[..., Any],
    ) -> None:
        self.config = config
        self.raw = raw
        self.clock = clock
        self.metrics = Metrics(process=False)
        self.client = UserliClient(
            request, config.userli_base_url, config.userli_token, clock, self.metrics
        )
        self._redis: RedisClient | None = None

    # Redis ------------------------------------------------------------

    @defer.inlineCallbacks
    def _connect(self, poolSize: int | None = None) -> Generator[Any, Any, RedisClient]:
        """
        A started Redis client, once connected; fails with the reason when
        it cannot connect within L{REDIS_CONNECT_DEADLINE}.
        """
        assert self.config.redis is not None
        redis = RedisClient(self.config.redis, self.clock, poolSize=poolSize or POOL_SIZE)
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
            self._redis = yield self._connect()
        assert self._redis is not None
        return self._redis

    @defer.inlineCallbacks
    def close(self) -> Generator[Any, Any, None]:
        """Close the Redis connections."""
        if self._redis is not None:
            redis, self._redis = self._redis, None
            yield redis.stop()

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

    # check ------------------------------------------------------------

    @defer.inlineCallbacks
    def check(self) -> Generator[Any, Any, Report]:
        """The configuration, Userli, Redis and the Postfix lines."""
        userli = yield self._checkUserli()
        redis = yield self._checkRedis()
        lines = postfix_lines(self.config)
        ok = userli["ok"] and (redis["ok"] or not redis["configured"])
        return Report(
            "check",
            OK if ok else NOT_OK,
            {
                "configuration": shown_configuration(self.raw, self.config),
                "userli": userli,
                "redis": redis,
                "postfix": {
                    "main.cf": lines.main_cf,
                    "master.cf": lines.master_cf,
                    "notes": lines.notes,
                },
            },
        )

    def _status(self) -> str | None:
        """The HTTP status (or C{error}) of the last Userli call, from the client's metrics."""
        for metric in self.metrics.http_client_requests.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total") and sample.value:
                    return str(sample.labels["status_code"])
        return None

    @defer.inlineCallbacks
    def _checkUserli(self) -> Generator[Any, Any, dict[str, Any]]:
        result: dict[str, Any] = {"url": self.config.userli_base_url}
        started = self.clock.seconds()
        try:
            yield self.client.domain(PROBE_DOMAIN)
        except UserliError as error:
            status = self._status()
            message = str(error)
            if status in _MEANINGS:
                meaning = _MEANINGS[status]
            elif self.clock.seconds() - started >= API_TIMEOUT:
                # Timed out, whatever the transport made of the cancellation.
                meaning = f"no answer within {API_TIMEOUT:g} s: Userli is not reachable (or hangs)"
            elif status in (None, "error"):
                meaning = f"not reachable: {message}"
            else:
                meaning = (
                    f"unexpected answer ({message}): is USERLI_BASE_URL Userli itself, "
                    "not a proxy or a login page?"
                )
            result.update(ok=False, status=status, meaning=meaning)
            return result
        result.update(ok=True, status="200", meaning=_MEANINGS["200"])
        return result

    @defer.inlineCallbacks
    def _checkRedis(self) -> Generator[Any, Any, dict[str, Any]]:
        """Reached (through the Sentinels, if any), a master, its version, client tracking."""
        target = self.config.redis
        if target is None:
            return {"configured": False, "ok": True}
        result: dict[str, Any] = {"configured": True, "ok": False}
        if target.sentinels:
            result["target"] = f"master {target.master_name!r} via Sentinels " + ",".join(
                f"{host}:{port}" for host, port in target.sentinels
            )
            try:
                host, port = yield self._sentinelMaster()
                result["sentinel_master"] = f"{host}:{port}"
            except Exception as error:
                result["error"] = f"no master from the Sentinels: {error}"
                return result
        else:
            result["target"] = without_password(self.raw.get("REDIS_URL") or "")
        try:
            redis = yield self.redis()
            info = parse_info(_text((yield redis.execute("INFO", "server"))))
            replication = parse_info(_text((yield redis.execute("INFO", "replication"))))
        except Exception as error:
            result["error"] = str(error)
            return result
        role = replication.get("role")
        result.update(ok=True, version=info.get("redis_version"), role=role)
        if role not in (None, "master"):
            # The windows and the cache are written: a replica refuses that.
            result.update(
                ok=False,
                error=f"Redis is a replica (role {role}): the daemon cannot write to it",
            )
        result["tracking"] = yield self._checkTracking()
        return result

    @defer.inlineCallbacks
    def _sentinelMaster(self) -> Generator[Any, Any, tuple[str, int]]:
        target = self.config.redis
        assert target is not None
        sentinel = txredisapi.Sentinel(
            list(target.sentinels),
            password=target.sentinel_password,
            connectTimeout=CONNECT_TIMEOUT,
            replyTimeout=CONNECT_TIMEOUT,
        )
        sentinel.discovery_timeout = REDIS_CONNECT_DEADLINE
        try:
            address = yield sentinel.discover_master(target.master_name)
        finally:
            yield sentinel.disconnect()
        return (str(address[0]), int(address[1]))

    @defer.inlineCallbacks
    def _checkTracking(self) -> Generator[Any, Any, dict[str, Any]]:
        """
        Whether Redis does server-assisted client-side caching, tried the
        way a daemon uses it (C{BCAST PREFIX userli:lookup:}) on a
        connection of its own, redirected to itself, then turned off.
        """
        try:
            own = yield self._connect(poolSize=1)
        except ConnectionError as error:
            return {"ok": False, "detail": str(error)}
        try:
            client_id = yield own.execute("CLIENT", "ID")
            yield own.execute(
                "CLIENT",
                "TRACKING",
                "on",
                "REDIRECT",
                client_id,
                "BCAST",
                "PREFIX",
                LOOKUP_PREFIX,
            )
            yield own.execute("CLIENT", "TRACKING", "off")
        except Exception as error:
            return {"ok": False, "detail": _text(error)}
        finally:
            yield own.stop()
        return {"ok": True}

    # lookup -----------------------------------------------------------

    def normalise(self, mapname: str, key: str) -> str | None:
        """The key as the daemon asks Userli for it; C{None} when it never would."""
        if mapname == "domain":
            return normalise_domain(key)
        return normalise_address(key, self.config.recipient_delimiter)

    @defer.inlineCallbacks
    def lookup(self, mapname: str, key: str) -> Generator[Any, Any, Report]:
        """What Postfix would get for (map, key): the cached answer, else Userli's."""
        data: dict[str, Any] = {
            "map": mapname,
            "key": key,
            "normalised": self.normalise(mapname, key),
        }
        cached: dict[str, Any] | str
        if self.config.lookup_cache_ttl <= 0:
            cached = "off (LOOKUP_CACHE_TTL=0)"
        elif self.config.redis is None:
            cached = "in the daemon's memory (no REDIS_URL), not visible here"
        else:
            name = cache_key(mapname, key)
            try:
                redis = yield self.redis()
                value = yield redis.execute("GET", name)
                ttl_ms = yield redis.execute("PTTL", name)
                reply = None if value is None else _text(value)
                ttl = None if int(ttl_ms) == -1 else max(int(ttl_ms), 0) / 1000.0
                cached = {"key": name, "reply": reply, "ttl": ttl if reply is not None else None}
            except Exception as error:
                cached = f"Redis not reachable ({error}): the daemon would ask Userli"
        lookups = Lookups(
            self.client, None, self.metrics, self.clock, self.config.recipient_delimiter
        )
        answer = yield defer.maybeDeferred(lookups.answer, f"{mapname} {key}".encode())
        now = _text(answer).strip()
        data["cached"] = cached
        data["userli"] = now
        if isinstance(cached, dict) and cached["reply"] is not None:
            data["reply"] = cached["reply"]
        else:
            data["reply"] = now
        return Report("lookup", OK if data["reply"].startswith("OK") else NOT_OK, data)

    # quota ------------------------------------------------------------

    @defer.inlineCallbacks
    def quotaShow(self, address: str) -> Generator[Any, Any, Report]:
        """A sender's limits, its windows, and when its next message is accepted."""
        command = "quota show"
        missing = self.needsRedis(command)
        if missing is not None:
            return missing
        identity = normalise_address(address, self.config.recipient_delimiter)
        data: dict[str, Any] = {"address": address, "identity": identity}
        if identity is None:
            return Report(command, NOT_OK, data)
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
        missing = self.needsRedis(command)
        if missing is not None:
            return missing
        identity = normalise_address(address, self.config.recipient_delimiter)
        data: dict[str, Any] = {"address": address, "identity": identity}
        if identity is None:
            return Report(command, NOT_OK, data)
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
        (what Postfix sends for most keys), so the next lookup asks Userli.
        """
        command = "cache drop"
        missing = self.needsRedis(command)
        if missing is not None:
            return missing
        keys = [cache_key(mapname, key)]
        normalised = self.normalise(mapname, key)
        if normalised is not None and normalised != key:
            keys.append(cache_key(mapname, normalised))
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
        Drop every cached answer (of one map): C{SCAN} by pattern and
        C{UNLINK} what it finds, a batch at a time, so Redis never blocks
        on one huge command (no C{KEYS}).
        """
        command = "cache flush"
        missing = self.needsRedis(command)
        if missing is not None:
            return missing
        pattern = cache_key(mapname, "*") if mapname else LOOKUP_PREFIX + "*"
        redis = yield self.redis()
        cursor = "0"
        removed = 0
        while True:
            reply = yield redis.execute("SCAN", cursor, "MATCH", pattern, "COUNT", SCAN_COUNT)
            cursor, names = _text(reply[0]), reply[1]
            if names:
                removed += int((yield self._unlink(redis, names)))
            if cursor == "0":
                break
        log.info(
            "{removed} cached answers matching {pattern} dropped by {user}",
            removed=removed,
            pattern=pattern,
            user=_user(),
        )
        return Report(command, OK, {"pattern": pattern, "removed": removed})

    @staticmethod
    def _unlink(redis: RedisClient, names: list[Any]) -> defer.Deferred[Any]:
        """UNLINK (frees memory in the background); DEL on a Redis older than 4."""

        def old(failure: Any) -> defer.Deferred[Any]:
            failure.trap(txredisapi.ResponseError)
            return redis.execute("DEL", *names)

        return redis.execute("UNLINK", *names).addErrback(old)


def _iso(unix_ns_value: int) -> str:
    return when(unix_ns_value / NS_PER_SECOND)


def _user() -> str:
    """Who ran the command, for the log."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown user"
