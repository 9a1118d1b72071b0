"""What one running app holds: settings, metrics, the device worker and the model registry.

One :class:`ServiceState` per app (no module globals), reached from a request as
``request.app.state.flowserve``. Its life: :meth:`start` (in the lifespan, before the server
listens) checks the repository, starts the worker and begins loading models in a thread;
:meth:`begin_drain` (SIGTERM) turns ``/readyz`` to 503; :meth:`stop` (lifespan shutdown, after the
server finished its in-flight requests) stops the worker, draining what it accepted.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import Request

from service.serving.batching import BatchingConfig, DeviceWorker
from service.serving.metrics import Metrics
from service.serving.errors import LOADING_RETRY_S, NotReady
from service.serving.registry import ModelRegistry, ModelState, ServedModel
from service.model.repository import ModelRepository
from service.settings import Settings

__all__ = ["LOADING_RETRY_S", "ServiceState", "get_state"]

log = logging.getLogger("flowserve.api")


class ServiceState:
    """The app's long-lived parts."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.worker: DeviceWorker | None = None
        self.registry: ModelRegistry | None = None
        self.draining = False
        self._loading: asyncio.Future | None = None

    # -- life cycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the worker and begin loading the chosen models (errors in the plan stop the server)."""
        s = self.settings
        device = s.resolve_device()
        registry = ModelRegistry(ModelRepository(s.model_dir), device, s.models, trace=s.torchscript,
                                 cuda_graphs=s.cuda_graphs)
        names = registry.plan()
        config = BatchingConfig(max_batch_rows=s.batch_rows_for(device), max_wait_ms=s.max_wait_ms,
                                max_queue_rows=s.max_queue_rows, max_batch_ms=s.max_batch_ms)
        worker = DeviceWorker(device, config, observer=self.metrics)
        worker.start()
        self.worker, self.registry = worker, registry
        self.metrics.monitors.watch(registry)  # per-model flag counts, log-density histogram, drift
        log.info("serving %s from %s on %s", names or "no models", s.model_dir, device)
        self._loading = asyncio.ensure_future(asyncio.to_thread(registry.load_all))
        self._loading.add_done_callback(self._loaded)

    def _loaded(self, future: asyncio.Future) -> None:
        if not future.cancelled() and future.exception() is not None:
            log.error("loading models failed", exc_info=future.exception())
        self.metrics.models_ready.set(1 if self.registry is not None and self.registry.ready else 0)

    def begin_drain(self) -> None:
        """From now on ``/readyz`` answers 503 (the server keeps answering requests)."""
        if not self.draining:
            log.info("draining: /readyz answers 503 from now on")
        self.draining = True

    async def stop(self) -> None:
        """Drain and stop the worker: every request it accepted is answered first."""
        self.begin_drain()
        if self._loading is not None and not self._loading.done():
            await asyncio.wait([self._loading])
        if self.worker is not None:
            await asyncio.to_thread(self.worker.stop, True, self.settings.request_timeout_s + 5.0)

    # -- readiness -------------------------------------------------------------------------------
    def model_states(self) -> dict[str, str]:
        if self.registry is None:
            return {}
        return {e.name: e.state.value for e in self.registry.entries()}

    def not_ready_reason(self) -> str | None:
        """Why the server is not ready, or ``None`` when it is."""
        if self.draining:
            return "the server is shutting down"
        if self.worker is None or not self.worker.running or not self.worker.accepting:
            return "the device worker is not running"
        if self.registry is None:
            return "models are not loaded yet"
        failed = [e for e in self.registry.entries() if e.state is ModelState.FAILED]
        if failed:
            return "; ".join(f"model {e.name!r} failed to load: {e.error}" for e in failed)
        loading = [e.name for e in self.registry.entries() if e.state is ModelState.LOADING]
        if loading:
            return f"loading models {loading}"
        return None

    # -- lookups for handlers --------------------------------------------------------------------
    def lookup(self, name: str, version: str | int | None = None) -> ServedModel:
        """The model for a request; else the domain error that says why not (answered by the status
        table, :data:`service.http.problems.DOMAIN_ANSWERS`): :class:`NotReady` while the server starts,
        the registry's ``ModelNotFound`` / ``VersionNotFound`` (404) and ``ModelNotReady`` (503)."""
        if self.registry is None or self.worker is None:
            raise NotReady("the server is starting", LOADING_RETRY_S)
        return self.registry.get(name, version)


def get_state(request: Request) -> ServiceState:
    return request.app.state.flowserve
