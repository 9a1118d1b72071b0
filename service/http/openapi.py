"""The OpenAPI document: FastAPI's, made true to what this server answers.

Operations read their bodies with orjson and numpy (not through FastAPI's body parameters), so
their routes reference the request models by ``$ref`` in ``openapi_extra``; this module puts those
models (and the problem+json schema) into ``components.schemas`` so ``/docs`` shows every field,
its description and working examples. Then it corrects what FastAPI cannot know:

- **Keys.** A route needs an API key when its dependencies include
  :func:`~service.http.auth.require_api_key` *and* the server sets ``FLOWSERVE_API_KEYS``; it then
  documents the ``APIKey`` bearer scheme, 401 (with ``WWW-Authenticate``) and 403. Admin routes
  document the ``AdminKey`` scheme, 401 and 403 when ``FLOWSERVE_ADMIN_KEY`` is set; without it no
  key opens them, so they document no scheme and the 403 every request gets. Other routes
  document neither.
- **422.** FastAPI documents a 422 for every route with parameters; ours are plain strings that
  cannot fail validation (the ``/v2`` routes answer 400 anyway), so that 422 is dropped where no
  parameter can fail, and written as problem+json where one can.
- **Error bodies.** A documented 4xx/5xx without content gets the one its router writes:
  ``application/problem+json`` (:class:`~service.http.schemas.Problem`) under ``/v1`` and for
  ``/readyz``, ``{"error"}`` (:class:`~service.http.schemas.V2Error`) under ``/v2``.
- **Examples.** Every ``{name}`` path parameter gets, as its ``example`` (which Swagger UI fills
  into "Try it out"), a model this server holds: the first in its registry, ``moons`` before the
  registry exists; every ``{version}`` that model's latest version. These are filled per request
  of the document, on a copy of the document built once.
"""

from __future__ import annotations

import copy
from typing import Any, Iterator

from fastapi import FastAPI
from fastapi import routing as fastapi_routing
from fastapi.dependencies.models import Dependant
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from pydantic import BaseModel

from service.http import auth
from service.http.schemas import REQUEST_MODELS, Problem, V2Error, V2InferRequest, V2InferResponse

__all__ = ["FALLBACK_MODEL", "example_model", "install"]

REF_TEMPLATE = "#/components/schemas/{model}"
#: the name shown in the docs when the server holds no model yet
FALLBACK_MODEL = "moons"
_METHODS = ("get", "put", "post", "delete", "patch", "head", "options")
_PROBLEM = {"application/problem+json": {"schema": {"$ref": REF_TEMPLATE.format(model="Problem")}}}
_V2_ERROR = {"application/json": {"schema": {"$ref": REF_TEMPLATE.format(model="V2Error")}}}


def _add(schemas: dict[str, Any], model: type[BaseModel]) -> None:
    schema = model.model_json_schema(ref_template=REF_TEMPLATE, mode="validation")
    for name, sub in schema.pop("$defs", {}).items():
        schemas.setdefault(name, sub)
    schemas[model.__name__] = schema


def _dependencies(dependant: Dependant) -> Iterator[Dependant]:
    for sub in dependant.dependencies:
        yield sub
        yield from _dependencies(sub)


def _api_routes(app: FastAPI) -> Iterator[Any]:
    """Every API route of ``app`` as the document sees it: with the dependencies and path of the
    routers it was included through (newer FastAPI keeps included routers as such and resolves
    them per route with ``iter_route_contexts``; older FastAPI copies the routes into the app)."""
    contexts = getattr(fastapi_routing, "iter_route_contexts", None)
    for route in (contexts(app.routes) if contexts is not None else app.routes):
        if isinstance(getattr(route, "original_route", route), APIRoute) and route.include_in_schema:
            yield route


def _calls(route: APIRoute) -> set[Any]:
    return {d.call for d in _dependencies(route.dependant)}


def _validates(route: APIRoute) -> bool:
    """Whether FastAPI validates any parameter of ``route`` (so that it can answer 422)."""
    deps = [route.dependant, *_dependencies(route.dependant)]
    for d in deps:
        if d.query_params or d.header_params or d.cookie_params or d.body_params:
            return True
        if any(p.field_info.annotation is not str for p in d.path_params):
            return True
    return False


def _error_content(path: str) -> dict[str, Any]:
    return _V2_ERROR if path == "/v2" or path.startswith("/v2/") else _PROBLEM


