"""
The HTTP listener of the running daemon: C{/metrics} as Prometheus parses
it, C{/health}, and C{/ready} following Userli's availability.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from tests.fake_userli import ERROR, NORMAL, REFUSED, SLOW, FakeUserliServer
from tests.integration.conftest import DOMAIN, StartDaemon
from tests.integration.harness import Daemon, http_get, netstring, postmap

pytestmark = pytest.mark.integration

PREFIX = "userli_postfix_adapter_"

# /ready's body while Userli answers, for a daemon of one process.
READY = {
    "status": "ready",
    "circuit_breaker": "closed",
    "workers": {"alive": 1, "configured": 1},
}

#: compatibility.md's table: every metric, its type and its label names.
METRICS = {
    "request_duration_seconds": ("histogram", {"handler", "status"}),
    "requests": ("counter", {"handler", "status"}),
    "active_connections": ("gauge", set()),
    "connection_pool_usage": ("gauge", set()),
    "http_client_duration_seconds": ("histogram", {"endpoint", "status_code"}),
    "http_client_requests": ("counter", {"endpoint", "status_code"}),
    "health_check_status": ("gauge", set()),
    "policy_active_connections": ("gauge", set()),
    "policy_requests": ("counter", {"stage", "action"}),
    "policy_request_duration_seconds": ("histogram", {"stage", "action"}),
    "quota_exceeded": ("counter", set()),
    "quota_checks": ("counter", {"result"}),
    "policy_connection_pool_full": ("counter", set()),
    "ratelimit_backend_errors": ("counter", {"operation"}),
    "lookup_cache": ("counter", {"handler", "result"}),
    "sasl_active_connections": ("gauge", set()),
    "sasl_auth": ("counter", {"mechanism", "result"}),
    "sasl_auth_duration_seconds": ("histogram", {"mechanism", "result"}),
    "sasl_connection_pool_full": ("counter", set()),
}


def scrape(daemon: Daemon) -> dict[str, Metric]:
    """GET /metrics, parsed by prometheus_client: families by name."""
    status, body = http_get(daemon.metrics_url + "/metrics")
    assert status == 200
    return {f.name: f for f in text_string_to_metric_families(body.decode("utf-8"))}


def value(families: dict[str, Metric], sample: str, **labels: str) -> float | None:
    """The value of one sample, or C{None} when it is not exposed."""
    family = families[sample.removesuffix("_total").removesuffix("_count")]
    for s in family.samples:
        if s.name == sample and s.labels == labels:
            return float(s.value)
    return None


def ready(daemon: Daemon) -> tuple[int, dict[str, Any]]:
    """GET /ready: (status, decoded body)."""
    status, body = http_get(daemon.metrics_url + "/ready")
    return status, json.loads(body)


class TestMetrics:
    """/metrics is valid Prometheus text with the Go program's names, types and labels."""

    def test_every_metric(self, start_daemon: StartDaemon) -> None:
        """Every metric of the Go program is exposed, with its type, plus process metrics."""
        families = scrape(start_daemon())
        for name, (kind, _) in METRICS.items():
            assert PREFIX + name in families, name
            assert families[PREFIX + name].type == kind, name
        assert "process_cpu_seconds" in families
        assert "process_resident_memory_bytes" in families

    def test_lookups_counted(
        self, start_daemon: StartDaemon, fake_userli: FakeUserliServer
    ) -> None:
        """
        Lookups are counted by map and outcome, timed in the Go program's
        buckets, and the API calls behind them by endpoint and HTTP status.
        """
        daemon = start_daemon(env={"LOOKUP_CACHE_TTL": "0"})
        postmap(f"alice@{DOMAIN}", daemon.socketmap_target("mailbox"))
        postmap(f"alice@{DOMAIN}", daemon.socketmap_target("mailbox"))
        postmap(f"nobody@{DOMAIN}", daemon.socketmap_target("alias"))
        postmap(f"bad*char@{DOMAIN}", daemon.socketmap_target("senders"))
        postmap(DOMAIN, daemon.socketmap_target("nosuchmap"))
        fake_userli.set_mode(ERROR)
        postmap(DOMAIN, daemon.socketmap_target("domain"))
        fake_userli.set_mode(REFUSED)
        postmap(DOMAIN, daemon.socketmap_target("domain"))

        families = scrape(daemon)
        requests = PREFIX + "requests_total"
        assert value(families, requests, handler="mailbox", status="success") == 2
        assert value(families, requests, handler="alias", status="notfound") == 1
        assert value(families, requests, handler="senders", status="notfound") == 1
        assert value(families, requests, handler="invalid", status="error") == 1
        assert value(families, requests, handler="domain", status="error") == 2

        duration = families[PREFIX + "request_duration_seconds"]
        bounds = sorted(
            {
                float(s.labels["le"])
                for s in duration.samples
                if s.name.endswith("_bucket") and s.labels["le"] != "+Inf"
            }
        )
        assert bounds == [0.001 * 2**i for i in range(10)]
        count = PREFIX + "request_duration_seconds_count"
        assert value(families, count, handler="mailbox", status="success") == 2

        calls = PREFIX + "http_client_requests_total"
        assert value(families, calls, endpoint="mailbox", status_code="200") == 2
        assert value(families, calls, endpoint="alias", status_code="200") == 1
        assert value(families, calls, endpoint="domain", status_code="500") == 1
        assert value(families, calls, endpoint="domain", status_code="error") == 1
        assert value(families, calls, endpoint="senders", status_code="200") is None
        client_duration = families[PREFIX + "http_client_duration_seconds"]
        client_bounds = sorted(
            {
                float(s.labels["le"])
                for s in client_duration.samples
                if s.name.endswith("_bucket") and s.labels["le"] != "+Inf"
            }
        )
        assert client_bounds == [0.01 * 2**i for i in range(10)]

    def test_cache_counted(self, start_daemon: StartDaemon) -> None:
        """Cache misses and hits are counted per map."""
        daemon = start_daemon()
        postmap(f"alice@{DOMAIN}", daemon.socketmap_target("mailbox"))
        postmap(f"alice@{DOMAIN}", daemon.socketmap_target("mailbox"))
        families = scrape(daemon)
        cache = PREFIX + "lookup_cache_total"
        assert value(families, cache, handler="mailbox", result="miss") == 1
        assert value(families, cache, handler="mailbox", result="hit") == 1

    def test_labels(self, start_daemon: StartDaemon, fake_userli: FakeUserliServer) -> None:
        """
        Every sample carries exactly the labels of its metric (plus C{le} on
        buckets), and no label value is an address or any other personal data.
        """
        daemon = start_daemon()
        for map_name in ("alias", "mailbox", "senders"):
            postmap(f"alice@{DOMAIN}", daemon.socketmap_target(map_name))
            postmap(f"Alice+x@{DOMAIN}", daemon.socketmap_target(map_name))
        postmap(DOMAIN, daemon.socketmap_target("domain"))
        postmap(f"alice@{DOMAIN}", daemon.socketmap_target(f"alice@{DOMAIN}"))
        http_get(daemon.metrics_url + "/ready")
        families = scrape(daemon)
        for name, (_, labels) in METRICS.items():
            for sample in families[PREFIX + name].samples:
                names = set(sample.labels) - {"le"}
                assert names == labels, (sample.name, sample.labels)
        for family in families.values():
            for sample in family.samples:
                for label in sample.labels.values():
                    assert "@" not in label and DOMAIN not in label, sample

    def test_active_connections(self, start_daemon: StartDaemon) -> None:
        """The socketmap connection gauges count open Postfix connections."""
        daemon = start_daemon()
        assert daemon.socketmap is not None and not isinstance(daemon.socketmap, str)
        with socket.create_connection(daemon.socketmap, timeout=30) as connection:
            connection.sendall(netstring(f"domain {DOMAIN}".encode()))
            assert connection.recv(100).endswith(b",")
            families = scrape(daemon)
            assert value(families, PREFIX + "active_connections") == 1
            assert value(families, PREFIX + "connection_pool_usage") == 1


