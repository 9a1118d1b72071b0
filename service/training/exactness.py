r"""Certificates that a trained model's density is the density it claims.

A model maps data to latents, :math:`z = f^{-1}(x)`, and reports
:math:`\log p(x) = \log p_Z(z) + \log|\det \partial z / \partial x|`. Each check below measures one
way this could be false, on rows the model never trained on, and compares the figure with a
tolerance stated beside it:

``round_trip_x``
    :math:`\max |f(f^{-1}(x)) - x|` over held-out rows, against :math:`\tau \cdot \max|x|`.
``round_trip_z``
    :math:`\max |f^{-1}(f(z)) - z|` over base draws :math:`z \sim N(0, I)`, against
    :math:`\tau \cdot \max|z| + \rho`, where :math:`\rho = \max |f^{-1}(\mathrm{rd}(f(z))) - f^{-1}(f(z))|`,
    both evaluated in float64, is how far :math:`z` moves when :math:`x = f(z)` is merely rounded to
    the serving dtype (:math:`\rho = 0` for float64 models). It matters for bounded features: near a
    bound the logit is ill-conditioned, e.g. a float32 pixel 0.0023 below 17 holds :math:`17 - x` to
    4e-4 relative, which moves :math:`z` by ~3e-4 whatever the implementation does; the error
    beyond that rounding is still held to :math:`\tau`.
``log_det_autograd``
    :math:`\max |\mathrm{log\_det} - \log|\det J||` where :math:`J = \partial z / \partial x` comes
    from ``torch.autograd.functional.jacobian`` on a float64 copy of the model; the model's own
    ``log_det`` is compared in its serving dtype (tolerance relative to :math:`\max(1, |\log|\det J||)`)
    and, as ``float64_max_abs_error``, in float64 (where only rounding separates them).
``integral`` (1- and 2-dimensional models)
    :math:`\int \exp \log p(x)\,dx` by the trapezoid rule on a grid of :math:`\mu \pm 7\sigma`
    (the folded-in standardisation), within 1% of 1. For a bounded feature the grid is uniform in
    its logit :math:`y` and mapped into :math:`(a, b)` by the model's own inverse, so the points crowd
    where the density may crowd (near a bound) while the integral is still taken over :math:`x`,
    through the logit's Jacobian.

:math:`\tau` is ``ROUND_TRIP_RTOL[dtype]``: about :math:`10^3` units in the last place of the dtype,
the size of the rounding a few spline inversions and affine layers accumulate, relative to the
data's own scale (so it does not depend on the units of the data).

Beside them, :func:`nll_figures` gives the held-out negative log-likelihood, total and per
dimension, next to that of a full-covariance Gaussian fitted by maximum likelihood on the training
rows (for conditional models, a Gaussian whose mean is linear in the context).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from service.model.density import DensityModel

__all__ = [
    "INTEGRAL_TOLERANCE",
    "LOG_DET_RTOL",
    "ROUND_TRIP_RTOL",
    "certify",
    "gaussian_log_prob",
    "integral",
    "log_det_errors",
    "log_probs",
    "nll_figures",
    "output_rounding_z",
    "round_trip_x",
    "round_trip_z",
]

#: round-trip tolerance relative to the largest absolute value involved, per serving dtype
ROUND_TRIP_RTOL: dict[torch.dtype, float] = {torch.float32: 1e-4, torch.float64: 1e-10}
#: log-det tolerance relative to ``max(1, |log|det J||)``, per serving dtype
LOG_DET_RTOL: dict[torch.dtype, float] = {torch.float32: 1e-4, torch.float64: 1e-10}
#: log-det tolerance of the float64 copy against float64 autograd (relative, as above)
LOG_DET_RTOL_FLOAT64 = 1e-10
#: allowed ``|∫ p − 1|`` for 1- and 2-D models
INTEGRAL_TOLERANCE = 0.01
#: grid half-width, in units of the standardisation scale, and points per axis
GRID_SIGMAS = 7.0
GRID_POINTS = {1: 20001, 2: 401}
#: how many held-out rows each check uses (the first rows of the held-out part)
ROUND_TRIP_ROWS = 2000
JACOBIAN_ROWS = 16
INTEGRAL_CONTEXTS = 3
_CHUNK = 8192


def _t(a: np.ndarray | Tensor | None, model: DensityModel) -> Tensor | None:
    if a is None:
        return None
    return torch.as_tensor(a).to(device=model.device, dtype=model.dtype)


def _chunks(n: int) -> range:
    return range(0, n, _CHUNK)


def _round_trip(there: Callable[[Tensor, Tensor | None], Tensor], back: Callable[[Tensor, Tensor | None], Tensor],
                rows: Tensor, context: Tensor | None) -> float:
    """``max |back(there(rows)) - rows|``, chunk by chunk."""
    err = 0.0
    with torch.no_grad():
        for i in _chunks(rows.shape[0]):
            ri, ci = rows[i : i + _CHUNK], None if context is None else context[i : i + _CHUNK]
            err = max(err, float((back(there(ri, ci), ci) - ri).abs().max()))
    return err


def round_trip_x(model: DensityModel, x: Tensor, context: Tensor | None = None) -> float:
    r""":math:`\max |f(f^{-1}(x)) - x|`: encode rows to latents, decode them back."""
    return _round_trip(lambda r, c: model.encode(r, c).z, lambda z, c: model.decode(z, c).x, x, context)


def round_trip_z(model: DensityModel, z: Tensor, context: Tensor | None = None) -> float:
    r""":math:`\max |f^{-1}(f(z)) - z|`: decode latents to data, encode them back."""
    return _round_trip(lambda r, c: model.decode(r, c).x, lambda x, c: model.encode(x, c).z, z, context)


def output_rounding_z(model: DensityModel, z: Tensor, context: Tensor | None = None) -> float:
    r""":math:`\max |f^{-1}(\mathrm{rd}(x)) - f^{-1}(x)|`, :math:`x = f(z)`, in float64: what rounding ``x`` to the dtype costs."""
    if model.dtype == torch.float64:
        return 0.0
    model64 = copy.deepcopy(model).to(torch.float64)
    z64 = z.detach().to(torch.float64)
    c64 = None if context is None else context.detach().to(torch.float64)
    err = 0.0
    with torch.no_grad():
        for i in _chunks(z64.shape[0]):
            ci = None if c64 is None else c64[i : i + _CHUNK]
            x = model64.decode(z64[i : i + _CHUNK], ci).x
            rounded = x.to(model.dtype)
            if model.bounded_features:  # as decode does: never rounded onto a bound
                rounded = model.clamp_inside(rounded)
            rounded = rounded.to(torch.float64)
            err = max(err, float((model64.encode(rounded, ci).z - model64.encode(x, ci).z).abs().max()))
    return err


def log_det_errors(model: DensityModel, x: Tensor, context: Tensor | None = None) -> dict[str, float]:
    r"""Compare ``encode(x).log_det`` with :math:`\log|\det J|` from float64 autograd.

    Rows are independent, so the Jacobian of :math:`X \mapsto \sum_b z_b` with respect to the batch
    ``X`` holds every row's :math:`J_b = \partial z_b / \partial x_b` (``D`` backward passes in all).
    Returns the largest absolute error of the model (its own dtype) and of its float64 copy, and the
    largest :math:`|\log|\det J||` (the scale the errors are relative to).
    """
    model64 = copy.deepcopy(model).to(torch.float64)
    x64 = x.detach().to(torch.float64)
    c64 = None if context is None else context.detach().to(torch.float64)
    with torch.enable_grad():
        jac = torch.autograd.functional.jacobian(lambda rows: model64.encode(rows, c64).z.sum(0), x64)
    jac = jac.permute(1, 0, 2)  # (B, D_out, D_in)
    exact = torch.linalg.slogdet(jac).logabsdet
    with torch.no_grad():
        served = model.encode(x, context).log_det.to(torch.float64)
        as64 = model64.encode(x64, c64).log_det
    return {
        "max_abs_error": float((served - exact).abs().max()),
        "float64_max_abs_error": float((as64 - exact).abs().max()),
        "max_abs_log_det": float(exact.abs().max()),
    }


def integral(model: DensityModel, context: Tensor | None = None) -> float:
    r""":math:`\int \exp \log p(x \mid c)\,dx` by the trapezoid rule on the box :math:`\mu \pm 7\sigma`.

    The box is in the flow's standardised coordinates, mapped to data units by
    :meth:`DensityModel.from_standardised` (affine, and the inverse logit for bounded features; the
    grid is then non-uniform in :math:`x`, which the trapezoid rule takes as it is).
    ``context`` is one context row ``(1, C)`` for conditional models. Only for ``D <= 2``.
    """
    d = model.features
    if d > 2:
        raise ValueError("the numerical integral is computed only for 1- and 2-dimensional models")
    points = GRID_POINTS[d]
    model64 = copy.deepcopy(model).to(torch.float64).cpu()  # grid points placed in float64
    u = torch.linspace(-GRID_SIGMAS, GRID_SIGMAS, points, dtype=torch.float64)[:, None].expand(points, d)
    with torch.no_grad():
        grid_axes = model64.from_standardised(u)
    axes = [grid_axes[:, j].contiguous() for j in range(d)]
    grid = torch.cartesian_prod(*axes).reshape(-1, d) if d > 1 else axes[0][:, None]
    dens = torch.empty(grid.shape[0], dtype=torch.float64)
    with torch.no_grad():
        for i in _chunks(grid.shape[0]):
            rows = grid[i : i + _CHUNK].to(device=model.device, dtype=model.dtype)
            ci = None if context is None else context.expand(rows.shape[0], -1)
            dens[i : i + _CHUNK] = model.log_prob(rows, ci).double().exp().cpu()
    dens = torch.nan_to_num(dens, nan=0.0).reshape([points] * d)
    for j in reversed(range(d)):
        dens = torch.trapezoid(dens, axes[j], dim=j)
    return float(dens)


def gaussian_log_prob(
    x_train: np.ndarray,
    x_test: np.ndarray,
    c_train: np.ndarray | None = None,
    c_test: np.ndarray | None = None,
) -> np.ndarray:
    r"""Log-density of ``x_test`` under a Gaussian fitted by maximum likelihood on ``x_train``.

    Unconditional: :math:`N(\bar x, \hat\Sigma)`. Conditional: :math:`N(W^\top [c, 1], \hat\Sigma)`
    with :math:`W` from least squares and :math:`\hat\Sigma` the residual covariance.
    """
    xt = np.asarray(x_train, dtype=np.float64)
    xe = np.asarray(x_test, dtype=np.float64)
    if c_train is None:
        mean_train = mean_test = xt.mean(axis=0)
    else:
        at = np.hstack([np.asarray(c_train, np.float64), np.ones((xt.shape[0], 1))])
        ae = np.hstack([np.asarray(c_test, np.float64), np.ones((xe.shape[0], 1))])
        w = np.linalg.lstsq(at, xt, rcond=None)[0]
        mean_train, mean_test = at @ w, ae @ w
    resid = xt - mean_train
    cov = resid.T @ resid / xt.shape[0]
    # a vanishing ridge only where the MLE covariance is singular
    ridge = 0.0
    while True:
        try:
            chol = np.linalg.cholesky(cov + ridge * np.eye(cov.shape[0]))
            break
        except np.linalg.LinAlgError:
            ridge = max(ridge * 10, 1e-9 * float(np.trace(cov)) / cov.shape[0] or 1e-12)
    sol = np.linalg.solve(chol, (xe - mean_test).T)
    d = xt.shape[1]
    return -0.5 * (sol**2).sum(axis=0) - np.log(np.diag(chol)).sum() - 0.5 * d * math.log(2 * math.pi)


def log_probs(model: DensityModel, x: np.ndarray, context: np.ndarray | None = None) -> np.ndarray:
    """``log p(x | c)`` of rows given as arrays, in float64, computed in the model's dtype."""
    xt, ct = _t(x, model), _t(context, model)
    out = [np.zeros(0)]
    with torch.no_grad():
        for i in _chunks(xt.shape[0]):
            ci = None if ct is None else ct[i : i + _CHUNK]
            out.append(model.log_prob(xt[i : i + _CHUNK], ci).double().cpu().numpy())
    return np.concatenate(out)


