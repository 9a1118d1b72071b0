"""Load shedding by estimated wait: 503 early instead of a long wait the deadline cannot afford.

Under many connections the event loop, not the worker's queue, is the bottleneck: each request
needs a few turns of the loop (head parsed, body read, rows submitted, answer written), and when
hundreds are ready at once one turn lasts long, so every request waits a few turns' worth while
the queue stays nearly empty and its bound (``max_queue_rows``) never refuses anything.
:class:`LoadShedding` admits each operation request by an estimate of the wait ahead of it::

    wait = loop lag + queued rows / throughput

* **loop lag** (:class:`LoopLag`): a timer is due every :data:`LAG_INTERVAL_S`; how late it fires
  is how long the loop takes to come back to any callback. The estimate is the larger of the last
  lateness (decayed by :data:`LAG_DECAY` per tick, so one slow turn does not shed for long) and how
  late the pending tick is already (so a loop that was blocked is seen the moment it runs again).
* **queue**: ``worker.queued_rows()`` (public) over the rows per second of compute, measured from
  the app's Prometheus histograms ``flowserve_batch_rows`` and ``flowserve_batch_compute_seconds``
  (their ``_sum`` growth between ticks, over :data:`RATE_WINDOW_S`); until a batch ran it is 0
  and the estimate is the loop lag alone.

A request whose ``wait`` exceeds ``fraction * request_timeout_s`` is answered at once, before its
body is read, ``503 overloaded`` (problem+json) with ``Retry-After: ceil(wait)``, as Triton's queue
policy rejects what would time out and Ray Serve's ``max_ongoing_requests`` refuses past a bound.
Only operation ``POST``\\ s are shed (``/v1/models/.../{log_prob,inverse,forward,sample,score}``,
versioned or not, and ``/v2/models/.../infer``); health, readiness, metrics, docs and admin pass
always. The lag is exported as the gauge ``flowserve_event_loop_lag_seconds`` and the refusals
count in ``flowserve_requests_shed_total``.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from prometheus_client import Counter, Gauge
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import Problem
from .fastpath import match_operation

__all__ = ["LoadShedding", "LoopLag", "is_operation"]

#: seconds between the lag timer's ticks
LAG_INTERVAL_S = 0.025
#: factor on the remembered lateness per tick (0.8 per 25 ms: a lateness fades to a tenth in ~0.26 s)
LAG_DECAY = 0.8
#: seconds over which the compute throughput is measured
RATE_WINDOW_S = 1.0


def is_operation(scope: Scope) -> bool:
    """Whether ``scope`` is an operation ``POST`` (v1 or v2 ``infer``), the requests that may be shed."""
    if scope["type"] != "http" or scope["method"] != "POST":
        return False
    path: str = scope["path"]
    if path.startswith("/v2/models/"):
        return path.endswith("/infer")
    return match_operation(path) is not None


class LoopLag:
    """How late the event loop runs a callback that is due now (see the module docstring)."""

    def __init__(self, interval: float = LAG_INTERVAL_S, decay: float = LAG_DECAY) -> None:
        self.interval, self.decay = interval, decay
        self.lag = 0.0  # decayed maximum of the measured lateness, seconds
        self._loop: asyncio.AbstractEventLoop | None = None
        self._due = 0.0
        self._handle: asyncio.TimerHandle | None = None
        self._on_tick: list[Any] = []

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._due = loop.time() + self.interval
        self._handle = loop.call_at(self._due, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    @property
    def running(self) -> bool:
        return self._handle is not None

    def on_tick(self, callback: Any) -> None:
        """Call ``callback()`` after every tick (on the loop)."""
        self._on_tick.append(callback)

    def _tick(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        self.lag = max(now - self._due, self.lag * self.decay)
        self._due = now + self.interval
        self._handle = self._loop.call_at(self._due, self._tick)
        for callback in self._on_tick:
            callback()

    def current(self) -> float:
        """The lag estimate now: the remembered lateness, or the pending tick's, if larger."""
        if self._loop is None:
            return 0.0
        return max(self.lag, self._loop.time() - self._due)


class _Throughput:
    """Rows per second of compute, from the growth of the batch histograms' sums."""

    def __init__(self, metrics: Any) -> None:
        self._metrics = metrics
        self._mark: tuple[float, float, float] | None = None  # (time, rows sum, compute seconds sum)
        self.rows_per_second: float | None = None

    @staticmethod
    def _sum(histogram: Any) -> float:
        return sum(s.value for family in histogram.collect() for s in family.samples if s.name.endswith("_sum"))

    def update(self) -> None:
        now = time.monotonic()
        if self._mark is not None and now - self._mark[0] < RATE_WINDOW_S:
            return
        rows, seconds = self._sum(self._metrics.batch_rows), self._sum(self._metrics.batch_compute)
        if self._mark is not None and seconds - self._mark[2] > 0:
            self.rows_per_second = (rows - self._mark[1]) / (seconds - self._mark[2])
        self._mark = (now, rows, seconds)


class LoadShedding:
    """An ASGI app: operation requests refused with 503 when the estimated wait is too long.

    Arguments:
        app: the app to protect (the fast path over :func:`service.api.create_app`'s app).
        state: the :class:`~service.api.state.ServiceState` (settings, metrics, worker).
        fraction: shed when the estimated wait exceeds ``fraction * settings.request_timeout_s``;
            0 turns shedding off (the lag is still measured and exported).
    """

    def __init__(self, app: ASGIApp, state: Any, fraction: float) -> None:
        self.app = app
        self.state = state
        self.limit_s = fraction * state.settings.request_timeout_s
        self.lag = LoopLag()
        self._throughput = _Throughput(state.metrics)
        registry = state.metrics.registry
        self._lag_gauge = Gauge("flowserve_event_loop_lag_seconds",
                                "How late the event loop runs a callback that is due (decayed maximum).",
                                registry=registry)
        self._shed = Counter("flowserve_requests_shed", "Operation requests answered 503 overloaded before "
                             "their body was read.", registry=registry)
        self.lag.on_tick(self._after_tick)

    def _after_tick(self) -> None:
        self._lag_gauge.set(self.lag.lag)
        self._throughput.update()

    def estimated_wait(self) -> float:
        """Seconds a request arriving now is expected to wait: loop lag plus the worker's queue."""
        wait = self.lag.current()
        worker = self.state.worker
        rate = self._throughput.rows_per_second
        if worker is not None and rate:
            wait += worker.queued_rows() / rate
        return wait

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.lag.running and scope["type"] in ("http", "lifespan"):
            self.lag.start(asyncio.get_running_loop())
        if self.limit_s > 0 and is_operation(scope):
            wait = self.estimated_wait()
            if wait > self.limit_s:
                self._shed.inc()
                retry = max(1, math.ceil(wait))
                problem = Problem.unavailable(
                    "overloaded", f"the server is overloaded: a request now would wait about {wait:.2f} s, "
                    f"more than {self.limit_s:g} s of its {self.state.settings.request_timeout_s:g} s deadline",
                    retry)
                await problem.response(scope["path"])(scope, receive, send)
                return
        await self.app(scope, receive, send)
