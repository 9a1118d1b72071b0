"""Does a hot reload give its memory back? The server's resident memory over many admin reloads.

``python -m bench.reload_memory --reloads 200`` starts ``python -m service serve`` on a free loopback
port serving one model (``moons`` of ``models/`` by default) with an admin key, once with traced
passes (``FLOWSERVE_TORCHSCRIPT=true``) and once eager (``false``). For each it answers a few requests,
does ``--warmup`` reloads (the first loads of a process grow the allocator's arenas and torch's
lazily built state once), reads the server's ``VmRSS`` from ``/proc/<pid>/status``, does
``--reloads`` more ``POST /v1/admin/models/{name}/reload`` (each followed by one ``log_prob``, so
every new version serves), and reads ``VmRSS`` again. It prints one line per setting and, with
``--json``, writes the figures:

    growth % = 100 * (rss_after - rss_before) / rss_before

A reload that leaks shows as growth proportional to ``--reloads`` (before the fix: ~30 MB per
reload of ``moons``, from the TorchScript classes ``torch.jit.trace`` registered process-wide; see
:mod:`service.accel.torchscript`).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

__all__ = ["main", "measure", "rss_mib"]

ROOT = Path(__file__).resolve().parents[1]


def rss_mib(pid: int) -> float:
    """The resident set size of process ``pid`` in MiB (``VmRSS`` of ``/proc/<pid>/status``)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float = 180.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        try:
            if httpx.get(url + "/readyz", timeout=5.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server not ready after {timeout} s:\n{log.read_text(errors='replace')}")


def measure(model_dir: Path, model: str, reloads: int, warmup: int, trace: bool) -> dict[str, Any]:
    """Start a server, reload ``model`` ``warmup + reloads`` times, and return its RSS figures."""
    key = secrets.token_hex(16)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWSERVE_")}
    env.update({"FLOWSERVE_MODEL_DIR": str(model_dir), "FLOWSERVE_MODELS": model, "FLOWSERVE_HOST": "127.0.0.1",
                "FLOWSERVE_PORT": str(port), "FLOWSERVE_DEVICE": "cpu", "FLOWSERVE_ADMIN_KEY": key,
                "FLOWSERVE_TORCHSCRIPT": "true" if trace else "false", "FLOWSERVE_LOG_LEVEL": "warning",
                "OMP_NUM_THREADS": "1"})
    with tempfile.NamedTemporaryFile("w+b", suffix=".log", delete=False) as log_file:
        log = Path(log_file.name)
        proc = subprocess.Popen([sys.executable, "-m", "service", "serve"], cwd=ROOT, env=env,
                                stdout=log_file, stderr=subprocess.STDOUT)
    try:
        _wait_ready(proc, url, log)
        auth = {"authorization": f"Bearer {key}"}
        with httpx.Client(base_url=url, timeout=120.0) as client:
            features = len(client.get(f"/v1/models/{model}").json()["feature_names"])
            row = {"inputs": [[0.25] * features]}

            def reload_once() -> None:
                r = client.post(f"/v1/admin/models/{model}/reload", headers=auth)
                r.raise_for_status()
                client.post(f"/v1/models/{model}/log_prob", json=row).raise_for_status()

            start_rss = rss_mib(proc.pid)
            for _ in range(warmup):
                reload_once()
            before = rss_mib(proc.pid)
            samples = [before]
            t0 = time.monotonic()
            for i in range(reloads):
                reload_once()
                if (i + 1) % max(1, reloads // 10) == 0:
                    samples.append(rss_mib(proc.pid))
            seconds = time.monotonic() - t0
            after = rss_mib(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.unlink(missing_ok=True)
    return {"trace": trace, "model": model, "warmup": warmup, "reloads": reloads, "rss_start_mib": round(start_rss, 1),
            "rss_before_mib": round(before, 1), "rss_after_mib": round(after, 1),
            "growth_pct": round(100 * (after - before) / before, 2),
            "mib_per_reload": round((after - before) / max(1, reloads), 3),
            "rss_samples_mib": [round(s, 1) for s in samples], "seconds": round(seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reload_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--reloads", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--model", default="moons")
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--trace", choices=("both", "on", "off"), default="both")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    settings = {"both": (True, False), "on": (True,), "off": (False,)}[args.trace]
    results = []
    for trace in settings:
        r = measure(args.model_dir.resolve(), args.model, args.reloads, args.warmup, trace)
        results.append(r)
        print(f"trace={'on ' if trace else 'off'} {r['reloads']} reloads of {r['model']} after {r['warmup']} warm-up: "
              f"RSS {r['rss_before_mib']:.1f} -> {r['rss_after_mib']:.1f} MiB ({r['growth_pct']:+.2f} %, "
              f"{r['mib_per_reload']:+.3f} MiB/reload) in {r['seconds']} s; samples {r['rss_samples_mib']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
