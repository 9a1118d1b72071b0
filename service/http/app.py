"""The application: :func:`create_app` wires settings, metrics, worker, registry, the operation router and routes."""

from __future__ import annotations

import importlib.metadata
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI
from starlette.types import Receive, Scope, Send

from service.serving.metrics import Metrics
from service.settings import Settings, load_settings
from service.http import ui
from service.http import auth, docs, openapi
from service.http.codecs import binary
from service.http import problems as errors
from service.http.router import OperationRouter
from service.http.routes import admin, health, models, operations, v2
from service.http.state import ServiceState

__all__ = ["FlowserveApp", "create_app"]


def _version() -> str:
    try:
        return importlib.metadata.version("flowserve")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


DESCRIPTION = """
Exact log-densities, latents, samples and anomaly scores from normalizing flows.

* Rows are lists of numbers in the model's feature order, or records keyed by feature name.
* Conditional models need `context` rows; other models refuse them.
* Every error is `application/problem+json` (RFC 9457) with `errors: [{loc, msg}]` for invalid input.
* Answers are strict JSON: non-finite numbers (e.g. a `-inf` log-density far outside the support) are
  written as `null`.
* 503 answers carry `Retry-After`; 504 means the request's deadline passed before it was computed.
* Binary arrays: a `.npy` body (`Content-Type: application/x-npy`) in place of `inputs` / `latents`, other
  fields as query parameters; `.npz` bodies (`application/x-npz`) with arrays `inputs` / `latents` and `context`.
  `Accept: application/x-npy` answers the main array as `.npy`, `Accept: application/x-npz` the whole answer.
* Where the server sets API keys, model endpoints need `Authorization: Bearer <key>` (401 without, 403 wrong);
  `/v1/admin` needs the admin key and is disabled without one.
"""

OPENAPI_TAGS = [
    {"name": "operations", "description": "log_prob, inverse, forward, sample and score on a model."},
    {"name": "models", "description": "The models this server holds and their cards."},
    {"name": "health", "description": "Liveness, readiness and Prometheus metrics."},
    {"name": "administration", "description": "Load, unload and reload models while serving (FLOWSERVE_ADMIN_KEY)."},
]


class FlowserveApp(FastAPI):
    """FastAPI with the operation router in front: the operation POSTs are
    :attr:`operation_router`'s, every other request FastAPI's (:mod:`service.http.router`).

    ``state`` is what the app holds (``app.state.flowserve``); the other arguments are FastAPI's.
    """

    def __init__(self, state: ServiceState, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.state.flowserve = state
        self.operation_router = OperationRouter(self, keyed=bool(state.settings.api_keys))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.root_path:  # as FastAPI does before it routes
            scope["root_path"] = self.root_path
        target = self.operation_router.match(scope)
        if target is None:
            await super().__call__(scope, receive, send)
        else:
            await self.operation_router.answer(scope, receive, send, target)


def create_app(settings: Settings | None = None, metrics: Metrics | None = None) -> FlowserveApp:
    """A new app for ``settings`` (from the environment when ``None``), with its own metrics registry.

    Nothing runs until the app's lifespan starts (the server does that): then the device worker
    starts and the models load in a thread, while ``/healthz`` already answers.
    """
    settings = settings if settings is not None else load_settings()
    state = ServiceState(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.start()
        try:
            yield
        finally:
            await state.stop()

    # docs_url / redoc_url None: FastAPI's pages load their scripts from a CDN; docs.install serves them
    # from the package instead
    app = FlowserveApp(state, title="flowserve", version=_version(), description=DESCRIPTION, lifespan=lifespan,
                       openapi_tags=OPENAPI_TAGS, docs_url=None, redoc_url=None)
    errors.install(app)
    auth.install(app, settings)
    binary.install()
    app.include_router(health.router)
    # Without API keys the model routes carry no key dependency at all: FastAPI's dependency
    # solving (HTTPBearer included) would cost every request on the hot path for a check that
    # always passes.
    keyed = [Depends(auth.require_api_key)] if settings.api_keys else []
    app.include_router(models.router, dependencies=keyed)
    # the operations' documentation (their POSTs are the operation router's; see service/http/router.py)
    app.include_router(operations.router, dependencies=keyed)
    app.include_router(admin.router, dependencies=[Depends(auth.require_admin_key)])
    app.include_router(v2.router)
    openapi.install(app)
    ui.mount(app)  # the dashboard at /ui (static files over the public API)
    docs.install(app)
    return app
