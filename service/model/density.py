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

Bounded features. A feature ``j`` may be declared to lie in an open interval :math:`(a_j, b_j)`
(e.g. dequantized pixels ``x + u`` in :math:`(0, 17)`). It is then mapped to the real line first,
by the logit of its position in the interval,

.. math::
    y_j = \log(x_j - a_j) - \log(b_j - x_j), \qquad
    \log \left|\frac{dy_j}{dx_j}\right| = \log(b_j - a_j) - \log(x_j - a_j) - \log(b_j - x_j),

and ``shift`` / ``scale`` standardise :math:`y` (not :math:`x`) for those features; the log-Jacobian is
added to ``log_det``, so ``log_prob`` stays the density of ``x`` in the data's own units and the
density is zero outside the box. No squeeze :math:`\lambda` is used: with one, the map's support
would be wider than :math:`(a, b)` by :math:`\lambda (b - a) / (1 - 2\lambda)` on each side, and either
samples could leave the box or the density on it would integrate to less than 1. The two logs are
taken of :math:`x - a` and :math:`b - x` (exact by Sterbenz's lemma near a bound), not of
:math:`1 - p`, so no precision is lost near the upper bound.

The inverse is :math:`x = a + (b - a)\,\sigma(y)` (written as :math:`b - (b - a)\,\sigma(-y)` for
:math:`y > 0`), and its value is kept strictly inside :math:`(a, b)`: where :math:`\sigma` rounds the
point onto a bound in the dtype, the nearest representable value inside is returned (one unit in
the last place; ``log_prob`` is that of the latent's exact image). Encoding a row with a bounded
feature outside :math:`(a, b)` (a bound itself included, and infinities) gives ``log_prob = -inf``
(the density is zero there), and ``z``, ``log_det`` and ``base_log_prob`` NaN: no latent maps to
such a row. The flow runs on a placeholder value for it, so its batch neighbours are unaffected.
A NaN feature stays NaN everywhere, as for unbounded features.

Decorrelation. A model may also carry a lower-triangular matrix :math:`A` with a positive diagonal
(``linear``), applied after the standardisation: the flow then sees :math:`u = A\,s(x)` and

.. math:: \log p(x) = \log p_Z(T(u)) + \log |\det J_T(u)| + \sum_j \log A_{jj} - \sum_j \log \sigma_j .

With :math:`(\mu, \mathrm{diag}(\sigma)\,R\,\mathrm{diag}(\sigma))` a robust Gaussian fit (location and
scatter) and :math:`A = \mathrm{chol}(R)^{-1}`, an identity flow :math:`T` makes the model exactly that Gaussian
(the small-data start of :mod:`service.training.fit`). :math:`A` is lower-triangular, so :math:`u_i` depends on
:math:`x_{\le i}` only and a triangular flow stays triangular (the explanations' chain rule). The inverse
solves :math:`A s = u` by forward substitution. Like the bounds, :math:`A` is recorded in the manifest,
not among the weights.

All operations act on rows, ``(B, D)``, with optional context rows ``(B, C)``; a row's result does
not depend on the other rows of its batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from service.model.contract import ContractError, check_rows
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
        dtype: the dtype of the module (default: torch's default dtype); ``shift``, ``scale`` and
            the bounds are rounded to it once, from the values given.
        lower, upper: optional per-feature bounds, shape ``(D,)``; NaN (or an infinite bound) marks a
            feature without bounds; a bounded feature needs finite :math:`a < b`. They are not part
            of the weights (the manifest records them), so an unbounded model's state is unchanged.
        linear: optional lower-triangular :math:`A`, shape ``(D, D)``, finite with a positive
            diagonal, applied to the standardised rows (see the module doc); not part of the weights
            either (the manifest records it). ``None``: the identity.
    """

    def __init__(
        self,
        flow_spec: dict[str, Any],
        shift: Tensor,
        scale: Tensor,
        dtype: torch.dtype | None = None,
        lower: Tensor | None = None,
        upper: Tensor | None = None,
        linear: Tensor | None = None,
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
        self.bounded_features: tuple[int, ...] = ()
        if lower is not None or upper is not None:
            self._set_bounds(lower, upper, features, dtype)
        self.decorrelated = linear is not None
        if linear is not None:
            self._set_linear(torch.as_tensor(linear), features, dtype)
        self._runner: PassRunner | None = None

    def _set_linear(self, linear: Tensor, features: int, dtype: torch.dtype) -> None:
        a = linear.to(dtype)  # rounded to the dtype once, as shift and scale
        if a.shape != (features, features):
            raise ValueError(f"linear must have shape ({features}, {features}), got {tuple(a.shape)}")
        if not bool(torch.all(torch.isfinite(a))):
            raise ValueError("linear must be finite")
        if bool(torch.any(torch.triu(a, diagonal=1) != 0)):
            raise ValueError("linear must be lower-triangular (zeros above the diagonal)")
        if not bool(torch.all(torch.diagonal(a) > 0)):
            raise ValueError("linear must have a positive diagonal")
        self.register_buffer("linear", a, persistent=False)

    @property
    def linear_matrix(self) -> list[list[float]] | None:
        """:math:`A` as nested lists (rows), or ``None`` when there is none (the identity)."""
        return self.linear.double().tolist() if self.decorrelated else None

    def _to_flow(self, s: Tensor) -> Tensor:
        """Standardised rows ``s`` to the flow's input ``u = A s`` (``s`` itself without ``linear``)."""
        return s @ self.linear.T if self.decorrelated else s

    def _from_flow(self, u: Tensor) -> Tensor:
        """The inverse of :meth:`_to_flow`: solve ``A s = u`` for each row by forward substitution."""
        if not self.decorrelated:
            return u
        return torch.linalg.solve_triangular(self.linear.T, u, upper=True, left=False)

    def _set_bounds(self, lower: Tensor | None, upper: Tensor | None, features: int, dtype: torch.dtype) -> None:
        nan = torch.full((features,), float("nan"), dtype=torch.float64)
        lo = nan.clone() if lower is None else torch.as_tensor(lower, dtype=torch.float64).reshape(-1)
        hi = nan.clone() if upper is None else torch.as_tensor(upper, dtype=torch.float64).reshape(-1)
        if lo.shape != (features,) or hi.shape != (features,):
            raise ValueError(f"lower and upper must have shape ({features},)")
        mask = torch.isfinite(lo) & torch.isfinite(hi)
        half = torch.isfinite(lo) ^ torch.isfinite(hi)
        if bool(half.any()):
            j = int(torch.nonzero(half)[0])
            raise ValueError(f"feature {j} has only one finite bound; a bounded feature needs both")
        lo, hi = lo.to(dtype), hi.to(dtype)  # rounded to the dtype once, as shift and scale
        if bool((mask & ~(lo < hi)).any()):
            j = int(torch.nonzero(mask & ~(lo < hi))[0])
            raise ValueError(f"feature {j}: the lower bound must be below the upper one")
        if not bool(mask.any()):
            return
        self.bounded_features = tuple(int(j) for j in torch.nonzero(mask).reshape(-1))
        # placeholders (0, 1) where unbounded keep every elementwise op finite; the mask selects
        self.register_buffer("bound_mask", mask, persistent=False)
        self.register_buffer("lower", torch.where(mask, lo, torch.zeros_like(lo)), persistent=False)
        self.register_buffer("upper", torch.where(mask, hi, torch.ones_like(hi)), persistent=False)

    @property
    def bounds(self) -> tuple[list[float | None], list[float | None]] | None:
        """Per-feature ``(lower, upper)`` (``None`` where unbounded), or ``None`` if no feature is bounded."""
        if not self.bounded_features:
            return None
        lo = [float(v) if m else None for v, m in zip(self.lower.double().tolist(), self.bound_mask.tolist())]
        hi = [float(v) if m else None for v, m in zip(self.upper.double().tolist(), self.bound_mask.tolist())]
        return lo, hi

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.shift.dtype

    @property
    def device(self) -> torch.device:
        return self.shift.device

    def _check_context(self, context: Tensor | None, rows: int) -> None:
        """The context part of the model's contract (:func:`service.model.contract.check_rows`)."""
        check_rows(self.features, self.context_features, (rows, self.features),
                   None if context is None else context.shape)

    def _dist(self, context: Tensor | None, rows: int) -> Any:
        self._check_context(context, rows)
        return self.flow(context.to(self.dtype)) if self.context_features else self.flow()

    def _standardisation_log_det(self) -> Tensor:
        r""":math:`\log |\det \partial u / \partial x| = \sum_j \log A_{jj} - \sum_j \log \sigma_j` (:math:`A = I` without ``linear``)."""
        if self.decorrelated:
            return torch.log(torch.diagonal(self.linear)).sum() - torch.log(self.scale).sum()
        return -torch.log(self.scale).sum()

    def unbound(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        r"""Bounded features to the real line: ``(y, log|det ∂y/∂x|, outside)`` for rows ``x``.

        ``outside`` marks rows with a bounded feature not strictly inside its interval; their values
        are replaced by the interval's midpoint (so ``y`` and the log-det stay finite) and the
        caller masks their results. Unbounded features pass through unchanged.
        """
        m, a, b = self.bound_mask, self.lower, self.upper
        out = m & ((x <= a) | (x >= b))  # NaN compares False: a NaN stays NaN
        xs = torch.where(out, (a + b) / 2, x)
        lo, hi = torch.log(xs - a), torch.log(b - xs)
        y = torch.where(m, lo - hi, xs)
        ld = torch.where(m, torch.log(b - a) - lo - hi, torch.zeros_like(xs)).sum(dim=1)
        return y, ld, out.any(dim=1)

    def bound(self, y: Tensor) -> tuple[Tensor, Tensor]:
        r"""The inverse of :meth:`unbound`: ``(x, log|det ∂y/∂x|)`` at ``x`` for real rows ``y``.

        :math:`x = a + (b - a)\sigma(y)` (:math:`b - (b - a)\sigma(-y)` for :math:`y > 0`), kept strictly
        inside :math:`(a, b)`; :math:`\log|dy/dx| = \mathrm{softplus}(y) + \mathrm{softplus}(-y) - \log(b - a)`.
        """
        m, a, b = self.bound_mask, self.lower, self.upper
        width = b - a
        xb = torch.where(y > 0, b - width * torch.sigmoid(-y), a + width * torch.sigmoid(y))
        x = self.clamp_inside(torch.where(m, xb, y))
        ld = torch.nn.functional.softplus(y) + torch.nn.functional.softplus(-y) - torch.log(width)
        return x, torch.where(m, ld, torch.zeros_like(y)).sum(dim=1)

    def clamp_inside(self, x: Tensor) -> Tensor:
        """Bounded features moved onto the nearest value of ``x``'s dtype strictly inside ``(a, b)``; NaN stays NaN."""
        m, a, b = self.bound_mask, self.lower.to(x.dtype), self.upper.to(x.dtype)
        inside = torch.minimum(torch.maximum(x, torch.nextafter(a, b)), torch.nextafter(b, a))
        return torch.where(m, inside, x)

    def from_standardised(self, u: Tensor) -> Tensor:
        """Rows in the flow's input coordinates ``u`` back to data units (no log-det)."""
        y = self._from_flow(u) * self.scale + self.shift
        return self.bound(y)[0] if self.bounded_features else y

    # -- the two passes --------------------------------------------------------------------------
    def encode(self, x: Tensor, context: Tensor | None = None) -> Encoded:
        """``x → z`` with ``log_det = log|det ∂z/∂x|`` and ``log_prob = log p_Z(z) + log_det``."""
        x = x.to(self.dtype)
        dist = self._dist(context, x.shape[0])
        if not self.bounded_features:
            z, ladj = dist.transform.call_and_ladj(self._to_flow((x - self.shift) / self.scale))
            log_det = ladj + self._standardisation_log_det()
            base = dist.base.log_prob(z)
            return Encoded(z=z, log_det=log_det, base_log_prob=base, log_prob=base + log_det)
        y, ld_bound, outside = self.unbound(x)
        z, ladj = dist.transform.call_and_ladj(self._to_flow((y - self.shift) / self.scale))
        log_det = ladj + self._standardisation_log_det() + ld_bound
        base = dist.base.log_prob(z)
        nan = torch.full_like(log_det, float("nan"))
        return Encoded(
            z=torch.where(outside[:, None], nan[:, None], z),
            log_det=torch.where(outside, nan, log_det),
            base_log_prob=torch.where(outside, nan, base),
            log_prob=torch.where(outside, torch.full_like(log_det, -float("inf")), base + log_det),
        )

    def decode(self, z: Tensor, context: Tensor | None = None) -> Decoded:
        """``z → x``; ``log_prob = log p_Z(z) - log|det ∂x/∂z|``."""
        z = z.to(self.dtype)
        dist = self._dist(context, z.shape[0])
        u, ladj_inv = inverse_and_ladj(dist.transform, z)  # = transform.inv.call_and_ladj(z), fewer MLP calls
        x = self._from_flow(u) * self.scale + self.shift
        log_det = -ladj_inv + self._standardisation_log_det()
        if self.bounded_features:
            x, ld_bound = self.bound(x)
            log_det = log_det + ld_bound
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
        when ``None``), so the same seed gives the same latents whatever else runs. The request's
        rules (``n >= 1``, ``temperature > 0``, the seed's range) are checked at the edge
        (:mod:`service.serving.validation`); here ``n >= 0`` and ``temperature > 0`` are the
        contract, whose violation is a bug (:class:`~service.model.contract.ContractError`).
        """
        if n < 0 or not temperature > 0:
            raise ContractError(f"draw_latents takes n >= 0 and temperature > 0, got n={n}, temperature={temperature}")
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

    # -- per-feature explanations ----------------------------------------------------------------
    @property
    def chain_rule_exact(self) -> bool:
        r"""Whether :math:`\partial z / \partial x` is lower-triangular in the feature order, by construction.

        True when the flow is one zuko autoregressive transform with the identity order (``maf`` /
        ``nsf-ar`` with ``transforms=1``, no ``randperm``), or there is a single feature: the
        standardisation and the logit of bounded features are elementwise and ``linear`` is
        lower-triangular, so then
        :math:`z_i` depends on :math:`x_{\le i}` only and
        :math:`\log p(x) = \sum_i [\log \mathcal{N}(z_i) + \log|\partial z_i / \partial x_i|]`, whose
        term :math:`i` is exactly :math:`\log p(x_i \mid x_{<i})`. zuko's default MAF / NSF-AR stack
        several transforms with alternating orders, and coupling flows mix features both ways: their
        composite Jacobian is not triangular and per-dimension terms are no conditionals.
        """
        if self.features == 1:
            return True
        from zuko.flows.autoregressive import MaskedAutoregressiveTransform

        transforms = list(getattr(self.flow.transform, "transforms", [self.flow.transform]))
        if len(transforms) != 1 or not isinstance(transforms[0], MaskedAutoregressiveTransform):
            return False
        order = torch.as_tensor(transforms[0].order).reshape(-1).cpu()
        return bool(torch.equal(order, torch.arange(self.features)))

    def chain_rule_terms(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        r"""``(B, D)`` terms :math:`\log p(x_i \mid x_{<i})`, summing to ``log_prob`` (needs :attr:`chain_rule_exact`).

        Term :math:`i` is :math:`\log \mathcal{N}(z_i; 0, 1) + \log|\partial z_i / \partial x_i|`: the
        autoregressive transform's elementwise log-derivative (zuko's univariate transform given
        :math:`x_{<i}`), :math:`-\log \sigma_i` (plus :math:`\log A_{ii}` with ``linear``), and the logit's for a bounded feature. A row with a
        bounded feature outside its interval has density zero: its terms are NaN (its ``log_prob``
        ``-inf``).
        """
        if not self.chain_rule_exact:
            raise ValueError("this flow's Jacobian is not triangular in the feature order: no exact chain rule")
        x = x.to(self.dtype)
        dist = self._dist(context, x.shape[0])
        if self.bounded_features:
            m, a, b = self.bound_mask, self.lower, self.upper
            y, _, outside = self.unbound(x)
            xs = torch.where(m & ((x <= a) | (x >= b)), (a + b) / 2, x)
            ld_bound = torch.where(m, torch.log(b - a) - torch.log(xs - a) - torch.log(b - xs), torch.zeros_like(xs))
        else:
            y, outside, ld_bound = x, None, torch.zeros_like(x)
        u = self._to_flow((y - self.shift) / self.scale)
        transforms = list(getattr(dist.transform, "transforms", [dist.transform]))
        if len(transforms) == 1 and hasattr(transforms[0], "meta"):
            (t,) = transforms
            univariate = t.meta(u)
            univariate = getattr(univariate, "base", univariate)
            z = univariate(u)
            ld_flow = univariate.log_abs_det_jacobian(u, z)
        else:  # one feature: any flow is triangular; its log-det is the one term
            z, ladj = dist.transform.call_and_ladj(u)
            ld_flow = ladj[:, None]
        base = -0.5 * z.square() - 0.5 * math.log(2 * math.pi)
        ld_affine = -torch.log(self.scale)
        if self.decorrelated:  # u_i = sum_{j<=i} A_ij s_j: du_i/dx_i = A_ii / sigma_i
            ld_affine = ld_affine + torch.log(torch.diagonal(self.linear))
        terms = base + ld_flow + ld_affine + ld_bound
        if outside is not None:
            terms = torch.where(outside[:, None], torch.full_like(terms, float("nan")), terms)
        return terms
