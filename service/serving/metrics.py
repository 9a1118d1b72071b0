"""Prometheus metrics of one server, on its own :class:`CollectorRegistry` (no global state).

Named by Prometheus conventions (base units, ``_total`` for counters, ``_seconds`` for times):

| metric                                  | type      | labels                               |
|-----------------------------------------|-----------|--------------------------------------|
| ``flowserve_requests_total``            | counter   | model, version, operation, status    |
| ``flowserve_request_duration_seconds``  | histogram | model, operation                     |
| ``flowserve_requests_in_flight``        | gauge     | (none)                               |
| ``flowserve_rows_total``                | counter   | model, operation (rows answered)     |
| ``flowserve_queue_wait_seconds``        | histogram | model, pass (encode / decode)        |
| ``flowserve_batch_compute_seconds``     | histogram | model, pass                          |
| ``flowserve_batch_rows``                | histogram | model, pass (its ``_count`` = batches) |
| ``flowserve_batch_requests``            | histogram | model, pass (requests per batch)     |
| ``flowserve_queue_rows``                | gauge     | (none): rows waiting in the worker   |
| ``flowserve_model_queue_rows``          | gauge     | model, version, pass: rows waiting for that model version and pass |
| ``flowserve_models_ready``              | gauge     | (none): 1 when every model is loaded |
| ``flowserve_anomaly_rows_total``        | counter   | model, version, flagged (``true`` / ``false``): rows scored |
| ``flowserve_log_prob``                  | histogram | model, version: log-densities of log_prob and score; ``le`` = the version's calibration quantiles |
| ``flowserve_drift_ks``                  | gauge     | model, version: KS statistic, recent log-densities vs. calibration |
| ``flowserve_drift_p_value``             | gauge     | model, version: its p-value (absent until the window has enough rows) |
| ``flowserve_drift_window_rows``         | gauge     | model, version: rows in the drift window |

:class:`Metrics` is also the device worker's :class:`~service.serving.batching.BatchObserver`. Model
labels are only ever names of served models (a request for an unknown model counts as
``model="_unknown"``), so clients cannot grow the label sets. The per-model watch of the inputs
(flag counts, log-density histogram, drift) is :mod:`service.serving.monitoring`, exposed here by
its :class:`~service.serving.monitoring.MonitorCollector`.

The registry also carries prometheus-client's default collectors, registered on it rather than on
the global registry: ``process_*`` (CPU seconds, resident memory, open file descriptors, start
time: what a replica's memory alert and dashboard read), ``python_info`` and ``python_gc_*``.
"""

from __future__ import annotations

import time
from typing import Hashable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    CollectorRegistry,
    Counter,
    GCCollector,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from service.serving.monitoring import MonitorCollector

__all__ = ["CONTENT_TYPE_LATEST", "Metrics", "RequestRecord", "UNKNOWN_MODEL"]

UNKNOWN_MODEL = "_unknown"
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
WAIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ROW_BUCKETS = tuple(float(1 << k) for k in range(0, 21, 1))  # 1 .. 1M rows
REQUEST_BUCKETS = tuple(float(1 << k) for k in range(0, 13))  # 1 .. 4096 requests


def _version_label(key: Hashable) -> str:
    """The version of a worker queue key (``ModelKey(name, version, generation)``, or ``(name, version)``)."""
    version = getattr(key, "version", None)
    if version is None and isinstance(key, tuple) and len(key) > 1:
        version = key[1]
    return "" if version is None else str(version)


def _model_label(key: Hashable) -> str:
    name = getattr(key, "name", None)
    if name is None and isinstance(key, tuple) and key:
        name = key[0]
    return str(name if name is not None else key)


class RequestRecord:
    """What one request reports when it ends (filled in as the handler learns it)."""

    __slots__ = ("model", "version", "operation", "status", "rows")

    def __init__(self, operation: str) -> None:
        self.model = UNKNOWN_MODEL
        self.version = ""
        self.operation = operation
        self.status = 500
        self.rows = 0


class _Tracked:
    """The context of one tracked request (a plain class: cheaper than ``@contextmanager``)."""

    __slots__ = ("metrics", "record", "start")

    def __init__(self, metrics: "Metrics", record: RequestRecord) -> None:
        self.metrics, self.record = metrics, record

    def __enter__(self) -> RequestRecord:
        self.start = time.perf_counter()
        self.metrics.in_flight.inc()
        return self.record

    def __exit__(self, *exc: object) -> None:
        self.metrics._finish(self.record, time.perf_counter() - self.start)


