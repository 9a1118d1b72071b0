r"""The operations of the API on validated numpy rows, computed by the device worker.

Every operation is one of the flow's two passes (see :mod:`service.serving.batching`): ``log_prob``,
``inverse`` and ``score`` are the *encode* pass :math:`x \mapsto z = f^{-1}(x)`; ``forward`` and
``sample`` the *decode* pass :math:`z \mapsto x = f(z)`. This module knows nothing of HTTP: the
JSON API, a binary body parser and the Open Inference Protocol all call these functions with arrays
they have already checked (rows ``(B, D)``, context ``(B, C)`` or ``None``, all finite; ``n >= 1``,
``temperature > 0``, a seed in ``[0, 2**64 - 1]``, ``alpha`` in (0, 1)), and encode the numpy
results their own way. Nothing here checks input again: the edge is the one place that does
(:mod:`service.serving.validation`, the HTTP codecs and parameter models); the device worker keeps
the model's shape contract (:mod:`service.model.contract`) only as an invariant, whose violation is
a bug (500, logged).

- ``inverse``: ``latents`` :math:`z`, ``log_det`` :math:`\log|\det \partial z/\partial x|`,
  ``base_log_prob`` :math:`\log p_Z(z)` and ``log_prob`` :math:`= \log p_Z(z) + \log|\det|`.
- ``sample``: :math:`z = T\varepsilon`, :math:`\varepsilon \sim N(0, I)` drawn on the CPU by a
  generator seeded per request (:meth:`DensityModel.draw_latents`), then decoded; the same seed
  gives the same rows whatever else the worker batches them with. Its ``n`` rows are admitted
  first (:meth:`DeviceWorker.reserve`: queue bound, deadline), so a refused request draws nothing.
- ``score``: :math:`s = -\log p(x)` and the conformal p-value
  :math:`(1 + \#\{i : L_i \le \log p(x)\}) / (m + 1)` against the model's held-out calibration
  log-densities :math:`L_1..L_m`; ``is_anomaly`` is :math:`p \le \alpha`.

Results are CPU numpy arrays in the model's dtype (p-values in float64); non-finite values are
returned as they are, for the encoder to represent.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import TYPE_CHECKING, Any

import numpy as np

from service.serving import monitoring
from service.serving.batching import Pass
from service.accel.threads import one_intra_op_thread
from service.serving.errors import NoCalibration
from service.serving.registry import ServedModel
from service.serving.table import EXPLAIN, FORWARD, INVERSE, LOG_PROB, SAMPLE

if TYPE_CHECKING:
    from service.serving.batching import DeviceWorker

__all__ = ["NoCalibration", "explain", "forward", "inverse", "log_prob", "sample", "score"]



async def _encode(worker: DeviceWorker, served: ServedModel, inputs: np.ndarray,
                  context: np.ndarray | None, deadline: float | None) -> dict[str, np.ndarray]:
    return await worker.submit(served.key, served.model, Pass.ENCODE, inputs, context, deadline=deadline)


async def log_prob(worker: DeviceWorker, served: ServedModel, inputs: np.ndarray,
                   context: np.ndarray | None = None, deadline: float | None = None) -> dict[str, np.ndarray]:
    """``{"log_prob": (B,)}``: :math:`\\log p(x)` of each row, in the data's own units."""
    out = LOG_PROB.select(await _encode(worker, served, inputs, context, deadline))
    monitoring.observe(served, out["log_prob"])  # the drift monitor (service/serving/monitoring.py)
    return out


async def inverse(worker: DeviceWorker, served: ServedModel, inputs: np.ndarray,
                  context: np.ndarray | None = None, deadline: float | None = None) -> dict[str, np.ndarray]:
    """``{"latents", "log_det", "base_log_prob", "log_prob"}`` with ``log_prob = base_log_prob + log_det``."""
    return INVERSE.select(await _encode(worker, served, inputs, context, deadline))


async def forward(worker: DeviceWorker, served: ServedModel, latents: np.ndarray,
                  context: np.ndarray | None = None, deadline: float | None = None) -> dict[str, np.ndarray]:
    """``{"outputs": (B, D), "log_prob": (B,)}``: :math:`x = f(z)` and :math:`\\log p(x)`."""
    out = await worker.submit(served.key, served.model, Pass.DECODE, latents, context, deadline=deadline)
    return FORWARD.select(out)


def _draw(served: ServedModel, n: int, seed: int, temperature: float) -> Any:
    with one_intra_op_thread():
        return served.model.draw_latents(n, seed, temperature)


