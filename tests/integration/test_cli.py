"""
The C{userli-postfix} command against a real C{redis-server} and the fake
Userli, with a daemon running beside it on the same configuration: what
the command shows is what the daemon wrote, and what it changes the daemon
follows.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.fake_userli import TOKEN, FakeUserliServer
from tests.integration.conftest import StartDaemon
from tests.integration.harness import (
    STARTUP_DEADLINE,
    Daemon,
    RedisServer,
    daemon_environment,
    free_port,
    socketmap_query,
)
from tests.integration.test_policy_redis import message, policy_query, wait_for_daemons
from tests.integration.test_sentinel import MASTER_NAME, SentinelServer

pytestmark = pytest.mark.integration

LIMITED = "limited@example.org"
REJECT = "REJECT Rate limit exceeded, please try again later"
# Longer than the near-cache's lifetime today (5 s), with room for a slow machine.
FOLLOW_DEADLINE = 15.0


def cli(env: Mapping[str, str | None], *arguments: str) -> subprocess.CompletedProcess[str]:
    """Run C{userli-postfix ARGUMENTS} with this Python and C{env} as its environment."""
    return subprocess.run(
        [sys.executable, "-m", "userli_postfix.cli", *arguments],
        env=daemon_environment(env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=STARTUP_DEADLINE * 2,
        check=False,
    )


def cli_json(env: Mapping[str, str | None], *arguments: str) -> tuple[int, dict[str, Any]]:
    """Run with C{--json}: the exit status and the one document on stdout."""
    result = cli(env, *arguments, "--json")
    return result.returncode, json.loads(result.stdout)


def send(daemon: Daemon, count: int, identity: str = LIMITED) -> list[str]:
    """C{count} messages of C{identity} through the daemon's policy listener."""
    assert daemon.policy is not None
    return policy_query(daemon.policy, [message(identity)] * count)


def test_quota_show_reports_the_daemons_windows(
    start_daemon: StartDaemon, redis_server: RedisServer
) -> None:
    """
    C{quota show} reports the messages the daemon counted (Go layout in
    Redis), the limits from Userli, and that the next message waits.
    """
    daemon = start_daemon(redis=redis_server)
    wait_for_daemons(redis_server, 1)
    assert send(daemon, 2) == ["DUNNO", "DUNNO"]
    status, document = cli_json(daemon.env, "quota", "show", "Limited@Example.org")
    assert status == 0, document
    assert document["identity"] == LIMITED
    assert document["limits"] == {"per_hour": 2, "per_day": 3}
    assert document["window"] == {
        "key": f"userli:ratelimit:sender:{LIMITED}",
        "hour": 2,
        "day": 2,
    }
    # Two of two this hour: the next one is accepted only when the first leaves the hour.
    assert 3500 < document["next_accepted_in"] <= 3600

    readable = cli(daemon.env, "quota", "show", LIMITED)
    assert readable.returncode == 0
    assert "counted: 2 in the last hour, 2 in the last day" in readable.stdout


def test_quota_reset_lets_the_next_message_through(
    start_daemon: StartDaemon, redis_server: RedisServer
) -> None:
    """
    After C{quota reset} the daemon accepts the sender's next message; the
    reset is logged (stderr), and a second reset finds nothing (exit 1).
    """
    daemon = start_daemon(redis=redis_server)
    wait_for_daemons(redis_server, 1)
    assert send(daemon, 3) == ["DUNNO", "DUNNO", REJECT]
    result = cli(daemon.env, "quota", "reset", LIMITED)
    assert result.returncode == 0, result.stderr
    assert f"Reset {LIMITED}: 3 message(s) forgotten" in result.stdout
    assert f"Sending-quota windows of {LIMITED} reset by" in result.stderr
    assert send(daemon, 1) == ["DUNNO"]
    assert redis_server.command("ZCARD", f"userli:ratelimit:sender:{LIMITED}") == 1
    again = cli(daemon.env, "quota", "reset", "alice@example.org")
    assert again.returncode == 1
    assert "nothing to reset" in again.stdout


def alias_requests(fake_userli: FakeUserliServer, key: str) -> int:
    return [r.key for r in fake_userli.requests("alias")].count(key)


