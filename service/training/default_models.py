"""The three default models committed under ``models/``, trained reproducibly (fixed seeds).

``python -m service.training.default_models --model-dir models`` (``make models``) trains

- ``moons``: 2-D, scikit-learn's ``make_moons`` (3,000 rows, noise 0.08);
- ``digits``: 64-D, scikit-learn's ``load_digits`` (8×8 images, pixel values 0..16), dequantized and
  bounded to the open interval (0, 17) (the logit preprocessing of :mod:`service.model.density`);
- ``digits-cond``: the same pixels conditioned on the one-hot digit label (``label_0 .. label_9``),
  so that sampling with a context row draws images of the chosen digit.

Each model is written as the next version under ``--model-dir``; the committed ones are version 1.
Training uses one CPU thread (``--threads``) and takes a few minutes in all.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from service.training.data import Dataset
from service.training.run import train_and_save
from service.training.fit import TrainConfig

__all__ = ["DEFAULT_MODELS", "DefaultModel", "main", "train_default"]


def moons_data() -> Dataset:
    """3,000 points of two interleaving half circles with Gaussian noise 0.08 (seed 0)."""
    from sklearn.datasets import make_moons

    x, _ = make_moons(n_samples=3000, noise=0.08, random_state=0)
    return Dataset(x.astype(np.float64), None, ["x", "y"], [], "sklearn.datasets.make_moons")


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return x.astype(np.float64), y.astype(np.int64)


def _pixel_names() -> list[str]:
    return [f"pixel_{r}_{c}" for r in range(8) for c in range(8)]


def digits_data() -> Dataset:
    """The 1,797 8×8 digit images of ``load_digits``, 64 integer pixel features (0..16)."""
    x, _ = _digits()
    return Dataset(x, None, _pixel_names(), [], "sklearn.datasets.load_digits")


def digits_cond_data() -> Dataset:
    """``digits_data`` with the label as a one-hot context row ``label_0 .. label_9``."""
    x, y = _digits()
    return Dataset(x, np.eye(10)[y], _pixel_names(), [f"label_{k}" for k in range(10)], "sklearn.datasets.load_digits")


@dataclass(frozen=True)
class DefaultModel:
    """A default model: its data, its training configuration and its card text."""

    name: str
    data: Callable[[], Dataset]
    config: TrainConfig
    dequantize: bool = False
    description: str = ""
    alpha: float = 0.01
    bounds: tuple[float, float] | None = None  # (LOW, HIGH) for every feature, as ``--bounds LOW:HIGH``


_DIGITS_CONFIG = dict(flow="nsf", transforms=4, hidden_features=[32, 32], bins=8, epochs=300,
                      max_minutes=5.0, batch_size=128, lr=1e-3, patience=30, seed=0,
                      robust=False)  # clean data: plain maximum likelihood, as these models were trained

#: dequantized pixels x + u, x in 0..16, u ~ U(0, 1), lie in [0, 17): the open interval (0, 17)
DIGITS_BOUNDS = (0.0, 17.0)

DEFAULT_MODELS: dict[str, DefaultModel] = {
    "moons": DefaultModel(
        "moons", moons_data,
        TrainConfig(flow="nsf", transforms=4, hidden_features=[64, 64], bins=8, epochs=150,
                    max_minutes=5.0, batch_size=256, lr=1e-3, patience=30, seed=0, robust=False),
        description="Two interleaving half circles (sklearn make_moons, 3,000 rows, noise 0.08).",
    ),
    "digits": DefaultModel(
        "digits", digits_data, TrainConfig(**_DIGITS_CONFIG), dequantize=True, bounds=DIGITS_BOUNDS,
        description="8x8 handwritten digit images (sklearn load_digits), 64 dequantized pixels, bounded to (0, 17).",
    ),
    "digits-cond": DefaultModel(
        "digits-cond", digits_cond_data, TrainConfig(**_DIGITS_CONFIG), dequantize=True, bounds=DIGITS_BOUNDS,
        description="8x8 digit images conditioned on the one-hot digit label: sample with a context "
        "row label_0..label_9 to draw the chosen digit.",
    ),
}


def train_default(name: str, model_dir: Path | str, progress: bool = True) -> Path:
    """Train default model ``name`` and write its next version under ``model_dir``."""
    spec = DEFAULT_MODELS[name]
    data = spec.data()
    bounds = None
    if spec.bounds is not None:
        d = data.x.shape[1]
        bounds = (np.full(d, spec.bounds[0]), np.full(d, spec.bounds[1]))

    def report(row: dict[str, float]) -> None:
        if progress and (row["epoch"] % 25 == 0 or row["epoch"] == 1):
            print(f"  {name}: epoch {int(row['epoch'])} val_nll {row['val_nll']:.4f}", file=sys.stderr, flush=True)

    return train_and_save(
        data, name, model_dir, spec.config,
        dequantize_data=spec.dequantize, alpha=spec.alpha, description=spec.description, on_epoch=report,
        bounds=bounds,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service.training.default_models",
        description="Train the default models (moons, digits, digits-cond) reproducibly into a model repository.",
    )
    parser.add_argument("--model-dir", default="models", help="model repository folder (default: models)")
    parser.add_argument("--only", nargs="+", choices=sorted(DEFAULT_MODELS), help="train only these models")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: as fast for these small models, and reproducible)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    failed = False
    for name in args.only or list(DEFAULT_MODELS):
        start = time.monotonic()
        path = train_default(name, args.model_dir)
        manifest = json.loads((path / "model.json").read_text())
        ex, tr = manifest["exactness"], manifest["training"]
        size = sum(p.stat().st_size for p in path.iterdir())
        print(
            f"{name}: {path}  {time.monotonic() - start:.1f}s  epochs {tr['epochs']}  "
            f"test NLL/dim {tr['test_nll_per_dim']:.4f} (Gaussian {tr['gaussian_test_nll_per_dim']:.4f})  "
            f"exactness {'pass' if ex['passed'] else 'FAIL'}  {size / 1e6:.2f} MB",
            flush=True,
        )
        failed |= not ex["passed"] or not ex["nll"]["better_than_gaussian"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
