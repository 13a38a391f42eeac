"""
The Docker image, built and run for real (marker C{docker}).

The image is built from the repository's Dockerfile on a base image made
here (no registry is reachable: see L{tests.deploy.engine}), with the host's
pip configuration and CA bundle handed in as build secrets.  The container
runs with the host's network against a fake Userli on 127.0.0.1, on ports
picked free, and is asked as Postfix would ask it.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy.engine import SLOW, Engine, base_image, pip_build_secrets
from tests.fake_userli import TOKEN, FakeUserliServer
from tests.integration.clients import PolicyClient, end_of_message
from tests.integration.harness import ROOT, free_port, postmap, wait_for

pytestmark = [pytest.mark.docker, pytest.mark.timeout(1800)]

IMAGE = "userli-postfix:test"


class Built:
    """What the build used: the base image and the secrets' files."""

    def __init__(self, base: str, secrets: list[str], output: str) -> None:
        self.base = base
        self.secrets = secrets
        self.output = output


@pytest.fixture(scope="module")
def image(docker_engine: Engine, module_tmp: Path) -> Built:
    """The image, built from the Dockerfile on the test base image."""
    base = base_image(docker_engine, module_tmp)
    secrets = pip_build_secrets(module_tmp / "pip")
    output = docker_engine.build(
        [
            "--network=host",
            "--build-arg",
            f"BASE_IMAGE={base}",
            *secrets,
            "--tag",
            IMAGE,
            str(ROOT),
        ]
    )
    return Built(base, secrets, output)


class Container:
    """A container of the image with its listeners on free loopback ports."""

    def __init__(self, engine: Engine, userli: FakeUserliServer) -> None:
        self.engine = engine
        self.name = f"userli-postfix-test-{uuid.uuid4().hex[:12]}"
        self.socketmap = ("127.0.0.1", free_port())
        self.policy = ("127.0.0.1", free_port())
        self.metrics = ("127.0.0.1", free_port())
        self.userli = userli

    def run(self) -> None:
        """Start it and wait until every listener accepts."""
        env = {
            "USERLI_BASE_URL": self.userli.url,
            "USERLI_TOKEN": TOKEN,
            "SOCKETMAP_LISTEN_ADDR": f"{self.socketmap[0]}:{self.socketmap[1]}",
            "POLICY_LISTEN_ADDR": f"{self.policy[0]}:{self.policy[1]}",
            # Not the default port: the health check must follow it.
            "METRICS_LISTEN_ADDR": f"{self.metrics[0]}:{self.metrics[1]}",
        }
        arguments = ["run", "--detach", "--name", self.name, "--network=host"]
        # As deploy/compose.yaml runs it: read-only, no capabilities.
        arguments += [
            "--read-only",
            "--tmpfs=/tmp",
            "--cap-drop=ALL",
            "--security-opt=no-new-privileges:true",
        ]
        for name, value in env.items():
            arguments += ["--env", f"{name}={value}"]
        # Checked every second rather than every 30 s, so the test does not wait.
        arguments += ["--health-interval=1s", IMAGE]
        self.engine.docker(*arguments)
        wait_for(self._listening, f"container {self.name} to listen", deadline=60)

    def _listening(self) -> bool:
        from tests.integration.harness import accepts

        if not self.state()["Running"]:
            raise AssertionError(f"the container exited:\n{self.logs()}")
        return all(accepts(a) for a in (self.socketmap, self.policy, self.metrics))

    def state(self) -> dict[str, object]:
        """The container's State from C{docker inspect}."""
        inspected = self.engine.docker("inspect", "--format", "{{json .State}}", self.name)
        state: dict[str, object] = json.loads(inspected.stdout)
        return state

    def health(self) -> str:
        health = self.state().get("Health") or {}
        assert isinstance(health, dict)
        return str(health.get("Status", ""))

    def logs(self) -> str:
        result = self.engine.docker("logs", self.name, check=False)
        return result.stdout + result.stderr

    def remove(self) -> None:
        self.engine.docker("rm", "--force", self.name, check=False)


def _running(engine: Engine, userli: FakeUserliServer) -> Iterator[Container]:
    running = Container(engine, userli)
    try:
        running.run()
        yield running
    finally:
        running.remove()


@pytest.fixture(scope="module")
def container(
    docker_engine: Engine, image: Built, module_userli: FakeUserliServer
) -> Iterator[Container]:
    """
    A running container of the image, shared by the tests that only ask it
    questions (with the vfs storage driver every new container is a full
    copy of the image).
    """
    yield from _running(docker_engine, module_userli)


def test_lookup_answered(container: Container) -> None:
    """The container answers Postfix's own socketmap client (C{postmap -q})."""
    target = f"socketmap:inet:{container.socketmap[0]}:{container.socketmap[1]}:alias"
    status, stdout, stderr = postmap("team@example.org", target)
    assert (status, stderr) == (0, ""), container.logs()
    assert stdout.strip() == "alice@example.org,bob@example.org"
    status, stdout, stderr = postmap("nobody@example.org", target)
    assert (status, stdout, stderr) == (1, "", "")


