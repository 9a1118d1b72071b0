r"""Watching a served model version: flagged rows, its log-densities, and drift from its calibration set.

One :class:`ModelMonitor` per loaded model version (per :class:`~service.serving.registry.ServedModel`
object: a reload makes a new one, starting from zero). The operations call :func:`observe` with the
log-densities of each answered request (``log_prob`` and ``score``), and ``score`` also with the rows
it flagged at the request's alpha. The monitor keeps, in numpy and in O(rows) per request:

- the counts of rows flagged / not flagged (``flowserve_anomaly_rows_total``);
- a histogram of the log-densities (``flowserve_log_prob``). Its bucket edges are **per model
  version**: the calibration set's quantiles at :data:`QUANTILE_LEVELS` (0.1 %, 1 %, 5 %, ...,
  99 %), so with no drift the fraction of rows in each cumulative bucket ``le`` is the quantile
  level itself (e.g. 1 % of rows at or below the ``le`` of the 1 % quantile), whatever the model's
  dimension and units (a 2-D model's log-densities lie around -3, a 64-D model's around -100).
  Models without a calibration set use :data:`FALLBACK_BUCKETS`. Prometheus takes different
  ``le`` sets for different label sets of one histogram; aggregate buckets only within one model
  version. ``_sum`` adds the finite values only (one :math:`-\infty` would make it :math:`-\infty`
  for ever); a NaN log-density counts as :math:`-\infty`, as in the conformal p-value;
- a sliding window of the last :data:`WINDOW_ROWS` log-densities (a ring buffer) and the drift
  statistic: the two-sample Kolmogorov-Smirnov test of the window against the calibration
  log-densities (:func:`ks_two_sample`, :math:`O((W + m)\log)` for a window of :math:`W` and
  :math:`m \le 10^4` calibration rows). The request path recomputes it once :data:`RECOMPUTE_ROWS`
  rows came or :data:`RECOMPUTE_SECONDS` passed since the last time (so one-row requests pay for it
  once per 100 rows), and a scrape or card read does when any row came since; only once the window
  holds :data:`MIN_ROWS` rows (until then the card says ``"not enough data"`` and the drift gauges
  are absent).

A low p-value says the recent inputs' log-densities are not distributed as the held-out data's
were: the inputs moved (covariate shift) or the model no longer fits them. The rows of one window
are treated as independent; a client that sends many copies of one row makes it look like drift.

The monitors are attached to their :class:`ServedModel` objects through a weak map (the dataclass
is frozen), so a version's monitor goes when the version is unloaded. Each app's
:class:`MonitorCollector` watches that app's :class:`~service.serving.registry.ModelRegistry` and
exposes the monitors of the versions it serves now, and no other app's: every loaded version has
its series from the start (zero counts), and a version gone in a reload leaves the exposition.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import weakref
from bisect import bisect_left
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from service.serving.registry import ModelRegistry, ServedModel

__all__ = ["FALLBACK_BUCKETS", "FEW_ROWS", "MIN_ROWS", "ModelMonitor", "MonitorCollector", "QUANTILE_LEVELS",
           "RECOMPUTE_ROWS", "RECOMPUTE_SECONDS", "WINDOW_ROWS", "kolmogorov_sf", "ks_two_sample",
           "monitor_of", "observe"]

log = logging.getLogger("flowserve.monitoring")

#: rows of the drift window (the most recent log-densities)
WINDOW_ROWS = 1000
#: the window must hold at least this many rows before the drift statistic is computed
MIN_ROWS = 100
#: the request path recomputes the statistic once this many rows came since the last time ...
RECOMPUTE_ROWS = 100
#: ... or once this many seconds passed with new rows
RECOMPUTE_SECONDS = 5.0
#: requests of at most this many rows are recorded in plain Python, larger ones with numpy
FEW_ROWS = 16
#: quantile levels of the calibration log-densities that are the histogram's bucket edges
QUANTILE_LEVELS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
#: bucket edges of models without a calibration set: a symmetric 1-2-5 scale over [-1000, 100]
FALLBACK_BUCKETS = (-1000.0, -500.0, -200.0, -100.0, -50.0, -20.0, -10.0, -5.0, -2.0, -1.0, 0.0,
                    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)

NOT_ENOUGH_DATA = "not enough data"
NO_CALIBRATION = "no calibration set"
OK = "ok"


# -- the Kolmogorov-Smirnov test ------------------------------------------------------------------
def kolmogorov_sf(lam: float) -> float:
    r""":math:`Q(\lambda) = P(K > \lambda) = 2\sum_{k\ge1} (-1)^{k-1} e^{-2k^2\lambda^2}`, the tail of the
    Kolmogorov distribution.

    For :math:`\lambda < 1` the alternating series converges slowly, so the equivalent (Jacobi theta)
    form of the CDF is used there: :math:`P(K \le \lambda) = \frac{\sqrt{2\pi}}{\lambda}
    \sum_{k\ge1} e^{-(2k-1)^2\pi^2/(8\lambda^2)}`. Either sum converges to double precision in a
    handful of terms in its range.
    """
    if not lam > 0.0:
        return 1.0
    k = np.arange(1, 21, dtype=np.float64)
    if lam < 1.0:
        cdf = math.sqrt(2.0 * math.pi) / lam * float(np.sum(np.exp(-((2.0 * k - 1.0) ** 2) * math.pi ** 2
                                                                      / (8.0 * lam * lam))))
        return float(min(1.0, max(0.0, 1.0 - cdf)))
    signs = np.where(k % 2 == 1, 1.0, -1.0)
    return float(min(1.0, max(0.0, 2.0 * float(np.sum(signs * np.exp(-2.0 * k * k * lam * lam))))))


def ks_two_sample(a_sorted: np.ndarray, b_sorted: np.ndarray) -> tuple[float, float]:
    r"""The two-sample Kolmogorov-Smirnov statistic and its asymptotic p-value, for sorted samples.

    :math:`D = \sup_t |F_n(t) - G_m(t)|` over the two empirical CDFs (attained at a sample value,
    so it is evaluated at every value of both samples with ``searchsorted``: :math:`O((n+m)\log)`).
    Under the hypothesis that both samples come from one continuous distribution,
    :math:`\sqrt{n_e}\,D` tends to the Kolmogorov distribution with the effective size
    :math:`n_e = nm/(n+m)`; the p-value is :func:`kolmogorov_sf` of
    :math:`\lambda = (\sqrt{n_e} + 0.12 + 0.11/\sqrt{n_e})\,D`, Stephens' (1970) correction for
    finite :math:`n_e`. At the sizes used here it agrees with scipy's ``ks_2samp`` (which uses the
    exact one-sample distribution at :math:`n_e`) within 0.02 in absolute terms and 10 % in relative
    terms below p = 0.01 (``tests/test_monitoring.py``); the statistic itself is identical.
    """
    n, m = a_sorted.size, b_sorted.size
    if n == 0 or m == 0:
        raise ValueError("both samples must be non-empty")
    both = np.concatenate([a_sorted, b_sorted])
    cdf_a = np.searchsorted(a_sorted, both, side="right") / n
    cdf_b = np.searchsorted(b_sorted, both, side="right") / m
    d = float(np.max(np.abs(cdf_a - cdf_b)))
    en = math.sqrt(n * m / (n + m))
    return d, kolmogorov_sf((en + 0.12 + 0.11 / en) * d)


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds")


# -- one model version's monitor ------------------------------------------------------------------
class ModelMonitor:
    """Counters, log-density histogram and drift window of one model version (module docstring)."""

    def __init__(self, name: str, version: int | str, calibration: np.ndarray | None, *,
                 window: int = WINDOW_ROWS, min_rows: int = MIN_ROWS, recompute_rows: int = RECOMPUTE_ROWS,
                 recompute_seconds: float = RECOMPUTE_SECONDS) -> None:
        if not 1 <= min_rows <= window:
            raise ValueError(f"min_rows must lie in [1, window={window}], got {min_rows}")
        self.name, self.version = name, str(version)
        self.window, self.min_rows = window, min_rows
        self.recompute_rows, self.recompute_seconds = recompute_rows, recompute_seconds
        self.calibration = None if calibration is None else np.sort(np.asarray(calibration, np.float64).ravel())
        if self.calibration is not None and self.calibration.size:
            edges = np.unique(np.quantile(self.calibration, QUANTILE_LEVELS))
        else:
            self.calibration = None
            edges = np.asarray(FALLBACK_BUCKETS, np.float64)
        self.edges = edges
        self._le = [floatToGoString(e) for e in edges] + ["+Inf"]
        self._lock = threading.Lock()
        # histogram: counts[i] = rows in (edges[i-1], edges[i]], the last one above every edge
        self._counts = [0] * (edges.size + 1)
        self._edge_list = edges.tolist()
        self._sum = 0.0
        self.flagged = 0
        self.not_flagged = 0
        self.rows_seen = 0
        # the drift window: a ring of the last `window` log-densities and when each came
        self._ring = np.empty(window, np.float64)
        self._times = np.empty(window, np.float64)
        self._next = 0  # where the next row goes
        self._filled = 0
        self._pending = 0  # rows since the statistic was last computed
        self._last_compute = 0.0  # monotonic time of the last computation
        self.statistic: float | None = None
        self.p_value: float | None = None
        self._computed_at: float | None = None  # wall time
        self._computed_rows = 0
        self._computed_since: float | None = None

    # -- the request path --------------------------------------------------------------------------
    def observe(self, log_prob: np.ndarray, flagged: np.ndarray | None = None) -> None:
        """Record the log-densities of one request's rows (and, from ``score``, which were flagged).

        Up to :data:`FEW_ROWS` rows go through plain Python floats (a numpy call costs more than
        the arithmetic on so few values); larger requests are vectorised. Both are O(rows).
        """
        arr = np.asarray(log_prob).reshape(-1)
        n = arr.size
        if n == 0:
            return
        n_flagged = None
        if flagged is not None:
            flags = np.asarray(flagged).reshape(-1)
            n_flagged = sum(flags.tolist()) if n <= FEW_ROWS else int(np.count_nonzero(flags))
        wall, mono = time.time(), time.monotonic()
        with self._lock:
            if n <= FEW_ROWS:
                self._observe_few(arr.tolist(), wall)
            else:
                self._observe_many(arr.astype(np.float64, copy=False), wall)
            self.rows_seen += n
            if n_flagged is not None:
                self.flagged += n_flagged
                self.not_flagged += n - n_flagged
            self._pending += n
            if (self._pending >= self.recompute_rows
                    or mono - self._last_compute >= self.recompute_seconds):
                self._recompute(mono)

    def _observe_few(self, values: list[float], wall: float) -> None:
        counts, edges, ring, times, size = self._counts, self._edge_list, self._ring, self._times, self.window
        for v in values:
            if v != v:  # NaN counts as -inf
                v = -math.inf
            counts[bisect_left(edges, v)] += 1  # first edge >= v: the `le` bucket
            if math.isfinite(v):
                self._sum += v
            ring[self._next] = v
            times[self._next] = wall
            self._next = (self._next + 1) % size
        self._filled = min(size, self._filled + len(values))

    def _observe_many(self, lp: np.ndarray, wall: float) -> None:
        nan = np.isnan(lp)
        if nan.any():
            lp = np.where(nan, -np.inf, lp)
        finite = np.isfinite(lp)
        self._sum += float(lp.sum()) if finite.all() else float(lp[finite].sum())
        bucket = np.searchsorted(self.edges, lp, side="left")  # first edge >= value: the `le` bucket
        for i, c in enumerate(np.bincount(bucket, minlength=len(self._counts)).tolist()):
            self._counts[i] += c
        self._push(lp[-self.window:], wall)

    def _push(self, values: np.ndarray, wall: float) -> None:
        k, start = values.size, self._next
        first = min(k, self.window - start)
        self._ring[start:start + first] = values[:first]
        self._times[start:start + first] = wall
        if k > first:
            self._ring[:k - first] = values[first:]
            self._times[:k - first] = wall
        self._next = (start + k) % self.window
        self._filled = min(self.window, self._filled + k)

    def _recompute(self, mono: float) -> None:
        """The KS test of the window against the calibration set (lock held)."""
        self._pending = 0
        self._last_compute = mono
        if self.calibration is None or self._filled < self.min_rows:
            return
        window = np.sort(self._ring[:self._filled])
        self.statistic, self.p_value = ks_two_sample(window, self.calibration)
        self._computed_at = time.time()
        self._computed_rows = self._filled
        oldest = self._next if self._filled == self.window else 0
        self._computed_since = float(self._times[oldest])

    def refresh(self) -> None:
        """Bring the statistic up to date with every row seen (a scrape or a card read)."""
        with self._lock:
            if self._pending:
                self._recompute(time.monotonic())

    # -- reading -----------------------------------------------------------------------------------
    @property
    def status(self) -> str:
        if self.calibration is None:
            return NO_CALIBRATION
        return OK if self.p_value is not None else NOT_ENOUGH_DATA

    def drift(self) -> dict[str, Any]:
        """The model card's ``drift``: the latest KS statistic and p-value and the window they are of."""
        self.refresh()
        with self._lock:
            return {
                "test": "two-sample Kolmogorov-Smirnov, recent log-densities vs. the calibration set",
                "status": self.status,
                "statistic": self.statistic,
                "p_value": self.p_value,
                "window_rows": self._computed_rows if self.p_value is not None else self._filled,
                "window": self.window,
                "min_rows": self.min_rows,
                "calibration_rows": 0 if self.calibration is None else int(self.calibration.size),
                "since": _iso(self._computed_since),
                "computed_at": _iso(self._computed_at),
                "rows_seen": self.rows_seen,
            }

    def histogram(self) -> tuple[list[tuple[str, float]], float]:
        """Cumulative ``(le, count)`` buckets and the sum of the finite log-densities."""
        with self._lock:
            cumulative = np.cumsum(self._counts).tolist()
            total = self._sum
        return [(le, float(c)) for le, c in zip(self._le, cumulative)], total


