r"""Fitting a density model by maximum likelihood, with early stopping on validation NLL.

The loss is the mean negative log-likelihood :math:`-\frac{1}{B}\sum_i \log p(x_i)` in the data's
own units (standardisation Jacobian included), so the validation NLL is directly comparable to
any other density model's on the same rows.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from service.model.density import DensityModel
from service.model.flows import flow_spec

__all__ = ["TrainConfig", "TrainResult", "fit", "standardisation"]


@dataclass
class TrainConfig:
    """How to fit: architecture, its options, and the optimisation budget."""

    flow: str = "nsf"
    transforms: int | None = None
    hidden_features: list[int] | None = None
    bins: int | None = None
    epochs: int = 200
    max_minutes: float = 10.0
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 20
    seed: int = 0
    dtype: str = "float32"


@dataclass
class TrainResult:
    """The fitted model (best validation NLL) and the history of the run."""

    model: DensityModel
    epochs: int
    seconds: float
    best_val_nll: float
    history: list[dict[str, float]] = field(default_factory=list)


def standardisation(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and standard deviation of the training rows (the folded-in preprocessing)."""
    shift = x.mean(axis=0)
    scale = x.std(axis=0)
    if np.any(scale <= 0) or not np.all(np.isfinite(scale)):
        raise ValueError("every feature needs a positive, finite standard deviation")
    return shift, scale


def mean_nll(model: DensityModel, x: torch.Tensor, c: torch.Tensor | None, batch: int = 4096) -> float:
    """Mean negative log-likelihood of rows ``x`` (given context rows ``c``)."""
    total = 0.0
    with torch.inference_mode():
        for i in range(0, x.shape[0], batch):
            ci = None if c is None else c[i : i + batch]
            total += -float(model.log_prob(x[i : i + batch], ci).double().sum())
    return total / max(1, x.shape[0])


def fit(
    x_train: np.ndarray,
    x_val: np.ndarray,
    config: TrainConfig,
    c_train: np.ndarray | None = None,
    c_val: np.ndarray | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train a :class:`DensityModel` with Adam; keep the weights of the best validation epoch.

    Stops after ``config.epochs`` epochs, ``config.patience`` epochs without improvement, or
    ``config.max_minutes`` of wall time, whichever comes first.
    """
    torch.manual_seed(config.seed)
    dtype = {"float32": torch.float32, "float64": torch.float64}[config.dtype]
    shift, scale = standardisation(x_train)
    context = 0 if c_train is None else c_train.shape[1]
    options: dict[str, Any] = {"transforms": config.transforms, "hidden_features": config.hidden_features}
    if config.flow.startswith("nsf"):
        options["bins"] = config.bins
    spec = flow_spec(config.flow, x_train.shape[1], context, **options)
    model = DensityModel(spec, torch.as_tensor(shift), torch.as_tensor(scale), dtype=dtype)

    xt = torch.as_tensor(x_train, dtype=dtype)
    xv = torch.as_tensor(x_val, dtype=dtype)
    ct = None if c_train is None else torch.as_tensor(c_train, dtype=dtype)
    cv = None if c_val is None else torch.as_tensor(c_val, dtype=dtype)

    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    best, best_state, stale, history = math.inf, copy.deepcopy(model.state_dict()), 0, []
    start = time.monotonic()
    epoch = 0
    for epoch in range(1, config.epochs + 1):
        model.train()
        perm = torch.randperm(xt.shape[0], generator=gen)
        train_loss, seen = 0.0, 0
        for i in range(0, xt.shape[0], config.batch_size):
            idx = perm[i : i + config.batch_size]
            loss = -model.log_prob(xt[idx], None if ct is None else ct[idx]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            train_loss += float(loss.detach()) * idx.numel()
            seen += idx.numel()
        model.eval()
        val = mean_nll(model, xv, cv)
        row = {"epoch": epoch, "train_nll": train_loss / seen, "val_nll": val}
        history.append(row)
        if on_epoch is not None:
            on_epoch(row)
        if val < best - 1e-6:
            best, best_state, stale = val, copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
        if stale >= config.patience or time.monotonic() - start > config.max_minutes * 60:
            break
    model.load_state_dict(best_state)
    model.eval().requires_grad_(False)
    return TrainResult(model, epoch, time.monotonic() - start, best, history)
