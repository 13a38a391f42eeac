"""
End to end: a real, private Postfix delivers to remote domains through
DNS and asks the daemon's C{tls_policy} map first
(C{smtp_tls_policy_maps = socketmap:...:tls_policy}, with
C{smtp_tls_security_level = may}).

Postfix's resolver reads C{/etc/resolv.conf} and speaks to port 53 only,
and its SMTP client delivers to port 25 of the MX hosts, so here both are
real: the instance runs in a mount namespace of its own whose
C{resolv.conf} names the test DNS server on port 53 of a loopback address
of a block picked for this test, and the fake mail exchangers listen on
port 25 of addresses of that block, so Postfix delivers by MX exactly as
it would to the Internet (no transport map changes its next hop or the
key it asks the map for).  Nothing outside the test sees either.
"""

from __future__ import annotations

import smtplib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from tests.integration.conftest import StartDaemon
from tests.integration.fake_mx import (
    Behaviour,
    FakeDNS,
    FakeMX,
    LoopbackBlock,
    Session,
    Zone,
    mail_domain,
)
from tests.integration.harness import Daemon, RedisServer
from tests.integration.postfix import (
    LMTPSink,
    PostfixInstance,
    requires_postfix,
    requires_private_resolv_conf,
)

pytestmark = [pytest.mark.integration, requires_postfix, requires_private_resolv_conf]

SENDER = "sender@example.test"
#: Host numbers in the loopback block: the MX of each domain, and the DNS server.
TLS_HOST, PLAIN_HOST, DNS_HOST = 1, 2, 53
DOMAINS = {"tls.test": TLS_HOST, "plain.test": PLAIN_HOST}


@dataclass(frozen=True)
class Remote:
    """The DNS server on port 53 and the mail exchangers on port 25."""

    block: LoopbackBlock
    dns: FakeDNS
    mx: FakeMX

    @property
    def nameserver(self) -> str:
        return self.block.address(DNS_HOST)

    def host(self, domain: str) -> str:
        return self.block.address(DOMAINS[domain])


@pytest.fixture
def remote() -> Iterator[Remote]:
    block = LoopbackBlock()
    records: dict[str, list[object]] = {}
    for domain, host in DOMAINS.items():
        records.update(mail_domain(domain, (10, block.address(host))))
    behaviours = {
        block.address(TLS_HOST): Behaviour.TLS,
        block.address(PLAIN_HOST): Behaviour.NO_TLS,
    }
    dns_address = (block.address(DNS_HOST), 53)
    with FakeDNS(Zone("test", records), [dns_address]) as dns, FakeMX(behaviours, 25) as mx:
        yield Remote(block, dns, mx)


@pytest.fixture
def lmtp_sink() -> Iterator[LMTPSink]:
    """Where the private Postfix would deliver local mail (none here)."""
    with LMTPSink() as sink:
        yield sink


StartMailSystem = Callable[[], tuple[Daemon, PostfixInstance]]


@pytest.fixture
def start_mail_system(
    remote: Remote,
    start_daemon: StartDaemon,
    redis_server: RedisServer,
    lmtp_sink: LMTPSink,
) -> Iterator[StartMailSystem]:
    """
    A factory: starts the daemon (Redis, the test DNS server, port 25) and
    a private Postfix that delivers remote mail by MX and asks the daemon's
    C{tls_policy} map.
    """
    instances: list[PostfixInstance] = []

    def start() -> tuple[Daemon, PostfixInstance]:
        daemon = start_daemon(
            redis=redis_server,
            env={
                "TLS_POLICY_NAMESERVERS": f"{remote.nameserver}:53",
                "TLS_POLICY_SMTP_PORT": "25",
            },
        )
        postfix = PostfixInstance(
            lmtp_sink.port,
            main={
                "default_transport": "smtp",
                "relay_transport": "smtp",
                "smtp_host_lookup": "dns",
                "smtp_dns_support_level": "enabled",
                "smtp_address_preference": "ipv4",
                "smtp_tls_security_level": "may",
                "smtp_tls_policy_maps": daemon.socketmap_target("tls_policy"),
                "smtp_tls_loglevel": "1",
                # One connection per delivery, so a changed server is seen.
                "smtp_connection_cache_on_demand": "no",
            },
            # The SMTP client's TLS needs its session cache and entropy manager.
            services=["tlsmgr unix - - n 1000? 1 tlsmgr"],
            resolv_conf=f"nameserver {remote.nameserver}\n",
        )
        instances.append(postfix)
        postfix.start()
        return daemon, postfix

    try:
        yield start
    finally:
        for instance in instances:
            instance.cleanup()


def send(postfix: PostfixInstance, recipient: str) -> None:
    """Hand one message for C{recipient} to Postfix."""
    with smtplib.SMTP("127.0.0.1", postfix.smtp_port, timeout=60) as smtp:
        smtp.sendmail(
            SENDER,
            [recipient],
            f"From: {SENDER}\r\nTo: {recipient}\r\nSubject: hi\r\n\r\nHello\r\n",
        )


def delivered(remote: Remote, postfix: PostfixInstance, domain: str, recipient: str) -> Session:
    """Wait for the session in which C{domain}'s MX received mail for C{recipient}."""

    def carries(session: Session) -> bool:
        return any(recipient in m.recipients for m in session.messages)

    try:
        remote.mx.wait_for_sessions(remote.host(domain), condition=carries)
    except TimeoutError as timeout:
        raise TimeoutError(f"{timeout}; Postfix's log:\n{postfix.log()}") from None
    return next(s for s in remote.mx.sessions(remote.host(domain)) if carries(s))


def cached(redis: RedisServer, domain: str) -> object:
    return redis.command("GET", f"userli:tlspolicy:domain:{domain}")


def test_postfix_follows_the_map(
    remote: Remote, start_mail_system: StartMailSystem, redis_server: RedisServer
) -> None:
    """
    Postfix delivers by MX through the test DNS: over TLS to the domain
    whose server completes a handshake (the map said C{encrypt}), in the
    clear to the one whose server offers no STARTTLS (C{NOTFOUND}: the
    global C{may} applies).  Then the downgrade the map exists for: the
    first server stops offering STARTTLS (an attacker stripping it), and
    Postfix defers the next message instead of sending it in the clear.
    """
    _, postfix = start_mail_system()
    started = time.monotonic()
    send(postfix, "first@tls.test")
    send(postfix, "someone@plain.test")

    over_tls = delivered(remote, postfix, "tls.test", "first@tls.test")
    assert over_tls.handshake and over_tls.messages[0].over_tls
    in_clear = delivered(remote, postfix, "plain.test", "someone@plain.test")
    assert not in_clear.starttls and not in_clear.messages[0].over_tls
    assert cached(redis_server, "tls.test") == "encrypt"
    assert cached(redis_server, "plain.test") == "notls"
    postfix.wait_for_log(f"TLS connection established to mx10.tls.test[{remote.host('tls.test')}]")
    both_delivered = time.monotonic() - started

    remote.mx.set_behaviour(remote.host("tls.test"), Behaviour.NO_TLS)
    send(postfix, "second@tls.test")
    postfix.wait_for_log("TLS is required, but was not offered by host mx10.tls.test")
    assert [
        m.recipients for s in remote.mx.sessions(remote.host("tls.test")) for m in s.messages
    ] == [("first@tls.test",)]
    queued = postfix.queued()
    assert [r["address"] for m in queued for r in m["recipients"]] == ["second@tls.test"]
    print(
        f"\ntls_policy through Postfix: one message over TLS and one in the clear delivered "
        f"{both_delivered:.1f} s after submission; with STARTTLS stripped, deferred"
    )