def test_lookup_and_cache_drop(
    start_daemon: StartDaemon, redis_server: RedisServer, fake_userli: FakeUserliServer
) -> None:
    """
    C{lookup} shows the answer the daemon cached and its lifetime; after
    C{cache drop} the daemon's next lookup asks Userli again (at once with
    a near-cache that follows Redis, within the near-cache's lifetime
    otherwise: polled with a bounded wait).
    """
    daemon = start_daemon(redis=redis_server)
    wait_for_daemons(redis_server, 1)
    assert daemon.socketmap is not None
    key = "info@example.org"
    assert socketmap_query(daemon.socketmap, b"alias " + key.encode()) == [b"OK alice@example.org"]
    asked = alias_requests(fake_userli, key)
    assert asked == 1

    status, document = cli_json(daemon.env, "lookup", "alias", key)
    assert status == 0, document
    assert document["normalised"] == key
    assert document["cached"]["key"] == f"userli:lookup:alias:{key}"
    assert document["cached"]["reply"] == "OK alice@example.org"
    assert 0 < document["cached"]["ttl"] <= 300
    assert document["userli"] == "OK alice@example.org"
    assert document["reply"] == "OK alice@example.org"

    # What Userli says now is not what Postfix gets while the answer is cached.
    fake_userli.data.aliases[key] = ["bob@example.org"]
    status, document = cli_json(daemon.env, "lookup", "alias", key)
    assert document["userli"] == "OK bob@example.org"
    assert document["reply"] == "OK alice@example.org"
    before = alias_requests(fake_userli, key)

    result = cli(daemon.env, "cache", "drop", "alias", key)
    assert result.returncode == 0, result.stderr
    assert f"Dropped userli:lookup:alias:{key}" in result.stdout
    assert redis_server.command("EXISTS", f"userli:lookup:alias:{key}") == 0

    give_up = time.monotonic() + FOLLOW_DEADLINE
    reply = b""
    while alias_requests(fake_userli, key) == before:
        assert time.monotonic() < give_up, "the daemon never asked Userli again"
        [reply] = socketmap_query(daemon.socketmap, b"alias " + key.encode())
        time.sleep(0.1)
    [reply] = socketmap_query(daemon.socketmap, b"alias " + key.encode())
    assert reply == b"OK bob@example.org"

    missing = cli(daemon.env, "cache", "drop", "alias", "nobody@example.org")
    assert missing.returncode == 1
    assert "Nothing cached" in missing.stdout


def test_cache_flush(start_daemon: StartDaemon, redis_server: RedisServer) -> None:
    """
    C{cache flush MAP} removes that map's answers only; C{cache flush} all
    of them, and nothing else in Redis (the quota windows stay).
    """
    daemon = start_daemon(redis=redis_server)
    wait_for_daemons(redis_server, 1)
    assert daemon.socketmap is not None
    socketmap_query(
        daemon.socketmap,
        [b"domain example.org", b"alias info@example.org", b"mailbox alice@example.org"],
    )
    send(daemon, 1)

    def keys(pattern: str) -> list[str]:
        found = redis_server.command("KEYS", pattern)
        assert isinstance(found, list)
        return sorted(str(k) for k in found)

    assert len(keys("userli:lookup:*")) == 3
    status, document = cli_json(daemon.env, "cache", "flush", "domain")
    assert status == 0
    assert document["removed"] == 1
    assert keys("userli:lookup:*") == [
        "userli:lookup:alias:info@example.org",
        "userli:lookup:mailbox:alice@example.org",
    ]
    result = cli(daemon.env, "cache", "flush")
    assert result.returncode == 0
    assert "Dropped 2 cached answer(s)" in result.stdout
    assert keys("userli:lookup:*") == []
    assert keys("userli:ratelimit:*") == [f"userli:ratelimit:sender:{LIMITED}"]


def test_check_all_well(start_daemon: StartDaemon, redis_server: RedisServer) -> None:
    """
    C{check} with the daemon's configuration: exit 0, Userli and Redis
    reached, client tracking tried, the Postfix lines for the daemon's
    listeners; the token is never printed.
    """
    daemon = start_daemon(redis=redis_server)
    result = cli(daemon.env, "check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert TOKEN not in result.stdout + result.stderr
    assert "reached, the token is accepted" in result.stdout
    assert "client tracking: works" in result.stdout
    assert daemon.policy is not None
    host, port = daemon.policy
    assert f"userli_policy = check_policy_service inet:{host}:{port}" in result.stdout
    status, document = cli_json(daemon.env, "check")
    assert status == 0
    assert document["redis"]["version"]
    assert document["redis"]["tracking"] == {"ok": True}
    assert document["configuration"]["USERLI_TOKEN"] == "(set, not shown)"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"USERLI_TOKEN": "wrong-secret-token"}, "HTTP 401"),
        ({"USERLI_BASE_URL": "http://127.0.0.1:{port}"}, "not reachable"),
        ({"REDIS_URL": "redis://127.0.0.1:{port}/0"}, "Redis not reachable"),
    ],
)
def test_check_fails(
    start_daemon: StartDaemon,
    redis_server: RedisServer,
    change: dict[str, str],
    reason: str,
) -> None:
    """
    C{check} exits 1 with the reason for a wrong token, an unreachable
    Userli and an unreachable Redis, and never prints the token.
    """
    daemon = start_daemon(redis=redis_server)
    port = free_port()
    env = {**daemon.env, **{k: v.format(port=port) for k, v in change.items()}}
    result = cli(env, "check")
    assert result.returncode == 1, result.stdout + result.stderr
    assert reason in result.stdout
    assert "FAILED" in result.stdout
    for token in (TOKEN, "wrong-secret-token"):
        assert token not in result.stdout + result.stderr
    json_result = cli(env, "check", "--json")
    assert json_result.returncode == 1
    assert json.loads(json_result.stdout)["ok"] is False
    for token in (TOKEN, "wrong-secret-token"):
        assert token not in json_result.stdout + json_result.stderr


