"""How long ``/healthz`` waits while the server parses a big JSON body.

Starts ``flowserve serve`` on a loopback port over a tiny 2-feature model, POSTs one JSON body of
``--rows`` rows of **3** numbers to ``log_prob`` (so the whole body is parsed and the row check then
answers 400 without computing: the figure is the parse alone), and meanwhile probes ``GET /healthz``
every 20 ms from another thread. Prints the POST's duration and status and the probes' latencies
during it (max, p50). ``--server-root DIR`` runs the server from another checkout (e.g. a worktree
of an older commit: ``git worktree add /tmp/old-json HEAD~1``) to compare.

    .venv/bin/python -m bench.json_stall [--rows 1000000] [--server-root /tmp/old-json]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import orjson

from bench.models import make_tiny
from bench.server import ServerProcess, flowserve_argv, free_port

PROBE_EVERY_S = 0.02


def probe(url: str, stop: threading.Event, out: list[tuple[float, float]]) -> None:
    """``(sent, latency)`` of a ``GET /healthz`` every :data:`PROBE_EVERY_S` until ``stop``."""
    with httpx.Client(timeout=120.0) as client:
        while not stop.is_set():
            sent = time.perf_counter()
            client.get(url + "/healthz").raise_for_status()
            out.append((sent, time.perf_counter() - sent))
            time.sleep(PROBE_EVERY_S)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--server-root", type=Path, default=Path(__file__).resolve().parents[1])
    args = parser.parse_args()
    rows = np.random.default_rng(0).standard_normal((args.rows, 3))
    body = orjson.dumps({"inputs": rows}, option=orjson.OPT_SERIALIZE_NUMPY)
    with tempfile.TemporaryDirectory() as tmp:
        make_tiny(tmp)
        port = free_port()
        env = {"PYTHONPATH": str(args.server_root.resolve()), "FLOWSERVE_LOG_LEVEL": "warning",
               "FLOWSERVE_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
        with ServerProcess("flowserve", flowserve_argv(Path(tmp), "127.0.0.1", port), port, env=env) as server:
            stop, probes = threading.Event(), []
            thread = threading.Thread(target=probe, args=(server.url, stop, probes))
            thread.start()
            time.sleep(0.5)
            start = time.perf_counter()
            with httpx.Client(timeout=600.0) as client:
                answer = client.post(server.url + "/v1/models/tiny/log_prob", content=body,
                                     headers={"content-type": "application/json"})
            end = time.perf_counter()
            stop.set()
            thread.join()
    during = np.array([lat for sent, lat in probes if sent + lat > start and sent < end])
    print(f"server root {args.server_root}: body {len(body) / 1e6:.1f} MB ({args.rows} rows), "
          f"POST {end - start:.2f} s -> {answer.status_code}")
    if during.size:
        print(f"/healthz during the POST: {during.size} probes, max {during.max() * 1e3:.0f} ms, "
              f"p50 {np.median(during) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
