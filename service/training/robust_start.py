r"""A robust Gaussian start for small-data training: the minimum covariance determinant (MCD).

Anomalies among the training rows pull a sample mean and covariance towards themselves. The MCD
estimator (Rousseeuw, 1984) instead takes the :math:`h` rows whose sample covariance has the
smallest determinant, so up to :math:`n - h` rows may be anything. :math:`h = \lfloor (n + d + 1)/2
\rfloor` gives the highest breakdown (about half the rows), at a large variance: on a few dozen rows
in a dozen dimensions the estimate then changes much from one sample to the next. Here
:math:`h = \max(\lfloor (n + d + 1)/2 \rfloor, \lceil 0.75\,n \rceil)` (:data:`SUPPORT`), the
compromise between breakdown (25 %) and efficiency that Rousseeuw & Van Driessen (1999) recommend
when the data hold fewer than a quarter outliers, which is what the trimmed objective
(:mod:`service.training.fit`, 10 % trimmed) assumes of anomaly data.
It is computed here by FastMCD's concentration steps (Rousseeuw & Van Driessen, 1999): from random
subsets of :math:`d + 1` rows, repeat "fit mean and covariance; keep the :math:`h` rows of smallest
Mahalanobis distance" (each step can only lower the determinant) until the subset stops changing,
and keep the best of several starts. The raw estimate is then made consistent at the Gaussian
(scaled by :math:`\mathrm{med}_i\, d_i^2 / \chi^2_{d,0.5}`) and reweighted: mean and covariance
of the rows with :math:`d_i^2 \le \chi^2_{d,0.975}`, made consistent the same way. Quantiles of :math:`\chi^2_d` use the
Wilson-Hilferty approximation :math:`d\,(1 - \tfrac{2}{9d} + z_q \sqrt{2/(9d)})^3`.

:func:`gaussian_start` turns the estimate :math:`(\mu, \Sigma)` into the density model's
preprocessing: ``shift`` :math:`=\mu`, ``scale`` :math:`=\sigma = \sqrt{\mathrm{diag}\,\Sigma}`, and
``linear`` :math:`A = L^{-1}` with :math:`L L^\top = R = \mathrm{diag}(\sigma)^{-1}\Sigma\,\mathrm{diag}(\sigma)^{-1}`
(lower-triangular, positive diagonal), so that :math:`u = A (x - \mu)/\sigma` has identity scatter
and a flow that is the identity makes the model exactly :math:`\mathcal{N}(\mu, \Sigma)`.
Only the training rows are used; no labels.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

__all__ = ["GaussianStart", "gaussian_start", "mcd"]

#: random (d + 1)-row starts of the concentration steps, and the most steps from each
STARTS = 50
MAX_STEPS = 100
#: the share of the rows the MCD keeps (at least half of them plus d): 25 % breakdown, see the module doc
SUPPORT = 0.75
_Z_HALF, _Z_975 = 0.0, 1.959963984540054


def _chi2_quantile(d: int, z: float) -> float:
    """Wilson-Hilferty approximation of the :math:`\\chi^2_d` quantile whose normal score is ``z``."""
    c = 2.0 / (9.0 * d)
    return d * (1.0 - c + z * math.sqrt(c)) ** 3


def _fit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu = x.mean(axis=0)
    return mu, np.atleast_2d(np.cov(x, rowvar=False, bias=True))


def _mahalanobis2(x: np.ndarray, mu: np.ndarray, cov: np.ndarray) -> np.ndarray:
    chol = np.linalg.cholesky(cov)
    w = np.linalg.solve(chol, (x - mu).T)
    return np.sum(w * w, axis=0)


def _logdet(cov: np.ndarray) -> float:
    sign, value = np.linalg.slogdet(cov)
    return value if sign > 0 else -math.inf


def _concentrate(x: np.ndarray, mu: np.ndarray, cov: np.ndarray, h: int) -> tuple[np.ndarray, np.ndarray]:
    """Concentration steps from ``(mu, cov)`` until the ``h`` closest rows stop changing."""
    previous = None
    for _ in range(MAX_STEPS):
        keep = np.sort(np.argsort(_mahalanobis2(x, mu, cov), kind="stable")[:h])
        if previous is not None and np.array_equal(keep, previous):
            break
        previous = keep
        mu, cov = _fit(x[keep])
    return mu, cov


def mcd(x: np.ndarray, seed: int = 0, support: float = SUPPORT) -> tuple[np.ndarray, np.ndarray]:
    r"""Reweighted MCD location and covariance of rows ``x`` ``(n, d)`` (see the module doc).

    ``support``: the share of rows kept, :math:`h = \max(\lfloor (n + d + 1)/2 \rfloor, \lceil
    \mathrm{support}\cdot n \rceil)` (0.5 or less: the half-sample, highest-breakdown MCD).
    Raises ``ValueError`` when no subset of ``h`` rows has a nonsingular covariance (e.g. fewer
    rows than ``2 d``, or a feature constant on half of the rows).
    """
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    if not 0.0 < support <= 1.0:
        raise ValueError(f"support must lie in (0, 1], got {support}")
    h = min(n, max((n + d + 1) // 2, math.ceil(support * n)))
    if n < 2 * d or h <= d:
        raise ValueError(f"the MCD of {d} features needs at least {2 * d} rows, got {n}")
    rng = np.random.default_rng(seed)
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for _ in range(STARTS):
        subset = rng.choice(n, size=d + 1, replace=False)
        try:
            mu, cov = _concentrate(x, *_fit(x[subset]), h)
        except np.linalg.LinAlgError:
            continue  # a (numerically) singular subset on the way: drop this start
        value = _logdet(cov)
        if math.isfinite(value) and (best is None or value < best[0]):
            best = (value, mu, cov)
    if best is None:
        raise ValueError("no subset of half the rows has a nonsingular covariance")
    _, mu, cov = best
    try:
        return _reweight(x, mu, cov)
    except np.linalg.LinAlgError:
        raise ValueError("the reweighted MCD covariance is singular") from None


def _reweight(x: np.ndarray, mu: np.ndarray, cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Consistency factor, then the mean and covariance of the rows within the 97.5 % quantile (consistent again)."""
    d = x.shape[1]
    d2 = _mahalanobis2(x, mu, cov)
    cov = cov * (np.median(d2) / _chi2_quantile(d, _Z_HALF))
    inliers = _mahalanobis2(x, mu, cov) <= _chi2_quantile(d, _Z_975)
    mu, cov = _fit(x[inliers])
    if not math.isfinite(_logdet(cov)):
        raise ValueError("the reweighted MCD covariance is singular")
    # the inliers' covariance is that of a truncated Gaussian: made consistent again
    return mu, cov * (np.median(_mahalanobis2(x, mu, cov)) / _chi2_quantile(d, _Z_HALF))


class GaussianStart(NamedTuple):
    r"""The preprocessing that makes an identity flow :math:`\mathcal{N}(\mu, \Sigma)`."""

    shift: np.ndarray
    scale: np.ndarray
    linear: np.ndarray


def gaussian_start(x: np.ndarray, seed: int = 0) -> GaussianStart:
    """The MCD Gaussian of rows ``x`` as ``shift``, ``scale`` and the lower-triangular ``linear`` :math:`A`."""
    mu, cov = mcd(x, seed)
    sigma = np.sqrt(np.diag(cov))
    corr = cov / np.outer(sigma, sigma)
    chol = np.linalg.cholesky(corr)
    linear = np.tril(np.linalg.solve(chol, np.eye(x.shape[1])))  # L^-1 is lower-triangular; clear the rounding above
    return GaussianStart(mu, sigma, linear)
