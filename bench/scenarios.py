"""The scenarios: closed-loop concurrency sweeps, bulk requests, and a mixed load.

Every function takes a running :class:`~bench.server.ServerProcess` and returns plain dicts for the
results file; none of them judges a figure (that is :mod:`bench.targets`).
"""

from __future__ import annotations

import io
import statistics
import time
from typing import Any

import httpx
import numpy as np
import orjson

from .loadgen import LoadResult, Request, run_load, start_load
from .server import ServerProcess

__all__ = ["sweep", "bulk", "mixed", "warm_up", "BulkFailed", "NPY", "JSON"]

NPY = "application/x-npy"
JSON = "application/json"


def _row(load: LoadResult, proc: ServerProcess, cpu_before: float, rows_per_request: int, **labels: Any) -> dict:
    seconds = max(load.seconds, 1e-9)
    return {
        **labels,
        "concurrency": load.connections,
        "rows_per_request": rows_per_request,
        "requests": load.requests,
        "failed": load.failed,
        "errors": load.errors,
        "seconds": round(load.seconds, 3),
        "rps": load.rps,
        "rows_per_s": load.rps * rows_per_request,
        "p50_ms": load.p50_ms,
        "p90_ms": load.p90_ms,
        "p99_ms": load.p99_ms,
        "max_ms": load.max_ms,
        "server_cores": (proc.cpu_seconds() - cpu_before) / seconds,
        "generator": load.generator,
        "generator_cores": load.generator_cores,
    }


def warm_up(server: ServerProcess, request: Request, seconds: float, generator: str) -> None:
    """A short run whose figures are thrown away (first-call costs, allocator, caches)."""
    if seconds > 0:
        run_load(server.url, request, 8, seconds, generator)


def sweep(proc: ServerProcess, request: Request, concurrencies: list[int], duration: float, generator: str,
          rows_per_request: int = 1, **labels: Any) -> list[dict]:
    """One closed-loop run per concurrency, same request throughout."""
    out = []
    for c in concurrencies:
        before = proc.cpu_seconds()
        load = run_load(proc.url, request, c, duration, generator)
        out.append(_row(load, proc, before, rows_per_request, **labels))
    return out


def mixed(server: ServerProcess, requests: dict[str, tuple[Request, int]], connections_each: int,
          duration: float, generator: str, **labels: Any) -> list[dict]:
    """All ``requests`` at once, each from its own generator process with ``connections_each``."""
    before = server.cpu_seconds()
    loads = {op: (start_load(server.url, req, connections_each, duration, generator), rows)
             for op, (req, rows) in requests.items()}
    results = {op: (load.result(), rows) for op, (load, rows) in loads.items()}
    out = [_row(res, server, before, rows, op=op, **labels) for op, (res, rows) in results.items()]
    for row in out:  # server CPU was shared by all of them: report it once, on every row
        row["server_cores_all_ops"] = row.pop("server_cores")
    return out


class BulkFailed(RuntimeError):
    """A bulk request was not answered 200 with the expected rows."""


def _check_answer(response: httpx.Response, accept: str, field: str, n: int) -> None:
    if response.status_code != 200:
        raise BulkFailed(f"{response.request.url.path} answered {response.status_code}: {response.text[:300]}")
    media = response.headers.get("content-type", "").split(";")[0].strip()
    if media != accept:
        raise BulkFailed(f"{response.request.url.path} answered {media!r} when {accept!r} was asked for")
    if accept == NPY:
        got = np.load(io.BytesIO(response.content), allow_pickle=False).shape[0]
    else:
        got = len(orjson.loads(response.content)[field])
    if got != n:
        raise BulkFailed(f"{response.request.url.path} answered {got} rows of {field!r}, expected {n}")


def bulk(server: ServerProcess, path: str, body: bytes, content_type: str, accept: str, rows: int,
         field: str, repeats: int, **labels: Any) -> dict:
    """``repeats`` sequential requests of ``rows`` rows each (after one checked warm-up request).

    The time of one request is from sending the first byte to receiving the last (the client's
    encoding of the body is done before, its decoding of the answer after).
    """
    headers = {"content-type": content_type, "accept": accept}
    times = []
    with httpx.Client(base_url=server.url, timeout=600.0) as client:
        first = client.post(path, content=body, headers=headers)
        _check_answer(first, accept, field, rows)
        response_bytes = len(first.content)
        before = server.cpu_seconds()
        for _ in range(repeats):
            t0 = time.perf_counter()
            r = client.post(path, content=body, headers=headers)
            times.append(time.perf_counter() - t0)
            if r.status_code != 200:
                raise BulkFailed(f"{path} answered {r.status_code}: {r.text[:300]}")
        cpu = server.cpu_seconds() - before
    seconds = statistics.median(times)
    return {
        **labels,
        "path": path,
        "rows": rows,
        "request_bytes": len(body),
        "response_bytes": response_bytes,
        "repeats": repeats,
        "seconds": seconds,
        "seconds_all": times,
        "rows_per_s": rows / seconds,
        "server_cores": cpu / sum(times),
    }
