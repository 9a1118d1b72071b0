"""The model catalogue: ``/v1/models``, a model's card, and its versions."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Path, Request
from starlette.responses import Response

from service.serving import monitoring
from service.serving.registry import ModelEntry, ModelState, ServedModel
from service.http.responses import NumpyJSONResponse
from service.http.schemas import ModelCard, ModelList, ModelVersions
from service.http.state import get_state

router = APIRouter(prefix="/v1/models", tags=["models"])

NAME = Path(..., description="The model's name.", examples=["moons"])
VERSION = Path(..., description="An integer version of the model.", examples=["1"])
_ERRORS = {404: {"description": "Unknown model or version (application/problem+json)."},
           503: {"description": "The model is still loading or failed to load (application/problem+json)."}}


def summary(entry: ModelEntry, device: str, served: ServedModel | None = None) -> dict[str, Any]:
    """The list entry of a model (of ``served``, or of its latest version when ready)."""
    if served is None and entry.state is ModelState.READY:
        served = entry.latest
    manifest = served.artifact.manifest if served is not None else None
    return {
        "name": entry.name,
        "version": served.version if served is not None else None,
        "versions": entry.version_numbers,
        "features": manifest.features if manifest else None,
        "context_features": manifest.context_features if manifest else None,
        "flow": manifest.flow.get("name") if manifest else None,
        "device": device,
        "ready": entry.state is ModelState.READY,
        "state": entry.state.value,
        "error": entry.error,
    }


def card(entry: ModelEntry, served: ServedModel, device: str) -> dict[str, Any]:
    """The model card: the list entry, everything the manifest says about the model, and its
    ``drift`` (:meth:`service.serving.monitoring.ModelMonitor.drift`: the latest KS test of the
    recent log-densities against the calibration set)."""
    m = served.artifact.manifest
    calibration = served.calibration
    return {
        **summary(entry, device, served),
        "feature_names": m.feature_names,
        "context_names": m.context_names,
        "description": m.description,
        "dtype": m.dtype,
        "flow_config": m.flow,
        "base": m.base,
        "preprocessing": m.preprocessing.model_dump(),
        "training": m.training,
        "calibration": None if calibration is None else calibration.summary(),
        "drift": monitoring.monitor_of(served).drift(),
        "anomaly_alpha": m.anomaly_alpha,
        "exactness": m.exactness,
        "notes": m.notes,
        "sha256": m.weights.sha256,
        "created_at": m.created_at,
    }


def _device(request: Request) -> str:
    state = get_state(request)
    return str(state.worker.device) if state.worker is not None else state.settings.device


@router.get("", response_model=ModelList, summary="List the models")
async def list_models(request: Request) -> Response:
    """Every configured model with its default version, sizes, flow, device and readiness."""
    state = get_state(request)
    device = _device(request)
    entries = state.registry.entries() if state.registry is not None else []
    return NumpyJSONResponse({"models": [summary(e, device) for e in entries]})


@router.get("/{name}", response_model=ModelCard, summary="A model's card (latest version)", responses=_ERRORS)
async def model_card(request: Request, name: str = NAME) -> Response:
    """Everything known about the model's latest version: features, flow, training, calibration,
    exactness figures, weights digest."""
    state = get_state(request)
    served = state.lookup(name)
    return NumpyJSONResponse(card(state.registry.entry(name), served, _device(request)))


@router.get("/{name}/versions", response_model=ModelVersions, summary="A model's versions", responses=_ERRORS)
async def model_versions(request: Request, name: str = NAME) -> Response:
    """Every loaded version of the model, ascending; the highest answers unversioned paths."""
    state = get_state(request)
    latest = state.lookup(name)
    entry = state.registry.entry(name)
    versions = []
    for number in entry.version_numbers:
        m = entry.versions[number].artifact.manifest
        versions.append({"version": number, "created_at": m.created_at, "sha256": m.weights.sha256,
                         "flow": m.flow.get("name"), "dtype": m.dtype, "description": m.description,
                         "training": m.training})
    return NumpyJSONResponse({"name": name, "latest": latest.version, "versions": versions})


@router.get("/{name}/versions/{version}", response_model=ModelCard, summary="A model version's card",
            responses=_ERRORS)
async def version_card(request: Request, name: str = NAME, version: str = VERSION) -> Response:
    """The card of one version of the model."""
    state = get_state(request)
    served = state.lookup(name, version)
    return NumpyJSONResponse(card(state.registry.entry(name), served, _device(request)))
