"""
The C{tls_policy} map through the running daemon: a real C{redis-server},
a C{twisted.names} DNS server with the test zone below, and fake mail
exchangers on loopback addresses (L{tests.integration.fake_mx}), asked
over the socketmap listener by C{postmap} or raw netstrings.

What is pinned: C{OK encrypt} only when every mail server that answered
completed a TLS handshake; the verdicts cached in Redis with their
lifetimes, a probe that reached nobody not cached; Postfix answered within
the 5 s deadline while a slow probe goes on and fills the cache; hostile
servers bounded and the rest of the daemon unaffected; Redis down is
C{NOTFOUND}; the metrics.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.fake_userli import FakeUserliServer
from tests.integration.conftest import DOMAIN, StartDaemon, userli_data
from tests.integration.fake_mx import (
    Behaviour,
    FakeDNS,
    FakeMX,
    LoopbackBlock,
    Zone,
    address_record,
    has_ipv6_loopback,
    mail_domain,
    mx,
)
from tests.integration.harness import (
    Daemon,
    RedisServer,
    postmap,
    socketmap_query,
    wait_for,
    wait_for_redis,
)
from tests.integration.test_cli import cli, cli_json
from tests.integration.test_policy_redis import metric
from userli_postfix.tlspolicy import MAX_PROBES

pytestmark = pytest.mark.integration

#: The name the module's daemon sends in EHLO.
EHLO_NAME = "probe.userli-postfix.test"
#: The verdicts' lifetimes of the module's daemon (not the defaults, so
#: that the variables are seen to work).
TTL_TLS, TTL_NOTLS = 3 * 3600, 90 * 60
#: The deadline within which Postfix gets an answer (the issue's 5 s), and
#: the margin a busy machine may add to it.
ANSWER_DEADLINE, MARGIN = 5.0, 2.0
#: How long the slow fake waits before the banner and each reply: three of
#: them outlast the answer deadline, each one stays within a probe's step.
SLOW_DELAY = 2.0

#: The mail exchangers: host number in the loopback block -> behaviour.
#: A number that is not here (REFUSING) has no fake: connections are refused.
HOSTS = {
    1: Behaviour.TLS,
    2: Behaviour.NO_TLS,
    3: Behaviour.BROKEN_TLS,
    4: Behaviour.TLS,
    5: Behaviour.NO_TLS,
    7: Behaviour.TLS,
    9: Behaviour.TLS,
    10: Behaviour.TLS,
    11: Behaviour.TLS,
    12: Behaviour.NO_TLS,
    13: Behaviour.SILENT,
    14: Behaviour.ENDLESS_BANNER,
    15: Behaviour.NO_CRLF,
    16: Behaviour.HUGE_EHLO,
    17: Behaviour.SLOW,
    18: Behaviour.TLS,
    19: Behaviour.NO_TLS,
    20: Behaviour.SILENT,
    21: Behaviour.TLS,
    22: Behaviour.NO_TLS,
    23: Behaviour.TLS,
    24: Behaviour.TLS,
}
REFUSING, REFUSING_TOO = 6, 8
V6 = "::1"

#: Domain -> its MX hosts (preference, host number), in the order the zone
#: lists them.
DOMAINS: dict[str, tuple[tuple[int, int | str], ...]] = {
    "tls.test": ((10, 1),),
    "notls.test": ((10, 2),),
    "broken.test": ((10, 3),),
    # The most preferred server does TLS, the other does not.
    "mixed.test": ((10, 4), (20, 5)),
    # The most preferred server refuses connections; the other does TLS.
    "fallback.test": ((10, REFUSING), (20, 7)),
    "down.test": ((10, REFUSING), (20, REFUSING_TOO)),
    # Three servers, listed out of order: the two most preferred do TLS,
    # the third (never to be probed) does not.
    "three.test": ((30, 12), (10, 10), (20, 11)),
    "v6.test": ((10, V6),),
    "silent.test": ((10, 13),),
    "endless.test": ((10, 14),),
    "nocrlf.test": ((10, 15),),
    "huge.test": ((10, 16),),
    "slow.test": ((10, 17),),
    # For the tests with a daemon of their own.
    "other-tls.test": ((10, 18),),
    "other-notls.test": ((10, 19),),
    "other-down.test": ((10, REFUSING),),
    "cli.test": ((10, 21), (20, 22)),
    "memory.test": ((10, 23),),
    "command.test": ((10, 24),),
    # Probes that run until their step timeout, as many as may run at once.
    **{f"busy{i}.test": ((10, 20),) for i in range(MAX_PROBES + 1)},
}
HOSTILE = ("silent.test", "endless.test", "nocrlf.test", "huge.test")


@dataclass(frozen=True)
class World:
    """The DNS server and the mail exchangers of this module's tests."""

    block: LoopbackBlock
    dns: FakeDNS
    mx: FakeMX

    def address(self, host: int | str) -> str:
        return host if isinstance(host, str) else self.block.address(host)

    def host(self, domain: str, preference: int = 10) -> str:
        """The address of C{domain}'s MX of C{preference}."""
        return self.address(dict(DOMAINS[domain])[preference])

    def env(self) -> dict[str, str | None]:
        """What points a daemon at this world."""
        return {
            "TLS_POLICY_NAMESERVERS": self.dns.nameservers,
            "TLS_POLICY_SMTP_PORT": str(self.mx.port),
        }


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    """L{HOSTS} in a loopback block of their own, L{DOMAINS} in the test zone."""
    block = LoopbackBlock()
    behaviours = {block.address(n): b for n, b in HOSTS.items()}
    if has_ipv6_loopback():
        behaviours[V6] = Behaviour.TLS
    records: dict[str, list[object]] = {
        # No MX: mail goes to the domain's own address, which does TLS.
        "nomx.test": [address_record(block.address(9))],
        # RFC 7505: this domain takes no mail.
        "null.test": [mx(0, ".")],
    }
    for domain, exchangers in DOMAINS.items():
        addresses = [
            (p, host if isinstance(host, str) else block.address(host)) for p, host in exchangers
        ]
        records.update(mail_domain(domain, *addresses))
    zone = Zone("test", records)
    with FakeDNS(zone, [("127.0.0.1", 0)]) as dns, FakeMX(behaviours) as mx_hosts:
        mx_hosts.set_behaviour(block.address(17), Behaviour.SLOW, delay=SLOW_DELAY)
        yield World(block, dns, mx_hosts)


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """The module daemon's Redis, where its verdicts are read back."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def daemon(
    world: World, redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Daemon]:
    """
    One daemon for the tests that each ask about domains of their own (a
    daemon per test would cost more than all their probes): Redis, this
    world, a chosen EHLO name and lifetimes.
    """
    with FakeUserliServer(userli_data()) as userli:
        env: dict[str, str | None] = {
            "USERLI_BASE_URL": userli.url,
            "REDIS_URL": redis.url,
            "TLS_POLICY_EHLO_HOSTNAME": EHLO_NAME,
            "TLS_POLICY_CACHE_TTL_TLS": "3h",
            "TLS_POLICY_CACHE_TTL_NOTLS": "90m",
            **world.env(),
        }
        with Daemon(env, tmp_path_factory.mktemp("daemon")) as running:
            wait_for_redis(redis, running)
            yield running


def ask(daemon: Daemon, key: str) -> bytes:
    """The daemon's raw reply to C{tls_policy KEY}."""
    assert daemon.socketmap is not None
    return socketmap_query(daemon.socketmap, f"tls_policy {key}".encode())[0]


