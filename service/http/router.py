"""The five operation endpoints answered without FastAPI's per-request machinery.

Why: the server's event loop is its bottleneck, and profiles of one-row ``POST
/v1/models/moons/log_prob`` at concurrency 64 put about 50-60 µs of the loop's ~330 µs per
request in FastAPI and Starlette rather than in our code: the middleware stack
(``ServerErrorMiddleware``, ``ExceptionTelemetryMiddleware``, ``AppBodyLimitMiddleware``,
``ExceptionMiddleware``, ``AsyncExitStackMiddleware``), matching the path against the ~40 routes
in turn, ``solve_dependencies`` for the path parameters, and ``run_endpoint_function``. None of
it does anything for these routes: their handler takes the raw request, reads and checks the body
itself and raises :class:`~service.http.problems.Problem` for every failure.

What :class:`OperationFastPath` does: it wraps the app of :func:`service.http.create_app` and
answers, itself, every ``POST`` whose path is exactly ``/v1/models/{name}/{op}`` or
``/v1/models/{name}/versions/{version}/{op}``, ``op`` one of :data:`~service.http.routes.operations.ENDPOINTS`
and ``{name}`` / ``{version}`` one non-empty path segment each (Starlette's ``{param}``: ``[^/]+``,
matched against the percent-decoded ``scope["path"]``). For those it does what the route would:

1. ``scope["app"] = app`` (what ``Starlette.__call__`` does; ``get_state`` reads ``request.app``);
2. where the server has API keys, :func:`~service.http.auth.check_api_key`, whose
   :class:`~service.http.auth.AuthError` becomes the same 401 / 403 problem as the route's
   dependency gives (``WWW-Authenticate`` included);
3. :func:`service.http.routes.operations.handle`, the routes' own handler;
4. an exception is answered by the handler the app installed for its class (looked up along its
   MRO as Starlette does): a ``Problem`` as ``problem.response(request.url.path)``, anything else
   as a logged 500 ``internal-error`` (:mod:`service.http.problems`).

Everything else goes to the app unchanged: other paths and methods (``GET`` / ``HEAD`` on an
operation path is still FastAPI's 405 with ``Allow: POST``, a trailing slash its 307 redirect, an
unknown operation its 404), ``/docs`` and ``/openapi.json`` (where the operation routes stay
registered, so they are documented as before), admin, v2, lifespan and websockets. It also steps
aside, passing every request to the app, when requests carry a ``root_path`` or when the app has a
``root_path`` or ``debug`` set. It reads only the app's public attributes (``state``,
``exception_handlers``, ``root_path``, ``debug``): FastAPI's own OpenTelemetry instrumentation (in
the middleware skipped here) does not see operation requests; the service's own metrics
(made in :func:`~service.http.routes.operations.handle`) do. The operations, their paths
and their documentation all come from :data:`service.serving.table.TABLE`.

What differs from the route: middleware added to the app with ``app.add_middleware`` does not see
these requests (the app adds none); and after an unexpected exception (a bug) the 500 is sent and
logged once, and the connection stays open, where Starlette's ``ServerErrorMiddleware`` re-raises
so that uvicorn logs it a second time and closes the connection.
"""

from __future__ import annotations

import inspect

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from service.http.auth import AuthError, check_api_key
from service.http.routes import operations
from service.http.routes.operations import ENDPOINTS, Endpoint

__all__ = ["OperationFastPath", "match_operation"]

#: the operations' common prefix, with its closing slash
PREFIX = operations.router.prefix + "/"
_BY_NAME: dict[str, Endpoint] = {endpoint.name: endpoint for endpoint in ENDPOINTS}


def match_operation(path: str) -> tuple[str, str | None, Endpoint] | None:
    """``(name, version or None, endpoint)`` when ``path`` is an operation's, else ``None``."""
    if not path.startswith(PREFIX):
        return None
    parts = path[len(PREFIX):].split("/")
    if len(parts) == 2:
        name, op = parts
        version = None
    elif len(parts) == 4 and parts[1] == "versions":
        name, _, version, op = parts
        if not version:
            return None
    else:
        return None
    endpoint = _BY_NAME.get(op)
    if endpoint is None or not name:
        return None
    return name, version, endpoint


class OperationFastPath:
    """An ASGI app: the operation requests answered directly, the rest by ``app`` (see the module).

    ``app`` must come from :func:`service.http.create_app` (it reads ``app.state.flowserve``).
    ``self.app`` is that FastAPI app.
    """

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self._keyed = bool(app.state.flowserve.settings.api_keys)  # as create_app decides the dependency
        self._active = not app.root_path and not app.debug

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and self._active:
            target = match_operation(scope["path"])
            if target is not None and not scope.get("root_path"):
                await self._answer(scope, receive, send, *target)
                return
        await self.app(scope, receive, send)

    async def _answer(self, scope: Scope, receive: Receive, send: Send, name: str, version: str | None,
                      endpoint: Endpoint) -> None:
        scope["app"] = self.app
        request = Request(scope, receive, send)
        try:
            if self._keyed:
                try:
                    check_api_key(request)
                except AuthError as e:
                    raise e.problem() from None
            response = await operations.handle(request, name, version, endpoint)
        except Exception as exc:
            response = await self._error_response(request, exc)
        await response(scope, receive, send)

    async def _error_response(self, request: Request, exc: Exception) -> Response:
        """The answer of the exception handler the app installed for ``exc``'s class."""
        handlers = self.app.exception_handlers
        handler = next((handlers[cls] for cls in type(exc).__mro__ if cls in handlers), None)
        if handler is None:
            raise exc
        response = handler(request, exc)
        if inspect.isawaitable(response):
            response = await response
        exc.__traceback__ = None  # as Starlette does: the answer is made, drop the frames it held
        return response
