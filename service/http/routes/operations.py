"""The operations, under ``/v1/models/{name}`` and ``/v1/models/{name}/versions/{version}``.

:func:`handle` answers one: it looks the model up (404 / 503), reads and parses the body within
the limits (415 / 413 / 400), validates the scalar fields with the operation's ``*Params`` model
(422) and the arrays with numpy (:mod:`service.http.codecs.rows`: 400 / 413 / 422), calls the
operation in :mod:`service.serving.operations` with a deadline of ``request_timeout_s`` from the
start of the request, and encodes the numpy answer as the client's ``Accept`` asks (406 when it
accepts nothing we write, checked before any work): JSON with orjson, or ``.npy`` / ``.npz``
(:mod:`service.http.codecs.binary`). Bodies may be JSON, ``.npy`` or ``.npz`` (scalar fields then
come as query parameters). Every failure is a problem+json answer.

The operation router (:mod:`service.http.router`) calls :func:`handle` for every operation
``POST``. :data:`router` holds the operations' FastAPI routes as their documentation only: they
make the OpenAPI document and ``/docs`` (and Starlette's 405 / 307 around them), and their
endpoints answer no operation (see :func:`_documentation_only`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np
from fastapi import APIRouter, Path, Request
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from service.serving import validation
from service.serving.registry import ServedModel
from service.http.codecs import binary
from service.http.codecs.bodies import JSON, ParsedBody, parse_body
from service.http.problems import Problem, domain_problem, field_error
from service.http.codecs.negotiation import negotiate
from service.http.responses import NumpyJSONResponse
from service.http.codecs.rows import describe_names, rows_array
from service.http.schemas import PARAMS, REQUEST_MODELS, RESPONSE_MODELS, SampleParams, request_examples
from service.serving.table import TABLE, Operation
from service.http.state import ServiceState, get_state

__all__ = ["ENDPOINTS", "Endpoint", "PARAMS", "handle", "router"]

router = APIRouter(prefix="/v1/models", tags=["operations"])

NAME = Path(..., description="The model's name.", examples=["moons"])
VERSION = Path(..., description="An integer version of the model.", examples=["1"])

# -- shared steps ---------------------------------------------------------------------------------
def _params(parsed: ParsedBody, model: type[BaseModel], arrays: tuple[str, ...]) -> Any:
    """The non-array fields by :func:`service.serving.validation.parameters`: strict for JSON, lax for
    query parameters; unknown fields are 422."""
    fields = {k: v for k, v in parsed.fields.items() if k not in arrays}

    def place(key: Any) -> str:
        # with a binary or empty body the scalar fields (and any missing one) belong in the query
        return "query" if key in parsed.query_fields or (parsed.lax and key not in parsed.fields) else "body"

    return validation.parameters(model, fields, strict=not parsed.lax, arrays=arrays, place=place)


def _main_rows(parsed: ParsedBody, served: ServedModel, field: str, max_rows: int) -> np.ndarray:
    value = parsed.array if parsed.array is not None else parsed.fields.get(field)
    if value is None:
        raise Problem(422, "invalid-field", f"{field} is required: a list of rows of {served.features} numbers "
                      f"{describe_names(served.feature_names)}",
                      errors=[field_error(("body", field), "field required")])
    return rows_array(value, served.feature_names, field, max_rows=max_rows)


def _context(parsed: ParsedBody, served: ServedModel, rows: int, *, broadcast: bool = False) -> np.ndarray | None:
    """Context rows for ``rows`` data rows (one row is also accepted when ``broadcast``), by the
    rules of :mod:`service.serving.validation`."""
    value = parsed.fields.get("context")
    hint = ""
    if parsed.media_type == binary.NPY:
        hint = ("; an .npy body holds one array: send an .npz body (Content-Type: application/x-npz) "
                "with the arrays 'inputs' (or 'latents') and 'context'")
    if not validation.takes_context(served.name, served.context_names, value is not None, broadcast=broadcast,
                                    hint=hint):
        return None
    arr = rows_array(value, served.context_names, "context", single_row_ok=broadcast)
    return validation.context_rows(arr, rows, broadcast=broadcast)


def _answer(served: ServedModel, **arrays: Any) -> dict[str, Any]:
    return {"model": served.name, "version": served.version, **arrays}


# -- the operations -------------------------------------------------------------------------------
async def _rows_operation(op: Operation, state: ServiceState, served: ServedModel, parsed: ParsedBody,
                          deadline: float) -> tuple[dict[str, Any], int]:
    """An operation on rows of its ``main_input`` (every one but ``sample``), from the table."""
    params = _params(parsed, PARAMS[op.name], op.arrays)
    rows = _main_rows(parsed, served, op.main_input, state.settings.max_rows)
    c = _context(parsed, served, rows.shape[0])
    out = await op.compute(state.worker, served, rows, c, deadline=deadline, **params.model_dump())
    return _answer(served, **out), rows.shape[0]


async def _sample(op: Operation, state: ServiceState, served: ServedModel, parsed: ParsedBody, deadline: float):
    if parsed.array is not None:
        raise Problem(415, "unsupported-media-type",
                      "sample takes no .npy array: give n, seed, temperature, return_log_prob and return_latents as "
                      "query parameters with an empty body (e.g. POST .../sample?n=1000&seed=3), or a JSON body; "
                      "context rows may come as the 'context' array of an .npz body",
                      headers={"Accept-Post": f"{JSON}, {binary.NPZ}"})
    p: SampleParams = _params(parsed, PARAMS[op.name], op.arrays)
    limit = state.settings.max_samples
    if p.n > limit:
        where = "query" if "n" in parsed.query_fields else "body"
        raise Problem(413, "content-too-large", f"n is {p.n}; this server draws at most {limit} samples per request",
                      errors=[field_error((where, "n"), f"at most {limit}")])
    c = _context(parsed, served, p.n, broadcast=True)
    out = await op.compute(state.worker, served, p.n, p.seed, p.temperature, c, deadline)
    answer = _answer(served, samples=out["samples"], seed=out["seed"])
    if p.return_log_prob:
        answer["log_prob"] = out["log_prob"]
    if p.return_latents:
        answer["latents"] = out["latents"]
    return answer, p.n


@dataclass(frozen=True)
class Endpoint:
    """One operation of :data:`service.serving.table.TABLE` as the v1 API serves it."""

    op: Operation

    @property
    def name(self) -> str:
        return self.op.name

    @property
    def main(self) -> str:
        """The answer's main array: what an ``application/x-npy`` answer holds."""
        return self.op.main_answer

    @property
    def response(self) -> type[BaseModel]:
        return RESPONSE_MODELS[self.op.name]

    @property
    def summary(self) -> str:
        return self.op.summary

    @property
    def description(self) -> str:
        return self.op.description

    async def run(self, state: ServiceState, served: ServedModel, parsed: ParsedBody,
                  deadline: float) -> tuple[dict[str, Any], int]:
        """Validate ``parsed`` for the operation, compute it, and give ``(answer, rows)``."""
        if self.op.main_input is None:
            return await _sample(self.op, state, served, parsed, deadline)
        return await _rows_operation(self.op, state, served, parsed, deadline)


