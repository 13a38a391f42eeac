"""
The image's health check (deploy/docker/healthcheck.py): where it looks for
/health for each form of METRICS_LISTEN_ADDR, and its answer against a real
HTTP server.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from types import ModuleType

import pytest

from tests.integration.harness import ROOT, free_port


def _load() -> ModuleType:
    path = ROOT / "deploy" / "docker" / "healthcheck.py"
    spec = importlib.util.spec_from_file_location("healthcheck", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


healthcheck = _load()
Target = healthcheck.Target


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, Target(host="127.0.0.1", port=10002)),
        ("", Target(host="127.0.0.1", port=10002)),
        (":9100", Target(host="127.0.0.1", port=9100)),
        ("0.0.0.0:9100", Target(host="127.0.0.1", port=9100)),
        ("192.0.2.7:9100", Target(host="192.0.2.7", port=9100)),
        ("[::]:9100", Target(host="::1", port=9100)),
        ("[::1]:9100", Target(host="::1", port=9100)),
        ("/run/userli-postfix/metrics.sock", Target(path="/run/userli-postfix/metrics.sock")),
        ("tcp:9100:interface=127.0.0.2:backlog=4096", Target(host="127.0.0.2", port=9100)),
        ("tcp6:port=9100:interface=\\:\\:1", Target(host="::1", port=9100)),
        ("unix:/run/m.sock:mode=666:lockfile=1", Target(path="/run/m.sock")),
        ("ssl:9443:privateKey=k.pem", Target(host="127.0.0.1", port=9443, tls=True)),
    ],
)
def test_target(value: str | None, expected: object) -> None:
    """Each listen address form of the daemon maps to where /health is reached."""
    assert healthcheck.target(value) == expected


@pytest.mark.parametrize("value", ["systemd:domain=INET:index=0", "localhost", "tcp:interface=x"])
def test_target_refused(value: str) -> None:
    """An address the check cannot reach from inside the container is an error, not a guess."""
    with pytest.raises(ValueError):
        healthcheck.target(value)


class _Handler(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        code = self.status if self.path == "/health" else 404
        self.send_response(code)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[HTTPServer]:
    httpd = HTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_healthy_on_200(server: HTTPServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 200 from /health at METRICS_LISTEN_ADDR: exit status 0."""
    monkeypatch.setenv("METRICS_LISTEN_ADDR", f"127.0.0.1:{server.server_address[1]}")
    assert healthcheck.main() == 0


def test_unhealthy_otherwise(server: HTTPServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 503, or nothing listening: exit status 1."""
    monkeypatch.setattr(_Handler, "status", 503)
    monkeypatch.setenv("METRICS_LISTEN_ADDR", f"127.0.0.1:{server.server_address[1]}")
    assert healthcheck.main() == 1
    monkeypatch.setenv("METRICS_LISTEN_ADDR", f"127.0.0.1:{free_port()}")
    assert healthcheck.main() == 1