def nll_figures(
    model: DensityModel,
    x_train: np.ndarray,
    x_test: np.ndarray,
    c_train: np.ndarray | None = None,
    c_test: np.ndarray | None = None,
) -> dict[str, Any]:
    """Held-out mean NLL (nats per row and per dimension) of the model beside a fitted Gaussian's."""
    d = x_test.shape[1]
    flow = -float(log_probs(model, x_test, c_test).mean())
    gauss = -float(gaussian_log_prob(x_train, x_test, c_train, c_test).mean())
    return {
        "rows": int(x_test.shape[0]),
        "nll": flow,
        "nll_per_dim": flow / d,
        "gaussian_nll": gauss,
        "gaussian_nll_per_dim": gauss / d,
        "better_than_gaussian": bool(flow < gauss),
        "gaussian": "full-covariance Gaussian, maximum likelihood on the training rows"
        + ("" if c_train is None else ", mean linear in the context"),
    }


def _check(value: float, tolerance: float, **extra: Any) -> dict[str, Any]:
    return {"value": value, "tolerance": tolerance, "pass": bool(math.isfinite(value) and value <= tolerance), **extra}


def certify(
    model: DensityModel,
    x_train: np.ndarray,
    x_test: np.ndarray,
    c_train: np.ndarray | None = None,
    c_test: np.ndarray | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Every exactness check on held-out rows (their own context for conditional models).

    Returns ``{"dtype", "checks": {name: {"value", "tolerance", "pass", ...}}, "passed", "nll"}``.
    """
    model = model.eval()
    dtype = model.dtype
    n = min(ROUND_TRIP_ROWS, x_test.shape[0])
    x = _t(x_test[:n], model)
    c = _t(None if c_test is None else c_test[:n], model)
    checks: dict[str, dict[str, Any]] = {}

    rt = ROUND_TRIP_RTOL[dtype]
    scale_x = float(x.abs().max())
    checks["round_trip_x"] = _check(
        round_trip_x(model, x, c), rt * scale_x, rows=n,
        what="max |f(f^-1(x)) - x| over held-out rows; tolerance relative to max |x|",
    )
    z = model.draw_latents(n, seed=seed).to(model.device)
    rho = output_rounding_z(model, z, c)
    checks["round_trip_z"] = _check(
        round_trip_z(model, z, c), rt * float(z.abs().max()) + rho, rows=n, output_rounding=rho,
        what="max |f^-1(f(z)) - z| over base draws; tolerance relative to max |z|, plus the z change "
        "that rounding f(z) to the dtype alone causes (float64 map)",
    )

    k = min(JACOBIAN_ROWS, n)
    ld = log_det_errors(model, x[:k], None if c is None else c[:k])
    ld_scale = max(1.0, ld["max_abs_log_det"])
    served = _check(ld["max_abs_error"], LOG_DET_RTOL[dtype] * ld_scale)
    as64 = _check(ld["float64_max_abs_error"], LOG_DET_RTOL_FLOAT64 * ld_scale)
    checks["log_det_autograd"] = {
        **served, "pass": served["pass"] and as64["pass"], "rows": k,
        "float64_max_abs_error": as64["value"], "float64_tolerance": as64["tolerance"],
        "what": "max |log_det - log|det J||, J by float64 autograd; tolerance relative to max(1, |log|det J||)",
    }

    if model.features <= 2:
        contexts = [None] if c is None else [c[i : i + 1] for i in range(min(INTEGRAL_CONTEXTS, n))]
        values = [integral(model, ci) for ci in contexts]
        worst = max(values, key=lambda v: abs(v - 1.0))
        checks["integral"] = _check(
            abs(worst - 1.0), INTEGRAL_TOLERANCE, integral=worst, contexts=len(values) if c is not None else 0,
            what=f"|∫ exp(log_prob) dx - 1|, trapezoid rule on mu ± {GRID_SIGMAS:g} sigma, "
            f"{GRID_POINTS[model.features]} points per axis",
        )

    return {
        "dtype": str(dtype).removeprefix("torch."),
        "checks": checks,
        "passed": all(ch["pass"] for ch in checks.values()),
        "nll": nll_figures(model, x_train, x_test, c_train, c_test),
    }
