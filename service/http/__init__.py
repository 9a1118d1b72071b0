"""The HTTP layer: parsing and encoding only (FastAPI + orjson + numpy); see :func:`create_app`."""

from service.http.app import create_app

__all__ = ["create_app"]
