"""The one router of the operation POSTs, ahead of FastAPI's middleware and routes.

Why: the server's event loop is its bottleneck, and profiles of one-row ``POST
/v1/models/moons/log_prob`` at concurrency 64 put about 50-60 µs of the loop's ~330 µs per
request in FastAPI and Starlette rather than in our code: the middleware stack
(``ServerErrorMiddleware``, ``ExceptionTelemetryMiddleware``, ``AppBodyLimitMiddleware``,
``ExceptionMiddleware``, ``AsyncExitStackMiddleware``), matching the path against the ~40 routes
in turn, ``solve_dependencies`` for the path parameters, and ``run_endpoint_function``. None of
it does anything for these requests: their handler takes the raw request, reads and checks the
body itself and raises :class:`~service.http.problems.Problem` for every failure.

Who routes what: the app of :func:`service.http.create_app` (:class:`service.http.app.FlowserveApp`)
hands every request to its :class:`OperationRouter` first. The router takes every ``POST`` whose
route path is exactly ``/v1/models/{name}/{op}`` or ``/v1/models/{name}/versions/{version}/{op}``,
``op`` one of :data:`~service.http.routes.operations.ENDPOINTS` and ``{name}`` / ``{version}`` one
non-empty path segment each (Starlette's ``{param}``: ``[^/]+``, matched against the
percent-decoded path). The route path is what Starlette routes on (:func:`route_path`):
``scope["path"]`` less a ``scope["root_path"]`` prefix, after the app's own ``root_path`` (if
set) was put in the scope as FastAPI does; so the router answers in every configuration, with or
without a ``root_path`` and with ``debug``. For those requests it does what a route would:

1. ``scope["app"] = app`` (what ``Starlette.__call__`` does; ``get_state`` reads ``request.app``);
2. where the server has API keys, :func:`~service.http.auth.check_api_key`, whose
   :class:`~service.http.auth.AuthError` (a domain error) is answered as in step 4: the 401 / 403
   problem (``WWW-Authenticate`` included) that the other model routes' key dependency gives;
3. :func:`service.http.routes.operations.handle`, the operations' handler;
4. an exception is answered by the handler the app installed for its class (looked up along its
   MRO as Starlette does): a ``Problem`` as ``problem.response(request.url.path)``, anything else
   as a logged 500 ``internal-error`` (:mod:`service.http.problems`). With ``app.debug`` set, an
   exception that only the catch-all ``Exception`` handler would answer (a bug) gets Starlette's
   debug traceback instead and is re-raised, as ``ServerErrorMiddleware`` does in debug mode.

Everything else is FastAPI's: other paths and methods, ``/docs`` and ``/openapi.json``, admin,
v2, lifespan and websockets. FastAPI keeps the operation routes registered as their
documentation: they make ``/openapi.json`` and ``/docs``, and Starlette's answers around them
(``GET`` / ``HEAD`` on an operation path is its 405 with ``Allow: POST``, a trailing slash its 307
redirect, an unknown operation its 404). Their endpoints answer no operation: a ``POST`` that
Starlette would route to them is the router's, except a path Starlette's pattern takes and the
router does not (a decoded trailing newline, which ``$`` lets through), which they answer 404 as
no route.

The router reads only public attributes of the app (``state``, ``exception_handlers``,
``root_path``, ``debug``). FastAPI's own OpenTelemetry instrumentation and middleware added with
``app.add_middleware`` (the app adds none) do not see operation requests; the service's own
metrics (made in :func:`~service.http.routes.operations.handle`) do. After an unexpected
exception (a bug) the 500 is sent and logged once, and the connection stays open, where
Starlette's ``ServerErrorMiddleware`` re-raises so that uvicorn logs it a second time and closes
the connection. The operations, their paths and their documentation all come from
:data:`service.serving.table.TABLE`.
"""

from __future__ import annotations

import inspect

from fastapi import FastAPI
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from service.http.auth import check_api_key
from service.http.routes import operations
from service.http.routes.operations import ENDPOINTS, Endpoint

__all__ = ["OperationRouter", "Target", "match_operation", "route_path"]

#: the operations' common prefix, with its closing slash
PREFIX = operations.router.prefix + "/"
_BY_NAME: dict[str, Endpoint] = {endpoint.name: endpoint for endpoint in ENDPOINTS}

#: what a matched path names: the model, its version (``None``: the latest) and the endpoint
Target = tuple[str, str | None, Endpoint]


def route_path(scope: Scope) -> str:
    """The path Starlette routes on: ``scope["path"]`` less the ``scope["root_path"]`` prefix.

    ASGI servers put the ``root_path`` in front of the path (uvicorn's ``--root-path``); a path
    that does not start with it (a proxy that strips the prefix, FastAPI's ``root_path``) is
    routed as it is, as Starlette does.
    """
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        if path == root:
            return ""
        if path[len(root)] == "/":
            return path[len(root):]
    return path


def match_operation(path: str) -> Target | None:
    """``(name, version or None, endpoint)`` when ``path`` (a route path) is an operation's, else ``None``."""
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


class OperationRouter:
    """The operation POSTs of ``app``, answered directly (see the module).

    ``app`` is the FastAPI app the router is in front of: its state (``app.state.flowserve``),
    exception handlers and ``debug`` answer the requests; ``keyed`` says whether they need an
    API key (whether the server has any).
    """

    def __init__(self, app: FastAPI, *, keyed: bool) -> None:
        self.app = app
        self.keyed = keyed

    @staticmethod
    def match(scope: Scope) -> Target | None:
        """The operation ``scope`` asks for, when it is an operation ``POST`` (the router's), else ``None``."""
        if scope["type"] != "http" or scope["method"] != "POST":
            return None
        return match_operation(route_path(scope))

    async def answer(self, scope: Scope, receive: Receive, send: Send, target: Target) -> None:
        """Answer the operation request ``scope`` for ``target`` (what :meth:`match` gave)."""
        scope["app"] = self.app
        request = Request(scope, receive, send)
        try:
            if self.keyed:
                check_api_key(request)  # its errors are answered by their handlers, as the key dependency's
            response = await operations.handle(request, *target)
        except Exception as exc:
            handled_as = next((cls for cls in type(exc).__mro__ if cls in self.app.exception_handlers), None)
            if handled_as is None:
                raise
            if handled_as is Exception and self.app.debug:  # a bug in debug mode: ServerErrorMiddleware's traceback
                await ServerErrorMiddleware(self.app, debug=True).debug_response(request, exc)(scope, receive, send)
                raise
            response = await self._handled(request, exc, handled_as)
        await response(scope, receive, send)

    async def _handled(self, request: Request, exc: Exception, cls: type) -> Response:
        """The answer of the exception handler the app installed for ``cls`` (``exc``'s class or a base)."""
        response = self.app.exception_handlers[cls](request, exc)
        if inspect.isawaitable(response):
            response = await response
        exc.__traceback__ = None  # as Starlette does: the answer is made, drop the frames it held
        return response
