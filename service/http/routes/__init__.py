"""The FastAPI routes, one module per area; :func:`service.http.app.create_app` includes their routers.

- :mod:`~service.http.routes.health`: ``/healthz``, ``/readyz`` and ``/metrics``.
- :mod:`~service.http.routes.models`: the catalogue, ``/v1/models`` and a model's card and versions.
- :mod:`~service.http.routes.operations`: the operations under ``/v1/models/{name}``: their handler,
  and their routes as documentation only (``/docs``, ``/openapi.json``); every operation ``POST`` is
  answered by the operation router (:mod:`service.http.router`) in front of FastAPI.
- :mod:`~service.http.routes.admin`: ``/v1/admin/models/{name}/load``, ``/reload``, ``/unload``.
- :mod:`~service.http.routes.v2`: the Open Inference Protocol (KServe v2) under ``/v2``.
"""

from service.http.routes import health, models, operations

__all__ = ["health", "models", "operations"]
