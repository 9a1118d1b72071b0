"""The fixtures of every test module (pytest finds this file itself; no module registers plugins).

Generic: small data sets, a small architecture, and a 2-D model trained once per session.
HTTP: ``model_repo``, the tiny repository of :func:`tests.server.build_repository` (session-scoped);
``server`` / ``client``, a server with default settings over it and an httpx client to it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import pytest

from tests.server import ServerProcess, build_repository, start_server


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> None:
    """Run torch on one thread: the test models are small, and on a busy 2-core machine two OpenMP
    threads spin against each other (measured: 8 epochs of a small NSF took 10 s on 2 threads, 2 s on 1)."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def moons_rows() -> np.ndarray:
    """3,000 rows of scikit-learn's two moons (2-D, noise 0.08, seed 0)."""
    from sklearn.datasets import make_moons

    x, _ = make_moons(n_samples=3000, noise=0.08, random_state=0)
    return x.astype(np.float64)


@pytest.fixture(scope="session")
def blob_rows() -> tuple[np.ndarray, np.ndarray]:
    """1,200 rows of three 3-D Gaussian blobs, with the one-hot class ``(1200, 3)`` as context."""
    rng = np.random.default_rng(0)
    label = rng.integers(0, 3, size=1200)
    centres = np.array([[-3.0, 0.0, 1.0], [3.0, 1.0, -1.0], [0.0, -3.0, 2.0]])
    x = centres[label] + rng.normal(scale=[0.5, 0.8, 1.1], size=(1200, 3))
    return x, np.eye(3)[label]


@pytest.fixture
def tiny() -> dict[str, Any]:
    """Options of a small, fast architecture (seconds of training on 2 cores), for ``TrainConfig``."""
    return dict(transforms=2, hidden_features=[16, 16], batch_size=128, patience=50, max_minutes=1.0)


@pytest.fixture(scope="session")
def trained_moons(tmp_path_factory: pytest.TempPathFactory, moons_rows: np.ndarray) -> Path:
    """The folder of a 2-D NSF trained for a few seconds on the moons rows (``train_and_save``)."""
    from service.training.data import Dataset
    from service.training.run import train_and_save
    from service.training.fit import TrainConfig

    data = Dataset(moons_rows, None, ["x", "y"], [], "moons")
    config = TrainConfig(flow="nsf", transforms=3, hidden_features=[32, 32], epochs=25, batch_size=128,
                         patience=50, max_minutes=1.0, seed=0)
    return train_and_save(data, "moons", tmp_path_factory.mktemp("repo"), config)


# -- HTTP: a real server on a loopback port -----------------------------------------------------------
@pytest.fixture(scope="session")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with ``moons`` (versions 1, 2), ``cond`` and ``nocal``."""
    return build_repository(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The main test server over :func:`model_repo`, with default settings."""
    with start_server(model_repo, tmp_path_factory.mktemp("server")) as proc:
        yield proc


@pytest.fixture(scope="session")
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c
