"""The Open Inference Protocol (KServe v2): ``/v2`` for Triton's and KServe's clients, unchanged.

| method, path                                   | answer                                                   |
|------------------------------------------------|----------------------------------------------------------|
| GET  /v2                                       | ``{"name": "flowserve", "version", "extensions"}``       |
| GET  /v2/health/live                           | 200 ``{"live": true}``                                   |
| GET  /v2/health/ready                          | 200 ``{"ready": true}``; 503 while not ready             |
| GET  /v2/models/{name}[/versions/{v}]          | model metadata (below)                                   |
| GET  /v2/models/{name}[/versions/{v}]/ready    | 200 ``{"name", "ready": true}``; 404 unknown, 503 loading |
| POST /v2/models/{name}[/versions/{v}]/infer    | the answer of :mod:`service.http.codecs.v2_protocol`             |

The server metadata lists the ``binary_tensor_data`` extension. Where the server sets API keys,
the ``/v2/models`` routes need one (as ``/v1/models``); ``/v2`` and its health routes stay open.

A model takes input ``x`` (``[-1, D]``, FP32 or FP64; its metadata names the model's own dtype)
and, when conditional, ``context`` (``[-1, C]``); it gives ``log_prob`` ``[-1]`` and, when asked
for in ``outputs``, ``latents`` ``[-1, D]`` and ``log_det`` ``[-1]`` (all in the model's dtype,
the fields of the ``inverse`` operation of :data:`service.serving.table.TABLE`). A model with a
calibration set also gives the ``score`` operation's fields: ``score`` ``[-1]`` (model dtype),
``p_value`` ``[-1]`` (FP64), ``is_anomaly`` ``[-1]`` (BOOL) and ``threshold`` ``[1]`` (FP64, the
log-density below which rows are flagged), at the significance level of the request's
``parameters.alpha`` (default: the model's ``anomaly_alpha``); asked of a model without one they
answer 409. A request that names no outputs gets ``log_prob`` only. Every answer is the encode
pass of :mod:`service.serving.operations` (``inverse`` and, for the score outputs, ``score``; both
when both kinds are asked for), so these rows share batches with ``/v1``'s and give the same numbers.

Errors are ``{"error": "..."}`` (never problem+json): the routes here use :class:`V2Route`, which
turns every exception of a handler (and of its dependencies) into that shape, and the catch-all
routes at the end answer unknown ``/v2`` paths (404) and wrong methods (405) the same way. 400 for
input that breaks the protocol or does not fit the model, 401 / 403 without a valid API key (where
keys are set), 404 unknown model or version, 413 over the size limits, 415 unknown
``Content-Encoding``, 503 (``Retry-After``) not ready or queue full, 504 deadline passed. Keep new
``/v2`` routes above the catch-alls.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Coroutine

import numpy as np
from fastapi import APIRouter, Depends, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Match

from service.serving import validation
from service.serving.errors import InvalidField
from service.serving.registry import ServedModel
from service.serving.table import INVERSE, LOG_PROB, SCORE, Operation
from service.http.auth import require_api_key
from service.http.codecs.bodies import OFF_LOOP_BYTES, off_loop, read_body
from service.http.problems import Problem, domain_problem
from service.http.responses import NumpyJSONResponse
from service.http.state import LOADING_RETRY_S, ServiceState, get_state
from service.http.codecs.v2_protocol import (
    BINARY_EXTENSION,
    DATATYPES,
    HEADER_LENGTH,
    InferRequest,
    RequestedOutput,
    V2Error,
    bad,
    decode_content,
    encode_infer_response,
    parse_infer_request,
)

__all__ = ["OUTPUTS", "OUTPUT_OPERATIONS", "PLATFORM", "SCORE_OUTPUTS", "V2Route", "router"]

log = logging.getLogger("flowserve.api")

#: the model metadata's ``platform``
PLATFORM = "flowserve-zuko"
#: output -> the operation of the table whose field it is, in metadata order
OUTPUT_OPERATIONS: dict[str, Operation] = {"log_prob": LOG_PROB, "latents": INVERSE, "log_det": INVERSE,
                                           "score": SCORE, "p_value": SCORE, "is_anomaly": SCORE,
                                           "threshold": SCORE}
#: the outputs every model gives, in metadata order
OUTPUTS = tuple(name for name, op in OUTPUT_OPERATIONS.items() if not op.needs_calibration)
#: the outputs a model with a calibration set gives besides
SCORE_OUTPUTS = tuple(name for name, op in OUTPUT_OPERATIONS.items() if op.needs_calibration)
#: those a request gets when it names none
DEFAULT_OUTPUTS = ("log_prob",)
#: the request parameter that sets the score outputs' significance level
ALPHA = "alpha"
#: the input names
X, CONTEXT = "x", "context"

_DTYPES = {"float32": "FP32", "float64": "FP64"}
Handler = Callable[[Request], Coroutine[Any, Any, Response]]


def error_from(exc: Exception, settings: Any, timeout_s: float | None) -> V2Error:
    """The protocol's error for any exception a handler raised: a domain error's status, detail and
    headers come from the status table (:data:`service.http.problems.DOMAIN_ANSWERS`; ``timeout_s``
    is the request's deadline for its text, ``None`` where the request set its own)."""
    if isinstance(exc, V2Error):
        return exc
    problem = domain_problem(exc, settings, timeout_s)
    if problem is not None:  # lookups, readiness, API keys, the worker's refusals, no calibration
        return V2Error(problem.status, problem.detail, problem.headers)
    if isinstance(exc, Problem):  # from the shared parts: body limits
        return V2Error(exc.status, exc.detail, exc.headers)
    if isinstance(exc, RequestValidationError):
        where = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in exc.errors()[:3])
        return bad(f"invalid request: {where}")
    if isinstance(exc, StarletteHTTPException):
        return V2Error(exc.status_code, str(exc.detail), exc.headers)
    log.exception("unexpected error on a /v2 route", exc_info=exc)
    return V2Error(500, "the server failed to answer; this is a bug, please report it")