def cached(redis: RedisServer, domain: str) -> tuple[object, int]:
    """The verdict kept in Redis for C{domain}, and its lifetime left (ms; -2: no key)."""
    key = f"userli:tlspolicy:domain:{domain}"
    return redis.command("GET", key), int(str(redis.command("PTTL", key)))


def assert_lifetime(left_ms: int, ttl: int) -> None:
    """C{left_ms} is a lifetime of C{ttl} seconds, just set."""
    assert (ttl - 60) * 1000 < left_ms <= ttl * 1000, (left_ms, ttl)


@dataclass(frozen=True)
class Case:
    domain: str
    reply: bytes
    verdict: str | None


VERDICTS = [
    Case("tls.test", b"OK encrypt", "encrypt"),
    Case("notls.test", b"NOTFOUND ", "notls"),
    # STARTTLS offered, handshake failing: not a server to require TLS of.
    Case("broken.test", b"NOTFOUND ", "notls"),
    # Every server that answered must do TLS, not just one.
    Case("mixed.test", b"NOTFOUND ", "notls"),
    # A refusing server counts neither way.
    Case("fallback.test", b"OK encrypt", "encrypt"),
    # Nobody reached: an error, not cached.
    Case("down.test", b"NOTFOUND ", None),
    Case("nomx.test", b"OK encrypt", "encrypt"),
    Case("three.test", b"OK encrypt", "encrypt"),
    Case("nxdomain.test", b"NOTFOUND ", None),
]


