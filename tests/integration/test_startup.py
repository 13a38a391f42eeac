"""
The daemon as an operator meets it: C{twistd userli-postfix} refusing a bad
environment with one line, its C{--help}, its log formats, and a clean exit
on SIGTERM.
"""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest

from tests.fake_userli import TOKEN, FakeUserliServer
from tests.integration.conftest import DOMAIN, StartDaemon
from tests.integration.harness import (
    Daemon,
    daemon_environment,
    free_port,
    postmap,
    run_daemon,
    twistd_command,
)
from userli_postfix.config import SETTINGS

pytestmark = pytest.mark.integration

ALICE = f"alice@{DOMAIN}"


def lines(output: str) -> list[str]:
    """The non-empty lines of some output."""
    return [line for line in output.splitlines() if line.strip()]


@pytest.fixture
def listen_env() -> dict[str, str | None]:
    """
    A valid environment apart from what a test breaks: free ports, so a
    daemon that wrongly starts cannot collide with anything.
    """
    return {
        "USERLI_TOKEN": TOKEN,
        "USERLI_BASE_URL": "http://127.0.0.1:1",
        "SOCKETMAP_LISTEN_ADDR": f"127.0.0.1:{free_port()}",
        "POLICY_LISTEN_ADDR": f"127.0.0.1:{free_port()}",
        "METRICS_LISTEN_ADDR": f"127.0.0.1:{free_port()}",
    }


BAD_ENVIRONMENTS = [
    ("USERLI_TOKEN", None, "required"),
    ("USERLI_TOKEN", "", "required"),
    ("USERLI_TOKEN", "   ", "required"),
    ("LOOKUP_CACHE_TTL", "soon", "'soon'"),
    ("LOOKUP_CACHE_TTL", "300", "'300'"),
    ("LOOKUP_CACHE_TTL", "-5s", "negative"),
    ("LOOKUP_CACHE_TTL", "-1m30s", "negative"),
    ("QUOTA_CACHE_TTL", "later", "'later'"),
    ("SASL_FAILURE_DELAY", "-2s", "negative"),
    ("USERLI_BASE_URL", "not a url", "'not a url'"),
    ("USERLI_BASE_URL", "ftp://userli.example.org", "'ftp://userli.example.org'"),
    ("USERLI_BASE_URL", "http://userli.example.org:notaport", "URL"),
    ("REDIS_URL", "http://127.0.0.1:6379", "'http'"),
    ("REDIS_URL", "redis://127.0.0.1:notaport/0", "URL"),
    ("REDIS_URL", "redis://127.0.0.1:6379/zero", "'zero'"),
    ("SOCKETMAP_LISTEN_ADDR", "localhost", "'localhost'"),
    ("SOCKETMAP_LISTEN_ADDR", "127.0.0.1:99999", "99999"),
    ("POLICY_LISTEN_ADDR", "nonsense", "'nonsense'"),
    ("METRICS_LISTEN_ADDR", ":port", "':port'"),
    ("SASL_LISTEN_ADDR", "tcp:notaport", "tcp:notaport"),
    ("LOG_LEVEL", "verbose", "'verbose'"),
    ("LOG_FORMAT", "xml", "'xml'"),
    ("WORKERS", "\u00b2", "'\u00b2'"),
    ("REDIS_URL", "redis://127.0.0.1:6379/\u00b2", "database number"),
    ("REDIS_URL", "redis://127.0.0.1:\u0666\u0663\u0667\u0669/0", "URL"),
]


