"""The committed default models: they load, their figures hold when measured again, and they make sense."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from service.model.artifact import LoadedArtifact
from service.training.data import dequantize, split
from service.training.default_models import DEFAULT_MODELS
from service.training.exactness import certify
from service.model.repository import ModelRepository
from tests.tolerance import assert_close_across_machines

MODELS = Path(__file__).resolve().parents[1] / "models"
NAMES = sorted(DEFAULT_MODELS)
MAX_BYTES = 2_000_000


@pytest.fixture(scope="module")
def repo() -> ModelRepository:
    return ModelRepository(MODELS)


@pytest.fixture(scope="module")
def loaded(repo: ModelRepository) -> dict[str, LoadedArtifact]:
    return {name: repo.load(name) for name in NAMES}


def _held_out(name: str, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """The training and calibration rows of a default model, rebuilt from its data and seed."""
    spec = DEFAULT_MODELS[name]
    data = spec.data()
    if spec.dequantize:
        data = dequantize(data, seed)
    parts = split(data.rows, seed)
    c = data.context
    return (data.x[parts.train], data.x[parts.calibration],
            None if c is None else c[parts.train], None if c is None else c[parts.calibration])


def test_each_default_is_version_1_and_small(repo: ModelRepository) -> None:
    assert set(NAMES) <= set(repo.names())
    for name in NAMES:
        assert repo.versions(name) == [1], name
        size = sum(p.stat().st_size for p in (MODELS / name / "1").iterdir())
        assert size < MAX_BYTES, (name, size)
        assert sorted(p.name for p in (MODELS / name / "1").iterdir()) == ["model.json", "weights.safetensors"]


@pytest.mark.parametrize("name", NAMES)
def test_recorded_figures_pass_and_beat_the_gaussian(loaded: dict[str, LoadedArtifact], name: str) -> None:
    m = loaded[name].manifest
    ex, tr = m.exactness, m.training
    assert ex["passed"] and all(check["pass"] for check in ex["checks"].values()), ex["checks"]
    assert {"round_trip_x", "round_trip_z", "log_det_autograd"} <= set(ex["checks"])
    assert ("integral" in ex["checks"]) == (m.features <= 2)
    # clearly better than a Gaussian: at least 0.2 nats per dimension on held-out rows
    assert tr["test_nll_per_dim"] < tr["gaussian_test_nll_per_dim"] - 0.2, tr
    assert any("Nalisnick" in note for note in m.notes)
    assert m.training["dequantized"] == DEFAULT_MODELS[name].dequantize == m.preprocessing.dequantized


@pytest.mark.parametrize("name", NAMES)
def test_figures_hold_when_measured_again(loaded: dict[str, LoadedArtifact], name: str) -> None:
    """Rebuild the held-out rows from the data and seed; the NLL, calibration and exactness agree."""
    art = loaded[name]
    x_tr, x_ca, c_tr, c_ca = _held_out(name, art.manifest.training["seed"])
    model = art.model
    lp = model.log_prob(torch.as_tensor(x_ca, dtype=model.dtype),
                        None if c_ca is None else torch.as_tensor(c_ca, dtype=model.dtype))
    # recorded at training time, possibly on another CPU: equal to float32's tolerance (tests/tolerance.py)
    assert_close_across_machines(lp.double().numpy(), art.manifest.calibration, np.float32, err_msg="calibration")
    figures = certify(model, x_tr, x_ca, c_tr, c_ca, seed=art.manifest.training["seed"])
    assert figures["passed"], figures["checks"]
    assert_close_across_machines(figures["nll"]["nll"], art.manifest.training["test_nll"], np.float32, err_msg="test_nll")
    assert figures["nll"]["gaussian_nll"] == pytest.approx(art.manifest.training["gaussian_test_nll"], rel=1e-9)


def test_names_of_features_and_context(loaded: dict[str, LoadedArtifact]) -> None:
    assert loaded["moons"].manifest.feature_names == ["x", "y"]
    assert loaded["digits"].manifest.feature_names[:2] == ["pixel_0_0", "pixel_0_1"]
    assert loaded["digits"].manifest.features == 64 and loaded["digits"].manifest.context_features == 0
    assert loaded["digits-cond"].manifest.context_names == [f"label_{k}" for k in range(10)]


def test_moons_samples_lie_on_the_moons(loaded: dict[str, LoadedArtifact]) -> None:
    from sklearn.datasets import make_moons

    curve, _ = make_moons(n_samples=4000, noise=0.0)
    samples = loaded["moons"].model.sample(1000, seed=0).x.double().numpy()
    distance = np.sqrt(((samples[:, None, :] - curve[None]) ** 2).sum(-1)).min(axis=1)
    assert np.mean(distance < 0.3) > 0.95


def test_digits_cond_draws_the_chosen_digit(loaded: dict[str, LoadedArtifact]) -> None:
    """A classifier fitted on the real images recognises the label a sample was drawn for."""
    from sklearn.datasets import load_digits
    from sklearn.neighbors import KNeighborsClassifier

    x, y = load_digits(return_X_y=True)
    classifier = KNeighborsClassifier(n_neighbors=5).fit(x, y)
    model = loaded["digits-cond"].model
    hits = []
    for digit in range(10):
        context = torch.zeros(50, 10)
        context[:, digit] = 1.0
        images = model.sample(50, seed=digit, context=context).x.double().numpy() - 0.5  # undo the dequantization mean
        hits.append(np.mean(classifier.predict(np.clip(images, 0, 16)) == digit))
    assert np.mean(hits) > 0.8 and min(hits) > 0.5, hits
