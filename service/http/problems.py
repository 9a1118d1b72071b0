"""Every error the API answers, as ``application/problem+json`` (RFC 9457).

A problem is ``{"type", "title", "status", "detail"}`` and, for invalid input,
``"errors": [{"loc", "msg"}]`` where ``loc`` names the offending place the way FastAPI does:
``["body", "inputs", 3, 1]`` is row 3, column 1 of ``inputs``; ``["body", "inputs", 3, "x1"]`` is
the key ``x1`` of record 3; ``["path", "version"]`` a path parameter.

| status | ``type`` (``urn:flowserve:problem:...``)     | when                                       |
|--------|----------------------------------------------|--------------------------------------------|
| 400    | ``malformed-json``, ``malformed-npy``, ``invalid-input`` | unparseable body; NaN/inf, ragged rows, wrong feature count, unknown or missing feature names, bad context |
| 401    | ``unauthorized``                             | no ``Bearer`` key where the endpoint needs one (``WWW-Authenticate``) |
| 403    | ``forbidden``, ``admin-disabled``            | a key that is not the endpoint's; ``/v1/admin`` without ``FLOWSERVE_ADMIN_KEY`` |
| 404    | ``model-not-found``, ``version-not-found``, ``not-found`` | unknown model, version or path   |
| 405    | ``method-not-allowed``                       | e.g. GET on an operation (``Allow`` says which) |
| 406    | ``not-acceptable``                           | an ``Accept`` header that takes none of JSON, ``.npy``, ``.npz`` |
| 409    | ``no-calibration``, ``load-failed``          | ``score`` without a calibration set; an admin (re)load whose versions do not load |
| 413    | ``content-too-large``, ``wont-finish``       | body over ``max_body_bytes``; rows over ``max_rows``; ``n`` over ``max_samples``; rows that at the measured throughput cannot be computed before the deadline |
| 415    | ``unsupported-media-type``                   | a ``Content-Type`` the endpoint does not read |
| 422    | ``invalid-field``                            | well-formed but invalid fields: ``n < 1``, ``temperature <= 0``, ``alpha`` outside (0, 1), wrong types, unknown fields |
| 503    | ``queue-full``, ``not-ready``, ``draining``  | with ``Retry-After`` (seconds)             |
| 504    | ``deadline-exceeded``                        | the request's deadline passed before its batch ran (never computed) |
| 500    | ``compute-failed``, ``internal-error``       | a fault of the server, never of the input  |

Framework errors (unknown routes, wrong methods, invalid path parameters) and unexpected
exceptions take the same shape through the handlers :func:`install` registers.

The domain errors (:class:`service.serving.errors.FlowserveError`: edge validation, API keys,
registry lookups and readiness, administration, the device worker, the operations) become
answers through one status table, :data:`DOMAIN_ANSWERS`, looked up along the exception's MRO
(:func:`domain_problem`): ``/v1`` answers them as problem+json, ``/v2`` as ``{"error"}`` with the
same status, detail and headers. A ``ValueError`` is deliberately not in it: inputs are validated
at the edge, so one raised inside serving is a bug (500 ``internal-error``, logged), not the
client's 400.
"""

from __future__ import annotations

import logging
import math
from http import HTTPStatus
from typing import Any, Callable, Iterable

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from service.http.auth import AdminDisabled, Forbidden, Unauthorized
from service.serving.administration import InvalidName, LoadFailed, NotInRepository
from service.serving.batching import ComputeError, DeadlineExceeded, QueueFull, WontFinish, WorkerStopped
from service.serving.errors import (
    MAX_ERRORS,
    InvalidField,
    InvalidInput,
    NoCalibration,
    NotReady,
    TooManyRows,
    field_error,
)
from service.serving.registry import ModelNotFound, VersionNotFound

__all__ = [
    "DOMAIN_ANSWERS",
    "MAX_ERRORS",
    "PROBLEM_JSON",
    "Problem",
    "ProblemResponse",
    "domain_problem",
    "field_error",
    "install",
    "problem_type",
]

log = logging.getLogger("flowserve.api")

PROBLEM_JSON = "application/problem+json"
TYPE_PREFIX = "urn:flowserve:problem:"


def problem_type(slug: str) -> str:
    return TYPE_PREFIX + slug


