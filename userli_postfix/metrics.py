"""
Every metric the daemon exports, in one registry.

Names, types, labels and buckets are those of the Go program, so dashboards
and alerts keep working after a switch.  No label ever carries an address or
other personal data: labels are map names, endpoint names, HTTP status codes
and fixed outcome words.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

PREFIX = "userli_postfix_adapter"

# The Go program exposes no *_created series; neither do we.
disable_created_metrics()

# With worker processes (WORKERS > 1) each gauge is kept per process and
# /metrics shows the sum over the live ones; ignored in a single process.
_SUMMED: Final = "livesum"

_FAST_BUCKETS = tuple(0.001 * 2**i for i in range(10))
_HTTP_BUCKETS = tuple(0.010 * 2**i for i in range(10))
# The Go client's default buckets, and beyond: a probe of a slow server may
# take its per-step timeouts several times over.
_PROBE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    """
    The daemon's metrics, registered on their own registry.

    One instance per process; tests make their own so they can read values
    without interference.
    """

    def __init__(self, registry: CollectorRegistry | None = None, process: bool = True) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        if process:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)

        # socketmap
        self.request_duration = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Duration of socketmap requests.",
            ["handler", "status"],
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            f"{PREFIX}_requests",
            "Socketmap requests by map and outcome.",
            ["handler", "status"],
            registry=r,
        )
        self.active_connections = Gauge(
            f"{PREFIX}_active_connections",
            "Open socketmap connections.",
            registry=r,
            multiprocess_mode=_SUMMED,
        )
        self.connection_pool_usage = Gauge(
            f"{PREFIX}_connection_pool_usage",
            "Socketmap connections in use out of the 500 allowed.",
            registry=r,
            multiprocess_mode=_SUMMED,
        )
        self.lookup_cache = Counter(
            f"{PREFIX}_lookup_cache",
            "Lookup cache outcomes.",
            ["handler", "result"],
            registry=r,
        )

        self.remote_domain_answers = Counter(
            f"{PREFIX}_remote_domain_answers",
            "Answers settled without a Userli call because Userli had said it does not "
            "host the key's domain (REMOTE_DOMAIN_CACHE_TTL), by map (policy: quota checks).",
            ["handler"],
            registry=r,
        )

        self.near_cache_coherent = Gauge(
            f"{PREFIX}_near_cache_coherent",
            "1 while Redis reports every change to the lookup cache, so the "
            "near-cache in this process may keep copies; 0 while every lookup reads Redis.",
            registry=r,
            # With worker processes: 1 only when every one is.
            multiprocess_mode="livemin",
        )

        # tls_policy
        self.tls_policy_cache_hits = Counter(
            f"{PREFIX}_tls_policy_cache_hits",
            "tls_policy lookups answered from the cache, by the verdict found.",
            ["result"],
            registry=r,
        )
        self.tls_policy_probes = Counter(
            f"{PREFIX}_tls_policy_probe",
            "Probes of a domain's mail servers: tls (every one that answered completed a "
            "TLS handshake), notls, or error (none answered, DNS failed).",
            ["result"],
            registry=r,
        )
        self.tls_policy_probe_duration = Histogram(
            f"{PREFIX}_tls_policy_probe_duration_seconds",
            "Duration of probes of a domain's mail servers.",
            buckets=_PROBE_BUCKETS,
            registry=r,
        )

        # Userli API client
        self.http_client_duration = Histogram(
            f"{PREFIX}_http_client_duration_seconds",
            "Duration of Userli API calls.",
            ["endpoint", "status_code"],
            buckets=_HTTP_BUCKETS,
            registry=r,
        )
        self.http_client_requests = Counter(
            f"{PREFIX}_http_client_requests",
            "Userli API calls by endpoint and HTTP status.",
            ["endpoint", "status_code"],
            registry=r,
        )
        self.health_check_status = Gauge(
            f"{PREFIX}_health_check_status",
            "1 when the last readiness check reached the Userli API, else 0.",
            registry=r,
            # Only the process serving /ready sets it.
            multiprocess_mode="livemax",
        )

        self.circuit_breaker_open = Gauge(
            f"{PREFIX}_circuit_breaker_open",
            "1 while calls to the Userli API fail fast after repeated timeouts, else 0.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.circuit_breaker_opened = Counter(
            f"{PREFIX}_circuit_breaker_opened",
            "How often calls to the Userli API started failing fast.",
            registry=r,
        )

        # policy
        self.policy_active_connections = Gauge(
            f"{PREFIX}_policy_active_connections",
            "Open policy connections.",
            registry=r,
            multiprocess_mode=_SUMMED,
        )
        self.policy_requests = Counter(
            f"{PREFIX}_policy_requests",
            "Policy requests by stage and action.",
            ["stage", "action"],
            registry=r,
        )
        self.policy_request_duration = Histogram(
            f"{PREFIX}_policy_request_duration_seconds",
            "Duration of policy requests.",
            ["stage", "action"],
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.quota_exceeded = Counter(
            f"{PREFIX}_quota_exceeded",
            "Messages over their sender's quota, whatever RATE_LIMIT_ACTION did with them.",
            registry=r,
        )
        self.quota_checks = Counter(
            f"{PREFIX}_quota_checks", "Quota checks by result.", ["result"], registry=r
        )
        self.policy_connection_pool_full = Counter(
            f"{PREFIX}_policy_connection_pool_full",
            "Policy connections refused because 500 were open.",
            registry=r,
        )
        self.ratelimit_backend_errors = Counter(
            f"{PREFIX}_ratelimit_backend_errors",
            "Rate-limit backend (Redis) failures.",
            ["operation"],
            registry=r,
        )

        # SASL
        self.sasl_active_connections = Gauge(
            f"{PREFIX}_sasl_active_connections",
            "Open SASL connections.",
            registry=r,
            multiprocess_mode=_SUMMED,
        )
        self.sasl_auth = Counter(
            f"{PREFIX}_sasl_auth",
            "SASL authentications by mechanism and result.",
            ["mechanism", "result"],
            registry=r,
        )
        self.sasl_auth_duration = Histogram(
            f"{PREFIX}_sasl_auth_duration_seconds",
            "Duration of SASL authentications.",
            ["mechanism", "result"],
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.sasl_connection_pool_full = Counter(
            f"{PREFIX}_sasl_connection_pool_full",
            "SASL connections refused because 500 were open.",
            registry=r,
        )

        # worker processes (WORKERS > 1) and their logs
        self.worker_restarts = Counter(
            f"{PREFIX}_worker_restarts",
            "Worker processes started in place of one that ended or could not be started.",
            registry=r,
        )
        self.log_lines_dropped = Counter(
            f"{PREFIX}_log_lines_dropped",
            "Log lines of worker processes dropped because the pipe to the first process was full.",
            registry=r,
        )


F = TypeVar("F", bound=Callable[..., None])


class Children(dict[str | tuple[str, ...], F]):
    """
    A labelled metric's children, by their label values (one string, or a
    tuple of them), as the method that counts on each: C{inc} or
    C{observe}.

    C{labels()} is a dictionary lookup under a lock and a new child the
    first time; the code that counts on every request asks it once per
    label values, here, and then indexes this dictionary (which calls no
    Python code once the child is known).
    """

    def __init__(self, child: Callable[[str | tuple[str, ...]], F]) -> None:
        super().__init__()
        self._child = child

    def __missing__(self, labels: str | tuple[str, ...]) -> F:
        method = self[labels] = self._child(labels)
        return method


def _values(labels: str | tuple[str, ...]) -> tuple[str, ...]:
    return labels if isinstance(labels, tuple) else (labels,)


def increments(counter: Counter) -> Children[Callable[[], None]]:
    """The C{inc} of each child of C{counter}: C{increments(c)["alias", "hit"]()}."""
    return Children(lambda labels: counter.labels(*_values(labels)).inc)


def observations(histogram: Histogram) -> Children[Callable[[float], None]]:
    """The C{observe} of each child of C{histogram}: C{observations(h)["alias", "ok"](0.1)}."""
    return Children(lambda labels: histogram.labels(*_values(labels)).observe)
