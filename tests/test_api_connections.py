"""Connections: idle and slowloris connections are closed by the read timeouts, a slow body gets
408, and connections past the cap are answered 503 + Retry-After while the others are served.

Bounds are generous (the machine is shared); the tests check the mechanism, not the timing.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.server import ServerProcess, start_server, read_http_response


LOG_PROB = b'{"inputs": [[0.5, 0.2]]}'


def _request(path: str, body: bytes = b"", method: str = "POST") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def _connect(server: ServerProcess) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    return s




def _closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Whether the server closed ``sock`` within ``seconds`` (EOF or reset), and what it sent."""
    sock.settimeout(0.2)
    received = b""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            return True, received
        if not chunk:
            return True, received
        received += chunk
    return False, received


@pytest.fixture(scope="module")
def timeouts_server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory):
    with start_server(model_repo, tmp_path_factory.mktemp("timeouts"), header_timeout_s=1.0, body_timeout_s=1.0,
                        timeout_keep_alive_s=1.0) as proc:
        yield proc


def test_idle_and_slowloris_connections_are_closed_while_a_client_is_served(timeouts_server: ServerProcess) -> None:
    server = timeouts_server
    idle = [_connect(server) for _ in range(50)]
    slow = _connect(server)
    head = _request("/v1/models/moons/log_prob", LOG_PROB)
    sent = {"bytes": 0, "error": None}
    stop = threading.Event()

    def trickle() -> None:  # one header byte every 0.5 s: never a complete head within 1 s
        try:
            for byte in head[:40]:
                if stop.is_set():
                    return
                slow.sendall(bytes([byte]))
                sent["bytes"] += 1
                time.sleep(0.5)
        except OSError as e:
            sent["error"] = e

    thread = threading.Thread(target=trickle, daemon=True)
    start = time.monotonic()
    thread.start()
    try:
        with server.client(timeout=10) as client:  # a normal client is served meanwhile
            for _ in range(5):
                r = client.post("/v1/models/moons/log_prob", json={"inputs": [[0.5, 0.2]]})
                assert r.status_code == 200, r.text
        results = [_closed_within(s, 20) for s in idle]
        assert all(closed for closed, _ in results), "an idle connection was never closed"
        assert all(data == b"" for _, data in results)  # nothing to answer: closed quietly
        closed, data = _closed_within(slow, 20)
        assert closed, "the slowloris connection was never closed"
        assert time.monotonic() - start < 15  # well before its 40 bytes (20 s) were sent
        assert data.startswith(b"HTTP/1.1 408 "), data
        assert b"application/problem+json" in data and b"request-timeout" in data
        assert 0 < sent["bytes"] < 40
    finally:
        stop.set()
        for s in [*idle, slow]:
            s.close()
    # and the server still serves
    assert httpx.post(server.url + "/v1/models/moons/log_prob", json={"inputs": [[0.5, 0.2]]}).status_code == 200


def test_a_body_that_never_completes_gets_408(timeouts_server: ServerProcess) -> None:
    s = _connect(timeouts_server)
    try:
        head = _request("/v1/models/moons/log_prob", LOG_PROB)
        s.sendall(head[:-5])  # the head and part of the body, then silence
        closed, data = _closed_within(s, 20)
        assert closed, "the connection with an incomplete body was never closed"
        assert data.startswith(b"HTTP/1.1 408 "), data
        assert data.count(b"HTTP/1.1") == 1  # the handler's own answer was not written after it
    finally:
        s.close()
    assert httpx.get(timeouts_server.url + "/healthz").status_code == 200


def test_an_oversized_head_gets_431(timeouts_server: ServerProcess) -> None:
    s = _connect(timeouts_server)
    try:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n")
        closed, data = _closed_within(s, 20)
        assert closed and data.startswith(b"HTTP/1.1 431 "), data[:200]
    finally:
        s.close()


