"""Small tabular anomaly-detection sets that build offline (scikit-learn's bundled data and generators).

Each set is rows ``x`` ``(N, D)`` and labels ``y`` (1 = anomaly), with about 5 % anomalies. The real
sets follow the usual construction of ADBench-style benchmarks from classification data: one class
(or a few) is the normal data, and another class, subsampled to about 5 % of the rows, is the
anomalies. A set is fixed once built (its own seed, not the run's), so every run sees the same rows.

| name           | source                            | normal                    | anomalies                    |
|----------------|-----------------------------------|---------------------------|------------------------------|
| breast-cancer  | ``load_breast_cancer`` (30 feat.) | 357 benign                | 19 malignant (5 %)           |
| wine           | ``load_wine`` (13 feat.)          | classes 1, 2 (119)        | 6 of class 0 (5 %)           |
| digits         | ``load_digits`` (64 pixels)       | digits 1-9 (1,619)        | 85 zeros (5 %), dequantized  |
| iris           | ``load_iris`` (4 feat.)           | versicolor, virginica     | 5 setosa (5 %)               |
| moons          | ``make_moons`` (2-D, noise 0.06)  | 950 on two half circles   | 50 uniform in the box        |
| swiss-roll     | ``make_swiss_roll`` (3-D)         | 950 on the rolled sheet   | 50 uniform in the box        |

``digits`` has integer pixels, several of them constant in most rows; the set adds ``U(0, 1)``
noise to every pixel once (dequantization, drawn from the set's seed) so that it has a density; every
detector sees the same dequantized rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

__all__ = ["AnomalySet", "SETS", "build"]

CONTAMINATION = 0.05


@dataclass(frozen=True)
class AnomalySet:
    """Rows, labels (1 = anomaly) and a one-line description."""

    name: str
    x: np.ndarray
    y: np.ndarray
    description: str


def _one_class_out(x: np.ndarray, labels: np.ndarray, anomaly_classes: list[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Normal rows = the other classes; anomalies = ``anomaly_classes`` subsampled to 5 % of the result."""
    rng = np.random.default_rng(seed)
    normal = np.flatnonzero(~np.isin(labels, anomaly_classes))
    pool = np.flatnonzero(np.isin(labels, anomaly_classes))
    count = max(2, round(CONTAMINATION / (1 - CONTAMINATION) * normal.size))
    chosen = rng.choice(pool, size=min(count, pool.size), replace=False)
    idx = np.concatenate([normal, chosen])
    y = np.concatenate([np.zeros(normal.size, np.int64), np.ones(chosen.size, np.int64)])
    return np.asarray(x[idx], dtype=np.float64), y


def _scattered(normal: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``normal`` plus 5 % points uniform in its bounding box, widened by 10 % per side."""
    rng = np.random.default_rng(seed)
    lo, hi = normal.min(axis=0), normal.max(axis=0)
    pad = 0.1 * (hi - lo)
    count = round(CONTAMINATION / (1 - CONTAMINATION) * normal.shape[0])
    anomalies = rng.uniform(lo - pad, hi + pad, size=(count, normal.shape[1]))
    y = np.concatenate([np.zeros(normal.shape[0], np.int64), np.ones(count, np.int64)])
    return np.vstack([normal, anomalies]), y


def breast_cancer() -> AnomalySet:
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    x, y = _one_class_out(d.data, d.target, [0], seed=1)  # target 0 = malignant
    return AnomalySet("breast-cancer", x, y, "load_breast_cancer: benign normal, malignant 5 %")


def wine() -> AnomalySet:
    from sklearn.datasets import load_wine

    d = load_wine()
    x, y = _one_class_out(d.data, d.target, [0], seed=2)
    return AnomalySet("wine", x, y, "load_wine: classes 1, 2 normal, class 0 5 %")


def digits() -> AnomalySet:
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = _one_class_out(d.data, d.target, [0], seed=3)
    x = x + np.random.default_rng(3).uniform(0.0, 1.0, size=x.shape)
    return AnomalySet("digits", x, y, "load_digits: digits 1-9 normal, zeros 5 %, dequantized")


def iris() -> AnomalySet:
    from sklearn.datasets import load_iris

    d = load_iris()
    x, y = _one_class_out(d.data, d.target, [0], seed=4)
    return AnomalySet("iris", x, y, "load_iris: versicolor, virginica normal, setosa 5 %")


def moons() -> AnomalySet:
    from sklearn.datasets import make_moons

    normal, _ = make_moons(950, noise=0.06, random_state=5)
    x, y = _scattered(normal, seed=5)
    return AnomalySet("moons", x, y, "make_moons (2-D): curved manifold, 5 % uniform scatter")


def swiss_roll() -> AnomalySet:
    from sklearn.datasets import make_swiss_roll

    normal, _ = make_swiss_roll(950, noise=0.3, random_state=6)
    x, y = _scattered(normal, seed=6)
    return AnomalySet("swiss-roll", x, y, "make_swiss_roll (3-D): rolled sheet, 5 % uniform scatter")


SETS: dict[str, Callable[[], AnomalySet]] = {
    "breast-cancer": breast_cancer,
    "wine": wine,
    "digits": digits,
    "iris": iris,
    "moons": moons,
    "swiss-roll": swiss_roll,
}


def build(name: str) -> AnomalySet:
    """The set called ``name`` (one of :data:`SETS`)."""
    if name not in SETS:
        raise KeyError(f"unknown set {name!r}; choose from {sorted(SETS)}")
    return SETS[name]()
