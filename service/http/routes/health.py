"""``/healthz`` (the process serves), ``/readyz`` (models loaded, worker running) and ``/metrics``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from service.serving.metrics import CONTENT_TYPE_LATEST
from service.http.problems import Problem
from service.http.responses import NumpyJSONResponse
from service.http.schemas import HealthResponse, ReadyResponse
from service.http.state import LOADING_RETRY_S, get_state

router = APIRouter(tags=["health"])

_PROBLEM_503 = {503: {"description": "Not ready (application/problem+json, with Retry-After)."}}


@router.get("/healthz", response_model=HealthResponse, summary="Liveness")
async def healthz() -> Response:
    """200 while the process serves (also while models are still loading)."""
    return NumpyJSONResponse({"status": "ok"})


@router.get("/readyz", response_model=ReadyResponse, summary="Readiness", responses=_PROBLEM_503)
async def readyz(request: Request) -> Response:
    """200 when every configured model is loaded and the device worker runs; 503 otherwise,
    and from the moment the server is told to shut down (SIGTERM)."""
    state = get_state(request)
    reason = state.not_ready_reason()
    models = state.model_states()
    if reason is not None:
        retry = 1.0 if state.draining else LOADING_RETRY_S
        raise Problem.unavailable("draining" if state.draining else "not-ready", reason, retry,
                                  extra={"models": models})
    return NumpyJSONResponse({"status": "ready", "models": models})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format."}})
async def metrics(request: Request) -> Response:
    """Request, batch and queue metrics in the Prometheus text format."""
    state = get_state(request)
    state.metrics.queue_rows.set(state.worker.queued_rows() if state.worker is not None else 0)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
