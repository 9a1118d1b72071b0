"""Rows of numbers from a parsed JSON body, as checked float64 arrays.

A field of rows is either a list of rows (``[[0.5, 1.0], ...]``) or a list of records keyed by
feature name (``[{"x0": 0.5, "x1": 1.0}, ...]``: every name required, no extras). The happy path is
vectorised: one ``np.asarray`` over the whole list (numpy discovers ragged rows and non-numbers as
it converts) and one ``np.isfinite``; only when that fails does a Python pass walk the rows to name
the offending row, column or key. JSON ``true`` / ``false`` count as 1 / 0 (handy for one-hot
context), as in pydantic's lax mode; ``null`` is not a number.

Refusals are the edge's domain errors (:mod:`service.serving.errors`), answered by the status
table :data:`service.http.problems.DOMAIN_ANSWERS`: a value of the wrong JSON type (a string, an
object) is :class:`InvalidField` (422); the wrong number of features, ragged rows, unknown or
missing feature names and non-finite values are :class:`InvalidInput` (400); more rows than the
server allows is :class:`TooManyRows` (413). The rules an array shares with the in-process runner
(shape, dtype, row count, finiteness) are :mod:`service.serving.validation`'s; this module adds
what only JSON has (rows or records, ``null``, strings, ragged lists).
"""

from __future__ import annotations

from operator import itemgetter
from typing import Any, Sequence

import numpy as np

from service.serving.errors import MAX_ERRORS, InvalidField, InvalidInput, field_error
from service.serving.validation import array_rows, describe_names, finite, row_count, where, width_error

__all__ = ["describe_names", "rows_array"]

_NUMBER_TYPES = (int, float, bool)
_BODY = "body"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return f"string {value[:20]!r}"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def rows_array(value: Any, names: Sequence[str], field: str, *, max_rows: int | None = None,
               single_row_ok: bool = False) -> np.ndarray:
    """Convert ``value`` (rows or records over ``names``) into a finite ``(B, len(names))`` float64 array.

    Arguments:
        value: the parsed JSON value of the field (or a numpy array from a binary body).
        names: the feature (or context) names, in column order.
        field: the field's name, for error locations (``inputs``, ``latents``, ``context``).
        max_rows: refuse more rows than this with 413.
        single_row_ok: also accept one bare row (a flat list of numbers or one record), as ``(1, D)``.

    Raises :class:`~service.serving.errors.InvalidInput` (or its subclasses) naming the field, row
    and column at fault.
    """
    width = len(names)
    if isinstance(value, np.ndarray):
        if single_row_ok and value.ndim == 1:
            value = value.reshape(1, -1)
        return array_rows(value, names, field, max_rows)
    if single_row_ok and (isinstance(value, dict) or (isinstance(value, list) and value
                                                       and isinstance(value[0], _NUMBER_TYPES + (type(None),)))):
        value = [value]
    if not isinstance(value, list):
        raise InvalidField(f"{field} must be a list of rows, got {_json_type(value)}",
                           [field_error((_BODY, field), f"expected a list of rows, got {_json_type(value)}")])
    row_count(len(value), field, max_rows)
    if isinstance(value[0], _NUMBER_TYPES) and all(isinstance(v, _NUMBER_TYPES) for v in value[:width + 1]):
        msg = (f"expected a list of rows, got a flat list of numbers; wrap each row in brackets, "
               f"e.g. [[{', '.join('...' for _ in names[:3])}{', ...' if width > 3 else ''}]]")
        raise InvalidInput(f"{field}: {msg}", [field_error((_BODY, field), msg)])
    if isinstance(value[0], dict):
        arr = _records(value, names, field)
    else:
        try:
            arr = np.asarray(value)
        except (ValueError, TypeError, OverflowError):
            arr = None
        if arr is None or arr.ndim != 2 or arr.dtype.kind not in "fiub":
            arr = _explain_lists(value, names, field)
        elif arr.shape[1] != width:
            raise width_error(field, names, arr.shape[1])
    return finite(np.asarray(arr, dtype=np.float64), names, field, value)


#: a problem's kind: a JSON value of the wrong type (422), or a number that breaks a rule (400)
_Kind = type[InvalidInput]
_TYPE, _RULE = InvalidField, InvalidInput


