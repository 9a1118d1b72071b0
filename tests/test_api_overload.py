"""Load shedding: with a deadline the loop cannot keep, operations are answered 503 + Retry-After
at once instead of waiting; health and metrics are never shed; the lag is exported.

The server is overloaded by many concurrent connections on 2 shared cores with a 0.1 s deadline
(shedding past 0.05 s of estimated wait). The test checks the mechanism, with generous bounds.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from tests.server import start_server


CONNECTIONS = 200
ROUNDS = 3


async def _load(url: str) -> tuple[list[httpx.Response], list[BaseException]]:
    limits = httpx.Limits(max_connections=CONNECTIONS, max_keepalive_connections=CONNECTIONS)
    answers: list[httpx.Response] = []
    failures: list[BaseException] = []
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        async def one() -> None:
            for _ in range(ROUNDS):
                try:
                    answers.append(await client.post("/v1/models/moons/log_prob", json={"inputs": [[0.5, 0.2]]}))
                except httpx.TransportError as e:
                    failures.append(e)
        await asyncio.gather(*(one() for _ in range(CONNECTIONS)))
    return answers, failures


def test_an_overloaded_loop_sheds_operations_with_503_and_retry_after(model_repo: Path, tmp_path: Path) -> None:
    server = start_server(model_repo, tmp_path, request_timeout_s=0.1, shed_wait_fraction=0.5)
    try:
        answers, failures = asyncio.run(_load(server.url))
        assert not failures, failures[:3]
        statuses = [r.status_code for r in answers]
        shed = [r for r in answers if r.status_code == 503]
        assert shed, f"nothing was shed: {sorted(set(statuses))}"
        for r in shed[:20]:
            assert r.headers["content-type"] == "application/problem+json"
            assert r.json()["type"].endswith(":overloaded"), r.text
            assert int(r.headers["retry-after"]) >= 1
        assert set(statuses) <= {200, 503, 504}, sorted(set(statuses))
        # the counter saw each refusal; the lag gauge is exported
        assert server.metric("flowserve_requests_shed_total") == len(shed)
        assert server.metric("flowserve_event_loop_lag_seconds") >= 0
        assert "flowserve_event_loop_lag_seconds" in httpx.get(server.url + "/metrics").text
        # once the load is gone, requests are admitted again
        r = httpx.post(server.url + "/v1/models/moons/log_prob", json={"inputs": [[0.5, 0.2]]}, timeout=10)
        assert r.status_code == 200, r.text
    finally:
        server.terminate()


def test_health_and_metrics_are_never_shed(model_repo: Path, tmp_path: Path) -> None:
    # a fraction of 1e-6 of a 0.01 s deadline: every operation's estimated wait exceeds it
    server = start_server(model_repo, tmp_path, request_timeout_s=0.01, shed_wait_fraction=1e-6)
    try:
        with server.client(timeout=10) as client:
            r = client.post("/v1/models/moons/log_prob", json={"inputs": [[0.5, 0.2]]})
            assert r.status_code == 503 and r.json()["type"].endswith(":overloaded"), r.text
            r = client.post("/v2/models/moons/infer", json={"inputs": []})
            assert r.status_code == 503 and r.json()["type"].endswith(":overloaded"), r.text
            for path in ("/healthz", "/readyz", "/metrics", "/v1/models", "/openapi.json"):
                assert client.get(path).status_code == 200, path
    finally:
        server.terminate()


def test_shedding_can_be_turned_off(model_repo: Path, tmp_path: Path) -> None:
    server = start_server(model_repo, tmp_path, request_timeout_s=0.01, shed_wait_fraction=0)
    try:
        r = httpx.post(server.url + "/v1/models/moons/log_prob", json={"inputs": [[0.5, 0.2]]}, timeout=10)
        assert r.status_code in (200, 504), r.text
        assert server.metric("flowserve_requests_shed_total") == 0
    finally:
        server.terminate()


def test_operations_are_recognised_for_shedding_behind_a_root_path() -> None:
    """Shedding matches paths as the app routes them: less uvicorn's ``root_path`` prefix."""
    from service.http.shedding import is_operation

    def scope(path: str, root: str = "", method: str = "POST") -> dict:
        return {"type": "http", "method": method, "path": path, "root_path": root}

    assert is_operation(scope("/v1/models/moons/log_prob"))
    assert is_operation(scope("/prefix/v1/models/moons/log_prob", "/prefix"))
    assert is_operation(scope("/prefix/v1/models/moons/versions/1/sample", "/prefix"))
    assert is_operation(scope("/prefix/v2/models/moons/infer", "/prefix"))
    assert not is_operation(scope("/prefix/v1/models/moons/log_prob", "/prefix", method="GET"))
    assert not is_operation(scope("/prefix/healthz", "/prefix"))
    assert not is_operation(scope("/prefix/v1/models/moons/nothing", "/prefix"))
