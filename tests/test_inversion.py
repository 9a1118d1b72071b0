"""The fused inverse equals zuko's generic inverse, round-trips, and calls each conditioner less often."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from zuko.transforms import (
    ComposedTransform,
    DependentTransform,
    MonotonicAffineTransform,
    PermutationTransform,
)

from service.model.artifact import load_artifact
from service.model.flows import ARCHITECTURES, build_flow, flow_spec
from service.model.inversion import inverse_and_ladj

ARCHS = sorted(ARCHITECTURES)
FEATURES, CONTEXT, ROWS, LAYERS = 5, 3, 64, 3
MODELS = Path(__file__).resolve().parents[1] / "models"
#: (atol, rtol) against the generic path, and the round-trip tolerance, per dtype
TOL = {torch.float32: (1e-6, 1e-6, 1e-4), torch.float64: (1e-12, 1e-12, 1e-10)}


def _flow(name: str, context: int, dtype: torch.dtype, features: int = FEATURES, seed: int = 0) -> nn.Module:
    """A small flow of architecture ``name`` whose weights are moved well away from their initialisation."""
    torch.manual_seed(seed)
    flow = build_flow(flow_spec(name, features, context, transforms=LAYERS, hidden_features=[16, 16]))
    flow = flow.to(dtype).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    for p in flow.parameters():
        p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype))
    return flow


def _rows(n: int, d: int, dtype: torch.dtype, seed: int) -> Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _case(name: str, context: int, dtype: torch.dtype, features: int = FEATURES):
    """The flow's transform for a batch of context rows, and ``y = f(x)`` for standard-normal ``x``."""
    flow = _flow(name, context, dtype, features)
    c = _rows(ROWS, context, dtype, seed=1) if context else None
    transform = flow(c).transform
    y = transform(_rows(ROWS, features, dtype, seed=2))
    return flow, transform, y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("context", [0, CONTEXT], ids=["plain", "context"])
