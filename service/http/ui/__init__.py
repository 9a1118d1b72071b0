"""The web dashboard at ``/ui``: static files only, talking to the server through its public HTTP API.

Everything the browser needs is in :data:`STATIC_DIR` (HTML, CSS, plain JavaScript modules and the
vendored charting library), so the dashboard works with no network. :func:`mount` serves that
folder at ``/ui/`` and redirects ``/ui`` there; the pages themselves call ``/v1/models``, the
operation endpoints and ``/metrics`` like any other client, so they see exactly what users see.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.responses import RedirectResponse
from starlette.staticfiles import StaticFiles

__all__ = ["PREFIX", "STATIC_DIR", "mount"]

#: the folder of the dashboard's files (shipped as package data)
STATIC_DIR = Path(__file__).resolve().parent / "static"
#: where the dashboard is served
PREFIX = "/ui"


def mount(app: FastAPI) -> None:
    """Serve :data:`STATIC_DIR` at ``/ui/`` (``index.html`` for the folder) and redirect ``/ui`` to it.

    The redirect keeps the pages' relative links (``js/app.js``) resolving under ``/ui/``. Neither
    route appears in the OpenAPI document: they are not part of the API.
    """

    async def to_folder() -> RedirectResponse:
        return RedirectResponse(PREFIX + "/", status_code=307)

    app.add_api_route(PREFIX, to_folder, methods=["GET", "HEAD"], include_in_schema=False)
    app.mount(PREFIX, StaticFiles(directory=STATIC_DIR, html=True), name="ui")
