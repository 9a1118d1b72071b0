"""Traced passes compute exactly what the eager flow computes, or the model stays eager."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.model.contract import ContractError
from service.model.density import DensityModel
from service.model.flows import ARCHITECTURES, flow_spec
from service.accel.torchscript import TraceMismatch, trace_passes, try_trace

ARCHS = sorted(ARCHITECTURES)


def _model(name: str, context: int = 0, dtype: torch.dtype = torch.float32, features: int = 3) -> DensityModel:
    torch.manual_seed(0)
    spec = flow_spec(name, features, context, transforms=2, hidden_features=[16, 16])
    shift, scale = torch.tensor([1.5, -2.0, 0.25, 3.0])[:features], torch.tensor([0.5, 3.0, 1.7, 0.1])[:features]
    return DensityModel(spec, shift, scale, dtype=dtype).eval().requires_grad_(False)


def _inputs(model: DensityModel, rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, model.features, generator=gen, dtype=torch.float64) * 2).to(model.dtype)
    c = None
    if model.context_features:
        c = torch.randn(rows, model.context_features, generator=gen, dtype=torch.float64).to(model.dtype)
    return x, c


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("context", [0, 2], ids=["plain", "context"])
@pytest.mark.parametrize("arch", ARCHS)
def test_traced_passes_equal_eager(arch: str, context: int, dtype: torch.dtype) -> None:
    model = _model(arch, context, dtype)
    runner = trace_passes(model)
    with torch.inference_mode():
        for rows in (1, 2, 5, 300):  # sizes other than the example batch the trace was recorded on
            x, c = _inputs(model, rows, seed=rows)
            for eager, traced in ((model.encode_columns, runner.encode), (model.decode_columns, runner.decode)):
                want, got = eager(x, c), traced(x, c)
                assert got.dtype == dtype and got.shape == want.shape
                torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_packed_columns_are_the_decomposition() -> None:
    model = _model("nsf", context=2)
    assert try_trace(model) and model.runner is not None
    x, c = _inputs(model, 17, seed=3)
    with torch.inference_mode():
        packed = model.encode_packed(x, c)
        enc = model.encode(x, c)
        d = model.features
        torch.testing.assert_close(packed[:, :d], enc.z, rtol=0, atol=0)
        torch.testing.assert_close(packed[:, d], enc.log_det, rtol=0, atol=0)
        torch.testing.assert_close(packed[:, d + 1], enc.base_log_prob, rtol=0, atol=0)
        torch.testing.assert_close(packed[:, d + 2], enc.log_prob, rtol=0, atol=0)
        dec_packed = model.decode_packed(enc.z, c)
        dec = model.decode(enc.z, c)
        torch.testing.assert_close(dec_packed[:, :d], dec.x, rtol=0, atol=0)
        torch.testing.assert_close(dec_packed[:, d], dec.log_prob, rtol=0, atol=0)
        np.testing.assert_allclose(dec_packed[:, :d].numpy(), x.numpy(), atol=1e-4)  # the round trip


def test_packed_passes_check_context_like_eager() -> None:
    model = _model("maf", context=2)
    try_trace(model)
    x, c = _inputs(model, 4, seed=1)
    with torch.inference_mode():
        with pytest.raises(ContractError, match="needs 2 context features"):
            model.encode_packed(x)
        with pytest.raises(ContractError, match=r"context must have shape \(4, 2\)"):
            model.decode_packed(x, c[:3])
    plain = _model("maf")
    try_trace(plain)
    with torch.inference_mode(), pytest.raises(ContractError, match="takes no context"):
        plain.encode_packed(x, c)


class _Branchy(DensityModel):
    """A model whose Python branches on the data: a trace bakes in one branch and so differs."""

    def encode_columns(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        packed = super().encode_columns(x, context)
        return packed + 1.0 if bool(x[0, 0] > 0) else packed


def test_a_trace_that_differs_from_eager_is_refused_and_the_model_stays_eager(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = _Branchy(flow_spec("nsf", 3, transforms=2, hidden_features=[16, 16]), torch.zeros(3), torch.ones(3))
    model.eval().requires_grad_(False)
    with pytest.raises(TraceMismatch, match="traced encode differs from eager"):
        trace_passes(model)
    assert not try_trace(model, "branchy") and model.runner is None
    assert "branchy stays eager" in caplog.text
    x = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    with torch.inference_mode():  # eager still answers, branch and all
        torch.testing.assert_close(model.encode_packed(x[:1]), model.encode_columns(x[:1]))
        torch.testing.assert_close(model.encode_packed(x[1:]), model.encode_columns(x[1:]))


def test_moving_the_model_drops_its_trace() -> None:
    model = _model("nsf")
    assert try_trace(model)
    model.to(torch.float64)
    assert model.runner is None
    x, _ = _inputs(model, 3, seed=0)
    with torch.inference_mode():
        assert model.encode_packed(x).dtype == torch.float64


def test_gradients_use_eager_code() -> None:
    model = _model("realnvp")
    try_trace(model)
    model.requires_grad_(True)
    x, _ = _inputs(model, 8, seed=0)
    loss = -model.encode_packed(x)[:, -1].mean()  # grad enabled: the eager path, which autograd can follow
    loss.backward()
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters())