def test_policy_answered(container: Container) -> None:
    """The container answers policy requests: within quota DUNNO, over it REJECT."""
    with PolicyClient(container.policy) as client:
        answers = [
            client.ask(end_of_message("limited@example.org", "limited@example.org"))
            for _ in range(3)
        ]
    assert answers[:2] == ["DUNNO", "DUNNO"]
    assert answers[2].startswith("REJECT"), answers


def test_runs_as_non_root(container: Container) -> None:
    """The daemon (PID 1 of the container) runs as an unprivileged user."""
    result = container.engine.docker(
        "exec", container.name, "python3", "-c", "import os; print(os.getuid(), os.getgid())"
    )
    uid, gid = (int(n) for n in result.stdout.split())
    assert uid != 0 and gid != 0
    status = container.engine.docker("exec", container.name, "cat", "/proc/1/status").stdout
    uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
    assert "0" not in uids, status


def test_turns_healthy(container: Container) -> None:
    """
    The HEALTHCHECK passes with the metrics listener moved off its default
    port: it follows METRICS_LISTEN_ADDR.
    """
    wait_for(lambda: container.health() == "healthy", "the container to turn healthy", 60)
    health = container.state()["Health"]
    assert isinstance(health, dict)
    assert all(entry["ExitCode"] == 0 for entry in health["Log"][-1:]), health


def test_health_check_follows_metrics_listen_addr(container: Container) -> None:
    """
    The health check run in the container with METRICS_LISTEN_ADDR pointing
    where nothing listens fails (exit 1), so its pass comes from asking the
    daemon where that variable says.
    """
    result = container.engine.docker(
        "exec",
        "--env",
        f"METRICS_LISTEN_ADDR=127.0.0.1:{free_port()}",
        container.name,
        "python3",
        "-I",
        "/opt/userli-postfix/healthcheck.py",
        check=False,
    )
    assert result.returncode == 1, result
    assert "/health" in result.stderr


def _saved(engine: Engine, image: str) -> tarfile.TarFile:
    """C{docker save IMAGE}, opened (no container is made: cheap on vfs)."""
    saved = subprocess.run(
        [engine.client, "save", image],
        env=engine.env,
        capture_output=True,
        timeout=SLOW,
        check=True,
    ).stdout
    return tarfile.open(fileobj=io.BytesIO(saved))


def _diff_ids(archive: tarfile.TarFile) -> tuple[list[str], list[str]]:
    """The image's layer files in the archive and their content ids, in order."""
    manifest = json.load(archive.extractfile("manifest.json"))  # type: ignore[arg-type]
    config = json.load(archive.extractfile(manifest[0]["Config"]))  # type: ignore[arg-type]
    return manifest[0]["Layers"], config["rootfs"]["diff_ids"]


def added_files(engine: Engine, image: str, base: str) -> dict[str, str]:
    """
    Every regular file in the layers C{image} adds on top of C{base}:
    path -> sha256 of its content.  The builder stage is no part of it.
    """
    _, base_ids = _diff_ids(_saved(engine, base))
    archive = _saved(engine, image)
    layers, ids = _diff_ids(archive)
    assert ids[: len(base_ids)] == base_ids, "the image is not built on the base image"
    files: dict[str, str] = {}
    for layer in layers[len(base_ids) :]:
        extracted = archive.extractfile(layer)
        assert extracted is not None
        with tarfile.open(fileobj=extracted) as content:
            for member in content:
                if member.isfile():
                    data = content.extractfile(member)
                    assert data is not None
                    files[member.name] = hashlib.sha256(data.read()).hexdigest()
    return files


def test_no_build_secrets_in_image(docker_engine: Engine, image: Built) -> None:
    """
    The pip configuration and CA bundle given to the build are in no layer
    the image adds to its base, nor is pip itself: the runtime image has the
    daemon's virtualenv and nothing of the build.
    """
    secret_files = [
        Path(argument.split("src=", 1)[1]) for argument in image.secrets if "src=" in argument
    ]
    assert secret_files, "the build was given no secrets to check for"
    secret_hashes = {hashlib.sha256(p.read_bytes()).hexdigest() for p in secret_files}
    added = added_files(docker_engine, IMAGE, image.base)
    leaked = sorted(path for path, digest in added.items() if digest in secret_hashes)
    assert leaked == [], leaked
    assert [p for p in added if p.endswith("pip.conf") or "run/secrets" in p] == []
    assert [p for p in added if "/site-packages/pip/" in p] == []
    assert any(p.startswith("opt/userli-postfix/") for p in added)


def test_docker_stop_exits_zero(container: Container) -> None:
    """
    C{docker stop} with a 5 s grace (half Docker's default) ends the daemon,
    after the traffic of the tests above, by SIGTERM with exit status 0: had
    it needed longer, Docker would have killed it (137).  Last in this
    module: it stops the container the tests above share.
    """
    container.engine.docker("stop", "--time", "5", container.name, timeout=60)
    state = container.state()
    assert state["Running"] is False
    assert (state["ExitCode"], state["OOMKilled"]) == (0, False), container.logs()
    assert "Stopped" in container.logs()
