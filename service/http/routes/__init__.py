"""The v1 routes, one module per area: health and metrics, the model catalogue, the operations."""

from service.http.routes import health, models, operations

__all__ = ["health", "models", "operations"]
