"""The rules the API's input must keep, written once, checked at the edge.

Used by the HTTP codecs (:mod:`service.http.codecs.rows` for JSON and binary bodies, the v1
operations for context and their scalar parameters, /v2's ``parameters.alpha``), by the in-process
runner (:mod:`service.serving.inprocess`, the CLI's and the bench's way in without a server) and by
the CLI's options. Each refusal is an
:class:`~service.serving.errors.InvalidInput` (400), :class:`~service.serving.errors.InvalidField`
(422) or :class:`~service.serving.errors.TooManyRows` (413) naming the field, row and column at
fault; the HTTP layer answers them through its status table, the CLI prints their detail (they
are ``ValueError`` s). Inside the edge nothing checks input again: the device worker and the model
keep only their shape contract (:mod:`service.model.contract`), whose violation is a bug.

The rules: rows are a 2-D array of real numbers, one column per feature name, at least one row
and at most the server's ``max_rows``, every value finite; a conditional model needs context (one
column per context name, one row per row, or one row for all where the operation broadcasts it),
an unconditional one takes none. The scalar parameters (``alpha`` in (0, 1); a sample's
``n >= 1``, ``temperature > 0`` and seed in ``[0, 2**64 - 1]``) are the pydantic models of
:mod:`service.serving.parameters`, checked here by :func:`parameters` (and its shorthands
:func:`check_alpha`, :func:`check_sample`) into the same :class:`InvalidField` wherever they come from.
"""

from __future__ import annotations

from typing import Any, Callable, Collection, Mapping, Sequence, TypeVar

import numpy as np
from pydantic import BaseModel, ValidationError

from service.serving.errors import MAX_ERRORS, InvalidField, InvalidInput, TooManyRows, field_error
from service.serving.parameters import SampleParams, ScoreParams

__all__ = [
    "array_rows",
    "check_alpha",
    "check_sample",
    "context_rows",
    "describe_names",
    "finite",
    "parameters",
    "row_count",
    "takes_context",
    "where",
    "width_error",
]

_BODY = "body"
P = TypeVar("P", bound=BaseModel)


def describe_names(names: Sequence[str]) -> str:
    """``['x0', 'x1']`` in full, or a short range for long lists."""
    if len(names) <= 8:
        return "[" + ", ".join(repr(n) for n in names) + "]"
    return f"[{names[0]!r}, {names[1]!r}, ..., {names[-1]!r}]"


def where(loc: Sequence[Any]) -> str:
    """An error location in words: ``["body", "inputs", 3, 1]`` is ``inputs row 3 column 1``."""
    parts = list(loc[1:])
    text = str(parts[0]) if parts else "body"
    if len(parts) > 1:
        text += f" row {parts[1]}"
    if len(parts) > 2:
        text += f" column {parts[2]}" if isinstance(parts[2], int) else f" key {parts[2]!r}"
    return text


def _kind(field: str) -> str:
    return "context features" if field == "context" else "features"


def row_count(rows: int, field: str, max_rows: int | None = None) -> None:
    """At least one row (422), at most ``max_rows`` (413)."""
    if rows < 1:
        raise InvalidField(f"{field} must hold at least one row", [field_error((_BODY, field), "expected at least one row")])
    if max_rows is not None and rows > max_rows:
        raise TooManyRows(f"{field} has {rows} rows; this server takes at most {max_rows} per request",
                          [field_error((_BODY, field), f"at most {max_rows} rows")])


def width_error(field: str, names: Sequence[str], got: int) -> InvalidInput:
    """Rows of ``got`` values where the model has ``len(names)`` features (400)."""
    msg = f"each row has {got} values; the model has {len(names)} {_kind(field)} {describe_names(names)}"
    return InvalidInput(f"{field}: {msg}", [field_error((_BODY, field), msg)])


def finite(arr: np.ndarray, names: Sequence[str], field: str, value: Any = None) -> np.ndarray:
    """``arr`` if every value is finite; else 400 naming the first :data:`MAX_ERRORS` non-finite ones.

    ``value`` is the JSON the array came from (a list of rows or records), to name ``null`` and keys.
    """
    bad = ~np.isfinite(arr)
    if not bad.any():
        return arr
    records = isinstance(value, list) and value and isinstance(value[0], dict)
    errors = []
    for i, j in np.argwhere(bad)[:MAX_ERRORS]:
        i, j = int(i), int(j)
        col: str | int = names[j] if records else j
        original = value[i][col] if isinstance(value, list) else None
        what = "null is not a number" if original is None and isinstance(value, list) else f"{arr[i, j]} is not finite"
        errors.append(field_error((_BODY, field, i, col), f"{what}: data must be finite numbers"))
    first = errors[0]
    raise InvalidInput(f"{where(first['loc'])}: {first['msg']} ({int(bad.sum())} non-finite values)", errors)