async def sample(worker: DeviceWorker, served: ServedModel, n: int, seed: int | None = None,
                 temperature: float = 1.0, context: np.ndarray | None = None,
                 deadline: float | None = None) -> dict[str, Any]:
    """``{"samples", "log_prob", "latents", "seed"}``: ``n`` rows decoded from seeded latents.

    ``context`` is one row (used for every sample) or ``n`` rows. Without a ``seed`` one is drawn
    from the system's entropy and returned, so any answer can be reproduced. ``log_prob`` is the
    model's own (untempered) log-density of each sample.
    """
    if seed is None:
        seed = secrets.randbits(63)
    if context is not None and context.shape[0] == 1 and n != 1:
        context = np.repeat(context, n, axis=0)
    # admit first: a request refused (queue full, too slow for its deadline) draws nothing
    with worker.reserve(served.key, Pass.DECODE, n, deadline) as reservation:
        # the draw is CPU torch work: off the event loop, on one intra-op thread (service/accel/threads.py)
        z = await asyncio.to_thread(_draw, served, n, seed, temperature)
        latents = z.numpy()
        out = await worker.submit(served.key, served.model, Pass.DECODE, latents, context, deadline=deadline,
                                  reservation=reservation)
    return {**SAMPLE.select({**out, "z": latents}), "seed": seed}


def anomaly_scores(lp: np.ndarray, served: ServedModel, alpha: float | None = None) -> dict[str, Any]:
    """Scores, conformal p-values and flags for log-densities ``lp`` (module docstring)."""
    calibration = served.calibration
    if calibration is None:
        raise NoCalibration(
            f"model {served.name!r} version {served.version} has no calibration set, so it cannot score; "
            "use log_prob instead"
        )
    alpha = served.anomaly_alpha if alpha is None else float(alpha)
    p_value = calibration.p_value(lp)
    return {
        "log_prob": lp,
        "score": -lp,
        "p_value": p_value,
        "is_anomaly": p_value <= alpha,
        "threshold": {"alpha": alpha, "log_prob": calibration.threshold(alpha)},
    }


async def score(worker: DeviceWorker, served: ServedModel, inputs: np.ndarray,
                context: np.ndarray | None = None, alpha: float | None = None,
                deadline: float | None = None) -> dict[str, Any]:
    """``{"log_prob", "score", "p_value", "is_anomaly", "threshold": {"alpha", "log_prob"}}``.

    ``alpha`` defaults to the model's ``anomaly_alpha`` (0.01 unless its manifest says otherwise).
    Refused with :class:`NoCalibration` before any computation when the model has no calibration set.
    """
    if served.calibration is None:
        anomaly_scores(np.empty(0), served, alpha)  # raises NoCalibration
    out = await _encode(worker, served, inputs, context, deadline)
    scored = anomaly_scores(out["log_prob"], served, alpha)
    monitoring.observe(served, scored["log_prob"], scored["is_anomaly"])  # the drift monitor and flag counts
    return scored


def _chain_rule(served: ServedModel, inputs: np.ndarray, context: np.ndarray | None) -> np.ndarray:
    import torch

    model = served.model
    with one_intra_op_thread(), torch.no_grad():
        x = torch.as_tensor(inputs, device=model.device)
        c = None if context is None else torch.as_tensor(context, device=model.device)
        return model.chain_rule_terms(x, c).cpu().numpy()


def occlusion_baseline(served: ServedModel) -> np.ndarray:
    """``(D,)`` the row the standardisation maps to 0 (its mean; the logit's centre for bounded features)."""
    import torch

    model = served.model
    with torch.no_grad():
        zero = torch.zeros(1, served.features, dtype=model.dtype, device=model.device)
        return model.from_standardised(zero)[0].cpu().numpy()


async def explain(worker: DeviceWorker, served: ServedModel, inputs: np.ndarray,
                  context: np.ndarray | None = None, deadline: float | None = None) -> dict[str, Any]:
    """``{"contributions": (B, D), "log_prob", "method", "exact", "feature_names"}``: per-feature terms.

    - ``chain-rule`` (exact) where :attr:`DensityModel.chain_rule_exact` (``dz/dx`` lower-triangular by
      construction): contribution :math:`i` is :math:`\\log p(x_i \\mid x_{<i})` and the row sums to
      ``log_prob``. ``log_prob`` comes from the worker's encode pass; the terms from
      :meth:`DensityModel.chain_rule_terms`, off the event loop.
    - ``occlusion`` (approximate) otherwise: :math:`\\log p(x) - \\log p(x_{i \\leftarrow b_i})` with
      :math:`b` the standardisation's centre (:func:`occlusion_baseline`), all ``B (D + 1)`` rows in one
      encode pass of the worker. The sum need not equal ``log_prob``.
    """
    out = await _encode(worker, served, inputs, context, deadline)
    lp = out["log_prob"]
    if served.model.chain_rule_exact:
        contributions = (await asyncio.to_thread(_chain_rule, served, inputs, context)).astype(lp.dtype)
        method, exact = "chain-rule", True
    else:
        b, d = inputs.shape
        occluded = np.repeat(inputs[:, None, :], d, axis=1)  # (B, D, D): row i of block r has feature i replaced
        idx = np.arange(d)
        occluded[:, idx, idx] = occlusion_baseline(served).astype(inputs.dtype)
        ctx = None if context is None else np.repeat(context, d, axis=0)
        occ = await worker.submit(served.key, served.model, Pass.ENCODE, occluded.reshape(b * d, d), ctx,
                                  deadline=deadline)
        contributions = lp[:, None] - occ["log_prob"].reshape(b, d)
        method, exact = "occlusion", False
    return {**EXPLAIN.select({"contributions": contributions, "log_prob": lp}), "method": method,
            "exact": exact, "feature_names": list(served.feature_names)}
