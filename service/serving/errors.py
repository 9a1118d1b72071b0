"""The domain errors of serving: what a request can be refused with, in the service's own words.

Each class is one answer of the API, kept in one status table by the HTTP layer
(:data:`service.http.problems.DOMAIN_ANSWERS`, looked up along the exception's MRO as Starlette
looks up its exception handlers). The device worker's errors (:mod:`service.serving.batching.errors`)
and the registry's lookup errors are their packages' own vocabulary and sit in the same table.

Nothing else is a client's fault: inputs are validated at the edge (the HTTP codecs and
parameter models), so a ``ValueError`` (or an :class:`AssertionError`) raised inside serving is a
bug of the server, answered 500 and logged, never blamed on the client as a 400.
"""

from __future__ import annotations

__all__ = ["FlowserveError", "NoCalibration"]


class FlowserveError(Exception):
    """Base of the service's domain errors (each maps to one HTTP answer)."""


class NoCalibration(FlowserveError, ValueError):
    """The model version has no calibration set, so it cannot give anomaly p-values (409).

    Also a ``ValueError`` for the in-process runner's callers (the CLI); the status table finds
    this class first along the MRO, so it never falls to a generic rule.
    """
