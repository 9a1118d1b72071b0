r"""Split-conformal anomaly scores from held-out log-densities.

With calibration log-densities :math:`L_1, \dots, L_m` (rows the flow never trained on), the
p-value of a new point with log-density :math:`\ell` is

.. math:: p(\ell) = \frac{1 + \#\{i : L_i \le \ell\}}{m + 1},

valid for exchangeable data: under the null, :math:`P(p \le \alpha) \le \alpha`. A point is an
anomaly at level :math:`\alpha` when :math:`p \le \alpha`. With the :math:`L_i` sorted ascending and
:math:`k = \lfloor \alpha (m + 1) \rfloor - 1`, that is exactly :math:`\ell < L_{(k)}` (0-indexed),
so :math:`L_{(k)}` is the threshold log-density; for :math:`k < 0` nothing can be flagged and the
threshold is :math:`-\infty`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["Calibration", "HISTOGRAM_BINS"]

#: bins of the calibration histogram in a model card
HISTOGRAM_BINS = 40


@dataclass(frozen=True)
class Calibration:
    """Sorted held-out log-densities and the conformal p-values they give."""

    log_probs: np.ndarray  # sorted ascending, float64

    @classmethod
    def from_values(cls, values: np.ndarray | list[float]) -> "Calibration":
        arr = np.sort(np.asarray(values, dtype=np.float64).reshape(-1))
        if arr.size == 0:
            raise ValueError("calibration set is empty")
        if not np.all(np.isfinite(arr)):
            raise ValueError("calibration log-densities must be finite")
        return cls(arr)

    @property
    def size(self) -> int:
        return int(self.log_probs.size)

    def p_value(self, log_prob: np.ndarray) -> np.ndarray:
        """:math:`(1 + \\#\\{L_i \\le \\ell\\}) / (m + 1)` for each ``ℓ`` (NaN counts as −∞)."""
        lp = np.asarray(log_prob, dtype=np.float64)
        lp = np.where(np.isnan(lp), -np.inf, lp)
        below = np.searchsorted(self.log_probs, lp, side="right")
        return (1.0 + below) / (self.size + 1.0)

    def threshold(self, alpha: float) -> float:
        """The log-density below which a point is flagged at level ``alpha`` (−∞: none is)."""
        if not 0.0 < alpha < 1.0:
            raise ValueError("alpha must lie in (0, 1)")
        m = self.size
        # the largest count c with (1 + c) / (m + 1) <= alpha, in the same float arithmetic as p_value
        k = min(m, math.floor(alpha * (m + 1))) - 1
        while k + 1 < m and (1.0 + k + 1) / (m + 1.0) <= alpha:
            k += 1
        while k >= 0 and (1.0 + k) / (m + 1.0) > alpha:
            k -= 1
        return float(self.log_probs[k]) if k >= 0 else -math.inf

    def is_anomaly(self, log_prob: np.ndarray, alpha: float) -> np.ndarray:
        """``p_value(ℓ) <= alpha``, i.e. ``ℓ < threshold(alpha)``."""
        return self.p_value(log_prob) <= alpha

    def quantiles(self, qs: tuple[float, ...] = (0.001, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95)) -> dict[str, float]:
        """Quantiles of the calibration log-densities, for the model card."""
        return {str(q): float(np.quantile(self.log_probs, q)) for q in qs}

    def histogram(self, bins: int = HISTOGRAM_BINS) -> dict[str, list[float] | list[int]]:
        """Counts of the calibration log-densities in ``bins`` equal-width bins over their range.

        ``edges`` has ``bins + 1`` entries and ``counts[i]`` is the number of values in
        ``[edges[i], edges[i + 1])`` (the last bin closed), so ``sum(counts)`` is the calibration
        size: enough to draw the distribution against which ``/score`` computes p-values without
        shipping every held-out value.
        """
        counts, edges = np.histogram(self.log_probs, bins=bins)
        return {"edges": edges.tolist(), "counts": counts.astype(int).tolist()}

    def summary(self) -> dict[str, object]:
        """The model card's ``calibration``: size, quantiles and histogram (server and CLI alike)."""
        return {"size": self.size, "quantiles": self.quantiles(), "histogram": self.histogram()}
