"""
The remote-domain memory through the daemon, against the fake Userli
(which counts every call) and a real C{redis-server}: once Userli answered
``domain X`` with ``false``, questions about X (the domain, addresses in it
in every map, a sender's quota) are answered as before but without a call;
after C{REMOTE_DOMAIN_CACHE_TTL}, or at once after C{userli-postfix cache
drop domain X}, Userli is asked again; a failed call is never remembered;
every daemon on one Redis shares what one learned, and the Go program's
keys are left alone.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import pytest

from tests.fake_userli import EMPTY, ERROR, GARBAGE, NORMAL, SLOW, WRONG_TYPE, FakeUserliServer
from tests.integration.conftest import StartDaemon
from tests.integration.harness import Daemon, RedisServer, http_get, socketmap_query, wait_for
from tests.integration.test_cli import cli, cli_json
from tests.integration.test_policy_redis import message, policy_query

pytestmark = pytest.mark.integration

REMOTE = "remote.test"
MEMORY_KEY = f"userli:lookup:remote:{REMOTE}"
# Every map's question about the remote domain, in Postfix's and other spellings.
QUESTIONS = [
    b"alias someone@remote.test",
    b"mailbox someone@remote.test",
    b"senders someone@remote.test",
    b"alias Some.One@Remote.Test.",
    b"domain remote.test",
    b"domain REMOTE.test.",
]
# How long a change in Redis may take to reach the daemon's near-cache.
FOLLOW_DEADLINE = 10.0


def ask(daemon: Daemon, requests: list[bytes]) -> list[bytes]:
    assert daemon.socketmap is not None
    return socketmap_query(daemon.socketmap, requests)


def police(daemon: Daemon, sender: str) -> str:
    """The policy's action for one message of C{sender} (no login: port 25)."""
    assert daemon.policy is not None
    attributes = {**message(sender), "sasl_username": "", "sasl_method": ""}
    [action] = policy_query(daemon.policy, [attributes])
    return action


def calls(fake: FakeUserliServer) -> dict[str, int]:
    """Calls the fake Userli received, by endpoint."""
    counts: dict[str, int] = {}
    for request in fake.requests():
        endpoint = request.endpoint or "?"
        counts[endpoint] = counts.get(endpoint, 0) + 1
    return counts


def metric(daemon: Daemon, handler: str) -> float:
    status, body = http_get(daemon.metrics_url + "/metrics")
    assert status == 200
    match = re.search(
        rb'^userli_postfix_adapter_remote_domain_answers_total\{handler="'
        + handler.encode()
        + rb'"\} (\S+)$',
        body,
        re.M,
    )
    return float(match.group(1)) if match else 0.0


def learn(daemon: Daemon, fake: FakeUserliServer, redis: RedisServer | None = None) -> None:
    """
    Userli answers C{domain remote.test} with false; with C{redis}, wait
    until the daemon's write (sent after its reply) has landed there.
    """
    before = calls(fake).get("domain", 0)
    assert ask(daemon, [b"domain remote.test"]) == [b"NOTFOUND "]
    assert calls(fake).get("domain", 0) == before + 1
    if redis is not None:
        wait_for(lambda: redis.command("EXISTS", MEMORY_KEY) == 1, "the memory in Redis")


@pytest.mark.parametrize("with_redis", [True, False], ids=["redis", "memory"])
def test_no_calls_while_remembered(
    start_daemon: StartDaemon,
    redis_server: RedisServer,
    fake_userli: FakeUserliServer,
    with_redis: bool,
) -> None:
    """
    Before: every question about the domain is asked of Userli; once Userli
    said the domain is not its own, the same answers come without a call
    (counted in C{remote_domain_answers_total}).
    """
    daemon = start_daemon(redis=redis_server if with_redis else None)
    before = ask(daemon, QUESTIONS[:4])
    assert before == [b"NOTFOUND "] * 4
    quota_before = police(daemon, "stranger@remote.test")
    assert quota_before == "DUNNO"
    assert calls(fake_userli) == {"alias": 2, "mailbox": 1, "senders": 1, "smtp_quota": 1}
    learn(daemon, fake_userli, redis_server if with_redis else None)
    counted = calls(fake_userli)
    for _ in range(3):
        assert ask(daemon, QUESTIONS) == [b"NOTFOUND "] * len(QUESTIONS)
        assert police(daemon, "stranger@remote.test") == quota_before
        assert police(daemon, "Other@Remote.Test") == quota_before
    assert calls(fake_userli) == counted
    assert metric(daemon, "alias") == 6
    assert metric(daemon, "domain") == 6
    assert metric(daemon, "policy") == 6
    # Local keys are asked as before.
    assert ask(daemon, [b"mailbox nobody@example.org"]) == [b"NOTFOUND "]
    assert calls(fake_userli)["mailbox"] == counted["mailbox"] + 1


