r"""The inverse of a zuko flow and its log-determinant, with each conditioner evaluated as few times as needed.

For a transform :math:`f` with inverse :math:`g = f^{-1}`, :func:`inverse_and_ladj` returns
:math:`x = g(y)` and :math:`\log |\det \partial g / \partial y|`, per row: the same pair as
``transform.inv.call_and_ladj(y)``. That generic path inverts each layer and then asks the *forward*
layer for its log-determinant at :math:`(x, y)`, which evaluates the layer's conditioner (its
hyper-network) once more. The walk below evaluates it only where the inverse needs it.

**Coupling** (:class:`zuko.transforms.CouplingTransform`, RealNVP and NICE). The layer is
:math:`y_a = x_a,\ y_b = h_{\phi(x_a)}(x_b)` with :math:`h` elementwise. Its inverse reads the same
half it writes, :math:`x_a = y_a`, so one conditioner call :math:`h = \phi(y_a)` gives both

.. math::
    x_b = h^{-1}(y_b), \qquad
    \log |\det \partial x / \partial y| = \sum_j \log |\partial (h^{-1})_j / \partial y_{b,j}|
                                         = -\sum_j \log |h'_j(x_{b,j})| ,

instead of :math:`\phi(y_a)` for the inverse and :math:`\phi(x_a)` (the same values) for the
log-determinant.

**Autoregressive** (:class:`zuko.transforms.AutoregressiveTransform`, MAF and NSF; zuko's NSF with
``passes=2`` is a two-block masked autoregressive layer, not a ``CouplingTransform``). The layer is
:math:`y = h_{\phi(x)}(x)` where :math:`\phi` gives feature :math:`i` parameters that depend only on
features of earlier blocks, and ``passes`` :math:`P` is the number of blocks. The inverse iterates
:math:`x^{(0)} = 0,\ x^{(k)} = h_{\phi(x^{(k-1)})}^{-1}(y)`; after :math:`k` passes the first
:math:`k` blocks of :math:`x^{(k)}` are exact, so :math:`\phi(x^{(P-1)})` already equals
:math:`\phi(x)` for the exact :math:`x = x^{(P)}` (block :math:`P`'s values feed no parameter). The
last pass therefore yields the log-determinant from the same conditioner call,

.. math:: \log |\det \partial x / \partial y| = -\sum_j \log |h'_j(x_j)|, \quad h = \phi(x^{(P-1)}),

: :math:`P` conditioner calls per layer instead of :math:`P + 1`. The first pass starts from
:math:`x^{(0)} = 0`, the same in every row, so it is evaluated on a single zero row that broadcasts
against the rows of ``y`` (and against per-row context, which zuko's masked conditioner concatenates
after broadcasting). This relies on the conditioner treating rows independently, as an MLP does; the
parameters it gives the first block are those of the generic path bit for bit, since they see no
feature of :math:`x` (masked weights are exact zeros).

**Composition** (:class:`zuko.transforms.ComposedTransform`), :math:`f = f_n \circ \dots \circ f_1`:
the inverse applies :math:`f_n^{-1}` first and the log-determinants add up,
:math:`\log|\det \partial g/\partial y| = \sum_i \log|\det \partial f_i^{-1}/\partial y_i|`, each term summed
over the event dimensions it does not already cover, as ``ComposedTransform.call_and_ladj`` does.

Any other layer falls back to its own ``layer.inv.call_and_ladj``: correct, just not fused.

Only public objects are used: a layer is inverted from its forward transform (``split``, ``merge``,
``meta``, ``passes``) and the elementwise map ``h`` is inverted with ``h.inv.call_and_ladj``, which is
what the generic path computes for it. No private torch class (``_InverseTransform``) is needed
because the walk starts from the forward transform and never looks at an inverse wrapper.
"""

from __future__ import annotations

from torch import Tensor
from torch.distributions import Transform
from zuko.transforms import AutoregressiveTransform, ComposedTransform, CouplingTransform

__all__ = ["inverse_and_ladj"]


def inverse_and_ladj(transform: Transform, y: Tensor) -> tuple[Tensor, Tensor]:
    r"""``(x, ladj)`` with :math:`x = f^{-1}(y)` and :math:`\text{ladj} = \log|\det \partial f^{-1}/\partial y|`.

    Arguments:
        transform: the *forward* transform :math:`f` (e.g. ``flow(context).transform``), not its inverse.
        y: points in the codomain of :math:`f`, shape ``(*, D)``.

    Returns:
        The same pair as ``transform.inv.call_and_ladj(y)``, computing each coupling layer's
        conditioner once and each autoregressive layer's ``passes`` times instead of ``passes + 1``.
    """
    if isinstance(transform, ComposedTransform):
        return _composed(transform, y)
    if isinstance(transform, CouplingTransform):
        return _coupling(transform, y)
    if isinstance(transform, AutoregressiveTransform):
        return _autoregressive(transform, y)
    return transform.inv.call_and_ladj(y)


def _composed(transform: ComposedTransform, y: Tensor) -> tuple[Tensor, Tensor]:
    """Invert the layers last to first; sum each log-determinant over the event dims it leaves."""
    event_dim = transform.codomain_dim
    acc: Tensor | int = 0
    for layer in reversed(transform.transforms):
        y, ladj = inverse_and_ladj(layer, y)
        acc = acc + _sum_rightmost(ladj, event_dim - layer.codomain.event_dim)
        event_dim += layer.domain.event_dim - layer.codomain.event_dim
    return y, acc  # type: ignore[return-value]


def _coupling(layer: CouplingTransform, y: Tensor) -> tuple[Tensor, Tensor]:
    r""":math:`x_a = y_a`, :math:`h = \phi(y_a)`, :math:`(x_b, \text{ladj}) = h^{-1}(y_b)` with its log-determinant."""
    y_a, y_b = layer.split(y)
    x_b, ladj = layer.meta(y_a).inv.call_and_ladj(y_b)
    return layer.merge(y_a, x_b, y.shape), ladj


def _autoregressive(layer: AutoregressiveTransform, y: Tensor) -> tuple[Tensor, Tensor]:
    r"""``passes - 1`` fixed-point passes, then one that also yields :math:`-\log|\det J_h|`."""
    x = y.new_zeros((1,) * (y.dim() - 1) + y.shape[-1:])
    for _ in range(layer.passes - 1):
        x = layer.meta(x).inv(y)
    x, ladj = layer.meta(x).inv.call_and_ladj(y)
    return x, ladj


def _sum_rightmost(value: Tensor | int, dims: int) -> Tensor | int:
    """Sum ``value`` over its ``dims`` rightmost dimensions (none when ``dims <= 0``)."""
    if dims <= 0 or not isinstance(value, Tensor):
        return value
    return value.sum(dim=tuple(range(-dims, 0)))
