"""The operation router (:mod:`service.http.router`) is the one router of the operation POSTs.

The app of :func:`service.http.create_app` answers every operation ``POST`` with its router, ahead
of FastAPI, in every configuration; FastAPI's operation routes only document them. In this
process, uvicorn servers on loopback ports serve two apps of the same settings:

- ``plain``: app A as it is (it runs A's lifespan);
- ``mounted``: app A behind uvicorn's ``root_path="/prefix"`` (as behind a proxy that strips
  ``/prefix``: the scope's ``root_path`` is ``/prefix`` and its path starts with it);
- ``debug``: app B, with FastAPI's own ``root_path="/prefix"`` and ``debug=True``.

A pure ASGI middleware added to both apps records every request that reaches FastAPI's middleware,
so the tests see which requests the router answered without FastAPI. Every request of
:data:`COMMON` (and, where the server has API keys, :data:`KEYED`) goes to all three: ``plain``
must answer the status the table gives; ``mounted`` and ``debug`` the same status, headers (but
``date``) and body byte for byte once ``/prefix`` is taken out of what they write (the problem's
``instance``, ``Location``); the requests the router should take never reach FastAPI on any of
them, and the handler's metrics count them. In debug mode a bug gets Starlette's traceback.

Before the app's lifespan ran (driven in-process with ``httpx.ASGITransport``) operations answer
503 ``not-ready`` with ``Retry-After``, with or without a ``root_path``. A ``flowserve serve``
subprocess (the real wiring, load shedding in front) answers as the in-process app. The OpenAPI
document still lists every operation of :data:`service.serving.table.TABLE`, on both paths, from
the documenting routes.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from service.http import create_app
from service.http.router import match_operation, route_path
from service.http.routes.operations import ENDPOINTS
from service.http.schemas import REQUEST_MODELS, RESPONSE_MODELS
from service.serving import operations
from service.serving.table import TABLE
from service.settings import load_settings
from tests.server import free_port, metric_value, start_server


M = "/v1/models"
KEY = "fast-key"
#: small enough that a few hundred rows are over it
MAX_BODY = 2048
LIMITS = dict(max_body_bytes=MAX_BODY, max_rows=50)
SETTINGS = dict(device="cpu", log_level="warning", **LIMITS)
X = [[0.1, 0.2], [1.0, -0.5]]


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


@dataclass(frozen=True)
class Req:
    """One request, what it must answer, and whether the operation router answers it (else FastAPI does)."""

    method: str
    path: str
    status: int
    fast: bool
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    #: send the API key where the server has keys (the auth rows send their own Authorization)
    auth: bool = True
    #: whether the servers' answers must be equal; not where they rightly differ: a card's drift counts
    #: (what its app served), the OpenAPI document's ``servers`` (FastAPI lists the ``root_path`` there)
    compared: bool = True

    def __str__(self) -> str:
        return f"{self.method} {self.path} {self.headers or ''}"


JSON_CT = {"content-type": "application/json"}

#: requests whose answer does not depend on whether the server has API keys (they carry a good one)
COMMON: tuple[Req, ...] = (
    # answers
    Req("POST", f"{M}/moons/log_prob", 200, True, _json({"inputs": X}), JSON_CT),
    Req("POST", f"{M}/moons/versions/1/log_prob", 200, True, _json({"inputs": X}), JSON_CT),
    Req("POST", f"{M}/moons/inverse", 200, True, _json({"inputs": X}), JSON_CT),
    Req("POST", f"{M}/moons/versions/2/forward", 200, True, _json({"latents": X}), JSON_CT),
    Req("POST", f"{M}/moons/sample", 200, True, _json({"n": 3, "seed": 7, "return_latents": True}), JSON_CT),
    Req("POST", f"{M}/moons/sample?n=2&seed=3", 200, True),
    Req("POST", f"{M}/moons/score", 200, True, _json({"inputs": X, "alpha": 0.1}), JSON_CT),
    Req("POST", f"{M}/cond/versions/1/log_prob", 200, True,
        _json({"inputs": X, "context": [[1, 0, 0], [0, 0, 1]]}), JSON_CT),
    Req("POST", f"{M}/moons/log_prob", 200, True, _json({"inputs": X}), {**JSON_CT, "accept": "application/x-npy"}),
    Req("POST", f"{M}/moons/log_prob", 200, True, _npy(np.array(X)), {"content-type": "application/x-npy"}),
    Req("POST", f"{M}/moons/log_prob", 200, True, _json({"inputs": X})),  # no Content-Type: JSON
    # problems raised by the handler
    Req("POST", f"{M}/moons/log_prob", 406, True, _json({"inputs": X}), {**JSON_CT, "accept": "text/html"}),
    Req("POST", f"{M}/moons/log_prob", 400, True, b'{"inputs": [[1, 2]', JSON_CT),
    Req("POST", f"{M}/moons/log_prob", 415, True, b"1,2\n3,4\n", {"content-type": "text/plain"}),
    Req("POST", f"{M}/moons/log_prob", 413, True, _json({"inputs": [[0.25, 0.5]] * 300}), JSON_CT),
    Req("POST", f"{M}/moons/log_prob", 413, True, _json({"inputs": [[0, 0]] * 60}), JSON_CT),  # rows > max_rows
    Req("POST", f"{M}/moons/log_prob", 400, True, _json({"inputs": [[1, 2, 3]]}), JSON_CT),
    Req("POST", f"{M}/moons/log_prob", 422, True, _json({"inputs": X, "colour": 1}), JSON_CT),
    Req("POST", f"{M}/moons/log_prob?seed=3", 422, True, _json({"inputs": X}), JSON_CT),
    Req("POST", f"{M}/moons/sample", 422, True, _json({"n": 0}), JSON_CT),
    Req("POST", f"{M}/nocal/score", 409, True, _json({"inputs": X}), JSON_CT),
    Req("POST", f"{M}/cond/log_prob", 400, True, _json({"inputs": X}), JSON_CT),
    Req("POST", f"{M}/nope/log_prob", 404, True, _json({"inputs": X}), JSON_CT),
    Req("POST", f"{M}/moons/versions/9/score", 404, True, _json({"inputs": X}), JSON_CT),
    Req("POST", f"{M}/moons/versions/latest/log_prob", 404, True, _json({"inputs": X}), JSON_CT),
    Req("POST", f"{M}/mo%20ons/log_prob", 404, True, _json({"inputs": X}), JSON_CT),  # decoded: 'mo ons'
    Req("POST", f"{M}/versions/log_prob", 404, True, _json({"inputs": X}), JSON_CT),  # a model named 'versions'
    # not the operations' paths or methods: FastAPI answers
    Req("POST", f"{M}/moons/log_prob%0A", 404, False, _json({"inputs": X}), JSON_CT),  # a documenting route's 404
    Req("POST", f"{M}/moons/log_prob/", 307, False, _json({"inputs": X}), JSON_CT),
    Req("POST", f"{M}/moons/versions/1/log_prob/", 307, False, _json({"inputs": X}), JSON_CT),
    Req("GET", f"{M}/moons/log_prob", 405, False),
    Req("HEAD", f"{M}/moons/sample", 405, False),
    Req("PUT", f"{M}/moons/versions/1/score", 405, False, _json({"inputs": X}), JSON_CT),
    Req("POST", f"{M}/moons/nope", 404, False, _json({"inputs": X}), JSON_CT),
    Req("POST", f"{M}/moons/LOG_PROB", 404, False, _json({"inputs": X}), JSON_CT),
    Req("POST", f"{M}//log_prob", 404, False, _json({"inputs": X}), JSON_CT),
    Req("POST", f"{M}/moons/versions//log_prob", 404, False, _json({"inputs": X}), JSON_CT),
    Req("POST", f"{M}/moons%2Fx/log_prob", 404, False, _json({"inputs": X}), JSON_CT),  # decoded: three segments
    Req("POST", f"{M}/moons/1/log_prob", 404, False, _json({"inputs": X}), JSON_CT),
    Req("POST", f"{M}/moons/versions/1/2/log_prob", 404, False, _json({"inputs": X}), JSON_CT),
    Req("GET", f"{M}/moons", 200, False, compared=False),
    Req("GET", f"{M}/moons/versions/1", 200, False, compared=False),
    Req("GET", "/healthz", 200, False),
    Req("GET", "/openapi.json", 200, False, compared=False),
    Req("POST", "/v2/models/moons/infer", 200, False,
        _json({"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP64", "data": [0.1, 0.2, 1.0, -0.5]}]}),
        JSON_CT),
)

#: where the server has API keys: requests without a good one
KEYED: tuple[Req, ...] = (
    Req("POST", f"{M}/moons/log_prob", 401, True, _json({"inputs": X}), JSON_CT, auth=False),
    Req("POST", f"{M}/moons/versions/1/sample", 401, True, _json({"n": 2}), JSON_CT, auth=False),
    Req("POST", f"{M}/nope/score", 401, True, _json({"inputs": X}), JSON_CT, auth=False),  # before the lookup
    Req("POST", f"{M}/moons/log_prob", 401, True, _json({"inputs": X}),
        {**JSON_CT, "authorization": "Basic a2V5OmtleQ=="}, auth=False),
    Req("POST", f"{M}/moons/log_prob", 401, True, _json({"inputs": X}), {**JSON_CT, "authorization": "Bearer"},
        auth=False),
    Req("POST", f"{M}/moons/inverse", 403, True, _json({"inputs": X}),
        {**JSON_CT, "authorization": "Bearer not-the-key"}, auth=False),
    Req("POST", f"{M}/moons/log_prob", 200, True, _json({"inputs": X}),
        {**JSON_CT, "authorization": f"bearer  {KEY}"}, auth=False),
    Req("GET", f"{M}/moons/log_prob", 405, False, auth=False),
    Req("GET", f"{M}/moons", 401, False, auth=False),
)


# -- servers in this process ----------------------------------------------------------------------
PREFIX = "/prefix"


class Recorder:
    """Pure ASGI middleware: notes ``(port, method, path)`` of every HTTP request reaching FastAPI."""

    def __init__(self, app: ASGIApp, seen: list[tuple[int, str, str]]) -> None:
        self.app = app
        self.seen = seen

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.seen.append((scope["server"][1], scope["method"], scope["path"]))
        await self.app(scope, receive, send)


class Servers:
    """Apps A and B of one set of settings, served as ``plain``, ``mounted`` and ``debug`` (see the module)."""

    NAMES = ("plain", "mounted", "debug")

    def __init__(self, model_repo: Path, **settings: Any) -> None:
        self.settings = load_settings(model_dir=str(model_repo), **settings)
        self.seen: list[tuple[int, str, str]] = []
        self.app = create_app(self.settings)
        debug_app = create_app(self.settings)
        debug_app.root_path, debug_app.debug = PREFIX, True
        for app in (self.app, debug_app):
            app.add_middleware(Recorder, seen=self.seen)
        self.ports = {name: free_port() for name in self.NAMES}
        self.urls = {name: f"http://127.0.0.1:{port}" for name, port in self.ports.items()}
        common = dict(host="127.0.0.1", log_level="warning", log_config=None, server_header=False)

        def server(name: str, app: FastAPI, **extra: Any) -> uvicorn.Server:
            return uvicorn.Server(uvicorn.Config(app, port=self.ports[name], **common, **extra))

        self._servers = [server("plain", self.app, lifespan="on"),
                         server("mounted", self.app, lifespan="off", root_path=PREFIX),
                         server("debug", debug_app, lifespan="on")]
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)

    async def _serve(self) -> None:
        await asyncio.gather(*(s.serve() for s in self._servers))

    def __enter__(self) -> "Servers":
        self._thread.start()
        end = time.monotonic() + 120
        with httpx.Client(timeout=5.0) as c:
            while time.monotonic() < end:
                assert self._thread.is_alive(), "the in-process servers stopped"
                try:
                    if all(s.started for s in self._servers) and all(
                            c.get(url + "/readyz").status_code == 200 for url in self.urls.values()):
                        return self
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
        raise RuntimeError("in-process servers not ready after 120 s")

    def __exit__(self, *exc: Any) -> None:
        for s in self._servers:
            s.should_exit = True
        self._thread.join(60)

    def reached_fastapi(self, name: str) -> list[tuple[str, str]]:
        return [(method, path) for port, method, path in self.seen if port == self.ports[name]]


@pytest.fixture(scope="module", params=["open", "keyed"])
def servers(request: pytest.FixtureRequest, model_repo: Path) -> Iterator[Servers]:
    extra = {"api_keys": KEY} if request.param == "keyed" else {}
    with Servers(model_repo, **SETTINGS, **extra) as s:
        yield s


# -- comparing answers ----------------------------------------------------------------------------
def _send(client: httpx.Client, req: Req, keyed: bool) -> httpx.Response:
    headers = dict(req.headers)
    if keyed and req.auth:
        headers["authorization"] = f"Bearer {KEY}"
    return client.request(req.method, req.path, headers=headers, content=req.body)


#: a time in an answer (a model card's load time differs between apps A and B)
TIME = re.compile(rb'"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)"')


def _seen(response: httpx.Response, base: str) -> tuple[int, list[tuple[str, str]], bytes]:
    """Status, headers and body, with the server's own URL made neutral, ``/prefix`` taken out and times
    masked; without ``date`` and ``content-length`` (the body's length, which ``/prefix`` changes)."""
    headers = [(k, v.replace(base, "BASE").replace(PREFIX, "")) for k, v in response.headers.multi_items()
               if k not in ("date", "content-length")]
    return response.status_code, headers, TIME.sub(b'"TIME"', response.content.replace(PREFIX.encode(), b""))


def _compare(reference_url: str, urls: list[str], requests: tuple[Req, ...], keyed: bool) -> None:
    """Each request answers at ``reference_url`` the status the table says, and the same at each of ``urls``."""
    clients = [httpx.Client(base_url=url, timeout=60.0) for url in (reference_url, *urls)]
    try:
        for req in requests:
            want = _seen(_send(clients[0], req, keyed), reference_url)
            assert want[0] == req.status, f"{req}: answered {want[0]}, the table says {req.status}"
            for url, client in zip(urls, clients[1:]):
                if not req.compared:
                    assert _send(client, req, keyed).status_code == req.status, f"{req}: {url}"
                    continue
                assert _seen(_send(client, req, keyed), url) == want, f"{req}: {url} answers otherwise"
    finally:
        for client in clients:
            client.close()


def _table(keyed: bool) -> tuple[Req, ...]:
    return COMMON + KEYED if keyed else COMMON


def test_answers_are_the_same_with_root_path_and_debug(servers: Servers) -> None:
    keyed = bool(servers.settings.api_keys)
    _compare(servers.urls["plain"], [servers.urls["mounted"], servers.urls["debug"]], _table(keyed), keyed)


def test_operations_never_reach_fastapi_and_the_rest_does(servers: Servers) -> None:
    keyed = bool(servers.settings.api_keys)
    table = _table(keyed)
    del servers.seen[:]
    for url in servers.urls.values():
        with httpx.Client(base_url=url, timeout=60.0) as client:
            for req in table:
                _send(client, req, keyed)
    # the paths as FastAPI sees them: percent-decoded, without the query; uvicorn's root_path in front
    expected = [(req.method, httpx.URL(req.path).path) for req in table if not req.fast]
    assert servers.reached_fastapi("plain") == expected
    assert servers.reached_fastapi("debug") == expected
    assert servers.reached_fastapi("mounted") == [(method, PREFIX + path) for method, path in expected]


def test_metrics_count_the_routers_answers(servers: Servers) -> None:
    """The handler's own bookkeeping runs for the router's answers: each is counted once, by status."""
    keyed = bool(servers.settings.api_keys)

    def count(status: str) -> float:
        text = httpx.get(servers.urls["plain"] + "/metrics", timeout=10.0).text
        return metric_value(text, "flowserve_requests_total", operation="score", status=status)

    before_ok, before_404 = count("200"), count("404")
    for url in (servers.urls["plain"], servers.urls["mounted"]):  # both app A
        with httpx.Client(base_url=url, timeout=60.0) as client:
            for _ in range(3):
                assert _send(client, Req("POST", f"{M}/moons/score", 200, True, _json({"inputs": X}), JSON_CT),
                             keyed).status_code == 200
            assert _send(client, Req("POST", f"{M}/moons/versions/7/score", 404, True, _json({"inputs": X}),
                                     JSON_CT), keyed).status_code == 404
    assert count("200") - before_ok == 6
    assert count("404") - before_404 == 2


def _bug(*args: Any, **kwargs: Any) -> Any:
    raise ValueError("a bug inside serving, not the client's input")


def test_a_bug_is_a_problem_and_in_debug_mode_a_traceback(servers: Servers, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without ``debug`` the catch-all handler's 500 problem; with it Starlette's traceback, as its
    ``ServerErrorMiddleware`` gives in debug mode (the servers run in this process, so the patch reaches them)."""
    keyed = bool(servers.settings.api_keys)
    req = Req("POST", f"{M}/moons/log_prob", 500, True, _json({"inputs": X}), JSON_CT)
    monkeypatch.setattr(operations, "log_prob", _bug)
    for name in ("plain", "mounted"):
        with httpx.Client(base_url=servers.urls[name], timeout=60.0) as client:
            r = _send(client, req, keyed)
        assert r.status_code == 500 and r.headers["content-type"] == "application/problem+json", (name, r.text)
        assert r.json()["type"] == "urn:flowserve:problem:internal-error" and "a bug inside" not in r.text
    with httpx.Client(base_url=servers.urls["debug"], timeout=60.0) as client:
        r = _send(client, req, keyed)
    assert r.status_code == 500 and r.headers["content-type"].startswith("text/plain"), r.text
    assert "Traceback" in r.text and "ValueError: a bug inside serving" in r.text


def test_not_ready_answers(model_repo: Path) -> None:
    """Before the lifespan ran (no worker, no models) operations answer 503 ``not-ready`` with
    ``Retry-After``, the same with a ``root_path`` as without."""
    app = create_app(load_settings(model_dir=str(model_repo), **SETTINGS))  # its lifespan never runs here

    def client(root_path: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, root_path=root_path), base_url="http://t")

    async def answers() -> None:
        async with client("") as plain, client(PREFIX) as mounted:
            for path in (f"{M}/moons/log_prob", f"{M}/moons/versions/1/score"):
                want = await plain.post(path, json={"inputs": X})
                got = await mounted.post(path, json={"inputs": X})
                assert want.status_code == 503 and want.headers["retry-after"] == "5"
                assert want.json()["type"] == "urn:flowserve:problem:not-ready"
                assert (got.status_code, got.headers.multi_items(), got.content) == \
                    (want.status_code, want.headers.multi_items(), want.content)

    asyncio.run(answers())


# -- the wiring of `flowserve serve` --------------------------------------------------------------
def test_flowserve_serve_answers_as_the_app(model_repo: Path, tmp_path: Path) -> None:
    """A ``flowserve serve`` subprocess (load shedding in front of the app) against the app in this process."""
    with start_server(model_repo, tmp_path, api_keys=KEY, **LIMITS) as served:  # device cpu, log level warning
        with Servers(model_repo, api_keys=KEY, **SETTINGS) as reference:
            _compare(reference.urls["plain"], [served.url], COMMON + KEYED, keyed=True)


# -- the documentation ----------------------------------------------------------------------------
@pytest.mark.parametrize("keyed", [False, True])
def test_the_document_lists_every_operation_on_both_paths(keyed: bool) -> None:
    """The documenting routes give each operation of the table, on both paths, with its models."""
    doc = create_app(load_settings(device="cpu", **({"api_keys": KEY} if keyed else {}))).openapi()
    schemas = doc["components"]["schemas"]
    documented = {path for path in doc["paths"] if path.startswith(f"{M}/{{name}}/")
                  and "post" in doc["paths"][path]}
    assert documented == {p for op in TABLE for p in (f"{M}/{{name}}/{op.name}",
                                                      f"{M}/{{name}}/versions/{{version}}/{op.name}")}
    for op in TABLE:
        for path, op_id, params in ((f"{M}/{{name}}/{op.name}", op.name, ["name"]),
                                    (f"{M}/{{name}}/versions/{{version}}/{op.name}", f"{op.name}_version",
                                     ["name", "version"])):
            item = doc["paths"][path]
            assert set(item) == {"post"}, path
            post = item["post"]
            assert post["operationId"] == op_id and post["tags"] == ["operations"]
            assert post["summary"].startswith(op.summary) and post["description"].startswith(op.description)
            assert [p["name"] for p in post["parameters"] if p["in"] == "path"] == params
            request = post["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
            assert request == REQUEST_MODELS[op.name].__name__ and request in schemas
            answer = post["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
            assert answer == RESPONSE_MODELS[op.name].__name__ and answer in schemas
            assert set(schemas[answer]["properties"]) >= set(op.answer_fields)
            assert ("409" in post["responses"]) == op.needs_calibration
            assert post.get("security") == ([{"APIKey": []}] if keyed else None), path


# -- the matching itself --------------------------------------------------------------------------
@pytest.mark.parametrize("path, expected", [
    ("/v1/models/moons/log_prob", ("moons", None, "log_prob")),
    ("/v1/models/moons/versions/2/score", ("moons", "2", "score")),
    ("/v1/models/mo ons/versions/x y/sample", ("mo ons", "x y", "sample")),
    ("/v1/models/versions/forward", ("versions", None, "forward")),
    ("/v1/models/moons/log_prob/", None),
    ("/v1/models/moons/log_prob\n", None),
    ("/v1/models//log_prob", None),
    ("/v1/models/moons/versions//log_prob", None),
    ("/v1/models/moons/other/2/log_prob", None),
    ("/v1/models/moons/nope", None),
    ("/v1/models/log_prob", None),
    ("/v1/models/moons/versions/1", None),
    ("/v2/models/moons/infer", None),
    ("/v1/modelsX/moons/log_prob", None),
])
def test_match_operation(path: str, expected: tuple[str, str | None, str] | None) -> None:
    found = match_operation(path)
    assert (None if found is None else (found[0], found[1], found[2].name)) == expected


def test_every_operation_is_matched_on_both_paths() -> None:
    for endpoint in ENDPOINTS:
        assert match_operation(f"{M}/a/{endpoint.name}") == ("a", None, endpoint)
        assert match_operation(f"{M}/a/versions/3/{endpoint.name}") == ("a", "3", endpoint)


@pytest.mark.parametrize("path, root_path, expected", [
    ("/v1/models/moons/log_prob", "", "/v1/models/moons/log_prob"),
    ("/prefix/v1/models/moons/log_prob", "/prefix", "/v1/models/moons/log_prob"),
    ("/v1/models/moons/log_prob", "/prefix", "/v1/models/moons/log_prob"),  # a proxy stripped it
    ("/prefixed/v1/models/moons/log_prob", "/prefix", "/prefixed/v1/models/moons/log_prob"),
    ("/prefix", "/prefix", ""),
])
def test_route_path_takes_the_root_path_out(path: str, root_path: str, expected: str) -> None:
    assert route_path({"type": "http", "path": path, "root_path": root_path}) == expected
