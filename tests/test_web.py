"""
Tests for L{userli_postfix.web}: C{/health}, C{/ready} and C{/metrics}
through C{StubTreq}, with the readiness probe answered by a fake client or
bounded by a L{Clock}.
"""

from __future__ import annotations

import json
from typing import Any

import treq
from prometheus_client import make_wsgi_app
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IResponse
from twisted.web.wsgi import WSGIResource

from userli_postfix.breaker import FAILURES_TO_OPEN, CircuitBreaker
from userli_postfix.metrics import Metrics
from userli_postfix.userli import UserliClient, UserliError
from userli_postfix.web import READY_PROBE, Web, makeSite

# The metrics of compatibility.md: exposition name -> type.
METRICS = {
    "userli_postfix_adapter_request_duration_seconds": "histogram",
    "userli_postfix_adapter_requests_total": "counter",
    "userli_postfix_adapter_active_connections": "gauge",
    "userli_postfix_adapter_connection_pool_usage": "gauge",
    "userli_postfix_adapter_http_client_duration_seconds": "histogram",
    "userli_postfix_adapter_http_client_requests_total": "counter",
    "userli_postfix_adapter_health_check_status": "gauge",
    "userli_postfix_adapter_policy_active_connections": "gauge",
    "userli_postfix_adapter_policy_requests_total": "counter",
    "userli_postfix_adapter_policy_request_duration_seconds": "histogram",
    "userli_postfix_adapter_quota_exceeded_total": "counter",
    "userli_postfix_adapter_quota_checks_total": "counter",
    "userli_postfix_adapter_policy_connection_pool_full_total": "counter",
    "userli_postfix_adapter_ratelimit_backend_errors_total": "counter",
    "userli_postfix_adapter_lookup_cache_total": "counter",
    "userli_postfix_adapter_sasl_active_connections": "gauge",
    "userli_postfix_adapter_sasl_auth_total": "counter",
    "userli_postfix_adapter_sasl_auth_duration_seconds": "histogram",
    "userli_postfix_adapter_sasl_connection_pool_full_total": "counter",
    "userli_postfix_adapter_near_cache_coherent": "gauge",
    "userli_postfix_adapter_circuit_breaker_open": "gauge",
    "userli_postfix_adapter_circuit_breaker_opened_total": "counter",
}


