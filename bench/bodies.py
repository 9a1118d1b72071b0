"""Request bodies the harness sends: JSON the way a client writes it, and ``.npy``.

JSON numbers are written as a Python client would (``json.dumps`` of float64 values: shortest
round-trip repr, up to 17 significant digits); ``.npy`` bodies are ``np.save`` of the rows in the
model's dtype.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import orjson

__all__ = ["json_body", "npy_body", "rows_json"]


def json_body(payload: dict[str, Any]) -> bytes:
    """``payload`` as JSON; numpy arrays become lists of float64 numbers."""
    return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)


def rows_json(rows: np.ndarray, **fields: Any) -> bytes:
    """``{"inputs": rows, **fields}`` with the rows as float64 numbers."""
    return json_body({"inputs": np.ascontiguousarray(rows, dtype=np.float64), **fields})


def npy_body(rows: np.ndarray) -> bytes:
    """The rows as a ``.npy`` file."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(rows), allow_pickle=False)
    return buf.getvalue()