def test_asked_again_after_ttl(
    start_daemon: StartDaemon, redis_server: RedisServer, fake_userli: FakeUserliServer
) -> None:
    """
    The memory lasts C{REMOTE_DOMAIN_CACHE_TTL} in Redis; then Userli is
    asked again, and a domain Userli started hosting meanwhile is C{OK}.
    """
    daemon = start_daemon(redis=redis_server, env={"REMOTE_DOMAIN_CACHE_TTL": "3s"})
    learn(daemon, fake_userli, redis_server)
    ttl = redis_server.command("PTTL", MEMORY_KEY)
    assert isinstance(ttl, int) and ttl <= 3000
    fake_userli.data.domains.add(REMOTE)
    wait_for(
        lambda: ask(daemon, [b"domain remote.test"]) == [b"OK 1"],
        "the domain to be OK once the memory expired",
        deadline=FOLLOW_DEADLINE,
    )
    assert redis_server.command("EXISTS", MEMORY_KEY) == 0


def test_cache_drop_domain_forgets(
    start_daemon: StartDaemon, redis_server: RedisServer, fake_userli: FakeUserliServer
) -> None:
    """
    A domain that becomes Userli's while remembered is C{NOTFOUND} until
    C{userli-postfix cache drop domain X}, then C{OK} at once; C{lookup}
    says where the answer came from.
    """
    daemon = start_daemon(redis=redis_server)
    learn(daemon, fake_userli, redis_server)
    fake_userli.data.domains.add(REMOTE)
    assert ask(daemon, [b"domain remote.test"]) == [b"NOTFOUND "]
    assert calls(fake_userli)["domain"] == 1

    status, document = cli_json(daemon.env, "lookup", "alias", "someone@remote.test")
    assert status == 1, document
    assert document["source"] == "remote-domain memory"
    assert document["reply"] == "NOTFOUND"
    assert document["remote"]["key"] == MEMORY_KEY
    assert 0 < document["remote"]["ttl"] <= 60
    readable = cli(daemon.env, "lookup", "domain", REMOTE)
    assert "Userli now: OK 1" in readable.stdout
    assert "Postfix gets: NOTFOUND (from the remote-domain memory)" in readable.stdout

    dropped = cli(daemon.env, "cache", "drop", "domain", REMOTE)
    assert dropped.returncode == 0, dropped.stderr
    assert f"Dropped {MEMORY_KEY}" in dropped.stdout
    wait_for(
        lambda: ask(daemon, [b"domain remote.test"]) == [b"OK 1"],
        "the daemon to ask Userli again",
        deadline=FOLLOW_DEADLINE,
    )
    status, document = cli_json(daemon.env, "lookup", "domain", REMOTE)
    assert document["source"] == "cache"


def test_cache_flush_forgets(
    start_daemon: StartDaemon, redis_server: RedisServer, fake_userli: FakeUserliServer
) -> None:
    """C{cache flush domain} and C{cache flush} forget the remembered domains too."""
    daemon = start_daemon(redis=redis_server)
    for arguments in (("cache", "flush", "domain"), ("cache", "flush")):
        learn(daemon, fake_userli, redis_server)
        assert redis_server.command("EXISTS", MEMORY_KEY) == 1
        status, document = cli_json(daemon.env, *arguments)
        assert status == 0, document
        assert document["removed"] == 1
        assert redis_server.command("EXISTS", MEMORY_KEY) == 0
        before = calls(fake_userli).get("alias", 0)
        wait_for(
            lambda before=before: (
                ask(daemon, [b"alias a@remote.test"]) == [b"NOTFOUND "]
                and calls(fake_userli).get("alias", 0) > before
            ),
            "the daemon to ask Userli again",
            deadline=FOLLOW_DEADLINE,
        )


