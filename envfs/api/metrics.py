"""The API server's Prometheus metrics: the privileged side's (builds, reuse, the store)
and the HTTP side's (requests), each in a registry of its own; /metrics shows both."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """The privileged side's metrics: builds, reuse, the store's gauges."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.builds = Counter("envfs_builds", "Builds run by this server", ["result"], registry=r)
        self.build_seconds = Histogram(
            "envfs_build_seconds",
            "Seconds per build run by this server",
            buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800),
            registry=r,
        )
        self.reuse = Counter(
            "envfs_reuse_hits", "POST /envs answered by a built snapshot", registry=r
        )
        self.store_bytes = Gauge("envfs_store_bytes", "Real bytes of the snapshots", registry=r)
        self.snapshots = Gauge("envfs_snapshots", "Snapshots in the store", registry=r)
        self.bindings = Gauge("envfs_bindings", "Bindings (workflow/node)", registry=r)
        self.audit_queued = Gauge(
            "envfs_audit_queued", "Audit rows waiting for PostgreSQL", registry=r
        )


class RequestMetrics:
    """The HTTP side's metrics: requests by route, method and code."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "envfs_http_requests",
            "HTTP requests",
            ["route", "method", "code"],
            registry=self.registry,
        )
