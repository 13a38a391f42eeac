"""
Configuration: one frozen value built from the environment and twistd options.

The variable names, defaults and meanings are those of the Go program
(userli-postfix-adapter), so an operator can switch without touching the
environment.  Every error names the variable it is about, so a bad
deployment fails at start-up with a line an operator can act on.
"""

from __future__ import annotations

import ipaddress
import math
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import unquote, urlsplit

from twisted.internet.endpoints import serverFromString


class ConfigError(ValueError):
    """A configuration value is missing or unusable."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable
        self.problem = problem


LOG_LEVELS = ("debug", "info", "warn", "error")
LOG_FORMATS = ("text", "json")


def is_number(text: str) -> bool:
    """
    Whether C{text} is a non-negative whole number in ASCII digits.

    C{str.isdigit} alone is true for C{"²"} (which C{int} refuses, so the
    check let a traceback through) and for other scripts' digits such as
    U+0661, the Arabic-Indic one (which C{int} reads): a setting is written
    in ASCII, anything else is a typo to report.
    """
    return text.isascii() and text.isdigit()


def _printable(text: str) -> bool:
    """No control, format or separator characters (a line break, an escape, ...)."""
    return text.isprintable()


# The Postfix access(5) actions a sender over quota may get: REJECT (5xx,
# the Go program's only answer), DEFER and DEFER_IF_PERMIT (4xx, the client
# tries again later), HOLD (accepted into the hold queue for an admin) and
# WARN (accepted, Postfix logs the text: a warn-only roll-out).
RATE_LIMIT_ACTIONS = ("REJECT", "DEFER", "DEFER_IF_PERMIT", "HOLD", "WARN")
# Whose messages are counted: only authenticated senders (``sasl``), or the
# login else the envelope sender (``sasl_or_sender``, the Go program's rule,
# which lets anyone who forges a local sender on port 25 use up that
# user's quota).
RATE_LIMIT_IDENTITIES = ("sasl", "sasl_or_sender")


# Postfix's socketmap client gives up on a server after 100 s, and the
# Go program bounds every API call by 5 s; the same bounds hold here.
API_TIMEOUT = 5.0
READY_TIMEOUT = 2.0

_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,
    "\u03bcs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION_PART = re.compile(r"([0-9]*(?:\.[0-9]*)?)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """
    Parse a Go duration (``300s``, ``5m``, ``1h30m``, ``1.5h``, ``0``) into
    seconds.

    Go's ``time.ParseDuration`` is the reference: an optional sign, then one
    or more number-and-unit pairs; a bare ``0`` is the only unitless value.

    @raise ValueError: when C{text} is not a Go duration.
    """
    s = text.strip()
    if not s:
        raise ValueError("empty duration")
    sign = 1.0
    if s[0] in "+-":
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise ValueError(f"invalid duration {text!r}")
    total = 0.0
    pos = 0
    while pos < len(s):
        match = _DURATION_PART.match(s, pos)
        if match is None or match.group(1) in ("", "."):
            raise ValueError(f"invalid duration {text!r}")
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    return sign * total


def _escape_endpoint(value: str) -> str:
    """Quote the characters that endpoint descriptions treat as syntax."""
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


_ENDPOINT_TYPES = ("tcp", "tcp6", "unix", "ssl", "systemd")

# Go's net.Listen asks the kernel for its largest accept queue
# (net.core.somaxconn); Twisted's default is 50.  With 50, a burst of
# connections (every smtpd process of a busy Postfix reconnecting at once)
# overflows the queue and the dropped SYNs are only sent again a second
# later.  The kernel caps the request at somaxconn.
LISTEN_BACKLOG = 4096
# Used with fullmatch: "$" would also match before a final line break.
_HOST_PORT = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\[\]/]*)):(?P<port>[0-9]{1,5})")
_HOST_NAME = re.compile(r"[A-Za-z0-9.-]+")


def ipv6Available() -> bool:
    """
    Whether this host can listen on IPv6 at all; where it cannot (a
    kernel booted with ipv6.disable=1, some containers), ":PORT" is every
    IPv4 address, as Go's listener falls back to.
    """
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::", 0))
    except OSError:
        return False
    return True


def listen_endpoint(variable: str, value: str) -> str:
    """
    Turn a listen address into a Twisted endpoint description.

    The Go forms (``:10001``, ``HOST:PORT``, ``[::1]:10001``, a socket path
    starting with ``/`` or ending in ``.sock``) are translated here, at the
    edge, so everything else only sees endpoint descriptions.  Descriptions
    (``tcp:...``, ``unix:...``, ``systemd:...``) pass through after a check
    that Twisted can build them.

    A Go-style socket path gets ``lockfile=1`` so a stale socket file left by
    a crash is replaced, and mode 0666 so Postfix (which runs as another
    user) can connect; the directory the socket lives in is what restricts
    access, as with Postfix's own ``private/`` sockets.  Every Go form gets
    the Go program's accept queue (L{LISTEN_BACKLOG}).
    """
    text = value.strip()
    if not text:
        raise ConfigError(variable, "empty listen address")
    prefix = text.split(":", 1)[0]
    if ":" in text and prefix in _ENDPOINT_TYPES:
        description = text
        if prefix == "unix" and not text[5:].split(":", 1)[0]:
            # Linux would bind an empty path to a random abstract address
            # that nothing can reach.
            raise ConfigError(variable, "unix: needs a socket path")
    elif text.startswith("/") or text.endswith(".sock"):
        description = f"unix:{_escape_endpoint(text)}:mode=666:lockfile=1:backlog={LISTEN_BACKLOG}"
    else:
        match = _HOST_PORT.fullmatch(text)
        if match is None:
            raise ConfigError(
                variable,
                f"{text!r} is neither HOST:PORT, :PORT, [IPv6]:PORT, a socket path "
                "nor a Twisted endpoint description",
            )
        port = int(match.group("port"))
        if port > 65535:
            raise ConfigError(variable, f"port {port} out of range")
        if match.group("v6") is not None:
            iface = _escape_endpoint(match.group("v6"))
            description = f"tcp6:{port}:interface={iface}:backlog={LISTEN_BACKLOG}"
        elif match.group("host"):
            host = match.group("host")
            if not _HOST_NAME.fullmatch(host):
                raise ConfigError(variable, f"invalid host {host!r}")
            description = f"tcp:{port}:interface={host}:backlog={LISTEN_BACKLOG}"
        elif ipv6Available():
            # Go's ":PORT" is every address, IPv6 included: "::" is both
            # families on Linux (unless net.ipv6.bindv6only=1 is set).
            description = f"tcp6:{port}:interface=\\:\\::backlog={LISTEN_BACKLOG}"
        else:
            description = f"tcp:{port}:backlog={LISTEN_BACKLOG}"
    try:
        # Building the endpoint checks the description; the reactor is only
        # stored, and none is needed (nor the 2 MB of a fake one) to check.
        serverFromString(None, description)
    except Exception as exc:
        if prefix == "systemd":
            raise ConfigError(
                variable,
                f"{description!r}: no such socket was passed in by systemd "
                "(LISTEN_FDS/LISTEN_FDNAMES); is the daemon started by a socket unit?",
            ) from None
        raise ConfigError(variable, f"invalid endpoint {description!r}: {exc}") from None
    return description


@dataclass(frozen=True)
class RedisTarget:
    """Where Redis is, parsed from C{REDIS_URL}."""

    host: str = "localhost"
    port: int = 6379
    path: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    sentinels: tuple[tuple[str, int], ...] = ()
    master_name: str = ""
    sentinel_password: str | None = field(default=None, repr=False)


def parse_sentinels(variable: str, text: str) -> tuple[tuple[str, int], ...]:
    """Parse ``host:port,host:port,...`` (IPv6 hosts in brackets)."""
    addresses = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        match = _HOST_PORT.fullmatch(item)
        if match is None or not (match.group("v6") or match.group("host")):
            raise ConfigError(variable, f"{item!r} is not HOST:PORT")
        if not _printable(match.group("v6") or match.group("host")):
            raise ConfigError(variable, f"{item!r}: the host holds control characters")
        port = int(match.group("port"))
        if not 0 < port < 65536:
            raise ConfigError(variable, f"port {port} out of range")
        addresses.append((match.group("v6") or match.group("host"), port))
    if not addresses:
        raise ConfigError(variable, "no Sentinel address given")
    return tuple(addresses)


def parse_redis_url(variable: str, url: str) -> RedisTarget:
    """
    Parse ``redis://[user:password@]host:port/db``, ``rediss://...`` and
    ``unix:///path?db=N`` (go-redis's forms).
    """
    if not _printable(url):
        # Not shown: the URL may carry a password.
        raise ConfigError(variable, "the URL holds control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(variable, f"malformed URL: {exc}") from None
    # Older Pythons let int() read a port in other scripts' digits.
    host_port = parts.netloc.rpartition("@")[2].rpartition("]")[2]
    port_text = host_port.rpartition(":")[2] if ":" in host_port else ""
    if port_text and not is_number(port_text):
        raise ConfigError(variable, f"invalid port {port_text!r}")
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    query: dict[str, str] = {}
    for item in parts.query.split("&"):
        name, _, value = item.partition("=")
        if name:
            query[name] = value
    if parts.scheme in ("redis", "rediss"):
        if not parts.hostname:
            raise ConfigError(variable, "missing host")
        db_text = parts.path.lstrip("/") or query.get("db", "0")
        path = None
        host = parts.hostname
    elif parts.scheme == "unix":
        if not parts.path:
            raise ConfigError(variable, "missing socket path")
        db_text = query.get("db", "0")
        path = parts.path
        host = "localhost"
    else:
        raise ConfigError(variable, f"unsupported scheme {parts.scheme!r} (redis, rediss or unix)")
    if not is_number(db_text):
        raise ConfigError(variable, f"invalid database number {db_text!r}")
    return RedisTarget(
        host=host,
        port=port or 6379,
        path=path,
        db=int(db_text),
        username=username or None,
        password=password or None,
        tls=parts.scheme == "rediss",
    )


def parse_base_url(variable: str, url: str) -> str:
    """Check that C{url} is an absolute http(s) URL; return it without a trailing slash."""
    try:
        parts = urlsplit(url.strip())
        _ = parts.port  # raises for a non-numeric port
    except ValueError as exc:
        raise ConfigError(variable, f"malformed URL: {exc}") from None
    if not _printable(url.strip()):
        raise ConfigError(variable, f"{url!r} holds control characters")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(variable, f"{url!r} is not an http:// or https:// URL")
    if parts.query or parts.fragment:
        raise ConfigError(variable, "the URL must not have a query or fragment")
    return url.strip().rstrip("/")


def _non_negative_duration(variable: str, text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError:
        raise ConfigError(
            variable, f"{text!r} is not a duration (e.g. 300s, 5m, 1h30m, 0)"
        ) from None
    if seconds < 0:
        raise ConfigError(variable, f"{text!r} is negative")
    if not math.isfinite(seconds):
        raise ConfigError(variable, f"{text!r} is too long")
    return seconds


def _positive_duration(variable: str, text: str) -> float:
    seconds = _non_negative_duration(variable, text)
    if seconds <= 0:
        raise ConfigError(variable, f"{text!r} is not a lifetime (more than 0, e.g. 24h)")
    return seconds


def parse_nameservers(variable: str, text: str) -> tuple[tuple[str, int], ...]:
    """
    Parse ``ip:port,ip:port`` (an empty text: none, the system's
    C{resolv.conf} is used).  IPv4 addresses only: twisted.names sends its
    queries from an IPv4 socket.
    """
    servers = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        host, colon, port_text = item.rpartition(":")
        if not colon or not is_number(port_text) or not 0 < int(port_text) < 65536:
            raise ConfigError(variable, f"{item!r} is not IP:PORT (e.g. 127.0.0.1:53)")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(variable, f"{host!r} is not an IP address") from None
        if address.version != 4:
            raise ConfigError(variable, f"{host!r}: only IPv4 name servers can be queried")
        servers.append((str(address), int(port_text)))
    return tuple(servers)


def _port(variable: str, text: str) -> int:
    value = text.strip()
    if not is_number(value) or not 0 < int(value) < 65536:
        raise ConfigError(variable, f"{text!r} is not a port number (1-65535)")
    return int(value)


_EHLO_NAME = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
    r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
)


def ehlo_hostname(variable: str, text: str) -> str:
    """
    The name for C{EHLO}: as given, or this host's fully qualified name
    (many servers refuse or slow down C{EHLO localhost}); it must be a
    plain host name, since it goes onto the wire.
    """
    name = text.strip()
    if not name:
        fqdn = socket.getfqdn().rstrip(".")
        return fqdn if _EHLO_NAME.fullmatch(fqdn) and len(fqdn) <= 253 else "localhost"
    if not _EHLO_NAME.fullmatch(name) or len(name) > 253:
        raise ConfigError(variable, f"{text!r} is not a host name")
    return name


# More processes than this would only compete for the same cores and for
# Postfix's connections; it also bounds a typo such as WORKERS=100.
MAX_WORKERS = 64


def _workers(text: str, shared_state: bool) -> int:
    value = text.strip() or "1"
    if not is_number(value) or not 1 <= int(value) <= MAX_WORKERS:
        raise ConfigError(
            "WORKERS", f"{text!r} is not a number of processes from 1 to {MAX_WORKERS}"
        )
    if int(value) > 1 and not shared_state:
        # Each process would keep its own rate-limit windows: a sender
        # could send WORKERS times its quota.
        raise ConfigError(
            "WORKERS",
            "more than one worker needs REDIS_URL, so that every process counts the same "
            "quota windows and shares one lookup cache",
        )
    return int(value)


@dataclass(frozen=True)
class Setting:
    """One configuration variable: its name, twistd option, default and help."""

    variable: str
    option: str
    default: str | None
    help: str


SETTINGS: tuple[Setting, ...] = (
    Setting("USERLI_TOKEN", "userli-token", None, "Userli API token (required)"),
    Setting("USERLI_BASE_URL", "userli-base-url", "http://localhost:8000", "Userli base URL"),
    Setting(
        "POSTFIX_RECIPIENT_DELIMITER",
        "recipient-delimiter",
        "",
        "Postfix recipient_delimiter: user+tag@x is looked up as user@x",
    ),
    Setting("SOCKETMAP_LISTEN_ADDR", "socketmap-listen", ":10001", "socketmap listen address"),
    Setting("POLICY_LISTEN_ADDR", "policy-listen", ":10003", "policy service listen address"),
    Setting(
        "METRICS_LISTEN_ADDR",
        "metrics-listen",
        ":10002",
        "/metrics, /health and /ready listen address",
    ),
    Setting("SASL_LISTEN_ADDR", "sasl-listen", "", "Dovecot-auth listen address (empty: off)"),
    Setting(
        "RATE_LIMIT_MESSAGE",
        "rate-limit-message",
        "Rate limit exceeded, please try again later",
        "text after RATE_LIMIT_ACTION when a sender is over quota",
    ),
    Setting(
        "RATE_LIMIT_ACTION",
        "rate-limit-action",
        "REJECT",
        "what a sender over quota gets: REJECT, DEFER, DEFER_IF_PERMIT, HOLD or WARN",
    ),
    Setting(
        "RATE_LIMIT_IDENTITY",
        "rate-limit-identity",
        "sasl_or_sender",
        "who is counted: sasl (authenticated senders only) or sasl_or_sender",
    ),
    Setting(
        "REDIS_URL", "redis-url", "", "redis://[user:password@]host:port/db (empty: in memory)"
    ),
    Setting(
        "REDIS_SENTINEL_ADDRS",
        "redis-sentinel-addrs",
        "",
        "Redis Sentinels host:port,host:port,... (set: find the master through them)",
    ),
    Setting("REDIS_SENTINEL_MASTER", "redis-sentinel-master", "mymaster", "Sentinel master name"),
    Setting(
        "REDIS_SENTINEL_PASSWORD",
        "redis-sentinel-password",
        "",
        "password of the Sentinels themselves (empty: none)",
    ),
    Setting(
        "LOOKUP_CACHE_TTL", "lookup-cache-ttl", "300s", "lifetime of cached OK answers (0: off)"
    ),
    Setting(
        "REMOTE_DOMAIN_CACHE_TTL",
        "remote-domain-cache-ttl",
        "60s",
        "how long a domain Userli does not host is remembered, so questions about its "
        "addresses need no API call (0: off)",
    ),
    Setting(
        "QUOTA_CACHE_TTL",
        "quota-cache-ttl",
        "0",
        "how long a sender's quota from the API is reused (0: ask for every message)",
    ),
    Setting(
        "SASL_FAILURE_DELAY",
        "sasl-failure-delay",
        "2s",
        "delay before a failed login is answered (0: off)",
    ),
    Setting(
        "TLS_POLICY_NAMESERVERS",
        "tls-policy-nameservers",
        "",
        "DNS servers for the tls_policy map, ip:port,ip:port (empty: /etc/resolv.conf)",
    ),
    Setting(
        "TLS_POLICY_SMTP_PORT",
        "tls-policy-smtp-port",
        "25",
        "port the tls_policy map probes mail servers on",
    ),
    Setting(
        "TLS_POLICY_EHLO_HOSTNAME",
        "tls-policy-ehlo-hostname",
        "",
        "name sent in EHLO by the tls_policy probe (empty: this host's FQDN)",
    ),
    Setting(
        "TLS_POLICY_CACHE_TTL_TLS",
        "tls-policy-cache-ttl-tls",
        "168h",
        "how long a domain whose servers all do TLS is answered OK encrypt",
    ),
    Setting(
        "TLS_POLICY_CACHE_TTL_NOTLS",
        "tls-policy-cache-ttl-notls",
        "24h",
        "how long a domain with a server without TLS is answered NOTFOUND before a new probe",
    ),
    Setting("LOG_LEVEL", "log-level", "info", "debug, info, warn or error"),
    Setting("LOG_FORMAT", "log-format", "text", "text or json (one object per line)"),
    Setting(
        "WORKERS",
        "workers",
        "1",
        "processes serving the listeners (more than 1 needs REDIS_URL)",
    ),
)


@dataclass(frozen=True)
class Listener:
    """
    One of the daemon's listeners: the one place that says which setting
    opens it, which L{Config} field holds its endpoint, whether it may be
    off, and whether it serves Postfix (and so every worker process).
    """

    #: Its name in the log and between the processes (C{socketmap=3}).
    name: str
    #: The setting of its address, named in every error about it.
    variable: str
    #: The L{Config} field with its endpoint description.
    field: str
    #: Whether an empty address turns it off (else it is an error).
    optional: bool = False
    #: Whether Postfix connects to it; worker processes serve these too
    #: (C{/metrics}, C{/health} and C{/ready} stay with the first process).
    postfix: bool = True


#: Every listener, in the order of the settings (and of their checks).
LISTENERS = (
    Listener("socketmap", "SOCKETMAP_LISTEN_ADDR", "socketmap_listen"),
    Listener("policy", "POLICY_LISTEN_ADDR", "policy_listen"),
    Listener("http", "METRICS_LISTEN_ADDR", "metrics_listen", postfix=False),
    Listener("sasl", "SASL_LISTEN_ADDR", "sasl_listen", optional=True),
)

#: The listeners by name.
LISTENERS_BY_NAME = {listener.name: listener for listener in LISTENERS}


def raw_values(
    environ: Mapping[str, str], options: Mapping[str, str | None] | None = None
) -> dict[str, str | None]:
    """
    Every setting's unchecked value keyed by variable name: the twistd option
    (keyed by option name) if given, else the environment, else the default.
    """
    options = options or {}
    raw: dict[str, str | None] = {}
    for setting in SETTINGS:
        value = options.get(setting.option)
        if value is None:
            value = environ.get(setting.variable)
        if value is None:
            value = setting.default
        raw[setting.variable] = value
    return raw


@dataclass(frozen=True)
class Config:
    """The daemon's whole configuration, checked."""

    userli_token: str = field(repr=False)
    userli_base_url: str = "http://localhost:8000"
    recipient_delimiter: str = ""
    socketmap_listen: str = "tcp:10001"
    policy_listen: str = "tcp:10003"
    metrics_listen: str = "tcp:10002"
    sasl_listen: str | None = None
    rate_limit_message: str = "Rate limit exceeded, please try again later"
    rate_limit_action: str = "REJECT"
    rate_limit_identity: str = "sasl_or_sender"
    redis: RedisTarget | None = None
    lookup_cache_ttl: float = 300.0
    remote_domain_cache_ttl: float = 60.0
    quota_cache_ttl: float = 0.0
    sasl_failure_delay: float = 2.0
    log_level: str = "info"
    log_format: str = "text"
    workers: int = 1
    tls_policy_nameservers: tuple[tuple[str, int], ...] = ()
    tls_policy_smtp_port: int = 25
    tls_policy_ehlo_hostname: str = "localhost"
    tls_policy_cache_ttl_tls: float = 168 * 3600.0
    tls_policy_cache_ttl_notls: float = 24 * 3600.0

    def endpoint(self, listener: Listener) -> str | None:
        """The endpoint description C{listener} listens on; C{None} when it is off."""
        description: str | None = getattr(self, listener.field)
        return description

    @classmethod
    def from_values(cls, raw: Mapping[str, str | None]) -> Config:
        """
        Check raw values keyed by variable name (L{raw_values}: the
        environment, with twistd options taking precedence).

        @raise ConfigError: naming the first variable that is wrong.
        """

        def get(name: str) -> str:
            return raw.get(name) or ""

        token = get("USERLI_TOKEN").strip()
        if not token:
            raise ConfigError("USERLI_TOKEN", "required, but not set")
        if not (token.isascii() and _printable(token)):
            # It goes into a header of every API call; not shown, it is a secret.
            raise ConfigError("USERLI_TOKEN", "holds characters other than printable ASCII")

        level = get("LOG_LEVEL").strip().lower() or "info"
        if level == "warning":
            level = "warn"
        if level not in LOG_LEVELS:
            raise ConfigError(
                "LOG_LEVEL", f"{get('LOG_LEVEL')!r} is not one of {', '.join(LOG_LEVELS)}"
            )
        log_format = get("LOG_FORMAT").strip().lower() or "text"
        if log_format not in LOG_FORMATS:
            raise ConfigError("LOG_FORMAT", f"{get('LOG_FORMAT')!r} is not one of text, json")

        delimiter = get("POSTFIX_RECIPIENT_DELIMITER")
        if delimiter and ("@" in delimiter or not _printable(delimiter) or " " in delimiter):
            raise ConfigError("POSTFIX_RECIPIENT_DELIMITER", f"{delimiter!r} cannot be a delimiter")

        redis_url = get("REDIS_URL").strip()
        redis = parse_redis_url("REDIS_URL", redis_url) if redis_url else None
        sentinel_addrs = get("REDIS_SENTINEL_ADDRS").strip()
        if sentinel_addrs:
            master = get("REDIS_SENTINEL_MASTER").strip()
            if not master:
                raise ConfigError("REDIS_SENTINEL_MASTER", "required with REDIS_SENTINEL_ADDRS")
            # REDIS_URL then only contributes the password, user and db.
            redis = replace(
                redis or RedisTarget(),
                sentinels=parse_sentinels("REDIS_SENTINEL_ADDRS", sentinel_addrs),
                master_name=master,
                sentinel_password=get("REDIS_SENTINEL_PASSWORD") or None,
            )
        message = " ".join(
            "".join(c if _printable(c) else " " for c in get("RATE_LIMIT_MESSAGE")).split()
        )
        action = get("RATE_LIMIT_ACTION").strip().upper() or "REJECT"
        if action not in RATE_LIMIT_ACTIONS:
            raise ConfigError(
                "RATE_LIMIT_ACTION",
                f"{get('RATE_LIMIT_ACTION')!r} is not one of {', '.join(RATE_LIMIT_ACTIONS)}",
            )
        identity = get("RATE_LIMIT_IDENTITY").strip().lower() or "sasl_or_sender"
        if identity not in RATE_LIMIT_IDENTITIES:
            raise ConfigError(
                "RATE_LIMIT_IDENTITY",
                f"{get('RATE_LIMIT_IDENTITY')!r} is not one of {', '.join(RATE_LIMIT_IDENTITIES)}",
            )
        workers = _workers(get("WORKERS"), redis is not None)
        base_url = parse_base_url("USERLI_BASE_URL", get("USERLI_BASE_URL"))
        endpoints: dict[str, Any] = {
            listener.field: listen_endpoint(listener.variable, get(listener.variable))
            if get(listener.variable).strip() or not listener.optional
            else None
            for listener in LISTENERS
        }

        return cls(
            userli_token=token,
            userli_base_url=base_url,
            recipient_delimiter=delimiter,
            **endpoints,
            rate_limit_message=message or "Rate limit exceeded, please try again later",
            rate_limit_action=action,
            rate_limit_identity=identity,
            redis=redis,
            lookup_cache_ttl=_non_negative_duration("LOOKUP_CACHE_TTL", get("LOOKUP_CACHE_TTL")),
            remote_domain_cache_ttl=_non_negative_duration(
                "REMOTE_DOMAIN_CACHE_TTL", get("REMOTE_DOMAIN_CACHE_TTL")
            ),
            quota_cache_ttl=_non_negative_duration("QUOTA_CACHE_TTL", get("QUOTA_CACHE_TTL")),
            sasl_failure_delay=_non_negative_duration(
                "SASL_FAILURE_DELAY", get("SASL_FAILURE_DELAY")
            ),
            log_level=level,
            log_format=log_format,
            workers=workers,
            tls_policy_nameservers=parse_nameservers(
                "TLS_POLICY_NAMESERVERS", get("TLS_POLICY_NAMESERVERS")
            ),
            tls_policy_smtp_port=_port("TLS_POLICY_SMTP_PORT", get("TLS_POLICY_SMTP_PORT")),
            tls_policy_ehlo_hostname=ehlo_hostname(
                "TLS_POLICY_EHLO_HOSTNAME", get("TLS_POLICY_EHLO_HOSTNAME")
            ),
            tls_policy_cache_ttl_tls=_positive_duration(
                "TLS_POLICY_CACHE_TTL_TLS", get("TLS_POLICY_CACHE_TTL_TLS")
            ),
            tls_policy_cache_ttl_notls=_positive_duration(
                "TLS_POLICY_CACHE_TTL_NOTLS", get("TLS_POLICY_CACHE_TTL_NOTLS")
            ),
        )