def array_rows(arr: np.ndarray, names: Sequence[str], field: str, max_rows: int | None = None) -> np.ndarray:
    """``arr`` as a finite ``(B, len(names))`` float64 array, or the refusal that names what is wrong."""
    if arr.ndim != 2:
        raise InvalidInput(f"{field} must be 2-D (rows, {len(names)}), got shape {arr.shape}",
                           [field_error((_BODY, field), f"expected 2 dimensions, got {arr.ndim}")])
    if arr.dtype.kind not in "fiub":
        raise InvalidInput(f"{field} must hold numbers, got dtype {arr.dtype}",
                           [field_error((_BODY, field), f"unsupported dtype {arr.dtype}")])
    row_count(arr.shape[0], field, max_rows)
    if arr.shape[1] != len(names):
        raise width_error(field, names, arr.shape[1])
    return finite(np.asarray(arr, dtype=np.float64), names, field, arr)


def takes_context(model: str, context_names: Sequence[str], given: bool, *, broadcast: bool = False,
                  hint: str = "") -> bool:
    """Whether to read context for ``model``: refused (400) when given to an unconditional model or
    missing for a conditional one. ``broadcast``: one row may stand for all; ``hint`` ends the
    missing-context message (how to send it in the request's format)."""
    if not context_names:
        if given:
            raise InvalidInput(f"model {model!r} is not conditional and takes no context",
                               [field_error((_BODY, "context"), "not accepted by this model; remove it")])
        return False
    if not given:
        raise InvalidInput(f"model {model!r} is conditional: context with {len(context_names)} values "
                           f"{describe_names(context_names)} is required" + ("" if broadcast else " for every row")
                           + hint, [field_error((_BODY, "context"), "required by this model")])
    return True


def context_rows(context: np.ndarray, rows: int, *, broadcast: bool = False) -> np.ndarray:
    """``context`` if it has one row per data row (or one row, where ``broadcast``); else 400."""
    if context.shape[0] != rows and not (broadcast and context.shape[0] == 1):
        expected = f"1 or {rows}" if broadcast else str(rows)
        raise InvalidInput(f"context has {context.shape[0]} rows; expected {expected}",
                           [field_error((_BODY, "context"), f"expected {expected} rows, got {context.shape[0]}")])
    return context


def parameters(model: type[P], fields: Mapping[str, Any], *, strict: bool = True, arrays: Collection[str] = (),
               place: Callable[[Any], str] = lambda key: _BODY) -> P:
    """``fields`` validated by ``model`` (one of :mod:`service.serving.parameters`); else 422.

    ``strict``: JSON types only (``False`` for query strings and Python callers); ``arrays``: the
    operation's array fields, named with the model's own when an unknown field is refused;
    ``place(key)``: where a field came from (``"body"`` or ``"query"``), the first part of each
    error's ``loc``. The detail is the first error: ``n: Input should be greater than or equal to 1``.
    """
    try:
        return model.model_validate(fields, strict=strict)
    except ValidationError as e:
        allowed = sorted(set(model.model_fields) | set(arrays))
        errors = []
        for err in e.errors():
            key = err["loc"][0] if err["loc"] else None
            msg = f"unknown field; this operation takes {allowed}" if err["type"] == "extra_forbidden" else err["msg"]
            errors.append(field_error((place(key), *err["loc"]), msg))
        first = errors[0]
        raise InvalidField(f"{'.'.join(map(str, first['loc'][1:]))}: {first['msg']}", errors) from None


def check_alpha(alpha: Any, *, strict: bool = False) -> float | None:
    """``alpha`` (``None``: the model's default) if :class:`ScoreParams` takes it; else 422."""
    return parameters(ScoreParams, {"alpha": alpha}, strict=strict).alpha


def check_sample(n: int, temperature: float, seed: int | None) -> None:
    """``n``, ``temperature`` and ``seed`` if :class:`SampleParams` takes them; else 422."""
    parameters(SampleParams, {"n": n, "temperature": temperature, "seed": seed}, strict=False)
