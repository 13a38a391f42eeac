"""
C{userli-postfix check}: the configuration as the daemon sees it (secrets
hidden), whether Userli takes the token, whether Redis answers (its version,
role, client tracking, the Sentinel master), and the Postfix lines for the
configured listeners.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import txredisapi
from twisted.internet import defer

from userli_postfix.cli.commands import (
    LOOKUP_PREFIX,
    REDIS_CONNECT_DEADLINE,
    Tools,
    text,
)
from userli_postfix.cli.postfix import postfix_lines
from userli_postfix.cli.report import NOT_OK, OK, Report
from userli_postfix.config import API_TIMEOUT, LISTENERS, SETTINGS, Config
from userli_postfix.redisclient import CONNECT_TIMEOUT
from userli_postfix.userli import UserliError

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
    endpoints = {listener.variable: config.endpoint(listener) for listener in LISTENERS}
    for setting in SETTINGS:
        value = raw.get(setting.variable) or ""
        if setting.variable in _SECRETS:
            shown[setting.variable] = HIDDEN if value else ""
        elif setting.variable == "REDIS_URL":
            shown[setting.variable] = without_password(value) if value else ""
        elif endpoints.get(setting.variable):
            shown[setting.variable] = f"{value} ({endpoints[setting.variable]})"
        elif setting.variable == "TLS_POLICY_EHLO_HOSTNAME" and not value.strip():
            shown[setting.variable] = f"(this host: {config.tls_policy_ehlo_hostname})"
        else:
            shown[setting.variable] = value
    return shown


def parse_info(reply: str) -> dict[str, str]:
    """The fields of an C{INFO} reply."""
    fields: dict[str, str] = {}
    for line in reply.splitlines():
        name, colon, value = line.partition(":")
        if colon and not name.startswith("#"):
            fields[name.strip()] = value.strip()
    return fields


@defer.inlineCallbacks
def check(tools: Tools) -> Generator[Any, Any, Report]:
    """The configuration, Userli, Redis and the Postfix lines."""
    userli = yield _userli(tools)
    redis = yield _redis(tools)
    lines = postfix_lines(tools.config)
    ok = userli["ok"] and (redis["ok"] or not redis["configured"])
    return Report(
        "check",
        OK if ok else NOT_OK,
        {
            "configuration": shown_configuration(tools.raw, tools.config),
            "userli": userli,
            "redis": redis,
            "postfix": {
                "main.cf": lines.main_cf,
                "master.cf": lines.master_cf,
                "notes": lines.notes,
            },
        },
    )


def _status(tools: Tools) -> str | None:
    """The HTTP status (or C{error}) of the last Userli call, from the client's metrics."""
    for metric in tools.metrics.http_client_requests.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and sample.value:
                return str(sample.labels["status_code"])
    return None


@defer.inlineCallbacks
def _userli(tools: Tools) -> Generator[Any, Any, dict[str, Any]]:
    result: dict[str, Any] = {"url": tools.config.userli_base_url}
    started = tools.clock.seconds()
    try:
        yield tools.client.domain(PROBE_DOMAIN)
    except UserliError as error:
        status = _status(tools)
        message = str(error)
        if status in _MEANINGS:
            meaning = _MEANINGS[status]
        elif tools.clock.seconds() - started >= API_TIMEOUT:
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
def _redis(tools: Tools) -> Generator[Any, Any, dict[str, Any]]:
    """Reached (through the Sentinels, if any), a master, its version, client tracking."""
    target = tools.config.redis
    if target is None:
        return {"configured": False, "ok": True}
    result: dict[str, Any] = {"configured": True, "ok": False}
    if target.sentinels:
        result["target"] = f"master {target.master_name!r} via Sentinels " + ",".join(
            f"{host}:{port}" for host, port in target.sentinels
        )
        try:
            host, port = yield _sentinelMaster(tools)
            result["sentinel_master"] = f"{host}:{port}"
        except Exception as error:
            result["error"] = f"no master from the Sentinels: {error}"
            return result
    else:
        result["target"] = without_password(tools.raw.get("REDIS_URL") or "")
    try:
        redis = yield tools.redis()
        info = parse_info(text((yield redis.execute("INFO", "server"))))
        replication = parse_info(text((yield redis.execute("INFO", "replication"))))
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
    result["tracking"] = yield _tracking(tools)
    return result


@defer.inlineCallbacks
def _sentinelMaster(tools: Tools) -> Generator[Any, Any, tuple[str, int]]:
    target = tools.config.redis
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
def _tracking(tools: Tools) -> Generator[Any, Any, dict[str, Any]]:
    """
    Whether Redis does server-assisted client-side caching, tried the
    way a daemon uses it (C{BCAST PREFIX userli:lookup:}) on a
    connection of its own, redirected to itself, then turned off.
    """
    try:
        own = yield tools.connect(poolSize=1)
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
        return {"ok": False, "detail": text(error)}
    finally:
        yield own.stop()
    return {"ok": True}
