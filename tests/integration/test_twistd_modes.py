"""
The daemon in twistd's modes, as an operator runs it: daemon mode with
C{--logfile} and C{--pidfile} (the log in the file, stopped through the pid
file), C{--syslog} with C{--prefix}, and C{LOG_FORMAT}/C{LOG_LEVEL} applied
to whatever twistd logs to.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fake_userli import FakeUserliServer
from tests.integration.harness import (
    STARTUP_DEADLINE,
    RedisServer,
    _track,
    accepts,
    daemon_environment,
    free_port,
    socketmap_query,
    wait_for,
)

pytestmark = pytest.mark.integration

# What the ``twistd`` console script runs, with this interpreter (as in the
# harness), without its ``-n --pidfile=``: these tests choose the mode.
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"

# A stand-in for the C{syslog} module that appends each call to the file
# named by C{FAKE_SYSLOG}, one JSON array per line.
FAKE_SYSLOG = textwrap.dedent(
    """
    import json, os
    LOG_USER = 8
    LOG_ALERT, LOG_CRIT, LOG_ERR, LOG_WARNING, LOG_INFO, LOG_DEBUG = 1, 2, 3, 4, 6, 7

    class _Recorder:
        # Callable objects, not functions: Twisted keeps them as class
        # attributes, where a function would become a method.
        def __init__(self, name):
            self.name = name

        def __call__(self, *args):
            with open(os.environ["FAKE_SYSLOG"], "a") as f:
                f.write(json.dumps([self.name, *args]) + "\\n")

    openlog = _Recorder("openlog")
    syslog = _Recorder("syslog")
    closelog = _Recorder("closelog")
    """
)


def settings(userli: str) -> dict[str, str | None]:
    """A daemon on free loopback ports against C{userli}."""
    return {
        "USERLI_TOKEN": "token-of-the-tests",
        "USERLI_BASE_URL": userli,
        "SOCKETMAP_LISTEN_ADDR": f"127.0.0.1:{free_port()}",
        "POLICY_LISTEN_ADDR": f"127.0.0.1:{free_port()}",
        "METRICS_LISTEN_ADDR": f"127.0.0.1:{free_port()}",
    }


def socketmap(env: dict[str, str | None]) -> tuple[str, int]:
    value = env["SOCKETMAP_LISTEN_ADDR"]
    assert value is not None
    host, _, port = value.rpartition(":")
    return host, int(port)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class Daemonized:
    """C{twistd --logfile=... --pidfile=... userli-postfix} in daemon mode."""

    def __init__(self, directory: Path, env: dict[str, str | None]) -> None:
        self.directory = directory
        self.env = env
        self.logfile = directory / "userli-postfix.log"
        self.pidfile = directory / "userli-postfix.pid"
        self.pid: int | None = None

    def start(self) -> None:
        """Start it; twistd's first process returns once the daemon runs."""
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                TWISTD,
                f"--logfile={self.logfile}",
                f"--pidfile={self.pidfile}",
                "userli-postfix",
            ],
            env=daemon_environment(self.env),
            cwd=self.directory,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=STARTUP_DEADLINE,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        # In daemon mode stdout is /dev/null: nothing may be meant for it.
        assert result.stdout == b"", result.stdout
        wait_for(lambda: self.readPid() is not None, "the pid file")
        self.pid = self.readPid()
        wait_for(lambda: accepts(socketmap(self.env)), "the socketmap listener")

    def readPid(self) -> int | None:
        """The pid in the pid file; C{None} while there is none (yet)."""
        try:
            return int(self.pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def log(self) -> str:
        return self.logfile.read_text("utf-8", "replace") if self.logfile.exists() else ""

    def stop(self) -> None:
        """SIGTERM to the pid in the pid file; wait until the process is gone."""
        pid = self.readPid()
        assert pid is not None and pid == self.pid
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not alive(pid), "the daemon to exit")

    def kill(self) -> None:
        if self.pid is not None and alive(self.pid):
            os.kill(self.pid, signal.SIGKILL)


@pytest.fixture
def daemonized(tmp_path: Path) -> Iterator[list[Daemonized]]:
    """Daemons started in daemon mode, killed at the end of the test."""
    started: list[Daemonized] = []
    yield started
    for daemon in started:
        daemon.kill()


def start(started: list[Daemonized], tmp_path: Path, env: dict[str, str | None]) -> Daemonized:
    daemon = Daemonized(tmp_path, env)
    started.append(daemon)
    daemon.start()
    return daemon


def test_daemon_mode_logfile_and_pidfile(tmp_path: Path, daemonized: list[Daemonized]) -> None:
    """
    Daemon mode writes the start-up lines (the Userli URL, never the token),
    the listener lines and a later warning to C{--logfile}, and stops
    cleanly through the pid file (which it removes).
    """
    env = settings(f"http://127.0.0.1:{free_port()}")  # nothing listens: lookups fail
    daemon = start(daemonized, tmp_path, env)
    wait_for(lambda: "http listening on" in daemon.log(), "the listener lines")
    log = daemon.log()
    assert f"using the Userli API at {env['USERLI_BASE_URL']}" in log
    assert "socketmap listening on tcp:" in log
    assert "token-of-the-tests" not in log
    assert "Userli alias lookup failed" not in log

    reply = socketmap_query(socketmap(env), b"alias alice@example.org")
    assert reply == [b"TEMP Userli API unavailable"]
    wait_for(lambda: "Userli alias lookup failed" in daemon.log(), "the warning")
    assert "[userli_postfix.lookups#warn]" in daemon.log()

    daemon.stop()
    log = daemon.log()
    assert "Stopped" in log
    assert "Server Shut Down." in log
    assert not daemon.pidfile.exists()


