"""
The container's health check: GET /health where METRICS_LISTEN_ADDR says
the daemon serves it, exit 0 on 200 and 1 otherwise.

It reads the same variable as the daemon, so moving the metrics listener
(another port, loopback only, a UNIX socket) cannot leave the health check
asking the wrong place.  Standard library only, and no import of the daemon:
it runs every 30 s and must stay cheap.
"""

from __future__ import annotations

import http.client
import os
import re
import socket
import ssl
import sys

DEFAULT = ":10002"
TIMEOUT = 3.0

_HOST_PORT = re.compile(
    r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\[\]/]*)):(?P<port>[0-9]{1,5})$"
)
# Twisted endpoint descriptions split on ':' not preceded by a backslash.
_SEPARATOR = re.compile(r"(?<!\\):")


class Target:
    """Where /health is: a TCP (host, port), optionally TLS, or a UNIX path."""

    def __init__(self, host: str = "", port: int = 0, path: str = "", tls: bool = False) -> None:
        self.host = host
        self.port = port
        self.path = path
        self.tls = tls

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Target) and vars(self) == vars(other)

    def __repr__(self) -> str:
        return f"Target({vars(self)!r})"


def _reachable(host: str, v6: bool = False) -> str:
    """The address to connect to for a listen interface (any -> loopback)."""
    if host in ("", "0.0.0.0"):
        return "::1" if v6 else "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def target(value: str | None) -> Target:
    """
    The /health target for a METRICS_LISTEN_ADDR value: the Go forms
    (C{:10002}, C{HOST:PORT}, C{[::1]:10002}, a socket path) and the
    Twisted descriptions the daemon accepts (C{tcp:}, C{tcp6:}, C{unix:},
    C{ssl:}).

    @raise ValueError: for anything else (C{systemd:} sockets cannot be
        reached from inside the container by address).
    """
    text = (value or "").strip() or DEFAULT
    prefix = text.split(":", 1)[0]
    if prefix in ("tcp", "tcp6", "unix", "ssl"):
        fields = [_unescape(f) for f in _SEPARATOR.split(text)][1:]
        positional = [f for f in fields if "=" not in f]
        named = dict(f.split("=", 1) for f in fields if "=" in f)
        if prefix == "unix":
            path = named.get("address") or (positional[0] if positional else "")
            if not path:
                raise ValueError(f"{text!r}: no socket path")
            return Target(path=path)
        port = named.get("port") or (positional[0] if positional else "")
        if not port.isdigit():
            raise ValueError(f"{text!r}: no port")
        host = _reachable(named.get("interface", ""), v6=prefix == "tcp6")
        return Target(host=host, port=int(port), tls=prefix == "ssl")
    if text.startswith("/") or text.endswith(".sock"):
        return Target(path=text)
    match = _HOST_PORT.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not an address the health check can reach")
    host = match.group("v6") if match.group("v6") is not None else match.group("host")
    return Target(host=_reachable(host), port=int(match.group("port")))


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over a UNIX socket."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def healthy(where: Target, timeout: float = TIMEOUT) -> bool:
    """Whether GET /health at C{where} answers 200."""
    connection: http.client.HTTPConnection
    if where.path:
        connection = _UnixConnection(where.path, timeout)
    elif where.tls:
        # The daemon's own certificate may name any host; what matters here
        # is that the process answers.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        connection = http.client.HTTPSConnection(
            where.host, where.port, timeout=timeout, context=context
        )
    else:
        connection = http.client.HTTPConnection(where.host, where.port, timeout=timeout)
    try:
        connection.request("GET", "/health")
        return connection.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


def main() -> int:
    try:
        where = target(os.environ.get("METRICS_LISTEN_ADDR"))
    except ValueError as error:
        print(f"METRICS_LISTEN_ADDR: {error}", file=sys.stderr)
        return 1
    if healthy(where):
        return 0
    print(f"no 200 from /health at {where!r}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