class FakeClient:
    """The readiness probe's endpoint, answered by hand."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float | None]] = []
        self.pending: list[defer.Deferred[bool]] = []
        self.breaker = CircuitBreaker(Clock())

    def domain(self, name: str, timeout: float | None = None) -> defer.Deferred[bool]:
        self.calls.append((name, timeout))
        d: defer.Deferred[bool] = defer.Deferred()
        self.pending.append(d)
        return d


class FakeProcesses:
    """A worker pool of three processes, as many alive as the test says."""

    configured = 3
    alive = 3


class SameThread:
    """
    Runs "threaded" work at once: the reactor and thread pool of a
    C{WSGIResource}, so the real exposition app answers inside the test.
    """

    def callInThread(self, f: Any, *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)

    def callFromThread(self, f: Any, *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)


def metricsResource(metrics: Metrics) -> WSGIResource:
    """The exposition app that C{MetricsResource} serves, without threads."""
    return WSGIResource(SameThread(), SameThread(), make_wsgi_app(metrics.registry))  # type: ignore[arg-type]


class WebTestCase(SynchronousTestCase):
    """The HTTP app in memory."""

    def setUp(self) -> None:
        self.metrics = Metrics(process=False)
        self.client = FakeClient()
        self.web = Web(self.metrics, self.client, metricsResource(self.metrics))  # type: ignore[arg-type]
        self.http = StubTreq(self.web.app.resource())

    def get(self, path: str, method: str = "GET") -> defer.Deferred[IResponse]:
        return self.http.request(method, "http://daemon.test" + path)

    def body(self, response: IResponse) -> bytes:
        d = treq.content(response)
        self.http.flush()
        data: bytes = self.successResultOf(d)
        return data

    def finish(self, d: defer.Deferred[IResponse]) -> IResponse:
        self.http.flush()
        response: IResponse = self.successResultOf(d)
        return response

    def health_status(self) -> float | None:
        return self.metrics.registry.get_sample_value("userli_postfix_adapter_health_check_status")


class HealthTests(WebTestCase):
    """C{/health}: the process runs."""

    def test_health(self) -> None:
        """Always C{200 {"status": "ok"}}, without asking the API."""
        response = self.finish(self.get("/health"))
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(self.body(response)), {"status": "ok"})
        self.assertEqual(response.headers.getRawHeaders(b"Content-Type"), [b"application/json"])
        self.assertEqual(self.client.calls, [])

    def test_head(self) -> None:
        """HEAD works too, for probes that use it."""
        response = self.finish(self.get("/health", "HEAD"))
        self.assertEqual(response.code, 200)

    def test_unknown_path(self) -> None:
        """Other paths are 404."""
        response = self.finish(self.get("/nothing"))
        self.assertEqual(response.code, 404)


class ReadyTests(WebTestCase):
    """C{/ready}: the API can be reached, asked the way the Go program asks it."""

    def test_ready(self) -> None:
        """
        A domain lookup of C{health-check.invalid} with a 2 s bound; any
        answer (it is not a domain) means ready.
        """
        for answer in (False, True):
            d = self.get("/ready")
            self.http.flush()
            self.assertEqual(self.client.calls[-1], (READY_PROBE, 2.0))
            self.client.pending.pop().callback(answer)
            response = self.finish(d)
            self.assertEqual(response.code, 200)
            self.assertEqual(
                json.loads(self.body(response)),
                {
                    "status": "ready",
                    "circuit_breaker": "closed",
                    "workers": {"alive": 1, "configured": 1},
                },
            )
            self.assertEqual(self.health_status(), 1.0)
        self.assertEqual(READY_PROBE, "health-check.invalid")

    def test_unavailable(self) -> None:
        """A failed probe is C{503 {"status": "unavailable", "error": ...}}, and the gauge 0."""
        d = self.get("/ready")
        self.http.flush()
        self.client.pending.pop().callback(True)
        self.finish(d)
        self.assertEqual(self.health_status(), 1.0)
        d = self.get("/ready")
        self.http.flush()
        self.client.pending.pop().errback(UserliError("HTTP 500"))
        response = self.finish(d)
        self.assertEqual(response.code, 503)
        self.assertEqual(
            json.loads(self.body(response)),
            {
                "status": "unavailable",
                "error": "HTTP 500",
                "circuit_breaker": "closed",
                "workers": {"alive": 1, "configured": 1},
            },
        )
        self.assertEqual(self.health_status(), 0.0)

    def test_workers(self) -> None:
        """
        The body says how many processes serve of how many configured, as
        the worker pool counts them now, ready or not.
        """
        processes = FakeProcesses()
        web = Web(self.metrics, self.client, processes=processes)  # type: ignore[arg-type]
        http = StubTreq(web.app.resource())
        for alive, outcome in [(3, True), (2, True), (1, False)]:
            processes.alive = alive
            d = http.request("GET", "http://daemon.test/ready")
            http.flush()
            if outcome:
                self.client.pending.pop().callback(True)
            else:
                self.client.pending.pop().errback(UserliError("HTTP 500"))
            http.flush()
            response = self.successResultOf(d)
            self.assertEqual(response.code, 200 if outcome else 503)
            content = treq.json_content(response)
            http.flush()
            self.assertEqual(
                self.successResultOf(content)["workers"], {"alive": alive, "configured": 3}
            )

    def test_breaker_open(self) -> None:
        """
        While the circuit breaker fails calls fast, C{/ready} answers 503 at
        once and says the breaker is open.
        """
        clock = Clock()
        client = UserliClient(
            lambda *a, **k: defer.Deferred(), "http://userli", "t", clock, self.metrics
        )
        for _ in range(FAILURES_TO_OPEN):
            d = client.domain("example.org")
            clock.advance(5)
            self.failureResultOf(d, UserliError)
        self.assertTrue(client.breaker.isOpen)
        http = StubTreq(Web(self.metrics, client).app.resource())
        d = http.request("GET", "http://daemon.test/ready")
        http.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 503)
        content = treq.json_content(response)
        http.flush()
        self.assertEqual(self.successResultOf(content)["circuit_breaker"], "open")
        self.assertEqual(self.health_status(), 0.0)

    def test_bounded(self) -> None:
        """With the real client, an API that never answers makes C{/ready} 503 at 2 s."""
        clock = Clock()

        def never(*args: Any, **kwargs: Any) -> defer.Deferred[Any]:
            return defer.Deferred()

        client = UserliClient(never, "http://userli.test", "t", clock, self.metrics)
        http = StubTreq(Web(self.metrics, client).app.resource())
        d = http.request("GET", "http://daemon.test/ready")
        http.flush()
        clock.advance(1.999)
        http.flush()
        self.assertNoResult(d)
        clock.advance(0.001)
        http.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 503)
        content = treq.json_content(response)
        http.flush()
        body = self.successResultOf(content)
        self.assertEqual(body["status"], "unavailable")
        self.assertIn("2 s", body["error"])


class MetricsTests(WebTestCase):
    """C{/metrics}: every metric of compatibility.md, in Prometheus text format."""

    def scrape(self) -> str:
        response = self.finish(self.get("/metrics"))
        self.assertEqual(response.code, 200)
        return self.body(response).decode("utf-8")

    def test_parseable(self) -> None:
        """The exposition parses, and names and types are those of the Go program."""
        text = self.scrape()
        families = {family.name: family.type for family in text_string_to_metric_families(text)}
        for name, kind in METRICS.items():
            family = name.removesuffix("_total") if kind == "counter" else name
            self.assertEqual(families.get(family), kind, name)
            self.assertIn(f"# TYPE {name} {kind}\n", text)

    def test_no_created_series(self) -> None:
        """The Go program exposes no C{*_created} series; neither do we."""
        self.metrics.requests.labels("alias", "success").inc()
        self.assertNotIn("_created", self.scrape())

    def test_values(self) -> None:
        """Values recorded by the daemon appear with their labels."""
        self.metrics.requests.labels("alias", "success").inc(3)
        self.metrics.http_client_requests.labels("auth", "error").inc()
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(self.scrape())
            for sample in family.samples
        }
        self.assertEqual(
            samples[
                (
                    "userli_postfix_adapter_requests_total",
                    (("handler", "alias"), ("status", "success")),
                )
            ],
            3.0,
        )
        self.assertEqual(
            samples[
                (
                    "userli_postfix_adapter_http_client_requests_total",
                    (("endpoint", "auth"), ("status_code", "error")),
                )
            ],
            1.0,
        )

    def test_buckets(self) -> None:
        """
        Buckets are the Go program's: 1 ms x 2^0..9 for requests, 10 ms x 2^0..9
        for API calls.
        """
        self.metrics.request_duration.labels("alias", "success").observe(0.001)
        self.metrics.http_client_duration.labels("alias", "200").observe(0.01)
        bounds: dict[str, list[float]] = {}
        for family in text_string_to_metric_families(self.scrape()):
            for sample in family.samples:
                if sample.name.endswith("_bucket") and sample.labels["le"] != "+Inf":
                    bounds.setdefault(sample.name, []).append(float(sample.labels["le"]))
        self.assertEqual(
            bounds["userli_postfix_adapter_request_duration_seconds_bucket"],
            [0.001 * 2**i for i in range(10)],
        )
        self.assertEqual(
            bounds["userli_postfix_adapter_http_client_duration_seconds_bucket"],
            [0.010 * 2**i for i in range(10)],
        )


class SiteTests(SynchronousTestCase):
    """L{makeSite}: the listener's factory."""

    def test_quiet(self) -> None:
        """The site serves the app and writes no access log line per probe."""
        web = Web(Metrics(process=False), FakeClient())  # type: ignore[arg-type]
        site = makeSite(web)
        self.assertFalse(site.noisy)
        http = StubTreq(site.resource)
        d = http.get("http://daemon.test/health")
        http.flush()
        self.assertEqual(self.successResultOf(d).code, 200)
