"""Typed errors: one :class:`FlowserveError` subclass per status the server answers with, each carrying
the server's RFC 9457 problem details (``status``, ``title``, ``detail``, ``errors``, ``problem``)."""

from __future__ import annotations

from typing import Any

import httpx

__all__ = [
    "BadRequest",
    "Conflict",
    "DeadlineExceeded",
    "FlowserveError",
    "Forbidden",
    "NotFound",
    "PayloadTooLarge",
    "ServiceUnavailable",
    "Unauthorized",
    "UnprocessableEntity",
    "UnsupportedMediaType",
    "raise_for",
]


class FlowserveError(Exception):
    """An error answer from the server, with its RFC 9457 problem details."""

    status: int = 0

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        self.status = status
        self.problem = problem
        self.title = str(problem.get("title", ""))
        self.detail = str(problem.get("detail", problem.get("error", "")))
        self.errors: list[dict[str, Any]] = list(problem.get("errors", []) or [])
        super().__init__(f"{status} {self.title}: {self.detail}".strip())


class BadRequest(FlowserveError):
    """400: malformed body, NaN, wrong number of features, ragged rows, unknown names."""


class Unauthorized(FlowserveError):
    """401: an API key is required."""


class Forbidden(FlowserveError):
    """403: the API key is wrong."""


class NotFound(FlowserveError):
    """404: unknown model or version."""


class Conflict(FlowserveError):
    """409: the operation does not fit the model (e.g. ``score`` on a model without a calibration set)."""


class PayloadTooLarge(FlowserveError):
    """413: body, rows or samples over the server's limits."""


class UnsupportedMediaType(FlowserveError):
    """415: content type the server does not take."""


class UnprocessableEntity(FlowserveError):
    """422: well-formed but invalid fields."""


class ServiceUnavailable(FlowserveError):
    """503: queue full or not ready (raised once retries are spent)."""


class DeadlineExceeded(FlowserveError):
    """504: the request's deadline passed before its batch ran."""


_ERRORS: dict[int, type[FlowserveError]] = {
    400: BadRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict, 413: PayloadTooLarge,
    415: UnsupportedMediaType, 422: UnprocessableEntity, 503: ServiceUnavailable, 504: DeadlineExceeded,
}


def raise_for(response: httpx.Response) -> None:
    """Raise the :class:`FlowserveError` subclass for an answer of status 400 or more; else nothing.

    The body is the problem document where it is a JSON object; otherwise (a proxy's HTML page, say)
    the reason phrase and the start of the text stand in for it.
    """
    if response.status_code < 400:
        return
    try:
        problem = response.json()
        if not isinstance(problem, dict):
            problem = {"detail": str(problem)}
    except ValueError:
        problem = {"title": response.reason_phrase, "detail": response.text[:500]}
    raise _ERRORS.get(response.status_code, FlowserveError)(response.status_code, problem)
