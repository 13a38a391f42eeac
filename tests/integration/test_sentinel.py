"""
Redis high availability: the daemon follows a Sentinel failover by itself.

A real master and replica (C{redis-server}) and three C{redis-sentinel}
processes (quorum 2) watch the master; the daemon knows only the Sentinels
(C{REDIS_SENTINEL_ADDRS}, C{REDIS_SENTINEL_MASTER}).  The master is killed
with SIGKILL while lookups and policy requests keep coming.  What must hold,
without restarting the daemon:

 - every lookup is answered, and answered right, throughout (the cache is
   only a cache: a dead Redis is a miss);
 - the policy service fails open (C{DUNNO}) while there is no master, and
   enforces quotas again on the new master, with the windows the replica
   received before the switch.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fake_userli import FakeUserliServer, UserliData
from tests.integration.clients import PolicyClient, SocketmapClient, end_of_message
from tests.integration.conftest import DOMAIN, StartDaemon, userli_data
from tests.integration.harness import (
    STARTUP_DEADLINE,
    Daemon,
    RedisServer,
    RespReader,
    encode_command,
    http_get,
    wait_for,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("redis-sentinel") is None, reason="redis-sentinel missing"),
]

MASTER_NAME = "mymaster"
#: How long Sentinels wait before they call a silent master down.  Short, so
#: the test is quick; the daemon must not depend on its value.
DOWN_AFTER_MS = 1000
#: How long the whole switch may take, from the kill until the daemon
#: enforces quotas on the new master: Sentinel's own failover (about
#: DOWN_AFTER_MS plus an election) and the daemon's reconnection.
SWITCH_DEADLINE = 45.0
#: How long after the promotion the daemon may still be looking for the new
#: master.  Sentinels answer in milliseconds; only the daemon's own
#: discovery timeout and reconnection backoff make this more than a moment.
FOLLOW_DEADLINE = 8.0

LIMITED = f"limited@{DOMAIN}"
#: A sender over quota from its first message: REJECT whenever the windows
#: are reachable, DUNNO whenever they are not.
OVER = f"over@{DOMAIN}"


class SentinelServer(RedisServer):
    """One C{redis-sentinel} watching a master, with a writable config file."""

    def __init__(self, directory: Path, master_port: int, quorum: int = 2) -> None:
        super().__init__(directory)
        self.config = self.directory / "sentinel.conf"
        self.config.write_text(
            f"port {self.port}\n"
            "bind 127.0.0.1\n"
            f"dir {self.directory}\n"
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} {quorum}\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {MASTER_NAME} 10000\n"
            f"sentinel parallel-syncs {MASTER_NAME} 1\n"
        )
        self._sentinel: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._sentinel is not None and self._sentinel.poll() is None

    def start(self) -> None:
        with open(self.directory / "sentinel.log", "ab") as log:
            self._sentinel = subprocess.Popen(
                ["redis-sentinel", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

        def answers() -> bool:
            if not self.running:
                raise RuntimeError(f"redis-sentinel exited; see {self.directory}")
            try:
                return self.command("PING") == "PONG"
            except OSError:
                return False

        wait_for(answers, f"redis-sentinel on port {self.port}")

    def stop(self) -> None:
        if self._sentinel is not None and self._sentinel.poll() is None:
            self._sentinel.kill()
            self._sentinel.wait()
        self._sentinel = None

    def master(self) -> tuple[str, int] | None:
        """Where this Sentinel says the master is."""
        reply = self.command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
        if not isinstance(reply, list):
            return None
        return str(reply[0]), int(str(reply[1]))

    def knows(self, replicas: int, sentinels: int) -> bool:
        """Whether it has found the replicas and the other Sentinels yet."""
        found_replicas = self.command("SENTINEL", "REPLICAS", MASTER_NAME)
        found_sentinels = self.command("SENTINEL", "SENTINELS", MASTER_NAME)
        assert isinstance(found_replicas, list) and isinstance(found_sentinels, list)
        return len(found_replicas) >= replicas and len(found_sentinels) >= sentinels


@dataclass
class Group:
    master: RedisServer
    replica: RedisServer
    sentinels: list[SentinelServer]

    @property
    def addresses(self) -> str:
        return ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)


def replication_up(replica: RedisServer) -> bool:
    info = str(replica.command("INFO", "replication"))
    return "master_link_status:up" in info


@pytest.fixture
def group(tmp_path: Path) -> Iterator[Group]:
    """A master, its replica, and three Sentinels that know both and each other."""
    master = RedisServer(tmp_path / "master")
    master.start()
    replica = RedisServer(
        tmp_path / "replica", arguments=["--replicaof", "127.0.0.1", str(master.port)]
    )
    sentinels = [SentinelServer(tmp_path / f"sentinel-{i}", master.port) for i in range(3)]
    try:
        replica.start()
        wait_for(lambda: replication_up(replica), "the replica to sync")
        for sentinel in sentinels:
            sentinel.start()
        # Sentinels find the replica through INFO and each other through
        # hello messages every 2 s; a failover needs both.
        wait_for(
            lambda: all(s.knows(replicas=1, sentinels=2) for s in sentinels),
            "the Sentinels to discover the replica and each other",
        )
        yield Group(master, replica, sentinels)
    finally:
        for sentinel in sentinels:
            sentinel.stop()
        replica.stop()
        master.kill()


@dataclass
class Answer:
    started: float
    finished: float
    reply: str


class Traffic:
    """
    Lookups and policy requests from two threads, each on its own kept-open
    connection (a new one when the daemon closes it), every answer recorded
    with its times.
    """

    def __init__(self, socketmap: tuple[str, int], policy: tuple[str, int]) -> None:
        self.socketmap = socketmap
        self.policy = policy
        self.lookups: list[Answer] = []
        self.policies: list[Answer] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(self._lookup,), daemon=True),
            threading.Thread(target=self._run, args=(self._police,), daemon=True),
        ]

    def _lookup(self) -> None:
        with SocketmapClient(self.socketmap) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                reply = client.ask(b"alias info@" + DOMAIN.encode()).decode()
                self.lookups.append(Answer(started, time.monotonic(), reply))
                time.sleep(0.02)

    def _police(self) -> None:
        with PolicyClient(self.policy) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                action = client.ask(end_of_message(OVER))
                self.policies.append(Answer(started, time.monotonic(), action))
                time.sleep(0.05)

    def _run(self, loop: object) -> None:
        while not self._stop.is_set():
            try:
                loop()  # type: ignore[operator]
            except ConnectionError:
                continue
            except BaseException as error:  # recorded, the test fails on it
                self.errors.append(error)
                return

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=STARTUP_DEADLINE)


def test_failover(group: Group, fake_userli: FakeUserliServer, start_daemon: StartDaemon) -> None:
    """
    The master dies under traffic: lookups stay right, the policy service
    fails open during the switch and then enforces the replicated windows
    on the new master; the daemon is never restarted.
    """
    data: UserliData = userli_data()
    data.users[OVER] = "over-password"
    data.quotas[OVER] = (1, 1)
    fake_userli.set_data(data)
    daemon = start_daemon(
        env={
            "REDIS_SENTINEL_ADDRS": group.addresses,
            "REDIS_SENTINEL_MASTER": MASTER_NAME,
            "QUOTA_CACHE_TTL": "5m",
        }
    )
    assert daemon.socketmap is not None and not isinstance(daemon.socketmap, str)
    assert daemon.policy is not None
    pid = daemon.pid

    # Once a lookup has been cached on the master, the daemon has found it
    # through the Sentinels.
    cached = f"userli:lookup:alias:info@{DOMAIN}"

    def found_master() -> bool:
        with SocketmapClient(daemon.socketmap) as client:  # type: ignore[arg-type]
            assert client.ask(b"alias info@" + DOMAIN.encode()) == b"OK alice@" + DOMAIN.encode()
        return group.master.command("GET", cached) is not None

    wait_for(found_master, "the daemon to use the master it got from the Sentinels")
    # The near-cache follows the master through the Sentinels too.
    wait_for(lambda: near_cache_coherent(daemon), "client tracking on the master")

    with PolicyClient(daemon.policy) as client:
        assert client.ask(end_of_message(LIMITED)) == "DUNNO"
        assert client.ask(end_of_message(LIMITED)) == "DUNNO"
        assert client.ask(end_of_message(OVER)) == "DUNNO"
        assert client.ask(end_of_message(OVER)).startswith("REJECT ")
    window = f"userli:ratelimit:sender:{LIMITED}"
    assert group.master.command("ZCARD", window) == 2
    # The replica has everything the master acknowledged.
    assert int(str(group.master.command("WAIT", 1, 5000))) == 1
    assert group.replica.command("ZCARD", window) == 2

    traffic = Traffic(daemon.socketmap, daemon.policy)
    traffic.start()
    try:
        wait_for(lambda: len(traffic.policies) >= 5, "policy traffic")
        killed = time.monotonic()
        group.master.kill()

        new_master = ("127.0.0.1", group.replica.port)
        wait_for(
            lambda: all(s.master() == new_master for s in group.sentinels),
            "the Sentinels to promote the replica",
            deadline=SWITCH_DEADLINE,
        )
        promoted = time.monotonic()

        def enforcing() -> bool:
            return any(
                a.started > promoted and a.reply.startswith("REJECT") for a in traffic.policies
            )

        wait_for(enforcing, "quotas enforced on the new master", deadline=SWITCH_DEADLINE)
        recovered = time.monotonic()
        # Some more traffic on the new master.
        count = len(traffic.lookups)
        wait_for(lambda: len(traffic.lookups) >= count + 20, "lookups after the switch")
    finally:
        traffic.stop()
    assert traffic.errors == []

    # Lookups: answered, and right, before, during and after the switch.
    assert traffic.lookups
    assert {a.reply for a in traffic.lookups} == {f"OK alice@{DOMAIN}"}
    assert any(killed < a.started < recovered for a in traffic.lookups)
    worst_lookup = max(a.finished - a.started for a in traffic.lookups)
    assert worst_lookup < 10.0

    # Policy: REJECT while a master is reachable, DUNNO (fail-open) while
    # none is, REJECT again once the daemon has found the new one.
    replies = {a.reply for a in traffic.policies}
    assert replies <= {"DUNNO", "REJECT Rate limit exceeded, please try again later"}
    assert all(a.reply != "DUNNO" for a in traffic.policies if a.finished < killed)
    assert any(a.reply == "DUNNO" for a in traffic.policies if killed < a.started < recovered)
    # Once back, it stays back.
    assert all(a.reply != "DUNNO" for a in traffic.policies if a.started > recovered)
    worst_policy = max(a.finished - a.started for a in traffic.policies)
    assert worst_policy < 10.0

    # The windows written before the switch are enforced on the new master:
    # LIMITED sent 2 of 2 this hour, so the third message is refused.
    with PolicyClient(daemon.policy) as client:
        assert client.ask(end_of_message(LIMITED)).startswith("REJECT ")
    assert group.replica.command("ZCARD", window) == 3

    # The daemon found the new master soon after the Sentinels named it.
    assert recovered - promoted < FOLLOW_DEADLINE, recovered - promoted

    # Client tracking is established on the new master: a change there
    # reaches the near-cache.
    wait_for(lambda: near_cache_coherent(daemon), "client tracking on the new master")
    group.replica.command("SET", cached, f"OK bob@{DOMAIN}", "EX", "300")

    def changed() -> bool:
        with SocketmapClient(daemon.socketmap) as client:  # type: ignore[arg-type]
            return client.ask(b"alias info@" + DOMAIN.encode()) == b"OK bob@" + DOMAIN.encode()

    wait_for(changed, "the change on the new master", deadline=5.0)

    # The same process all along.
    assert daemon.running and daemon.pid == pid
    fail_open = sum(1 for a in traffic.policies if a.reply == "DUNNO")
    print(
        f"\nSentinel failover: master killed; Sentinels promoted the replica after "
        f"{promoted - killed:.1f} s; quotas enforced again after {recovered - killed:.1f} s; "
        f"{len(traffic.lookups)} lookups and {len(traffic.policies)} policy requests answered "
        f"({fail_open} fail-open); worst answer {max(worst_lookup, worst_policy) * 1000:.0f} ms"
    )


def near_cache_coherent(daemon: Daemon) -> bool:
    """Whether the daemon's near-cache gauge says Redis reports every change."""
    status, body = http_get(daemon.metrics_url + "/metrics")
    assert status == 200
    return b"\nuserli_postfix_adapter_near_cache_coherent 1.0\n" in body