class TestRefusesToStart:
    """A bad environment stops the daemon before it listens, with one line that says why."""

    @pytest.mark.parametrize(("variable", "bad", "problem"), BAD_ENVIRONMENTS)
    def test_bad_variable(
        self,
        tmp_path: Path,
        listen_env: dict[str, str | None],
        variable: str,
        bad: str | None,
        problem: str,
    ) -> None:
        """
        Exit status non-zero and exactly one line of output, naming the
        variable and what is wrong with its value.
        """
        status, output = run_daemon({**listen_env, variable: bad}, tmp_path)
        assert status != 0, output
        (line,) = lines(output)
        assert variable in line
        assert problem in line

    def test_configuration_before_listening(
        self, tmp_path: Path, listen_env: dict[str, str | None]
    ) -> None:
        """
        The configuration is checked before any listener opens: with every
        listen port already taken, the error is still the bad variable's,
        not a port in use.
        """
        holders = []
        for variable in ("SOCKETMAP_LISTEN_ADDR", "POLICY_LISTEN_ADDR", "METRICS_LISTEN_ADDR"):
            holder = socket.create_server(("127.0.0.1", 0))
            holders.append(holder)
            listen_env[variable] = f"127.0.0.1:{holder.getsockname()[1]}"
        try:
            status, output = run_daemon({**listen_env, "LOG_LEVEL": "loud"}, tmp_path)
        finally:
            for holder in holders:
                holder.close()
        assert status != 0
        (line,) = lines(output)
        assert "LOG_LEVEL" in line

    def test_no_api_call(
        self,
        tmp_path: Path,
        listen_env: dict[str, str | None],
        fake_userli: FakeUserliServer,
    ) -> None:
        """A daemon that refuses to start never talks to Userli."""
        env = {**listen_env, "USERLI_BASE_URL": fake_userli.url, "LOOKUP_CACHE_TTL": "-1s"}
        status, _ = run_daemon(env, tmp_path)
        assert status != 0
        assert fake_userli.requests() == []

    @pytest.mark.parametrize(
        ("variable", "workers"),
        [
            ("SOCKETMAP_LISTEN_ADDR", "1"),
            ("METRICS_LISTEN_ADDR", "1"),
            ("SOCKETMAP_LISTEN_ADDR", "2"),
            ("POLICY_LISTEN_ADDR", "2"),
        ],
    )
    def test_port_in_use(
        self, tmp_path: Path, listen_env: dict[str, str | None], variable: str, workers: str
    ) -> None:
        """
        A listen address that is taken stops start-up (no daemon without its
        socketmap) with exit status 1 and one line on stderr naming the
        variable and the reason, no traceback; with worker processes too
        (whose TCP sockets allow sharing a port among themselves, not with
        another program).
        """
        env = {**listen_env, "WORKERS": workers, "REDIS_URL": "redis://127.0.0.1:1/0"}
        with socket.create_server(("127.0.0.1", 0)) as holder:
            port = holder.getsockname()[1]
            env[variable] = f"127.0.0.1:{port}"
            result = subprocess.run(
                twistd_command(),
                env=daemon_environment(env),
                cwd=tmp_path,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=60,
                check=False,
            )
        stderr = result.stderr.decode()
        assert result.returncode == 1, stderr
        assert lines(stderr) == [
            f"userli-postfix: {variable}: cannot listen on "
            f"tcp:{port}:interface=127.0.0.1:backlog=4096: address already in use"
        ], stderr
        assert "Traceback" not in result.stdout.decode()

    def test_port_in_use_daemon_mode(
        self, tmp_path: Path, listen_env: dict[str, str | None]
    ) -> None:
        """
        In twistd's daemon mode (no C{-n}) a taken address ends start-up
        too: twistd reports it to the waiting command (naming the variable),
        which exits 1, and no pid file is left behind.
        """
        with socket.create_server(("127.0.0.1", 0)) as holder:
            port = holder.getsockname()[1]
            listen_env["SOCKETMAP_LISTEN_ADDR"] = f"127.0.0.1:{port}"
            command = [
                argument
                for argument in twistd_command(f"--pidfile={tmp_path / 'pid'}")
                if argument not in ("-n", "--pidfile=")
            ]
            command.append(command.pop(command.index("userli-postfix")))
            result = subprocess.run(
                command,
                env=daemon_environment(listen_env),
                cwd=tmp_path,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=60,
                check=False,
            )
        assert result.returncode == 1
        assert "SOCKETMAP_LISTEN_ADDR: cannot listen" in result.stderr.decode()
        assert not (tmp_path / "pid").exists()


