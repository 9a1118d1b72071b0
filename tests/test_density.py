"""The density is the density: closed forms, Jacobians, round trips, batch invariance, seeded sampling."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from service.model.contract import ContractError
from service.model.artifact import load_artifact
from service.model.density import DensityModel
from service.training.exactness import integral, log_det_errors, round_trip_x, round_trip_z
from service.model.flows import ARCHITECTURES, flow_spec

ARCHS = sorted(ARCHITECTURES)
SHIFT = np.array([1.5, -2.0, 0.25])
SCALE = np.array([0.5, 3.0, 1.7])


def _model(name: str, features: int = 3, context: int = 0, dtype: torch.dtype = torch.float32,
           shift: np.ndarray = SHIFT, scale: np.ndarray = SCALE, seed: int = 0) -> DensityModel:
    torch.manual_seed(seed)
    spec = flow_spec(name, features, context, transforms=2, hidden_features=[16, 16])
    model = DensityModel(spec, torch.as_tensor(shift[:features]), torch.as_tensor(scale[:features]), dtype=dtype)
    return model.eval().requires_grad_(False)


def _last_layers(model: DensityModel) -> list[torch.nn.Linear]:
    """The output layer of every transform's hyper-network (what maps to the transform's parameters)."""
    return [t.hyper[-1] for t in model.flow.transform.transforms if hasattr(t, "hyper")]


def _zero_last_layers(model: DensityModel) -> DensityModel:
    """Zero every output layer: splines become uniform-bin identities, affine maps exp(0)·u + 0."""
    with torch.no_grad():
        for layer in _last_layers(model):
            layer.weight.zero_()
            layer.bias.zero_()
    return model


def _rows(n: int, d: int = 3, seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.as_tensor(SHIFT[:d] + SCALE[:d] * rng.normal(size=(n, d)), dtype=dtype)


# -- closed forms --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("context", [0, 2])
def test_identity_flow_is_the_standardised_gaussian(name: str, context: int) -> None:
    """With its last layers zeroed every flow is the identity, so p(x) = N(x; shift, diag(scale²))."""
    model = _zero_last_layers(_model(name, context=context))
    x = _rows(500)
    c = torch.randn(500, context) if context else None
    expected = multivariate_normal(mean=SHIFT, cov=np.diag(SCALE**2)).logpdf(x.double().numpy())
    got = model.log_prob(x, c).double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # and in float64 to rounding
    model64 = _zero_last_layers(_model(name, context=context, dtype=torch.float64))
    got64 = model64.log_prob(x.double(), None if c is None else c.double()).numpy()
    np.testing.assert_allclose(got64, expected, rtol=1e-12, atol=1e-12)


def test_affine_flow_matches_its_closed_form_gaussian() -> None:
    r"""A MAF whose hyper-networks output constants is an elementwise affine map
    :math:`z = a \odot u + b` (:math:`u` the standardised data), so :math:`x` is Gaussian with mean
    :math:`\mu - \sigma b / a` and standard deviation :math:`\sigma / a`; compared with scipy."""
    model = _model("maf", dtype=torch.float64)
    rng = np.random.default_rng(3)
    a_total, b_total = np.ones(3), np.zeros(3)
    with torch.no_grad():
        for layer in _last_layers(model):  # composed in order: z = T_n(...T_1(u))
            layer.weight.zero_()
            params = rng.normal(scale=0.5, size=(3, 2))  # (feature, [shift, unconstrained scale])
            layer.bias.copy_(torch.as_tensor(params.reshape(-1)))
            raw = params[:, 1]
            a = np.exp(raw / (1 + np.abs(raw / math.log(1e-3))))  # zuko's MonotonicAffineTransform, slope 1e-3
            a_total, b_total = a * a_total, a * b_total + params[:, 0]
    mean = SHIFT - SCALE * b_total / a_total
    std = SCALE / a_total
    x = _rows(400, dtype=torch.float64)
    expected = multivariate_normal(mean=mean, cov=np.diag(std**2)).logpdf(x.numpy())
    np.testing.assert_allclose(model.log_prob(x).numpy(), expected, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(model.to(torch.float32).log_prob(x.float()).double().numpy(), expected, rtol=1e-5, atol=1e-5)


def test_standardisation_jacobian_is_minus_sum_log_scale() -> None:
    r"""Same flow weights, data scaled by :math:`\sigma`: log_det differs by exactly :math:`-\sum\log\sigma`."""
    unit = _model("nsf", shift=np.zeros(3), scale=np.ones(3), dtype=torch.float64)
    scaled = _model("nsf", dtype=torch.float64)
    scaled.flow.load_state_dict(unit.flow.state_dict())
    u = torch.randn(200, 3, dtype=torch.float64)
    x = u * scaled.scale + scaled.shift
    enc_u, enc_x = unit.encode(u), scaled.encode(x)
    torch.testing.assert_close(enc_x.z, enc_u.z, rtol=1e-12, atol=1e-12)
    diff = (enc_x.log_det - enc_u.log_det).numpy()
    np.testing.assert_allclose(diff, -np.log(SCALE).sum(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ARCHS)
def test_log_prob_is_base_log_prob_plus_log_det(name: str) -> None:
    model = _model(name, context=2)
    x, c = _rows(300), torch.randn(300, 2)
    enc = model.encode(x, c)
    torch.testing.assert_close(enc.log_prob, enc.base_log_prob + enc.log_det, rtol=0, atol=0)
    base = multivariate_normal(mean=np.zeros(3), cov=np.eye(3)).logpdf(enc.z.double().detach().numpy())
    np.testing.assert_allclose(enc.base_log_prob.double().detach().numpy(), base, rtol=1e-5, atol=1e-5)
    dec = model.decode(enc.z, c)
    np.testing.assert_allclose(dec.log_prob.detach().numpy(), enc.log_prob.detach().numpy(), rtol=1e-4, atol=1e-4)


# -- round trips and the log-det against autograd ------------------------------------------------------
@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("context", [0, 2])
def test_round_trips(name: str, context: int) -> None:
    model = _model(name, context=context)
    x = _rows(500)
    c = torch.randn(500, context) if context else None
    z = model.draw_latents(500, seed=4)
    assert round_trip_x(model, x, c) <= 1e-4 * float(x.abs().max())
    assert round_trip_z(model, z, c) <= 1e-4 * float(z.abs().max())
    model64 = model.to(torch.float64)
    c64 = None if c is None else c.double()
    assert round_trip_x(model64, x.double(), c64) <= 1e-12 * float(x.abs().max())
    assert round_trip_z(model64, z.double(), c64) <= 1e-12 * float(z.abs().max())


@pytest.mark.parametrize("name", ARCHS)
def test_log_det_matches_float64_autograd(name: str) -> None:
    model = _model(name, context=2, seed=7)
    x, c = _rows(12), torch.randn(12, 2)
    errors = log_det_errors(model, x, c)
    assert errors["float64_max_abs_error"] < 1e-10
    assert errors["max_abs_error"] < 1e-4 * max(1.0, errors["max_abs_log_det"])
    # against an independent per-row Jacobian too
    model64 = model.to(torch.float64)
    row, crow = x[0].double(), c[:1].double()
    jac = torch.autograd.functional.jacobian(lambda r: model64.encode(r[None], crow).z[0], row)
    logabsdet = torch.linalg.slogdet(jac).logabsdet
    torch.testing.assert_close(model64.encode(row[None], crow).log_det[0], logabsdet, rtol=1e-10, atol=1e-10)


# -- a trained model -----------------------------------------------------------------------------------
def test_trained_2d_model_integrates_to_one(trained_moons: Path) -> None:
    model = load_artifact(trained_moons).model
    assert abs(integral(model) - 1.0) < 0.01


def test_a_rows_log_prob_does_not_depend_on_its_batch(trained_moons: Path, moons_rows: np.ndarray) -> None:
    model = load_artifact(trained_moons).model
    x = torch.as_tensor(moons_rows[:1001], dtype=torch.float32)
    with torch.inference_mode():
        together = model.log_prob(x)
        for i in (0, 500, 1000):
            alone = model.log_prob(x[i : i + 1])
            torch.testing.assert_close(alone[0], together[i], rtol=1e-5, atol=1e-5 * abs(float(together[i])))
            latents_alone = model.encode(x[i : i + 1]).z
            torch.testing.assert_close(latents_alone[0], model.encode(x).z[i], rtol=1e-5, atol=1e-6)


def test_seeded_sampling(trained_moons: Path) -> None:
    model = load_artifact(trained_moons).model
    with torch.inference_mode():
        a, b, other = model.sample(64, seed=11), model.sample(64, seed=11), model.sample(64, seed=12)
    torch.testing.assert_close(a.x, b.x, rtol=0, atol=0)
    torch.testing.assert_close(a.log_prob, b.log_prob, rtol=0, atol=0)
    assert not torch.allclose(a.x, other.x)
    # a sample's reported log_prob is the log-density of the row it returned
    np.testing.assert_allclose(a.log_prob.numpy(), model.log_prob(a.x).numpy(), rtol=1e-4, atol=1e-4)


def test_temperature_scales_the_latents(trained_moons: Path) -> None:
    model = load_artifact(trained_moons).model
    torch.testing.assert_close(model.draw_latents(50, seed=3, temperature=0.5), 0.5 * model.draw_latents(50, seed=3))
    # the edge refuses a temperature <= 0 (422); reaching the model with one is a bug, not a ValueError
    with pytest.raises(ContractError, match="temperature > 0"):
        model.draw_latents(5, seed=1, temperature=0.0)


def test_context_is_required_and_refused_where_it_should_be() -> None:
    conditional, plain = _model("maf", context=2), _model("maf")
    x = _rows(4)
    with pytest.raises(ContractError, match="needs 2 context features"):
        conditional.log_prob(x)
    with pytest.raises(ContractError, match=r"context must have shape \(4, 2\)"):
        conditional.log_prob(x, torch.zeros(4, 3))
    with pytest.raises(ContractError, match="takes no context"):
        plain.log_prob(x, torch.zeros(4, 2))