class Problem(Exception):
    """An HTTP error answer; raise it anywhere in a handler.

    Arguments:
        status: the HTTP status.
        slug: the last part of ``type`` (see the module table).
        detail: one human sentence about this occurrence.
        errors: ``[{"loc", "msg"}]`` for invalid input (cut to :data:`MAX_ERRORS`).
        headers: extra headers (``Retry-After``, ``Allow``).
        extra: further members (RFC 9457 extensions), e.g. ``models`` on ``/readyz``.
    """

    def __init__(self, status: int, slug: str, detail: str, *, errors: Iterable[dict[str, Any]] | None = None,
                 headers: dict[str, str] | None = None, title: str | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(detail)
        self.status = int(status)
        self.slug = slug
        self.detail = detail
        self.title = title or _phrase(self.status)
        errs = list(errors) if errors is not None else None
        if errs is not None and len(errs) > MAX_ERRORS:
            self.detail = f"{detail} ({len(errs)} problems; the first {MAX_ERRORS} are listed)"
            errs = errs[:MAX_ERRORS]
        self.errors = errs
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})

    @classmethod
    def unavailable(cls, slug: str, detail: str, retry_after: float = 1.0, **kw: Any) -> "Problem":
        """A 503 with ``Retry-After`` rounded up to whole seconds (at least 1)."""
        seconds = max(1, math.ceil(retry_after)) if math.isfinite(retry_after) else 1
        headers = {"Retry-After": str(seconds), **kw.pop("headers", {})}
        return cls(503, slug, detail, headers=headers, **kw)

    def body(self, instance: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"type": problem_type(self.slug), "title": self.title,
                               "status": self.status, "detail": self.detail}
        if instance:
            out["instance"] = instance
        if self.errors is not None:
            out["errors"] = self.errors
        out.update(self.extra)
        return out

    def response(self, instance: str | None = None) -> "ProblemResponse":
        return ProblemResponse(self.body(instance), status_code=self.status, headers=self.headers)


class ProblemResponse(Response):
    """``application/problem+json``, encoded with orjson."""

    media_type = PROBLEM_JSON

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, default=str)


#: RFC 9110's names where Python's http module still has the older ones
_TITLES = {413: "Content Too Large", 422: "Unprocessable Content"}


def _phrase(status: int) -> str:
    if status in _TITLES:
        return _TITLES[status]
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


# -- the domain errors' status table --------------------------------------------------------------
def _queue_full(exc: Any, settings: Any, timeout_s: float | None) -> Problem:
    why = f": {exc.reason}" if exc.reason else ""
    return Problem.unavailable("queue-full", f"the server's queue is full ({settings.max_queue_rows} rows){why}; "
                               "retry later or send fewer rows", exc.retry_after)


def _wont_finish(exc: Any, settings: Any, timeout_s: float | None) -> Problem:
    return Problem(413, "wont-finish", f"{exc}; split the request into smaller ones, or raise "
                   f"FLOWSERVE_REQUEST_TIMEOUT_S (now {settings.request_timeout_s:g} s)")


def _draining(exc: Any, settings: Any, timeout_s: float | None) -> Problem:
    return Problem.unavailable("draining", f"the server is shutting down and runs no new work: {exc}", 1.0)


def _deadline(exc: Any, settings: Any, timeout_s: float | None) -> Problem:
    within = f" ({timeout_s:g} s)" if timeout_s is not None else ""
    return Problem(504, "deadline-exceeded",
                   f"the request's deadline{within} passed before its rows were computed; they were not computed")


def _compute_failed(exc: Any, settings: Any, timeout_s: float | None) -> Problem:
    return Problem(500, "compute-failed", f"the model failed to compute these rows: {exc}")


def _no_calibration(exc: Any, settings: Any, timeout_s: float | None) -> Problem:
    return Problem(409, "no-calibration", str(exc))


def _not_ready(exc: Any, settings: Any, timeout_s: float | None) -> Problem:
    return Problem.unavailable("not-ready", str(exc), exc.retry_after)


def _invalid(status: int, slug: str) -> Callable[[Any, Any, float | None], Problem]:
    def answer(exc: Any, settings: Any, timeout_s: float | None) -> Problem:
        return Problem(status, slug, exc.detail, errors=exc.errors)

    return answer


def _model_not_found(exc: Any, settings: Any, timeout_s: float | None) -> Problem:
    return Problem(404, "model-not-found", f"no model named {exc.name!r}; this server has {exc.available}",
                   errors=[field_error(("path", "name"), "unknown model")])


def _version_not_found(exc: Any, settings: Any, timeout_s: float | None) -> Problem:
    return Problem(404, "version-not-found",
                   f"model {exc.name!r} has no version {str(exc.version)!r}; its versions are {exc.available}",
                   errors=[field_error(("path", "version"), "unknown version")])


def _invalid_name(exc: Any, settings: Any, timeout_s: float | None) -> Problem:
    return Problem(400, "invalid-input", str(exc), errors=[field_error(("path", "name"), "not a model name")])


def _not_in_repository(exc: Any, settings: Any, timeout_s: float | None) -> Problem:
    return Problem(404, "model-not-found", str(exc), errors=[field_error(("path", "name"), "not in the repository")])


def _load_failed(exc: Any, settings: Any, timeout_s: float | None) -> Problem:
    return Problem(409, "load-failed", str(exc), extra={"serving": exc.serving})


