"""
deploy/compose.yaml, as Compose itself reads it (C{docker compose config}
or C{docker-compose config}, whichever is installed; no engine needed).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

import pytest
import yaml

from tests.integration.harness import ROOT

COMPOSE_FILE = ROOT / "deploy" / "compose.yaml"


def compose_command() -> list[str] | None:
    """C{docker compose} when the plugin is there, else C{docker-compose}."""
    if shutil.which("docker") is not None:
        probe = subprocess.run(
            ["docker", "compose", "version"], capture_output=True, text=True, check=False
        )
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose") is not None:
        return ["docker-compose"]
    return None


pytestmark = pytest.mark.skipif(
    compose_command() is None, reason="neither docker compose nor docker-compose is installed"
)


def config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """C{compose -f deploy/compose.yaml config} with C{env} added to a clean environment."""
    command = compose_command()
    assert command is not None
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("USERLI_", "REDIS_"))}
    environment.update(env)
    return subprocess.run(
        [*command, "-f", str(COMPOSE_FILE), "config"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def resolved() -> dict[str, Any]:
    result = config({"USERLI_TOKEN": "token", "USERLI_BASE_URL": "https://users.example.org"})
    assert result.returncode == 0, result.stderr
    document: dict[str, Any] = yaml.safe_load(result.stdout)
    return document


def test_compose_file_valid() -> None:
    """
    Compose accepts the file: the daemon and Redis, each with a health
    check; the daemon starts once Redis is healthy and uses it; Redis keeps
    its data in a named volume.
    """
    services = resolved()["services"]
    daemon, redis = services["userli-postfix"], services["redis"]
    assert daemon["healthcheck"]["test"][:2] == ["CMD", "python3"]
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert daemon["depends_on"]["redis"]["condition"] == "service_healthy"
    assert daemon["environment"]["REDIS_URL"] == "redis://redis:6379/0"
    assert daemon["environment"]["USERLI_TOKEN"] == "token"
    volume = redis["volumes"][0]
    source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
    assert source in resolved()["volumes"]


def test_compose_publishes_on_loopback_only() -> None:
    """
    Every published port is bound to 127.0.0.1, and only the ones on by
    default (no SASL port: SASL goes over a UNIX socket).
    """
    daemon = resolved()["services"]["userli-postfix"]
    published = []
    for port in daemon["ports"]:
        if isinstance(port, dict):
            assert port["host_ip"] == "127.0.0.1", port
            published.append(int(port["target"]))
        else:
            host_ip, _, rest = port.partition(":")
            assert host_ip == "127.0.0.1", port
            published.append(int(rest.split(":")[-1].split("/")[0]))
    assert sorted(published) == [10001, 10002, 10003]


def test_compose_requires_the_token() -> None:
    """Without USERLI_TOKEN, Compose refuses the file and says what is missing."""
    result = config({"USERLI_BASE_URL": "https://users.example.org"})
    assert result.returncode != 0
    assert "USERLI_TOKEN" in result.stderr
