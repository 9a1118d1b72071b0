"""Batching through HTTP: requests share batches, results do not depend on it, and the bounds hold.

The servers here make batching deterministic with ``max_wait_ms`` (a batch waits for rows until it
is full or the wait ends), so the assertions never depend on how fast requests arrive.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import pytest

from tests.server import ServerProcess, running_servers
from tests.tolerance import assert_batch_invariant


M = "/v1/models/moons"


@pytest.fixture(scope="module")
def servers(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServerProcess]]:
    """Three servers started side by side:

    - ``batching``: batches of up to 32 rows, waiting up to 10 s to fill;
    - ``queue``: a queue of 100 rows and batches of 100 that wait up to 60 s to fill;
    - ``deadline``: 0.5 s deadlines, batches that would wait 30 s to fill.
    """
    tmp = tmp_path_factory.mktemp("batching")
    configs = {
        "batching": dict(max_wait_ms=10_000, max_batch_rows=32),
        "queue": dict(max_wait_ms=60_000, max_batch_rows=100, max_queue_rows=100, max_rows=100, max_samples=100),
        "deadline": dict(max_wait_ms=30_000, request_timeout_s=0.5),
    }
    with running_servers({name: (model_repo, cfg) for name, cfg in configs.items()}, tmp) as procs:
        yield procs


async def _post_all(url: str, requests: list[tuple[str, dict[str, Any]]]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(requests), max_keepalive_connections=len(requests))
    async with httpx.AsyncClient(base_url=url, timeout=60.0, limits=limits) as client:
        return list(await asyncio.gather(*(client.post(path, json=body) for path, body in requests)))


def post_concurrently(url: str, requests: list[tuple[str, dict[str, Any]]]) -> list[httpx.Response]:
    return asyncio.run(_post_all(url, requests))


def test_concurrent_requests_share_batches(servers: dict[str, ServerProcess]) -> None:
    server = servers["batching"]
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(64, 2)).round(4).tolist()
    responses = post_concurrently(server.url, [(f"{M}/log_prob", {"inputs": [row]}) for row in rows])
    assert all(r.status_code == 200 for r in responses)
    batches = server.metric("flowserve_batch_rows_count", model="moons", **{"pass": "encode"})
    batched_rows = server.metric("flowserve_batch_rows_sum", model="moons", **{"pass": "encode"})
    batched_requests = server.metric("flowserve_batch_requests_sum", model="moons", **{"pass": "encode"})
    requests = server.metric("flowserve_requests_total", model="moons", operation="log_prob", status="200")
    assert requests == 64 and batched_rows == 64 and batched_requests == 64
    assert batches <= 4, f"64 one-row requests ran in {batches} batches"
    # the answers are each request's own rows
    alone = httpx.post(server.url + f"{M}/log_prob", json={"inputs": rows[:32]}, timeout=60).json()["log_prob"]
    assert_batch_invariant([r.json()["log_prob"][0] for r in responses[:32]], alone, np.float32)


def test_row_log_prob_does_not_depend_on_its_batch(client: httpx.Client, server: ServerProcess) -> None:
    rng = np.random.default_rng(1)
    probe = [[0.3, -0.2], [1.7, 0.1]]
    alone = np.array(client.post(f"{M}/log_prob", json={"inputs": probe}).json()["log_prob"])
    crowd = rng.normal(size=(3000, 2)).tolist()
    answer = client.post(f"{M}/log_prob", json={"inputs": crowd[:1500] + probe + crowd[1500:]})
    assert answer.status_code == 200, answer.text
    inside = answer.json()["log_prob"]
    assert_batch_invariant(inside[1500:1502], alone, np.float32)
    requests = [(f"{M}/log_prob", {"inputs": crowd[i:i + 100]}) for i in range(0, 3000, 100)]
    requests.insert(15, (f"{M}/log_prob", {"inputs": probe}))
    requests += [(f"{M}/inverse", {"inputs": crowd[:50]}), (f"{M}/score", {"inputs": crowd[50:90]})]
    responses = post_concurrently(server.url, requests)
    assert all(r.status_code == 200 for r in responses)
    assert_batch_invariant(responses[15].json()["log_prob"], alone, np.float32)
    for i, r in enumerate(responses[:15] + responses[16:31]):
        assert_batch_invariant(r.json()["log_prob"], inside_rows(inside, i), np.float32)


def inside_rows(inside: list[float], i: int) -> list[float]:
    """Rows ``100 i .. 100 i + 99`` of the crowd, within the answer that had the probe at 1500."""
    start = 100 * i + (2 if 100 * i >= 1500 else 0)
    return inside[start:start + 100]


def test_same_seed_same_samples_under_load(client: httpx.Client, server: ServerProcess) -> None:
    body = {"n": 64, "seed": 1234, "return_latents": True, "return_log_prob": True}
    reference = client.post(f"{M}/sample", json=body).json()
    rng = np.random.default_rng(2)
    requests: list[tuple[str, dict[str, Any]]] = []
    for k in range(24):
        if k % 3 == 0:
            requests.append((f"{M}/sample", body))
        elif k % 3 == 1:
            requests.append((f"{M}/sample", {"n": int(rng.integers(1, 200)), "seed": k}))
        else:
            requests.append((f"{M}/forward", {"latents": rng.normal(size=(50, 2)).tolist()}))
    requests.append(("/v1/models/cond/sample", {"n": 64, "seed": 1234, "context": [1, 0, 0]}))
    responses = post_concurrently(server.url, requests)
    assert all(r.status_code == 200 for r in responses)
    same = [r.json() for (_, b), r in zip(requests, responses) if b is body]
    assert len(same) == 8
    for answer in same:
        assert answer["latents"] == reference["latents"]  # drawn per request on the CPU: bit for bit
        np.testing.assert_allclose(answer["samples"], reference["samples"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(answer["log_prob"], reference["log_prob"], rtol=1e-5, atol=1e-5)
    assert responses[-1].json()["samples"] != reference["samples"]


def test_queue_full_is_503_with_retry_after(servers: dict[str, ServerProcess]) -> None:
    server = servers["queue"]
    first: dict[str, httpx.Response] = {}
    rows = np.random.default_rng(3).normal(size=(100, 2)).tolist()

    def send_first() -> None:
        first["r"] = httpx.post(server.url + f"{M}/log_prob", json={"inputs": rows[:60]}, timeout=120)

    sender = threading.Thread(target=send_first)
    sender.start()
    try:
        # the 60 rows wait in the queue for a batch of 100 rows
        end = time.monotonic() + 60
        while server.metric("flowserve_queue_rows") < 60:
            assert time.monotonic() < end, "the first request never reached the queue"
            time.sleep(0.02)
        with server.client() as c:
            for path, body in ((f"{M}/log_prob", {"inputs": rows[:60]}), (f"{M}/sample", {"n": 60})):
                r = c.post(path, json=body)
                assert r.status_code == 503, r.text
                assert r.headers["content-type"] == "application/problem+json"
                assert int(r.headers["retry-after"]) >= 1
                assert r.json()["type"].endswith(":queue-full") and "queue is full" in r.json()["detail"]
            # 40 more rows fit exactly, fill the batch, and both requests are answered
            r = c.post(f"{M}/log_prob", json={"inputs": rows[60:]})
            assert r.status_code == 200 and len(r.json()["log_prob"]) == 40
    finally:
        sender.join(120)
    assert first["r"].status_code == 200 and len(first["r"].json()["log_prob"]) == 60
    assert server.metric("flowserve_requests_total", operation="log_prob", status="503") == 1
    assert server.metric("flowserve_requests_total", operation="sample", status="503") == 1


def test_deadline_passed_in_the_queue_is_504_and_never_computed(servers: dict[str, ServerProcess]) -> None:
    server = servers["deadline"]
    with server.client() as c:
        r = c.post(f"{M}/log_prob", json={"inputs": [[0.5, 0.25]]})
        assert r.status_code == 504, r.text
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["type"].endswith(":deadline-exceeded") and "deadline (0.5 s)" in r.json()["detail"]
        r = c.post(f"{M}/sample", json={"n": 3, "seed": 1})
        assert r.status_code == 504
    assert server.metric("flowserve_batch_rows_count") == 0  # nothing ran
    assert server.metric("flowserve_requests_total", status="504") == 2
    assert server.metric("flowserve_queue_rows") == 0