def test_daemon_mode_json(
    tmp_path: Path, daemonized: list[Daemonized], fake_userli: FakeUserliServer
) -> None:
    """With C{LOG_FORMAT=json} every line of the log file, twistd's own too, is JSON."""
    env = {**settings(fake_userli.url), "LOG_FORMAT": "json"}
    daemon = start(daemonized, tmp_path, env)
    wait_for(lambda: "http listening on" in daemon.log(), "the listener lines")
    daemon.stop()
    records = [json.loads(line) for line in daemon.log().splitlines()]
    messages = [record["message"] for record in records]
    assert any(m.startswith("socketmap listening on tcp:") for m in messages), messages
    assert any(m.startswith("twistd ") and "starting up" in m for m in messages), messages
    assert {record["level"] for record in records} == {"info"}


def test_daemon_mode_level_error(
    tmp_path: Path, daemonized: list[Daemonized], fake_userli: FakeUserliServer
) -> None:
    """
    C{LOG_LEVEL=error} hides the info lines (twistd's and ours) and keeps
    the error: a refused token, said once however many lookups it fails.
    """
    env = {**settings(fake_userli.url), "LOG_LEVEL": "error", "USERLI_TOKEN": "wrong-token"}
    daemon = start(daemonized, tmp_path, env)
    for _ in range(3):
        reply = socketmap_query(socketmap(env), b"alias alice@example.org")
        assert reply == [b"TEMP Userli API unavailable"]
    wait_for(lambda: "refused the token" in daemon.log(), "the token error")
    daemon.stop()
    log = daemon.log()
    assert log.count("refused the token (HTTP 401)") == 1, log
    assert "USERLI_TOKEN" in log
    assert "wrong-token" not in log
    assert "#info]" not in log
    assert "#warn]" not in log
    assert "listening on" not in log


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_daemon_mode_workers_log(
    tmp_path: Path, daemonized: list[Daemonized], fake_userli: FakeUserliServer, log_format: str
) -> None:
    """
    With C{WORKERS=2} in daemon mode (stdout is /dev/null), the worker's
    lines reach C{--logfile} through the first process, which alone writes
    it: a warning each process gives (a Redis that cannot track) is there
    twice, and so are the listener lines and, once stopped, each process's
    last line; with C{LOG_FORMAT=json} every line is still one JSON object.
    """
    config = tmp_path / "redis.conf"
    config.write_text('rename-command CLIENT ""\n')
    redis = RedisServer(tmp_path / "redis", config=config)
    redis.start()
    try:
        env = {
            **settings(fake_userli.url),
            "WORKERS": "2",
            "REDIS_URL": redis.url,
            "LOG_FORMAT": log_format,
        }
        daemon = start(daemonized, tmp_path, env)

        def messages() -> list[tuple[str, str]]:
            """(level, message) of every line of the log file so far."""
            lines = daemon.log().splitlines()
            if log_format == "json":
                return [(r["level"], r["message"]) for r in map(json.loads, lines)]
            found = []
            for line in lines:
                system, _, message = line.partition("] ")
                found.append((system.rpartition("#")[2], message))
            return found

        def count(level: str, start: str) -> int:
            return sum(1 for lv, m in messages() if lv == level and m.startswith(start))

        wait_for(
            lambda: count("warn", "Redis refused client tracking") == 2,
            "both processes' warning in the log file",
        )
        assert count("info", "socketmap listening on") == 2
        daemon.stop()
        assert count("info", "Stopped") == 2, daemon.log()
        assert count("warn", "Redis refused client tracking") == 2
    finally:
        redis.stop()


def test_syslog(tmp_path: Path) -> None:
    """
    C{twistd -n --syslog --prefix=...}: the log reaches the syslog module
    under that prefix, each event with its level's priority.
    """
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "syslog.py").write_text(FAKE_SYSLOG)
    record = tmp_path / "syslog.jsonl"
    env = {**settings(f"http://127.0.0.1:{free_port()}"), "FAKE_SYSLOG": str(record)}
    environment = daemon_environment(env)
    environment["PYTHONPATH"] = os.pathsep.join([str(modules), environment["PYTHONPATH"]])
    output = tmp_path / "stdout.log"
    with open(output, "wb") as out:
        process = _track(
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    TWISTD,
                    "-n",
                    "--pidfile=",
                    "--syslog",
                    "--prefix=userli-postfix",
                    "userli-postfix",
                ],
                env=environment,
                cwd=tmp_path,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        )
    try:

        def calls() -> list[list[object]]:
            if not record.exists():
                return []
            return [json.loads(line) for line in record.read_text().splitlines()]

        def messages(priority: int) -> list[str]:
            return [
                str(c[2]) for c in calls() if c[0] == "syslog" and int(str(c[1])) & 7 == priority
            ]

        wait_for(lambda: any("http listening on" in m for m in messages(6)), "the listener lines")
        socketmap_query(socketmap(env), b"alias alice@example.org")
        wait_for(
            lambda: any("lookup failed" in m for m in messages(4)), "the warning at LOG_WARNING"
        )
        assert calls()[0][:2] == ["openlog", "userli-postfix"]
        assert any("using the Userli API at" in m for m in messages(6))
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=STARTUP_DEADLINE) == 0
        assert output.read_text() == ""
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
