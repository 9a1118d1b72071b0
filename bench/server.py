"""Start, watch and stop server processes the way users start them.

flowserve runs as ``flowserve serve --model-dir DIR --host H --port P`` with its settings from
``FLOWSERVE_*`` environment variables; the HTTP ceiling runs as ``python -m bench.ceiling`` with the
same uvicorn settings. Each is a child process on a free loopback port. The harness reads its
resident memory and CPU time from ``/proc`` (process and children together).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

__all__ = ["ServerProcess", "free_port", "flowserve_argv", "ceiling_argv"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flowserve_argv(model_dir: Path, host: str, port: int) -> list[str]:
    """The command users type: the ``flowserve`` script of this environment."""
    script = Path(sys.executable).parent / "flowserve"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "service"]
    return [*cmd, "serve", "--model-dir", str(model_dir), "--host", host, "--port", str(port)]


def ceiling_argv(host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "bench.ceiling", "--host", host, "--port", str(port)]


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(p) for p in f.read().split()]
    except OSError:
        return []
    out = list(kids)
    for k in kids:
        out.extend(_children(k))
    return out


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


class ServerProcess:
    """A server child process on loopback; a context manager that stops it on exit."""

    def __init__(self, name: str, argv: list[str], port: int, env: dict[str, str] | None = None,
                 ready_path: str = "/readyz", host: str = "127.0.0.1") -> None:
        self.name = name
        self.argv = argv
        self.port = port
        self.host = host
        self.url = f"http://{host}:{port}"
        self.ready_path = ready_path
        self.env = {**os.environ, **(env or {})}
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc: subprocess.Popen | None = None
        self.ready_seconds: float | None = None
        self._log = tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".log", delete=False)

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, timeout: float = 120.0) -> "ServerProcess":
        """Start the process and wait until ``ready_path`` answers 200; record start-to-ready time."""
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        try:
            self._wait_ready(t0, timeout)
        except BaseException:  # not ready, or interrupted while waiting: never leave it running
            self.stop()
            raise
        self.ready_seconds = time.perf_counter() - t0
        return self

    def _wait_ready(self, t0: float, timeout: float) -> None:
        deadline = t0 + timeout
        with httpx.Client(timeout=2.0) as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before ready:\n{self.log_tail()}")
                try:
                    if client.get(self.url + self.ready_path).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s:\n{self.log_tail()}")
                time.sleep(0.02)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (graceful drain), then SIGKILL if it does not exit in ``timeout`` seconds."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        Path(self._log.name).unlink(missing_ok=True)

    # -- observation -----------------------------------------------------------------------------
    @property
    def pids(self) -> list[int]:
        if self.proc is None:
            return []
        return [self.proc.pid, *_children(self.proc.pid)]

    def rss_bytes(self) -> int:
        """Resident memory of the process and its children."""
        return sum(_rss_bytes(p) for p in self.pids)

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process and its children so far."""
        return sum(_cpu_seconds(p) for p in self.pids)

    def log_tail(self, chars: int = 3000) -> str:
        self._log.flush()
        try:
            return Path(self._log.name).read_text(errors="replace")[-chars:]
        except OSError:
            return ""