class V2Route(APIRoute):
    """An ``APIRoute`` whose every error is ``{"error": ...}`` (the app's handlers never see it)."""

    def get_route_handler(self) -> Handler:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:  # noqa: BLE001 - every error of the protocol has one shape
                settings = get_state(request).settings
                return error_from(exc, settings, settings.request_timeout_s).response()

        return route


router = APIRouter(tags=["Open Inference Protocol (v2)"], route_class=V2Route)

#: the model routes need an API key where the server sets them (as /v1/models); health and /v2 stay open
KEYED = [Depends(require_api_key)]
NAME = Path(..., description="The model's name.", examples=["moons"])
VERSION = Path(..., description="An integer version of the model.", examples=["1"])
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"description": f"{text} (`{{\"error\": \"...\"}}`, application/json)."}
    for status, text in ((400, "Bad input: protocol, datatype, shape, names, non-finite data"),
                         (401, "No API key, where the server sets them"), (403, "Not one of the API keys"),
                         (404, "Unknown model or version"), (413, "Body or rows over the configured limits"),
                         (503, "Not ready, or queue full (Retry-After)"),
                         (504, "The deadline passed before the rows were computed"))
}

#: what the metadata and ready routes can answer besides 200 (they read no body)
_LOOKUP_ERRORS = {status: _ERRORS[status] for status in (401, 403, 404, 503)}


# -- health and metadata --------------------------------------------------------------------------------
@router.get("/v2", summary="Server metadata")
async def server_metadata(request: Request) -> Response:
    """``{"name": "flowserve", "version", "extensions"}``."""
    return NumpyJSONResponse({"name": "flowserve", "version": request.app.version, "extensions": [BINARY_EXTENSION]})


@router.get("/v2/health/live", summary="Server live")
async def live() -> Response:
    """200 ``{"live": true}`` while the process serves (KServe's body; Triton's clients read the status)."""
    return NumpyJSONResponse({"live": True})


@router.get("/v2/health/ready", summary="Server ready", responses={503: _ERRORS[503]})
async def ready(request: Request) -> Response:
    """200 ``{"ready": true}`` when every configured model is loaded and the worker runs; 503 otherwise,
    as ``/readyz``."""
    state = get_state(request)
    reason = state.not_ready_reason()
    if reason is not None:
        retry = 1 if state.draining else int(LOADING_RETRY_S)
        return V2Error(503, reason, {"Retry-After": str(retry)}).response()
    return NumpyJSONResponse({"ready": True})