class LockedSentinel(SentinelServer):
    """A Sentinel that requires a password (C{requirepass}), asked with it."""

    PASSWORD = "sentinel-secret"

    def __init__(self, directory: Path, master_port: int) -> None:
        super().__init__(directory, master_port, quorum=1)
        with open(self.config, "a") as config:
            config.write(f"requirepass {self.PASSWORD}\n")

    @property
    def process_id(self) -> int:
        assert self._sentinel is not None
        return self._sentinel.pid

    def command(self, *args: str | bytes | int) -> object:
        with socket.create_connection(("127.0.0.1", self.port), timeout=5.0) as s:
            s.sendall(encode_command(("AUTH", self.PASSWORD)) + encode_command(args))
            reader = RespReader(s)
            assert reader.read() == "OK"
            return reader.read()


def test_sentinel_auth_hangs(
    tmp_path: Path, fake_userli: FakeUserliServer, start_daemon: StartDaemon
) -> None:
    """
    The only Sentinel is frozen when the daemon starts: it accepts the
    connection (the kernel does) but never answers its AUTH, which times
    out, again and again.  Once the Sentinel answers, the daemon finds
    the master by itself, without a restart: lookups are cached on it and
    the near-cache follows it.
    """
    master = RedisServer(tmp_path / "master")
    master.start()
    sentinel = LockedSentinel(tmp_path / "sentinel", master.port)
    try:
        sentinel.start()
        wait_for(lambda: sentinel.master() is not None, "the Sentinel to know the master")
        os.kill(sentinel.process_id, signal.SIGSTOP)
        daemon = start_daemon(
            env={
                "REDIS_SENTINEL_ADDRS": f"127.0.0.1:{sentinel.port}",
                "REDIS_SENTINEL_MASTER": MASTER_NAME,
                "REDIS_SENTINEL_PASSWORD": LockedSentinel.PASSWORD,
            }
        )
        assert daemon.socketmap is not None and not isinstance(daemon.socketmap, str)
        # Several AUTH timeouts (2 s each) while the Sentinel is frozen.
        time.sleep(7.0)
        os.kill(sentinel.process_id, signal.SIGCONT)
        thawed = time.monotonic()
        cached = f"userli:lookup:alias:info@{DOMAIN}"

        def found_master() -> bool:
            with SocketmapClient(daemon.socketmap) as client:  # type: ignore[arg-type]
                reply = client.ask(b"alias info@" + DOMAIN.encode())
                assert reply == b"OK alice@" + DOMAIN.encode()
            return master.command("GET", cached) is not None

        wait_for(found_master, "the daemon to find the master once the Sentinel answers", 20.0)
        wait_for(lambda: near_cache_coherent(daemon), "client tracking on the master", 20.0)
        print(
            f"\nSentinel AUTH hung 7 s: master used {time.monotonic() - thawed:.1f} s "
            "after the Sentinel answered again"
        )
        assert "Traceback" not in daemon.output()
    finally:
        if sentinel.running:
            os.kill(sentinel.process_id, signal.SIGCONT)
        sentinel.stop()
        master.kill()
