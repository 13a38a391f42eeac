"""
Userli over C{http://} and C{https://}: the daemon keeps its connections to
Userli alive and reuses them, and over HTTPS checks the certificate against
the trust store like any HTTPS client.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.certificates import self_signed
from tests.fake_userli import FakeUserliServer
from tests.integration.conftest import DOMAIN, StartDaemon, userli_data
from tests.integration.harness import (
    Daemon,
    RedisServer,
    free_port,
    http_get,
    postmap,
    wait_for,
)

pytestmark = pytest.mark.integration

ALICE = f"alice@{DOMAIN}"

# Lookups of distinct keys, each one a cache miss and so a call to Userli.
LOOKUPS = 6


def lookUpDistinctKeys(daemon: Daemon, userli: FakeUserliServer) -> int:
    """
    Look up L{LOOKUPS} mailboxes nobody asked for before, one after another;
    return how many connections Userli accepted meanwhile.
    """
    before = userli.connections
    asked = len(userli.fake.requests("mailbox"))
    for i in range(LOOKUPS):
        status, _, err = postmap(f"nobody{i}@{DOMAIN}", daemon.socketmap_target("mailbox"))
        assert status == 1 and "temporary" not in err.lower(), (status, err, daemon.output())
    assert len(userli.fake.requests("mailbox")) == asked + LOOKUPS
    return userli.connections - before


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[bytes, bytes, Path]:
    """A certificate for localhost, its key, and a CA file trusting it."""
    pem, key = self_signed()
    trusted = tmp_path / "ca.pem"
    trusted.write_bytes(pem)
    return pem, key, trusted


@pytest.fixture
def https_userli(certificate: tuple[bytes, bytes, Path]) -> Iterator[FakeUserliServer]:
    """The fake Userli over HTTPS, with a certificate for localhost."""
    pem, key, _ = certificate
    server = FakeUserliServer(userli_data(), tls=(pem, key))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_http_kept_alive(start_daemon: StartDaemon, fake_userli: FakeUserliServer) -> None:
    """Over http://, lookups one after another share one connection to Userli."""
    daemon = start_daemon()
    assert daemon.env["USERLI_BASE_URL"].startswith("http://")
    assert lookUpDistinctKeys(daemon, fake_userli) <= 1


def test_https_userli(
    start_daemon: StartDaemon,
    https_userli: FakeUserliServer,
    certificate: tuple[bytes, bytes, Path],
) -> None:
    """An https:// Userli whose certificate the trust store vouches for is used."""
    daemon = start_daemon(
        env={"USERLI_BASE_URL": https_userli.url, "SSL_CERT_FILE": str(certificate[2])}
    )
    status, out, _ = postmap(ALICE, daemon.socketmap_target("mailbox"))
    assert (status, out.strip()) == (0, "1"), daemon.output()
    assert [r.key for r in https_userli.fake.requests("mailbox")] == [ALICE]


def test_https_kept_alive(
    start_daemon: StartDaemon,
    https_userli: FakeUserliServer,
    certificate: tuple[bytes, bytes, Path],
) -> None:
    """Over https://, lookups one after another share one TLS connection to Userli."""
    daemon = start_daemon(
        env={"USERLI_BASE_URL": https_userli.url, "SSL_CERT_FILE": str(certificate[2])}
    )
    assert lookUpDistinctKeys(daemon, https_userli) <= 1


def test_https_untrusted_certificate(
    start_daemon: StartDaemon, https_userli: FakeUserliServer, tmp_path: Path
) -> None:
    """A certificate nothing vouches for is refused: a temporary failure, no answer."""
    other, _ = self_signed()
    (tmp_path / "other.pem").write_bytes(other)
    daemon = start_daemon(
        env={"USERLI_BASE_URL": https_userli.url, "SSL_CERT_FILE": str(tmp_path / "other.pem")}
    )
    status, _, err = postmap(ALICE, daemon.socketmap_target("mailbox"))
    assert status != 0
    assert "temporary" in err.lower()
    assert https_userli.fake.requests("mailbox") == []


def test_rediss(
    start_daemon: StartDaemon,
    fake_userli: FakeUserliServer,
    certificate: tuple[bytes, bytes, Path],
    tmp_path: Path,
) -> None:
    """
    A rediss:// Redis whose certificate the trust store vouches for is used,
    by the connection pool and by the tracking connection of the near-cache.
    """
    pem, key, trusted = certificate
    (tmp_path / "redis.pem").write_bytes(pem)
    (tmp_path / "redis.key").write_bytes(key)
    tls_port = free_port()
    redis = RedisServer(
        tmp_path / "redis-tls",
        arguments=[
            "--tls-port",
            str(tls_port),
            "--tls-cert-file",
            str(tmp_path / "redis.pem"),
            "--tls-key-file",
            str(tmp_path / "redis.key"),
            "--tls-ca-cert-file",
            str(trusted),
            "--tls-auth-clients",
            "no",
        ],
    )
    redis.start()
    try:
        daemon = start_daemon(
            env={
                "REDIS_URL": f"rediss://localhost:{tls_port}/0",
                "SSL_CERT_FILE": str(trusted),
            }
        )
        key = f"userli:lookup:mailbox:{ALICE}"

        def cached() -> bool:
            status, out, _ = postmap(ALICE, daemon.socketmap_target("mailbox"))
            assert (status, out.strip()) == (0, "1"), daemon.output()
            return redis.command("GET", key) == "OK 1"

        wait_for(cached, "the answer cached over TLS")

        def coherent() -> bool:
            _, body = http_get(daemon.metrics_url + "/metrics")
            return b"\nuserli_postfix_adapter_near_cache_coherent 1.0\n" in body

        wait_for(coherent, "client tracking over TLS")
    finally:
        redis.stop()
