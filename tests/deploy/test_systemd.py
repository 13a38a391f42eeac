"""
The systemd units in deploy/systemd: checked by systemd's own tools, and
the socket activation they describe run for real.

C{systemd-analyze verify} and C{security --offline} read the unit files
without a running systemd.  The activation test hands the daemon its
listening sockets the way systemd does (C{systemd-socket-activate}: the
LISTEN_FDS protocol with the socket units' FileDescriptorNames) and starts it
with the listen addresses written in the service unit, so the unit's
C{systemd:} endpoint descriptions are what is tested.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fake_userli import TOKEN, FakeUserliServer
from tests.integration.clients import PolicyClient, SASLClient, SocketmapClient, end_of_message
from tests.integration.harness import (
    ROOT,
    STARTUP_DEADLINE,
    accepts,
    daemon_environment,
    free_port,
    http_get,
    postmap,
    twistd_command,
    wait_for,
)

UNITS = ROOT / "deploy" / "systemd"
SERVICE = UNITS / "userli-postfix.service"
SOCKETS = sorted(UNITS.glob("*.socket"))

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed (apt: systemd)"
)


def unit_settings(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) for every setting of a unit file, in order."""
    settings = []
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.append((section, key.strip(), value.strip()))
    return settings


def service_environment() -> dict[str, str]:
    """The Environment= lines of the service."""
    environment = {}
    for section, key, value in unit_settings(SERVICE):
        if section == "Service" and key == "Environment":
            name, _, text = value.partition("=")
            environment[name] = text
    return environment


def unit_directory() -> Path:
    """Where this system's systemd keeps its own units (sysinit.target, ...)."""
    result = subprocess.run(
        ["systemd-path", "systemd-system-unit"], capture_output=True, text=True, check=True
    )
    return Path(result.stdout.strip())


def verify(root: Path, units: list[Path]) -> subprocess.CompletedProcess[str]:
    """
    C{systemd-analyze verify} of C{units} installed in an image of a system
    at C{root}: this system's own units, the program the service starts (a
    stand-in), and the units under test in /etc/systemd/system.
    """
    system = root / "etc" / "systemd" / "system"
    system.mkdir(parents=True, exist_ok=True)
    library = root / str(unit_directory()).lstrip("/")
    if not library.exists():
        shutil.copytree(unit_directory(), library, symlinks=True)
    for _section, key, value in unit_settings(SERVICE):
        if key == "ExecStart":
            program = root / value.split()[0].lstrip("-@:+!").lstrip("/")
            program.parent.mkdir(parents=True, exist_ok=True)
            program.write_text("#!/bin/sh\n")
            program.chmod(0o755)
    for unit in units:
        shutil.copy(unit, system / unit.name)
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=no", f"--root={root}", *(u.name for u in units)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_units_verify_clean(tmp_path: Path) -> None:
    """C{systemd-analyze verify} has nothing to say about the service and its sockets."""
    assert SOCKETS, "no socket units"
    result = verify(tmp_path, [SERVICE, *SOCKETS])
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The verify check would fail on a unit with a mistake in it."""
    broken = tmp_path / "userli-postfix.service"
    broken.write_text(SERVICE.read_text().replace("ProtectHome=", "ProtectHomes=", 1))
    result = verify(tmp_path / "root", [broken, *SOCKETS])
    assert "ProtectHomes" in result.stdout + result.stderr


def test_service_exposure_at_most_2() -> None:
    """C{systemd-analyze security --offline=true} rates the service 2.0 or better."""
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(SERVICE)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout + result.stderr)
    assert match is not None, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0, result.stdout


def test_sockets_as_postfix_needs() -> None:
    """
    Socketmap and policy listen on loopback TCP; SASL on private/auth in
    Postfix's queue directory, owned by postfix and closed to others; every
    socket is named as the service's endpoint descriptions expect.
    """
    listens = {}
    for unit in SOCKETS:
        settings = {key: value for _s, key, value in unit_settings(unit)}
        listens[settings["FileDescriptorName"]] = settings
        assert settings["Service"] == SERVICE.name
    assert listens["socketmap"]["ListenStream"].startswith("127.0.0.1:")
    assert listens["policy"]["ListenStream"].startswith("127.0.0.1:")
    sasl = listens["sasl"]
    assert sasl["ListenStream"] == "/var/spool/postfix/private/auth"
    assert (sasl["SocketUser"], sasl["SocketGroup"], sasl["SocketMode"]) == (
        "postfix",
        "postfix",
        "0660",
    )
    environment = service_environment()
    for variable, name in (
        ("SOCKETMAP_LISTEN_ADDR", "socketmap"),
        ("POLICY_LISTEN_ADDR", "policy"),
        ("SASL_LISTEN_ADDR", "sasl"),
    ):
        assert f":name={name}" in environment[variable]


class Activated:
    """The daemon started by C{systemd-socket-activate} with the units' sockets."""

    def __init__(self, directory: Path, userli: FakeUserliServer) -> None:
        self.socketmap = ("127.0.0.1", free_port())
        self.policy = ("127.0.0.1", free_port())
        self.sasl = str(directory / "auth")
        self.metrics = ("127.0.0.1", free_port())
        self.log_path = directory / "daemon.log"
        environment = service_environment()
        environment.update(
            USERLI_BASE_URL=userli.url,
            USERLI_TOKEN=TOKEN,
            METRICS_LISTEN_ADDR=f"{self.metrics[0]}:{self.metrics[1]}",
        )
        # systemd-socket-activate passes on only what -E names.
        env = daemon_environment(environment)
        command = [
            "systemd-socket-activate",
            f"--listen={self.socketmap[0]}:{self.socketmap[1]}",
            f"--listen={self.policy[0]}:{self.policy[1]}",
            f"--listen={self.sasl}",
            "--fdname=socketmap:policy:sasl",
        ]
        command += [f"--setenv={name}={value}" for name, value in env.items()]
        command += twistd_command()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )

    def output(self) -> str:
        return self.log_path.read_text("utf-8", "replace")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout=STARTUP_DEADLINE)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()