#: the v1 endpoints: one per operation of the table, in its order
ENDPOINTS: tuple[Endpoint, ...] = tuple(Endpoint(op) for op in TABLE)


# -- error mapping and the handler ----------------------------------------------------------------
#: what an operation answers, in the order that breaks ties in ``Accept`` (JSON by default)
ANSWER_TYPES = (JSON, binary.NPY, binary.NPZ)


def _encode(payload: dict[str, Any], media: str, endpoint: Endpoint) -> Response:
    headers = {"Vary": "Accept", "Flowserve-Model": str(payload["model"]),
               "Flowserve-Model-Version": str(payload["version"])}
    if "seed" in payload:
        headers["Flowserve-Seed"] = str(payload["seed"])
    if media == JSON:
        return NumpyJSONResponse(payload, headers=headers)
    return binary.encode(payload, media, endpoint.main, headers)


async def handle(request: Request, name: str, version: str | None, endpoint: Endpoint) -> Response:
    """Answer ``endpoint`` on model ``name`` (its ``version``, or the latest when ``None``).

    Raises :class:`Problem` for every failure the client should hear of; anything else is a bug
    (the app's handlers turn it into a 500). Called by :class:`service.http.router.OperationRouter`,
    which answers every operation ``POST`` (FastAPI's routes below only document them).
    """
    state = get_state(request)
    deadline = time.monotonic() + state.settings.request_timeout_s
    with state.metrics.track(endpoint.name) as record:
        try:
            served = state.lookup(name, version)
            record.model, record.version = served.name, str(served.version)
            media = negotiate(request.headers.get("accept"), ANSWER_TYPES)
            parsed = await parse_body(request, state.settings.max_body_bytes)
            payload, rows = await endpoint.run(state, served, parsed, deadline)
        except Problem as p:
            record.status = p.status
            raise
        except Exception as exc:
            # the status table of the domain errors; anything else (a ValueError included) is a bug: the
            # app's handler answers 500 and logs it
            problem = domain_problem(exc, state.settings, state.settings.request_timeout_s)
            if problem is None:
                record.status = 500
                raise
            record.status = problem.status
            raise problem from exc
        response = _encode(payload, media, endpoint)
        record.status, record.rows = 200, rows
        return response


