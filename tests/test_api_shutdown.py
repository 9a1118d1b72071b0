"""SIGTERM: readiness turns off at once, every accepted request is answered, then the process exits 0."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from tests.server import ServerProcess, start_server

pytest_plugins = ["tests.fixtures_server"]


def test_sigterm_drains_in_flight_requests(model_repo: Path, tmp_path: Path) -> None:
    # batches wait up to 3 s to fill, so the requests below are certainly in flight at SIGTERM;
    # readiness stays off for 2 s before the listener closes (for load balancers to notice)
    server: ServerProcess = start_server(model_repo, tmp_path, max_wait_ms=3000, drain_delay_s=2.0)
    rows = np.random.default_rng(5).normal(size=(6, 2)).round(3).tolist()
    requests = [("/v1/models/moons/log_prob", {"inputs": [row]}) for row in rows]
    requests += [("/v1/models/moons/sample", {"n": 4, "seed": 9}), ("/v1/models/cond/sample",
                                                                   {"n": 2, "seed": 1, "context": [0, 1, 0]})]
    answers: dict[int, httpx.Response | BaseException] = {}

    def send(i: int, path: str, body: dict) -> None:
        try:
            answers[i] = httpx.post(server.url + path, json=body, timeout=60)
        except BaseException as e:  # noqa: BLE001 - recorded and asserted on below
            answers[i] = e

    threads = [threading.Thread(target=send, args=(i, p, b)) for i, (p, b) in enumerate(requests)]
    try:
        for t in threads:
            t.start()
        end = time.monotonic() + 30
        while server.metric("flowserve_requests_in_flight") < len(requests):
            assert time.monotonic() < end, "the requests never arrived"
            time.sleep(0.02)
        assert server.metric("flowserve_queue_rows") == 6 + 4 + 2  # all waiting in the worker's queues

        server.proc.send_signal(signal.SIGTERM)
        seen_unready = None
        end = time.monotonic() + 30
        while seen_unready is None and time.monotonic() < end:
            r = httpx.get(server.url + "/readyz", timeout=5)
            if r.status_code == 503:
                seen_unready = r
            time.sleep(0.02)
        assert seen_unready is not None, "readyz never turned 503"
        assert seen_unready.json()["type"].endswith(":draining") and int(seen_unready.headers["retry-after"]) >= 1

        for t in threads:
            t.join(60)
        assert server.proc.wait(60) == 0, server.log()
    finally:
        server.terminate()
    for i, (path, _) in enumerate(requests):
        answer = answers[i]
        assert isinstance(answer, httpx.Response), (path, answer)
        assert answer.status_code == 200, (path, answer.text)
    assert [len(answers[i].json()["log_prob"]) for i in range(6)] == [1] * 6
    assert len(answers[6].json()["samples"]) == 4 and len(answers[7].json()["samples"]) == 2

