r"""The density model: a zuko flow with the data's standardisation folded in.

Let :math:`s(x) = (x - \mu) / \sigma` be the per-feature standardisation chosen from the training
data and :math:`T` the flow's map from standardised data to latents. The model's map to latents is
:math:`z = f^{-1}(x) = T(s(x))`, and by the change of variables

.. math::
    \log p(x) = \log p_Z(z) + \log |\det J_T(s(x))| - \sum_j \log \sigma_j ,

so every log-density is in the data's own units. ``log_det`` below is the whole
:math:`\log |\det \partial z / \partial x|`, standardisation included, and
``log_prob == base_log_prob + log_det`` holds row by row.

The generative direction is :math:`x = f(z) = s^{-1}(T^{-1}(z))`; ``decode`` returns ``x`` with
``log p(x)`` computed from the same identity (:math:`\log |\det \partial z / \partial x|` is minus the
log-determinant of the inverse map).

All operations act on rows, ``(B, D)``, with optional context rows ``(B, C)``; a row's result does
not depend on the other rows of its batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from service.model.flows import build_flow
from service.model.inversion import inverse_and_ladj

__all__ = ["DensityModel", "Encoded", "Decoded", "Sampled", "ENCODE_COLUMNS", "DECODE_COLUMNS", "PassRunner"]

#: The columns of :meth:`DensityModel.encode_packed`'s ``(B, D + 3)`` result, in order (``z`` is D wide).
ENCODE_COLUMNS = ("z", "log_det", "base_log_prob", "log_prob")
#: The columns of :meth:`DensityModel.decode_packed`'s ``(B, D + 1)`` result, in order (``x`` is D wide).
DECODE_COLUMNS = ("x", "log_prob")


class PassRunner(Protocol):
    """A faster, equivalent implementation of the packed passes (see :mod:`service.accel.torchscript`)."""

    def encode(self, x: Tensor, context: Tensor | None) -> Tensor: ...

    def decode(self, z: Tensor, context: Tensor | None) -> Tensor: ...


@dataclass(frozen=True)
class Encoded:
    """Result of ``x → z``: latents and the decomposition ``log_prob = base_log_prob + log_det``."""

    z: Tensor
    log_det: Tensor
    base_log_prob: Tensor
    log_prob: Tensor


@dataclass(frozen=True)
class Decoded:
    """Result of ``z → x``: data rows and their log-density under the model."""

    x: Tensor
    log_prob: Tensor


@dataclass(frozen=True)
class Sampled:
    """Result of sampling: data rows, the latents they came from, and their log-density."""

    x: Tensor
    z: Tensor
    log_prob: Tensor


class DensityModel(nn.Module):
    """A normalizing flow over data in its own units.

    Arguments:
        flow_spec: the allow-listed flow specification (see :mod:`service.model.flows`).
        shift: per-feature :math:`\\mu`, shape ``(D,)``.
        scale: per-feature :math:`\\sigma > 0`, shape ``(D,)``.
        dtype: the dtype of the module (default: torch's default dtype); ``shift`` and ``scale``
            are rounded to it once, from the values given.
    """

    def __init__(
        self, flow_spec: dict[str, Any], shift: Tensor, scale: Tensor, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        dtype = dtype or torch.get_default_dtype()
        shift = torch.as_tensor(shift).to(dtype).reshape(-1)
        scale = torch.as_tensor(scale).to(dtype).reshape(-1)
        features = int(flow_spec["kwargs"]["features"])
        if shift.shape != (features,) or scale.shape != (features,):
            raise ValueError(f"shift and scale must have shape ({features},)")
        if not bool(torch.all(scale > 0)) or not bool(torch.all(torch.isfinite(scale))):
            raise ValueError("scale must be finite and positive")
        self.flow_spec = flow_spec
        self.features = features
        self.context_features = int(flow_spec["kwargs"].get("context", 0))
        self.flow = build_flow(flow_spec).to(dtype)
        self.register_buffer("shift", shift)
        self.register_buffer("scale", scale)
        self._runner: PassRunner | None = None

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.shift.dtype

    @property
    def device(self) -> torch.device:
        return self.shift.device

    def _check_context(self, context: Tensor | None, rows: int) -> None:
        if self.context_features:
            if context is None:
                raise ValueError(f"this model needs {self.context_features} context features per row")
            if context.shape != (rows, self.context_features):
                raise ValueError(
                    f"context must have shape ({rows}, {self.context_features}), got {tuple(context.shape)}"
                )
        elif context is not None:
            raise ValueError("this model takes no context")

    def _dist(self, context: Tensor | None, rows: int) -> Any:
        self._check_context(context, rows)
        return self.flow(context.to(self.dtype)) if self.context_features else self.flow()

    def _standardisation_log_det(self) -> Tensor:
        r""":math:`\log |\det \partial s / \partial x| = -\sum_j \log \sigma_j`."""
        return -torch.log(self.scale).sum()

    # -- the two passes --------------------------------------------------------------------------
    def encode(self, x: Tensor, context: Tensor | None = None) -> Encoded:
        """``x → z`` with ``log_det = log|det ∂z/∂x|`` and ``log_prob = log p_Z(z) + log_det``."""
        x = x.to(self.dtype)
        dist = self._dist(context, x.shape[0])
        z, ladj = dist.transform.call_and_ladj((x - self.shift) / self.scale)
        log_det = ladj + self._standardisation_log_det()
        base = dist.base.log_prob(z)
        return Encoded(z=z, log_det=log_det, base_log_prob=base, log_prob=base + log_det)

    def decode(self, z: Tensor, context: Tensor | None = None) -> Decoded:
        """``z → x``; ``log_prob = log p_Z(z) - log|det ∂x/∂z|``."""
        z = z.to(self.dtype)
        dist = self._dist(context, z.shape[0])
        u, ladj_inv = inverse_and_ladj(dist.transform, z)  # = transform.inv.call_and_ladj(z), fewer MLP calls
        x = u * self.scale + self.shift
        log_det = -ladj_inv + self._standardisation_log_det()
        return Decoded(x=x, log_prob=dist.base.log_prob(z) + log_det)

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``log p(x)`` in the data's own units."""
        return self.encode(x, context).log_prob

    # -- packed passes (what a batch computes) ---------------------------------------------------
    def use_runner(self, runner: PassRunner | None) -> None:
        """Have :meth:`encode_packed` / :meth:`decode_packed` use ``runner`` (``None``: eager).

        The runner must compute the same function (e.g. :func:`service.accel.torchscript.trace_passes`, which
        checks that it does); it applies only where no gradient is recorded. Moving the model to
        another device or dtype drops it, since it was built for the old one.
        """
        self._runner = runner

    @property
    def runner(self) -> PassRunner | None:
        """The packed passes' runner in use (``None``: eager zuko code)."""
        return self._runner

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "DensityModel":
        self._runner = None  # a runner built for the old device/dtype would be stale
        return super()._apply(fn, *args, **kwargs)

    def _eager_rows(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor | None]:
        self._check_context(context, x.shape[0])
        return x.to(self.dtype), None if context is None else context.to(self.dtype)

    def encode_packed(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """:meth:`encode` as one ``(B, D + 3)`` tensor of :data:`ENCODE_COLUMNS` in the model's dtype."""
        x, context = self._eager_rows(x, context)
        if self._runner is not None and not torch.is_grad_enabled():
            return self._runner.encode(x, context)
        return self.encode_columns(x, context)

    def decode_packed(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        """:meth:`decode` as one ``(B, D + 1)`` tensor of :data:`DECODE_COLUMNS` in the model's dtype."""
        z, context = self._eager_rows(z, context)
        if self._runner is not None and not torch.is_grad_enabled():
            return self._runner.decode(z, context)
        return self.decode_columns(z, context)

    def encode_columns(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """The eager packed encode (what a runner must reproduce)."""
        e = self.encode(x, context)
        return torch.cat([e.z, e.log_det[:, None], e.base_log_prob[:, None], e.log_prob[:, None]], dim=1)

    def decode_columns(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        """The eager packed decode (what a runner must reproduce)."""
        d = self.decode(z, context)
        return torch.cat([d.x, d.log_prob[:, None]], dim=1)

    # -- sampling --------------------------------------------------------------------------------
    def draw_latents(self, n: int, seed: int | None = None, temperature: float = 1.0) -> Tensor:
        """Draw ``n`` base latents ``z = temperature · ε``, ``ε ~ N(0, I)``, on the CPU.

        The noise comes from a per-call ``torch.Generator`` seeded with ``seed`` (fresh entropy
        when ``None``), so the same seed gives the same latents whatever else runs.
        """
        if n < 0:
            raise ValueError("n must be >= 0")
        if not temperature > 0:
            raise ValueError("temperature must be > 0")
        gen = torch.Generator(device="cpu")
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(int(seed))
        eps = torch.randn(n, self.features, generator=gen, dtype=torch.float64)
        return (eps * temperature).to(self.dtype)

    def sample(
        self,
        n: int,
        seed: int | None = None,
        temperature: float = 1.0,
        context: Tensor | None = None,
    ) -> Sampled:
        """Draw ``n`` rows; ``log_prob`` is the model's (untempered) log-density of each row."""
        z = self.draw_latents(n, seed, temperature).to(self.device)
        decoded = self.decode(z, context)
        return Sampled(x=decoded.x, z=z, log_prob=decoded.log_prob)
