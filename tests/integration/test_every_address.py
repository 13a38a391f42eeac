"""
Listen addresses as the Go program reads them: C{:PORT} is every address,
IPv6 included; C{0.0.0.0:PORT} is every IPv4 address only.
"""

from __future__ import annotations

import socket

import pytest

from tests.integration.conftest import DOMAIN, StartDaemon
from tests.integration.harness import free_port, netstring

pytestmark = pytest.mark.integration


def has_ipv6_loopback() -> bool:
    """Whether this machine has C{::1} to connect to."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback (::1) here")


def ask(family: socket.AddressFamily, host: str, port: int) -> bytes:
    """One socketmap domain lookup over C{family}: the raw reply."""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect((host, port))
        s.sendall(netstring(f"domain {DOMAIN}".encode()))
        reply = b""
        while not reply.endswith(b","):
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
        return reply


def refused(family: socket.AddressFamily, host: str, port: int) -> bool:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        try:
            s.connect((host, port))
        except ConnectionRefusedError:
            return True
        return False


@needs_ipv6
def test_port_alone_is_every_address(start_daemon: StartDaemon) -> None:
    """C{SOCKETMAP_LISTEN_ADDR=:PORT} answers on C{127.0.0.1} and on C{::1}."""
    port = free_port()
    start_daemon(env={"SOCKETMAP_LISTEN_ADDR": f":{port}"})
    ipv4 = ask(socket.AF_INET, "127.0.0.1", port)
    ipv6 = ask(socket.AF_INET6, "::1", port)
    assert ipv4 == netstring(b"OK 1")
    assert ipv6 == netstring(b"OK 1")


@needs_ipv6
def test_any_ipv4_is_ipv4_only(start_daemon: StartDaemon) -> None:
    """C{0.0.0.0:PORT} answers on C{127.0.0.1} but not on C{::1}."""
    port = free_port()
    start_daemon(env={"SOCKETMAP_LISTEN_ADDR": f"0.0.0.0:{port}"})
    assert ask(socket.AF_INET, "127.0.0.1", port) == netstring(b"OK 1")
    assert refused(socket.AF_INET6, "::1", port)
