"""The operations' fast path (:mod:`service.http.router`) answers exactly as the FastAPI routes do.

In this process, one app from :func:`service.http.create_app` is served by two uvicorn servers on
loopback ports: ``fast`` serves it behind :class:`OperationFastPath` (as ``flowserve serve`` does,
and runs the app's lifespan through it), ``plain`` serves the FastAPI app itself. A pure ASGI
middleware added to the app records every request that reaches the app, so the tests see which
requests the fast path answered without it. Every request of :data:`COMMON` (and, where the
server has API keys, :data:`KEYED`) goes to both; status, headers (but ``date``) and body must be
equal byte for byte, and the requests the fast path should take must never reach the app. The
handler's metrics still count the fast path's answers.

Before the app's lifespan ran (driven in-process with ``httpx.ASGITransport``) both answer the same
503 ``not-ready`` with ``Retry-After``. Last, a ``flowserve serve`` subprocess (the real wiring)
answers the same requests as the plain FastAPI app of the same settings.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import pytest
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from service.http import create_app
from service.http.router import OperationFastPath, match_operation
from service.http.routes.operations import ENDPOINTS
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
    """One request, what it must answer, and whether the fast path answers it (else the app does)."""

    method: str
    path: str
    status: int
    fast: bool
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    #: send the API key where the server has keys (the auth rows send their own Authorization)
    auth: bool = True

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
    Req("GET", f"{M}/moons", 200, False),
    Req("GET", f"{M}/moons/versions/1", 200, False),
    Req("GET", "/healthz", 200, False),
    Req("GET", "/openapi.json", 200, False),
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
class Recorder:
    """Pure ASGI middleware: notes ``(port, method, path)`` of every HTTP request reaching the app."""

    def __init__(self, app: ASGIApp, seen: list[tuple[int, str, str]]) -> None:
        self.app = app
        self.seen = seen

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.seen.append((scope["server"][1], scope["method"], scope["path"]))
        await self.app(scope, receive, send)


class Pair:
    """One app, served at ``fast`` behind :class:`OperationFastPath` and at ``plain`` as it is."""

    def __init__(self, model_repo: Path, **settings: Any) -> None:
        self.settings = load_settings(model_dir=str(model_repo), **settings)
        self.app = create_app(self.settings)
        self.seen: list[tuple[int, str, str]] = []
        self.app.add_middleware(Recorder, seen=self.seen)
        self.fast_port, self.plain_port = free_port(), free_port()
        self.fast_url = f"http://127.0.0.1:{self.fast_port}"
        self.plain_url = f"http://127.0.0.1:{self.plain_port}"
        common = dict(host="127.0.0.1", log_level="warning", log_config=None, server_header=False)
        # the fast one runs the app's lifespan (so it reaches the app through the wrapper)
        self._fast = uvicorn.Server(uvicorn.Config(OperationFastPath(self.app), port=self.fast_port, lifespan="on",
                                                   **common))
        self._plain = uvicorn.Server(uvicorn.Config(self.app, port=self.plain_port, lifespan="off", **common))
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)

    async def _serve(self) -> None:
        await asyncio.gather(self._fast.serve(), self._plain.serve())

    def __enter__(self) -> "Pair":
        self._thread.start()
        end = time.monotonic() + 120
        with httpx.Client(timeout=5.0) as c:
            while time.monotonic() < end:
                assert self._thread.is_alive(), "the in-process servers stopped"
                try:
                    if (self._plain.started and c.get(self.plain_url + "/readyz").status_code == 200
                            and c.get(self.fast_url + "/readyz").status_code == 200):
                        return self
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
        raise RuntimeError("in-process servers not ready after 120 s")

    def __exit__(self, *exc: Any) -> None:
        self._fast.should_exit = self._plain.should_exit = True
        self._thread.join(60)

    def reached_app(self, port: int) -> list[tuple[str, str]]:
        return [(method, path) for p, method, path in self.seen if p == port]


@pytest.fixture(scope="module", params=["open", "keyed"])
def pair(request: pytest.FixtureRequest, model_repo: Path) -> Iterator[Pair]:
    extra = {"api_keys": KEY} if request.param == "keyed" else {}
    with Pair(model_repo, **SETTINGS, **extra) as p:
        yield p


# -- comparing answers ----------------------------------------------------------------------------
def _send(client: httpx.Client, req: Req, keyed: bool) -> httpx.Response:
    headers = dict(req.headers)
    if keyed and req.auth:
        headers["authorization"] = f"Bearer {KEY}"
    return client.request(req.method, req.path, headers=headers, content=req.body)


def _seen(response: httpx.Response, base: str) -> tuple[int, list[tuple[str, str]], bytes]:
    """Status, headers but ``date`` (the server's own URL in ``location`` made neutral), body."""
    headers = [(k, v.replace(base, "BASE")) for k, v in response.headers.multi_items() if k != "date"]
    return response.status_code, headers, response.content


def _compare(fast_url: str, plain_url: str, requests: tuple[Req, ...], keyed: bool) -> None:
    with httpx.Client(base_url=fast_url, timeout=60.0) as fast, httpx.Client(base_url=plain_url, timeout=60.0) as plain:
        for req in requests:
            want = _seen(_send(plain, req, keyed), plain_url)
            got = _seen(_send(fast, req, keyed), fast_url)
            assert want[0] == req.status, f"{req}: the FastAPI app answered {want[0]}, the table says {req.status}"
            assert got == want, f"{req}: the fast path's answer differs from FastAPI's"


def _table(keyed: bool) -> tuple[Req, ...]:
    return COMMON + KEYED if keyed else COMMON


def test_answers_equal_the_fastapi_routes(pair: Pair) -> None:
    keyed = bool(pair.settings.api_keys)
    _compare(pair.fast_url, pair.plain_url, _table(keyed), keyed)


def test_operations_never_reach_the_app_and_the_rest_does(pair: Pair) -> None:
    keyed = bool(pair.settings.api_keys)
    table = _table(keyed)
    del pair.seen[:]
    with httpx.Client(base_url=pair.fast_url, timeout=60.0) as fast, \
            httpx.Client(base_url=pair.plain_url, timeout=60.0) as plain:
        for req in table:
            _send(fast, req, keyed)
            _send(plain, req, keyed)
    # the paths as the app sees them: percent-decoded, without the query
    expected = [(req.method, httpx.URL(req.path).path) for req in table if not req.fast]
    assert pair.reached_app(pair.fast_port) == expected
    assert pair.reached_app(pair.plain_port) == [(req.method, httpx.URL(req.path).path) for req in table]


def test_metrics_count_the_fast_path_answers(pair: Pair) -> None:
    """The handler's own bookkeeping runs on the fast path: each answer is counted once, by status."""
    keyed = bool(pair.settings.api_keys)

    def count(status: str) -> float:
        text = httpx.get(pair.plain_url + "/metrics", timeout=10.0).text
        return metric_value(text, "flowserve_requests_total", operation="score", status=status)

    before_ok, before_404 = count("200"), count("404")
    with httpx.Client(base_url=pair.fast_url, timeout=60.0) as fast:
        for _ in range(3):
            assert _send(fast, Req("POST", f"{M}/moons/score", 200, True, _json({"inputs": X}), JSON_CT),
                         keyed).status_code == 200
        assert _send(fast, Req("POST", f"{M}/moons/versions/7/score", 404, True, _json({"inputs": X}), JSON_CT),
                     keyed).status_code == 404
    assert count("200") - before_ok == 3
    assert count("404") - before_404 == 1


def test_not_ready_answers_equal(model_repo: Path) -> None:
    """Before the lifespan ran (no worker, no models) both answer the same 503 with ``Retry-After``."""
    app = create_app(load_settings(model_dir=str(model_repo), **SETTINGS))  # its lifespan never runs here

    def client(asgi: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://t")

    async def answers() -> None:
        async with client(app) as plain, client(OperationFastPath(app)) as fast:
            for path in (f"{M}/moons/log_prob", f"{M}/moons/versions/1/score"):
                want = await plain.post(path, json={"inputs": X})
                got = await fast.post(path, json={"inputs": X})
                assert want.status_code == 503 and want.headers["retry-after"] == "5"
                assert want.json()["type"] == "urn:flowserve:problem:not-ready"
                assert (got.status_code, got.headers.multi_items(), got.content) == \
                    (want.status_code, want.headers.multi_items(), want.content)

    asyncio.run(answers())


# -- the wiring of `flowserve serve` --------------------------------------------------------------
def test_flowserve_serve_answers_as_the_fastapi_app(model_repo: Path, tmp_path: Path) -> None:
    """A ``flowserve serve`` subprocess (the app behind the fast path) against the plain FastAPI app."""
    served = start_server(model_repo, tmp_path, api_keys=KEY, **LIMITS)  # device cpu, log level warning
    try:
        with Pair(model_repo, api_keys=KEY, **SETTINGS) as reference:
            _compare(served.url, reference.plain_url, COMMON + KEYED, keyed=True)
    finally:
        served.terminate()


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
