"""
What a command found, and how it is shown: readable lines by default, one
JSON document with C{--json}.  Pure functions, so every format and exit
status is tested without I/O.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

# Exit statuses: all is well; not found or not ok; usage or configuration.
OK = 0
NOT_OK = 1
USAGE = 2


@dataclass(frozen=True)
class Report:
    """
    The outcome of one command: its exit status and what it found, as
    JSON-ready data (the C{--json} document is exactly C{data}, with the
    command and C{ok} added).
    """

    command: str
    status: int
    data: dict[str, Any] = field(default_factory=dict)

    def document(self) -> dict[str, Any]:
        """The C{--json} document."""
        return {"command": self.command, "ok": self.status == OK, **self.data}


def usage_error(command: str, message: str, variable: str | None = None) -> Report:
    """A usage or configuration error (exit 2), e.g. no Redis for a command that needs it."""
    data: dict[str, Any] = {"error": message}
    if variable is not None:
        data["variable"] = variable
    return Report(command, USAGE, data)


def when(unix: float | None) -> str:
    """A unix time as an ISO 8601 UTC timestamp to the second."""
    if unix is None:
        return "-"
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def remaining(ttl: float | None) -> str:
    """How long an entry stays, as the reports say it."""
    return "no expiry" if ttl is None else f"for {duration(ttl)} more"


def duration(seconds: float) -> str:
    """Seconds as C{1h02m03s}, C{4m05s} or C{6s}."""
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _mark(ok: bool) -> str:
    return "ok" if ok else "FAILED"


def _check(data: dict[str, Any]) -> list[str]:
    lines = ["Configuration:"]
    for name, value in data["configuration"].items():
        lines.append(f"  {name} = {value}")
    userli = data["userli"]
    lines.append("")
    lines.append(f"Userli {userli['url']}: {_mark(userli['ok'])}: {userli['meaning']}")
    redis = data["redis"]
    if not redis["configured"]:
        lines.append(
            "Redis: not configured (the daemon keeps its cache and quota windows in memory)"
        )
    else:
        lines.append(f"Redis {redis['target']}: {_mark(redis['ok'])}")
        if redis.get("error"):
            lines.append(f"  {redis['error']}")
        if redis.get("sentinel_master"):
            lines.append(f"  Sentinel master: {redis['sentinel_master']}")
        if redis.get("version"):
            lines.append(f"  version {redis['version']}, role {redis.get('role') or '?'}")
        tracking = redis.get("tracking")
        if tracking is not None:
            state = "works" if tracking["ok"] else "not available"
            detail = f" ({tracking['detail']})" if tracking.get("detail") else ""
            lines.append(f"  client tracking: {state}{detail}")
    postfix = data["postfix"]
    lines.append("")
    lines.append("# main.cf")
    lines.extend(postfix["main.cf"])
    if postfix["master.cf"]:
        lines.append("# master.cf: the quota policy on the submission ports only")
        lines.extend(postfix["master.cf"])
    lines.extend(f"# note: {note}" for note in postfix["notes"])
    return lines


def _lookup(data: dict[str, Any]) -> list[str]:
    lines = [f"{data['map']} {data['key']}"]
    normalised = data["normalised"]
    lines.append(
        f"  normalised key: {normalised if normalised is not None else '(not a valid key)'}"
    )
    remote = data.get("remote")
    if isinstance(remote, str):
        lines.append(f"  remote-domain memory: {remote}")
    elif remote is not None:
        if remote["reply"] is None:
            lines.append(f"  remote-domain memory: nothing under {remote['key']}")
        else:
            left = remaining(remote["ttl"])
            lines.append(
                f"  remote-domain memory: {remote['domain']} is not a Userli domain, "
                f"under {remote['key']}, {left}"
            )
    cached = data["cached"]
    if isinstance(cached, str):
        lines.append(f"  cache: {cached}")
    elif cached["reply"] is None:
        lines.append(f"  cache: nothing under {cached['key']}")
    else:
        left = remaining(cached["ttl"])
        lines.append(f"  cache: {cached['reply']!r} under {cached['key']}, {left}")
    lines.append(f"  Userli now: {data['userli']}")
    source = data.get("source")
    origin = f" (from the {source})" if source == "remote-domain memory" else ""
    lines.append(f"  Postfix gets: {data['reply']}{origin}")
    return lines


def _quota_show(data: dict[str, Any]) -> list[str]:
    lines = [f"{data['address']}"]
    identity = data["identity"]
    if identity is None:
        lines.append("  not an address the daemon counts (it answers DUNNO)")
        return lines
    lines.append(f"  identity: {identity}")
    limits = data["limits"]
    if data.get("limits_error"):
        lines.append(f"  limits: unknown: {data['limits_error']}")
    elif limits is None:
        lines.append("  limits: none (Userli knows no such sender)")
    else:
        lines.append(
            f"  limits: {limits['per_hour'] or 'unlimited'} per hour, "
            f"{limits['per_day'] or 'unlimited'} per day"
        )
    window = data["window"]
    lines.append(f"  counted: {window['hour']} in the last hour, {window['day']} in the last day")
    lines.append(f"  window: {window['key']}")
    nxt = data["next_accepted"]
    if nxt is not None:
        if data["next_accepted_in"] <= 0:
            lines.append("  next message: accepted now")
        else:
            lines.append(
                f"  next message: accepted from {nxt} "
                f"(in {duration(data['next_accepted_in'])}, if no attempt comes before)"
            )
    return lines


def _quota_reset(data: dict[str, Any]) -> list[str]:
    if data.get("identity") is None:
        return [f"{data['address']}: not an address the daemon counts"]
    if data["removed"]:
        return [f"Reset {data['identity']}: {data['counted']} message(s) forgotten ({data['key']})"]
    return [f"{data['identity']}: no window in Redis ({data['key']}), nothing to reset"]


def _cache_drop(data: dict[str, Any]) -> list[str]:
    if not data["removed"]:
        return [f"Nothing cached under {', '.join(data['keys'])}"]
    return [f"Dropped {key}" for key in data["removed"]]


def _cache_flush(data: dict[str, Any]) -> list[str]:
    patterns = " and ".join(data.get("patterns") or [data["pattern"]])
    return [f"Dropped {data['removed']} cached answer(s) matching {patterns}"]


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _tls_policy(data: dict[str, Any]) -> list[str]:
    lines = [f"tls_policy {data['key']}"]
    if data["domain"] is None:
        lines.append("  not a domain: Postfix gets NOTFOUND, nothing is probed")
        return lines
    lines.append(f"  domain: {data['domain']}")
    cached = data["cached"]
    if isinstance(cached, str):
        lines.append(f"  cache: {cached}")
    elif cached["verdict"] is None:
        lines.append(f"  cache: nothing under {cached['key']} (the next lookup probes)")
    else:
        left = remaining(cached["ttl"])
        lines.append(f"  cache: {cached['verdict']} under {cached['key']}, {left}")
    lines.append(f"  Postfix gets: {data['reply']}")
    probe = data["probe"]
    if probe is None:
        return lines
    verdict = probe["verdict"] or "error, not cached"
    problem = f" ({probe['error']})" if probe["error"] else ""
    lines.append(f"  probe ({probe['seconds']:.1f} s): {verdict}{problem}")
    for host in probe["hosts"]:
        lines.append(f"    {host['name']}" + (f": {host['error']}" if host["error"] else ""))
        for report in host["addresses"]:
            lines.append(f"      {report['address']}:")
            if report["banner"] is not None:
                lines.append(f"        banner: {report['banner']}")
            if report["answered"]:
                lines.append(f"        STARTTLS offered: {_yes(report['starttls_offered'])}")
                lines.append(f"        handshake completed: {_yes(report['tls'])}")
            if report["tls"]:
                lines.append(f"        TLS: {report['tls_version']}, {report['cipher']}")
            if report["error"]:
                lines.append(f"        error: {report['error']}")
    return lines


_FORMATS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "check": _check,
    "lookup": _lookup,
    "quota show": _quota_show,
    "quota reset": _quota_reset,
    "cache drop": _cache_drop,
    "cache flush": _cache_flush,
    "tls-policy": _tls_policy,
}


def render(report: Report, as_json: bool) -> tuple[str, str]:
    """
    What to write to (stdout, stderr): the readable lines or the JSON
    document on stdout; an error also as one line on stderr.
    """
    error = report.data.get("error")
    stderr = f"userli-postfix: {error}\n" if error else ""
    if as_json:
        return json.dumps(report.document(), sort_keys=True) + "\n", stderr
    if error:
        # What the command could not do is said on stderr, once.
        return "", stderr
    lines = _FORMATS[report.command](report.data) if report.command in _FORMATS else []
    return "".join(line + "\n" for line in lines), stderr