class _Errors:
    """The first :data:`MAX_ERRORS` problems found (with their kinds), and how many there were."""

    def __init__(self) -> None:
        self.items: list[tuple[_Kind, dict[str, Any]]] = []
        self.total = 0

    def add(self, kind: _Kind, loc: tuple[Any, ...], msg: str) -> None:
        self.total += 1
        if len(self.items) < MAX_ERRORS:
            self.items.append((kind, field_error(loc, msg)))


# -- records ---------------------------------------------------------------------------------------
def _records(value: list[Any], names: Sequence[str], field: str) -> np.ndarray:
    keys = frozenset(names)
    if all(type(r) is dict and r.keys() == keys for r in value):
        get = itemgetter(*names)
        rows = [get(r) for r in value] if len(names) > 1 else [(r[names[0]],) for r in value]
        try:
            arr = np.asarray(rows)
        except (ValueError, TypeError, OverflowError):
            arr = None
        if arr is not None and arr.ndim == 2 and arr.dtype.kind in "fiub":
            return arr
    return _explain_records(value, names, field)


def _explain_records(value: list[Any], names: Sequence[str], field: str) -> np.ndarray:
    keys = set(names)
    errors = _Errors()
    for i, row in enumerate(value):
        if type(row) is not dict:
            errors.add(_TYPE, (_BODY, field, i),
                       f"expected an object keyed by feature name (as row 0 is), got {_json_type(row)}")
            continue
        got = set(row)
        for key in sorted(got - keys):
            errors.add(_RULE, (_BODY, field, i, key), f"unknown feature name {key!r}; the names are {describe_names(names)}")
        for key in [n for n in names if n not in got]:
            errors.add(_RULE, (_BODY, field, i, key), f"missing feature {key!r}")
        for key in names:
            if key in row:
                _check_value(row[key], (_BODY, field, i, key), errors)
    return _raise_or(errors, field, value, names)


# -- lists of rows ---------------------------------------------------------------------------------
def _explain_lists(value: list[Any], names: Sequence[str], field: str) -> np.ndarray:
    width = len(names)
    errors = _Errors()
    kind = "context features" if field == "context" else "features"
    for i, row in enumerate(value):
        if not isinstance(row, list):
            if isinstance(row, dict):
                errors.add(_TYPE, (_BODY, field, i), "expected a list of numbers (rows and records cannot be mixed)")
            elif isinstance(row, _NUMBER_TYPES) and not isinstance(row, bool):
                errors.add(_RULE, (_BODY, field, i), f"expected a row (a list of {width} numbers), got a number")
            else:
                errors.add(_TYPE, (_BODY, field, i), f"expected a row (a list of {width} numbers), got {_json_type(row)}")
        elif len(row) != width:
            errors.add(_RULE, (_BODY, field, i),
                       f"row has {len(row)} values; the model has {width} {kind} {describe_names(names)}")
        else:
            for j, v in enumerate(row):
                _check_value(v, (_BODY, field, i, j), errors)
    return _raise_or(errors, field, value, names)


def _check_value(v: Any, loc: tuple[Any, ...], errors: _Errors) -> None:
    if v is None:
        errors.add(_RULE, loc, "null is not a number: data must be finite numbers")
    elif not isinstance(v, _NUMBER_TYPES):
        errors.add(_TYPE, loc, f"expected a number, got {_json_type(v)}")


def _raise_or(errors: _Errors, field: str, value: list[Any], names: Sequence[str]) -> np.ndarray:
    if errors.items:
        kind, first = errors.items[0]
        detail = f"{where(first['loc'])}: {first['msg']}"
        if errors.total > 1:
            shown = len(errors.items)
            detail += f" ({errors.total} problems in {field}" + (f"; the first {shown} are listed)" if shown < errors.total else ")")
        raise kind(detail, [e for _, e in errors.items])
    # nothing wrong found row by row (e.g. integers beyond int64): convert value by value
    try:
        if isinstance(value[0], dict):
            return np.asarray([[float(r[n]) for n in names] for r in value], dtype=np.float64)
        return np.asarray([[float(v) for v in row] for row in value], dtype=np.float64)
    except (ValueError, TypeError, OverflowError) as e:
        raise InvalidInput(f"{field} could not be read as numbers: {e}", [field_error((_BODY, field), str(e))]) from None