class TestCommandLine:
    """twistd's view of the plugin: help, options over the environment."""

    def test_help(self, tmp_path: Path) -> None:
        """C{--help} exits 0 and lists every option with its environment variable."""
        status, output = run_daemon({}, tmp_path, arguments=["--help"])
        assert status == 0, output
        for setting in SETTINGS:
            assert f"--{setting.option}" in output, setting.option
            assert setting.variable in output, setting.variable

    def test_option_over_environment(self, fake_userli: FakeUserliServer, tmp_path: Path) -> None:
        """A command-line option stands in for, and wins over, its variable."""
        daemon = Daemon(
            {"USERLI_BASE_URL": fake_userli.url, "USERLI_TOKEN": "wrong-token"},
            tmp_path / "daemon",
            arguments=["--userli-token", TOKEN],
        )
        with daemon:
            status, stdout, _ = postmap(ALICE, daemon.socketmap_target("mailbox"))
            assert (status, stdout) == (0, "1\n")
        assert fake_userli.requests()[0].headers["authorization"] == f"Bearer {TOKEN}"

    def test_environment_is_clean(self) -> None:
        """The harness gives the daemon none of the test process's own settings."""
        env = daemon_environment({"USERLI_TOKEN": "x", "LOG_LEVEL": None})
        assert env["USERLI_TOKEN"] == "x"
        assert "LOG_LEVEL" not in env
        assert all(s.variable not in env for s in SETTINGS if s.variable != "USERLI_TOKEN")


class TestLogs:
    """LOG_FORMAT and LOG_LEVEL shape every line the daemon writes."""

    def test_json_lines(self, start_daemon: StartDaemon, fake_userli: FakeUserliServer) -> None:
        """
        C{LOG_FORMAT=json}: every line from start to shutdown, failures
        included, is one JSON object with a level and a message.
        """
        daemon = start_daemon(env={"LOG_FORMAT": "json", "LOG_LEVEL": "debug"})
        postmap(ALICE, daemon.socketmap_target("mailbox"))
        fake_userli.set_mode("error")
        postmap(DOMAIN, daemon.socketmap_target("domain"))
        assert daemon.stop() == 0
        output = lines(daemon.output())
        assert output
        for line in output:
            record = json.loads(line)
            assert isinstance(record, dict), line
            assert isinstance(record.get("message"), str), line
            assert record.get("level") in ("debug", "info", "warn", "error", "critical"), line

    def test_level_filters(self, start_daemon: StartDaemon, fake_userli: FakeUserliServer) -> None:
        """C{LOG_LEVEL=error} drops info and warnings (start-up chatter, failed lookups)."""
        daemon = start_daemon(env={"LOG_FORMAT": "json", "LOG_LEVEL": "error"})
        fake_userli.set_mode("error")
        postmap(DOMAIN, daemon.socketmap_target("domain"))
        assert daemon.stop() == 0
        for line in lines(daemon.output()):
            assert json.loads(line)["level"] in ("error", "critical"), line

    def test_no_token_in_logs(
        self, start_daemon: StartDaemon, fake_userli: FakeUserliServer
    ) -> None:
        """The API token never appears in the log, even at debug level and on failures."""
        daemon = start_daemon(env={"LOG_LEVEL": "debug"})
        postmap(ALICE, daemon.socketmap_target("mailbox"))
        fake_userli.set_mode("refused")
        postmap(DOMAIN, daemon.socketmap_target("domain"))
        assert daemon.stop() == 0
        assert TOKEN not in daemon.output()

    def test_memory_backend_announced(self, start_daemon: StartDaemon) -> None:
        """Without REDIS_URL the daemon says at start-up that it keeps state in memory."""
        daemon = start_daemon(env={"REDIS_URL": None})
        assert daemon.stop() == 0
        assert "REDIS_URL" in daemon.output()


class TestShutdown:
    """SIGTERM (docker stop, systemd) ends the daemon cleanly."""

    def test_sigterm(self, start_daemon: StartDaemon) -> None:
        """SIGTERM exits with status 0 and closes every listener."""
        daemon = start_daemon()
        postmap(ALICE, daemon.socketmap_target("mailbox"))
        assert daemon.stop() == 0

    def test_sigterm_with_open_connections(self, start_daemon: StartDaemon) -> None:
        """An idle Postfix connection left open does not hold up a clean exit."""
        daemon = start_daemon()
        assert daemon.socketmap is not None and not isinstance(daemon.socketmap, str)
        with socket.create_connection(daemon.socketmap, timeout=30):
            assert daemon.stop() == 0

    def test_redis_unreachable(self, start_daemon: StartDaemon) -> None:
        """
        A Redis that is down at start-up does not stop the daemon: lookups
        are answered from the API, and it still exits cleanly.
        """
        daemon = start_daemon(env={"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
        status, stdout, _ = postmap(ALICE, daemon.socketmap_target("mailbox"))
        assert (status, stdout) == (0, "1\n")
        assert daemon.stop() == 0