def _unauthorized(exc: Any, settings: Any, timeout_s: float | None) -> Problem:
    return Problem(401, "unauthorized", str(exc), headers={"WWW-Authenticate": f'Bearer realm="{exc.realm}"'})


def _refused(slug: str) -> Callable[[Any, Any, float | None], Problem]:
    def answer(exc: Any, settings: Any, timeout_s: float | None) -> Problem:
        return Problem(403, slug, str(exc))

    return answer


#: domain error class -> its answer, given the exception, the server's settings and the request's
#: timeout in seconds (``None`` where the request set its own, as /v2's ``timeout``); a subclass
#: without a row of its own takes its nearest base's (``ModelNotReady`` and ``StillLoading`` are
#: ``NotReady``)
DOMAIN_ANSWERS: dict[type[Exception], Callable[[Any, Any, float | None], Problem]] = {
    # edge validation (service.http.codecs, service.serving.validation)
    InvalidInput: _invalid(400, "invalid-input"),            # 400 invalid-input, errors
    InvalidField: _invalid(422, "invalid-field"),            # 422 invalid-field, errors
    TooManyRows: _invalid(413, "content-too-large"),         # 413 content-too-large, errors
    # API keys (service.http.auth)
    Unauthorized: _unauthorized,                             # 401 unauthorized, WWW-Authenticate
    Forbidden: _refused("forbidden"),                        # 403 forbidden
    AdminDisabled: _refused("admin-disabled"),               # 403 admin-disabled
    # lookups (service.serving.registry) and readiness
    ModelNotFound: _model_not_found,                         # 404 model-not-found
    VersionNotFound: _version_not_found,                     # 404 version-not-found
    NotReady: _not_ready,                                    # 503 not-ready, Retry-After
    # administration (service.serving.administration)
    InvalidName: _invalid_name,                              # 400 invalid-input
    NotInRepository: _not_in_repository,                     # 404 model-not-found
    LoadFailed: _load_failed,                                # 409 load-failed, serving
    # the device worker (service.serving.batching)
    QueueFull: _queue_full,                                  # 503 queue-full, Retry-After
    WontFinish: _wont_finish,                                # 413 wont-finish
    WorkerStopped: _draining,                                # 503 draining, Retry-After: 1
    DeadlineExceeded: _deadline,                             # 504 deadline-exceeded
    ComputeError: _compute_failed,                           # 500 compute-failed
    # the operations (service.serving.operations)
    NoCalibration: _no_calibration,                          # 409 no-calibration
}


def domain_problem(exc: BaseException, settings: Any, timeout_s: float | None = None) -> Problem | None:
    """The answer of :data:`DOMAIN_ANSWERS` for ``exc`` (first class along its MRO), or ``None``."""
    for cls in type(exc).__mro__:
        answer = DOMAIN_ANSWERS.get(cls)
        if answer is not None:
            return answer(exc, settings, timeout_s)
    return None


# -- handlers ------------------------------------------------------------------------------------
_HTTP_SLUGS = {404: "not-found", 405: "method-not-allowed", 413: "content-too-large", 415: "unsupported-media-type"}


async def _problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Problem)
    return exc.response(request.url.path)


async def _http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    detail = exc.detail if isinstance(exc.detail, str) else _phrase(status)
    if status == 404 and detail == "Not Found":
        detail = f"no route {request.method} {request.url.path}; see /docs for the API"
    elif status == 405:
        allowed = (exc.headers or {}).get("Allow") or (exc.headers or {}).get("allow")
        detail = f"{request.method} is not allowed on {request.url.path}" + (f"; use {allowed}" if allowed else "")
    slug = _HTTP_SLUGS.get(status, "http-error")
    return Problem(status, slug, detail, headers=dict(exc.headers or {})).response(request.url.path)


async def _validation(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = [field_error(tuple(e.get("loc", ())), str(e.get("msg", "invalid"))) for e in exc.errors()]
    where = ", ".join(".".join(str(p) for p in e["loc"]) for e in errors[:3])
    return Problem(422, "invalid-field", f"invalid request: {where}", errors=errors).response(request.url.path)


async def _domain(request: Request, exc: Exception) -> Response:
    settings = request.app.state.flowserve.settings
    problem = domain_problem(exc, settings, settings.request_timeout_s)
    assert problem is not None, f"{type(exc).__name__} is installed but not in DOMAIN_ANSWERS"
    return problem.response(request.url.path)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return Problem(500, "internal-error", "the server failed to answer; this is a bug, please report it").response(
        request.url.path
    )


def install(app: FastAPI) -> None:
    """Register the problem+json handlers for our errors, FastAPI's and Starlette's."""
    app.add_exception_handler(Problem, _problem)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(RequestValidationError, _validation)
    for cls in DOMAIN_ANSWERS:
        app.add_exception_handler(cls, _domain)
    app.add_exception_handler(Exception, _unexpected)
