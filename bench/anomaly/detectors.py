"""The detectors compared: flowserve (as ``flowserve train`` fits it, in process) and five PyOD ones.

Every detector is a function ``(x_fit, x_test, seed) -> scores``: it is fitted on ``x_fit`` (normal rows
with the unlabelled anomalies inside) and returns one score per test row, higher = more anomalous.

- ``flowserve``: :func:`service.training.run.train_and_save`, the function ``flowserve train`` calls,
  with the CLI's defaults (``TrainConfig()`` with only the seed set: the objective, flow size and batch
  size are chosen from the data), into a temporary model repository; the written artifact is loaded
  back (:func:`service.model.artifact.load_artifact`) and the score is :math:`-\\log p(x)`, the quantity
  behind the service's anomaly scores. Its own 70/15/15 split of the fit rows applies, as in the CLI.
- ``flowserve-nll``: the same with ``robust=False`` and the per-flow defaults (the previous behaviour,
  for reference; only with ``--with-plain``).
- PyOD (defaults unless stated): ``IForest`` (100 trees, seeded), ``LOF`` (20 neighbours), ``ECOD``,
  ``KDE`` (Gaussian kernel, bandwidth 1.0 on the standardised rows), ``GMM`` (one full-covariance
  component, seeded).

Every detector sees rows standardised with the fit rows' mean and standard deviation (the flow does
this itself as well; for KDE's fixed bandwidth and LOF's distances it matters).
"""

from __future__ import annotations

import tempfile
from typing import Callable

import numpy as np
import torch

__all__ = ["DETECTORS", "PYOD", "flowserve_scores"]

Detector = Callable[[np.ndarray, np.ndarray, int], np.ndarray]


def flowserve_scores(x_fit: np.ndarray, x_test: np.ndarray, seed: int, robust: bool | None = None,
                     default_size: bool = False, epochs: int | None = None) -> np.ndarray:
    """``-log p(x_test)`` under a flow written by ``train_and_save`` with the CLI's defaults."""
    from service.model.artifact import load_artifact
    from service.training.data import Dataset
    from service.training.fit import TrainConfig
    from service.training.run import train_and_save

    names = [f"x{i}" for i in range(x_fit.shape[1])]
    config = TrainConfig(seed=seed, robust=robust)
    if epochs is not None:
        config.epochs = epochs
    if default_size:  # the per-flow architecture defaults and batches of 256 (the previous defaults)
        config.batch_size = 256
        config.transforms, config.hidden_features = 4, [64, 64]
    with tempfile.TemporaryDirectory(prefix="anomaly-bench-") as root:
        folder = train_and_save(Dataset(x_fit, None, names, [], "anomaly-bench"), "bench", root, config)
        model = load_artifact(folder).model
        with torch.inference_mode():
            log_p = model.log_prob(torch.as_tensor(x_test, dtype=model.dtype)).double().numpy()
    return -log_p


def _pyod(make: Callable[[int], object]) -> Detector:
    def scores(x_fit: np.ndarray, x_test: np.ndarray, seed: int) -> np.ndarray:
        det = make(seed)
        det.fit(x_fit)  # type: ignore[attr-defined]
        return np.asarray(det.decision_function(x_test), dtype=np.float64)  # type: ignore[attr-defined]

    return scores


def _iforest(seed: int) -> object:
    from pyod.models.iforest import IForest

    return IForest(random_state=seed, n_jobs=1)


def _lof(seed: int) -> object:
    from pyod.models.lof import LOF

    return LOF(n_jobs=1)


def _ecod(seed: int) -> object:
    from pyod.models.ecod import ECOD

    return ECOD(n_jobs=1)


def _kde(seed: int) -> object:
    from pyod.models.kde import KDE

    return KDE()


def _gmm(seed: int) -> object:
    from pyod.models.gmm import GMM

    return GMM(random_state=seed)


PYOD: dict[str, Detector] = {
    "IForest": _pyod(_iforest),
    "LOF": _pyod(_lof),
    "ECOD": _pyod(_ecod),
    "KDE": _pyod(_kde),
    "GMM": _pyod(_gmm),
}

DETECTORS: dict[str, Detector] = {"flowserve": flowserve_scores, **PYOD}