class Metrics:
    """The server's metrics and the worker's observer."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("flowserve_requests", "Requests answered, by model, version, operation and HTTP status.",
                                ["model", "version", "operation", "status"], registry=r)
        self.duration = Histogram("flowserve_request_duration_seconds", "Time from request start to its answer.",
                                  ["model", "operation"], buckets=DURATION_BUCKETS, registry=r)
        self.in_flight = Gauge("flowserve_requests_in_flight", "Operation requests being handled now.", registry=r)
        self.rows = Counter("flowserve_rows", "Rows answered (inputs, latents or samples).",
                            ["model", "operation"], registry=r)
        self.queue_wait = Histogram("flowserve_queue_wait_seconds", "Time a request waited before its first batch.",
                                    ["model", "pass"], buckets=WAIT_BUCKETS, registry=r)
        self.batch_compute = Histogram("flowserve_batch_compute_seconds", "Time one batched model call took.",
                                       ["model", "pass"], buckets=DURATION_BUCKETS, registry=r)
        self.batch_rows = Histogram("flowserve_batch_rows", "Rows in one batched model call.",
                                    ["model", "pass"], buckets=ROW_BUCKETS, registry=r)
        self.batch_requests = Histogram("flowserve_batch_requests", "Requests whose rows shared one batched call.",
                                        ["model", "pass"], buckets=REQUEST_BUCKETS, registry=r)
        self.queue_rows = Gauge("flowserve_queue_rows", "Rows waiting in the device worker's queues.", registry=r)
        self.models_ready = Gauge("flowserve_models_ready", "1 when every configured model is loaded, else 0.",
                                  registry=r)
        self.model_queue_rows = Gauge("flowserve_model_queue_rows",
                                      "Rows waiting in the device worker for one model version and pass.",
                                      ["model", "version", "pass"], registry=r)
        #: the models' flag counts, log-density histograms and drift statistics (built at scrape time)
        self.monitors = MonitorCollector()
        r.register(self.monitors)
        if registry is None:  # a registry given by the caller keeps what it has (tests build several)
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            if GC_COLLECTOR is not None:  # absent on interpreters without gc.get_stats
                GCCollector(registry=r)
        #: (model, version, operation, status) -> the labelled children a finished request updates
        self._children: dict[tuple[str, str, str, int], tuple[Counter, Histogram, Counter]] = {}
        #: (worker queue key, pass) -> the labelled per-model queue gauge
        self._queue_cache: dict[tuple[Hashable, object], Gauge] = {}
        #: (worker queue key, pass) -> the labelled batch and queue-wait histograms
        self._batch_cache: dict[tuple[Hashable, object], tuple[Histogram, Histogram, Histogram, Histogram]] = {}

    # -- requests --------------------------------------------------------------------------------
    def track(self, operation: str) -> "_Tracked":
        """Count one operation request (``with metrics.track(op) as record:``); the handler fills
        in model, version, status and rows, and everything is recorded when the block ends."""
        return _Tracked(self, RequestRecord(operation))

    def _finish(self, record: RequestRecord, seconds: float) -> None:
        self.in_flight.dec()
        key = (record.model, record.version, record.operation, record.status)
        children = self._children.get(key)
        if children is None:  # labels() takes a lock and builds a tuple: once per label set, not per request
            children = self._children[key] = (
                self.requests.labels(record.model, record.version, record.operation, str(record.status)),
                self.duration.labels(record.model, record.operation),
                self.rows.labels(record.model, record.operation),
            )
        requests, duration, rows = children
        requests.inc()
        duration.observe(seconds)
        if record.status == 200 and record.rows:
            rows.inc(record.rows)

    # -- BatchObserver ---------------------------------------------------------------------------
    def _batch_children(self, key: Hashable, pass_: object) -> tuple[Histogram, Histogram, Histogram, Histogram]:
        children = self._batch_cache.get((key, pass_))
        if children is None:
            model, kind = _model_label(key), str(getattr(pass_, "value", pass_))
            children = self._batch_cache[(key, pass_)] = (
                self.batch_rows.labels(model, kind), self.batch_requests.labels(model, kind),
                self.batch_compute.labels(model, kind), self.queue_wait.labels(model, kind),
            )
        return children

    def on_batch(self, key: Hashable, pass_: object, rows: int, requests: int, compute_seconds: float) -> None:
        batch_rows, batch_requests, batch_compute, _ = self._batch_children(key, pass_)
        batch_rows.observe(rows)
        batch_requests.observe(requests)
        batch_compute.observe(compute_seconds)

    def on_dequeue(self, key: Hashable, pass_: object, queue_wait_seconds: float) -> None:
        self._batch_children(key, pass_)[3].observe(queue_wait_seconds)

    def on_queue_depth(self, rows: int) -> None:
        self.queue_rows.set(rows)

    def on_model_queue_depth(self, key: Hashable, pass_: object, rows: int) -> None:
        """Rows now waiting for one model version (``key``) and pass: the per-model view of
        ``flowserve_queue_rows``, and what an autoscaler's per-model rule reads."""
        gauge = self._queue_cache.get((key, pass_))
        if gauge is None:
            gauge = self._queue_cache[(key, pass_)] = self.model_queue_rows.labels(
                _model_label(key), _version_label(key), str(getattr(pass_, "value", pass_)))
        gauge.set(rows)

    # -- exposition ------------------------------------------------------------------------------
    def render(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)
