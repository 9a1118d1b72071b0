"""Models the harness makes itself: an 8-feature NSF (coupling) and, for smoke runs, a tiny one.

Both are fitted for a few seconds on synthetic data with :func:`service.training.fit.fit` and written
with :func:`service.model.artifact.save_artifact`, so the server loads them exactly like any other model
(manifest, safetensors, calibration). Their speed, not their quality, is what the harness measures.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.model.artifact import save_artifact
from service.training.fit import TrainConfig, fit

__all__ = ["make_nsf8", "make_tiny", "synthetic_rows"]


def synthetic_rows(n: int, features: int, seed: int = 0) -> np.ndarray:
    """``n`` rows of a correlated two-component Gaussian mixture in ``features`` dimensions."""
    rng = np.random.default_rng(seed)
    mix = rng.integers(0, 2, size=n)
    centres = np.stack([np.full(features, -1.5), np.full(features, 1.5)])
    a = rng.normal(size=(features, features)) / np.sqrt(features)
    return (centres[mix] + rng.normal(size=(n, features)) @ a.T + 0.3 * rng.normal(size=(n, features))).astype(np.float32)


def _make(root: Path, name: str, features: int, config: TrainConfig, rows: int) -> Path:
    x = synthetic_rows(rows, features, seed=1)
    cut = int(0.8 * rows)
    result = fit(x[:cut], x[cut:], config)
    import torch

    with torch.inference_mode():
        calibration = result.model.log_prob(torch.as_tensor(x[cut:])).double().numpy()
    fields = {
        "name": name,
        "description": f"{features}-feature {config.flow} made by the benchmark harness on synthetic data",
        "flow": result.model.flow_spec,
        "dtype": config.dtype,
        "feature_names": [f"x{i}" for i in range(features)],
        "preprocessing": {
            "shift": result.model.shift.tolist(),
            "scale": result.model.scale.tolist(),
        },
        "training": {"rows": cut, "epochs": result.epochs, "seconds": result.seconds, "val_nll": result.best_val_nll},
        "calibration": sorted(float(v) for v in calibration),
    }
    return save_artifact(root, fields, result.model)


def make_nsf8(root: Path | str, name: str = "nsf8") -> Path:
    """An 8-feature NSF coupling flow (zuko defaults of ``nsf``: 4 transforms, 8 bins, 64x64)."""
    config = TrainConfig(flow="nsf", epochs=3, batch_size=256, patience=3, seed=0)
    return _make(Path(root), name, 8, config, rows=4000)


def make_tiny(root: Path | str, name: str = "tiny") -> Path:
    """A 2-feature NSF with one small transform, trained one epoch: for smoke runs of the harness."""
    config = TrainConfig(flow="nsf", transforms=1, hidden_features=[16], bins=4, epochs=1, seed=0)
    return _make(Path(root), name, 2, config, rows=1000)
