"""``/docs`` (Swagger UI) and ``/redoc`` (ReDoc), served entirely from this package.

FastAPI's own pages load their JavaScript and CSS from a CDN, so they are blank on a machine
without internet. Here the pages are FastAPI's (``get_swagger_ui_html`` / ``get_redoc_html``, its
documented recipe for self-hosting) pointed at files vendored under ``service/http/static`` and
served at :data:`ASSETS_PATH`: ``swagger-ui-dist`` 5.35.0 (Apache-2.0) and ``redoc`` 2.5.4 (MIT),
unmodified from their npm packages, with their licences beside them (``static/README.md`` says
where each came from). ReDoc is told not to load Google Fonts, and Swagger UI not to call the
online validator, and both pages carry a ``Content-Security-Policy`` that lets them load and call
nothing but this server (ReDoc's sidebar logo, from cdn.redoc.ly, is blocked by it).

Swagger UI opens with "Try it out" on, so a path's ``{name}`` and ``{version}`` start filled with the
example :mod:`service.http.openapi` gives them: a model this server actually holds.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

__all__ = ["ASSETS_PATH", "CONTENT_SECURITY_POLICY", "STATIC_DIR", "install"]

#: the vendored files (``swagger-ui/``, ``redoc/``)
STATIC_DIR = Path(__file__).resolve().parent / "static"
#: where they are served
ASSETS_PATH = "/docs/assets"

#: the pages may load and call nothing but this server: ReDoc's sidebar shows a logo from
#: cdn.redoc.ly that no option turns off, which this policy blocks (the page hides it on the error)
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
                           "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'")

SWAGGER_PARAMETERS = {
    "tryItOutEnabled": True,  # editable at once, path parameters prefilled with their examples
    "validatorUrl": None,  # no badge fetched from validator.swagger.io
    "displayRequestDuration": True,
}


def install(app: FastAPI, docs_url: str = "/docs", redoc_url: str = "/redoc") -> None:
    """Serve Swagger UI at ``docs_url`` and ReDoc at ``redoc_url`` from the vendored files.

    Create the app with ``docs_url=None, redoc_url=None`` so FastAPI's CDN pages are not registered.
    """
    app.mount(ASSETS_PATH, StaticFiles(directory=STATIC_DIR), name="docs-assets")
    swagger = f"{ASSETS_PATH}/swagger-ui"

    def openapi_url(request: Request) -> str:
        return request.scope.get("root_path", "").rstrip("/") + (app.openapi_url or "/openapi.json")

    @app.get(docs_url, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        page = get_swagger_ui_html(openapi_url=openapi_url(request), title=f"{app.title} - Swagger UI",
                                   swagger_js_url=f"{root}{swagger}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{root}{swagger}/swagger-ui.css",
                                   swagger_favicon_url=f"{root}{swagger}/favicon-32x32.png",
                                   swagger_ui_parameters=SWAGGER_PARAMETERS)
        page.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        return page

    @app.get(redoc_url, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        page = get_redoc_html(openapi_url=openapi_url(request), title=f"{app.title} - ReDoc",
                              redoc_js_url=f"{root}{ASSETS_PATH}/redoc/redoc.standalone.js",
                              redoc_favicon_url=f"{root}{swagger}/favicon-32x32.png", with_google_fonts=False)
        page.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        return page
