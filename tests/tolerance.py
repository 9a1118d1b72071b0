"""Tolerances that come from the dtype and the computation, never from one machine's output.

Float results differ across CPUs and kernels (AVX2 against AVX-512 summation orders, a batch of 30
rows against one of 15): what is reproducible is

- **bit-identical** on one machine and build, for the same computation on the same batch shapes
  (seeded sampling, a trace against its eager pass, a saved model against its reload);
- **within float tolerance** elsewhere, stated here in units of the dtype's machine epsilon
  ``eps`` (``2**-23`` for float32) times the magnitude of the values involved.

A flow's pass is a few hundred float operations per row, whose rounding errors add up: the error of
a result is a modest multiple of ``eps`` times the magnitude of the *intermediate* values (a latent
row, a sum of log-determinant terms), not of the result itself, which can be near zero. So the
absolute part of each tolerance scales with the largest magnitude of the array compared (at least 1).
"""

from __future__ import annotations

import numpy as np

__all__ = ["BATCH_ULPS", "assert_batch_invariant", "assert_close_across_machines", "ulp_tolerance"]

#: Rounding a different batch shape may bring, on one machine (another kernel, another summation
#: order): 256 ulps of the magnitude, 3e-5 for float32 values of order 1.
BATCH_ULPS = 256

#: What the HTTP contract promises of a row's log_prob whatever its batch (API.md: 1e-5 relative).
CONTRACT_RTOL = 1e-5


def ulp_tolerance(values: np.ndarray, ulps: float, dtype: np.dtype | type | None = None) -> float:
    """``ulps * eps(dtype) * max(1, max|values|)``: an absolute tolerance for ``values``."""
    values = np.asarray(values)
    eps = float(np.finfo(dtype if dtype is not None else values.dtype).eps)
    finite = values[np.isfinite(values)]
    scale = max(1.0, float(np.max(np.abs(finite)))) if finite.size else 1.0
    return ulps * eps * scale


def assert_batch_invariant(got: np.ndarray, want: np.ndarray, dtype: np.dtype | type | None = None,
                           err_msg: str = "") -> None:
    """``got`` (computed in one batch) equals ``want`` (computed in another) up to the contract's
    1e-5 relative, with an absolute floor of :data:`BATCH_ULPS` ulps of the magnitude, so that
    values near zero are not held to a relative precision the float type cannot give.

    ``dtype`` is the dtype the values were computed in (default: ``want``'s; pass it when the
    values went through JSON or were widened to float64).
    """
    want = np.asarray(want)
    if dtype is None and want.dtype.kind != "f":
        dtype = np.float64
    atol = ulp_tolerance(want, BATCH_ULPS, dtype if dtype is not None else want.dtype)
    np.testing.assert_allclose(got, want, rtol=CONTRACT_RTOL, atol=atol, err_msg=err_msg)


def assert_close_across_machines(got: np.ndarray, want: np.ndarray, dtype: np.dtype | type,
                                 err_msg: str = "") -> None:
    """``got`` (computed here) equals ``want`` (recorded on another machine, e.g. at training time)
    to ``sqrt(eps)`` of the magnitude, element by element: half the digits of ``dtype``
    (3.5e-4 relative in float32, 1.5e-8 in float64).

    Trained flows amplify the rounding of their early layers (a spline's knot positions, the
    standardisation), so results computed on another CPU agree to a few hundred or thousand ulps,
    not to a fixed small count; a wrong model or a wrong term is off by orders of magnitude more.
    """
    tol = float(np.sqrt(np.finfo(dtype).eps))
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=err_msg)
