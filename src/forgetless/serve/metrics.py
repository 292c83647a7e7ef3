"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("forgetless_requests_total", "HTTP requests", ["endpoint", "status"], registry=r)
        self.latency = Histogram("forgetless_request_seconds", "HTTP request latency", ["endpoint"], registry=r,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.tokens = Counter("forgetless_generated_tokens_total", "tokens generated", registry=r)
        self.updates = Counter("forgetless_updates_total", "learning updates by outcome "
                               "(accepted, promoted, rejected, failed)", ["outcome"], registry=r)
        self.queued = Gauge("forgetless_updates_pending", "updates queued or running", registry=r)
        self.retention = Gauge("forgetless_version_retention", "retention-set exact match of each promoted "
                               "version (the drift curve)", ["version"], registry=r)
        self.served = Gauge("forgetless_served_version", "the version being served", registry=r)
        self.storage = Gauge("forgetless_storage_bytes", "bytes used by the version store", registry=r)
