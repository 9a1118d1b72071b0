"""Helpers of the HTTP tests: a tiny model repository and real servers in subprocesses.

The fixtures over them live in :mod:`tests.conftest`. The models are
trained for a few epochs with :func:`service.training.fit.fit` and saved with
:func:`service.model.artifact.save_artifact`, exactly as real models are:

- ``moons``: 2 features ``x0, x1``, NSF, two versions (1 and 2), calibration from held-out rows;
- ``cond``: 2 features, 3 one-hot context features ``c0..c2`` (a Gaussian blob per class), MAF;
- ``nocal``: like ``moons`` v1 but without a calibration set (``score`` answers 409).

Servers are ``python -m service serve`` subprocesses on free loopback ports, configured through
``FLOWSERVE_*`` variables, and waited for on ``/readyz``; :func:`served_in_process` serves an app by
uvicorn in a thread of the test process instead, for tests that inject a fault inside serving.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 120.0


# -- models --------------------------------------------------------------------------------------------
def _moons(n: int, seed: int) -> np.ndarray:
    from sklearn.datasets import make_moons

    x, _ = make_moons(n_samples=n, noise=0.08, random_state=seed)
    return x.astype(np.float64)


def _blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 3, size=n)
    centres = np.array([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]])
    x = centres[label] + 0.4 * rng.standard_normal((n, 2))
    return x, np.eye(3)[label]


def _save(root: Path, name: str, result: Any, feature_names: list[str], context_names: list[str],
          calibration: list[float], rows: int) -> Path:
    from service.model.artifact import save_artifact

    model = result.model
    fields = {
        "name": name,
        "description": f"test model {name}",
        "flow": model.flow_spec,
        "dtype": "float32" if model.dtype.is_floating_point and model.dtype.itemsize == 4 else "float64",
        "feature_names": feature_names,
        "context_names": context_names,
        "preprocessing": {"shift": model.shift.double().tolist(), "scale": model.scale.double().tolist()},
        "training": {"rows": rows, "epochs": result.epochs, "seconds": result.seconds, "val_nll": result.best_val_nll,
                     "val_nll_per_dim": result.best_val_nll / len(feature_names)},
        "calibration": calibration,
        "exactness": {"note": "not measured for test models"},
    }
    return save_artifact(root, fields, model)


def build_repository(root: Path) -> Path:
    """Train and save the test models under ``root`` (a few seconds on 2 cores)."""
    import torch

    from service.training.fit import TrainConfig, fit

    torch.set_num_threads(1)
    small = dict(transforms=2, hidden_features=[16, 16], epochs=6, batch_size=128, patience=50, max_minutes=0.5)
    x = _moons(1200, 0)
    xt, xv, xc = x[:800], x[800:1000], x[1000:]
    for seed in (0, 1):
        result = fit(xt, xv, TrainConfig(flow="nsf", bins=4, seed=seed, **small))
        with torch.inference_mode():
            cal = result.model.log_prob(torch.as_tensor(xc, dtype=result.model.dtype)).double().tolist()
        _save(root, "moons", result, ["x0", "x1"], [], cal, len(xt))
        if seed == 0:
            _save(root, "nocal", result, ["x0", "x1"], [], [], len(xt))
    xb, cb = _blobs(1200, 2)
    result = fit(xb[:800], xb[800:1000], TrainConfig(flow="maf", seed=0, **small), c_train=cb[:800], c_val=cb[800:1000])
    with torch.inference_mode():
        cal = result.model.log_prob(torch.as_tensor(xb[1000:], dtype=result.model.dtype),
                                    torch.as_tensor(cb[1000:], dtype=result.model.dtype)).double().tolist()
    _save(root, "cond", result, ["x0", "x1"], ["c0", "c1", "c2"], cal, 800)
    return root


# -- servers -------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m service serve`` on a free loopback port, with ``FLOWSERVE_*`` settings."""

    def __init__(self, model_dir: Path, log_path: Path, **settings: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWSERVE_")}
        env.update({"FLOWSERVE_MODEL_DIR": str(model_dir), "FLOWSERVE_HOST": "127.0.0.1",
                    "FLOWSERVE_PORT": str(self.port), "FLOWSERVE_DEVICE": "cpu", "FLOWSERVE_LOG_LEVEL": "warning",
                    "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
        env.update({f"FLOWSERVE_{k.upper()}": str(v) for k, v in settings.items()})
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "service", "serve"], cwd=ROOT, env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> "ServerProcess":
        end = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=5.0) as client:
            while time.monotonic() < end:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
                try:
                    if client.get("/readyz").status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 60.0), **kw)

    def metric(self, name: str, **labels: str) -> float:
        """The sum of a metric's samples whose labels include ``labels``."""
        text = httpx.get(self.url + "/metrics", timeout=10.0).text
        return metric_value(text, name, **labels)

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()

    def terminate(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


def metric_value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    pattern = re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$")
    for line in text.splitlines():
        m = pattern.match(line)
        if not m:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


def start_server(model_dir: Path, tmp_path: Path, **settings: Any) -> ServerProcess:
    return ServerProcess(model_dir, tmp_path / f"server-{free_port()}.log", **settings).wait_ready()


@contextmanager
def running_servers(configs: Mapping[str, tuple[Path, dict[str, Any]]], tmp_path: Path) -> Iterator[dict[str, ServerProcess]]:
    """Start one server per ``name: (model_dir, settings)`` side by side, wait until all are ready,
    and stop them all (SIGTERM) on exit."""
    procs = {name: ServerProcess(model_dir, tmp_path / f"{name}-{free_port()}.log", **settings)
             for name, (model_dir, settings) in configs.items()}
    try:
        for proc in procs.values():
            proc.wait_ready()
        yield procs
    finally:
        for proc in procs.values():
            proc.terminate()


@contextmanager
def served_in_process(app: Any, ready_path: str | None = "/readyz") -> Iterator[str]:
    """``app`` served by a real uvicorn server on a free loopback port, in a thread of this process; yields its URL.

    For the tests that put a fault inside serving (``monkeypatch``): the server shares the test's
    modules, and clients still speak real HTTP to it. Waits until the server has started and, with
    ``ready_path``, until that path answers 200 (the models load after the lifespan starts).
    """
    import asyncio
    import threading

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", log_config=None,
                                           lifespan="on"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        with httpx.Client(timeout=5.0) as client:
            while True:
                assert thread.is_alive(), "the in-process server stopped"
                assert time.monotonic() < deadline, f"the in-process server was not ready after {STARTUP_TIMEOUT_S} s"
                if server.started:
                    try:
                        if ready_path is None or client.get(url + ready_path).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(60)


def read_http_response(sock: socket.socket, timeout: float = 30.0) -> bytes:
    """One whole HTTP/1.1 response (head and ``Content-Length`` body) read from a raw socket."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection mid-response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection mid-body"
        body += chunk
    return head + b"\r\n\r\n" + body
