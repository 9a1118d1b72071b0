"""The FastAPI routes, one module per area; :func:`service.http.app.create_app` includes their routers.

- :mod:`~service.http.routes.health`: ``/healthz``, ``/readyz`` and ``/metrics``.
- :mod:`~service.http.routes.models`: the catalogue, ``/v1/models`` and a model's card and versions.
- :mod:`~service.http.routes.operations`: the five operations under ``/v1/models/{name}``; their
  ``POST`` requests are answered by :mod:`service.http.router` (the fast router that ``flowserve
  serve`` puts in front of the app; it calls the same handler) before FastAPI sees them. The
  routes stay registered for ``/docs``, ``/openapi.json`` and apps served without the fast router.
- :mod:`~service.http.routes.admin`: ``/v1/admin/models/{name}/load``, ``/reload``, ``/unload``.
- :mod:`~service.http.routes.v2`: the Open Inference Protocol (KServe v2) under ``/v2``.
"""

from service.http.routes import health, models, operations

__all__ = ["health", "models", "operations"]