def _tensor(name: str, datatype: str, *shape: int) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": list(shape)}


def model_metadata(served: ServedModel, versions: list[int]) -> dict[str, Any]:
    """The protocol's ``$metadata_model_response`` for ``served``."""
    datatype = _DTYPES[served.artifact.manifest.dtype]
    inputs = [_tensor(X, datatype, -1, served.features)]
    if served.context_features:
        inputs.append(_tensor(CONTEXT, datatype, -1, served.context_features))
    shapes = {"log_prob": (-1,), "latents": (-1, served.features), "log_det": (-1,), "score": (-1,),
              "p_value": (-1,), "is_anomaly": (-1,), "threshold": (1,)}
    datatypes = {"p_value": "FP64", "is_anomaly": "BOOL", "threshold": "FP64"}
    names = model_outputs(served)
    return {"name": served.name, "versions": [str(v) for v in versions], "platform": PLATFORM,
            "inputs": inputs,
            "outputs": [_tensor(name, datatypes.get(name, datatype), *shapes[name]) for name in names]}


def model_outputs(served: ServedModel) -> tuple[str, ...]:
    """The outputs ``served`` gives: the score outputs too when it has a calibration set."""
    return OUTPUTS + (SCORE_OUTPUTS if served.calibration is not None else ())


async def _metadata(request: Request, name: str, version: str | None) -> Response:
    state = get_state(request)
    served = state.lookup(name, version)
    # as Triton: a versioned request lists that version, an unversioned one every loaded version
    versions = [served.version] if version is not None else state.registry.entry(name).version_numbers
    return NumpyJSONResponse(model_metadata(served, versions))


async def _model_ready(request: Request, name: str, version: str | None) -> Response:
    served = get_state(request).lookup(name, version)  # 404 unknown, 503 loading or failed
    return NumpyJSONResponse({"name": served.name, "ready": True})


@router.get("/v2/models/{name}", dependencies=KEYED, summary="Model metadata", responses=_LOOKUP_ERRORS)
async def model_metadata_latest(request: Request, name: str = NAME) -> Response:
    """Name, versions, platform, and the input and output tensors of the model's latest version."""
    return await _metadata(request, name, None)


@router.get("/v2/models/{name}/versions/{version}", dependencies=KEYED, summary="Model metadata (one version)",
            responses=_LOOKUP_ERRORS)
async def model_metadata_version(request: Request, name: str = NAME, version: str = VERSION) -> Response:
    """Name, platform, and the input and output tensors of one version of the model."""
    return await _metadata(request, name, version)


@router.get("/v2/models/{name}/ready", dependencies=KEYED, summary="Model ready", responses=_LOOKUP_ERRORS)
async def model_ready_latest(request: Request, name: str = NAME) -> Response:
    """200 when the model is loaded; 404 for an unknown model, 503 while it loads or if it failed."""
    return await _model_ready(request, name, None)


@router.get("/v2/models/{name}/versions/{version}/ready", dependencies=KEYED, summary="Model ready (one version)",
            responses=_LOOKUP_ERRORS)
async def model_ready_version(request: Request, name: str = NAME, version: str = VERSION) -> Response:
    """200 when that version is loaded; 404 for an unknown model or version, 503 while it loads."""
    return await _model_ready(request, name, version)


# -- inference ------------------------------------------------------------------------------------------
def _shape_text(served: ServedModel, name: str) -> str:
    width = served.features if name == X else served.context_features
    return f"[-1, {width}]"