@pytest.mark.parametrize("case", VERDICTS, ids=[c.domain for c in VERDICTS])
def test_verdict(case: Case, world: World, daemon: Daemon, redis: RedisServer) -> None:
    """
    The answer for each kind of domain, through C{postmap} as Postfix asks;
    the verdict cached with its lifetime (or nothing cached); the next
    question answered from the cache without a new probe.
    """
    target = daemon.socketmap_target("tls_policy")
    status, out, err = postmap(case.domain, target)
    if case.reply == b"OK encrypt":
        assert (status, out) == (0, "encrypt\n"), (status, out, err, daemon.output()[-3000:])
    else:
        assert (status, out) == (1, ""), (status, out, err)
        assert "error" not in err, err
    value, left = cached(redis, case.domain)
    if case.verdict is None:
        assert (value, left) == (None, -2)
    else:
        assert value == case.verdict
        assert_lifetime(left, TTL_TLS if case.verdict == "encrypt" else TTL_NOTLS)
        hits = metric(
            daemon.metrics_url, "tls_policy_cache_hits_total", f'{{result="{case.verdict}"}}'
        )
        sessions = len(world.mx.all_sessions())
        assert ask(daemon, case.domain) == case.reply
        assert len(world.mx.all_sessions()) == sessions
        assert (
            metric(
                daemon.metrics_url, "tls_policy_cache_hits_total", f'{{result="{case.verdict}"}}'
            )
            == hits + 1
        )


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback here")
def test_ipv6_only_server(world: World, daemon: Daemon, redis: RedisServer) -> None:
    """A mail server with an AAAA record only is probed over IPv6."""
    assert ask(daemon, "v6.test") == b"OK encrypt"
    # The fake notes the handshake once the client's last message is in,
    # which may be after the client has answered: wait for the end.
    (session,) = world.mx.wait_for_sessions(V6)
    assert session.handshake
    assert cached(redis, "v6.test")[0] == "encrypt"


def test_probe_conversation(world: World, daemon: Daemon) -> None:
    """
    What a mail server sees of a probe: C{EHLO} with the configured name,
    C{STARTTLS} when offered, a completed handshake, C{QUIT}, and never a
    message.
    """
    for domain in ("tls.test", "notls.test", "broken.test"):
        ask(daemon, domain)
    (tls,) = world.mx.wait_for_sessions(world.host("tls.test"))
    assert tls.ehlo == (EHLO_NAME,)
    assert tls.starttls and tls.handshake and tls.quit
    assert tls.tls_version in ("TLSv1.2", "TLSv1.3")
    (plain,) = world.mx.wait_for_sessions(world.host("notls.test"))
    assert plain.ehlo == (EHLO_NAME,)
    assert not plain.starttls and plain.quit
    (broken,) = world.mx.wait_for_sessions(world.host("broken.test"))
    assert broken.starttls and not broken.handshake
    assert all(not s.messages for s in world.mx.all_sessions())


