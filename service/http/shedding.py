r"""Load shedding by estimated wait: 503 early instead of a long wait the deadline cannot afford.

Under many connections the event loop, not the worker's queue, is the bottleneck: each request
needs a few turns of the loop (head parsed, body read, rows submitted, answer written), and when
hundreds are ready at once one turn lasts long, so every request waits a few turns' worth while
the queue stays nearly empty and its bound (``max_queue_rows``) never refuses anything.
:class:`LoadShedding` admits each operation request by an estimate of the wait ahead of it::

    wait = max(loop lag + compute ahead of a one-row request (round robin),
               operations in flight / operations completed per second)

* **loop lag** (:class:`LoopLag`): a timer is due every :data:`LAG_INTERVAL_S`; how late it fires
  is how long the loop takes to come back to any callback. The estimate is the larger of the last
  lateness (decayed by :data:`LAG_DECAY` per tick, so one slow turn does not shed for long) and how
  late the pending tick is already (so a loop that was blocked is seen the moment it runs again).
* **queue**: :meth:`DeviceWorker.wait_estimate` - the seconds of compute queued ahead of a new
  one-row request under the worker's round robin (a one-row request does not wait for all of a
  million-row one, only for a slice of it), from the worker's measured rate per model and pass; 0
  until a batch has run.

* **Little's law** (:class:`Completions`): the mean time in the server is the number of requests
  in it over the rate they leave it, :math:`W = L / \lambda`, whatever the bottleneck (the loop's
  turns, the worker, the GIL between them). :math:`\lambda` is counted over the last
  :data:`RATE_WINDOW_S` and used only once :data:`MIN_COMPLETIONS` requests completed in it, so
  one slow bulk request alone (few completions) never sheds the small ones that round robin serves
  beside it.

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
from collections import deque
from typing import Any

from prometheus_client import Counter, Gauge
from starlette.types import ASGIApp, Receive, Scope, Send

from service.http.problems import Problem
from service.http.router import match_operation, route_path

__all__ = ["Completions", "LoadShedding", "LoopLag", "is_operation"]

#: seconds between the lag timer's ticks
LAG_INTERVAL_S = 0.025
#: seconds over which completed operations are counted (Little's law)
RATE_WINDOW_S = 1.0
#: completions in the window before their rate is trusted
MIN_COMPLETIONS = 20
#: factor on the remembered lateness per tick (0.8 per 25 ms: a lateness fades to a tenth in ~0.26 s)
LAG_DECAY = 0.8


def is_operation(scope: Scope) -> bool:
    """Whether ``scope`` is an operation ``POST`` (v1 or v2 ``infer``), the requests that may be shed.

    Paths are matched as the app routes them: less the ``root_path`` prefix (:func:`route_path`).
    """
    if scope["type"] != "http" or scope["method"] != "POST":
        return False
    path = route_path(scope)
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


class Completions:
    """Operations in flight and the rate they complete at (event-loop side only, no lock)."""

    def __init__(self, window: float = RATE_WINDOW_S, minimum: int = MIN_COMPLETIONS) -> None:
        self.window = window
        self.minimum = minimum
        self.in_flight = 0
        self._done: deque[float] = deque()

    def started(self) -> None:
        self.in_flight += 1

    def finished(self, now: float) -> None:
        self.in_flight -= 1
        self._done.append(now)

    def expected_wait(self, now: float) -> float:
        """``in_flight / completions per second`` over the window (0 with too few completions)."""
        done = self._done
        while done and done[0] < now - self.window:
            done.popleft()
        if len(done) < self.minimum:
            return 0.0
        return self.in_flight / (len(done) / self.window)


class LoadShedding:
    """An ASGI app: operation requests refused with 503 when the estimated wait is too long.

    Arguments:
        app: the app to protect (:func:`service.http.create_app`'s app).
        state: the :class:`~service.http.state.ServiceState` (settings, metrics, worker).
        fraction: shed when the estimated wait exceeds ``fraction * settings.request_timeout_s``;
            0 turns shedding off (the lag is still measured and exported).
    """

    def __init__(self, app: ASGIApp, state: Any, fraction: float) -> None:
        self.app = app
        self.state = state
        self.limit_s = fraction * state.settings.request_timeout_s
        self.lag = LoopLag()
        registry = state.metrics.registry
        self._lag_gauge = Gauge("flowserve_event_loop_lag_seconds",
                                "How late the event loop runs a callback that is due (decayed maximum).",
                                registry=registry)
        self._shed = Counter("flowserve_requests_shed", "Operation requests answered 503 overloaded before "
                             "their body was read.", registry=registry)
        self.completions = Completions()
        self.lag.on_tick(self._after_tick)

    def _after_tick(self) -> None:
        self._lag_gauge.set(self.lag.lag)

    def estimated_wait(self) -> float:
        """Seconds a request arriving now is expected to wait (module docstring)."""
        wait = self.lag.current()
        worker = self.state.worker
        if worker is not None:
            wait += worker.wait_estimate()
        return max(wait, self.completions.expected_wait(time.monotonic()))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.lag.running and scope["type"] in ("http", "lifespan"):
            self.lag.start(asyncio.get_running_loop())
        if not is_operation(scope):
            await self.app(scope, receive, send)
            return
        if self.limit_s > 0:
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
        self.completions.started()
        try:
            await self.app(scope, receive, send)
        finally:
            self.completions.finished(time.monotonic())
