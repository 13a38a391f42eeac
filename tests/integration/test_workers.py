"""
Worker processes (C{WORKERS=N}): several processes really serve the same
listeners, C{/metrics} shows what all of them did (also after some died),
quotas are exact across them, none outlives the daemon, one that cannot
start is tried again calmly, and a busy first process never stalls one.

Which process serves a connection is found from the outside: the socket's
inode in C{/proc/net/tcp} and in each process's C{/proc/PID/fd}.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fake_userli import SLOW, FakeUserliServer
from tests.integration import clients
from tests.integration.clients import PolicyClient, SocketmapClient
from tests.integration.conftest import DOMAIN, StartDaemon
from tests.integration.harness import (
    ROOT,
    Daemon,
    RedisServer,
    http_get,
    netstring,
    run_daemon,
    wait_for,
)
from tests.integration.test_shutdown import READ_MARGIN, Load
from userli_postfix.daemon import SHUTDOWN_GRACE

pytestmark = pytest.mark.integration

ALICE = f"alice@{DOMAIN}"
LIMITED = f"limited@{DOMAIN}"  # 2 messages an hour, 3 a day (conftest)

# How long the fake Userli takes per answer in the stop test: within the
# daemon's 5 s deadline, and long enough that processes draining one after
# the other (the first process only once its children had gone) would take
# more than the 10 s a container runtime waits.
SLOW_API = 4.5

# Connections opened, at most, while looking for ones served by different
# processes; far below the 500 a process accepts.
MAX_CONNECTIONS = 200


def children(pid: int) -> list[int]:
    """The child processes of C{pid}."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(p) for p in text.split()]


def alive(pid: int) -> bool:
    """Whether C{pid} exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def socket_owner(sock: socket.socket, pids: list[int]) -> int | None:
    """Which of C{pids} holds the server side of the connection C{sock}."""
    client_port = sock.getsockname()[1]
    server_port = sock.getpeername()[1]
    wanted = f"{client_port:04X}"
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if local.endswith(f":{server_port:04X}") and remote.endswith(f":{wanted}"):
            inode = fields[9]
            break
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except FileNotFoundError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return pid
            except OSError:
                continue
    return None


def metrics_directory(pid: int) -> Path:
    """The multiprocess metrics directory a worker was given."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    for variable in environ:
        name, _, value = variable.partition(b"=")
        if name == b"PROMETHEUS_MULTIPROC_DIR":
            return Path(value.decode())
    raise AssertionError(f"worker {pid} has no metrics directory")


def start_workers(
    start_daemon: StartDaemon,
    redis: RedisServer,
    count: int,
    socketmap: str = "inet",
    env: dict[str, str] | None = None,
) -> Daemon:
    """A daemon with C{count} workers, returned once every child runs."""
    daemon = start_daemon(
        env={"WORKERS": str(count), **(env or {})}, redis=redis, socketmap=socketmap
    )
    wait_for(
        lambda: daemon.output().count("socketmap listening on") == count,
        f"{count} processes listening",
    )
    assert len(children(daemon.pid)) == count - 1
    return daemon