def test_mx_choice(world: World, daemon: Daemon) -> None:
    """
    At most two mail servers, the most preferred first; every answering
    one probed (not just the first with TLS); a refusing one skipped.
    """
    for domain in ("three.test", "mixed.test", "fallback.test"):
        ask(daemon, domain)
    assert len(world.mx.wait_for_sessions(world.host("three.test", 10))) == 1
    assert len(world.mx.wait_for_sessions(world.host("three.test", 20))) == 1
    assert world.mx.sessions(world.host("three.test", 30)) == []
    # mixed.test: its TLS server answered first, the other was asked all the same.
    assert len(world.mx.wait_for_sessions(world.host("mixed.test", 20))) == 1
    assert len(world.mx.wait_for_sessions(world.host("fallback.test", 20))) == 1


def test_null_mx_not_probed(world: World, daemon: Daemon) -> None:
    """A domain that takes no mail (null MX) is NOTFOUND without any connection."""
    sessions = len(world.mx.all_sessions())
    assert ask(daemon, "null.test") == b"NOTFOUND "
    assert len(world.mx.all_sessions()) == sessions


def test_keys(world: World, daemon: Daemon, redis: RedisServer) -> None:
    """
    An address stands for the domain after its last C{@}; case and a
    trailing dot do not matter; a key that cannot be a domain (Postfix asks
    C{.parent} keys too) is C{NOTFOUND} without a DNS query.
    """
    assert ask(daemon, "Someone@Else@TLS.Test.") == b"OK encrypt"
    assert cached(redis, "tls.test")[0] == "encrypt"
    asked = len(world.dns.queries())
    for key in (".test", "not a domain", "[127.0.0.1]", "a..test", "x" * 300 + ".test", "user@"):
        assert ask(daemon, key) == b"NOTFOUND ", key
    assert world.dns.queries()[asked:] == []
    assert redis.command("KEYS", "userli:tlspolicy:domain:.*") == []


def test_slow_and_hostile_servers(world: World, daemon: Daemon, redis: RedisServer) -> None:
    """
    Deliveries to a slow server and to hostile ones (silent, a banner that
    never ends, no line end, megabytes of extensions), all at once:

     - Postfix is answered NOTFOUND within the deadline every time, and
       other lookups are answered meanwhile;
     - the slow probe, shared by the three deliveries that ask for its
       domain, goes on after the deadline and its verdict is cached: the
       next delivery gets C{OK encrypt};
     - the daemon closes every hostile connection (the silent one after its
       step timeout), and no hostile domain is cached as C{encrypt}.
    """
    assert daemon.socketmap is not None
    address = daemon.socketmap
    replies: list[tuple[str, bytes, float]] = []

    def deliver(domain: str) -> None:
        started = time.monotonic()
        reply = socketmap_query(address, f"tls_policy {domain}".encode())[0]
        replies.append((domain, reply, time.monotonic() - started))

    domains = ("slow.test", "slow.test", "slow.test", *HOSTILE)
    askers = [threading.Thread(target=deliver, args=(d,)) for d in domains]
    for asker in askers:
        asker.start()
    for domain in ("slow.test", *HOSTILE):
        world.mx.wait_for_sessions(world.host(domain), condition=lambda s: True)
    during = time.monotonic()
    answers = socketmap_query(address, [f"alias info@{DOMAIN}".encode()] * 20)
    assert answers == [f"OK alice@{DOMAIN}".encode()] * 20
    aliases_took = time.monotonic() - during
    assert aliases_took < MARGIN
    for asker in askers:
        asker.join()
    assert sorted(domain for domain, _, _ in replies) == sorted(domains)
    assert {reply for _, reply, _ in replies} == {b"NOTFOUND "}
    assert all(took < ANSWER_DEADLINE + MARGIN for _, _, took in replies), replies

    wait_for(lambda: cached(redis, "slow.test")[0] == "encrypt", "the slow probe's verdict")
    verdict_after = time.monotonic() - during
    assert ask(daemon, "slow.test") == b"OK encrypt"
    (slow,) = world.mx.wait_for_sessions(world.host("slow.test"))
    assert slow.handshake

    closed = {}
    for hostile in ("endless.test", "nocrlf.test", "huge.test"):
        (session,) = world.mx.wait_for_sessions(world.host(hostile))
        assert session.peer_closed, session
        closed[hostile] = session.lasted
    # The huge EHLO reply ends in STARTTLS: the probe never got that far.
    (huge,) = world.mx.sessions(world.host("huge.test"))
    assert not huge.starttls
    (silent,) = world.mx.wait_for_sessions(world.host("silent.test"))
    assert silent.peer_closed and silent.sent == 0
    # "notls" for the one whose banner was fine (it answered, without
    # TLS), nothing for those that never finished theirs.
    for hostile in HOSTILE:
        assert cached(redis, hostile)[0] in (None, "notls")
    print(
        f"\ntls_policy, slow and hostile servers at once: {len(domains)} lookups answered "
        f"NOTFOUND within {max(took for _, _, took in replies):.2f} s; 20 alias lookups "
        f"meanwhile in {aliases_took * 1000:.0f} ms; the slow probe's verdict cached "
        f"{verdict_after:.1f} s after the burst (one probe, {slow.lasted:.1f} s); hostile "
        "connections closed after "
        + ", ".join(f"{d} {t * 1000:.0f} ms" for d, t in closed.items() if t is not None)
        + f", silent.test {silent.lasted:.1f} s"
    )


