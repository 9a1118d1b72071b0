"""The model's input contract, checked inside the edge: a violation is a bug of the caller.

A :class:`~service.model.density.DensityModel` takes rows ``(B, D)`` and, exactly when it is
conditional (``C > 0`` context features), context ``(B, C)``; an unconditional model takes no
context. Users never reach this check with their own mistakes: the edge (the HTTP codecs, and
:mod:`service.serving.validation` for the in-process runner) refuses them first with a message
naming the field, row and column. So :func:`check_rows` raises :class:`ContractError`, an
``AssertionError``: the API answers it 500 ``internal-error`` and logs it, the CLI shows its
traceback, and neither blames the input. It is the one written form of the rule inside the edge,
used by the model's passes and by the device worker before it batches a request with others.
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["ContractError", "check_rows"]


class ContractError(AssertionError):
    """Rows or context that do not have the model's shapes reached the model's side: a bug."""


def check_rows(features: int, context_features: int, rows: Sequence[int], context: Sequence[int] | None) -> None:
    """Check the shapes ``rows`` (``(B, D)``) and ``context`` (``(B, C)``, or ``None`` when ``C == 0``).

    Arguments are shapes (``tuple(array.shape)``, ``tensor.shape``), so the check is the same for
    numpy arrays and tensors and costs a few comparisons.
    """
    rows = tuple(rows)
    if len(rows) != 2 or rows[1] != features:
        raise ContractError(f"rows must have shape (n, {features}), got {rows}")
    if context_features:
        if context is None:
            raise ContractError(f"this model needs {context_features} context features per row")
        if tuple(context) != (rows[0], context_features):
            raise ContractError(f"context must have shape ({rows[0]}, {context_features}), got {tuple(context)}")
    elif context is not None:
        raise ContractError("this model takes no context")
