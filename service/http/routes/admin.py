"""``/v1/admin/models/{name}/load``, ``/unload`` and ``/reload`` (see :mod:`service.serving.administration`).

Each answers the model's list entry (as in ``GET /v1/models``) after the change, with ``action``
(``loaded``, ``reloaded``, ``unloaded`` or ``unchanged``) and ``previous_versions`` (the versions
served before). Refusals are :class:`~service.serving.administration.AdminError` s, answered by the
status table :data:`service.http.problems.DOMAIN_ANSWERS`, all problem+json: 400 for a name that is
not a model name, 404 for a name the repository does not hold, 409 ``load-failed`` when the
repository's versions do not load (nothing changes: the old versions keep serving), 503 while the
model is in its first load. The
key checks (:func:`service.http.auth.require_admin_key`) are added where the router is included.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Path, Request
from pydantic import Field
from starlette.responses import Response

from service.serving.administration import AdminResult, ModelAdmin
from service.serving.errors import NotReady
from service.model.artifact import NAME_PATTERN
from service.http.responses import NumpyJSONResponse
from service.http.schemas import ModelSummary
from service.http.state import LOADING_RETRY_S, ServiceState, get_state
from service.http.routes.models import summary

__all__ = ["router"]

router = APIRouter(prefix="/v1/admin/models", tags=["administration"])

# The pattern is documented, not enforced by FastAPI: a name outside it is the 400 of ``_change``
# (``check_name`` also refuses ``..`` inside a name, which the pattern cannot say without lookahead).
NAME = Path(..., description="The model's name (its folder in the repository): 1-64 letters, digits, '.', '_' "
                             "or '-', starting with a letter or digit, without '..'.",
            examples=["moons"], json_schema_extra={"pattern": NAME_PATTERN.pattern})


class AdminAnswer(ModelSummary):
    action: str = Field(..., description="loaded, reloaded, unloaded or unchanged.", examples=["reloaded"])
    previous_versions: list[int] = Field(..., description="The versions served before the change.",
                                         examples=[[1]])


_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"description": text, "content": {"application/problem+json": {
        "schema": {"$ref": "#/components/schemas/Problem"}}}}
    for status, text in {
        400: "Not a model name (outside the pattern of {name}, or holding '..').",
        401: "No admin key (Authorization: Bearer <FLOWSERVE_ADMIN_KEY>).",
        403: "Not the admin key, or administration is disabled (FLOWSERVE_ADMIN_KEY unset).",
        404: "The model repository has no model of that name.",
        409: "The repository's versions of the model failed to load; the old versions keep serving.",
        503: "The server is starting, or the model is still in its first load (Retry-After).",
    }.items()
}


def _admin(request: Request) -> tuple[ServiceState, ModelAdmin]:
    state = get_state(request)
    if state.registry is None or state.worker is None:
        raise NotReady("the server is starting", LOADING_RETRY_S)
    admin = getattr(request.app.state, "flowserve_admin", None)
    if admin is None or admin.registry is not state.registry:
        admin = ModelAdmin(state.registry)
        request.app.state.flowserve_admin = admin
    return state, admin


def _answer(state: ServiceState, result: AdminResult, action: str) -> dict[str, Any]:
    device = str(state.worker.device) if state.worker is not None else state.settings.device
    if result.entry is None:
        out: dict[str, Any] = {"name": result.name, "version": None, "versions": [], "features": None,
                               "context_features": None, "flow": None, "device": device, "ready": False,
                               "state": "unloaded", "error": None}
    else:
        out = summary(result.entry, device)
    return {**out, "action": action if result.changed else "unchanged",
            "previous_versions": result.previous_versions}


async def _change(request: Request, name: str, change: str, action: str) -> Response:
    state, admin = _admin(request)
    try:  # a refusal (AdminError) is answered by the status table, service.http.problems.DOMAIN_ANSWERS
        result = await asyncio.to_thread(getattr(admin, change), name)
    finally:
        if state.registry is not None:
            state.metrics.models_ready.set(1 if state.registry.ready else 0)
    return NumpyJSONResponse(_answer(state, result, action))


@router.post("/{name}/load", response_model=AdminAnswer, summary="Load a model", responses=_RESPONSES)
async def load(request: Request, name: str = NAME) -> Response:
    """Serve a model of the repository that this server does not serve (not chosen at start, or
    unloaded): every version of it, verified. A model already served is left unchanged."""
    return await _change(request, name, "load", "loaded")


@router.post("/{name}/unload", response_model=AdminAnswer, summary="Unload a model", responses=_RESPONSES)
async def unload(request: Request, name: str = NAME) -> Response:
    """Stop serving the model: requests in flight finish; afterwards its paths answer 404."""
    return await _change(request, name, "unload", "unloaded")


@router.post("/{name}/reload", response_model=AdminAnswer, summary="Reload a model", responses=_RESPONSES)
async def reload(request: Request, name: str = NAME) -> Response:
    """Rescan the model's versions in the repository, load them all aside and swap them in at once:
    requests in flight finish on the old versions, none fails, and the new latest version answers
    from then on. If any version fails to load, nothing changes (409) and the old versions keep serving."""
    return await _change(request, name, "reload", "reloaded")
