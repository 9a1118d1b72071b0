"""The scenarios: closed-loop concurrency sweeps, bulk requests, and a mixed load.

Every function takes a running :class:`~bench.server.ServerProcess` and returns plain dicts for the
results file; none of them judges a figure (that is :mod:`bench.targets`).
"""

from __future__ import annotations

import io
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


def batch_counters(proc: ServerProcess) -> tuple[float, float] | None:
    """``(rows, batches)`` summed over flowserve's ``flowserve_batch_rows`` histogram; None without /metrics."""
    try:
        r = httpx.get(proc.url + "/metrics", timeout=5.0)
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    rows = batches = 0.0
    for line in r.text.splitlines():
        if line.startswith("flowserve_batch_rows_sum"):
            rows += float(line.rsplit(" ", 1)[1])
        elif line.startswith("flowserve_batch_rows_count"):
            batches += float(line.rsplit(" ", 1)[1])
    return rows, batches


def warm_up(server: ServerProcess, request: Request, seconds: float, generator: str) -> None:
    """A short run whose figures are thrown away (first-call costs, allocator, caches)."""
    if seconds > 0:
        run_load(server.url, request, 8, seconds, generator)


def sweep(proc: ServerProcess, request: Request, concurrencies: list[int], duration: float, generator: str,
          rows_per_request: int = 1, **labels: Any) -> list[dict]:
    """One closed-loop run per concurrency, same request throughout."""
    out = []
    for c in concurrencies:
        counters = batch_counters(proc)
        before = proc.cpu_seconds()
        load = run_load(proc.url, request, c, duration, generator)
        row = _row(load, proc, before, rows_per_request, **labels)
        after = batch_counters(proc) if counters else None
        if counters and after and after[1] > counters[1]:
            row["batches"] = after[1] - counters[1]
            row["mean_batch_rows"] = (after[0] - counters[0]) / row["batches"]
        out.append(row)
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
         field: str, repeats: int, budget_s: float = 12.0, warm_body: bytes | None = None,
         warm_rows: int | None = None, **labels: Any) -> dict:
    """Sequential requests of ``rows`` rows each; the fastest of up to ``repeats`` of them.

    A smaller request (``warm_body`` of ``warm_rows`` rows, else the full one) warms the path first
    and checks the answer's format. Then full requests are timed, at least one, more only while they
    stay within ``budget_s``; the first full answer is checked too. The time of one request is from
    sending the first byte to receiving the last (the client's encoding of the body is done before,
    its decoding of the answer after). The fastest, as for the model limit: noise from a shared
    machine only ever slows a request down.
    """
    headers = {"content-type": content_type, "accept": accept}
    times: list[float] = []
    with httpx.Client(base_url=server.url, timeout=600.0) as client:
        warm = client.post(path, content=warm_body or body, headers=headers)
        _check_answer(warm, accept, field, warm_rows or rows)
        before = server.cpu_seconds()
        first = None
        while len(times) < max(1, repeats) and (not times or sum(times) * (1 + 1 / len(times)) <= budget_s):
            t0 = time.perf_counter()
            r = client.post(path, content=body, headers=headers)
            times.append(time.perf_counter() - t0)
            if r.status_code != 200:
                raise BulkFailed(f"{path} answered {r.status_code}: {r.text[:300]}")
            first = first or r
        cpu = server.cpu_seconds() - before
    _check_answer(first, accept, field, rows)
    seconds = min(times)
    return {
        **labels,
        "path": path,
        "rows": rows,
        "request_bytes": len(body),
        "response_bytes": len(first.content),
        "repeats": len(times),
        "seconds": seconds,
        "seconds_all": times,
        "rows_per_s": rows / seconds,
        "server_cores": cpu / sum(times),
    }