# -- the per-version attachment and the operations' hook -----------------------------------------
_monitors: "weakref.WeakKeyDictionary[ServedModel, ModelMonitor]" = weakref.WeakKeyDictionary()
_attach = threading.Lock()


def monitor_of(served: "ServedModel") -> ModelMonitor:
    """The monitor of one loaded model version (made on first use)."""
    monitor = _monitors.get(served)
    if monitor is None:
        with _attach:
            monitor = _monitors.get(served)
            if monitor is None:
                calibration = served.calibration
                monitor = _monitors[served] = ModelMonitor(
                    served.name, served.version, None if calibration is None else calibration.log_probs)
    return monitor


def observe(served: "ServedModel", log_prob: np.ndarray, flagged: np.ndarray | None = None) -> None:
    """The operations' hook: record one answered request's log-densities (and flags, from ``score``).

    A failure here is logged, never raised: watching must not fail the request it watches.
    """
    try:
        monitor_of(served).observe(log_prob, flagged)
    except Exception:  # pragma: no cover - defensive
        log.exception("monitoring model %r version %s failed", served.name, served.version)


# -- Prometheus exposition ------------------------------------------------------------------------
class MonitorCollector(Collector):
    """The monitors' metrics, built at scrape time from their numpy state.

    ``flowserve_anomaly_rows_total{model,version,flagged}``, ``flowserve_log_prob{model,version}``
    (histogram), ``flowserve_drift_ks`` and ``flowserve_drift_p_value`` (only once computed) and
    ``flowserve_drift_window_rows`` (gauges, ``{model,version}``).

    Log-densities are mostly negative, and prometheus-client's ``HistogramMetricFamily`` then
    leaves out ``_count`` and ``_sum`` (OpenMetrics' rule: a ``_sum`` of negative values is no
    counter). The classic text format that ``/metrics`` writes has no such rule, and a dashboard
    wants both (``rate(_count)``: rows per second; ``rate(_sum) / rate(_count)``: the mean
    log-density), so they are added here; ``_sum`` may go down, so read it as a gauge-like sum.
    """

    def __init__(self, monitors: Iterable[ModelMonitor] | None = None) -> None:
        self._fixed = None if monitors is None else list(monitors)
        self._registry: ModelRegistry | None = None

    def watch(self, registry: "ModelRegistry") -> None:
        """Expose the monitors of the versions ``registry`` serves (the app's, at its start)."""
        self._registry = registry

    def monitors(self) -> list[ModelMonitor]:
        """The monitors given, or those of every version the watched registry serves now."""
        if self._fixed is not None:
            return self._fixed
        if self._registry is None:
            return []
        return [monitor_of(served) for entry in self._registry.entries() for served in entry.versions.values()]

    def _families(self) -> tuple[CounterMetricFamily, HistogramMetricFamily, GaugeMetricFamily,
                                 GaugeMetricFamily, GaugeMetricFamily]:
        labels = ["model", "version"]
        return (
            CounterMetricFamily("flowserve_anomaly_rows", "Rows scored by /score, by whether they were flagged "
                                "at the request's alpha.", labels=labels + ["flagged"]),
            HistogramMetricFamily("flowserve_log_prob", "Log-densities answered by log_prob and score; bucket "
                                  "edges are the model version's calibration quantiles.", labels=labels),
            GaugeMetricFamily("flowserve_drift_ks", "Two-sample KS statistic of the recent log-densities "
                              "against the calibration set.", labels=labels),
            GaugeMetricFamily("flowserve_drift_p_value", "Asymptotic p-value of flowserve_drift_ks (low: the "
                              "inputs drifted from the calibration data).", labels=labels),
            GaugeMetricFamily("flowserve_drift_window_rows", "Rows in the drift window.", labels=labels),
        )

    def describe(self) -> Iterator[Any]:
        yield from self._families()

    def collect(self) -> Iterator[Any]:
        rows, hist, ks, p, window = self._families()
        for m in sorted(self.monitors(), key=lambda m: (m.name, int(m.version) if m.version.isdigit() else 0)):
            m.refresh()
            labels = [m.name, m.version]
            rows.add_metric(labels + ["true"], m.flagged)
            rows.add_metric(labels + ["false"], m.not_flagged)
            buckets, total = m.histogram()
            hist.add_metric(labels, buckets, total)
            if float(buckets[0][0]) < 0:  # add_metric leaves these out when an edge is negative (below)
                named = {"model": m.name, "version": m.version}
                hist.samples.append(Sample("flowserve_log_prob_count", named, buckets[-1][1], None))
                hist.samples.append(Sample("flowserve_log_prob_sum", named, total, None))
            state = m.drift()
            window.add_metric(labels, state["window_rows"])
            if state["p_value"] is not None:
                ks.add_metric(labels, state["statistic"])
                p.add_metric(labels, state["p_value"])
        yield from (rows, hist, ks, p, window)