@pytest.mark.parametrize("name", ARCHS)
def test_equals_generic_inverse_and_round_trips(name: str, context: int, dtype: torch.dtype) -> None:
    _, transform, y = _case(name, context, dtype)
    atol, rtol, trip = TOL[dtype]

    x_ref, ladj_ref = transform.inv.call_and_ladj(y)
    x, ladj = inverse_and_ladj(transform, y)

    assert x.shape == (ROWS, FEATURES) and ladj.shape == (ROWS,)
    assert x.dtype == ladj.dtype == dtype
    torch.testing.assert_close(x, x_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(ladj, ladj_ref, atol=atol, rtol=rtol)
    # the round trip recovers y, and the inverse's log-determinant is minus the forward one at x
    y_back, ladj_forward = transform.call_and_ladj(x)
    torch.testing.assert_close(y_back, y, atol=trip, rtol=trip)
    torch.testing.assert_close(ladj, -ladj_forward, atol=trip, rtol=trip)


class _Counter:
    """Forward hooks on every layer's hyper-network: how many calls, and how many rows they saw."""

    def __init__(self, flow: nn.Module) -> None:
        self.calls = 0
        self.rows = 0
        self._handles = [t.hyper.register_forward_hook(self._hook) for t in flow.transform.transforms]

    def _hook(self, module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
        self.calls += 1
        self.rows += args[0].shape[:-1].numel()

    def reset(self) -> None:
        self.calls = self.rows = 0

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _expected(name: str, context: int) -> dict[str, tuple[int, int]]:
    """(calls, rows) of the hyper-networks per layer: the generic inverse and the fused one.

    Coupling layers (realnvp, nice) call the conditioner once instead of twice. Autoregressive layers
    call it ``passes`` times instead of ``passes + 1``; the first pass starts from zeros, so without
    context it runs on a single row (zuko's nsf has two passes; maf and nsf-ar one per feature).
    """
    passes = {"nsf": 2, "nsf-ar": FEATURES, "maf": FEATURES, "realnvp": 1, "nice": 1}[name]
    if name in ("realnvp", "nice"):
        return {"generic": (2, 2 * ROWS), "fused": (1, ROWS)}
    first = ROWS if context else 1
    return {"generic": (passes + 1, (passes + 1) * ROWS), "fused": (passes, first + (passes - 1) * ROWS)}


@pytest.mark.parametrize("context", [0, CONTEXT], ids=["plain", "context"])
@pytest.mark.parametrize("name", ARCHS)
def test_conditioner_calls_per_layer(name: str, context: int) -> None:
    flow, transform, y = _case(name, context, torch.float32)
    counter = _Counter(flow)
    seen = {}
    try:
        for label, run in (("generic", lambda: transform.inv.call_and_ladj(y)),
                           ("fused", lambda: inverse_and_ladj(transform, y))):
            counter.reset()
            run()
            seen[label] = (counter.calls, counter.rows)
    finally:
        counter.remove()
    per_layer = {label: (calls // LAYERS, rows // LAYERS) for label, (calls, rows) in seen.items()}
    assert all(calls % LAYERS == 0 and rows % LAYERS == 0 for calls, rows in seen.values())
    assert per_layer == _expected(name, context)


@pytest.mark.parametrize("context", [0, CONTEXT], ids=["plain", "context"])
@pytest.mark.parametrize("name", ["nsf", "nsf-ar", "maf"])
def test_one_feature_flows_fall_back(name: str, context: int) -> None:
    """With one feature zuko builds element-wise layers, which the walk leaves to their own inverse."""
    _, transform, y = _case(name, context, torch.float64, features=1)
    x_ref, ladj_ref = transform.inv.call_and_ladj(y)
    x, ladj = inverse_and_ladj(transform, y)
    assert torch.equal(x, x_ref) and torch.equal(ladj, ladj_ref)
    torch.testing.assert_close(transform(x), y, atol=1e-10, rtol=1e-10)


def test_nested_compositions_and_unfused_layers() -> None:
    """Compositions nest; element-wise (event dim 0) and other layers fall back and are summed per row."""
    dtype = torch.float64
    gen = torch.Generator().manual_seed(3)
    shift, scale = torch.randn(2, FEATURES, generator=gen, dtype=dtype)
    inner = _case("nsf", 0, dtype)[1]
    outer = _case("realnvp", 0, dtype)[1]
    transform = ComposedTransform(
        MonotonicAffineTransform(shift, scale),  # event dim 0: its log-determinant is per feature
        ComposedTransform(inner, PermutationTransform(torch.randperm(FEATURES, generator=gen))),
        DependentTransform(MonotonicAffineTransform(-shift, scale), 1),
        outer,
    )
    y = transform(_rows(ROWS, FEATURES, dtype, seed=4))
    x_ref, ladj_ref = transform.inv.call_and_ladj(y)
    x, ladj = inverse_and_ladj(transform, y)
    assert ladj.shape == (ROWS,)
    torch.testing.assert_close(x, x_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(ladj, ladj_ref, atol=1e-12, rtol=1e-12)
    # a single layer, not wrapped in a composition, works too
    x_one, ladj_one = inverse_and_ladj(outer.transforms[0], y)
    x_one_ref, ladj_one_ref = outer.transforms[0].inv.call_and_ladj(y)
    torch.testing.assert_close(x_one, x_one_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(ladj_one, ladj_one_ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("model_name", ["moons", "digits-cond"])
def test_committed_models_decode_the_same(model_name: str) -> None:
    """The committed default models (an nsf, and a conditional nsf) invert the same both ways."""
    model = load_artifact(MODELS / model_name / "1").model.eval()
    z = model.draw_latents(256, seed=0)
    context = None
    if model.context_features:
        context = torch.eye(model.context_features, dtype=model.dtype)[torch.arange(256) % model.context_features]
    with torch.inference_mode():
        transform = model.flow(context).transform
        x_ref, ladj_ref = transform.inv.call_and_ladj(z)
        x, ladj = inverse_and_ladj(transform, z)
    torch.testing.assert_close(x, x_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ladj, ladj_ref, atol=1e-6, rtol=1e-6)
