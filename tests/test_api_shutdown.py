"""SIGTERM: readiness turns off at once, every accepted request is answered, then the process exits 0."""

from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from tests.server import ServerProcess, start_server, read_http_response



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





def _eof_within(sock: "socket.socket", seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_sigterm_closes_idle_connections_first_and_answers_with_connection_close(model_repo: Path,
                                                                                tmp_path: Path) -> None:
    # batches wait up to 2 s to fill, so the request on `busy` is in flight at SIGTERM; the
    # listener stays open for 4 s after it (drain delay)
    server: ServerProcess = start_server(model_repo, tmp_path, max_wait_ms=2000, drain_delay_s=4.0)
    body = b'{"inputs": [[0.5, 0.2]]}'
    request = (b"POST /v1/models/moons/log_prob HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    idle = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    busy = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    client = server.client(timeout=30)
    try:
        idle.sendall(request)
        first = read_http_response(idle, 30.0)
        assert first.startswith(b"HTTP/1.1 200 ") and b"connection: close" not in first.lower()  # kept alive
        assert client.post("/v1/models/moons/log_prob", json={"inputs": [[0.1, 0.1]]}).status_code == 200
        busy.sendall(request)
        end = time.monotonic() + 30
        while server.metric("flowserve_requests_in_flight") < 1:
            assert time.monotonic() < end, "the request never arrived"
            time.sleep(0.02)

        server.proc.send_signal(signal.SIGTERM)
        # the idle kept-alive connection is closed at once, while the listener is still open
        assert _eof_within(idle, 3.0), "the idle kept-alive connection was not closed on SIGTERM"
        assert httpx.get(server.url + "/readyz", timeout=5).status_code == 503
        # the request in flight is answered, with Connection: close, and its connection closed
        answer = read_http_response(busy, 30.0)
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        assert b"connection: close" in answer.lower()
        assert _eof_within(busy, 10.0)
        # the pooled client's connection was closed: it reconnects and is answered, Connection: close
        r = client.post("/v1/models/moons/log_prob", json={"inputs": [[0.3, 0.1]]})
        assert r.status_code == 200, r.text
        assert r.headers["connection"] == "close"
        assert server.proc.wait(60) == 0, server.log()
    finally:
        client.close()
        idle.close()
        busy.close()
        server.terminate()