class Connection:
    """One client connection, for socketmap or policy requests."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address, timeout=30)
        self.buffer = b""

    def close(self) -> None:
        self.sock.close()

    def _more(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed by the daemon")
        self.buffer += chunk

    def lookup(self, request: bytes) -> bytes:
        """One socketmap request and its unframed reply."""
        self.sock.sendall(netstring(request))
        while True:
            length, colon, rest = self.buffer.partition(b":")
            if colon and len(rest) > int(length):
                size = int(length)
                reply, self.buffer = rest[:size], rest[size + 1 :]
                return reply
            self._more()

    def policy(self, attributes: dict[str, str]) -> str:
        """One policy request and the action of its reply."""
        block = "".join(f"{k}={v}\n" for k, v in attributes.items()) + "\n"
        self.sock.sendall(block.encode())
        while b"\n\n" not in self.buffer:
            self._more()
        reply, self.buffer = self.buffer.split(b"\n\n", 1)
        return reply.decode().removeprefix("action=")


def spread(
    address: tuple[str, int], pids: list[int], first: bytes | dict[str, str]
) -> dict[int, list[Connection]]:
    """
    Open connections (each answering one request, C{first}, so it is surely
    accepted) until at least two processes serve some; by serving process.
    """
    owners: dict[int, list[Connection]] = {}
    for _ in range(MAX_CONNECTIONS):
        connection = Connection(address)
        if isinstance(first, bytes):
            connection.lookup(first)
        else:
            connection.policy(first)
        owner = socket_owner(connection.sock, pids)
        assert owner is not None, "no process holds the connection"
        owners.setdefault(owner, []).append(connection)
        if len(owners) >= 2:
            return owners
    raise AssertionError(f"{MAX_CONNECTIONS} connections, all served by one process")


def metric(url: str, name: str) -> float:
    """The value of the unlabelled or summed series C{name} on /metrics."""
    status, body = http_get(url)
    assert status == 200
    total = 0.0
    found = False
    for line in body.decode().splitlines():
        match = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if match:
            total += float(match.group(2))
            found = True
    assert found, f"{name} not on /metrics"
    return total


Sample = tuple[str, tuple[tuple[str, str], ...]]


def counts(url: str) -> dict[Sample, float]:
    """Every sample of every counter and histogram on /metrics."""
    status, body = http_get(url)
    assert status == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        if family.type in ("counter", "histogram")
        for sample in family.samples
    }


def ready(daemon: Daemon) -> dict[str, object]:
    """The body of C{/ready}."""
    _, body = http_get(daemon.metrics_url + "/ready")
    answer: dict[str, object] = json.loads(body)
    return answer


def replaced(daemon: Daemon, victim: int, listening: int) -> int:
    """
    Wait until the only child is a new one that listens (the C{listening}th
    listener line); its pid.
    """
    wait_for(
        lambda: len(children(daemon.pid)) == 1 and victim not in children(daemon.pid),
        "a new worker",
    )
    wait_for(
        lambda: daemon.output().count("socketmap listening on") >= listening,
        "the new worker to listen",
    )
    (child,) = children(daemon.pid)
    return child


# A worker fails to start while this file exists (tests/integration/faults).
FAULTS = Path(__file__).resolve().parent / "faults"
FAULT_VARIABLE = "USERLI_POSTFIX_TEST_WORKER_FAULT"


def end_of_message(sender: str) -> dict[str, str]:
    return {
        "request": "smtpd_access_policy",
        "protocol_state": "END-OF-MESSAGE",
        "sender": sender,
        "recipient": ALICE,
        "client_address": "192.0.2.1",
    }


class TestWorkers:
    """C{WORKERS=N} with Redis."""

    def test_processes_serve_and_metrics_add_up(
        self, start_daemon: StartDaemon, redis_server: RedisServer
    ) -> None:
        """
        Connections are served by more than one process, and /metrics (on
        the parent) counts the requests and open connections of all.
        """
        daemon = start_workers(start_daemon, redis_server, 3)
        pids = [daemon.pid, *children(daemon.pid)]
        assert daemon.socketmap is not None and not isinstance(daemon.socketmap, str)
        owners = spread(daemon.socketmap, pids, f"mailbox {ALICE}".encode())
        connections = [c for group in owners.values() for c in group]
        try:
            for connection in connections:
                assert connection.lookup(f"domain {DOMAIN}".encode()) == b"OK 1"
            sent = 2 * len(connections)
            url = daemon.metrics_url + "/metrics"
            assert metric(url, "userli_postfix_adapter_requests_total") == sent
            assert metric(url, "userli_postfix_adapter_active_connections") == len(connections)
            assert metric(url, "userli_postfix_adapter_request_duration_seconds_count") == sent
        finally:
            for connection in connections:
                connection.close()
        wait_for(
            lambda: metric(url, "userli_postfix_adapter_active_connections") == 0,
            "the connection gauge to drop to 0",
        )

    def test_quota_exact_across_workers(
        self, start_daemon: StartDaemon, redis_server: RedisServer
    ) -> None:
        """
        Messages of one sender sent through different processes count
        against one quota: 2 an hour allowed, then rejected, whichever
        process answers.
        """
        daemon = start_workers(start_daemon, redis_server, 2)
        pids = [daemon.pid, *children(daemon.pid)]
        assert daemon.policy is not None
        owners = spread(daemon.policy, pids, end_of_message(ALICE))
        first, second = (group[0] for group in list(owners.values())[:2])
        actions = [
            (first if i % 2 == 0 else second).policy(end_of_message(LIMITED)) for i in range(5)
        ]
        assert [a.split(" ")[0] for a in actions] == [
            "DUNNO",
            "DUNNO",
            "REJECT",
            "REJECT",
            "REJECT",
        ]
        for group in owners.values():
            for connection in group:
                connection.close()

    def test_sigterm_stops_all(self, start_daemon: StartDaemon, redis_server: RedisServer) -> None:
        """
        SIGTERM to the daemon stops every process, the daemon exits, and the
        private metrics directory is removed.
        """
        daemon = start_workers(start_daemon, redis_server, 3)
        kids = children(daemon.pid)
        directory = metrics_directory(kids[0])
        assert directory.is_dir()
        daemon.stop()
        for pid in kids:
            wait_for(lambda pid=pid: not alive(pid), f"worker {pid} to exit")
        assert not directory.exists()
        assert "Stopped" in daemon.output()

    def test_sigterm_under_load(
        self, fake_userli: FakeUserliServer, start_daemon: StartDaemon, redis_server: RedisServer
    ) -> None:
        """
        SIGTERM to a daemon with two workers while every connection has a
        request in flight: every request is answered or its connection
        closed cleanly (no torn reply), requests read before the signal are
        answered, the daemon exits 0, and the whole process tree is gone
        within the shutdown grace (8 s; a container runtime waits 10 s
        before SIGKILL), because every process drains at the same time.
        """
        daemon = start_workers(
            start_daemon, redis_server, 2, env={"LOOKUP_CACHE_TTL": "0", "QUOTA_CACHE_TTL": "0"}
        )
        pids = [daemon.pid, *children(daemon.pid)]
        socketmap, policy = daemon.socketmap, daemon.policy
        assert isinstance(socketmap, tuple) and policy is not None
        fake_userli.set_mode(SLOW, delay=SLOW_API)

        def lookup(client: object) -> None:
            assert client.ask(f"alias info@{DOMAIN}".encode()) == f"OK {ALICE}".encode()  # type: ignore[attr-defined]

        def police(client: object) -> None:
            assert client.ask(clients.end_of_message(f"bob@{DOMAIN}")) == "DUNNO"  # type: ignore[attr-defined]

        opened: list[SocketmapClient | PolicyClient] = []

        def opening(client: SocketmapClient | PolicyClient) -> object:
            opened.append(client)
            return client

        load = Load()
        load.start("socketmap", 16, lambda: opening(SocketmapClient(socketmap)), lookup)
        load.start("policy", 8, lambda: opening(PolicyClient(policy)), police)
        wait_for(lambda: len(load.outcomes) >= 24, "answers before the shutdown")
        served = {socket_owner(client.sock, pids) for client in opened}
        assert served == set(pids), "both processes serve connections"

        # The signal comes as lookup answers arrive (identical lookups in
        # flight share one API call), so that every socketmap connection has
        # a new request in flight for the whole API delay.
        def lookups() -> int:
            return sum(1 for o in load.outcomes if o.listener == "socketmap")

        answered = lookups()
        wait_for(lambda: lookups() > answered, "the next answers")
        terminated = time.monotonic()
        daemon.signal(signal.SIGTERM)
        # Within the shutdown grace, which is what each process may take.
        try:
            wait_for(
                lambda: not any(alive(pid) for pid in pids),
                "every worker to exit",
                deadline=SHUTDOWN_GRACE,
            )
        except TimeoutError as error:
            # Which process outstayed the grace, when the tree was gone, and
            # what the daemon logged (a worker killed, a request that hung).
            left = [pid for pid in pids if alive(pid)]
            wait_for(lambda: not any(alive(pid) for pid in pids), "every worker to exit at all")
            raise AssertionError(
                f"{error}: still running after the grace: {left} (the first process is "
                f"{daemon.pid}); all gone {time.monotonic() - terminated:.1f} s after "
                f"SIGTERM; the daemon's log:\n{daemon.output()[-6000:]}"
            ) from error
        status = daemon.wait()
        load.join()

        assert status == 0, daemon.output()[-3000:]
        violations = [o for o in load.outcomes if o.result not in ("answered", "closed")]
        assert violations == [], violations[:5]
        unanswered = [
            o for o in load.outcomes if o.sent < terminated - READ_MARGIN and o.result != "answered"
        ]
        assert unanswered == [], unanswered[:5]
        assert any(o.sent < terminated and o.result == "answered" for o in load.outcomes)

    def test_children_die_with_parent(
        self, start_daemon: StartDaemon, redis_server: RedisServer
    ) -> None:
        """A parent killed outright (SIGKILL) takes no child with it, yet none stays."""
        daemon = start_workers(start_daemon, redis_server, 3)
        kids = children(daemon.pid)
        directory = metrics_directory(kids[0])
        daemon.kill()
        for pid in kids:
            wait_for(lambda pid=pid: not alive(pid), f"worker {pid} to notice its parent died")
        # (What a worker logs then is lost: its log goes through the parent.)
        # The last worker removed the metrics directory the parent could not.
        assert not directory.exists()

    def test_dead_child_replaced(
        self, start_daemon: StartDaemon, redis_server: RedisServer
    ) -> None:
        """A worker that dies is replaced, and lookups go on being answered."""
        daemon = start_workers(start_daemon, redis_server, 2)
        (victim,) = children(daemon.pid)
        os.kill(victim, 9)
        wait_for(
            lambda: len(children(daemon.pid)) == 1 and victim not in children(daemon.pid),
            "a new worker",
        )
        assert daemon.socketmap is not None and not isinstance(daemon.socketmap, str)
        for _ in range(20):
            connection = Connection(daemon.socketmap)
            assert connection.lookup(f"mailbox {ALICE}".encode()) == b"OK 1"
            connection.close()
        assert "ended unexpectedly" in daemon.output()

    def test_unix_socket_shared(self, start_daemon: StartDaemon, redis_server: RedisServer) -> None:
        """
        A socketmap listener on a UNIX socket is shared too: every process
        serves it, and lookups over it are answered.
        """
        daemon = start_workers(start_daemon, redis_server, 2, socketmap="unix")
        path = daemon.socketmap
        assert isinstance(path, str)
        (child,) = children(daemon.pid)
        inode = next(
            line.split()[6]
            for line in Path("/proc/net/unix").read_text().splitlines()[1:]
            if line.split()[-1] == path
        )
        for pid in (daemon.pid, child):
            links = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
            assert f"socket:[{inode}]" in links, f"process {pid} does not hold the socket"
        for _ in range(20):
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(30)
                s.connect(path)
                s.sendall(netstring(f"mailbox {ALICE}".encode()))
                assert s.recv(100) == netstring(b"OK 1")

    def test_refused_without_redis(self, tmp_path: Path) -> None:
        """More than one worker without REDIS_URL is refused at start, naming WORKERS."""
        status, output = run_daemon(
            {"USERLI_TOKEN": "x", "WORKERS": "2", "REDIS_URL": None}, tmp_path
        )
        assert status != 0
        assert "WORKERS" in output
        assert "REDIS_URL" in output

    def test_option(self, tmp_path: Path) -> None:
        """C{--workers} works like C{WORKERS} (and is checked the same way)."""
        status, output = run_daemon({"USERLI_TOKEN": "x"}, tmp_path, ["--workers", "0"])
        assert status != 0
        assert "WORKERS" in output


class TestWorkersRecover:
    """Workers that die, cannot start, or log while the first process is busy."""

    def test_counts_survive_kills(
        self, start_daemon: StartDaemon, redis_server: RedisServer
    ) -> None:
        """
        With traffic on both processes, SIGKILL to the worker lowers no
        counter and no histogram sample on /metrics, and the replacement
        serves; five kills in a row leave in the metrics directory only the
        live processes' files and one archive per type.
        """
        daemon = start_workers(start_daemon, redis_server, 2)
        assert isinstance(daemon.socketmap, tuple)
        url = daemon.metrics_url + "/metrics"
        (child,) = children(daemon.pid)
        directory = metrics_directory(child)
        listening = 2
        compared = 0
        for _ in range(5):
            owners = spread(daemon.socketmap, [daemon.pid, child], f"mailbox {ALICE}".encode())
            for group in owners.values():
                for connection in group:
                    assert connection.lookup(f"domain {DOMAIN}".encode()) == b"OK 1"
                    connection.close()
            before = counts(url)
            served = metric(url, "userli_postfix_adapter_requests_total")
            os.kill(child, signal.SIGKILL)
            listening += 1
            child = replaced(daemon, child, listening)
            after = counts(url)
            lower = {k: (v, after.get(k)) for k, v in before.items() if after.get(k, -1) < v}
            assert lower == {}, lower
            compared += len(before)
            assert metric(url, "userli_postfix_adapter_requests_total") == served
        spread(daemon.socketmap, [daemon.pid, child], f"mailbox {ALICE}".encode())
        assert metric(url, "userli_postfix_adapter_worker_restarts_total") == 5
        owners = {path.stem.rsplit("_", 1)[1] for path in directory.iterdir()}
        assert owners <= {str(daemon.pid), str(child), "archive"}, owners
        # Per live process: a counter, a histogram and three kinds of gauge.
        files = len(list(directory.iterdir()))
        assert files <= 2 * 5 + 2
        print(
            f"\n5 SIGKILLs: {compared} counter and histogram samples compared, none lower; "
            f"{metric(url, 'userli_postfix_adapter_requests_total'):.0f} lookups counted; "
            f"{files} files in the metrics directory"
        )

    def test_worker_that_cannot_start(
        self, start_daemon: StartDaemon, redis_server: RedisServer, tmp_path: Path
    ) -> None:
        """
        A worker that cannot start is tried again after growing pauses
        (1, 2, 4 s ...), each try counted; /ready says one process of two
        serves; once it can start again the pool is full and serves.
        """
        fault = tmp_path / "fault"
        daemon = start_workers(
            start_daemon,
            redis_server,
            2,
            env={
                "PYTHONPATH": os.pathsep.join([str(FAULTS), str(ROOT)]),
                FAULT_VARIABLE: str(fault),
            },
        )
        assert ready(daemon)["workers"] == {"alive": 2, "configured": 2}
        url = daemon.metrics_url + "/metrics"
        fault.write_text("")
        (victim,) = children(daemon.pid)
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        wait_for(
            lambda: metric(url, "userli_postfix_adapter_worker_restarts_total") >= 3,
            "three tries to start a worker",
        )
        wait_for(lambda: ready(daemon)["workers"] == {"alive": 1, "configured": 2}, "/ready")
        output = daemon.output()
        assert "injected fault" in output
        for delay in ("1 s", "2 s", "4 s"):
            assert f"starting another in {delay}" in output
        assert "starting another in 1 s" not in output.split("starting another in 2 s", 1)[1]
        tries = metric(url, "userli_postfix_adapter_worker_restarts_total")
        failing = time.monotonic() - killed
        fault.unlink()
        removed = time.monotonic()
        wait_for(
            lambda: (
                ready(daemon)["workers"] == {"alive": 2, "configured": 2}
                and daemon.output().count("socketmap listening on") == 3
            ),
            "the pool to be full again",
        )
        back = time.monotonic() - removed
        (child,) = children(daemon.pid)
        assert isinstance(daemon.socketmap, tuple)
        spread(daemon.socketmap, [daemon.pid, child], f"mailbox {ALICE}".encode())
        print(
            f"\nA worker that cannot start: {tries:.0f} tries in {failing:.1f} s; "
            f"the pool full again {back:.1f} s after the fault was removed"
        )

    def test_stopped_first_process(
        self, start_daemon: StartDaemon, redis_server: RedisServer
    ) -> None:
        """
        With the first process stopped (SIGSTOP) for 2 s and more, a worker
        logging at debug level under load keeps answering (far more lines
        than the 64 KiB pipe holds); the lines it dropped are counted, and
        said once lines get through again.
        """
        daemon = start_workers(start_daemon, redis_server, 2, env={"LOG_LEVEL": "debug"})
        assert daemon.policy is not None
        (child,) = children(daemon.pid)
        owners = spread(daemon.policy, [daemon.pid, child], end_of_message(ALICE))
        worker = owners[child][0]
        # A hung worker fails the test here rather than after 30 s.
        worker.sock.settimeout(10)
        os.kill(daemon.pid, signal.SIGSTOP)
        try:
            stopped = time.monotonic()
            answered = 0
            slowest = 0.0
            while answered < 2000 or time.monotonic() - stopped < 2:
                asked = time.monotonic()
                assert worker.policy(end_of_message(ALICE)) == "DUNNO"
                slowest = max(slowest, time.monotonic() - asked)
                answered += 1
            paused = time.monotonic() - stopped
        finally:
            os.kill(daemon.pid, signal.SIGCONT)
        url = daemon.metrics_url + "/metrics"

        def reported() -> bool:
            # Something to log, so the worker finds the pipe has room again.
            worker.policy(end_of_message(ALICE))
            notices = re.findall(
                r"Log lines of this worker dropped while the pipe to the first process "
                r"was full: (\d+)",
                daemon.output(),
            )
            dropped = metric(url, "userli_postfix_adapter_log_lines_dropped_total")
            return dropped > 0 and sum(int(n) for n in notices) == dropped

        wait_for(reported, "the dropped lines to be counted and said")
        print(
            f"\nFirst process stopped {paused:.1f} s: the worker answered {answered} policy "
            f"requests, slowest {slowest * 1000:.1f} ms; "
            f"{metric(url, 'userli_postfix_adapter_log_lines_dropped_total'):.0f} log lines "
            "dropped, counted and said"
        )
        for group in owners.values():
            for connection in group:
                connection.close()
