"""Prometheus metrics of one server (its own registry, so several apps can live in one process).

The model-level series carry a ``model`` label: a server of several specialists reports each one's
updates, served version, retention (the drift curve) and storage apart."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("forgetless_requests_total", "HTTP requests", ["endpoint", "status"], registry=r)
        self.latency = Histogram("forgetless_request_seconds", "HTTP request latency", ["endpoint"], registry=r,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.tokens = Counter("forgetless_generated_tokens_total", "tokens generated", ["model"], registry=r)
        self.updates = Counter("forgetless_updates_total", "learning updates by outcome "
                               "(accepted, promoted, rejected, failed)", ["model", "outcome"], registry=r)
        self.queued = Gauge("forgetless_updates_pending", "updates queued or running", ["model"], registry=r)
        self.retention = Gauge("forgetless_version_retention", "retention-set exact match of each promoted "
                               "version (the drift curve)", ["model", "version"], registry=r)
        self.served = Gauge("forgetless_served_version", "the version being served", ["model"], registry=r)
        self.storage = Gauge("forgetless_storage_bytes", "bytes used by the version store", ["model"], registry=r)

    def of(self, model: str) -> "ModelMetrics":
        return ModelMetrics(self, model)


class ModelMetrics:
    """The series of one served model (the ``model`` label bound)."""

    def __init__(self, m: Metrics, model: str) -> None:
        self.all, self.model = m, model
        self.tokens = m.tokens.labels(model=model)
        self.queued = m.queued.labels(model=model)
        self.served = m.served.labels(model=model)
        self.storage = m.storage.labels(model=model)

    def update(self, outcome: str) -> None:
        self.all.updates.labels(model=self.model, outcome=outcome).inc()

    def retention(self, version: int, value: float) -> None:
        self.all.retention.labels(model=self.model, version=str(version)).set(value)