def _auth_answers(path: str, operation: dict[str, Any], scheme: str | None, statuses: dict[str, str]) -> None:
    """Set ``operation``'s security to ``scheme`` (none when ``None``) and its 401/403 to ``statuses``."""
    responses = operation.setdefault("responses", {})
    for status in ("401", "403"):
        responses.pop(status, None)
    if scheme is None:
        operation.pop("security", None)
        return
    operation["security"] = [{scheme: []}]
    for status, text in statuses.items():
        answer: dict[str, Any] = {"description": text, "content": _error_content(path)}
        if status == "401":
            answer["headers"] = {"WWW-Authenticate": {
                "description": "`Bearer realm=\"...\"`: send the key as `Authorization: Bearer <key>`.",
                "required": True, "schema": {"type": "string"}}}
        responses[status] = answer


def _correct(doc: dict[str, Any], app: FastAPI) -> None:
    """Keys, 422s and error bodies of every operation, as this app answers them."""
    keys = getattr(app.state, "flowserve_keys", None) or auth.Keys()
    routes = {(r.path_format, m.lower()): r for r in _api_routes(app) for m in (r.methods or ())}
    for path, item in doc.get("paths", {}).items():
        for method, operation in item.items():
            route = routes.get((path, method))
            if method not in _METHODS or route is None:
                continue
            calls = _calls(route)
            if auth.require_admin_key in calls and keys.admin is not None:
                _auth_answers(path, operation, "AdminKey", {
                    "401": "No admin key: send `Authorization: Bearer <FLOWSERVE_ADMIN_KEY>`.",
                    "403": "Not the admin key (API keys never open /v1/admin)."})
            elif auth.require_admin_key in calls:  # no key opens it: every request is 403 admin-disabled
                _auth_answers(path, operation, None, {})
                operation["responses"]["403"] = {
                    "description": "Always, on this server: administration is disabled (FLOWSERVE_ADMIN_KEY unset).",
                    "content": _error_content(path)}
            elif auth.require_api_key in calls and keys.api:
                _auth_answers(path, operation, "APIKey", {
                    "401": "No API key: send `Authorization: Bearer <key>` (one of FLOWSERVE_API_KEYS).",
                    "403": "Not one of the server's API keys."})
            else:
                _auth_answers(path, operation, None, {})
            responses = operation.get("responses", {})
            answer = responses.get("422")
            if answer is not None and "HTTPValidationError" in str(answer.get("content", "")):
                if _validates(route):
                    answer["content"] = _error_content(path)
                    answer["description"] = "Invalid parameters."
                else:
                    del responses["422"]
            for status, answer in responses.items():
                if status[:1] in ("4", "5") and not answer.get("content"):
                    answer["content"] = _error_content(path)
    text = str(doc.get("paths"))
    schemas = doc.get("components", {}).get("schemas", {})
    if "HTTPValidationError" not in text:
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)
    schemes = doc.get("components", {}).get("securitySchemes", {})
    for name in list(schemes):
        if f"'{name}'" not in text:
            del schemes[name]
    if not schemes:
        doc.get("components", {}).pop("securitySchemes", None)


def example_model(app: FastAPI) -> tuple[str, str]:
    """A model this server holds and its latest version, for examples: ``moons`` when the server
    holds it (the request bodies' first examples are written for it), else the first model in the
    registry; ``moons`` and ``1`` before there is a registry, or while the model has no version."""
    state = getattr(app.state, "flowserve", None)
    registry = getattr(state, "registry", None)
    entries = registry.entries() if registry is not None else []
    if not entries:
        return FALLBACK_MODEL, "1"
    entry = next((e for e in entries if e.name == FALLBACK_MODEL), entries[0])
    versions = entry.version_numbers
    return entry.name, str(versions[-1]) if versions else "1"


def _fill_examples(doc: dict[str, Any], name: str, version: str) -> None:
    for item in doc.get("paths", {}).values():
        for method, operation in item.items():
            if method not in _METHODS:
                continue
            for parameter in operation.get("parameters", []):
                if parameter.get("in") != "path":
                    continue
                value = {"name": name, "version": version}.get(parameter.get("name"))
                if value is not None:
                    parameter["example"] = value
                    parameter.get("schema", {}).pop("examples", None)


def install(app: FastAPI) -> None:
    """Replace ``app.openapi`` with one that documents the hand-parsed bodies and the server's keys."""
    built: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        if "doc" not in built:
            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes,
                              tags=app.openapi_tags)
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            for model in (*REQUEST_MODELS.values(), Problem, V2Error, V2InferRequest, V2InferResponse):
                _add(schemas, model)
            _correct(doc, app)
            built["doc"] = doc
        key = example_model(app)
        if app.openapi_schema is None or built.get("key") != key:
            doc = copy.deepcopy(built["doc"])
            _fill_examples(doc, *key)
            built["key"] = key
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
