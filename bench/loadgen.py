"""HTTP load generation: wrk (C, epoll, one thread) when installed, else a Python generator.

Each run is a separate process that keeps ``connections`` keep-alive connections busy for
``duration`` seconds with the same request (closed loop: a connection sends its next request as soon
as the previous answer arrived, so ``connections`` is the concurrency). The process's own CPU time
is recorded (``os.wait4``), so every result shows how much of the machine the generator itself took:
the evidence that it is not the bottleneck.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

__all__ = ["Request", "LoadResult", "Load", "start_load", "run_load", "generator_name"]

MARKER = "BENCH_JSON "

# wrk prints through the Lua ``done`` hook; latencies are in microseconds.
_WRK_LUA = r"""
local f = assert(io.open(%(body_path)s, "rb"))
wrk.method = %(method)s
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = %(content_type)s
wrk.headers["Accept"] = %(accept)s
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%(marker)s{"requests": %%d, "duration_us": %%d, "bytes": %%d, ' ..
    '"errors": {"connect": %%d, "read": %%d, "write": %%d, "status": %%d, "timeout": %%d}, ' ..
    '"latency_us": {"p50": %%d, "p90": %%d, "p99": %%d, "max": %%d, "mean": %%f}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
"""


@dataclass(frozen=True)
class Request:
    """One HTTP request, repeated by every connection for the whole run."""

    path: str
    body: bytes
    content_type: str = "application/json"
    accept: str = "application/json"
    method: str = "POST"


@dataclass
class LoadResult:
    """What one closed-loop run measured. Latencies in milliseconds."""

    generator: str
    connections: int
    seconds: float
    requests: int
    errors: dict[str, int]
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    generator_cpu_s: float
    generator_cores: float = field(default=0.0)

    @property
    def failed(self) -> int:
        return int(sum(self.errors.values()))

    def to_dict(self) -> dict:
        return asdict(self)


def _lua(text: str) -> str:
    """A Lua string literal for plain ASCII ``text``."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def generator_name(preference: str = "auto") -> str:
    """``wrk`` when asked for (or ``auto`` and it is on PATH), else ``python``."""
    if preference == "python":
        return "python"
    if preference == "wrk" or shutil.which("wrk"):
        if not shutil.which("wrk"):
            raise RuntimeError("wrk was asked for but is not installed (apt-get install -y wrk)")
        return "wrk"
    return "python"


class Load:
    """A load run in flight; :meth:`result` waits for it and parses what it printed."""

    def __init__(self, argv: list[str], generator: str, connections: int, cleanup: list[Path]) -> None:
        self.generator = generator
        self.connections = connections
        self._cleanup = cleanup
        self._out = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(argv, stdout=self._out, stderr=subprocess.STDOUT)

    def result(self) -> LoadResult:
        _, status, usage = os.wait4(self._proc.pid, 0)
        self._proc.returncode = os.waitstatus_to_exitcode(status)
        self._out.seek(0)
        text = self._out.read().decode("utf-8", "replace")
        self._out.close()
        for p in self._cleanup:
            p.unlink(missing_ok=True)
        line = next((ln for ln in text.splitlines() if ln.startswith(MARKER)), None)
        if self._proc.returncode != 0 or line is None:
            raise RuntimeError(f"{self.generator} failed (exit {self._proc.returncode}):\n{text[-2000:]}")
        raw = json.loads(line[len(MARKER):])
        seconds = raw["duration_us"] / 1e6
        lat = {k: v / 1000.0 for k, v in raw["latency_us"].items()}
        cpu = usage.ru_utime + usage.ru_stime
        return LoadResult(
            generator=self.generator,
            connections=self.connections,
            seconds=seconds,
            requests=int(raw["requests"]),
            errors={k: int(v) for k, v in raw["errors"].items()},
            rps=raw["requests"] / seconds if seconds > 0 else 0.0,
            p50_ms=lat["p50"], p90_ms=lat["p90"], p99_ms=lat["p99"], max_ms=lat["max"], mean_ms=lat["mean"],
            generator_cpu_s=cpu,
            generator_cores=cpu / seconds if seconds > 0 else 0.0,
        )


def start_load(
    base_url: str,
    request: Request,
    connections: int,
    duration: float,
    generator: str = "auto",
    timeout_s: float = 30.0,
) -> Load:
    """Start a closed-loop run of ``request`` against ``base_url`` in its own process."""
    generator = generator_name(generator)
    body = tempfile.NamedTemporaryFile(prefix="bench-body-", suffix=".bin", delete=False)
    body.write(request.body)
    body.close()
    cleanup = [Path(body.name)]
    url = base_url.rstrip("/") + request.path
    if generator == "wrk":
        script = tempfile.NamedTemporaryFile("w", prefix="bench-", suffix=".lua", delete=False)
        script.write(_WRK_LUA % {
            "body_path": _lua(body.name), "method": _lua(request.method),
            "content_type": _lua(request.content_type), "accept": _lua(request.accept), "marker": MARKER,
        })
        script.close()
        cleanup.append(Path(script.name))
        argv = [
            "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s",
            f"--timeout={int(timeout_s)}s", "-s", script.name, url,
        ]
    else:
        argv = [
            sys.executable, "-m", "bench.pyloadgen", "--url", url, "--body-file", body.name,
            "--method", request.method, "--content-type", request.content_type, "--accept", request.accept,
            "--connections", str(connections), "--duration", str(duration), "--timeout", str(timeout_s),
        ]
    return Load(argv, generator, connections, cleanup)


def run_load(base_url: str, request: Request, connections: int, duration: float,
             generator: str = "auto", timeout_s: float = 30.0) -> LoadResult:
    """:func:`start_load` and wait for its result."""
    return start_load(base_url, request, connections, duration, generator, timeout_s).result()


def host_port(base_url: str) -> tuple[str, int]:
    parts = urlsplit(base_url)
    return parts.hostname or "127.0.0.1", parts.port or 80


if __name__ == "__main__":  # pragma: no cover - manual check
    t = time.time()
    print(run_load(sys.argv[1], Request(sys.argv[2], sys.argv[3].encode()), int(sys.argv[4]), 3.0))
    print(time.time() - t)
