"""A closed-loop HTTP/1.1 load generator on asyncio streams (uvloop when present).

Used when wrk is not installed. Run as its own process (``python -m bench.pyloadgen ...``) so that it
never shares an interpreter with the harness or the server; it prints one line in the same format as
the wrk script (``BENCH_JSON {...}``, latencies in microseconds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from urllib.parse import urlsplit

import numpy as np

from .loadgen import MARKER


async def _connection(host: str, port: int, request: bytes, stop_at: float, timeout: float,
                      latencies: list[float], errors: dict[str, int], counters: dict[str, int]) -> None:
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        errors["connect"] += 1
        return
    try:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            writer.write(request)
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
                status = int(head[9:12])
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                body = await asyncio.wait_for(reader.readexactly(length), timeout) if length else b""
            except asyncio.TimeoutError:
                errors["timeout"] += 1
                return
            except (asyncio.IncompleteReadError, ConnectionError, ValueError):
                errors["read"] += 1
                return
            latencies.append(time.perf_counter() - t0)
            counters["bytes"] += len(head) + len(body)
            if not 200 <= status < 400:
                errors["status"] += 1
    finally:
        writer.close()


async def _main(args: argparse.Namespace) -> dict:
    parts = urlsplit(args.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    with open(args.body_file, "rb") as f:
        body = f.read()
    request = (
        f"{args.method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {args.content_type}\r\n"
        f"Accept: {args.accept}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    latencies: list[float] = []
    errors = {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0}
    counters = {"bytes": 0}
    start = time.perf_counter()
    stop_at = start + args.duration
    await asyncio.gather(*(
        _connection(host, port, request, stop_at, args.timeout, latencies, errors, counters)
        for _ in range(args.connections)
    ))
    elapsed = time.perf_counter() - start
    lat = np.asarray(latencies, dtype=np.float64) * 1e6 if latencies else np.zeros(1)
    return {
        "requests": len(latencies), "duration_us": int(elapsed * 1e6), "bytes": counters["bytes"], "errors": errors,
        "latency_us": {
            "p50": float(np.percentile(lat, 50)), "p90": float(np.percentile(lat, 90)),
            "p99": float(np.percentile(lat, 99)), "max": float(lat.max()), "mean": float(lat.mean()),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--body-file", required=True)
    parser.add_argument("--method", default="POST")
    parser.add_argument("--content-type", default="application/json")
    parser.add_argument("--accept", default="application/json")
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    print(MARKER + json.dumps(asyncio.run(_main(args))), flush=True)


if __name__ == "__main__":
    main()