def bind_inputs(request: InferRequest, served: ServedModel, max_rows: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The rows ``x`` ``(B, D)`` and context ``(B, C)`` (or ``None``) of ``request`` for ``served``."""
    expected = [X, CONTEXT] if served.context_features else [X]
    model = served.name
    for name in request.inputs:
        if name not in expected:
            raise bad(f"unexpected inference input {name!r} for model {model!r}; its inputs are {expected}")
    for name in expected:
        if name not in request.inputs:
            names = served.feature_names if name == X else served.context_names
            raise bad(f"model {model!r} needs input {name!r}: shape {_shape_text(served, name)}, "
                      f"{' or '.join(DATATYPES)}, columns {names}")
    arrays = []
    for name in expected:
        tensor = request.inputs[name]
        width = served.features if name == X else served.context_features
        if len(tensor.shape) != 2 or tensor.shape[1] != width:
            raise bad(f"unexpected shape for input {name!r} for model {model!r}: expected "
                      f"{_shape_text(served, name)}, got {list(tensor.shape)}"
                      + (f" (send one row as [1, {width}])" if tensor.shape == (width,) else ""))
        if tensor.shape[0] == 0:
            raise bad(f"input {name!r} has no rows; send at least one")
        if tensor.shape[0] > max_rows:
            raise V2Error(413, f"input {name!r} has {tensor.shape[0]} rows; this server takes at most {max_rows} "
                          "per request (FLOWSERVE_MAX_ROWS)")
        arrays.append(tensor.array)
    if len(arrays) == 2 and arrays[1].shape[0] != arrays[0].shape[0]:
        raise bad(f"input 'context' has {arrays[1].shape[0]} rows, but input 'x' has {arrays[0].shape[0]}; "
                  "give one context row per row of x")
    return arrays[0], (arrays[1] if len(arrays) == 2 else None)


def requested_outputs(request: InferRequest, served: ServedModel) -> list[RequestedOutput]:
    """The outputs to send, in the order asked (``log_prob`` alone when the request names none)."""
    if request.outputs is None:
        return [RequestedOutput(name, request.binary_output) for name in DEFAULT_OUTPUTS]
    names = model_outputs(served)
    for output in request.outputs:
        if output.name in SCORE_OUTPUTS and output.name not in names:
            raise V2Error(409, f"output {output.name!r}: model {served.name!r} version {served.version} has no "
                          "calibration set, so it cannot score; ask for log_prob instead")
        if output.name not in names:
            raise bad(f"unexpected inference output {output.name!r} for model {served.name!r}; "
                      f"its outputs are {list(names)}")
    return list(request.outputs)


def requested_alpha(request: InferRequest) -> float | None:
    """``parameters.alpha`` of ``request``: a number in (0, 1), or ``None`` (the model's default)."""
    alpha = request.parameters.get(ALPHA)
    try:
        # the rule of /v1's alpha (JSON types only), in the protocol's 400: "parameters.alpha: ..."
        return validation.check_alpha(alpha, strict=True)
    except InvalidField as e:
        raise bad(f"parameters.{e.detail}, got {alpha!r}") from None


async def compute_outputs(state: ServiceState, served: ServedModel, x: np.ndarray, context: np.ndarray | None,
                          outputs: list[RequestedOutput], alpha: float | None,
                          deadline: float) -> dict[str, np.ndarray]:
    """The arrays of ``outputs``, from the table's operations they belong to (module docstring)."""
    wanted = {OUTPUT_OPERATIONS[o.name] for o in outputs}
    arrays: dict[str, np.ndarray] = {}
    if SCORE in wanted:
        out = await SCORE.compute(state.worker, served, x, context, alpha=alpha, deadline=deadline)
        arrays.update({name: out[name] for name in SCORE.answer_fields})
        arrays["threshold"] = np.array([out["threshold"]["log_prob"]], dtype=np.float64)
    if not arrays or INVERSE in wanted:
        arrays.update(await INVERSE.compute(state.worker, served, x, context, deadline=deadline))
    return arrays


async def _read_request(request: Request, max_bytes: int) -> InferRequest:
    """Read, inflate and parse the body: in a worker thread from ``OFF_LOOP_BYTES`` (or, compressed,
    always: a small body may inflate to the whole limit), as ``/v1``'s bodies, so the loop answers meanwhile."""
    body = await read_body(request, max_bytes)
    encoding, header_length = request.headers.get("content-encoding"), request.headers.get(HEADER_LENGTH)
    threshold = OFF_LOOP_BYTES if (encoding or "identity").strip().lower() == "identity" else 0
    return await off_loop(lambda raw: parse_infer_request(decode_content(raw, encoding, max_bytes), header_length),
                          body, threshold)


async def _infer(request: Request, name: str, version: str | None) -> Response:
    state = get_state(request)
    start = time.monotonic()
    with state.metrics.track("v2_infer") as record:
        try:
            served = state.lookup(name, version)
            record.model, record.version = served.name, str(served.version)
            parsed = await _read_request(request, state.settings.max_body_bytes)
            x, context = bind_inputs(parsed, served, state.settings.max_rows)
            outputs = requested_outputs(parsed, served)
            alpha = requested_alpha(parsed)
            deadline = start + state.settings.request_timeout_s
            if parsed.timeout_us:  # Triton's per-request timeout, in microseconds
                deadline = min(deadline, start + parsed.timeout_us / 1e6)
            arrays = await compute_outputs(state, served, x, context, outputs, alpha, deadline)
        except Exception as exc:
            error = error_from(exc, state.settings, None)
            record.status = error.status
            raise error from exc
        body, headers = encode_infer_response(served.name, served.version, parsed.id,
                                              [(o, arrays[o.name]) for o in outputs])
        record.status, record.rows = 200, int(x.shape[0])
        media_type = headers.pop("Content-Type")
        return Response(body, headers=headers, media_type=media_type)


_INFER_DOC = ("Inputs `x` `[B, D]` (and `context` `[B, C]` for conditional models), FP32 or FP64, as JSON `data` "
              "or binary after the JSON (`Inference-Header-Content-Length`, `parameters.binary_data_size`). "
              "Outputs `log_prob` `[B]` (default), `latents` `[B, D]`, `log_det` `[B]`, and for models with a "
              "calibration set `score` `[B]`, `p_value` `[B]` (FP64), `is_anomaly` `[B]` (BOOL) and `threshold` "
              "`[1]` (FP64) at the request's `parameters.alpha` (default: the model's `anomaly_alpha`), as JSON or "
              "binary (`parameters.binary_data`, `parameters.binary_data_output`).")


#: the body (required) and the answers of infer, for the OpenAPI document; the handler reads the body itself
_INFER_EXTRA: dict[str, Any] = {
    "requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/V2InferRequest"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                     "description": "The JSON request, then the inputs' raw bytes "
                                                    f"(`{HEADER_LENGTH}` gives the JSON's length)."}}},
    "parameters": [{"name": HEADER_LENGTH, "in": "header", "required": False, "schema": {"type": "integer"},
                    "description": "The length in bytes of the JSON part, when binary tensor data follows it."}],
}
_INFER_ANSWERS: dict[int | str, dict[str, Any]] = {
    200: {"description": "The outputs; `application/octet-stream` (JSON, then the binary outputs' bytes) when an "
                         f"output is binary, with `{HEADER_LENGTH}`.",
          "content": {"application/json": {"schema": {"$ref": "#/components/schemas/V2InferResponse"}},
                      "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
    415: {"description": "Unsupported `Content-Encoding` (`{\"error\": \"...\"}`, application/json)."},
    409: {"description": "A score output (`score`, `p_value`, `is_anomaly`, `threshold`) of a model without a "
                         "calibration set (`{\"error\": \"...\"}`, application/json)."},
    **_ERRORS,
}


@router.post("/v2/models/{name}/infer", dependencies=KEYED, summary="Infer", responses=_INFER_ANSWERS,
             description=_INFER_DOC, openapi_extra=_INFER_EXTRA)
async def infer_latest(request: Request, name: str = NAME) -> Response:
    return await _infer(request, name, None)


@router.post("/v2/models/{name}/versions/{version}/infer", dependencies=KEYED, summary="Infer (one version)",
             responses=_INFER_ANSWERS, description=_INFER_DOC, openapi_extra=_INFER_EXTRA)
async def infer_version(request: Request, name: str = NAME, version: str = VERSION) -> Response:
    return await _infer(request, name, version)


# -- everything else under /v2: the protocol's error shape --------------------------------------------
_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


async def _unmatched(request: Request) -> Response:
    allowed = sorted({m for route in router.routes if isinstance(route, APIRoute) and route.endpoint is not _unmatched
                      and route.matches(request.scope)[0] is Match.PARTIAL for m in (route.methods or ())})
    if allowed:
        raise V2Error(405, f"{request.method} is not allowed on {request.url.path}; use {', '.join(allowed)}",
                      {"Allow": ", ".join(allowed)})
    raise V2Error(404, f"no route {request.method} {request.url.path}; this server implements the protocol's "
                  "health, metadata and infer endpoints")


router.add_api_route("/v2/{path:path}", _unmatched, methods=_METHODS, include_in_schema=False)
router.add_api_route("/v2", _unmatched, methods=_METHODS, include_in_schema=False)