def _problem_responses() -> dict[int | str, dict[str, Any]]:
    ref = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    described = {
        400: "Malformed JSON, non-finite numbers, ragged rows, wrong feature count, unknown feature names, bad context.",
        401: "No API key, where the server sets FLOWSERVE_API_KEYS (WWW-Authenticate: Bearer).",
        403: "Not one of the server's API keys.",
        404: "Unknown model or version.",
        409: "score: the model version has no calibration set.",
        413: "Body over max_body_bytes, more rows than max_rows, or n over max_samples.",
        415: "Unsupported Content-Type.",
        422: "Invalid fields: n < 1, temperature <= 0, alpha outside (0, 1), wrong types, unknown fields.",
        503: "Queue full, not ready or shutting down; see Retry-After.",
        504: "The deadline passed before the request's batch ran.",
    }
    return {status: {"description": text, "content": ref} for status, text in described.items()}


_BINARY_SCHEMA = {"schema": {"type": "string", "format": "binary"}}


def _query_parameters(endpoint: Endpoint) -> list[dict[str, Any]]:
    schema = PARAMS[endpoint.name].model_json_schema()
    required = set(schema.get("required", ()))
    out = []
    for name, prop in schema.get("properties", {}).items():
        prop = dict(prop)
        description = prop.pop("description", "")
        out.append({"name": name, "in": "query", "required": False, "schema": prop,
                    "description": f"With a binary or empty body{' (then required)' if name in required else ''}: "
                                   f"{description}"})
    return out


def _binary_bodies(endpoint: Endpoint) -> dict[str, Any]:
    main = endpoint.op.main_input
    if main is None:
        return {binary.NPZ: {**_BINARY_SCHEMA, "description": "an .npz with the array 'context'"}}
    return {binary.NPY: {**_BINARY_SCHEMA, "description": f"the {main} rows as one 2-D .npy array"},
            binary.NPZ: {**_BINARY_SCHEMA, "description": f"an .npz with the arrays {main!r} and 'context'"}}


def _documentation_only() -> NoReturn:
    """What the operations' FastAPI routes answer: 404, as no route.

    Every ``POST`` Starlette would route to them is the operation router's, whose path match is
    stricter: the one kind that reaches them is a path the router does not take but Starlette's
    pattern does (a decoded trailing newline, which its ``$`` lets through), and no such path
    names an operation.
    """
    raise StarletteHTTPException(404)


def _register(endpoint: Endpoint) -> None:
    extra = {"requestBody": {"required": endpoint.op.main_input is not None, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{REQUEST_MODELS[endpoint.name].__name__}"},
        "examples": request_examples(endpoint.name),
    }, **_binary_bodies(endpoint)}}, "parameters": _query_parameters(endpoint)}
    binary_answers = {binary.NPY: {**_BINARY_SCHEMA, "description": f"{endpoint.main} as .npy"},
                      binary.NPZ: {**_BINARY_SCHEMA, "description": "every field as an .npz member"}}
    responses = {200: {"model": endpoint.response, "content": binary_answers},
                 406: {"description": "The Accept header accepts none of application/json, application/x-npy, "
                                      "application/x-npz.",
                       "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}},
                 **_problem_responses()}
    if not endpoint.op.needs_calibration:
        responses.pop(409)
    description = endpoint.description + (
        "\n\nNon-finite numbers in the answer (e.g. `-inf` log-densities far outside the support) are written "
        "as `null`, so the answer is strict JSON (binary answers keep them as they are)."
        f"\n\n`Accept: application/x-npy` answers `{endpoint.main}` as `.npy`; `Accept: application/x-npz` the whole "
        "answer as `.npz`."
    )

    # the signatures document the path parameters; the bodies answer no operation
    async def latest(request: Request, name: str = NAME) -> Response:
        _documentation_only()

    async def versioned(request: Request, name: str = NAME, version: str = VERSION) -> Response:
        _documentation_only()

    router.add_api_route(f"/{{name}}/{endpoint.name}", latest, methods=["POST"], summary=endpoint.summary,
                         description=description + "\n\nAnswered by the model's latest version.",
                         operation_id=endpoint.name, responses=responses, openapi_extra=extra,
                         response_model=None)
    router.add_api_route(f"/{{name}}/versions/{{version}}/{endpoint.name}", versioned, methods=["POST"],
                         summary=endpoint.summary + " (one version)", description=description,
                         operation_id=f"{endpoint.name}_version", responses=responses, openapi_extra=extra,
                         response_model=None)


for _endpoint in ENDPOINTS:
    _register(_endpoint)