def test_a_head_written_with_a_large_body_in_one_send_is_not_taken_for_a_large_head(
        timeouts_server: ServerProcess) -> None:
    """Only the head's bytes count towards the head limit: a browser writing the head and a 100 KB
    JSON body in one send (the /ui heat map) was answered 431 when the body's bytes counted too."""
    rows = b"[" + b",".join(b"[%d.5, 0.25]" % (i % 7) for i in range(8000)) + b"]"
    body = b'{"inputs": ' + rows + b"}"
    assert len(body) > 70_000
    s = _connect(timeouts_server)
    try:
        s.sendall(_request("/v1/models/moons/log_prob", body))
        data = read_http_response(s, 10.0)
        assert data.startswith(b"HTTP/1.1 200 "), data[:200]
    finally:
        s.close()


def test_keep_alive_connections_are_reused_and_closed_after_idling(timeouts_server: ServerProcess) -> None:
    s = _connect(timeouts_server)
    try:
        for _ in range(3):  # the same connection serves several requests
            s.sendall(_request("/v1/models/moons/log_prob", LOG_PROB))
            data = read_http_response(s, 10.0)
            assert data.startswith(b"HTTP/1.1 200 "), data
            assert b"connection: close" not in data.lower()
        closed, _ = _closed_within(s, 20)
        assert closed, "an idle kept-alive connection was never closed"
    finally:
        s.close()


def test_connections_past_the_cap_get_503_and_the_server_recovers(model_repo: Path, tmp_path: Path) -> None:
    server = start_server(model_repo, tmp_path, max_connections=20, header_timeout_s=30.0)
    held: list[socket.socket] = []
    try:
        held = [_connect(server) for _ in range(20)]  # 20 connections busy reading a head fill the cap
        for s in held[1:]:
            s.sendall(b"POST /v1/models/moons/log_prob HTTP/1.1\r\nHost: x\r\n")
        held[0].sendall(_request("/v1/models/moons/log_prob", LOG_PROB)[:20])
        time.sleep(0.5)
        statuses = []
        for _ in range(5):
            r = httpx.post(server.url + "/v1/models/moons/log_prob", json={"inputs": [[0.5, 0.2]]}, timeout=10)
            statuses.append(r.status_code)
            assert r.status_code == 503, r.text
            assert int(r.headers["retry-after"]) >= 1
            assert r.headers["content-type"] == "application/problem+json"
            assert r.json()["type"].endswith(":too-many-connections")
            assert r.headers["connection"] == "close"
        # the connections already open are still served
        held[0].sendall(_request("/v1/models/moons/log_prob", LOG_PROB)[20:])
        assert read_http_response(held[0], 10.0).startswith(b"HTTP/1.1 200 ")
        for s in held:
            s.close()
        held = []
        end = time.monotonic() + 20
        while True:  # the server recovers once they are gone
            r = httpx.post(server.url + "/v1/models/moons/log_prob", json={"inputs": [[0.5, 0.2]]}, timeout=10)
            if r.status_code == 200:
                break
            assert time.monotonic() < end, "the server never served again after the connections closed"
            time.sleep(0.1)
    finally:
        for s in held:
            s.close()
        server.terminate()


def test_at_the_cap_the_longest_idle_connection_makes_room(model_repo: Path, tmp_path: Path) -> None:
    server = start_server(model_repo, tmp_path, max_connections=20, header_timeout_s=30.0)
    held: list[socket.socket] = []
    try:
        held = [_connect(server) for _ in range(20)]  # 20 silent connections fill the cap
        time.sleep(0.5)
        with server.client(timeout=10) as client:  # a working client is served, on one kept-alive connection
            for _ in range(3):
                r = client.post("/v1/models/moons/log_prob", json={"inputs": [[0.5, 0.2]]})
                assert r.status_code == 200, r.text
        closed = [_closed_within(s, 0.5)[0] for s in held]
        assert closed[0], "the oldest idle connection was not closed to make room"
        assert not all(closed), "every idle connection was closed, not just enough to make room"
    finally:
        for s in held:
            s.close()
        server.terminate()