def test_configuration_errors(tmp_path: Path, fake_userli: FakeUserliServer) -> None:
    """
    A bad setting exits 2 with one line naming the variable, for every
    command; without Redis, the commands that need it exit 2 saying so.
    """
    env = {"USERLI_TOKEN": TOKEN, "USERLI_BASE_URL": fake_userli.url}
    for change, variable in [
        ({"RATE_LIMIT_ACTION": "DISCARD"}, "RATE_LIMIT_ACTION"),
        ({"REDIS_URL": "memcached://x"}, "REDIS_URL"),
        ({"USERLI_TOKEN": ""}, "USERLI_TOKEN"),
    ]:
        for command in (["check"], ["quota", "show", LIMITED]):
            result = cli({**env, **change}, *command)
            assert result.returncode == 2, (change, command)
            assert result.stderr.startswith(f"userli-postfix: configuration error: {variable}: ")
            assert result.stderr.count("\n") == 1
    result = cli(env, "cache", "flush")
    assert result.returncode == 2
    assert "REDIS_URL is not set" in result.stderr
    assert cli(env, "lookup", "nomap", "x").returncode == 2


def test_console_script_installed() -> None:
    """The package installs the C{userli-postfix} command beside the twistd plugin."""
    script = Path(sys.executable).parent / "userli-postfix"
    if not script.exists():
        pytest.skip("the package is not installed in this Python's environment")
    result = subprocess.run(
        [str(script), "quota", "show", "--help"],
        capture_output=True,
        text=True,
        timeout=STARTUP_DEADLINE,
        check=False,
    )
    assert result.returncode == 0
    assert "--json" in result.stdout


def test_redis_down_midway(tmp_path: Path, fake_userli: FakeUserliServer) -> None:
    """
    A command that cannot reach Redis exits 1 with one line saying so, not
    a traceback.
    """
    env = {
        "USERLI_TOKEN": TOKEN,
        "USERLI_BASE_URL": fake_userli.url,
        "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
    }
    result = cli(env, "quota", "reset", LIMITED)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("userli-postfix: quota reset: Redis not reachable within")
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(shutil.which("redis-sentinel") is None, reason="redis-sentinel missing")
def test_check_names_the_sentinel_master(
    tmp_path: Path, redis_server: RedisServer, fake_userli: FakeUserliServer
) -> None:
    """With Sentinels configured, C{check} shows the master they name, and reaches it."""
    sentinel = SentinelServer(tmp_path / "sentinel", redis_server.port, quorum=1)
    sentinel.start()
    try:
        env = {
            "USERLI_TOKEN": TOKEN,
            "USERLI_BASE_URL": fake_userli.url,
            "REDIS_SENTINEL_ADDRS": f"127.0.0.1:{sentinel.port}",
            "REDIS_SENTINEL_MASTER": MASTER_NAME,
        }
        status, document = cli_json(env, "check")
        assert status == 0, document
        assert document["redis"]["sentinel_master"] == f"127.0.0.1:{redis_server.port}"
        assert document["redis"]["role"] == "master"
    finally:
        sentinel.stop()


def test_check_without_client_tracking(tmp_path: Path, fake_userli: FakeUserliServer) -> None:
    """
    A Redis whose C{CLIENT} command is renamed away: C{check} says client
    tracking is not available, and why; Redis itself is still reached.
    """
    redis = RedisServer(tmp_path / "redis", arguments=["--rename-command", "CLIENT", ""])
    redis.start()
    try:
        env = {"USERLI_TOKEN": TOKEN, "USERLI_BASE_URL": fake_userli.url, "REDIS_URL": redis.url}
        status, document = cli_json(env, "check")
        assert document["redis"]["ok"] is True
        assert document["redis"]["tracking"]["ok"] is False
        assert "unknown command" in document["redis"]["tracking"]["detail"].lower()
        assert status == 0, document
    finally:
        redis.stop()


def test_check_fails_on_a_replica(
    tmp_path: Path, redis_server: RedisServer, fake_userli: FakeUserliServer
) -> None:
    """C{REDIS_URL} naming a replica: C{check} fails, as the daemon could not write there."""
    replica = RedisServer(
        tmp_path / "replica", arguments=["--replicaof", "127.0.0.1", str(redis_server.port)]
    )
    replica.start()
    try:
        env = {"USERLI_TOKEN": TOKEN, "USERLI_BASE_URL": fake_userli.url, "REDIS_URL": replica.url}
        result = cli(env, "check")
        assert result.returncode == 1, result.stdout
        assert "Redis is a replica (role slave)" in result.stdout
    finally:
        replica.stop()
