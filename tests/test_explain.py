"""``explain``: exact chain-rule terms against autograd and a grid integral; occlusion against /log_prob."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from service.model.density import DensityModel
from service.model.flows import flow_spec
from service.serving.inprocess import LocalModel
from service.serving.operations import occlusion_baseline


def _model(name: str, features: int, **kw) -> DensityModel:
    torch.manual_seed(0)
    m = DensityModel(flow_spec(name, features, hidden_features=[16, 16], **kw),
                     torch.tensor([0.3] * features), torch.tensor([1.5] * features), dtype=torch.float64)
    with torch.no_grad():
        for p in m.flow.parameters():
            p.add_(0.3 * torch.randn_like(p))  # away from zuko's near-identity start
    return m


@pytest.mark.parametrize("name", ["maf", "nsf-ar"])
def test_chain_rule_terms_match_autograd_jacobian(name: str) -> None:
    m = _model(name, 3, transforms=1)
    assert m.chain_rule_exact
    x = torch.randn(4, 3, dtype=torch.float64)
    terms = m.chain_rule_terms(x).detach()
    eps = 1e-10
    for r in range(4):
        z_of = lambda row: m.encode(row[None]).z[0]  # noqa: E731
        jac = torch.autograd.functional.jacobian(z_of, x[r])
        assert torch.all(torch.triu(jac, diagonal=1).abs() <= eps), jac  # z_i depends on x_<=i only
        z = z_of(x[r]).detach()
        ref = -0.5 * z**2 - 0.5 * np.log(2 * np.pi) + torch.log(torch.diagonal(jac).abs())
        torch.testing.assert_close(terms[r], ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(terms.sum(1), m.log_prob(x).detach(), rtol=1e-9, atol=1e-9)


def test_stacked_and_coupling_flows_are_not_exact() -> None:
    for name in ("maf", "nsf-ar", "nsf", "realnvp"):
        assert not _model(name, 3).chain_rule_exact, name
    with pytest.raises(ValueError, match="not triangular"):
        _model("maf", 3).chain_rule_terms(torch.zeros(1, 3, dtype=torch.float64))


def test_first_term_is_the_marginal_by_grid_integration() -> None:
    m = _model("maf", 2, transforms=1)
    x1 = torch.tensor([-1.0, 0.2, 1.7], dtype=torch.float64)
    grid = torch.linspace(-60, 60, 60001, dtype=torch.float64)
    for v in x1:
        rows = torch.stack([v.expand_as(grid), grid], dim=1)
        with torch.no_grad():
            marginal = torch.log(torch.trapezoid(torch.exp(m.log_prob(rows)), grid))
            term = m.chain_rule_terms(torch.tensor([[float(v), 0.5]], dtype=torch.float64))[0, 0]
        assert abs(float(marginal - term)) < 1e-4, (float(marginal), float(term))


def test_explain_over_http_is_occlusion_on_moons(client: httpx.Client, model_repo: Path) -> None:
    rows = [[0.0, 1.0], [1.0, -0.5], [2.0, 0.3]]
    r = client.post("/v1/models/moons/explain", json={"inputs": rows})
    assert r.status_code == 200, r.text
    body = r.json()
    local = LocalModel.load(model_repo, "moons", version=body["version"])
    assert body["method"] == "occlusion" and body["exact"] is False and body["feature_names"] == local.feature_names
    contributions = np.array(body["contributions"])
    assert contributions.shape == (3, 2)
    base = occlusion_baseline(local.served)
    x = np.array(rows)
    lp = np.array(client.post("/v1/models/moons/log_prob", json={"inputs": rows}).json()["log_prob"])
    np.testing.assert_allclose(body["log_prob"], lp, rtol=1e-6, atol=1e-5)
    for i in range(2):
        occluded = x.copy()
        occluded[:, i] = base[i]
        lpi = np.array(client.post("/v1/models/moons/log_prob", json={"inputs": occluded.tolist()}).json()["log_prob"])
        tol = 8 * np.finfo(np.float32).eps * (1 + np.abs(lp) + np.abs(lpi))
        assert np.all(np.abs(contributions[:, i] - (lp - lpi)) <= tol), (contributions[:, i], lp - lpi)


def test_explain_bad_input_is_4xx(client: httpx.Client) -> None:
    r = client.post("/v1/models/moons/explain", json={"inputs": [[0.0, 1.0, 2.0]]})
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/problem+json")
    r = client.post("/v1/models/moons/explain", json={"inputs": [[0.0, 1.0]], "alpha": 0.1})
    assert r.status_code == 422
    r = client.post("/v1/models/moons/explain", json={})
    assert r.status_code == 422
    r = client.post("/v1/models/nope/explain", json={"inputs": [[0.0, 1.0]]})
    assert r.status_code == 404
