"""
The HTTP listener: ``/metrics``, ``/health`` and ``/ready``.

``/health`` says the process runs; ``/ready`` says it can reach Userli,
with the same probe as the Go program (a domain lookup of
``health-check.invalid``, bounded at 2 s).  While the circuit breaker
fails calls fast, that probe fails at once too (or is the breaker's own
probe), and ``/ready`` says so in its ``circuit_breaker`` field.  Its
``workers`` field says how many processes serve of how many configured
(see L{userli_postfix.workers}), whatever the probe found.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

from klein import Klein
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector
from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import Site

from userli_postfix.config import READY_TIMEOUT
from userli_postfix.metrics import Metrics
from userli_postfix.userli import UserliClient

READY_PROBE = "health-check.invalid"


class Processes(Protocol):
    """How many processes serve: L{userli_postfix.workers.WorkerPool} or L{OneProcess}."""

    @property
    def configured(self) -> int:
        """How many serve when all run."""

    @property
    def alive(self) -> int:
        """How many serve now."""


@dataclass(frozen=True)
class OneProcess:
    """A daemon without worker processes: this one, which runs."""

    configured: int = 1
    alive: int = 1


def _json(request: IRequest, code: int, body: dict[str, Any]) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return json.dumps(body).encode("utf-8")


class MetricsPage(Resource):
    """
    The Prometheus text exposition of a registry.

    prometheus_client's own Twisted resource goes through WSGI and a thread
    pool; rendering the few hundred lines here directly costs less memory
    and no thread.
    """

    isLeaf = True

    def __init__(self, registry: Collector) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._registry = registry

    def render_GET(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self._registry)


class Web:
    """The Klein app, bound to the daemon's metrics and API client."""

    app = Klein()

    def __init__(
        self,
        metrics: Metrics,
        client: UserliClient,
        metricsResource: IResource | None = None,
        processes: Processes = OneProcess(),
    ) -> None:
        self._metrics = metrics
        self._client = client
        self._metricsResource = metricsResource or MetricsPage(metrics.registry)
        self._processes = processes

    @app.route("/metrics", branch=False)
    def metrics(self, request: IRequest) -> IResource:
        return self._metricsResource

    @app.route("/health", methods=["GET", "HEAD"])
    def health(self, request: IRequest) -> bytes:
        return _json(request, 200, {"status": "ok"})

    @app.route("/ready", methods=["GET", "HEAD"])
    def ready(self, request: IRequest) -> defer.Deferred[bytes]:
        d = self._client.domain(READY_PROBE, timeout=READY_TIMEOUT)

        def state() -> dict[str, Any]:
            return {
                "circuit_breaker": "open" if self._client.breaker.isOpen else "closed",
                "workers": {
                    "alive": self._processes.alive,
                    "configured": self._processes.configured,
                },
            }

        def ok(_: bool) -> bytes:
            self._metrics.health_check_status.set(1)
            return _json(request, 200, {"status": "ready", **state()})

        def unavailable(failure: Failure) -> bytes:
            self._metrics.health_check_status.set(0)
            return _json(
                request,
                503,
                {"status": "unavailable", "error": str(failure.value), **state()},
            )

        return d.addCallbacks(ok, unavailable)


class QuietSite(Site):
    """A Site that keeps scrapes and probes out of the log."""

    noisy = False

    def log(self, request: Any) -> None:
        """Access logging is the reverse proxy's job, not the mail daemon's."""


def makeSite(web: Web) -> Site:
    """The HTTP factory for the metrics listener."""
    return QuietSite(web.app.resource())  # type: ignore[no-untyped-call]
