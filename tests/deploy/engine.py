"""
A Docker engine for the image tests, and the base image they build on.

No image registry is reachable from the test machines, so nothing here
pulls: the base image is a C{debootstrap --variant=minbase} of the host's
own Debian release with C{python3} and C{python3-venv}, imported with
C{docker import} and kept (by its tag) for the next run.

The engine is the one C{docker} already talks to when there is one;
otherwise this module starts a private C{dockerd} (vfs storage, no iptables,
no bridge: containers use the host's network) whose data, run-time state,
pid file and socket live in one directory of their own, so it cannot clash
with a system Docker, and whose data directory survives between runs (that
is where the cached base image lives).

The API:

 - L{Engine}: C{.docker(*args)}, C{.build_command()}, C{.stop()}
 - L{start_engine}(directory) -> L{Engine}, raising L{Unavailable} with the
   reason when no engine can run here
 - L{base_image}(engine, workdir) -> the base image's tag
 - L{pip_build_secrets}(directory) -> C{--secret} arguments for C{docker build}
 - L{apt_mirror}() -> the Debian mirror the host's apt uses
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

#: Where the private engine keeps everything, unless overridden.
DEFAULT_DIRECTORY = Path(tempfile.gettempdir()) / "userli-postfix-dockerd"
DIRECTORY_VARIABLE = "USERLI_POSTFIX_DOCKERD_DIR"

#: debootstrap and a first build take minutes on a loaded machine.
SLOW = 900.0


class Unavailable(Exception):
    """No Docker engine can run here (the reason is the message)."""


def _run(
    argv: Sequence[str],
    env: dict[str, str] | None = None,
    timeout: float = 120.0,
    stdin: int | None = subprocess.DEVNULL,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv),
        env=env,
        stdin=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _docker_clients() -> list[str]:
    """Every distinct C{docker} executable on PATH, in PATH order."""
    found: list[str] = []
    seen: set[str] = set()
    for entry in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(entry or ".") / "docker"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            real = os.path.realpath(candidate)
            if real not in seen:
                seen.add(real)
                found.append(str(candidate))
    return found


class Engine:
    """A Docker engine reachable through C{DOCKER_HOST} (or the default)."""

    def __init__(self, host: str | None, process: subprocess.Popen[bytes] | None = None) -> None:
        self.env = dict(os.environ)
        if host is not None:
            self.env["DOCKER_HOST"] = host
        self._process = process
        clients = _docker_clients()
        if not clients:
            raise Unavailable("no docker client on PATH")
        self.client = clients[0]
        self._buildkit_client = self._find_buildkit_client(clients)

    def docker(
        self, *args: str, timeout: float = 120.0, check: bool = True, client: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run C{docker ARGS}; raise with its output when C{check} and it fails."""
        result = _run([client or self.client, *args], env=self.env, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(
                f"docker {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
            )
        return result

    def _find_buildkit_client(self, clients: list[str]) -> str | None:
        """
        A client whose C{docker build} uses BuildKit (needed for build
        secrets): one with the buildx plugin, or one from before Docker 23,
        which has BuildKit built in.
        """
        for client in clients:
            if _run([client, "buildx", "version"], env=self.env).returncode == 0:
                return client
            version = _run([client, "version", "--format", "{{.Client.Version}}"], env=self.env)
            match = re.match(r"(\d+)\.", version.stdout.strip())
            if match is not None and int(match.group(1)) < 23:
                return client
        return None

    def build(self, arguments: Sequence[str], timeout: float = SLOW) -> str:
        """C{docker build ARGUMENTS} with BuildKit; its output."""
        if self._buildkit_client is None:
            raise Unavailable(
                "no docker client that builds with BuildKit (neither the buildx plugin "
                "nor a client older than Docker 23)"
            )
        env = dict(self.env, DOCKER_BUILDKIT="1", BUILDKIT_PROGRESS="plain")
        result = _run(
            [self._buildkit_client, "build", "--progress=plain", *arguments],
            env=env,
            timeout=timeout,
        )
        output = result.stdout + result.stderr
        if result.returncode != 0:
            raise AssertionError(f"docker build failed:\n{output[-8000:]}")
        return output

    def stop(self) -> None:
        """Stop the private engine, if this module started one."""
        if self._process is None or self._process.poll() is not None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


def _answers(host: str | None) -> bool:
    clients = _docker_clients()
    if not clients:
        return False
    env = dict(os.environ)
    if host is not None:
        env["DOCKER_HOST"] = host
    try:
        return _run([clients[0], "info"], env=env, timeout=30).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def start_engine(directory: Path | None = None) -> Engine:
    """
    The engine C{docker} already reaches, else a private C{dockerd} started
    in C{directory} (reused when one from an earlier run still answers there).

    @raise Unavailable: with the reason, when none can run.
    """
    if not _docker_clients():
        raise Unavailable("no docker client on PATH (apt-get install docker.io)")
    if _answers(None):
        return Engine(None)
    if directory is None:
        directory = Path(os.environ.get(DIRECTORY_VARIABLE) or DEFAULT_DIRECTORY)
    directory.mkdir(parents=True, exist_ok=True)
    socket_path = directory / "docker.sock"
    host = f"unix://{socket_path}"
    if _answers(host):
        return Engine(host)
    # In /usr/sbin: scripts/test.sh puts it on PATH.
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        raise Unavailable("dockerd is not installed or not on PATH (apt-get install docker.io)")
    if os.geteuid() != 0:
        raise Unavailable("starting a private dockerd needs root")
    log = open(directory / "dockerd.log", "ab")
    process = subprocess.Popen(
        [
            dockerd,
            "--storage-driver=vfs",
            "--iptables=false",
            "--ip6tables=false",
            "--bridge=none",
            f"--data-root={directory / 'data'}",
            f"--exec-root={directory / 'exec'}",
            f"--pidfile={directory / 'dockerd.pid'}",
            f"--host={host}",
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    give_up = time.monotonic() + 120
    while not _answers(host):
        if process.poll() is not None or time.monotonic() > give_up:
            if process.poll() is None:
                process.kill()
                process.wait()
            tail = (directory / "dockerd.log").read_text("utf-8", "replace")[-1500:]
            raise Unavailable(f"dockerd did not start here:\n{tail}")
        time.sleep(0.5)
    return Engine(host, process)


def apt_mirror() -> tuple[str, str]:
    """
    The Debian mirror and release the host's apt uses: (URI, codename),
    read from /etc/apt/sources.list and sources.list.d (one-line and deb822).
    """
    release = ""
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            release = line.split("=", 1)[1].strip().strip('"')
    apt = Path("/etc/apt")
    candidates: list[tuple[str, list[str], list[str]]] = []
    files = [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*"))]
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text("utf-8", "replace")
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                for raw in stanza.splitlines():
                    if raw.startswith("#") or ":" not in raw:
                        continue
                    name, _, value = raw.partition(":")
                    fields[name.strip().lower()] = value.strip()
                if (
                    "deb" in fields.get("types", "").split()
                    and fields.get("enabled", "yes") != "no"
                ):
                    for uri in fields.get("uris", "").split():
                        candidates.append(
                            (
                                uri,
                                fields.get("suites", "").split(),
                                fields.get("components", "").split(),
                            )
                        )
        elif path.name == "sources.list" or path.suffix == ".list":
            for raw in text.splitlines():
                words = re.sub(r"\[[^\]]*\]", "", raw.split("#", 1)[0]).split()
                if len(words) >= 4 and words[0] == "deb":
                    candidates.append((words[1], [words[2]], words[3:]))
    for uri, suites, components in candidates:
        if release in suites and "main" in components:
            return uri, release
    raise Unavailable(f"no Debian mirror for {release or 'this release'} in the apt sources")


def base_image(engine: Engine, workdir: Path) -> str:
    """
    The tag of a minimal Debian (the host's release) with python3 and
    python3-venv: reused when the engine has it, else made with debootstrap
    from the host's apt mirror and imported.
    """
    uri, release = apt_mirror()
    tag = f"userli-postfix-test-base:{release}"
    if engine.docker("image", "inspect", tag, check=False).returncode == 0:
        return tag
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None:
        raise AssertionError("debootstrap is not installed (apt-get install debootstrap)")
    root = Path(tempfile.mkdtemp(prefix="base-", dir=workdir))
    # mkdtemp makes it 0700, and it becomes the image's "/": no other user
    # could reach any file.
    root.chmod(0o755)
    try:
        result = _run(
            [
                debootstrap,
                "--variant=minbase",
                "--include=python3,python3-venv",
                release,
                str(root),
                uri,
            ],
            timeout=SLOW,
        )
        if result.returncode != 0:
            raise AssertionError(
                f"debootstrap failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
            )
        # Package lists and downloaded .debs are no use in the image.
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for item in (root / leftover).glob("*"):
                if item.is_file():
                    item.unlink()
        tar = subprocess.Popen(
            ["tar", "-C", str(root), "--numeric-owner", "-c", "."],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        imported = subprocess.run(
            [engine.client, "import", "-", tag],
            stdin=tar.stdout,
            env=engine.env,
            capture_output=True,
            text=True,
            timeout=SLOW,
            check=False,
        )
        assert tar.stdout is not None
        tar.stdout.close()
        tar.wait()
        if imported.returncode != 0:
            raise AssertionError(f"docker import failed:\n{imported.stderr}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return tag


#: pip settings that say where packages come from and how to get there; a
#: local path (find-links, a file: index, a constraints file) is not there
#: inside the build, so it is left out.
_PIP_KEYS = (
    "index-url",
    "extra-index-url",
    "trusted-host",
    "proxy",
    "timeout",
    "default-timeout",
    "retries",
)


def _pip_settings() -> dict[str, str]:
    """The host's effective pip settings (files, then PIP_* variables)."""
    result = _run([sys.executable, "-m", "pip", "config", "list"])
    settings: dict[str, str] = {}
    overriding: dict[str, str] = {}
    for line in result.stdout.splitlines():
        match = re.match(r"^(?P<scope>[^.]*)\.(?P<key>[^=]+)='(?P<value>.*)'$", line)
        if match is None:
            continue
        target = overriding if match.group("scope") == ":env:" else settings
        target[match.group("key")] = match.group("value")
    settings.update(overriding)
    return settings


def pip_build_secrets(directory: Path) -> list[str]:
    """
    C{--secret} arguments that hand the build the host's pip configuration
    (where packages come from) and the CA bundle pip trusts here.  The files
    are written to C{directory}; the Dockerfile mounts them for the pip step
    only.
    """
    settings = _pip_settings()
    lines = ["[global]"]
    for key in _PIP_KEYS:
        value = settings.get(key)
        if not value:
            continue
        if key.endswith("index-url"):
            value = " ".join(u for u in value.split() if not u.startswith("file:"))
            if not value:
                continue
        lines.append(f"{key} = {value}")
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    if proxy and "proxy" not in settings:
        lines.append(f"proxy = {proxy}")
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "pip.conf"
    config.write_text("\n".join(lines) + "\n")
    arguments = ["--secret", f"id=pip.conf,src={config}"]
    for source in (
        settings.get("cert"),
        os.environ.get("SSL_CERT_FILE"),
        os.environ.get("REQUESTS_CA_BUNDLE"),
    ):
        if source and Path(source).is_file():
            arguments += ["--secret", f"id=pip-ca,src={source}"]
            break
    return arguments
