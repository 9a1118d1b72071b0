"""The domain errors of serving: what a request can be refused with, in the service's own words.

Each concrete class is one answer of the API, kept in one status table by the HTTP layer
(:data:`service.http.problems.DOMAIN_ANSWERS`, looked up along the exception's MRO as Starlette
looks up its exception handlers). The families of the other packages derive from
:class:`FlowserveError` and sit in the same table: the device worker's
(:mod:`service.serving.batching.errors`), the registry's lookups (:mod:`service.serving.registry`),
administration's refusals (:mod:`service.serving.administration`) and the API keys'
(:mod:`service.http.auth`). Each error carries the data its answer needs (``retry_after`` for
Retry-After, ``realm`` for WWW-Authenticate, ``errors`` for the offending places); none knows its
status.

:class:`InvalidInput` and its subclasses are raised only at the edge (the HTTP codecs, and
:mod:`service.serving.validation` for the in-process runner): nothing else is a client's fault, so
a ``ValueError`` (or an :class:`AssertionError`) raised inside serving is a bug of the server,
answered 500 and logged, never blamed on the client as a 400.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

__all__ = [
    "FAILED_RETRY_S",
    "LOADING_RETRY_S",
    "MAX_ERRORS",
    "FlowserveError",
    "InvalidField",
    "InvalidInput",
    "NoCalibration",
    "NotReady",
    "TooManyRows",
    "field_error",
]

#: seconds a client should wait (Retry-After) while the server or a model loads
LOADING_RETRY_S = 5.0
#: ... after a model failed to load (it will not be ready before someone reloads it)
FAILED_RETRY_S = 30.0
#: most entries an ``errors`` list carries (the detail says how many more there were)
MAX_ERRORS = 20

Loc = Sequence[str | int]


def field_error(loc: Loc, msg: str) -> dict[str, Any]:
    """One ``errors`` entry: ``{"loc": [...], "msg": ...}`` (``loc`` as FastAPI writes it, e.g.
    ``["body", "inputs", 3, 1]``: row 3, column 1 of ``inputs``)."""
    return {"loc": list(loc), "msg": msg}


class FlowserveError(Exception):
    """Base of the service's domain errors (each concrete class maps to one HTTP answer)."""


class NoCalibration(FlowserveError, ValueError):
    """The model version has no calibration set, so it cannot give anomaly p-values (409).

    Also a ``ValueError`` for the in-process runner's callers (the CLI); the status table finds
    this class first along the MRO, so it never falls to a generic rule.
    """


class NotReady(FlowserveError):
    """The server, or the model asked for, cannot answer yet; retry after ``retry_after`` seconds (503)."""

    def __init__(self, message: str, retry_after: float = LOADING_RETRY_S) -> None:
        super().__init__(message)
        self.retry_after = float(retry_after)


class InvalidInput(FlowserveError, ValueError):
    """Input that breaks a rule of the API, found at the edge (400): ``detail`` says what and where,
    ``errors`` lists the offending places (:func:`field_error`), at most :data:`MAX_ERRORS` of them.

    Also a ``ValueError``, so that the in-process runner's callers (the CLI) print its detail.
    """

    def __init__(self, detail: str, errors: Iterable[dict[str, Any]] = ()) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = list(errors)


class InvalidField(InvalidInput):
    """A field of the wrong kind (a string where rows go, no rows at all): 422."""


class TooManyRows(InvalidInput):
    """More rows than the server takes in one request: 413."""