@pytest.mark.parametrize(
    ("mode", "delay"),
    [(ERROR, 0.0), (GARBAGE, 0.0), (WRONG_TYPE, 0.0), (EMPTY, 0.0), (SLOW, 6.0)],
    ids=["500", "garbage", "wrong-type", "empty", "timeout"],
)
def test_failed_call_not_remembered(
    start_daemon: StartDaemon,
    redis_server: RedisServer,
    fake_userli: FakeUserliServer,
    mode: str,
    delay: float,
) -> None:
    """A failed C{domain} call (500, garbage, timeout, ...) is C{TEMP} and remembers nothing."""
    daemon = start_daemon(redis=redis_server)
    fake_userli.set_mode(mode, delay)
    [reply] = ask(daemon, [b"domain remote.test"])
    assert reply.startswith(b"TEMP"), reply
    fake_userli.set_mode(NORMAL)
    assert redis_server.command("KEYS", "userli:lookup:*") == []
    assert ask(daemon, [b"alias a@remote.test"]) == [b"NOTFOUND "]
    assert calls(fake_userli).get("alias") == 1


def test_two_daemons_share_it(
    start_daemon: StartDaemon, redis_server: RedisServer, fake_userli: FakeUserliServer
) -> None:
    """
    What one daemon learned, another on the same Redis uses without a
    call; Redis holds it only under C{userli:lookup:remote:<domain>},
    never under the Go program's C{userli:lookup:domain:<domain>}.
    """
    first = start_daemon(redis=redis_server)
    second = start_daemon(redis=redis_server)
    learn(first, fake_userli, redis_server)
    counted = calls(fake_userli)
    assert ask(second, QUESTIONS) == [b"NOTFOUND "] * len(QUESTIONS)
    assert police(second, "stranger@remote.test") == "DUNNO"
    assert calls(fake_userli) == counted
    assert redis_server.command("KEYS", "userli:lookup:*") == [MEMORY_KEY]
    assert redis_server.command("GET", MEMORY_KEY) == "NOTFOUND"
    ttl = redis_server.command("TTL", MEMORY_KEY)
    assert isinstance(ttl, int) and 0 < ttl <= 60


def test_removed_in_redis_is_seen(
    start_daemon: StartDaemon, redis_server: RedisServer, fake_userli: FakeUserliServer
) -> None:
    """
    The daemon's copy follows Redis: when anyone deletes the entry, the
    next question about the domain asks Userli.
    """
    daemon = start_daemon(redis=redis_server)
    learn(daemon, fake_userli, redis_server)
    counted = calls(fake_userli)
    assert ask(daemon, QUESTIONS) == [b"NOTFOUND "] * len(QUESTIONS)
    assert calls(fake_userli) == counted
    redis_server.command("DEL", MEMORY_KEY)
    wait_for(
        lambda: (
            ask(daemon, [b"senders a@remote.test"]) == [b"NOTFOUND "]
            and calls(fake_userli).get("senders", 0) > 0
        ),
        "the next lookup to ask Userli",
        deadline=FOLLOW_DEADLINE,
    )


def test_off(start_daemon: StartDaemon, fake_userli: FakeUserliServer) -> None:
    """C{REMOTE_DOMAIN_CACHE_TTL=0}: every question asks Userli, as the Go program does."""
    env: Mapping[str, str] = {"REMOTE_DOMAIN_CACHE_TTL": "0"}
    daemon = start_daemon(env=env)
    learn(daemon, fake_userli)
    learn(daemon, fake_userli)
    assert ask(daemon, [b"alias a@remote.test"]) == [b"NOTFOUND "]
    assert calls(fake_userli) == {"domain": 2, "alias": 1}
