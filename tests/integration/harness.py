"""
Real processes for integration tests: C{redis-server}, the daemon under
C{twistd}, and Postfix's C{postmap} as a socketmap client.

The API is small on purpose:

 - L{free_port}() -> int
 - L{RedisServer}(directory, port=None, arguments=()).start() / .stop() /
   .restart() / .kill() / .pid / .command(*args) / .url
 - L{Daemon}(env, directory, ...).start() / .stop() -> exit status / .kill() /
   .output() / .socketmap_target(map) / .socketmap / .policy / .metrics / .sasl
 - L{run_daemon}(env, directory, timeout) -> (exit status, output) for a daemon
   expected to refuse to start
 - L{postmap}(key, target) -> (exit status, stdout, stderr)
 - L{socketmap_query}(address, request) -> the raw reply, for keys C{postmap}
   cannot send as they are
 - L{http_get}(url) -> (status, body)

Nothing here sleeps for a fixed time to let something happen: every wait
polls for the condition and gives up after a generous deadline, and every
process is killed at the latest when the test process exits.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from tests.doubles import configFrom
from tests.fake_userli import TOKEN
from userli_postfix.config import SETTINGS
from userli_postfix.workers import LISTENERS_VARIABLE, METRICS_VARIABLE

#: The repository root: on C{PYTHONPATH} so C{twisted/plugins/} is found
#: without installing the package.
ROOT = Path(__file__).resolve().parents[2]

#: How long to wait for a process to come up or go away before failing.
#: Generous: CI machines are slow, and a passing test never waits this long.
STARTUP_DEADLINE = 30.0

#: Every configuration variable of the daemon: removed from the inherited
#: environment so the test's own environment cannot leak into the daemon.
DAEMON_VARIABLES = (
    *(setting.variable for setting in SETTINGS),
    # How worker processes find their sockets and metrics.
    LISTENERS_VARIABLE,
    METRICS_VARIABLE,
)

_processes: list[subprocess.Popen[bytes]] = []


@atexit.register
def _killLeftovers() -> None:
    """Whatever a crashed test left running dies with the test process."""
    for process in _processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def _track(process: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
    _processes[:] = [p for p in _processes if p.poll() is None]
    _processes.append(process)
    return process


def wait_for(condition: Callable[[], bool], what: str, deadline: float = STARTUP_DEADLINE) -> None:
    """Poll C{condition} until it holds; fail naming C{what} after C{deadline} s."""
    give_up = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > give_up:
            raise TimeoutError(f"gave up after {deadline:g} s waiting for {what}")
        time.sleep(0.02)


# Every port L{free_port} handed out in this test run.
_given_ports: set[int] = set()


def free_port() -> int:
    """
    A TCP port on 127.0.0.1 that nothing listens on right now, and one not
    handed out before in this test run.

    The port is free only until something binds it: the kernel may well
    give the same free port to the next request for one, so without the
    second condition one daemon's listeners could be given one port (one
    of them then cannot listen), or one daemon a port another was given.
    """
    for _ in range(1000):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _given_ports:
            _given_ports.add(port)
            return port
    raise RuntimeError("no TCP port left that was not handed out before")


def accepts(address: str | tuple[str, int]) -> bool:
    """Whether something accepts connections at a UNIX path or (host, port)."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(address)
        except OSError:
            return False
        return True


