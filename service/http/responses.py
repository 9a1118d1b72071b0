"""JSON answers: numpy-aware JSON with orjson (:func:`dumps`, :class:`NumpyJSONResponse`).

Arrays are written straight from numpy (``OPT_SERIALIZE_NUMPY``) in the model's dtype, so a
float32 model answers float32's shortest round-tripping decimals. The output is strict JSON:
orjson writes every non-finite float (NaN, +inf, -inf, e.g. the ``log_prob`` of a point far outside
the model's support) as ``null``. Used by the v1 routes' JSON answers and by the Open Inference
Protocol's (:mod:`service.http.codecs.v2_protocol`). The binary answers, ``.npy`` and ``.npz``, are
:mod:`service.http.codecs.binary`'s; which one a request gets is :mod:`service.http.codecs.negotiation`'s
choice from its ``Accept`` header.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
from starlette.responses import Response

__all__ = ["NumpyJSONResponse", "dumps"]

_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


def _default(obj: Any) -> Any:
    """What orjson cannot write natively: non-contiguous or exotic arrays, numpy scalars."""
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot encode {type(obj).__name__} as JSON")


def dumps(content: Any) -> bytes:
    """``content`` as strict JSON bytes; non-finite floats become ``null``."""
    return orjson.dumps(content, default=_default, option=_OPTIONS)


class NumpyJSONResponse(Response):
    """``application/json`` whose content may hold numpy arrays and scalars."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return dumps(content)
