"""One training run, from a data set to a certified artifact in the model repository.

:func:`train_and_save` is what ``flowserve train`` and ``python -m service.training.default_models`` call:
validate the data, dequantize it when asked, split it (train / validation / calibration), fit the
flow (:func:`service.training.fit.fit`), score the calibration rows (the conformal calibration set),
certify exactness (:mod:`service.training.exactness`) and write the next version with
:func:`service.model.artifact.save_artifact`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import numpy as np

from service.model.artifact import check_name, save_artifact
from service.training.data import Dataset, check_bounds, dequantize, split, validate
from service.training.exactness import certify, log_probs
from service.training.fit import TrainConfig, fit

__all__ = ["BOUNDS_NOTE", "DEQUANTIZE_NOTE", "OOD_NOTE", "train_and_save"]

OOD_NOTE = (
    "Flows can give high density to some out-of-distribution data (Nalisnick et al., 2019): "
    "a high log_prob alone does not prove that a point is like the training data."
)
BOUNDS_NOTE = (
    "Bounded features (preprocessing.lower/upper) are modelled on the open interval (lower, upper) through "
    "the logit log(x - lower) - log(upper - x), its Jacobian included: samples lie strictly inside, and a row "
    "with a bounded feature on or outside its bounds has log_prob -inf (density zero) and no latent (null)."
)
DEQUANTIZE_NOTE = (
    "Trained on dequantized data x + u, u ~ U(0,1) per feature: log_prob is the density of x + u; "
    "the probability of an integer row k is the integral of the density over [k, k + 1)."
)


def train_and_save(
    data: Dataset,
    name: str,
    model_dir: Path | str,
    config: TrainConfig,
    *,
    dequantize_data: bool = False,
    alpha: float = 0.01,
    description: str = "",
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    bounds: tuple[np.ndarray, np.ndarray] | None = None,
) -> Path:
    """Train a flow on ``data`` and write it as the next version of ``name``; return its folder.

    The data is checked before anything is trained (:func:`service.training.data.validate` raises
    :class:`service.training.data.DataError`). Seeds: ``config.seed`` drives the dequantization noise, the
    split, the weight initialisation, the batch order and the base draws of the round-trip check.
    ``bounds`` (per-feature ``(lower, upper)``, NaN where unbounded, see
    :func:`service.training.data.parse_bounds`): the rows trained on (after dequantization) must lie
    strictly inside them (:func:`service.training.data.check_bounds`); the manifest records them.
    """
    check_name(name)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    validate(data, dequantizing=dequantize_data)
    if bounds is not None:
        lower, upper = (np.asarray(b, dtype=np.float64).reshape(-1) for b in bounds)
        if lower.shape != (data.x.shape[1],) or upper.shape != lower.shape:
            raise ValueError(f"bounds must give {data.x.shape[1]} lower and upper values")
        bounds = (lower, upper) if (~np.isnan(lower)).any() else None
    if dequantize_data:
        data = dequantize(data, config.seed)
    if bounds is not None:
        check_bounds(data, *bounds, dequantized=dequantize_data)
    parts = split(data.rows, config.seed)
    x, c = data.x, data.context
    x_tr, x_va, x_ca = x[parts.train], x[parts.validation], x[parts.calibration]
    c_tr, c_va, c_ca = (None, None, None) if c is None else (c[parts.train], c[parts.validation], c[parts.calibration])

    result = fit(x_tr, x_va, config, c_tr, c_va, on_epoch=on_epoch, bounds=bounds)
    model = result.model
    calibration = log_probs(model, x_ca, c_ca).tolist()
    exactness = certify(model, x_tr, x_ca, c_tr, c_ca, seed=config.seed)
    d = x.shape[1]
    nll = exactness["nll"]
    training: dict[str, Any] = {
        "rows": int(parts.train.size),
        "split": {
            "train": int(parts.train.size),
            "validation": int(parts.validation.size),
            "calibration": int(parts.calibration.size),
        },
        "epochs": result.epochs,
        "seconds": round(result.seconds, 3),
        "val_nll": result.best_val_nll,
        "val_nll_per_dim": result.best_val_nll / d,
        "test_nll": nll["nll"],
        "test_nll_per_dim": nll["nll_per_dim"],
        "gaussian_test_nll": nll["gaussian_nll"],
        "gaussian_test_nll_per_dim": nll["gaussian_nll_per_dim"],
        "objective": result.objective,
        "robust": bool(result.config.robust) if result.config else False,
        "start": result.config.start if result.config else "standard",
        "seed": config.seed,
        "data_file": data.source,
        "dequantized": dequantize_data,
        "config": dataclasses.asdict(result.config or config),
    }
    notes = [OOD_NOTE] + ([DEQUANTIZE_NOTE] if dequantize_data else []) + ([BOUNDS_NOTE] if bounds is not None else [])
    fields = {
        "name": name,
        "description": description,
        "flow": model.flow_spec,
        "dtype": config.dtype,
        "feature_names": list(data.feature_names),
        "context_names": list(data.context_names),
        "preprocessing": {
            "shift": model.shift.double().tolist(),
            "scale": model.scale.double().tolist(),
            "dequantized": dequantize_data,
            **({} if model.bounds is None else dict(zip(("lower", "upper"), model.bounds))),
            **({} if model.linear_matrix is None else {"linear": model.linear_matrix}),
        },
        "training": training,
        "calibration": calibration,
        "anomaly_alpha": alpha,
        "exactness": exactness,
        "notes": notes,
    }
    return save_artifact(model_dir, fields, model)
