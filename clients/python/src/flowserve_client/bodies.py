"""Arrays to and from request and answer bodies: JSON-ready values, ``.npy`` / ``.npz`` bytes, records.

``.npy`` and ``.npz`` are numpy's own formats; they are written and read with ``allow_pickle=False``
(float arrays only), so no body is ever unpickled. An ``.npz`` answer names nested fields with dots
(``threshold.alpha``): :func:`decode` nests them back, as the JSON answer has them.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any, Union

import httpx
import numpy as np

__all__ = ["NPY", "NPZ", "Rows", "arrays", "as_rows", "decode", "float_rows", "jsonable", "npy_bytes",
           "npz_bytes", "records"]

#: rows as the client takes them: a 2-D array, a list of lists, or records keyed by feature name
Rows = Union[np.ndarray, Sequence[Sequence[float]], Sequence[Mapping[str, float]]]

NPZ = "application/x-npz"
NPY = "application/x-npy"


def npy_bytes(array: np.ndarray) -> bytes:
    """``array`` as an ``.npy`` file's bytes."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """``arrays`` as an (uncompressed) ``.npz`` file's bytes, one member per key."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # float arrays only: nothing is pickled
    return buf.getvalue()


def float_rows(rows: np.ndarray) -> np.ndarray:
    """``rows`` C-contiguous as float32 or float64 (other dtypes become float64)."""
    dtype = rows.dtype if rows.dtype in (np.float32, np.float64) else np.float64
    return np.ascontiguousarray(rows, dtype=dtype)


def _unflatten(members: dict[str, np.ndarray]) -> dict[str, Any]:
    """``.npz`` members by name, with dotted names (``threshold.alpha``) nested back into objects
    whose 0-d members become Python scalars, as the JSON answer has them."""
    out: dict[str, Any] = {}
    for key, value in members.items():
        head, dot, rest = key.partition(".")
        if not dot:
            out[key] = value
            continue
        inner = out.setdefault(head, {})
        if isinstance(inner, dict):
            inner[rest] = value.item() if value.ndim == 0 else value
    return out


def decode(response: httpx.Response) -> Any:
    """The answer by its content type: ``.npz`` as a dict of arrays, ``.npy`` as one array, else JSON."""
    media = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media == NPZ:
        with np.load(io.BytesIO(response.content), allow_pickle=False) as npz:
            return _unflatten({k: npz[k] for k in npz.files})
    if media == NPY:
        return np.load(io.BytesIO(response.content), allow_pickle=False)
    return response.json()


def as_rows(rows: Rows | Mapping[str, float] | None) -> Any:
    """Numeric rows as a float array; records (dicts) are kept as they are for the JSON body."""
    if rows is None:
        return None
    if isinstance(rows, np.ndarray):
        return rows
    if isinstance(rows, Mapping):  # one record (e.g. the one context row of a sample request)
        return dict(rows)
    rows = list(rows)
    if rows and isinstance(rows[0], Mapping):
        return [dict(r) for r in rows]
    return np.asarray(rows, dtype=np.float64)


def jsonable(value: Any) -> Any:
    """``value`` as JSON can hold it (arrays as nested lists)."""
    return value.tolist() if isinstance(value, np.ndarray) else value


def arrays(answer: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """The listed fields as float64 arrays (a JSON ``null``, a non-finite value, becomes NaN);
    other array fields of a binary answer (0-d ones, e.g. ``seed``) as Python scalars."""
    out = {k: (v.item() if isinstance(v, np.ndarray) and v.ndim == 0 else v) for k, v in answer.items()}
    for key in keys:
        if out.get(key) is not None:
            out[key] = np.asarray(out[key], dtype=np.float64)
    return out


def records(rows: np.ndarray, names: Sequence[str]) -> list[dict[str, float]]:
    """Rows ``(B, D)`` as records keyed by ``names`` (e.g. ``card(name)["feature_names"]``)."""
    arr = np.asarray(rows, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != len(names):
        raise ValueError(f"rows of shape {arr.shape} do not fit {len(names)} names")
    return [dict(zip(names, row)) for row in arr.tolist()]
