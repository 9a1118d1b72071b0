"""One-row latency beside one huge request (issue 9, item 3): p50/p99 of one-row ``log_prob``.

Starts ``python -m service serve`` (from ``--root``, default this checkout: point it at a
``git worktree`` of an older commit to measure the old behaviour) over ``--model-dir`` on a free
loopback port, sends one huge request in a thread (``sample`` of ``--big`` rows, or ``log_prob``
of ``--big`` rows as an ``.npy`` body with ``--big-op log_prob``), and while it runs sends one-row
``log_prob`` requests one after another, ``--gap`` seconds apart. Prints one JSON line: the
one-row latencies' p50/p99/max (of those sent while the big one ran), their statuses, and the big
request's status and seconds. Extra ``FLOWSERVE_*`` settings: ``--set NAME=VALUE``.

    .venv/bin/python -m bench.fairness --model moons --big 1000000
    .venv/bin/python -m bench.fairness --model digits --big-op log_prob --big 400000
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=ROOT, help="checkout whose server runs (default: this one)")
    ap.add_argument("--model-dir", type=Path, default=ROOT / "models")
    ap.add_argument("--model", default="moons")
    ap.add_argument("--big", type=int, default=1_000_000, help="rows of the huge request")
    ap.add_argument("--big-op", choices=["sample", "log_prob"], default="sample")
    ap.add_argument("--gap", type=float, default=0.01, help="seconds between one-row requests")
    ap.add_argument("--set", action="append", default=[], help="NAME=VALUE: a FLOWSERVE_ setting")
    args = ap.parse_args()

    port = _port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWSERVE_")}
    env.update({"FLOWSERVE_MODEL_DIR": str(args.model_dir.resolve()), "FLOWSERVE_MODELS": args.model,
                "FLOWSERVE_PORT": str(port), "FLOWSERVE_HOST": "127.0.0.1", "FLOWSERVE_DEVICE": "cpu",
                "FLOWSERVE_LOG_LEVEL": "warning"})
    for item in args.set:
        name, _, value = item.partition("=")
        env["FLOWSERVE_" + name.upper()] = value
    proc = subprocess.Popen([sys.executable, "-m", "service", "serve"], cwd=args.root, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=600) as c:
            end = time.monotonic() + 300
            while time.monotonic() < end:
                try:
                    if c.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            card = c.get(f"/v1/models/{args.model}").json()
            features = int(card.get("features") or len(card["feature_names"]))
            one = {"inputs": [[0.1] * features]}
            for _ in range(20):  # warm the one-row path
                c.post(f"/v1/models/{args.model}/log_prob", json=one).raise_for_status()
            big: dict[str, float | int] = {}

            def run_big() -> None:
                with httpx.Client(base_url=url, timeout=600) as bc:
                    t0 = time.monotonic()
                    if args.big_op == "sample":
                        r = bc.post(f"/v1/models/{args.model}/sample", json={"n": args.big, "seed": 1},
                                    headers={"Accept": "application/x-npy"})
                    else:
                        buf = io.BytesIO()
                        x = np.random.default_rng(0).normal(size=(args.big, features)).astype(np.float32)
                        np.save(buf, x)
                        r = bc.post(f"/v1/models/{args.model}/log_prob", content=buf.getvalue(),
                                    headers={"Content-Type": "application/x-npy", "Accept": "application/x-npy"})
                    big.update(status=r.status_code, seconds=time.monotonic() - t0, end=time.monotonic())

            thread = threading.Thread(target=run_big)
            thread.start()
            time.sleep(0.5 if args.big_op == "sample" else 3.0)  # let the big one reach the worker
            lat, statuses = [], {}
            while thread.is_alive():
                t0 = time.perf_counter()
                r = c.post(f"/v1/models/{args.model}/log_prob", json=one)
                dt = time.perf_counter() - t0
                if thread.is_alive():
                    lat.append(dt)
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                time.sleep(args.gap)
            thread.join()
        ms = np.array(lat) * 1000
        print(json.dumps({
            "root": str(args.root), "model": args.model, "big_op": args.big_op, "big_rows": args.big,
            "settings": args.set, "big_status": big.get("status"), "big_seconds": round(float(big.get("seconds", 0)), 2),
            "one_row_requests": len(lat), "one_row_statuses": statuses,
            "p50_ms": round(float(np.percentile(ms, 50)), 1) if len(ms) else None,
            "p99_ms": round(float(np.percentile(ms, 99)), 1) if len(ms) else None,
            "max_ms": round(float(ms.max()), 1) if len(ms) else None,
        }))
    finally:
        proc.terminate()
        proc.wait(60)


if __name__ == "__main__":
    main()