def test_redis_down(world: World, start_daemon: StartDaemon, redis_server: RedisServer) -> None:
    """Redis failing: NOTFOUND (Postfix's own level applies), never an error."""
    daemon = start_daemon(redis=redis_server, env=world.env())
    redis_server.stop()
    assert ask(daemon, "other-tls.test") == b"NOTFOUND "
    status, out, err = postmap("other-tls.test", daemon.socketmap_target("tls_policy"))
    assert (status, out) == (1, ""), err
    assert "error" not in err


def test_memory_cache_and_defaults(world: World, start_daemon: StartDaemon) -> None:
    """
    Without Redis the verdict is kept in memory: one probe for two
    questions.  The EHLO name defaults to this host's name.
    """
    daemon = start_daemon(env=world.env())
    assert ask(daemon, "memory.test") == b"OK encrypt"
    assert ask(daemon, "memory.test") == b"OK encrypt"
    sessions = world.mx.wait_for_sessions(world.host("memory.test"))
    assert len(sessions) == 1
    assert sessions[0].ehlo == (socket.getfqdn().rstrip("."),)
    assert metric(daemon.metrics_url, "tls_policy_cache_hits_total", '{result="encrypt"}') == 1


def test_metrics_and_default_lifetimes(
    world: World, start_daemon: StartDaemon, redis_server: RedisServer
) -> None:
    """
    The metrics count each probe by its result, each answer from the cache
    by its verdict, and time the probes; the default lifetimes are 168 h
    and 24 h.
    """
    daemon = start_daemon(redis=redis_server, env=world.env())
    for domain in ("other-tls.test", "other-notls.test", "other-down.test"):
        ask(daemon, domain)
    for domain in ("other-tls.test", "other-notls.test"):
        ask(daemon, domain)
    url = daemon.metrics_url
    prefix = "tls_policy_probe_total"
    assert metric(url, prefix, '{result="tls"}') == 1
    assert metric(url, prefix, '{result="notls"}') == 1
    assert metric(url, prefix, '{result="error"}') == 1
    assert metric(url, "tls_policy_cache_hits_total", '{result="encrypt"}') == 1
    assert metric(url, "tls_policy_cache_hits_total", '{result="notls"}') == 1
    assert metric(url, "tls_policy_probe_duration_seconds_count") == 3
    assert metric(url, "tls_policy_probe_duration_seconds_sum") > 0
    assert_lifetime(cached(redis_server, "other-tls.test")[1], 168 * 3600)
    assert_lifetime(cached(redis_server, "other-notls.test")[1], 24 * 3600)


