r"""Fitting a density model by maximum likelihood, with early stopping on validation NLL.

The loss is the mean negative log-likelihood :math:`-\frac{1}{B}\sum_i \log p(x_i)` in the data's
own units (standardisation Jacobian included), so the validation NLL is directly comparable to
any other density model's on the same rows.

**Robust (trimmed) likelihood.** Data scored for anomalies usually holds some anomalies among the
training rows, unlabelled. Maximum likelihood rewards fitting them, so the better the fit, the less
they stand out. With ``robust`` the objective is the *trimmed* NLL: in each batch the per-row
log-likelihoods are sorted and only the largest :math:`\lceil(1 - t)B\rceil` are averaged,

.. math:: L_t = -\frac{1}{k}\sum_{i=1}^{k} \log p(x_{(i)}),\quad
          \log p(x_{(1)}) \ge \dots \ge \log p(x_{(B)}),\ k = B - \lfloor tB \rfloor,

so the gradient ignores the least likely fraction :math:`t` (default 0.1) of each batch, rounded
down (:math:`\lfloor tB \rfloor` rows: one of 13, two of 29); the validation NLL used for early
stopping is trimmed the same way. An epoch is cut into :math:`\lceil n/B \rceil` batches of equal size
(:func:`epoch_batches`), so that every batch is trimmed alike. No labels are needed.

**Defaults scaled to the data** (:func:`resolve`). Fields left ``None`` are chosen from the number of
training rows :math:`n`. Below :data:`SMALL_DATA_ROWS` (2,000) training rows the fit is in the
*small-data regime*: robust on, a small flow unless the architecture is given (one transform
with 16x16 hidden units when there are fewer than :data:`ROWS_PER_FEATURE` (50) rows per feature,
three transforms with 32x32 when there are more, as for a curved 2-D set of a few hundred rows),
and batches of :math:`\mathrm{clip}(\lfloor n/16 \rfloor, 16, 256)` rows (:data:`STEPS_PER_EPOCH`), so that an
epoch has about 16 Adam steps (with :math:`n/4`, a 200-epoch budget was at most 800 steps and the
patience of 20 epochs 80 steps: on 490 rows of ``moons`` the noisy trimmed validation NLL still
reached new lows at epochs 80-140), and a *robust Gaussian start* (``start="mcd"``, when there are at least
:math:`2D` rows and no context): the preprocessing is the minimum-covariance-determinant Gaussian of the training
rows (:mod:`service.training.robust_start`: ``shift`` its location, ``scale`` its per-feature
spread, ``linear`` the inverse Cholesky factor of its correlation) and each transform's output
layer starts at zero, which makes every zuko transform the identity, so the model *is* that robust
Gaussian before the first step and the trimmed likelihood refines it from there. With a few dozen
rows the flow's random start otherwise decides much of the result (on ``wine`` the seed spread of
the AUROC was 0.64-0.97). ``start="standard"`` is the per-feature mean and standard deviation and
zuko's random initialisation (what large data gets). The per-flow defaults hold ~100k parameters; on a few hundred rows such a
flow stays close to its random initialisation or fits the anomalies among the rows. At or above
2,000 rows the fit is plain maximum likelihood with the per-flow defaults and batches of 256, as
before: trimming costs density accuracy when the data is clean and plentiful (it cuts the tails
of the fitted density), which is measured by ``python -m bench.anomaly --known-density``.

Training runs on ``threads`` torch intra-op threads (default 1, restored afterwards): with small
batches, more threads only add synchronisation, and on a busy machine a second thread waiting for a
core made training 2-4x slower.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from service.model.density import DensityModel
from service.model.flows import flow_spec
from service.accel.threads import torch_threads
from service.training.data import unbound_rows
from service.training.robust_start import gaussian_start

__all__ = [
    "SMALL_DATA_ROWS",
    "STARTS",
    "MEDIUM_FLOW",
    "ROWS_PER_FEATURE",
    "STEPS_PER_EPOCH",
    "SMALL_FLOW",
    "TrainConfig",
    "TrainResult",
    "epoch_batches",
    "fit",
    "objective_name",
    "resolve",
    "standardisation",
    "trimmed_nll",
    "zero_output_layers",
]

#: training rows below which the fit is in the small-data regime (robust, small flow, small batches)
SMALL_DATA_ROWS = 2000
#: the flow of the small-data regime when no architecture size is given (fewer than
#: ROWS_PER_FEATURE rows per feature), and the one when there are more rows per feature
SMALL_FLOW: dict[str, Any] = {"transforms": 1, "hidden_features": [16, 16]}
MEDIUM_FLOW: dict[str, Any] = {"transforms": 3, "hidden_features": [32, 32]}
ROWS_PER_FEATURE = 50
#: the Adam steps an epoch has in the small-data regime (batches of rows / STEPS_PER_EPOCH, 16..256)
STEPS_PER_EPOCH = 16
#: the starts :func:`fit` knows: the robust (MCD) Gaussian with identity flow, or standardisation + zuko's init
STARTS = ("mcd", "standard")


@dataclass
class TrainConfig:
    """How to fit: architecture, its options, the objective and the optimisation budget.

    ``None`` in ``transforms``, ``hidden_features``, ``batch_size`` and ``robust`` means "chosen
    from the data" (:func:`resolve`); ``trim`` is the fraction of each batch the robust objective drops;
    ``threads`` the torch intra-op threads used while training (``None``: leave torch's setting);
    ``start`` one of :data:`STARTS` (``None``: ``"mcd"`` when robust with at least ``2 D`` rows).
    """

    flow: str = "nsf"
    transforms: int | None = None
    hidden_features: list[int] | None = None
    bins: int | None = None
    epochs: int = 200
    max_minutes: float = 10.0
    batch_size: int | None = None
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 20
    seed: int = 0
    dtype: str = "float32"
    robust: bool | None = None
    trim: float = 0.1
    threads: int | None = 1
    start: str | None = None


@dataclass
class TrainResult:
    """The fitted model (best validation objective) and the history of the run.

    ``config`` is the resolved configuration (no ``None`` left but the per-flow architecture
    defaults); ``best_val_nll`` is the validation value of ``objective`` (trimmed when robust).
    """

    model: DensityModel
    epochs: int
    seconds: float
    best_val_nll: float
    history: list[dict[str, float]] = field(default_factory=list)
    config: TrainConfig | None = None
    objective: str = "nll"


def standardisation(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and standard deviation of the training rows (the folded-in preprocessing)."""
    shift = x.mean(axis=0)
    scale = x.std(axis=0)
    if np.any(scale <= 0) or not np.all(np.isfinite(scale)):
        raise ValueError("every feature needs a positive, finite standard deviation")
    return shift, scale


def resolve(config: TrainConfig, rows: int, features: int, *, conditional: bool = False) -> TrainConfig:
    """``config`` with the data-dependent choices made for ``rows`` training rows of ``features``
    features (see the module doc); ``conditional``: the model takes context rows.

    A conditional model gets the standard start unless ``start`` is given: the robust Gaussian of
    the pooled rows ignores the context, which is what a conditional model uses to place its modes
    (on three blobs told apart by a one-hot context, the MCD keeps about half the rows, so one or
    two blobs start far in its tails, and 6 epochs ended at a 5 % calibration log-density of
    -14.3 against -4.2 from the standard start)."""
    small = rows < SMALL_DATA_ROWS
    robust = small if config.robust is None else config.robust
    if config.batch_size is None:
        batch = min(256, max(16, rows // STEPS_PER_EPOCH)) if small else 256
    else:
        batch = config.batch_size
    transforms, hidden = config.transforms, config.hidden_features
    if small and transforms is None and hidden is None:
        size = SMALL_FLOW if rows < ROWS_PER_FEATURE * features else MEDIUM_FLOW
        transforms, hidden = size["transforms"], list(size["hidden_features"])
    if not 0.0 <= config.trim < 0.5:
        raise ValueError(f"trim must lie in [0, 0.5), got {config.trim}")
    if config.start is not None and config.start not in STARTS:
        raise ValueError(f"start must be one of {list(STARTS)}, got {config.start!r}")
    start = config.start or ("mcd" if robust and rows >= 2 * features and not conditional else "standard")
    return dataclasses.replace(config, robust=robust, batch_size=batch, transforms=transforms, hidden_features=hidden,
                               start=start)


def objective_name(config: TrainConfig) -> str:
    """The objective as the model card names it: ``"nll"`` or ``"trimmed-nll(0.1)"``."""
    return f"trimmed-nll({config.trim:g})" if config.robust and config.trim > 0 else "nll"


def trimmed_nll(log_p: torch.Tensor, trim: float) -> torch.Tensor:
    r"""Mean of :math:`-\log p` over the rows left after dropping the ``floor(trim·B)`` least likely."""
    drop = int(math.floor(trim * log_p.shape[0]))
    if drop == 0:
        return -log_p.mean()
    return -torch.topk(log_p, log_p.shape[0] - drop, sorted=False).values.mean()


def epoch_batches(perm: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, ...]:
    r"""One epoch's row order ``perm`` cut into :math:`k = \lceil n / B \rceil` batches of equal size (within one row).

    Not :math:`k - 1` batches of :math:`B` and a remainder: the trimmed objective drops
    :math:`\lfloor tB \rfloor` rows of each batch, so a remainder of a few rows was not trimmed at all
    (52 training rows in batches of 16 left a batch of 4, :math:`\lfloor 0.4 \rfloor = 0`), and an
    anomaly that fell into it was fitted with full weight once an epoch, by a step as large as the others.
    Equal batches are trimmed alike (52 rows: four batches of 13, one row dropped from each).
    """
    return torch.tensor_split(perm, -(-perm.numel() // batch_size)) if perm.numel() else ()


def zero_output_layers(model: DensityModel) -> None:
    r"""Set the last linear layer of each transform's conditioner to zero: every zuko transform is then the identity.

    A zero conditioner output gives a spline of equal bins and unit knot derivatives (``nsf``,
    ``nsf-ar``), a zero shift and unit scale (``maf``, ``realnvp``), a zero shift (``nice``); the
    hidden layers keep their random weights, so gradients reach them after the first step.
    """
    transforms = list(getattr(model.flow.transform, "transforms", [model.flow.transform]))
    for t in transforms:
        hyper = getattr(t, "hyper", None)
        if hyper is None:
            continue
        last = [m for m in hyper.modules() if isinstance(getattr(m, "weight", None), torch.Tensor)][-1]
        with torch.no_grad():
            last.weight.zero_()
            if last.bias is not None:
                last.bias.zero_()


def mean_nll(
    model: DensityModel, x: torch.Tensor, c: torch.Tensor | None, batch: int = 4096, trim: float = 0.0
) -> float:
    """Mean negative log-likelihood of rows ``x`` (given context rows ``c``), trimmed by ``trim``."""
    parts = []
    with torch.inference_mode():
        for i in range(0, x.shape[0], batch):
            ci = None if c is None else c[i : i + batch]
            parts.append(model.log_prob(x[i : i + batch], ci).double())
    if not parts:
        return 0.0
    return float(trimmed_nll(torch.cat(parts), trim))


def fit(
    x_train: np.ndarray,
    x_val: np.ndarray,
    config: TrainConfig,
    c_train: np.ndarray | None = None,
    c_val: np.ndarray | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    bounds: tuple[np.ndarray, np.ndarray] | None = None,
) -> TrainResult:
    """Train a :class:`DensityModel` with Adam; keep the weights of the best validation epoch.

    ``bounds``: per-feature ``(lower, upper)``, NaN where unbounded; bounded features are mapped by
    the logit of :mod:`service.model.density` and standardised after it (rows must lie inside).

    Stops after ``config.epochs`` epochs, ``config.patience`` epochs without improvement, or
    ``config.max_minutes`` of wall time, whichever comes first. ``config`` is first resolved for
    the number of training rows (:func:`resolve`); with ``robust`` both the batch loss and the
    validation criterion are the trimmed NLL (:func:`trimmed_nll`).
    """
    config = resolve(config, x_train.shape[0], x_train.shape[1], conditional=c_train is not None)
    with torch_threads(config.threads):
        return _fit(x_train, x_val, config, c_train, c_val, on_epoch, bounds)


def _fit(
    x_train: np.ndarray,
    x_val: np.ndarray,
    config: TrainConfig,
    c_train: np.ndarray | None,
    c_val: np.ndarray | None,
    on_epoch: Callable[[dict[str, float]], None] | None,
    bounds: tuple[np.ndarray, np.ndarray] | None = None,
) -> TrainResult:
    assert config.batch_size is not None
    trim = config.trim if config.robust else 0.0
    torch.manual_seed(config.seed)
    dtype = {"float32": torch.float32, "float64": torch.float64}[config.dtype]
    rows = x_train if bounds is None else unbound_rows(x_train, *bounds)
    linear = None
    if config.start == "mcd":
        try:
            shift, scale, linear = gaussian_start(rows, config.seed)
        except (ValueError, np.linalg.LinAlgError):  # no nonsingular half of the rows: the plain start
            config = dataclasses.replace(config, start="standard")
    if config.start != "mcd":
        shift, scale = standardisation(rows)
    context = 0 if c_train is None else c_train.shape[1]
    options: dict[str, Any] = {"transforms": config.transforms, "hidden_features": config.hidden_features}
    if config.flow.startswith("nsf"):
        options["bins"] = config.bins
    spec = flow_spec(config.flow, x_train.shape[1], context, **options)
    lower, upper = (None, None) if bounds is None else (torch.as_tensor(bounds[0]), torch.as_tensor(bounds[1]))
    model = DensityModel(spec, torch.as_tensor(shift), torch.as_tensor(scale), dtype=dtype, lower=lower, upper=upper,
                         linear=None if linear is None else torch.as_tensor(linear))
    if config.start == "mcd":
        zero_output_layers(model)

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
        for idx in epoch_batches(perm, config.batch_size):
            loss = trimmed_nll(model.log_prob(xt[idx], None if ct is None else ct[idx]), trim)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            train_loss += float(loss.detach()) * idx.numel()
            seen += idx.numel()
        model.eval()
        val = mean_nll(model, xv, cv, trim=trim)
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
    return TrainResult(model, epoch, time.monotonic() - start, best, history, config, objective_name(config))