@pytest.fixture
def activated(tmp_path: Path) -> Iterator[Activated]:
    """A socket-activated daemon against a fake Userli."""
    from tests.integration.conftest import userli_data

    if shutil.which("systemd-socket-activate") is None:
        pytest.skip("systemd-socket-activate not installed (apt: systemd)")
    userli = FakeUserliServer(userli_data())
    userli.start()
    daemon = Activated(tmp_path, userli)
    try:
        # The sockets exist before the daemon: that is the point.
        wait_for(lambda: accepts(daemon.socketmap), "systemd-socket-activate to listen")
        yield daemon
    finally:
        daemon.stop()
        userli.stop()


@pytest.mark.integration
def test_socket_activation(activated: Activated) -> None:
    """
    On sockets it inherited (TCP socketmap and policy, the UNIX SASL socket),
    the daemon answers a lookup, a policy request and a SASL handshake and
    login; it opened no listener of its own but /metrics; SIGTERM ends it
    with status 0.
    """
    status, stdout, stderr = postmap(
        "info@example.org",
        f"socketmap:inet:{activated.socketmap[0]}:{activated.socketmap[1]}:alias",
    )
    assert (status, stdout.strip(), stderr) == (0, "alice@example.org", ""), activated.output()
    with SocketmapClient(activated.socketmap) as client:
        assert client.ask(b"mailbox alice@example.org") == b"OK 1"
    with PolicyClient(activated.policy) as client:
        assert client.ask(end_of_message("alice@example.org", "alice@example.org")) == "DUNNO"
    with SASLClient(activated.sasl) as client:
        assert client.plain("alice@example.org", "alice-password").startswith(b"OK\t1\t")
    wait_for(lambda: accepts(activated.metrics), "/metrics")
    status_code, body = http_get(f"http://{activated.metrics[0]}:{activated.metrics[1]}/health")
    assert status_code == 200, body
    output = activated.output()
    for name in ("socketmap", "policy", "sasl"):
        assert re.search(rf"{name} listening on systemd:domain=\w+:name={name}", output), output
    assert activated.stop() == 0, activated.output()