class TestHealth:
    """/health says the process runs; /ready says Userli answers."""

    def test_health(self, start_daemon: StartDaemon, fake_userli: FakeUserliServer) -> None:
        """/health is 200 {"status": "ok"} even while Userli is down, and asks nothing."""
        daemon = start_daemon()
        fake_userli.set_mode(REFUSED)
        status, body = http_get(daemon.metrics_url + "/health")
        assert (status, json.loads(body)) == (200, {"status": "ok"})
        assert fake_userli.requests() == []

    @pytest.mark.parametrize("mode", [ERROR, REFUSED])
    def test_ready(
        self, start_daemon: StartDaemon, fake_userli: FakeUserliServer, mode: str
    ) -> None:
        """
        /ready probes Userli with a domain lookup of health-check.invalid: 200
        while it answers, 503 with the reason while it fails, 200 again once it
        is back; the health gauge follows.
        """
        daemon = start_daemon()
        assert ready(daemon) == (200, READY)
        assert [r.raw_path for r in fake_userli.requests()] == [
            "/api/postfix/domain/health-check.invalid"
        ]
        assert value(scrape(daemon), PREFIX + "health_check_status") == 1

        fake_userli.set_mode(mode)
        status, body = ready(daemon)
        assert status == 503
        assert body["status"] == "unavailable"
        assert isinstance(body["error"], str) and body["error"]
        assert value(scrape(daemon), PREFIX + "health_check_status") == 0

        fake_userli.set_mode(NORMAL)
        assert ready(daemon) == (200, READY)
        assert value(scrape(daemon), PREFIX + "health_check_status") == 1

    def test_ready_bounded(self, start_daemon: StartDaemon, fake_userli: FakeUserliServer) -> None:
        """/ready gives up on a Userli that does not answer: 503, not a hung probe."""
        daemon = start_daemon()
        fake_userli.set_mode(SLOW, delay=60)
        status, body = ready(daemon)
        assert (status, body["status"]) == (503, "unavailable")
