"""The OpenAPI document: FastAPI's, plus the request-body schemas the operations parse by hand.

Operations read their bodies with orjson and numpy (not through FastAPI's body parameters), so
their routes reference the request models by ``$ref`` in ``openapi_extra``; this module puts those
models (and the problem+json schema) into ``components.schemas`` so ``/docs`` shows every field,
its description and working examples.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from .schemas import REQUEST_MODELS, Problem

__all__ = ["install"]

REF_TEMPLATE = "#/components/schemas/{model}"


def _add(schemas: dict[str, Any], model: type[BaseModel]) -> None:
    schema = model.model_json_schema(ref_template=REF_TEMPLATE, mode="validation")
    for name, sub in schema.pop("$defs", {}).items():
        schemas.setdefault(name, sub)
    schemas[model.__name__] = schema


def _problem_422(doc: dict[str, Any]) -> None:
    """FastAPI documents its own 422 shape; ours is problem+json like every other error."""
    problem = {"application/problem+json": {"schema": {"$ref": REF_TEMPLATE.format(model="Problem")}}}
    for path in doc.get("paths", {}).values():
        for operation in path.values():
            answer = operation.get("responses", {}).get("422")
            if answer is not None and "HTTPValidationError" in str(answer.get("content", "")):
                answer["content"] = problem
                answer["description"] = "Invalid path parameters or fields (application/problem+json)."
    schemas = doc.get("components", {}).get("schemas", {})
    if "HTTPValidationError" not in str(doc.get("paths")):
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)


def install(app: FastAPI) -> None:
    """Replace ``app.openapi`` with one that also documents the hand-parsed request bodies."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes,
                          tags=app.openapi_tags)
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for model in (*REQUEST_MODELS.values(), Problem):
            _add(schemas, model)
        _problem_422(doc)
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