class RedisServer:
    """
    A private C{redis-server} on 127.0.0.1: no persistence, its own
    directory, a fixed port so that L{restart} brings it back where the
    daemon expects it (for outage tests), and a UNIX socket as well.
    C{arguments} are added to the command line (e.g. C{--replicaof HOST
    PORT} for a replica); C{config} is a configuration file read first
    (for what only a file can say, such as C{rename-command}).
    """

    def __init__(
        self,
        directory: Path,
        port: int | None = None,
        arguments: Sequence[str] = (),
        config: Path | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port if port is not None else free_port()
        self.unix_socket = self.directory / "redis.sock"
        self.arguments = list(arguments)
        self.config = config
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """C{REDIS_URL} for the daemon (TCP, database 0)."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        """C{REDIS_URL} over the UNIX socket."""
        return f"unix://{self.unix_socket}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start and wait until it answers C{PING}."""
        if self.running:
            return
        log = open(self.directory / "redis.log", "ab")
        self._process = _track(
            subprocess.Popen(
                [
                    "redis-server",
                    *([str(self.config)] if self.config is not None else []),
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--unixsocket",
                    str(self.unix_socket),
                    "--unixsocketperm",
                    "700",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.directory),
                    "--daemonize",
                    "no",
                    *self.arguments,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        )
        log.close()

        def answers() -> bool:
            if not self.running:
                raise RuntimeError(f"redis-server exited; see {self.directory / 'redis.log'}")
            try:
                return self.command("PING") == "PONG"
            except OSError:
                return False

        wait_for(answers, f"redis-server on port {self.port}")

    def stop(self) -> None:
        """Stop it (SIGTERM) and wait until the port is free."""
        if self._process is None:
            return
        process, self._process = self._process, None
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=STARTUP_DEADLINE)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def restart(self) -> None:
        """Stop and start again on the same port, empty."""
        self.stop()
        self.start()

    @property
    def pid(self) -> int:
        """The process id (to pause it with SIGSTOP, for instance)."""
        assert self._process is not None
        return self._process.pid

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would end it; L{start} brings it back."""
        if self._process is None:
            return
        process, self._process = self._process, None
        if process.poll() is None:
            process.kill()
        process.wait()

    def last_client_id(self) -> int:
        """The id Redis gave this question's connection: every later one gets a higher one."""
        return int(str(self.command("CLIENT", "ID")))

    def pool_connections(self, after: int = 0) -> int:
        """
        How many daemon connections with an id above C{after} are ready
        pool connections: past the set-up a daemon's connection does first
        (C{ROLE} behind a Sentinel, C{AUTH}, C{SELECT}, whose answer is the
        last thing the daemon waits for before it uses the connection), and
        not a subscriber connection (client tracking).  A tracking
        connection is counted too while it has done its C{SELECT} but not
        yet subscribed; wait for the near-cache gauge to rule that out.
        """
        count = 0
        for line in str(self.command("CLIENT", "LIST")).splitlines():
            fields = dict(f.partition("=")[::2] for f in line.split(" ") if "=" in f)
            if not fields or int(fields["id"]) <= after:
                continue
            if fields.get("sub") != "0" or fields.get("psub") != "0":
                continue
            if fields.get("cmd", "NULL") in _SETTING_UP or fields["cmd"].startswith("client"):
                continue
            count += 1
        return count

    def command(self, *args: str | bytes | int) -> object:
        """
        Send one command, return the decoded reply: C{str} for simple and
        bulk strings, C{int}, C{None}, C{list}; an error reply raises
        L{RedisReplyError}.
        """
        with socket.create_connection(("127.0.0.1", self.port), timeout=5.0) as s:
            s.sendall(encode_command(args))
            return RespReader(s).read()


# What a daemon's Redis connection sends before it is ready (CLIENT LIST's
# cmd= field: the last command; NULL before the first).
_SETTING_UP = frozenset({"NULL", "role", "auth", "hello"})


def wait_for_redis(redis: RedisServer, daemon: Daemon, after: int = 0) -> None:
    """
    Wait until C{daemon} (all its processes) will use C{redis} for the next
    request: every process has its pool of Redis connections up, and its
    near-cache tracking on unless the lookup cache and the remote-domain
    memory are both off.

    Redis lists a connection as soon as it accepts it, but the daemon uses
    it only once the answer to its C{SELECT} has come back, so: wait for
    the daemon's C{near_cache_coherent} gauge (each process subscribed, so
    no tracking connection looks like a pool one), then for every pool
    connection with an id above C{after} to be past its C{SELECT} in
    C{CLIENT LIST}, then ask the daemon for C{/metrics} once more: the
    answers to those C{SELECT}s reached the daemon before that request did,
    and it handles them (a reactor turn later) before it answers.
    """
    from userli_postfix.redisclient import POOL_SIZE

    config = configFrom({k: v for k, v in daemon.env.items() if v is not None})
    tracked = max(config.lookup_cache_ttl, config.remote_domain_cache_ttl) > 0
    if tracked and daemon.metrics is not None:
        wait_for(
            lambda: _gauge(daemon, "near_cache_coherent") == 1.0,
            "the daemon's near-cache to track Redis",
        )
    wait_for(
        lambda: redis.pool_connections(after) >= POOL_SIZE * config.workers,
        "the daemon's Redis connections to be ready",
    )
    if daemon.metrics is not None:
        http_get(daemon.metrics_url + "/metrics")


def _gauge(daemon: Daemon, name: str) -> float | None:
    """One unlabelled sample of the daemon's C{/metrics}, C{None} when absent."""
    status, body = http_get(daemon.metrics_url + "/metrics")
    prefix = f"userli_postfix_adapter_{name} "
    for line in body.decode("utf-8", "replace").splitlines():
        if status == 200 and line.startswith(prefix):
            return float(line[len(prefix) :])
    return None


class RedisReplyError(Exception):
    """Redis answered a command with an error."""


def encode_command(args: Sequence[str | bytes | int]) -> bytes:
    """One command in RESP, as a client sends it."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode("utf-8")
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class RespReader:
    """Just enough of RESP2 to read a reply."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = b""

    def _line(self) -> bytes:
        while b"\r\n" not in self._buffer:
            self._more()
        line, self._buffer = self._buffer.split(b"\r\n", 1)
        return line

    def _exactly(self, size: int) -> bytes:
        while len(self._buffer) < size + 2:
            self._more()
        data, self._buffer = self._buffer[:size], self._buffer[size + 2 :]
        return data

    def _more(self) -> None:
        chunk = self._sock.recv(65536)
        if not chunk:
            raise ConnectionError("redis closed the connection")
        self._buffer += chunk

    def read(self) -> object:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode("utf-8")
        if kind == b"-":
            raise RedisReplyError(rest.decode("utf-8"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            return None if size < 0 else self._exactly(size).decode("utf-8", "surrogateescape")
        if kind == b"*":
            count = int(rest)
            return None if count < 0 else [self.read() for _ in range(count)]
        raise ConnectionError(f"unexpected RESP reply {line!r}")


def daemon_environment(overrides: Mapping[str, str | None]) -> dict[str, str]:
    """
    The environment of a daemon subprocess: this process's environment
    without any of the daemon's variables, plus C{overrides} (a C{None}
    value removes a variable), with the repository on C{PYTHONPATH}.
    """
    env = {k: v for k, v in os.environ.items() if k not in DAEMON_VARIABLES}
    python_path = [str(ROOT)]
    if env.get("PYTHONPATH"):
        python_path.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(python_path)
    env["PYTHONUNBUFFERED"] = "1"
    for name, value in overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


# What the ``twistd`` console script runs, with this interpreter: no need
# for the script to be on PATH, and the daemon runs under the Python (and
# the packages) of the tests.  ``python -m twisted`` is the other runner,
# ``twist``, which has neither ``-n`` nor ``--pidfile``.
_TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"


def twistd_command(*arguments: str) -> list[str]:
    """C{twistd -n --pidfile= userli-postfix ARGUMENTS} with this Python."""
    return [sys.executable, "-c", _TWISTD, "-n", "--pidfile=", "userli-postfix", *arguments]


def run_daemon(
    env: Mapping[str, str | None],
    directory: Path,
    arguments: Iterable[str] = (),
    timeout: float = STARTUP_DEADLINE,
) -> tuple[int, str]:
    """
    Run the daemon to completion (it is expected to refuse to start, or to
    print help): return its exit status and its stdout and stderr together.
    """
    result = subprocess.run(
        twistd_command(*arguments),
        env=daemon_environment(env),
        cwd=directory,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=timeout,
        check=False,
    )
    return result.returncode, result.stdout.decode("utf-8", "replace")


class Daemon:
    """
    The daemon as a subprocess under C{twistd -n}.

    Every listener gets a free port on 127.0.0.1 unless C{env} sets its
    variable (a C{None} value leaves the variable unset, i.e. the daemon's
    default).  C{socketmap="unix"} puts the socketmap listener on a UNIX
    socket in C{directory} instead; C{sasl=True} turns the SASL listener on.
    C{env} should at least set C{USERLI_BASE_URL}; C{USERLI_TOKEN} defaults to
    the fake Userli's token.

    L{start} returns once every listener accepts connections (or raises with
    the daemon's output if it exits first); L{stop} sends SIGTERM and returns
    the exit status.
    """

    def __init__(
        self,
        env: Mapping[str, str | None],
        directory: Path,
        socketmap: str = "inet",
        sasl: bool = False,
        arguments: Iterable[str] = (),
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.arguments = list(arguments)
        self.log_path = self.directory / "daemon.log"
        settings: dict[str, str | None] = {"USERLI_TOKEN": TOKEN, "LOG_LEVEL": "debug"}
        if socketmap == "unix":
            settings["SOCKETMAP_LISTEN_ADDR"] = str(self.directory / "socketmap.sock")
        else:
            settings["SOCKETMAP_LISTEN_ADDR"] = f"127.0.0.1:{free_port()}"
        settings["POLICY_LISTEN_ADDR"] = f"127.0.0.1:{free_port()}"
        settings["METRICS_LISTEN_ADDR"] = f"127.0.0.1:{free_port()}"
        if sasl:
            settings["SASL_LISTEN_ADDR"] = f"127.0.0.1:{free_port()}"
        settings.update(env)
        self.env = settings
        self._process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def _address(value: str | None) -> str | tuple[str, int] | None:
        """A Go-style listen address as a connectable address."""
        if not value:
            return None
        if value.startswith("/") or value.endswith(".sock"):
            return value
        host, _, port = value.rpartition(":")
        return (host.strip("[]") or "127.0.0.1", int(port))

    @property
    def socketmap(self) -> str | tuple[str, int] | None:
        """The socketmap listener: a UNIX socket path or (host, port)."""
        return self._address(self.env.get("SOCKETMAP_LISTEN_ADDR"))

    @property
    def policy(self) -> tuple[str, int] | None:
        address = self._address(self.env.get("POLICY_LISTEN_ADDR"))
        assert not isinstance(address, str)
        return address

    @property
    def sasl(self) -> str | tuple[str, int] | None:
        return self._address(self.env.get("SASL_LISTEN_ADDR"))

    @property
    def metrics(self) -> tuple[str, int] | None:
        address = self._address(self.env.get("METRICS_LISTEN_ADDR"))
        assert not isinstance(address, str)
        return address

    @property
    def metrics_url(self) -> str:
        """C{http://host:port} of C{/metrics}, C{/health} and C{/ready}."""
        assert self.metrics is not None
        host, port = self.metrics
        return f"http://{host}:{port}"

    def socketmap_target(self, map_name: str) -> str:
        """The C{socketmap:...:MAP} table name for C{postmap -q}."""
        address = self.socketmap
        if isinstance(address, str):
            return f"socketmap:unix:{address}:{map_name}"
        assert address is not None
        return f"socketmap:inet:{address[0]}:{address[1]}:{map_name}"

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the daemon and wait until all its listeners accept."""
        with open(self.log_path, "ab") as log:
            self._process = _track(
                subprocess.Popen(
                    twistd_command(*self.arguments),
                    env=daemon_environment(self.env),
                    cwd=self.directory,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        listeners = [
            a for a in (self.socketmap, self.policy, self.metrics, self.sasl) if a is not None
        ]

        def up() -> bool:
            if not self.running:
                raise RuntimeError(
                    f"the daemon exited with status {self.wait()} before listening:\n"
                    + self.output()
                )
            return all(accepts(a) for a in listeners)

        try:
            wait_for(up, f"the daemon to listen on {listeners}")
        except TimeoutError:
            self.kill()
            raise

    def wait(self, timeout: float = STARTUP_DEADLINE) -> int:
        """Wait for the process to end; its exit status."""
        assert self._process is not None
        return self._process.wait(timeout=timeout)

    def signal(self, signum: int) -> None:
        """Send a signal to the daemon."""
        assert self._process is not None
        self._process.send_signal(signum)

    def stop(self) -> int:
        """SIGTERM, wait, return the exit status (negative: killed by a signal)."""
        if self._process is None:
            raise RuntimeError("the daemon was never started")
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                return self._process.wait(timeout=STARTUP_DEADLINE)
            except subprocess.TimeoutExpired:
                self.kill()
                raise
        return self._process.returncode

    def kill(self) -> None:
        """SIGKILL, for cleanup and crash tests."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def output(self) -> str:
        """Everything the daemon wrote to stdout and stderr so far."""
        try:
            return self.log_path.read_text("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> Daemon:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill()


_postfix_config: Path | None = None


def postfix_config_directory() -> Path:
    """A directory with the one-line C{main.cf} C{postmap -c} needs; made once."""
    global _postfix_config
    if _postfix_config is None:
        _postfix_config = Path(tempfile.mkdtemp(prefix="postmap-"))
        (_postfix_config / "main.cf").write_text("compatibility_level = 3.6\n")
        atexit.register(shutil.rmtree, _postfix_config, True)
    return _postfix_config


def postmap(key: str, target: str, timeout: float = STARTUP_DEADLINE) -> tuple[int, str, str]:
    """
    C{postmap -q KEY TARGET}, e.g. target C{socketmap:inet:127.0.0.1:PORT:alias}
    (see L{Daemon.socketmap_target}).

    Postfix exits 1 both for "not found" and for a server error; stderr
    tells them apart (C{temporary error}, C{permanent error}).

    @return: (exit status, stdout, stderr).
    """
    result = subprocess.run(
        ["postmap", "-c", str(postfix_config_directory()), "-q", key, target],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    return (
        result.returncode,
        result.stdout.decode("utf-8", "replace"),
        result.stderr.decode("utf-8", "replace"),
    )


def netstring(data: bytes) -> bytes:
    """Frame C{data} as a netstring."""
    return b"%d:%s," % (len(data), data)


def socketmap_query(
    address: str | tuple[str, int], requests: bytes | Sequence[bytes], timeout: float = 30.0
) -> list[bytes]:
    """
    Send raw socketmap requests (C{b"alias key"}) on one connection and
    return the unframed replies, in order.  For keys that C{postmap} would
    not send verbatim (upper case: smtpd folds, postmap does not).
    """
    batch = [requests] if isinstance(requests, bytes) else list(requests)
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(address)
        s.sendall(b"".join(netstring(r) for r in batch))
        buffer = b""
        replies: list[bytes] = []
        while len(replies) < len(batch):
            while True:
                length, colon, rest = buffer.partition(b":")
                if colon and len(rest) > int(length):
                    break
                chunk = s.recv(65536)
                if not chunk:
                    raise ConnectionError(f"connection closed after {replies!r}, {buffer!r}")
                buffer += chunk
            size = int(length)
            if rest[size : size + 1] != b",":
                raise ValueError(f"malformed netstring {buffer!r}")
            replies.append(rest[:size])
            buffer = rest[size + 1 :]
        return replies


def http_get(url: str, timeout: float = 30.0) -> tuple[int, bytes]:
    """GET C{url}: (status, body), whatever the status."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