def test_probes_bounded(world: World, start_daemon: StartDaemon) -> None:
    """
    At most C{MAX_PROBES} probes run at once: with that many hanging on a
    silent server, one more domain is answered NOTFOUND at once, without
    even a DNS query, while the others are answered at the deadline.
    """
    daemon = start_daemon(env=world.env())
    assert daemon.socketmap is not None
    address = daemon.socketmap
    busy = [f"tls_policy busy{i}.test".encode() for i in range(MAX_PROBES)]
    replies: list[bytes] = []
    asker = threading.Thread(target=lambda: replies.extend(socketmap_query(address, busy)))
    asker.start()
    world.mx.wait_for_sessions(world.address(20), MAX_PROBES, condition=lambda s: True)
    extra = f"busy{MAX_PROBES}.test"
    started = time.monotonic()
    assert ask(daemon, extra) == b"NOTFOUND "
    took = time.monotonic() - started
    assert asker.is_alive()
    asker.join()
    assert replies == [b"NOTFOUND "] * MAX_PROBES
    assert [name for name, _ in world.dns.queries() if name == extra] == []
    print(
        f"\ntls_policy bound: with {MAX_PROBES} probes hanging, one more domain "
        f"answered NOTFOUND in {took * 1000:.0f} ms, unprobed"
    )


def test_command(world: World, start_daemon: StartDaemon, redis_server: RedisServer) -> None:
    """
    C{userli-postfix tls-policy} shows what the daemon cached and for how
    long; C{--probe} shows each mail server with what it found (and stores
    nothing); C{cache drop tls_policy} makes the daemon probe again.
    """
    env = {**world.env(), "TLS_POLICY_EHLO_HOSTNAME": EHLO_NAME}
    daemon = start_daemon(redis=redis_server, env=env)
    assert ask(daemon, "command.test") == b"OK encrypt"
    tls_host = world.host("command.test")
    assert len(world.mx.wait_for_sessions(tls_host)) == 1

    shown = cli(daemon.env, "tls-policy", "Someone@Command.test")
    assert shown.returncode == 0, shown.stderr
    assert "domain: command.test" in shown.stdout
    assert re.search(
        r"cache: encrypt under userli:tlspolicy:domain:command\.test, for 16[78]h", shown.stdout
    ), shown.stdout
    assert "Postfix gets: OK encrypt" in shown.stdout

    # Not cached, one server with TLS and one without: NOTFOUND, and why.
    probed = cli(daemon.env, "tls-policy", "--probe", "cli.test")
    assert probed.returncode == 1, probed.stderr
    out = probed.stdout
    assert "cache: nothing under userli:tlspolicy:domain:cli.test" in out
    good, bad = world.host("cli.test", 10), world.host("cli.test", 20)
    assert re.search(
        rf"mx10\.cli\.test\n +{re.escape(good)}:\n +banner: 220 mx-{re.escape(good)} ESMTP fake\n"
        r" +STARTTLS offered: yes\n +handshake completed: yes\n +TLS: TLSv1\.[23], \S+",
        out,
    ), out
    assert re.search(
        rf"mx20\.cli\.test\n +{re.escape(bad)}:\n +banner: 220 mx-{re.escape(bad)} ESMTP fake\n"
        r" +STARTTLS offered: no\n +handshake completed: no",
        out,
    ), out
    assert "probe (" in out and "): notls" in out
    assert cached(redis_server, "cli.test") == (None, -2)
    (session,) = world.mx.wait_for_sessions(good)
    assert session.ehlo == (EHLO_NAME,) and session.handshake and session.quit

    # A server that refuses: the error, per address.
    status, document = cli_json(daemon.env, "tls-policy", "--probe", "other-down.test")
    assert status == 1
    assert document["probe"]["verdict"] is None
    (host,) = document["probe"]["hosts"]
    assert host["name"] == "mx10.other-down.test"
    assert host["addresses"][0]["address"] == world.address(REFUSING)
    assert "refused" in host["addresses"][0]["error"].lower(), host

    # Forgotten: the next delivery probes again.
    dropped = cli(daemon.env, "cache", "drop", "tls_policy", "Someone@Command.test.")
    assert dropped.returncode == 0, dropped.stdout + dropped.stderr
    assert cached(redis_server, "command.test") == (None, -2)
    assert ask(daemon, "command.test") == b"OK encrypt"
    assert len(world.mx.wait_for_sessions(tls_host, 2)) == 2
